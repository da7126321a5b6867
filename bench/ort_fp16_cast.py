#!/usr/bin/env python
"""Per-run CPU cost of onnxruntime's inserted float16 -> float32 weight Casts (issue 15,
verification by pieces): one MatMul ``x[1, 16, 4096] @ W[4096, 11008]`` with W float16
(the CPU provider has no float16 MatMul: it inserts a Cast of W, run on every run, and
the weights are not prepacked) against W widened once to float32 with Casts of x and y
only; one intra-op thread, BASIC optimisation (as the verification), CPU seconds.  Also
says whether the two give the same bits.

    python bench/ort_fp16_cast.py
"""

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N = 4096, 11008
W = (np.random.default_rng(0).standard_normal((K, N)) * 0.02).astype(np.float16)


def model(w32):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 16, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 16, N])
    if w32:
        nodes = [
            helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x32", "W"], ["y32"]),
            helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.FLOAT16),
        ]
        init = [numpy_helper.from_array(W.astype(np.float32), "W")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
        init = [numpy_helper.from_array(W, "W")]
    g = helper.make_graph(nodes, "g", [x], [y], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


x = np.random.default_rng(1).standard_normal((1, 16, K)).astype(np.float16)
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
for w32 in (False, True, False, True):
    s = ort.InferenceSession(model(w32), so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": x})
    t = time.process_time()
    for _ in range(5):
        y = s.run(None, {"x": x})[0]
    dt = (time.process_time() - t) / 5
    print(
        "weights",
        "float32 (cast once)" if w32 else "float16 (ORT casts each run)",
        f"{dt * 1e3:.1f} ms CPU/run, {dt / W.size * 1e9:.2f} ns per weight element",
    )
ys = [
    ort.InferenceSession(model(w32), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for w32 in (False, True)
]
print(
    "outputs bit-identical:",
    np.array_equal(ys[0].view(np.uint16), ys[1].view(np.uint16)),
    "max abs diff",
    float(np.max(np.abs(ys[0].astype(np.float32) - ys[1].astype(np.float32)))),
)

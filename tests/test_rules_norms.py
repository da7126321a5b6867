"""Rules for GroupNormalization (per-group and per-channel affine) and ONNX Attention.

Tiny graphs built with onnx.helper; each teleports with onnxruntime agreeing.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from graphteleport.analysis import analyze
from graphteleport.passes import TeleportPass
from graphteleport.verify import run


def _model(nodes: list, inits: list, inputs: list, opset: int) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _rel_err(before: onnx.ModelProto, after: ir.Model, feeds: dict) -> float:
    a = run(before.SerializeToString(), feeds)[0]
    b = run(after, feeds)[0]
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize(("opset", "params"), [(18, 2), (21, 8)])
def test_groupnorm(opset: int, params: int) -> None:
    """Conv(8) → GroupNorm(2 groups) → Relu → Conv: GroupNorm's input is pinned (normalized);
    its output has one cofactor per scale entry: 2 per group at opset 18, 8 per channel at 21.
    (Shape inference cannot type GroupNormalization: the shapes come from one onnxruntime run.)
    """
    rng = np.random.default_rng(0)
    inits = [
        nh.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
        nh.from_array(rng.uniform(0.5, 1.5, params).astype(np.float32), "g"),
        nh.from_array(rng.standard_normal(params).astype(np.float32), "b"),
        nh.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "W2"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "W"], ["c"]),
        h.make_node("GroupNormalization", ["c", "g", "b"], ["n"], num_groups=2),
        h.make_node("Relu", ["n"], ["r"]),
        h.make_node("Conv", ["r", "W2"], ["y"]),
    ]
    m = _model(nodes, inits, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 6, 6])], opset)
    q = analyze(ir.from_proto(m))
    assert q.free_cofactors == params
    assert any(p.reason.startswith("GroupNormalization input") for p in q.pinned())
    model = ir.from_proto(m)
    result = TeleportPass(seed=0)(model)
    assert set(result.stats.changed) == {"g", "b", "W2"}
    feeds = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    assert _rel_err(m, model, feeds) <= 1e-5


def test_attention_op_relates_q_and_k() -> None:
    """ONNX Attention (opset 23) on [B, T, H·D] projections with 2 query heads and 1
    key/value head (grouped-query attention): Q's head dims relate inversely to K's (D
    cofactors shared by both query heads of the group), V's head dims carry into the
    output projection (D), the input is the graph input (pinned): 2·D = 8 free."""
    rng = np.random.default_rng(1)
    c, d = 8, 4
    w = {
        n: rng.standard_normal(s).astype(np.float32)
        for n, s in {"Wq": (c, 2 * d), "Wk": (c, d), "Wv": (c, d), "Wo": (2 * d, c)}.items()
    }
    nodes = [
        h.make_node("MatMul", ["x", "Wq"], ["q"]),
        h.make_node("MatMul", ["x", "Wk"], ["k"]),
        h.make_node("MatMul", ["x", "Wv"], ["v"]),
        h.make_node("Attention", ["q", "k", "v"], ["a"], q_num_heads=2, kv_num_heads=1),
        h.make_node("MatMul", ["a", "Wo"], ["y"]),
    ]
    inits = [nh.from_array(a, n) for n, a in w.items()]
    m = _model(nodes, inits, [h.make_tensor_value_info("x", T.FLOAT, [1, 5, c])], 23)
    q = analyze(ir.from_proto(m))
    assert q.free_cofactors == 2 * d
    model = ir.from_proto(m)
    TeleportPass(seed=0, sampling="inter_landscape", cob_range=0.9)(model)
    feeds = {"x": rng.standard_normal((1, 5, c)).astype(np.float32)}
    assert _rel_err(m, model, feeds) <= 1e-5

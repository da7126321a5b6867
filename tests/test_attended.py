"""auto's INT8 score counts a Hugging Face encoder's outputs at attended positions only
(graphteleport.activations.attended): the padded positions' outputs are what the model
computes for padding, which no consumer reads."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphteleport.activations import PADDING_INPUT, Int8Simulation, attended
from graphteleport.analysis import analyze_model


def test_attended_positions_of_a_hidden_state() -> None:
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], np.int64)
    hidden = np.zeros((2, 4, 3), np.float32)
    got = attended({PADDING_INPUT: mask}, hidden)
    assert got is not None and got.shape == hidden.shape
    assert got[:, :, 0].tolist() == (mask != 0).tolist() and (got == got[:, :, :1]).all()
    assert attended({PADDING_INPUT: mask}, np.zeros((2, 3))) is None  # pooled: every element
    assert attended({PADDING_INPUT: mask}, np.zeros((2, 5, 3))) is None  # other positions
    assert attended({"ids": mask}, hidden) is None  # no padding input
    assert attended({PADDING_INPUT: mask[0]}, hidden) is None  # not [batch, tokens]


def _encoder() -> onnx.ModelProto:
    """``y = relu(x @ w1) @ w2`` per token, with an ``attention_mask`` input it ignores."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("MatMul", ["a", "w2"], ["y"]),
        ],
        "enc",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6, 8]),
            helper.make_tensor_value_info(PADDING_INPUT, TensorProto.INT64, ["b", 6]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_score_leaves_padded_positions_out() -> None:
    """Signal and noise are the sums over attended positions: a padded position whose
    input is huge (and whose INT8 error is then huge) does not enter them."""
    rng = np.random.default_rng(1)
    feeds = []
    for _ in range(3):
        x = rng.standard_normal((2, 6, 8)).astype(np.float32)
        mask = np.ones((2, 6), np.int64)
        mask[:, 4:] = 0
        x[:, 4:] *= 1000.0  # the padding's outputs: large, and badly quantized
        feeds.append({"x": x, PADDING_INPUT: mask})
    model = ir.from_proto(_encoder())
    analysis = analyze_model(model)
    sim = Int8Simulation.calibrate(model, analysis, feeds)
    assert sim.masked
    tau = analysis.solution.cofactors(np.ones(analysis.solution.num_pairs))
    signal, noise = sim.sample_noise(tau)
    for k in range(len(feeds)):
        r = np.asarray(sim.reference[k][0], np.float64)
        assert signal[k] == np.sum(r[:, :4] ** 2)  # attended positions only
        assert signal[k] < np.sum(r**2) / 1000
    assert np.array_equal(sim.signal(), signal) and (noise > 0).all()

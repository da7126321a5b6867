"""SmoothQuant's cofactors (graphteleport.activations): activation ranges from calibration
inputs, ``s = max|X|^α / max|W|^(1−α)`` per class, applied as a teleport."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import make_model, max_rel_err, rand
from onnx import helper

from graphteleport.activations import (
    activation_ranges,
    consumer_ranges,
    load_calibration,
    smooth_cofactors,
)
from graphteleport.analysis import analyze_model
from graphteleport.errors import InputError
from graphteleport.passes.teleport import apply_values

B, D, H, O = 16, 8, 12, 4
OUTLIER = 3  # the hidden channel with the large range


def mlp(consumer: str = "MatMul", outlier: float = 1.0) -> onnx.ModelProto:
    """x → MatMul W1 → Add b1 → Relu → (MatMul W2 | Gemm transB W2ᵀ) → Add b2 → y;
    hidden channel OUTLIER's incoming weights times ``outlier``."""
    w1 = rand((D, H), 1)
    w1[:, OUTLIER] *= outlier
    w2 = rand((H, O), 3)
    inits = {"w1": w1, "b1": rand((H,), 2), "b2": rand((O,), 4)}
    if consumer == "MatMul":
        inits["w2"] = w2
        second = helper.make_node("MatMul", ["a", "w2"], ["z"])
    else:
        inits["w2"] = np.ascontiguousarray(w2.T)
        second = helper.make_node("Gemm", ["a", "w2"], ["z"], transB=1)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["a"]),
        second,
        helper.make_node("Add", ["z", "b2"], ["y"]),
    ]
    return make_model(nodes, {"x": [B, D]}, {"y": [B, O]}, inits)


def calibration(samples: int = 4, seed: int = 10) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((B, D)).astype(np.float32)} for _ in range(samples)]


def test_activation_ranges_match_numpy() -> None:
    proto = mlp()
    model = ir.from_proto(proto)
    analysis = analyze_model(model)
    feeds = calibration()
    ranges = activation_ranges(model, analysis, feeds)
    w = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer}
    expected: dict[str, list[np.ndarray]] = {}
    for f in feeds:
        x = f["x"].astype(np.float64)
        h = x @ w["w1"]
        hb = h + w["b1"]
        a = np.maximum(hb, 0)
        z = a @ w["w2"]
        for name, v in {"x": x, "h": h, "hb": hb, "a": a, "z": z, "y": z + w["b2"]}.items():
            layout = analysis.neurons[name].shape
            axes = tuple(k for k, d in enumerate(layout) if d == 1)
            expected.setdefault(name, []).append(np.abs(v).max(axis=axes, keepdims=True))
    assert set(ranges) == set(expected)
    for name in ("h", "hb", "a"):  # hidden: one neuron per feature
        assert analysis.neurons[name].shape == (1, H)
    for name, parts in expected.items():
        assert ranges[name].shape == analysis.neurons[name].shape
        np.testing.assert_allclose(ranges[name], np.max(parts, axis=0), rtol=1e-5, err_msg=name)
    # one more feed can only raise a range, never lower it
    more = activation_ranges(model, analysis, [*feeds, {"x": 10 * feeds[0]["x"]}])
    assert np.all(more["a"] >= ranges["a"]) and np.any(more["a"] > ranges["a"])


def smoothed(proto: onnx.ModelProto, alpha: float) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """The model smoothed on the calibration feeds, and its ranges before."""
    model = ir.from_proto(proto)
    analysis = analyze_model(model)
    before = activation_ranges(model, analysis, calibration())
    t = smooth_cofactors(analysis, model, before, alpha)
    apply_values(model, analysis, t)
    return model, before


def spread(r: np.ndarray) -> float:
    """The largest channel range over the median."""
    flat = r.reshape(-1)
    return float(flat.max() / np.median(flat))


@pytest.mark.parametrize("consumer", ["MatMul", "Gemm"])
def test_alpha_1_balances_an_outlier_channel(consumer: str) -> None:
    proto = mlp(consumer, outlier=50.0)
    model, before = smoothed(proto, alpha=1.0)
    assert spread(before["a"]) > 10 and int(np.argmax(before["a"])) == OUTLIER
    after = activation_ranges(model, analyze_model(model), calibration())
    assert spread(after["a"]) <= 2.0
    np.testing.assert_allclose(after["a"], 1.0, rtol=1e-5)  # α = 1: every range becomes 1
    # the FP32 function is unchanged, on inputs the calibration never saw
    rng = np.random.default_rng(99)
    for scale in (1.0, 10.0):
        feeds = {"x": (scale * rng.standard_normal((B, D))).astype(np.float32)}
        assert max_rel_err(proto, model, feeds) < 1e-5


def test_alpha_0_balances_the_consumer_weights() -> None:
    """α = 0: s = 1/max|W_j|, so every input row of the consumer's weight gets range 1."""
    model, _ = smoothed(mlp(outlier=50.0), alpha=0.0)
    w2 = model.graph.initializers["w2"].const_value.numpy()
    np.testing.assert_allclose(np.abs(w2).max(axis=1), 1.0, rtol=1e-6)


def test_alpha_half_is_the_formula() -> None:
    proto = mlp(outlier=50.0)
    model = ir.from_proto(proto)
    analysis = analyze_model(model)
    ranges = activation_ranges(model, analysis, calibration())
    t = smooth_cofactors(analysis, model, ranges, 0.5)
    tau = analysis.solution.cofactors(t)[analysis.neurons["a"]].reshape(-1)
    w2 = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w2"))
    s = np.sqrt(ranges["a"].reshape(-1)) / np.sqrt(np.abs(w2).max(axis=1))
    np.testing.assert_allclose(tau, 1 / s, rtol=1e-6)


def test_a_class_with_two_consumers_takes_the_max_weight() -> None:
    """Fan-out: ``a`` feeds two MatMuls; the class's ``max|W_j|`` is the larger of the two."""
    inits = {"w1": rand((D, H), 1), "w2": rand((H, O), 2), "w3": 5 * rand((H, O), 3)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y2"]),
        helper.make_node("MatMul", ["a", "w3"], ["y3"]),
    ]
    proto = make_model(nodes, {"x": [B, D]}, {"y2": [B, O], "y3": [B, O]}, inits)
    model = ir.from_proto(proto)
    analysis = analyze_model(model)
    ranges = activation_ranges(model, analysis, calibration())
    t = smooth_cofactors(analysis, model, ranges, 0.5)
    tau = analysis.solution.cofactors(t)[analysis.neurons["a"]].reshape(-1)
    wmax = np.maximum(np.abs(inits["w2"]).max(axis=1), np.abs(inits["w3"]).max(axis=1))
    np.testing.assert_allclose(tau, np.sqrt(wmax / ranges["a"].reshape(-1)), rtol=1e-6)
    apply_values(model, analysis, t)
    assert max_rel_err(proto, model, calibration(1, seed=5)[0]) < 1e-5


def test_depthwise_conv_weight_ranges() -> None:
    """A depthwise conv's input channel j reads only kernel j: ``max|W_j| = max|W[j]|``."""
    c = 6
    inits = {"w1": rand((c, 3, 1, 1), 1), "wd": rand((c, 1, 3, 3), 2)}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Conv", ["a", "wd"], ["y"], group=c, pads=[1, 1, 1, 1]),
    ]
    proto = make_model(nodes, {"x": [2, 3, 5, 5]}, {"y": [2, c, 5, 5]}, inits)
    model = ir.from_proto(proto)
    analysis = analyze_model(model)
    feeds = [{"x": rand((2, 3, 5, 5), 7)}]
    ranges = activation_ranges(model, analysis, feeds)
    found = list(consumer_ranges(model, analysis, ranges))
    assert len(found) == 2  # the first conv reads the (pinned) graph input
    ids, x, w = found[1]
    np.testing.assert_allclose(w, np.abs(inits["wd"]).reshape(c, -1).max(axis=1))
    np.testing.assert_allclose(x, ranges["a"].reshape(-1))
    np.testing.assert_array_equal(ids, analysis.neurons["a"].reshape(-1))
    t = smooth_cofactors(analysis, model, ranges, 0.5)
    apply_values(model, analysis, t)
    assert np.ptp(t[analysis.solution.free]) > 0
    assert max_rel_err(proto, model, feeds[0]) < 1e-5


def test_pinned_classes_keep_one() -> None:
    model = ir.from_proto(mlp())
    analysis = analyze_model(model)
    t = smooth_cofactors(analysis, model, activation_ranges(model, analysis, calibration()), 1.0)
    assert np.all(t[~analysis.solution.free] == 1.0)
    assert np.all(t > 0)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_bad_alpha(alpha: float) -> None:
    model = ir.from_proto(mlp())
    analysis = analyze_model(model)
    with pytest.raises(InputError, match="alpha"):
        smooth_cofactors(analysis, model, {}, alpha)


def test_no_feeds() -> None:
    model = ir.from_proto(mlp())
    with pytest.raises(InputError, match="calibration"):
        activation_ranges(model, analyze_model(model), [])


# -- calibration files ---------------------------------------------------------------------


def test_load_calibration_stacked_and_numbered(tmp_path: Path) -> None:
    x = rand((3, B, D), 1)
    np.savez(tmp_path / "s.npz", x=x)
    feeds = load_calibration(tmp_path / "s.npz")
    assert len(feeds) == 3 and all(np.array_equal(f["x"], x[k]) for k, f in enumerate(feeds))
    parts = {f"x/{k}": rand((1, k + 2, D), k) for k in range(2)}
    np.savez(tmp_path / "n.npz", **parts, m=np.ones((2, 4), np.float32))
    feeds = load_calibration(tmp_path / "n.npz")
    assert [f["x"].shape for f in feeds] == [(1, 2, D), (1, 3, D)]
    assert np.array_equal(feeds[1]["m"], np.ones(4))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.ones((2, 3)), "x/0": np.ones(3)}, "both stacked"),
        ({"x/0": np.ones(3), "x/2": np.ones(3)}, "numbered 0..1"),
        ({"x": np.ones((2, 3)), "y": np.ones((3, 3))}, "different numbers"),
        ({"x": np.float32(1)}, "no sample axis"),
        ({}, "no arrays"),
    ],
)
def test_load_calibration_refuses(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(InputError, match=message):
        load_calibration(tmp_path / "c.npz")
    with pytest.raises(InputError, match="not found"):
        load_calibration(tmp_path / "missing.npz")

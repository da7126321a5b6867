"""RULE depth: one tiny graph per op rule, built with onnx.helper (no torch).

Each test states the exact number of free cofactors (derived in a comment), the group
they range over, and — after a :class:`TeleportPass` — that onnxruntime's outputs are
preserved (rel err ≤ 1e-5) and that the weights moved by the rule's exact algebra,
``W' = τ_t · W / τ_s`` in the layout of that op.

Shapes used throughout: batch 2, input width 4, hidden width H = 6, output width 3.
Graph inputs and outputs are pinned (τ = 1), so only hidden neurons are free.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import (
    RTOL,
    Teleported,
    const_node,
    gemm_mlp,
    make_model,
    rand,
    teleport,
)
from numpy.testing import assert_allclose
from onnx import helper

from graphteleport.analysis import analyze
from graphteleport.analysis.context import align, compress
from graphteleport.analysis.rules import RULES, squeeze_ids

N = helper.make_node
H = 6
IMG = [1, 4, 5, 5]


# -- checks ---------------------------------------------------------------------------------
def feat(t: Teleported, name: str, n: int, axis: int = -1) -> np.ndarray:
    """τ of value ``name`` along its feature ``axis`` (equal along every other axis)."""
    tau = t.tau(name)
    tau = np.moveaxis(tau, axis, -1)
    tau = tau.reshape(-1, tau.shape[-1])
    assert (tau == tau[0]).all(), f"τ of {name} varies along a non-feature axis"
    return np.broadcast_to(tau[0], (n,)).astype(np.float64)


def check_analysis(proto: onnx.ModelProto, free: int, groups: dict[str, int]) -> None:
    q = analyze(ir.from_proto(proto))
    assert q.free_cofactors == free
    assert q.groups() == groups


def check_numerics(t: Teleported) -> None:
    assert t.rel_err() <= RTOL


def assert_moved(tau: np.ndarray, group: str = "any") -> None:
    """A free cofactor vector actually moved, within its group."""
    assert not np.all(tau == 1.0), "no cofactor moved"
    if group == "positive":
        assert (tau > 0).all()
    if group == "sign":
        assert set(np.unique(tau)) <= {-1.0, 1.0}


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert_allclose(actual.astype(np.float64), expected, rtol=1e-6, atol=0)


def check_dense(t: Teleported, w: str, tin: np.ndarray, tout: np.ndarray, trans_b: int = 0) -> None:
    """``W'[i, o] = W[i, o] · τ_out[o] / τ_in[i]`` (``W[o, i]`` when ``trans_b``)."""
    W = t.w0[w].astype(np.float64)
    expected = W * tout[:, None] / tin[None, :] if trans_b else W * tout[None, :] / tin[:, None]
    close(t.w1[w], expected)


def check_bias(t: Teleported, b: str, tout: np.ndarray) -> None:
    """``b' = b · τ_out`` (compared flat: see :func:`test_bias_of_add_keeps_its_shape`)."""
    close(t.w1[b].reshape(-1), t.w0[b].astype(np.float64).reshape(-1) * tout)


def check_conv(t: Teleported, w: str, tin: np.ndarray, tout: np.ndarray, groups: int) -> None:
    """``W'[o, j, …] = W[o, j, …] · τ_out[o] / τ_in[g(o)·C/G + j]``, g(o) = o // (O/G)."""
    W = t.w0[w].astype(np.float64)
    o_count, per = W.shape[:2]
    o = np.arange(o_count)[:, None]
    j = np.arange(per)[None, :]
    scale = tout[:, None] / tin[(o // (o_count // groups)) * per + j]
    close(t.w1[w], W * scale.reshape(scale.shape + (1,) * (W.ndim - 2)))


def check_conv_transpose(
    t: Teleported, w: str, tin: np.ndarray, tout: np.ndarray, groups: int
) -> None:
    """``W[c, j, …]`` maps input c to output ``g(c)·O/G + j``: ``W' = W · τ_out / τ_in[c]``."""
    W = t.w0[w].astype(np.float64)
    c_count, per = W.shape[:2]
    c = np.arange(c_count)[:, None]
    j = np.arange(per)[None, :]
    scale = tout[(c // (c_count // groups)) * per + j] / tin[:, None]
    close(t.w1[w], W * scale.reshape(scale.shape + (1,) * (W.ndim - 2)))


def mlp_checks(t: Teleported, hidden: str = "h0", group: str = "positive") -> np.ndarray:
    """The x → fc0 → act → fc1 → y pattern: W0' = W0·τ, b0' = b0·τ, W1' = W1/τ."""
    tau = feat(t, hidden, H)
    assert_moved(tau, group)
    ones_in, ones_out = np.ones(4), np.ones(3)
    check_dense(t, "W0", ones_in, tau)
    check_bias(t, "b0", tau)
    check_dense(t, "W1", tau, ones_out)
    assert t.w1["b1"].tobytes() == t.w0["b1"].tobytes()
    return tau


def fc(k: int, x: str, out: str, bias: bool = True, **attrs: int) -> onnx.NodeProto:
    return N("Gemm", [x, f"W{k}", *([f"b{k}"] if bias else [])], [out], name=f"fc{k}", **attrs)


def dense_inits(*shapes: tuple[int, int], bias: bool = True) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, (i, o) in enumerate(shapes):
        out[f"W{k}"] = rand((i, o), 10 * k) * np.float32(0.5)
        if bias:
            out[f"b{k}"] = rand((o,), 10 * k + 1)
    return out


def mlp_with(
    middle: list[onnx.NodeProto], mid_out: str, inits: dict[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """x → fc0 → h0 → ``middle`` → ``mid_out`` → fc1 → y, with extra ``inits``."""
    all_inits = {**dense_inits((4, H), (H, 3)), **(inits or {})}
    nodes = [fc(0, "x", "h0"), *middle, fc(1, mid_out, "y")]
    return make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, all_inits)


# -- Gemm and MatMul ------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [11, 17, 18])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(trans_b: int, opset: int) -> None:
    # H hidden neurons between two Gemms, ReLU between: H = 6 free positive cofactors.
    proto = gemm_mlp([4, H, 3], "Relu", trans_b=trans_b, opset=opset)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "h0", H)
    assert_moved(tau, "positive")
    check_dense(t, "W0", np.ones(4), tau, trans_b)
    check_bias(t, "b0", tau)
    check_dense(t, "W1", tau, np.ones(3), trans_b)
    assert t.changed == {"W0", "b0", "W1"}


def test_gemm_linear_hidden_layer_is_any_group() -> None:
    # No activation between the Gemms: the 6 hidden cofactors may be any non-zero number.
    proto = gemm_mlp([4, H, 3], "")
    check_analysis(proto, H, {"any": H})
    t = teleport(proto, sampling="inter_landscape", seed=3)
    check_numerics(t)
    tau = feat(t, "h0", H)
    assert (tau < 0).any(), "inter_landscape on an 'any' class should give some τ < 0"
    check_dense(t, "W0", np.ones(4), tau)
    check_dense(t, "W1", tau, np.ones(3))


@pytest.mark.parametrize("x_shape", [[2, 4], [2, 5, 4]])
def test_matmul_with_constant_weight(x_shape: list[int]) -> None:
    # MatMul(W0) + Add(b0) + Relu + MatMul(W1): the 6 hidden neurons are free, positive;
    # on a 3-D input the rows (axis 1) share W so they collapse to one cofactor per column.
    inits = dense_inits((4, H), (H, 3))
    nodes = [
        N("MatMul", ["x", "W0"], ["m0"]),
        N("Add", ["m0", "b0"], ["h0"]),
        N("Relu", ["h0"], ["a0"]),
        N("MatMul", ["a0", "W1"], ["m1"]),
        N("Add", ["m1", "b1"], ["y"]),
    ]
    proto = make_model(nodes, {"x": x_shape}, {"y": [*x_shape[:-1], 3]}, inits)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "m0", H)
    assert_moved(tau, "positive")
    check_dense(t, "W0", np.ones(4), tau)
    check_bias(t, "b0", tau)
    check_dense(t, "W1", tau, np.ones(3))


# -- convolutions ---------------------------------------------------------------------------
def conv_net(
    x_shape: list[int], groups: int | None = None, kernel: int = 3, transpose: bool = False
) -> onnx.ModelProto:
    """x → Conv0 (C→H) → Relu → [middle conv, groups, → Relu] → Conv1 (1×1, H→3) → y."""
    dims = len(x_shape) - 2
    c = x_shape[1]
    k = [kernel] * dims
    pads = [kernel // 2] * (2 * dims)
    inits = {
        "W0": rand([H, c, *k], 0) * np.float32(0.3),
        "b0": rand([H], 1),
        "W1": rand([3, H, *[1] * dims], 2) * np.float32(0.3),
        "b1": rand([3], 3),
    }
    nodes = [N("Conv", ["x", "W0", "b0"], ["h0"], pads=pads), N("Relu", ["h0"], ["a0"])]
    cur, out_spatial = "a0", x_shape[2:]
    if groups is not None and not transpose:
        inits["Wg"] = rand([H, H // groups, *k], 4) * np.float32(0.3)
        inits["bg"] = rand([H], 5)
        nodes += [
            N("Conv", ["a0", "Wg", "bg"], ["hg"], group=groups, pads=pads),
            N("Relu", ["hg"], ["ag"]),
        ]
        cur = "ag"
    if groups is not None and transpose:
        inits["Wg"] = rand([H, H // groups, *[2] * dims], 4) * np.float32(0.3)
        inits["bg"] = rand([H], 5)
        nodes += [
            N("ConvTranspose", ["a0", "Wg", "bg"], ["hg"], group=groups, strides=[2] * dims),
            N("Relu", ["hg"], ["ag"]),
        ]
        cur, out_spatial = "ag", [2 * s for s in x_shape[2:]]
    nodes.append(N("Conv", [cur, "W1", "b1"], ["y"]))
    return make_model(nodes, {"x": x_shape}, {"y": [1, 3, *out_spatial]}, inits)


@pytest.mark.parametrize("x_shape", [IMG, [1, 4, 8], [1, 2, 4, 4, 4]], ids=["2d", "1d", "3d"])
def test_conv(x_shape: list[int]) -> None:
    # One cofactor per output channel of Conv0 (spatial positions collapse): 6, positive.
    proto = conv_net(x_shape)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "h0", H, axis=1)
    assert_moved(tau, "positive")
    check_conv(t, "W0", np.ones(x_shape[1]), tau, 1)
    check_bias(t, "b0", tau)
    check_conv(t, "W1", tau, np.ones(3), 1)


@pytest.mark.parametrize("groups", [1, 2, 3, H], ids=["g1", "g2", "g3", "depthwise"])
def test_grouped_conv(groups: int) -> None:
    # Conv0's 6 channels and the grouped conv's 6 channels: 12 positive cofactors.
    proto = conv_net(IMG, groups)
    check_analysis(proto, 2 * H, {"positive": 2 * H})
    t = teleport(proto)
    check_numerics(t)
    t0, tg = feat(t, "h0", H, axis=1), feat(t, "hg", H, axis=1)
    assert_moved(tg, "positive")
    check_conv(t, "W0", np.ones(4), t0, 1)
    check_conv(t, "Wg", t0, tg, groups)
    check_bias(t, "bg", tg)
    check_conv(t, "W1", tg, np.ones(3), 1)


@pytest.mark.parametrize("groups", [1, 2, H], ids=["g1", "g2", "depthwise"])
def test_conv_transpose(groups: int) -> None:
    # ConvTranspose (stride 2) between two convs: 6 + 6 positive cofactors.
    proto = conv_net(IMG, groups, transpose=True)
    check_analysis(proto, 2 * H, {"positive": 2 * H})
    t = teleport(proto)
    check_numerics(t)
    t0, tg = feat(t, "h0", H, axis=1), feat(t, "hg", H, axis=1)
    assert_moved(tg, "positive")
    check_conv_transpose(t, "Wg", t0, tg, groups)
    check_bias(t, "bg", tg)
    check_conv(t, "W1", tg, np.ones(3), 1)


def test_batchnorm() -> None:
    # Conv0 (6 channels, no activation: any) → BN (6 channels, then Relu: positive).
    # BN is affine per channel, so both sides are free: 12 = 6 any + 6 positive.
    inits = {
        "W0": rand([H, 4, 3, 3], 0) * np.float32(0.3),
        "b0": rand([H], 1),
        "scale": rand([H], 2, low=0.5),
        "bias": rand([H], 3),
        "mean": rand([H], 4),
        "var": rand([H], 5, low=0.5),
        "W1": rand([3, H, 1, 1], 6),
        "b1": rand([3], 7),
    }
    nodes = [
        N("Conv", ["x", "W0", "b0"], ["h0"], pads=[1, 1, 1, 1]),
        N("BatchNormalization", ["h0", "scale", "bias", "mean", "var"], ["bn"]),
        N("Relu", ["bn"], ["a"]),
        N("Conv", ["a", "W1", "b1"], ["y"]),
    ]
    proto = make_model(nodes, {"x": IMG}, {"y": [1, 3, 5, 5]}, inits)
    check_analysis(proto, 2 * H, {"any": H, "positive": H})
    t = teleport(proto)
    check_numerics(t)
    tin, tout = feat(t, "h0", H, axis=1), feat(t, "bn", H, axis=1)
    assert_moved(tin)
    assert_moved(tout, "positive")
    close(t.w1["scale"], t.w0["scale"] * tout / tin)
    close(t.w1["mean"], t.w0["mean"] * tin)
    close(t.w1["bias"], t.w0["bias"] * tout)
    assert t.w1["var"].tobytes() == t.w0["var"].tobytes()


# -- activations ----------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["Relu", "LeakyRelu"])
def test_relu_family_is_positive(act: str) -> None:
    # 6 hidden neurons behind a positively homogeneous activation: 6 positive cofactors,
    # and even inter_landscape sampling (random signs) keeps them positive.
    proto = gemm_mlp([4, H, 3], act)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto, sampling="inter_landscape", cob_range=0.9, seed=1)
    check_numerics(t)
    mlp_checks(t)


def test_prelu_is_positive_and_keeps_its_slope() -> None:
    slope = rand([H], 9, low=0.05) * np.float32(0.3)
    proto = mlp_with([N("PRelu", ["h0", "slope"], ["a0"])], "a0", inits={"slope": slope})
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto, sampling="negative", seed=2)
    check_numerics(t)
    mlp_checks(t)
    assert t.w1["slope"].tobytes() == slope.tobytes()


def test_maxpool_is_positive() -> None:
    # Conv0 → MaxPool → Conv1 (no Relu): max(τa, τb) = τ max(a, b) needs τ > 0: 6 positive.
    inits = {"W0": rand([H, 4, 3, 3], 0), "b0": rand([H], 1), "W1": rand([3, H, 1, 1], 2)}
    nodes = [
        N("Conv", ["x", "W0", "b0"], ["h0"], pads=[1, 1, 1, 1]),
        N("MaxPool", ["h0"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        N("Conv", ["p", "W1"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [1, 4, 6, 6]}, {"y": [1, 3, 3, 3]}, inits)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto, sampling="negative", seed=0)
    check_numerics(t)
    tau = feat(t, "h0", H, axis=1)
    assert_moved(tau, "positive")
    check_conv(t, "W1", tau, np.ones(3), 1)


def test_tanh_is_sign_group() -> None:
    # tanh is odd: τ = ±1 passes through it.  6 sign cofactors; inter_landscape flips some.
    proto = gemm_mlp([4, H, 3], "Tanh")
    check_analysis(proto, H, {"sign": H})
    t = teleport(proto, sampling="inter_landscape", seed=0)
    check_numerics(t)
    tau = mlp_checks(t, group="sign")
    assert (tau == -1).any(), "seed 0 should flip at least one tanh neuron"


def test_sigmoid_pins_with_insert_hint() -> None:
    # x → fc0 → Relu → fc1 → Sigmoid → fc2 → y: fc0's 6 neurons are free (positive); fc1's 5
    # are pinned because sigmoid is not equivariant (only insert mode could free them).
    proto = gemm_mlp([4, H, 5, 3], ["Relu", "Sigmoid"])
    check_analysis(proto, H, {"positive": H})
    pins = {p.reason: p for p in analyze(ir.from_proto(proto)).pinned()}
    sig = [r for r in pins if "Sigmoid" in r]
    assert len(sig) == 1 and "--mode insert" in sig[0]
    assert pins[sig[0]].cofactors == 5
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "h0", H)
    check_dense(t, "W1", tau, np.ones(5))
    assert t.changed == {"W0", "b0", "W1"}, "fc1's bias and fc2 must stay: sigmoid pins"


def test_relu6_clip_pins_with_insert_hint() -> None:
    # Clip(x, 0, 6) is ReLU6: not homogeneous, so its neurons are pinned; Clip(x, 0) is ReLU.
    zero, six = np.array(0, np.float32), np.array(6, np.float32)
    relu6 = mlp_with([N("Clip", ["h0", "lo", "hi"], ["a0"])], "a0", inits={"lo": zero, "hi": six})
    check_analysis(relu6, 0, {})
    reasons = [p.reason for p in analyze(ir.from_proto(relu6)).pinned()]
    assert any("Clip" in r and "--mode insert" in r for r in reasons)
    relu = mlp_with([N("Clip", ["h0", "lo"], ["a0"])], "a0", inits={"lo": zero})
    check_analysis(relu, H, {"positive": H})
    t = teleport(relu)
    check_numerics(t)
    mlp_checks(t)


# -- pooling --------------------------------------------------------------------------------
def test_average_pool_is_linear() -> None:
    # AveragePool is linear: Conv0's 6 channels are free with any non-zero τ.
    inits = {"W0": rand([H, 4, 3, 3], 0), "b0": rand([H], 1), "W1": rand([3, H, 1, 1], 2)}
    nodes = [
        N("Conv", ["x", "W0", "b0"], ["h0"], pads=[1, 1, 1, 1]),
        N("AveragePool", ["h0"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        N("Conv", ["p", "W1"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [1, 4, 6, 6]}, {"y": [1, 3, 3, 3]}, inits)
    check_analysis(proto, H, {"any": H})
    t = teleport(proto, sampling="inter_landscape", seed=5)
    check_numerics(t)
    tau = feat(t, "h0", H, axis=1)
    assert (tau < 0).any()
    check_conv(t, "W1", tau, np.ones(3), 1)


def test_global_average_pool_then_flatten() -> None:
    # Conv0 → Relu → GlobalAveragePool → Flatten → Gemm: 6 positive (one per channel).
    inits = {"W0": rand([H, 4, 3, 3], 0), "b0": rand([H], 1), "W1": rand([H, 3], 2)}
    nodes = [
        N("Conv", ["x", "W0", "b0"], ["h0"], pads=[1, 1, 1, 1]),
        N("Relu", ["h0"], ["a"]),
        N("GlobalAveragePool", ["a"], ["g"]),
        N("Flatten", ["g"], ["f"]),
        N("Gemm", ["f", "W1"], ["y"]),
    ]
    proto = make_model(nodes, {"x": IMG}, {"y": [1, 3]}, inits)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "h0", H, axis=1)
    check_dense(t, "W1", tau, np.ones(3))


# -- arithmetic with constants ----------------------------------------------------------------
@pytest.mark.parametrize("op", ["Add", "Sub"])
@pytest.mark.parametrize("const_first", [False, True])
def test_add_sub_constant_is_a_bias(op: str, const_first: bool) -> None:
    # fc0 (no bias) → Add/Sub(c) → Relu → fc1: c absorbs τ like a bias; 6 positive.
    ins = ["c", "m"] if const_first else ["m", "c"]
    inits = {
        "W0": rand([4, H], 0),
        "c": rand([H], 1),
        **{k: v for k, v in dense_inits((4, H), (H, 3)).items() if k in ("W1", "b1")},
    }
    nodes = [
        N("Gemm", ["x", "W0"], ["m"]),
        N(op, ins, ["h0"]),
        N("Relu", ["h0"], ["a0"]),
        fc(1, "a0", "y"),
    ]
    proto = make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, inits)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "m", H)
    assert_moved(tau, "positive")
    check_bias(t, "c", tau)
    check_dense(t, "W0", np.ones(4), tau)


@pytest.mark.parametrize("op", ["Mul", "Div"])
def test_mul_div_constant_vector_is_diagonal(op: str) -> None:
    # fc0 → Mul/Div(c[6]) → Relu → fc1: the Mul's output is a new set of 6 neurons, with
    # c' = c · (τ_out/τ_in)^{±1}.  12 cofactors: fc0's 6 (any) and the Mul's 6 (positive).
    c = rand([H], 3, low=0.5)
    proto = mlp_with([N(op, ["h0", "c"], ["m"]), N("Relu", ["m"], ["a0"])], "a0", inits={"c": c})
    check_analysis(proto, 2 * H, {"any": H, "positive": H})
    t = teleport(proto)
    check_numerics(t)
    tin, tout = feat(t, "h0", H), feat(t, "m", H)
    assert_moved(tin)
    ratio = tout / tin if op == "Mul" else tin / tout
    close(t.w1["c"].reshape(-1), c * ratio)
    check_dense(t, "W1", tout, np.ones(3))


@pytest.mark.parametrize("op", ["Mul", "Div"])
def test_mul_div_scalar_passes_the_cofactor_through(op: str) -> None:
    # A scalar c commutes with τ: the output keeps fc0's 6 cofactors (tied through the
    # Relu, so positive), and c is left alone rather than expanded to a vector.
    c = np.array(1.7, np.float32)
    proto = mlp_with([N(op, ["h0", "c"], ["m"]), N("Relu", ["m"], ["a0"])], "a0", inits={"c": c})
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    mlp_checks(t)
    assert t.w1["c"].tobytes() == c.tobytes()


def test_constant_divided_by_activation_inverts() -> None:
    # m = c / h0: c' = c · τ_out · τ_in, the output's cofactor is free too (12, any).
    c = rand([H], 3, low=0.5)
    proto = mlp_with([N("Div", ["c", "h0"], ["m"])], "m", inits={"c": c})
    check_analysis(proto, 2 * H, {"any": 2 * H})
    t = teleport(proto)
    feeds = {"x": np.abs(rand([2, 4], 7)) + 1}
    assert t.rel_err(feeds) <= RTOL
    tin, tout = feat(t, "h0", H), feat(t, "m", H)
    close(t.w1["c"].reshape(-1), c * tin * tout)


def test_residual_add_ties_both_branches() -> None:
    # a0 = relu(fc0 x), a1 = relu(fc1 a0), r = a0 + a1 → fc2 → y.  The Add ties a0's and
    # a1's neurons one to one: 6 + 6 neurons but only 6 free (positive) cofactors.
    inits = dense_inits((4, H), (H, H), (H, 3))
    nodes = [
        fc(0, "x", "h0"),
        N("Relu", ["h0"], ["a0"]),
        fc(1, "a0", "h1"),
        N("Relu", ["h1"], ["a1"]),
        N("Add", ["a0", "a1"], ["r"]),
        fc(2, "r", "y"),
    ]
    proto = make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, inits)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "h0", H)
    assert_moved(tau, "positive")
    assert np.array_equal(tau, feat(t, "h1", H))
    check_dense(t, "W1", tau, tau)
    check_dense(t, "W2", tau, np.ones(3))


def test_bias_of_add_keeps_its_shape() -> None:
    # Absorb mode changes weight values only; a bias of shape [6] should stay [6].
    inits = dense_inits((4, H), (H, 3))
    nodes = [
        N("MatMul", ["x", "W0"], ["m0"]),
        N("Add", ["m0", "b0"], ["h0"]),
        N("Relu", ["h0"], ["a0"]),
        N("MatMul", ["a0", "W1"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [2, 5, 4]}, {"y": [2, 5, 3]}, inits)
    t = teleport(proto)
    check_numerics(t)
    assert "b0" in t.changed
    assert t.w1["b0"].shape == t.w0["b0"].shape


# -- data movement --------------------------------------------------------------------------
def test_concat_along_features() -> None:
    # Two branches of 3 and 4 neurons concatenated along the feature axis: 7 positive.
    inits = {"WA": rand([4, 3], 0), "WB": rand([4, 4], 1), "W2": rand([7, 3], 2)}
    nodes = [
        N("Gemm", ["x", "WA"], ["hA"]),
        N("Relu", ["hA"], ["aA"]),
        N("Gemm", ["x", "WB"], ["hB"]),
        N("Relu", ["hB"], ["aB"]),
        N("Concat", ["aA", "aB"], ["c"], axis=1),
        N("Gemm", ["c", "W2"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, inits)
    check_analysis(proto, 7, {"positive": 7})
    t = teleport(proto)
    check_numerics(t)
    ta, tb = feat(t, "hA", 3), feat(t, "hB", 4)
    check_dense(t, "W2", np.concatenate([ta, tb]), np.ones(3))


def test_concat_along_batch_ties_branches() -> None:
    # Concat along the batch axis puts both branches through one Gemm: its rows share W2,
    # so the branches' neurons are tied pairwise: 12 neurons, 6 positive cofactors.
    inits = {"WA": rand([4, H], 0), "WB": rand([4, H], 1), "W2": rand([H, 3], 2)}
    nodes = [
        N("Gemm", ["x", "WA"], ["hA"]),
        N("Relu", ["hA"], ["aA"]),
        N("Gemm", ["x", "WB"], ["hB"]),
        N("Relu", ["hB"], ["aB"]),
        N("Concat", ["aA", "aB"], ["c"], axis=0),
        N("Gemm", ["c", "W2"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [2, 4]}, {"y": [4, 3]}, inits)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    ta = feat(t, "hA", H)
    assert np.array_equal(ta, feat(t, "hB", H))
    check_dense(t, "W2", ta, np.ones(3))


@pytest.mark.parametrize("opset", [17, 18])
def test_split(opset: int) -> None:
    # relu(fc0 x) split into two parts (opset 17: sizes 2 + 4 from a 'split' input;
    # opset 18: num_outputs=2, 3 + 3), each through its own Gemm, summed: 6 positive.
    k = 2 if opset == 17 else 3
    inits = {**dense_inits((4, H)), "WS": rand([k, 3], 2), "WT": rand([H - k, 3], 3)}
    if opset == 17:
        inits["split"] = np.array([k, H - k], np.int64)
        split = N("Split", ["a", "split"], ["s", "u"], axis=1)
    else:
        split = N("Split", ["a"], ["s", "u"], axis=1, num_outputs=2)
    nodes = [
        fc(0, "x", "h0"),
        N("Relu", ["h0"], ["a"]),
        split,
        N("Gemm", ["s", "WS"], ["ys"]),
        N("Gemm", ["u", "WT"], ["yt"]),
        N("Add", ["ys", "yt"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, inits, opset=opset)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "h0", H)
    check_dense(t, "WS", tau[:k], np.ones(3))
    check_dense(t, "WT", tau[k:], np.ones(3))


def test_slice() -> None:
    # Slice keeps features 1..4 of fc0's 6; all 6 are still free (fc0 moves them all).
    inits = {
        **dense_inits((4, H)),
        "W1": rand([4, 3], 2),
        "st": np.array([1], np.int64),
        "en": np.array([5], np.int64),
        "ax": np.array([1], np.int64),
    }
    nodes = [
        fc(0, "x", "h0"),
        N("Relu", ["h0"], ["a"]),
        N("Slice", ["a", "st", "en", "ax"], ["s"]),
        N("Gemm", ["s", "W1"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, inits)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "h0", H)
    check_dense(t, "W0", np.ones(4), tau)
    check_dense(t, "W1", tau[1:5], np.ones(3))


@pytest.mark.parametrize("op", ["Flatten", "Reshape"])
def test_flatten_reshape_map_channels_to_features(op: str) -> None:
    # Conv0's 6 channels over 3×3 positions flatten to 54 features; feature k belongs to
    # channel k // 9, so the Gemm's row k scales by 1/τ[k // 9].  6 positive.
    inits = {"W0": rand([H, 4, 3, 3], 0), "b0": rand([H], 1), "W1": rand([54, 3], 2)}
    shape_in = ["shape"] if op == "Reshape" else []
    if op == "Reshape":
        inits["shape"] = np.array([1, 54], np.int64)
    nodes = [
        N("Conv", ["x", "W0", "b0"], ["h0"], pads=[1, 1, 1, 1]),
        N("Relu", ["h0"], ["a"]),
        N(op, ["a", *shape_in], ["f"]),
        N("Gemm", ["f", "W1"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [1, 4, 3, 3]}, {"y": [1, 3]}, inits)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "h0", H, axis=1)
    check_dense(t, "W1", np.repeat(tau, 9), np.ones(3))


def test_transpose_and_left_constant_matmul() -> None:
    # x[2,5,4] → MatMul(W0) → Relu → [2,5,6] → Transpose → [2,6,5] → MatMul(W1[3,6], ·):
    # the transposed features meet W1's columns.  6 positive.
    inits = {"W0": rand([4, H], 0), "W1": rand([3, H], 1)}
    nodes = [
        N("MatMul", ["x", "W0"], ["h0"]),
        N("Relu", ["h0"], ["a"]),
        N("Transpose", ["a"], ["t"], perm=[0, 2, 1]),
        N("MatMul", ["W1", "t"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [2, 5, 4]}, {"y": [2, 3, 5]}, inits)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "h0", H)
    assert_moved(tau, "positive")
    check_dense(t, "W0", np.ones(4), tau)
    close(t.w1["W1"], t.w0["W1"] / tau[None, :])


def test_squeeze_unsqueeze() -> None:
    axes = {"ax": np.array([1], np.int64)}
    middle = [
        N("Relu", ["h0"], ["a"]),
        N("Unsqueeze", ["a", "ax"], ["u"]),
        N("Squeeze", ["u", "ax"], ["s"]),
    ]
    proto = mlp_with(middle, "s", inits=axes)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    mlp_checks(t)


def pad_net(value: float | None) -> onnx.ModelProto:
    """Conv0 → Relu → Pad(spatial 1, constant ``value``) → Conv1 (3×3, no pad)."""
    inits = {
        "W0": rand([H, 4, 3, 3], 0),
        "b0": rand([H], 1),
        "W1": rand([3, H, 3, 3], 2),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
    }
    pad_in = ["a", "pads"]
    if value is not None:
        inits["value"] = np.array(value, np.float32)
        pad_in.append("value")
    nodes = [
        N("Conv", ["x", "W0", "b0"], ["h0"], pads=[1, 1, 1, 1]),
        N("Relu", ["h0"], ["a"]),
        N("Pad", pad_in, ["p"]),
        N("Conv", ["p", "W1"], ["y"]),
    ]
    return make_model(nodes, {"x": IMG}, {"y": [1, 3, 5, 5]}, inits)


@pytest.mark.parametrize("value", [None, 0.0])
def test_zero_pad(value: float | None) -> None:
    # Zero padding scales with anything: 6 positive cofactors.
    proto = pad_net(value)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "h0", H, axis=1)
    check_conv(t, "W1", tau, np.ones(3), 1)


def test_nonzero_pad_pins() -> None:
    # Padding with 0.5 would become 0.5·τ after a rescale: every channel is pinned.
    proto = pad_net(0.5)
    check_analysis(proto, 0, {})
    reasons = [p.reason for p in analyze(ir.from_proto(proto)).pinned()]
    assert any("Pad" in r for r in reasons)
    t = teleport(proto)
    assert t.changed == set()


@pytest.mark.parametrize("op", ["Dropout", "Identity"])
def test_identity_like(op: str) -> None:
    proto = mlp_with([N(op, ["h0"], ["d"]), N("Relu", ["d"], ["a0"])], "a0")
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    mlp_checks(t)


def test_resize_keeps_channels() -> None:
    # Nearest 2× upsampling stays within a channel: 6 positive.
    inits = {
        "W0": rand([H, 4, 3, 3], 0),
        "b0": rand([H], 1),
        "W1": rand([3, H, 1, 1], 2),
        "scales": np.array([1, 1, 2, 2], np.float32),
    }
    nodes = [
        N("Conv", ["x", "W0", "b0"], ["h0"], pads=[1, 1, 1, 1]),
        N("Relu", ["h0"], ["a"]),
        N("Resize", ["a", "", "scales"], ["r"], mode="nearest"),
        N("Conv", ["r", "W1"], ["y"]),
    ]
    proto = make_model(nodes, {"x": IMG}, {"y": [1, 3, 10, 10]}, inits)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "h0", H, axis=1)
    check_conv(t, "W1", tau, np.ones(3), 1)
    assert t.w1["scales"].tobytes() == t.w0["scales"].tobytes()


def test_softmax_pins_its_axis() -> None:
    # fc0's 6 neurons free; fc1's 5 feed a Softmax (not scale-invariant): pinned.
    proto = gemm_mlp([4, H, 5, 3], ["Relu", "Softmax"])
    check_analysis(proto, H, {"positive": H})
    pins = {p.reason: p.cofactors for p in analyze(ir.from_proto(proto)).pinned()}
    assert pins.get("Softmax axis") == 5
    t = teleport(proto)
    check_numerics(t)
    assert t.changed == {"W0", "b0", "W1"}


def unknown_op_net(downstream: bool) -> onnx.ModelProto:
    """x → fc0 → Relu → fc1 → com.foo.Bar → z, then (``downstream``) fc2 → y."""
    widths = ((4, H), (H, 5), (5, 3)) if downstream else ((4, H), (H, 5))
    nodes = [
        fc(0, "x", "h0"),
        N("Relu", ["h0"], ["a0"]),
        fc(1, "a0", "h1"),
        N("Bar", ["h1"], ["z"], domain="com.foo"),
    ]
    outputs: dict[str, list[int]] = {"z": [2, 5]}
    if downstream:
        nodes.append(fc(2, "z", "y"))
        outputs = {"y": [2, 3]}
    return make_model(
        nodes,
        {"x": [2, 4]},
        outputs,
        dense_inits(*widths),
        domains={"com.foo": 1},
        value_info={"z": [2, 5]},
    )


def check_unknown_op(proto: onnx.ModelProto) -> None:
    # fc0's 6 neurons stay free; fc1's 5 are pinned because Bar is unknown.
    check_analysis(proto, H, {"positive": H})
    pins = {p.reason: p.cofactors for p in analyze(ir.from_proto(proto)).pinned()}
    bar = [r for r in pins if "com.foo" in r and "Bar" in r]
    assert bar and "unknown op" in bar[0]
    assert pins[bar[0]] >= 5
    t = teleport(proto)  # onnxruntime has no Bar kernel: check the algebra only
    tau = feat(t, "h0", H)
    assert_moved(tau, "positive")
    check_dense(t, "W1", tau, np.ones(5))
    assert t.changed == {"W0", "b0", "W1"}


def test_unknown_op_pins_with_its_name() -> None:
    check_unknown_op(unknown_op_net(downstream=False))


def test_op_after_unknown_op_is_analysed() -> None:
    check_unknown_op(unknown_op_net(downstream=True))


# -- weights in other places ------------------------------------------------------------------
def test_weights_in_constant_nodes() -> None:
    # Older exporters store weights in Constant nodes: same 6 cofactors, same algebra.
    inits = dense_inits((4, H), (H, 3))
    nodes = [const_node(k, v) for k, v in inits.items()]
    nodes += [fc(0, "x", "h0"), N("Relu", ["h0"], ["a0"]), fc(1, "a0", "y")]
    proto = make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]})
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    mlp_checks(t)
    assert len(t.after.graph.initializer) == 0, "Constant weights must stay Constant nodes"


def test_opset_11_model() -> None:
    # Opset 11: Unsqueeze/Squeeze take axes as attributes, Clip(x, 0) is a ReLU.
    inits = {**dense_inits((4, H), (H, 3)), "zero": np.array(0, np.float32)}
    nodes = [
        fc(0, "x", "h0"),
        N("Clip", ["h0", "zero"], ["c"]),
        N("Unsqueeze", ["c"], ["u"], axes=[1]),
        N("Squeeze", ["u"], ["s"], axes=[1]),
        fc(1, "s", "y"),
    ]
    proto = make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, inits, opset=11)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    mlp_checks(t)


def test_weight_shared_by_two_gemms_ties_them() -> None:
    # One W feeds two Gemms: W' = W·τ_A = W·τ_B forces τ_A = τ_B, so the 12 neurons have
    # 6 free cofactors; W stays one initializer used twice.
    inits = {
        "W": rand([4, H], 0),
        "bA": rand([H], 1),
        "bB": rand([H], 2),
        "VA": rand([H, 3], 3),
        "VB": rand([H, 3], 4),
    }
    nodes = [
        N("Gemm", ["x", "W", "bA"], ["hA"]),
        N("Relu", ["hA"], ["aA"]),
        N("Gemm", ["aA", "VA"], ["yA"]),
        N("Gemm", ["x", "W", "bB"], ["hB"]),
        N("Relu", ["hB"], ["aB"]),
        N("Gemm", ["aB", "VB"], ["yB"]),
    ]
    proto = make_model(nodes, {"x": [2, 4]}, {"yA": [2, 3], "yB": [2, 3]}, inits)
    check_analysis(proto, H, {"positive": H})
    t = teleport(proto)
    check_numerics(t)
    tau = feat(t, "hA", H)
    assert_moved(tau, "positive")
    assert np.array_equal(tau, feat(t, "hB", H))
    check_dense(t, "W", np.ones(4), tau)
    assert t.result.stats.copies == []
    after = t.after
    assert [i.name for i in after.graph.initializer].count("W") == 1
    assert [n.input[1] for n in after.graph.node if n.output[0] in ("hA", "hB")] == ["W", "W"]


def test_uniform_weight_shared_by_two_muls_gets_a_private_copy() -> None:
    # An all-ones vector feeds two Muls (an exporter merged equal initializers).  The two
    # uses are independent: each Mul is a diagonal map with its own input and output
    # neurons, 4 × 6 = 24 free cofactors (fc A/B outputs: any; Mul outputs: positive).
    # The rewrite gives the second use its own copy.
    ones = np.ones(H, np.float32)
    inits = {
        "WA": rand([4, H], 0),
        "WB": rand([4, H], 1),
        "ones": ones,
        "VA": rand([H, 3], 2),
        "VB": rand([H, 3], 3),
    }
    nodes = []
    for s in "AB":
        nodes += [
            N("Gemm", ["x", f"W{s}"], [f"h{s}"]),
            N("Mul", [f"h{s}", "ones"], [f"m{s}"]),
            N("Relu", [f"m{s}"], [f"a{s}"]),
            N("Gemm", [f"a{s}", f"V{s}"], [f"y{s}"]),
        ]
    proto = make_model(nodes, {"x": [2, 4]}, {"yA": [2, 3], "yB": [2, 3]}, inits)
    check_analysis(proto, 4 * H, {"any": 2 * H, "positive": 2 * H})
    t = teleport(proto)
    check_numerics(t)
    assert len(t.result.stats.copies) == 1
    after = t.after
    assert len(after.graph.node) == len(proto.graph.node)
    assert len(after.graph.initializer) == len(proto.graph.initializer) + 1
    mul_consts = {n.output[0]: n.input[1] for n in after.graph.node if n.op_type == "Mul"}
    assert len(set(mul_consts.values())) == 2, "each Mul must read its own scaled copy"
    w1 = {i.name: onnx.numpy_helper.to_array(i) for i in after.graph.initializer}
    for s in "AB":
        close(
            w1[mul_consts[f"m{s}"]].reshape(-1),
            np.ones(H) * feat(t, f"m{s}", H) / feat(t, f"h{s}", H),
        )


def test_every_tested_op_has_a_rule() -> None:
    tested = {
        "Gemm",
        "MatMul",
        "Conv",
        "ConvTranspose",
        "BatchNormalization",
        "Relu",
        "LeakyRelu",
        "PRelu",
        "MaxPool",
        "Tanh",
        "Sigmoid",
        "Clip",
        "AveragePool",
        "GlobalAveragePool",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Concat",
        "Split",
        "Slice",
        "Flatten",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Pad",
        "Dropout",
        "Identity",
        "Resize",
        "Softmax",
    }
    assert tested <= set(RULES), sorted(tested - set(RULES))
    assert "Bar" not in RULES


@pytest.mark.parametrize(
    ("ids_shape", "in_shape", "out_shape"),
    [
        ((1, 8, 1, 1), (1, 8, 1, 1), (1, 8)),  # a CNN's flatten after global pooling
        ((1, 1, 4), (2, 3, 4), (2, 1, 3, 4)),  # unsqueeze of a per-feature layout
        ((2, 1, 4), (2, 3, 4), (2, 3, 4, 1)),
        ((3, 1), (3, 1), (1, 3)),
        ((5,), (2, 5), (1, 2, 1, 5)),  # ids of lower rank than the value
    ],
)
def test_squeeze_ids_matches_the_full_reshape(
    ids_shape: tuple[int, ...], in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> None:
    """Moving the compact ids' axes along gives the same neurons, element by element, as
    reshaping the full id array and compressing it."""
    ids = np.arange(int(np.prod(ids_shape))).reshape(ids_shape) + 7
    fast = squeeze_ids(ids, in_shape, out_shape)
    assert fast is not None
    full = compress(np.broadcast_to(align(ids, len(in_shape)), in_shape).reshape(out_shape))
    np.testing.assert_array_equal(
        np.broadcast_to(fast, out_shape), np.broadcast_to(full, out_shape)
    )
    assert fast.size == full.size  # as compact as the compressed array


def test_squeeze_ids_leaves_real_reshapes_to_the_full_path() -> None:
    assert squeeze_ids(np.arange(6).reshape(2, 3), (2, 3), (3, 2)) is None
    assert squeeze_ids(np.arange(6).reshape(2, 3), (2, 3), (6,)) is None


def _reference(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return np.asarray(ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)[0])


def test_own_slice_and_concat_evaluators_match_onnx_reference() -> None:
    """The analysis evaluates a RoPE's Slice and Concat in numpy (``graphinfo._slice``,
    ``_concat``, so ``onnx.reference`` is not imported): the same arrays as onnx's own
    evaluator, for starts and ends inside, past and before each end, negative ones,
    INT64 extremes, negative steps and axes, missing axes and steps, opset 9's
    attribute form, and concatenation along every axis."""
    from graphteleport.analysis.graphinfo import evaluate

    data = np.arange(4 * 5 * 6, dtype=np.int64).reshape(4, 5, 6)
    big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    cases = [  # (starts, ends, axes, steps)
        ([1], [3], [0], [1]),
        ([0], [big], [2], [2]),
        ([-2], [big], [-1], None),
        ([3], [small], [1], [-1]),
        ([big], [-big], [2], [-2]),
        ([-1], [0], [0], [-1]),
        ([10], [20], [1], None),
        ([-10], [2], [2], [1]),
        ([1, 0], [-1, 4], None, None),
        ([0, 5, 1], [4, 0, 6], [0, 2, 1], [3, -2, 2]),
        ([2], [-7], [1], [-1]),
    ]
    for starts, ends, axes, steps in cases:
        given = [np.array(starts), np.array(ends)]
        names = ["x", "s", "e"]
        if axes is not None or steps is not None:
            given.append(np.array(axes if axes is not None else range(len(starts))))
            names.append("a")
        if steps is not None:
            given.append(np.array(steps))
            names.append("k")
        proto = helper.make_node("Slice", names, ["y"])
        want = _reference(proto, dict(zip(names, [data, *given], strict=True)), 18)
        got = evaluate(ir.serde.deserialize_node(proto), [data, *given], 18)[0]
        assert got.dtype == want.dtype and np.array_equal(got, want), (starts, ends, axes, steps)
    old = helper.make_node("Slice", ["x"], ["y"], starts=[1, -3], ends=[big, -1], axes=[0, 2])
    want = _reference(old, {"x": data}, 9)
    assert np.array_equal(evaluate(ir.serde.deserialize_node(old), [data], 9)[0], want)
    parts = [data, data + 1000]
    for axis in (0, 1, 2, -1, -3):
        proto = helper.make_node("Concat", ["p", "q"], ["y"], axis=axis)
        want = _reference(proto, {"p": parts[0], "q": parts[1]}, 18)
        got = evaluate(ir.serde.deserialize_node(proto), parts, 18)[0]
        assert np.array_equal(got, want), axis

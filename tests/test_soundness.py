"""Soundness before freedom: absorb mode rescales a stored tensor only when it sees every
read of it, and every pin says why.

Each model extends one three-layer MLP, ``x[2, 4] → fc0 → Relu → fc1 → Relu → fc2 →
y[2, 3]`` (``fc_k = MatMul(W_k) + b_k``; 11 free cofactors on its own), with a read of a
weight the rules cannot rescale: inside an ``If``/``Loop``/``Scan`` body, by a call of a
model-local function, as a graph input (a default callers may override) or output, by a
node that keeps it as it is, or through a quantized or computed (bf16 → float) weight.
Each test checks that

* the teleported model computes the original function on inputs that take every branch
  (onnxruntime, graph optimisations off, rel err ≤ 1e-5), with the weight's overriders;
* the unsafe weight kept its value and its cofactors are pinned with the expected reason;
* the weights that are safe to move did move (fc1 and fc2 here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import RTOL, max_rel_err, run_ort, teleport
from onnx import TensorProto, helper, numpy_helper

from graphteleport.analysis import analyze
from graphteleport.cli import main

WIDTHS = (4, 6, 5, 3)
OPSET = 17
SAFE = {"W1", "b1", "W2"}  # fc1's weights and fc2's weight: moved in every model here


# -- builders ---------------------------------------------------------------------------------
def _rand(shape: Sequence[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def mlp_weights() -> dict[str, np.ndarray]:
    out = {}
    for k in range(len(WIDTHS) - 1):
        out[f"W{k}"] = _rand((WIDTHS[k], WIDTHS[k + 1]), 10 * k) / np.float32(2.0)
        out[f"b{k}"] = _rand((WIDTHS[k + 1],), 10 * k + 1)
    return out


def mlp_nodes(first: str = "x", start: int = 0) -> list[onnx.NodeProto]:
    """fc_k = MatMul + Add for k ≥ ``start``, a Relu after each hidden one (values h_k, a_k)."""
    nodes, cur = [], first
    for k in range(start, len(WIDTHS) - 1):
        out = "y" if k == len(WIDTHS) - 2 else f"h{k}"
        nodes.append(helper.make_node("MatMul", [cur, f"W{k}"], [f"m{k}"], name=f"mm{k}"))
        nodes.append(helper.make_node("Add", [f"m{k}", f"b{k}"], [out], name=f"add{k}"))
        cur = out
        if out != "y":
            nodes.append(helper.make_node("Relu", [out], [f"a{k}"], name=f"relu{k}"))
            cur = f"a{k}"
    return nodes


def vi(
    name: str, shape: Sequence[int] | None, elem: int = TensorProto.FLOAT
) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def build(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto] = (),
    outputs: Sequence[onnx.ValueInfoProto] = (),
    inits: dict[str, np.ndarray] | None = None,
    *,
    weights_as_inputs: Sequence[str] = (),
    functions: Sequence[onnx.FunctionProto] = (),
    mlp: bool = True,
    drop: Sequence[str] = (),
    check: bool = True,
) -> onnx.ModelProto:
    """The MLP (unless ``mlp`` is False: ``nodes`` build it) plus ``nodes``, ``inputs``,
    ``outputs`` and ``inits``; ``weights_as_inputs`` are initializers also listed as graph
    inputs (IR ≥ 4: a default a caller may override); ``drop`` removes MLP weights."""
    weights = {k: v for k, v in mlp_weights().items() if k not in drop}
    all_inits = {**weights, **(inits or {})}
    graph_inputs = [vi("x", [2, WIDTHS[0]]), *inputs]
    graph_inputs += [vi(n, list(all_inits[n].shape)) for n in weights_as_inputs]
    graph = helper.make_graph(
        [*(mlp_nodes() if mlp else []), *nodes],
        "soundness",
        graph_inputs,
        [vi("y", [2, WIDTHS[-1]]), *outputs],
        [numpy_helper.from_array(a, n) for n, a in all_inits.items()],
    )
    opsets = [helper.make_opsetid("", OPSET)] + [
        helper.make_opsetid(f.domain, 1) for f in functions[:1]
    ]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8, functions=functions)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _matmul_x(weight: str, out: str, name: str, x: str = "x") -> onnx.NodeProto:
    return helper.make_node("MatMul", [x, weight], [out], name=name)


def _branch(name: str, nodes: Sequence[onnx.NodeProto], out: str) -> onnx.GraphProto:
    return helper.make_graph(list(nodes), name, [], [vi(out, [2, WIDTHS[1]])])


def if_model() -> onnx.ModelProto:
    """``z = If(cond, x @ W0, −(x @ W0))``: both branches read W0 from the outer scope."""
    then = _branch("then", [_matmul_x("W0", "t", "then_mm")], "t")
    other = _branch(
        "else", [_matmul_x("W0", "e0", "else_mm"), helper.make_node("Neg", ["e0"], ["e"])], "e"
    )
    node = helper.make_node("If", ["cond"], ["z"], name="if0", then_branch=then, else_branch=other)
    return build([node], [vi("cond", [], TensorProto.BOOL)], [vi("z", [2, WIDTHS[1]])])


def nested_if_model() -> onnx.ModelProto:
    """``z = If(cond, If(cond, x @ W0, σ(x) @ W0), x @ Wz)``: only the inner If reads W0."""
    inner = helper.make_node(
        "If",
        ["cond"],
        ["t"],
        name="if_inner",
        then_branch=_branch("inner_then", [_matmul_x("W0", "ti", "inner_mm")], "ti"),
        else_branch=_branch(
            "inner_else",
            [helper.make_node("Sigmoid", ["x"], ["sx"]), _matmul_x("W0", "te", "inner_mm2", "sx")],
            "te",
        ),
    )
    return _outer_if(inner)


def _outer_if(inner: onnx.NodeProto) -> onnx.ModelProto:
    """``z = If(cond, then: inner's output t, else: x @ Wz)``, with the shared cond."""
    node = helper.make_node(
        "If",
        ["cond"],
        ["z"],
        name="if0",
        then_branch=_branch("then", [inner], "t"),
        else_branch=_branch("else", [_matmul_x("Wz", "e", "else_mm")], "e"),
    )
    inits = {"Wz": _rand((WIDTHS[0], WIDTHS[1]), 99)}
    return build([node], [vi("cond", [], TensorProto.BOOL)], [vi("z", [2, WIDTHS[1]])], inits)


def loop_model() -> onnx.ModelProto:
    """``s = s0; 3 times: s = s + x @ W0``: the body reads W0 from the outer scope."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            _matmul_x("W0", "p", "body_mm"),
            helper.make_node("Add", ["s_in", "p"], ["s_out"]),
        ],
        "body",
        [vi("i", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL), vi("s_in", [2, 6])],
        [vi("c_out", [], TensorProto.BOOL), vi("s_out", [2, WIDTHS[1]])],
    )
    node = helper.make_node("Loop", ["trips", "go", "s0"], ["s"], name="loop0", body=body)
    inits = {"trips": np.array(3, np.int64), "go": np.array(True)}
    return build([node], [vi("s0", [2, WIDTHS[1]])], [vi("s", [2, WIDTHS[1]])], inits)


def scan_model() -> onnx.ModelProto:
    """``s = s0; for x_t in seq: s = s + x_t @ W0``: the body reads W0 from the outer scope."""
    body = helper.make_graph(
        [_matmul_x("W0", "p", "body_mm", "xt"), helper.make_node("Add", ["s_in", "p"], ["s_out"])],
        "body",
        [vi("s_in", [2, WIDTHS[1]]), vi("xt", [2, WIDTHS[0]])],
        [vi("s_out", [2, WIDTHS[1]])],
    )
    node = helper.make_node(
        "Scan", ["s0", "seq"], ["s"], name="scan0", body=body, num_scan_inputs=1
    )
    inputs = [vi("s0", [2, WIDTHS[1]]), vi("seq", [3, 2, WIDTHS[0]])]
    return build([node], inputs, [vi("s", [2, WIDTHS[1]])])


def function_model() -> onnx.ModelProto:
    """``z = local.Lin(x, W0)``, a model-local function computing ``MatMul(X, Wt)``."""
    fn = helper.make_function(
        "local",
        "Lin",
        ["X", "Wt"],
        ["Y"],
        [helper.make_node("MatMul", ["X", "Wt"], ["Y"])],
        [helper.make_opsetid("", OPSET)],
    )
    node = helper.make_node("Lin", ["x", "W0"], ["z"], name="call0", domain="local")
    return build([node], [], [vi("z", [2, WIDTHS[1]])], functions=[fn], check=False)


def weight_input_model() -> onnx.ModelProto:
    """W0 is an initializer and a graph input: a default callers may override."""
    return build([], weights_as_inputs=["W0"])


def weight_output_model() -> onnx.ModelProto:
    """W2 is also a graph output."""
    return build([], [], [vi("W2", [WIDTHS[2], WIDTHS[3]])])


def derived_output_model() -> onnx.ModelProto:
    """``Transpose(W2)`` (a constant whose elements are W2's) is a graph output."""
    node = helper.make_node("Transpose", ["W2"], ["W2t"], name="tr", perm=[1, 0])
    return build([node], [], [vi("W2t", [WIDTHS[3], WIDTHS[2]])])


def shared_scalar_model() -> onnx.ModelProto:
    """A scalar ``c`` is fc0's bias (absorbs fc0's cofactors) and a plain factor of y."""
    model = build(
        [helper.make_node("Mul", ["y", "c"], ["yc"], name="scale_y")],
        [],
        [vi("yc", [2, WIDTHS[-1]])],
        {"c": np.array(0.75, np.float32)},
        drop=["b0"],
        check=False,
    )
    next(n for n in model.graph.node if n.name == "add0").input[1] = "c"
    onnx.checker.check_model(model, full_check=True)
    return model


def captured_activation_model() -> onnx.ModelProto:
    """``z = If(cond, If(cond, Neg(a0), Abs(a0)), x @ Wz)``: the hidden activation a0 is
    read two subgraph levels down."""
    inner = helper.make_node(
        "If",
        ["cond"],
        ["t"],
        name="if_inner",
        then_branch=_branch("inner_then", [helper.make_node("Neg", ["a0"], ["ti"])], "ti"),
        else_branch=_branch("inner_else", [helper.make_node("Abs", ["a0"], ["te"])], "te"),
    )
    return _outer_if(inner)


# -- quantized and computed weights -------------------------------------------------------------
def bf16_model() -> onnx.ModelProto:
    """W0 is stored as bfloat16 and Cast to float before fc0."""
    model = build([], check=False)
    w0 = next(t for t in model.graph.initializer if t.name == "W0")
    arr = numpy_helper.to_array(w0)
    bits = (arr.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16
    raw = bits.tobytes()
    model.graph.initializer.remove(w0)
    model.graph.initializer.append(
        helper.make_tensor("W0_bf16", TensorProto.BFLOAT16, arr.shape, raw, raw=True)
    )
    model.graph.node.insert(
        0, helper.make_node("Cast", ["W0_bf16"], ["W0"], name="cast_w0", to=TensorProto.FLOAT)
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _ints(shape: Sequence[int], seed: int, dtype: type) -> np.ndarray:
    lo, hi = (-100, 100) if dtype is np.int8 else (20, 230)
    return np.random.default_rng(seed).integers(lo, hi, tuple(shape)).astype(dtype)


def qdq_model() -> onnx.ModelProto:
    """QDQ format: x → QuantizeLinear → DequantizeLinear → MatMul(DequantizeLinear(W0q))
    + b0 → Relu, then the float fc1, fc2."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["W0q", "ws", "wz"], ["W0d"], name="dq_w0", axis=1),
        helper.make_node("MatMul", ["xd", "W0d"], ["m0"], name="mm0"),
        helper.make_node("Add", ["m0", "b0"], ["h0"], name="add0"),
        helper.make_node("Relu", ["h0"], ["a0"], name="relu0"),
        *mlp_nodes("a0", start=1),
    ]
    inits: dict[str, np.ndarray] = {
        "xs": np.array(0.05, np.float32),
        "xz": np.array(128, np.uint8),
        "W0q": _ints((WIDTHS[0], WIDTHS[1]), 3, np.int8),
        "ws": np.full(WIDTHS[1], 0.01, np.float32),
        "wz": np.zeros(WIDTHS[1], np.int8),
    }
    return build(nodes, inits=inits, mlp=False, drop=["W0"])


def _qlinearconv(out: str) -> list[onnx.NodeProto]:
    """x[2, 4] → [2, 4, 1, 1] → QuantizeLinear → QLinearConv 1×1 (6 channels) →
    DequantizeLinear → [2, 6] as ``out``."""
    ins = ["xq", "xs", "xz", "Wq", "ws", "wz", "ys", "yz"]
    return [
        helper.make_node("Reshape", ["x", "s4"], ["x4"], name="to4"),
        helper.make_node("QuantizeLinear", ["x4", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("QLinearConv", ins, ["cq"], name="qconv"),
        helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["cd"], name="dq_c"),
        helper.make_node("Reshape", ["cd", "s2"], [out], name="to2"),
    ]


_QCONV_INITS: dict[str, np.ndarray] = {
    "s4": np.array([2, WIDTHS[0], 1, 1], np.int64),
    "s2": np.array([2, WIDTHS[1]], np.int64),
    "xs": np.array(0.05, np.float32),
    "xz": np.array(128, np.uint8),
    "Wq": _ints((WIDTHS[1], WIDTHS[0], 1, 1), 4, np.uint8),
    "ws": np.array(0.01, np.float32),
    "wz": np.array(128, np.uint8),
    "ys": np.array(0.02, np.float32),
    "yz": np.array(128, np.uint8),
}


def qlinearconv_model() -> onnx.ModelProto:
    """QLinearConv as fc0, then Relu and the float fc1, fc2."""
    nodes = [
        *_qlinearconv("h0"),
        helper.make_node("Relu", ["h0"], ["a0"], name="relu0"),
        *mlp_nodes("a0", start=1),
    ]
    return build(nodes, inits=_QCONV_INITS, mlp=False, drop=["W0", "b0"])


def quantized_only_model() -> onnx.ModelProto:
    """Nothing but QLinearConv between input and output: no float weight at all."""
    graph = helper.make_graph(
        _qlinearconv("z"),
        "quantized",
        [vi("x", [2, WIDTHS[0]])],
        [vi("z", [2, WIDTHS[1]])],
        [numpy_helper.from_array(a, n) for n, a in _QCONV_INITS.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def matmulinteger_model() -> onnx.ModelProto:
    """x → DynamicQuantizeLinear → MatMulInteger(W0q) → Cast → ·x scale → ·w scale → Relu,
    then the float fc1, fc2."""
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
        helper.make_node("MatMulInteger", ["xq", "W0q", "xz", "wz"], ["mi"], name="mmi"),
        helper.make_node("Cast", ["mi"], ["mf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["mf", "xs"], ["mx"], name="mul_xs"),
        helper.make_node("Mul", ["mx", "ws"], ["h0"], name="mul_ws"),
        helper.make_node("Relu", ["h0"], ["a0"], name="relu0"),
        *mlp_nodes("a0", start=1),
    ]
    inits: dict[str, np.ndarray] = {
        "W0q": _ints((WIDTHS[0], WIDTHS[1]), 5, np.uint8),
        "wz": np.array(128, np.uint8),
        "ws": np.array(0.01, np.float32),
    }
    return build(nodes, inits=inits, mlp=False, drop=["W0", "b0"])


def batchnorm_shared_model(share: str) -> onnx.ModelProto:
    """x → fc0 → [2, 6, 1, 1] → BatchNormalization → [2, 6] → Relu → fc1, fc2, with one
    uniform tensor ``u`` as two of the BatchNorm's inputs: ``bias+mean`` (both absorb a
    scaling: private copies) or ``scale+var`` (the variance must keep its value)."""
    slots = {"scale": "bn_s", "bias": "bn_b", "mean": "bn_m", "var": "bn_v"}
    first, second = share.split("+")
    slots[first] = slots[second] = "u"
    nodes = [
        *mlp_nodes()[:2],
        helper.make_node("Reshape", ["h0", "s4"], ["h4"], name="to4"),
        helper.make_node(
            "BatchNormalization",
            ["h4", slots["scale"], slots["bias"], slots["mean"], slots["var"]],
            ["n4"],
            name="bn",
        ),
        helper.make_node("Reshape", ["n4", "s2"], ["n0"], name="to2"),
        helper.make_node("Relu", ["n0"], ["a0"], name="relu0"),
        *mlp_nodes("a0", start=1),
    ]
    c = WIDTHS[1]
    inits: dict[str, np.ndarray] = {
        "s4": np.array([2, c, 1, 1], np.int64),
        "s2": np.array([2, c], np.int64),
        "u": np.full(c, 0.7 if share == "bias+mean" else 1.3, np.float32),
        "bn_s": np.linspace(0.5, 1.5, c).astype(np.float32),
        "bn_b": np.linspace(-0.2, 0.3, c).astype(np.float32),
        "bn_m": np.linspace(-0.1, 0.4, c).astype(np.float32),
        "bn_v": np.linspace(0.5, 2.0, c).astype(np.float32),
    }
    used = set(slots.values())
    inits = {k: v for k, v in inits.items() if k in used or k in ("s4", "s2")}
    return build(nodes, inits=inits, mlp=False)


# -- checks -------------------------------------------------------------------------------------
def input_draws(
    model: onnx.ModelProto, overrides: dict[str, np.ndarray] | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Six draws at growing scales; a bool input (an If condition) alternates True/False,
    so every branch is taken; ``overrides`` are fed as they are, other initializers listed
    as inputs are not fed."""
    rng = np.random.default_rng(7)
    stored = {t.name for t in model.graph.initializer}
    for k in range(6):
        feeds: dict[str, np.ndarray] = {}
        for info in model.graph.input:
            if overrides and info.name in overrides:
                feeds[info.name] = overrides[info.name]
            elif info.name in stored:
                continue  # an initializer listed as an input: its stored value
            elif info.type.tensor_type.elem_type == TensorProto.BOOL:
                feeds[info.name] = np.array(k % 2 == 0)
            else:
                dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
                feeds[info.name] = (rng.standard_normal(dims) * (1 + 2 * k)).astype(np.float32)
        yield feeds


def assert_same_function(
    before: onnx.ModelProto, after: onnx.ModelProto, overrides: dict[str, np.ndarray] | None = None
) -> None:
    """rel err ≤ 1e-5 on every draw; a model with an If condition sees it True and False."""
    draws = list(input_draws(before, overrides))
    if any(i.name == "cond" for i in before.graph.input):
        assert {bool(f["cond"]) for f in draws} == {True, False}
    for feeds in draws:
        assert max_rel_err(before, after, feeds) <= RTOL, {k: v.shape for k, v in feeds.items()}


def pinned_reasons(model: onnx.ModelProto, mode: str = "absorb") -> dict[str, int]:
    return {p.reason: p.cofactors for p in analyze(ir.from_proto(model), mode=mode).pinned()}


def check_kept(
    build_model: Callable[[], onnx.ModelProto],
    kept: set[str],
    reason: str,
    moved: set[str] = SAFE,
    overrides: dict[str, np.ndarray] | None = None,
    mode: str = "absorb",
) -> None:
    """Teleported: ``kept`` unchanged, ``moved`` changed, a pin whose reason matches
    ``reason`` (a regular expression), and the original function on draws taking every
    branch."""
    proto = build_model()
    t = teleport(proto, mode=mode)
    assert t.changed == moved, t.changed
    assert not kept & t.changed
    reasons = pinned_reasons(proto, mode)
    assert any(re.search(reason, r) for r in reasons), reasons
    assert t.result.free_cofactors == WIDTHS[2]  # fc1's neurons: free; fc0's: pinned
    assert_same_function(proto, t.after, overrides)


# -- subgraphs and functions --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build_model", "reason"),
    [
        (if_model, r"weight 'W0' is also read inside If 'if0' \((then|else)_branch\)"),
        (nested_if_model, r"weight 'W0' is also read inside If 'if_inner' \(\w+\) of If 'if0'"),
        (loop_model, r"weight 'W0' is also read inside Loop 'loop0' \(body\)"),
        (scan_model, r"weight 'W0' is also read inside Scan 'scan0' \(body\)"),
        (function_model, "weight 'W0' is also read by a call of the local function local\\.Lin"),
    ],
    ids=["if", "nested_if", "loop", "scan", "function"],
)
@pytest.mark.parametrize("mode", ["absorb", "insert"])
def test_weight_read_by_a_body_or_function_keeps_its_value(
    build_model: Callable[[], onnx.ModelProto], reason: str, mode: str
) -> None:
    check_kept(build_model, {"W0", "b0"}, reason, mode=mode)


def test_if_takes_both_branches_in_the_draws() -> None:
    """The draws really take both branches: the If's output differs between them."""
    proto = if_model()
    draws = list(input_draws(proto))
    assert {bool(f["cond"]) for f in draws} == {True, False}
    feeds = draws[0]
    z_then = run_ort(proto, {**feeds, "cond": np.array(True)})[1]
    z_else = run_ort(proto, {**feeds, "cond": np.array(False)})[1]
    np.testing.assert_allclose(z_then, -z_else, rtol=1e-6)
    assert np.abs(z_then).max() > 0


def test_activation_captured_two_levels_down_is_pinned() -> None:
    """a0 is read inside an If inside an If: its cofactors are pinned (fc0 keeps W0, b0),
    and both branches compute what they did."""
    proto = captured_activation_model()
    t = teleport(proto)
    assert t.changed == SAFE
    np.testing.assert_array_equal(t.tau("a0"), 1.0)
    assert pinned_reasons(proto).get("If has subgraphs", 0) >= 1
    assert_same_function(proto, t.after)


def test_subgraph_output_naming_an_outer_activation_pins_it() -> None:
    """A branch whose output is the outer a0 itself (no node reads it there; onnxruntime
    refuses such a model, the analysis must still not rescale a0)."""
    then = helper.make_graph([], "then", [], [vi("a0", [2, WIDTHS[1]])])
    other = _branch("else", [_matmul_x("W0", "e", "else_mm")], "e")
    node = helper.make_node("If", ["cond"], ["z"], name="if0", then_branch=then, else_branch=other)
    proto = build([node], [vi("cond", [], TensorProto.BOOL)], [vi("z", [2, 6])], check=False)
    t = teleport(proto)
    np.testing.assert_array_equal(t.tau("a0"), 1.0)
    assert "W0" not in t.changed and "W1" in t.changed


def test_weight_read_by_an_unknown_op_keeps_its_value() -> None:
    """z = com.foo.Bar(x, W0): what Bar does with W0 is unknown, so W0 keeps its value
    (onnxruntime has no Bar kernel: the weights are checked, not run)."""
    node = helper.make_node("Bar", ["x", "W0"], ["z"], name="bar", domain="com.foo")
    proto = build([node], [], [vi("z", [2, WIDTHS[1]])], check=False)
    proto.opset_import.append(helper.make_opsetid("com.foo", 1))
    t = teleport(proto)
    assert t.changed == SAFE
    reasons = pinned_reasons(proto)
    assert "weight 'W0' is also read by com.foo.Bar 'bar' (not rescaled there)" in reasons


# -- the model's interface ----------------------------------------------------------------------
def test_weight_that_is_a_graph_input_keeps_its_value() -> None:
    """Feeding W0 explicitly (its stored value, or another) gives what the original gives."""
    w0 = mlp_weights()["W0"]
    reason = r"weight 'W0' is a graph input \(callers may override it\)"
    check_kept(weight_input_model, {"W0"}, reason, overrides={"W0": w0})
    check_kept(weight_input_model, {"W0"}, reason, overrides={"W0": _rand(w0.shape, 5)})


def test_ir3_weights_listed_as_inputs_still_move() -> None:
    """Before IR 4 every initializer is listed as an input too (a format rule; onnxruntime
    keeps them constant): W0 moves as in any model."""
    proto = weight_input_model()
    proto.ir_version, proto.opset_import[0].version = 3, 8
    t = teleport(proto)
    assert t.changed == {"W0", "b0", "W1", "b1", "W2"}
    assert t.result.free_cofactors == WIDTHS[1] + WIDTHS[2]
    assert_same_function(proto, t.after)


@pytest.mark.parametrize(
    ("build_model", "reason"),
    [
        (weight_output_model, "weight 'W2' is a graph output"),
        (derived_output_model, "weight 'W2' is a graph output (as 'W2t')"),
    ],
    ids=["direct", "transposed"],
)
def test_weight_that_is_a_graph_output_keeps_its_value(
    build_model: Callable[[], onnx.ModelProto], reason: str
) -> None:
    """W2 keeps its value, so fc1's neurons (W2's inputs) are pinned; fc0's still move."""
    proto = build_model()
    t = teleport(proto)
    assert t.changed == {"W0", "b0", "W1"}
    assert any(reason in r for r in pinned_reasons(proto))
    assert t.result.free_cofactors == WIDTHS[1]
    assert_same_function(proto, t.after)


def test_constant_read_where_it_is_not_rescaled_keeps_its_value() -> None:
    """c is fc0's bias and a plain factor of y: it keeps its value (before: the bias's
    rescale broadcast it to [1, 6] and the Mul's model no longer loaded)."""
    check_kept(shared_scalar_model, {"c"}, "weight 'c' is also read by Mul 'scale_y'")


@pytest.mark.parametrize("share", ["bias+mean", "scale+var"])
def test_batchnorm_reading_one_tensor_twice(share: str) -> None:
    """bias+mean: both slots absorb (private copies; fc0's neurons stay free);
    scale+var: the variance must keep its value, so the BatchNorm's cofactors are pinned."""
    proto = batchnorm_shared_model(share)
    t = teleport(proto)
    assert_same_function(proto, t.after)
    assert "W2" in t.changed
    if share == "bias+mean":
        assert t.result.free_cofactors == 2 * WIDTHS[1] + WIDTHS[2]  # fc0, BatchNorm, fc1
        assert t.result.stats.copies  # the second slot got its own copy
    else:
        assert "u" not in t.changed
        reasons = pinned_reasons(proto)
        assert any("weight 'u' is also read by BatchNormalization 'bn'" in r for r in reasons)


# -- say why --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build_model", "reason"),
    [
        (bf16_model, "weight 'W0' is computed (Cast from bfloat16 'W0_bf16'), not stored"),
        (qdq_model, "quantized tensor (QDQ)"),
        (qlinearconv_model, "quantized op QLinearConv"),
        (matmulinteger_model, "quantized op MatMulInteger"),
    ],
    ids=["bf16", "qdq", "qlinearconv", "matmulinteger"],
)
def test_quantized_and_computed_weights_say_why(
    build_model: Callable[[], onnx.ModelProto], reason: str
) -> None:
    """fc0 cannot move (its weight is quantized or computed): its neurons are pinned with
    the reason; the float fc1 and fc2 still move and the function is unchanged."""
    proto = build_model()
    reasons = pinned_reasons(proto)
    assert any(reason in r for r in reasons), reasons
    t = teleport(proto)
    assert t.changed == SAFE
    assert t.result.free_cofactors == WIDTHS[2]
    assert_same_function(proto, t.after)


def test_matmulinteger_names_dynamic_quantize_linear() -> None:
    assert "quantized op DynamicQuantizeLinear" in pinned_reasons(matmulinteger_model())


def test_qdq_weight_reason_names_the_dequantize() -> None:
    reasons = pinned_reasons(qdq_model())
    assert any("'W0d' is computed (DequantizeLinear of int8 'W0q'" in r for r in reasons), reasons


def test_nothing_free_says_why_in_the_report(tmp_path: Path) -> None:
    """A model of quantized ops only: exit 0, nothing changed, and the report's pinned
    list names the quantized op (before: "0 of 0 free" and no reason)."""
    src, dst, report = tmp_path / "q.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(quantized_only_model(), src)
    assert main([str(src), "-o", str(dst), "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["free_cofactors"] == 0
    reasons = {p["reason"]: p["cofactors"] for p in data["pinned"]}
    assert reasons.get("quantized op QLinearConv", 0) >= 1, reasons
    assert data["initializers_changed"] == 0


def test_cli_if_model_report_and_both_branches(tmp_path: Path) -> None:
    """Through the CLI: exit 0, the reason in the report, and the written model computes
    the original on both branches."""
    proto = if_model()
    src, dst, report = tmp_path / "if.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(proto, src)
    assert main([str(src), "-o", str(dst), "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert any(p["reason"].startswith("weight 'W0' is also read inside If") for p in data["pinned"])
    assert data["free_cofactors"] == WIDTHS[2]
    assert_same_function(proto, onnx.load(dst))


def uint8_qlinearconv_model() -> onnx.ModelProto:
    """uint8 in, QLinearConv, uint8 out: not one float tensor between them."""
    inits = {k: v for k, v in _QCONV_INITS.items() if k not in ("s4", "s2")}
    ins = ["xq", "xs", "xz", "Wq", "ws", "wz", "ys", "yz"]
    graph = helper.make_graph(
        [helper.make_node("QLinearConv", ins, ["cq"], name="qconv")],
        "uint8",
        [vi("xq", [2, WIDTHS[0], 1, 1], TensorProto.UINT8)],
        [vi("cq", [2, WIDTHS[1], 1, 1], TensorProto.UINT8)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def weightless_model() -> onnx.ModelProto:
    """x → Relu → y: float neurons, but no weight to move them."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu", [vi("x", [2, 4])], [vi("y", [2, 4])]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


@pytest.mark.parametrize(
    ("build_model", "reason"),
    [
        (uint8_qlinearconv_model, "the model computes with quantized ops (QLinearConv)"),
        (weightless_model, "no stored float weight"),
    ],
    ids=["uint8", "weightless"],
)
def test_no_cofactor_at_all_says_why(
    build_model: Callable[[], onnx.ModelProto], reason: str, tmp_path: Path
) -> None:
    """No tensor carries a cofactor: "0 of 0 free", and the report's pinned list says why."""
    src, dst, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(build_model(), src)
    assert main([str(src), "-o", str(dst), "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert (data["free_cofactors"], data["cofactor_pairs"]) == (0, 0)
    [pin] = data["pinned"]
    assert pin["reason"].startswith("nothing to rescale: ") and reason in pin["reason"], pin
    assert pin["cofactors"] == 0

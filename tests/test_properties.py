"""Property tests (hypothesis): random MLPs and CNNs, random samplings, seeds and ranges.

For every drawn network, TeleportPass must preserve the function in onnxruntime, move
weights whenever it reports free cofactors, and count exactly the free cofactors a hand
count gives: one per hidden neuron (MLP) or hidden channel (CNN), except that a residual
Add ties its block to the block before, adding none.

Random nets can cancel: an output of 1e-4 made of O(1) terms carries the float32 rounding of
those terms (the teleported weights are rounded to float32), so ``max|a − b| / max|a|`` can
exceed 1e-5 with nothing wrong.  The error is therefore measured against the *magnitude
network* (every weight and input replaced by its absolute value), whose output bounds the
sum of absolute terms behind each output: ``max|a − b| ≤ 1e-5 · max|M|``.  A wrong rewrite
gives errors of the order of ``|M|`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import RTOL, make_model, max_abs_err, rand, random_feeds, run_ort, teleport
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from graphteleport.analysis import analyze
from graphteleport.options import SAMPLINGS

N = helper.make_node
ACTS = ("Relu", "LeakyRelu", "")
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass
class Layer:
    width: int
    act: str
    bias: bool
    residual: bool  # out = act(layer(h)) + h (only when the width is unchanged)
    groups: int = 1


@dataclass
class Net:
    inputs: int
    layers: list[Layer]
    outputs: int
    seed: int

    @property
    def hand_count(self) -> int:
        """One cofactor per hidden neuron; a residual layer's neurons are tied to its input's."""
        return sum(layer.width for layer in self.layers if not layer.residual)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def nets(draw: st.DrawFn, conv: bool = False) -> Net:
    inputs = draw(st.integers(1, 6))
    prev = inputs
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        width = draw(st.one_of(st.just(prev), st.integers(1, 12)))
        residual = width == prev and bool(layers) and draw(st.booleans())
        groups = draw(st.sampled_from(_divisors(np.gcd(prev, width)))) if conv else 1
        layers.append(
            Layer(width, draw(st.sampled_from(ACTS)), draw(st.booleans()), residual, groups)
        )
        prev = width
    return Net(inputs, layers, draw(st.integers(1, 5)), draw(st.integers(0, 2**16)))


teleports = st.fixed_dictionaries(
    {
        "sampling": st.sampled_from(SAMPLINGS),
        "cob_range": st.floats(0.1, 0.9),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def _layer_nodes(
    k: int, cur: str, layer: Layer, op: str, inits: dict, seed: int
) -> tuple[list, str]:
    """One hidden layer: ``op`` (Gemm or Conv) into h{k}, its activation, its residual Add."""
    ins = [cur, f"W{k}", *([f"b{k}"] if layer.bias else [])]
    attrs = {"pads": [1, 1, 1, 1], "group": layer.groups} if op == "Conv" else {}
    nodes = [N(op, ins, [f"h{k}"], **attrs)]
    out = f"h{k}"
    if layer.act:
        nodes.append(N(layer.act, [out], [f"a{k}"]))
        out = f"a{k}"
    if layer.residual:
        nodes.append(N("Add", [out, cur], [f"r{k}"]))
        out = f"r{k}"
    if layer.bias:
        inits[f"b{k}"] = rand([layer.width], seed + 2 * k + 1)
    return nodes, out


def build_mlp(net: Net) -> onnx.ModelProto:
    """x[8, inputs] → (Gemm, act, [+ residual]) × depth → Gemm → y[8, outputs]."""
    inits: dict = {}
    nodes, cur, prev = [], "x", net.inputs
    for k, layer in enumerate(net.layers):
        inits[f"W{k}"] = rand([prev, layer.width], net.seed + 2 * k) / np.float32(np.sqrt(prev))
        more, cur = _layer_nodes(k, cur, layer, "Gemm", inits, net.seed)
        nodes += more
        prev = layer.width
    inits["Wout"] = rand([prev, net.outputs], net.seed + 99)
    nodes.append(N("Gemm", [cur, "Wout"], ["y"]))
    return make_model(nodes, {"x": [8, net.inputs]}, {"y": [8, net.outputs]}, inits)


def build_cnn(net: Net) -> onnx.ModelProto:
    """x[2, C, 5, 5] → (Conv 3×3 grouped, act, [+ residual]) × depth → GAP → Flatten → Gemm."""
    inits: dict = {}
    nodes, cur, prev = [], "x", net.inputs
    for k, layer in enumerate(net.layers):
        fan_in = prev // layer.groups
        w = rand([layer.width, fan_in, 3, 3], net.seed + 2 * k) / np.float32(3 * np.sqrt(fan_in))
        inits[f"W{k}"] = w
        more, cur = _layer_nodes(k, cur, layer, "Conv", inits, net.seed)
        nodes += more
        prev = layer.width
    inits["Wout"] = rand([prev, net.outputs], net.seed + 99)
    nodes += [
        N("GlobalAveragePool", [cur], ["g"]),
        N("Flatten", ["g"], ["f"]),
        N("Gemm", ["f", "Wout"], ["y"]),
    ]
    return make_model(nodes, {"x": [2, net.inputs, 5, 5]}, {"y": [2, net.outputs]}, inits)


def magnitude(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """max |output| of the network with |W|, |b| and |x| (no cancellation anywhere)."""
    absolute = onnx.ModelProto()
    absolute.CopyFrom(proto)
    for init in absolute.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(init)), init.name))
    outs = run_ort(absolute, {k: np.abs(v) for k, v in feeds.items()})
    return max(float(np.max(np.abs(o))) for o in outs)


def assert_preserved(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    feeds = random_feeds(before)
    scale = magnitude(before, feeds)
    assert max_abs_err(before, after, feeds) <= RTOL * scale


def check(proto: onnx.ModelProto, net: Net, kw: dict) -> None:
    t = teleport(proto, **kw)
    free = t.result.free_cofactors
    assert free == net.hand_count
    assert analyze(ir.from_proto(proto)).free_cofactors == free
    assert_preserved(t.before, t.after)
    if free > 0:
        assert "W0" in t.changed, "the first layer's outputs are free, so W0 must move"
    assert t.result.stats.elements_changed == sum(
        int(np.count_nonzero(t.w1[k] != w)) for k, w in t.w0.items()
    )


@SETTINGS
@given(net=nets(), kw=teleports)
def test_random_mlp(net: Net, kw: dict) -> None:
    check(build_mlp(net), net, kw)


@SETTINGS
@given(net=nets(conv=True), kw=teleports)
def test_random_cnn(net: Net, kw: dict) -> None:
    check(build_cnn(net), net, kw)


@SETTINGS
@given(widths=st.lists(st.integers(1, 12), min_size=1, max_size=4), seed=st.integers(0, 999))
def test_plain_relu_mlp_count_is_sum_of_hidden_widths(widths: list[int], seed: int) -> None:
    net = Net(3, [Layer(w, "Relu", True, False) for w in widths], 2, seed)
    q = analyze(ir.from_proto(build_mlp(net)))
    assert q.free_cofactors == sum(widths)
    assert q.groups() == {"positive": sum(widths)}


@SETTINGS
@given(net=nets(), seed=st.integers(0, 999))
def test_exact_mode_is_bit_identical_on_random_mlps(net: Net, seed: int) -> None:
    proto = build_mlp(net)
    t = teleport(proto, exact=True, sampling="inter_landscape", cob_range=0.9, seed=seed)
    assert max_abs_err(proto, t.after) == 0.0


def test_the_preservation_check_can_fail() -> None:
    """The magnitude-relative tolerance still catches a wrong rewrite (W0 off by 1 %)."""
    net = Net(3, [Layer(6, "Relu", True, False), Layer(6, "", True, True)], 2, seed=1)
    proto = build_mlp(net)
    t = teleport(proto)
    assert_preserved(t.before, t.after)
    broken = onnx.ModelProto()
    broken.CopyFrom(t.after)
    for init in broken.graph.initializer:
        if init.name == "W0":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, "W0"))
    with pytest.raises(AssertionError):
        assert_preserved(t.before, broken)

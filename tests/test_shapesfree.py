"""The passes called from Python without ``input_shapes`` analyse a model with dynamic
input axes as the CLI does: the analysis sizes the open axes with the CLI's resolver
(:func:`graphteleport.analysis.complete_input_shapes`, i.e.
:func:`graphteleport.frontends.onnx.resolve_input_shapes` with an onnxruntime probe).

Before, a value whose shape inference left a symbolic axis had no static shape and all
its neurons fell into one class: a conv's 8 output channels of an input ``[N, 3, H, W]``
became one cofactor, so ``TeleportPass()(model)`` found fewer free pairs than the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import make_model, max_rel_err, rand
from onnx import helper

from graphteleport.analysis import analyze_model, complete_input_shapes
from graphteleport.errors import InputError
from graphteleport.frontends.onnx import ort_probe, resolve_input_shapes
from graphteleport.passes.canonical import CanonicalizePass
from graphteleport.passes.equalize import EqualizePass
from graphteleport.passes.teleport import TeleportPass

n = helper.make_node


def conv_net(activation: str) -> onnx.ModelProto:
    """x[N,3,H,W] → Conv 3→8 (3×3, pad 1) → *activation* → Conv 8→4 → y[N,4,H,W]."""
    nodes = [
        n("Conv", ["x", "W0", "b0"], ["c"], pads=[1, 1, 1, 1]),
        n(activation, ["c"], ["a"]),
        n("Conv", ["a", "W1", "b1"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = {
        "W0": rand([8, 3, 3, 3], 0),
        "b0": rand([8], 1),
        "W1": rand([4, 8, 3, 3], 2),
        "b1": rand([4], 3),
    }
    return make_model(nodes, {"x": ["N", 3, "H", "W"]}, {"y": ["N", 4, "H", "W"]}, inits)


def token_mlp() -> onnx.ModelProto:
    """A transformer's feed-forward block with symbolic batch and sequence:
    x[B,S,8] → MatMul 8→16 + bias → Relu → MatMul 16→8 + bias → LayerNorm → y[B,S,8]."""
    nodes = [
        n("MatMul", ["x", "W0"], ["h"]),
        n("Add", ["h", "b0"], ["hb"]),
        n("Relu", ["hb"], ["a"]),
        n("MatMul", ["a", "W1"], ["o"]),
        n("Add", ["o", "b1"], ["ob"]),
        n("LayerNormalization", ["ob", "g", "beta"], ["y"], axis=-1),
    ]
    inits = {
        "W0": rand([8, 16], 0),
        "b0": rand([16], 1),
        "W1": rand([16, 8], 2),
        "b1": rand([8], 3),
        "g": rand([8], 4, low=0.5),
        "beta": rand([8], 5),
    }
    return make_model(nodes, {"x": ["B", "S", 8]}, {"y": ["B", "S", 8]}, inits)


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv-relu": lambda: conv_net("Relu"),
    "conv-hardswish": lambda: conv_net("HardSwish"),
    "token-mlp": token_mlp,
}

PASSES: dict[str, Callable[[str, dict[str, tuple[int, ...]] | None], Any]] = {
    "teleport": lambda mode, shapes: TeleportPass(mode=mode, seed=3, input_shapes=shapes),  # type: ignore[arg-type]
    "canonicalize": lambda mode, shapes: CanonicalizePass(mode=mode, input_shapes=shapes),  # type: ignore[arg-type]
    "equalize-cle": lambda mode, shapes: EqualizePass(method="cle", mode=mode, input_shapes=shapes),  # type: ignore[arg-type]
}


def cli_shapes(model: ir.Model) -> dict[str, tuple[int, ...]]:
    """The shapes the CLI analyses with (pipeline: resolve_input_shapes + ort probe)."""
    return resolve_input_shapes(model, probe=ort_probe(model)).shapes


def feeds_at(model: onnx.ModelProto, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Standard-normal inputs with each symbolic axis at ``sizes[symbol]``."""
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        dims = [
            d.dim_value if d.HasField("dim_value") else sizes[d.dim_param]
            for d in vi.type.tensor_type.shape.dim
        ]
        out[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return out


OTHER_SIZES = [{"N": 2, "H": 5, "W": 7, "B": 3, "S": 5}, {"N": 1, "H": 11, "W": 4, "B": 1, "S": 9}]


#: (model, mode) with free pairs: a HardSwish is not homogeneous, only insert mode moves it
CASES = [
    ("conv-relu", "absorb"),
    ("conv-relu", "insert"),
    ("conv-hardswish", "insert"),
    ("token-mlp", "absorb"),
    ("token-mlp", "insert"),
]


@pytest.mark.parametrize("pass_name", sorted(PASSES))
@pytest.mark.parametrize(("model_name", "mode"), CASES)
def test_pass_without_shapes_equals_the_cli_shapes(
    model_name: str, pass_name: str, mode: str
) -> None:
    """Same free pairs, same weights (bit for bit) as with the CLI's resolved shapes; the
    result still runs at other sizes of every dynamic axis and matches the original."""
    proto = MODELS[model_name]()
    plain, sized = ir.serde.deserialize_model(proto), ir.serde.deserialize_model(proto)
    shapes = cli_shapes(sized)
    without = PASSES[pass_name](mode, None)(plain)
    with_shapes = PASSES[pass_name](mode, shapes)(sized)
    assert with_shapes.free_cofactors > 0
    assert without.free_cofactors == with_shapes.free_cofactors
    a, b = ir.to_proto(without.model), ir.to_proto(with_shapes.model)
    assert [x.op_type for x in a.graph.node] == [x.op_type for x in b.graph.node]
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert x.name == y.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))
    for seed, sizes in enumerate(OTHER_SIZES):
        feeds = feeds_at(proto, sizes, seed)
        assert max_rel_err(proto, a, feeds) < 1e-5


@pytest.mark.parametrize("mode", ["absorb", "insert"])
def test_conv_channels_are_separate_classes_without_shapes(mode: str) -> None:
    """The collapse itself: without sizes the 8 channels were one class (insert mode found 0
    free pairs for the HardSwish net instead of 8; absorb mode 0 instead of 8 for Relu)."""
    model = ir.serde.deserialize_model(conv_net("Relu" if mode == "absorb" else "HardSwish"))
    plain = analyze_model(model, None, mode)
    sized = analyze_model(model, cli_shapes(model), mode)
    assert plain.neurons["c"].shape == sized.neurons["c"].shape == (1, 8, 1, 1)
    assert plain.free_cofactors == sized.free_cofactors == 8


def test_given_shapes_are_kept_and_open_axes_sized_as_the_cli() -> None:
    model = ir.serde.deserialize_model(conv_net("Relu"))
    assert complete_input_shapes(model, {"x": [2, 3, 5, 5]}) == {"x": (2, 3, 5, 5)}
    assert complete_input_shapes(model) == cli_shapes(model)
    static = ir.serde.deserialize_model(
        make_model([n("Relu", ["x"], ["y"])], {"x": [1, 4]}, {"y": [1, 4]})
    )
    assert complete_input_shapes(static) == {}  # nothing open: no probe, nothing added


def unrunnable() -> onnx.ModelProto:
    """x[1,T,4] → MatMul → Reshape to a constant [1,5,6]: only T = 5 runs, no ladder size."""
    nodes = [n("MatMul", ["x", "W0"], ["h"]), n("Reshape", ["h", "shape"], ["y"], name="r")]
    inits = {"W0": rand([4, 6], 0), "shape": np.array([1, 5, 6], dtype=np.int64)}
    return make_model(nodes, {"x": [1, "T", 4]}, {"y": [1, 5, 6]}, inits)


@pytest.mark.parametrize("pass_name", sorted(PASSES))
def test_unresolvable_axes_are_one_input_error_line(pass_name: str) -> None:
    model = ir.serde.deserialize_model(unrunnable())
    with pytest.raises(InputError) as e:
        PASSES[pass_name]("absorb", None)(model)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("input 'x' [1,T,4]: the model runs at no size"), message
    sized = PASSES[pass_name]("absorb", {"x": (1, 5, 4)})(ir.serde.deserialize_model(unrunnable()))
    assert sized.model is not None

"""Clip/ReLU6 as a rescalable form (graphteleport.clips, ``rescale_clip``).

``Clip(x, a, b) → Min(Max(x, A), B)`` (``Relu`` for a = 0) is the same function, and
``τ·clip(x, a, b) = min(max(τx, aτ), bτ)`` for τ > 0: the bounds absorb the cofactor
like a bias, so the classes a Clip pinned (absorb) or wrapped in Muls (insert) are free
and positive, with no node added.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import const_node, make_model, rand, run_ort, teleport, weights
from onnx import helper

from graphteleport.analysis import GROUPS, analyze_model
from graphteleport.clips import clip_bounds, join_clips, split_clips
from graphteleport.passes.equalize import EqualizePass
from graphteleport.pipeline import TeleportOptions, teleport_file

C = 6  # hidden channels


def conv_clip_conv(
    lo: float | None = 0.0, hi: float | None = 6.0, opset: int = 17
) -> onnx.ModelProto:
    """Conv → Clip(lo, hi) → Conv (bounds as initializers; opset 6-10: attributes)."""
    inits = {
        "w1": rand((C, 3, 3, 3), 1),
        "b1": rand((C,), 2),
        "w2": rand((4, C, 1, 1), 3),
        "b2": rand((4,), 4),
    }
    if opset >= 11:
        names = ["", ""]
        for k, (key, bound) in enumerate((("lo", lo), ("hi", hi))):
            if bound is not None:
                inits[key] = np.asarray(bound, np.float32)
                names[k] = key
        clip = helper.make_node("Clip", ["h", *names], ["a"], name="clip")
    else:
        attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        clip = helper.make_node("Clip", ["h"], ["a"], name="clip", **attrs)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
        clip,
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"]),
    ]
    shapes = {"x": [2, 3, 5, 5]}
    return make_model(
        nodes, shapes, {"y": [2, 4, 5, 5]}, inits, opset=opset, value_info={"h": [2, C, 5, 5]}
    )


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs large enough that every Clip saturates at both ends somewhere."""
    rng = np.random.default_rng(seed)
    return {"x": (4 * rng.standard_normal((2, 3, 5, 5))).astype(np.float32)}


def clip_groups(proto: onnx.ModelProto, mode: str = "absorb") -> set[str]:
    """The groups of the classes of the hidden activation after the Clip ("a")."""
    model = ir.from_proto(proto)
    analysis = analyze_model(model, mode=mode)
    ids = analysis.neurons["a"].reshape(-1)
    sol = analysis.solution
    return {GROUPS[int(sol.code[p])] for p in sol.pair[ids]}


@pytest.mark.parametrize(
    ("lo", "hi", "ops"),
    [
        (0.0, 6.0, ["Relu", "Min"]),
        (-1.0, 1.0, ["Max", "Min"]),
        (None, 2.0, ["Min"]),
        (0.5, None, ["Max"]),
    ],
)
def test_split_is_the_same_function(lo: float | None, hi: float | None, ops: list[str]) -> None:
    proto = conv_clip_conv(lo, hi)
    model = ir.from_proto(proto)
    done = split_clips(model)
    assert done.clips == ["clip"] and done.nodes_added == len(ops)
    assert [n.op_type for n in model.graph] == ["Conv", *ops, "Conv"]
    assert model.graph.node(len(ops)).outputs[0].name == "a"  # the Clip's output name stays
    assert not {"lo", "hi"} & set(model.graph.initializers)  # bounds nobody reads: removed
    for seed in range(3):
        ref, got = run_ort(proto, feeds(seed)), run_ort(model, feeds(seed))
        assert np.array_equal(ref[0], got[0])  # bit for bit


def test_opset_6_attributes_and_forms_left_alone() -> None:
    model = ir.from_proto(conv_clip_conv(0.0, 6.0, opset=10))
    assert clip_bounds(model.graph.node(1), 10) == (0.0, 6.0)
    assert split_clips(model).clips == ["clip"]
    for lo, hi in ((0.0, None), (None, None)):  # ReLU and the identity: the rules' own forms
        model = ir.from_proto(conv_clip_conv(lo, hi))
        assert split_clips(model).clips == []
        assert [n.op_type for n in model.graph] == ["Conv", "Clip", "Conv"]


def test_absorb_mode_frees_the_clip_classes() -> None:
    proto = conv_clip_conv()
    assert clip_groups(proto) == {"pinned"}
    model = ir.from_proto(proto)
    split_clips(model)
    assert clip_groups(ir.to_proto(model)) == {"positive"}
    # the Min's bound is a stored tensor that absorbs τ^+1 of the Clip's neurons
    analysis = analyze_model(model)
    (bound,) = [w for w in analysis.weights if w.uses[0].node.op_type == "Min"]
    (factor,) = bound.uses[0].factors
    assert factor.exp == 1
    assert np.array_equal(
        np.sort(factor.ids.reshape(-1)), np.sort(analysis.neurons["a"].reshape(-1))
    )


def test_bound_becomes_six_tau_per_channel() -> None:
    t = teleport(conv_clip_conv(), rescale_clip=True)
    tau = t.tau("a").reshape(-1)
    assert tau.size == C and np.all(tau > 0) and np.ptp(tau) > 0
    (name,) = [n for n in t.w1 if n.startswith("clip_high")]
    np.testing.assert_allclose(t.w1[name].reshape(-1), 6 * tau, rtol=1e-6)
    assert t.rel_err(feeds()) < 1e-5


def test_unscaled_bound_fails_verification() -> None:
    """The check can fail: the same rewrite with the bound left at 6 changes the function."""
    t = teleport(conv_clip_conv(), rescale_clip=True)
    model = t.model
    (high,) = [v for v in model.graph.initializers.values() if v.name.startswith("clip_high")]
    high.const_value = ir.tensor(np.full(high.shape.numpy(), 6.0, np.float32), name=high.name)
    ref, got = run_ort(t.before, feeds())[0], run_ort(model, feeds())[0]
    assert np.max(np.abs(ref - got)) > 1e-3 * np.max(np.abs(ref))


@pytest.mark.parametrize("mode", ["absorb", "insert"])
@pytest.mark.parametrize("exact", [False, True])
def test_conv_clip_conv_verifies(tmp_path: Path, mode: str, exact: bool) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_clip_conv(), src)
    opts = TeleportOptions(seed=3, mode=mode, exact=exact, rescale_clip=True)  # type: ignore[arg-type]
    report = teleport_file(src, tmp_path / "out.onnx", opts)
    js = report.to_json()
    assert js["verification"]["passed"] and js["clips_split"] == 1
    assert js["nodes_added"] == 0  # insert mode too: the bounds carry τ, no Mul pair
    assert js["verification"]["max_abs_err"] == 0 or not exact
    out = weights(onnx.load(tmp_path / "out.onnx"))
    assert any(k.startswith("clip_high") and v.size == C for k, v in out.items())


def test_insert_mode_prefers_the_bounds_to_mul_pairs(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_clip_conv(), src)
    plain = teleport_file(src, tmp_path / "a.onnx", TeleportOptions(seed=0, mode="insert"))
    clip = teleport_file(
        src, tmp_path / "b.onnx", TeleportOptions(seed=0, mode="insert", rescale_clip=True)
    )
    assert plain.inserted.wraps == 1 and plain.inserted.nodes_added == 2
    assert clip.inserted.nodes_added == 0
    assert plain.analysis.free_cofactors == clip.analysis.free_cofactors


def test_torch_refuses_rescale_clip() -> None:
    torch = pytest.importorskip("torch")
    from graphteleport.errors import InputError
    from graphteleport.torch import teleport as torch_teleport

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU6(), torch.nn.Linear(4, 2))
    with pytest.raises(InputError, match="rescale_clip"):
        torch_teleport(net, torch.randn(2, 4), rescale_clip=True)


# -- MobileNetV2 (torch export: BN folded, ReLU6 → Clip, depthwise, inverted residuals) ------


def moved_fraction(path: Path, rescale_clip: bool) -> tuple[float, int]:
    """(fraction of the original float weight elements a random absorb teleport changes,
    free cofactors)."""
    proto = onnx.load(path)
    t = teleport(proto, rescale_clip=rescale_clip)
    changed = total = 0
    for name, w in t.w0.items():
        total += w.size
        w2 = t.w1.get(name)
        if w2 is not None and w2.shape == w.shape:
            changed += int(np.count_nonzero(w2 != w))
    return changed / total, t.result.free_cofactors


@pytest.fixture(scope="module")
def torchvision_mobilenetv2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from models.architectures import build, mobilenetv2
    from models.export import export

    model, shape = build(mobilenetv2, width_mult=0.25, num_classes=10, size=32)
    return export(model, shape, tmp_path_factory.mktemp("mnv2") / "mobilenetv2.onnx")


def test_mobilenetv2_clip_classes_move(torchvision_mobilenetv2: Path) -> None:
    ops = {n.op_type for n in onnx.load(torchvision_mobilenetv2).graph.node}
    assert "Clip" in ops
    before, free_before = moved_fraction(torchvision_mobilenetv2, False)
    after, free_after = moved_fraction(torchvision_mobilenetv2, True)
    assert after > 0.99 and after - before > 0.1  # width 0.25: 0.86 -> 0.999
    assert free_after > 5 * free_before


@pytest.mark.parametrize("mode", ["absorb", "insert"])
def test_mobilenetv2_verifies(torchvision_mobilenetv2: Path, tmp_path: Path, mode: str) -> None:
    opts = TeleportOptions(seed=1, mode=mode, rescale_clip=True, draws=2)  # type: ignore[arg-type]
    report = teleport_file(torchvision_mobilenetv2, tmp_path / "out.onnx", opts)
    js = report.to_json()
    assert js["verification"]["passed"]
    assert js["clips_split"] == sum(
        n.op_type == "Clip" for n in onnx.load(torchvision_mobilenetv2).graph.node
    )
    assert js["nodes_added"] == 0
    assert js["pinned"] and all("not equivariant" not in p["reason"] for p in js["pinned"])


def test_clip_as_graph_output_with_constant_node_bounds() -> None:
    """Bounds from Constant nodes (removed once unread); the Clip's output is the graph's
    output, so its classes stay pinned and the bound stays a scalar."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        const_node("lo", np.float32(-2)),
        const_node("hi", np.float32(2)),
        helper.make_node("Clip", ["h", "lo", "hi"], ["y"], name="clip"),
    ]
    proto = make_model(nodes, {"x": [2, 3, 5, 5]}, {"y": [2, C, 5, 5]}, {"w1": rand((C, 3, 3, 3))})
    t = teleport(proto, rescale_clip=True)
    graph = t.model.graph
    assert [n.op_type for n in graph] == ["Conv", "Max", "Min"]
    assert graph.outputs[0].name == "y" and graph.outputs[0].producer().op_type == "Min"
    assert t.result.clips.removed == ["lo", "hi"]
    assert all(np.asarray(w).size == 1 for k, w in t.w1.items() if k.startswith("clip_"))
    assert np.array_equal(run_ort(proto, feeds())[0], run_ort(t.model, feeds())[0])


@pytest.mark.parametrize(
    ("lo", "hi", "opset"), [(0.0, 6.0, 17), (-1.0, 1.0, 17), (None, 2.0, 17), (0.0, 6.0, 10)]
)
def test_join_undoes_the_split(lo: float | None, hi: float | None, opset: int) -> None:
    proto = conv_clip_conv(lo, hi, opset)
    model = ir.from_proto(proto)
    done = split_clips(model)
    assert done.outputs == ["a"] and done.bounds == [(lo, hi)]
    left = join_clips(model, done, ["a"])
    assert left.clips == [] and left.nodes_added == 0
    assert [n.op_type for n in model.graph] == ["Conv", "Clip", "Conv"]
    assert model.graph.node(1).outputs[0].name == "a"
    assert clip_bounds(model.graph.node(1), opset) == (lo, hi)
    for seed in range(2):
        assert np.array_equal(run_ort(proto, feeds(seed))[0], run_ort(model, feeds(seed))[0])


def test_join_leaves_other_and_rescaled_forms_split() -> None:
    model = ir.from_proto(conv_clip_conv())
    done = split_clips(model)
    assert join_clips(model, done, ["other"]).clips == ["clip"]  # not asked for
    (high,) = [v for v in model.graph.initializers.values() if v.name.startswith("clip_high")]
    high.const_value = ir.tensor(np.full((1, C, 1, 1), 6.0, np.float32), name=high.name)
    left = join_clips(model, done, ["a"])  # the bound took per-channel values: not a Clip
    assert left.clips == ["clip"] and left.nodes_added == 2
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "Min", "Conv"]


def test_equalize_joins_back_the_clips_no_cofactor_moves() -> None:
    """A Clip on the graph's output stays pinned after the split: equalize keeps it a Clip
    (a quantizer fuses it into its producer's range); one between two convs stays split."""
    pinned = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["h", "lo", "hi"], ["y"], name="clip"),
    ]
    inits = {"w1": rand((C, 3, 3, 3)), "lo": np.float32(0), "hi": np.float32(6)}
    proto = make_model(pinned, {"x": [2, 3, 5, 5]}, {"y": [2, C, 5, 5]}, inits)
    model = ir.from_proto(proto)
    result = EqualizePass()(model)
    assert [n.op_type for n in model.graph] == ["Conv", "Clip"] and result.clips.clips == []
    assert np.array_equal(run_ort(proto, feeds())[0], run_ort(model, feeds())[0])
    model = ir.from_proto(conv_clip_conv())
    result = EqualizePass()(model)
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "Min", "Conv"]
    assert result.clips.clips == ["clip"]

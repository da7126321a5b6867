"""``equalize --method auto`` and the INT8 simulation that scores its candidates
(graphteleport.activations.Int8Simulation): the simulation of a rescaled model equals the
simulation of the model at the same cofactors; auto keeps the best-scoring candidate where
the calibration feeds separate it from the data-free default (a bootstrap over the feeds),
and the FP32 function unchanged (bit-identical with --exact)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import max_rel_err, random_feeds, run_ort
from test_equalize import cli
from test_smooth import OUTLIER, calibration, mlp

from graphteleport.activations import Int8Simulation, fake_quant_weight, quantized_operands
from graphteleport.analysis import analyze_model
from graphteleport.errors import InputError
from graphteleport.orbit import movable_pairs
from graphteleport.passes import equalize
from graphteleport.passes.equalize import (
    AUTO_ALPHA,
    AUTO_P,
    DEFAULT_P,
    EqualizePass,
    auto_default,
    effective_feeds,
    significant_best,
)
from graphteleport.passes.teleport import apply_values


def simulation(proto: onnx.ModelProto, ops: tuple[str, ...] | None = None) -> Int8Simulation:
    model = ir.from_proto(proto)
    return Int8Simulation.calibrate(model, analyze_model(model), calibration(), ops)


def test_operands_of_an_mlp() -> None:
    weights, acts = quantized_operands(ir.from_proto(mlp()))
    assert weights == ["w1", "w2"] and acts == ["x", "a"]
    weights, acts = quantized_operands(ir.from_proto(mlp()), ("all",))
    assert weights == ["w1", "w2"] and acts == ["x", "h", "a", "z"]  # not Relu's input hb


def test_fake_quant_weight_levels() -> None:
    w = np.array([[0.5, -1.0], [0.25, 2.0]], np.float32)
    s = np.array([[1.0], [4.0]])  # row 1 scaled by 4: its 2.0 becomes the peak 8.0
    q = fake_quant_weight(w, s)
    levels = np.round(q * s / (8.0 / 127))
    np.testing.assert_allclose(q * s, levels * (8.0 / 127), rtol=1e-6)
    assert abs(levels).max() == 127 and q.dtype == w.dtype


@pytest.mark.parametrize("ops", [None, ("all",)])
def test_simulation_of_a_teleport_is_the_simulation_at_its_cofactors(
    ops: tuple[str, ...] | None,
) -> None:
    """Scoring cofactors τ on the model = scoring the model rescaled by τ as it is."""
    proto = mlp(outlier=20.0)
    model = ir.from_proto(proto)
    analysis = analyze_model(model)
    rng = np.random.default_rng(3)
    values = np.exp(rng.uniform(-1.5, 1.5, analysis.solution.num_pairs))
    values = np.where(movable_pairs(analysis), values, 1.0)
    sim = Int8Simulation.calibrate(model, analysis, calibration(), ops)
    apply_values(model, analysis, values)  # (fits values in place)
    at_tau = sim.sqnr_db(analysis.solution.cofactors(values))
    moved = ir.from_proto(ir.to_proto(model))
    again = Int8Simulation.calibrate(moved, analyze_model(moved), calibration(), ops)
    as_is = again.sqnr_db(np.ones(analysis.solution.num_pairs))
    assert abs(at_tau - as_is) < 0.05, (at_tau, as_is)
    base = simulation(proto, ops).sqnr_db(np.ones(analysis.solution.num_pairs))
    assert abs(at_tau - base) > 0.5  # the cofactors do change the score


def test_auto_picks_the_best_candidate_and_keeps_the_function() -> None:
    proto = mlp(outlier=30.0)
    feeds = random_feeds(proto)
    model = ir.from_proto(proto)
    result = EqualizePass(method="auto", calibration=calibration(16))(model)
    fig = result.figures
    assert fig is not None and fig.method == "auto"
    names = [n for n, _ in fig.candidates]
    assert names == [
        "none",
        *(f"cle p={p:g}" for p in AUTO_P),
        *(f"smooth alpha={a:g}" for a in AUTO_ALPHA),
        *(f"insert cle p={p:g}" for p in AUTO_P),
        "insert noise",
    ]
    scores = {n: db for n, db in fig.candidates if db is not None}
    assert fig.chosen in (max(scores, key=lambda n: scores[n]), auto_default(scores))
    assert fig.chosen != "none" and scores[fig.chosen] > scores["none"] + 3.0  # the outlier
    assert fig.moved > 0
    assert max_rel_err(proto, ir.to_proto(model), feeds) < 1e-5
    hidden = result.pair_values[result.analysis.solution.pair[result.analysis.neurons["a"]]]
    assert hidden.reshape(-1)[OUTLIER] < 1  # the outlier channel's range comes down


def test_auto_exact_is_bit_identical() -> None:
    proto = mlp(outlier=30.0)
    feeds = random_feeds(proto)
    model = ir.from_proto(proto)
    result = EqualizePass(method="auto", exact=True, calibration=calibration())(model)
    assert result.figures is not None and result.figures.moved > 0
    for x, y in zip(run_ort(proto, feeds), run_ort(ir.to_proto(model), feeds), strict=True):
        assert np.array_equal(x, y)


def test_auto_leaves_a_balanced_model_alone_when_nothing_scores_better() -> None:
    """Every candidate is scored; the choice is the best one or, where the calibration
    feeds do not separate it from the default, the default; nothing moves for ``none``."""
    proto = mlp()
    model = ir.from_proto(proto)
    result = EqualizePass(method="auto", calibration=calibration())(model)
    fig = result.figures
    assert fig is not None
    scores = dict(fig.candidates)
    best = max(db for db in scores.values() if db is not None)
    assert scores[fig.chosen] == best or fig.chosen == auto_default(scores)
    if fig.chosen == "none":
        assert fig.moved == 0


def spread(n: int, level: float, rng: np.random.Generator) -> np.ndarray:
    return level * rng.uniform(0.5, 1.5, n)


def test_significant_best_keeps_a_clear_winner() -> None:
    rng = np.random.default_rng(0)
    signal = np.ones(32)
    noises = [("none", spread(32, 4.0, rng)), ("cle p=3", spread(32, 2.0, rng))]
    noises += [("cle p=2", spread(32, 1.0, rng)), ("cle p=8", None)]
    assert significant_best(signal, noises, "cle p=3") == ("cle p=2", 1.0)
    assert significant_best(signal, noises, "cle p=2") == ("cle p=2", 1.0)


def test_significant_best_needs_the_noise_spread_over_feeds() -> None:
    """Better in every feed, but one feed holds nearly all the noise: not kept."""
    signal = np.ones(32)
    default = np.r_[1000.0, np.ones(31)]
    better = 0.5 * default
    noises = [("cle p=3", default), ("cle p=2", better)]
    assert effective_feeds(default) < 2 and effective_feeds(np.ones(32)) == 32
    assert significant_best(signal, noises, "cle p=3") == ("cle p=3", 1.0)
    assert significant_best(signal, noises, "cle p=3", min_feeds=1) == ("cle p=2", 1.0)


def test_auto_can_choose_an_insert_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    """An insert-mode choice is applied in insert mode: Mul nodes around the Tanh, the
    function unchanged (the rule forced to pick it: the plumbing, not the choice)."""
    proto = mlp(outlier=30.0)
    for node in proto.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Tanh"
    monkeypatch.setattr(
        equalize, "significant_best", lambda signal, noises, default: ("insert cle p=3", 0.0)
    )
    model = ir.from_proto(proto)
    result = EqualizePass(method="auto", calibration=calibration())(model)
    assert result.figures is not None and result.figures.chosen == "insert cle p=3"
    assert result.options.mode == "insert"
    assert sum(n.op_type == "Mul" for n in model.graph) == 2
    assert max_rel_err(proto, ir.to_proto(model), random_feeds(proto)) < 1e-5


def test_auto_default_is_insert_cle_where_its_balance_converged() -> None:
    p3 = f"cle p={DEFAULT_P:g}"
    assert auto_default(["none", p3, "smooth alpha=0.5", f"insert {p3}"]) == f"insert {p3}"
    assert auto_default(["none", p3, "insert cle p=2"]) == p3
    assert auto_default(["none", "cle p=2"]) == "none"


def tanh_mlp() -> onnx.ModelProto:
    """:func:`test_smooth.mlp` with its Relu a Tanh: absorb mode pins the hidden classes,
    insert mode frees them (a ``Mul`` either side)."""
    proto = mlp(outlier=30.0)
    for node in proto.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Tanh"
    return proto


def test_auto_hands_the_insert_default_to_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule is given insert cle p=3 as the default and, where it keeps the default,
    the model is rewritten in insert mode (the Muls inserted, the function unchanged);
    where insert's balance did not converge the default is absorb mode's cle p=3."""
    seen: list[str] = []

    def keep_default(signal: object, noises: object, default: str) -> tuple[str, float]:
        seen.append(default)
        return default, 1.0

    monkeypatch.setattr(equalize, "significant_best", keep_default)
    proto = tanh_mlp()
    model = ir.from_proto(proto)
    result = EqualizePass(method="auto", calibration=calibration())(model)
    assert seen == [f"insert cle p={DEFAULT_P:g}"]
    assert result.figures is not None and result.figures.chosen == seen[0]
    assert result.options.mode == "insert" and sum(n.op_type == "Mul" for n in model.graph) == 2
    assert max_rel_err(proto, ir.to_proto(model), random_feeds(proto)) < 1e-5

    real = equalize.insert_candidates

    def unconverged_p3(*args: object) -> object:
        for name, choice, noise in real(*args):  # type: ignore[arg-type]
            yield (name, None, None) if name == seen[0] else (name, choice, noise)

    monkeypatch.setattr(equalize, "insert_candidates", unconverged_p3)
    result = EqualizePass(method="auto", calibration=calibration())(ir.from_proto(proto))
    assert seen[1] == f"cle p={DEFAULT_P:g}" and result.options.mode == "absorb"


@pytest.mark.parametrize("name", ["insert cle p=3", "smooth alpha=0.25", "none"])
def test_one_candidate_alone_is_the_model_auto_writes_for_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``candidates=[name]`` computes that candidate only and keeps it: the same model and
    score as a full ``auto`` run made to pick it."""
    proto = tanh_mlp()
    alone = ir.from_proto(proto)
    fig = EqualizePass(method="auto", calibration=calibration(), candidates=[name])(alone).figures
    assert fig is not None and fig.chosen == name and [n for n, _ in fig.candidates] == [name]
    monkeypatch.setattr(equalize, "significant_best", lambda signal, noises, default: (name, 1.0))
    full = ir.from_proto(proto)
    every = EqualizePass(method="auto", calibration=calibration())(full).figures
    assert every is not None and every.chosen == name
    assert dict(every.candidates)[name] == pytest.approx(fig.candidates[0][1], abs=1e-9)
    a, b = ir.to_proto(alone), ir.to_proto(full)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert x.name == y.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))


def test_auto_candidates_are_checked() -> None:
    with pytest.raises(InputError, match="--auto-candidates must name"):
        EqualizePass(method="auto", calibration=calibration(), candidates=["cle p=5"])
    with pytest.raises(InputError, match="for --method auto"):
        EqualizePass(method="cle", candidates=["none"])


def test_significant_best_keeps_the_default_when_one_feed_decides() -> None:
    """The best pooled score comes from one feed carrying most of the noise: without it
    the best loses, so it wins only in the resamplings that draw that feed."""
    signal = np.ones(32)
    default = np.r_[100.0, np.ones(31)]
    lucky = np.r_[50.0, np.full(31, 1.2)]  # less noise in all (87.2 vs 131), more in 31 feeds
    noises = [("none", default * 2), ("cle p=3", default), ("smooth alpha=0.25", lucky)]
    name, share = significant_best(signal, noises, "cle p=3")
    assert name == "cle p=3" and 0.5 < share < 0.8  # ≈ 1 − (31/32)^32 = 0.64
    kept = significant_best(signal, noises, "cle p=3", level=0.5, min_feeds=1)
    assert kept == ("smooth alpha=0.25", share)
    assert significant_best(signal, noises, "cle p=3") == (name, share)  # seeded: repeatable


def test_auto_refuses_insert_mode_and_missing_calibration() -> None:
    with pytest.raises(InputError, match="chooses the mode itself"):
        EqualizePass(method="auto", mode="insert", calibration=calibration())
    with pytest.raises(InputError, match="--calibration"):
        EqualizePass(method="auto")
    with pytest.raises(InputError, match="--int8-ops"):
        EqualizePass(method="auto", calibration=calibration(), int8_ops=["Conv;"])


def feeds_archive(model: Path, path: Path, samples: int = 3) -> Path:
    """``samples`` random feeds of ``model``, stacked into an ``.npz`` at ``path``."""
    proto = onnx.load(model)
    drawn = [random_feeds(proto, seed=k) for k in range(samples)]
    np.savez(path, **{n: np.stack([d[n] for d in drawn]) for n in drawn[0]})
    return path


def test_cli_auto(fixtures_dir: Path, tmp_path: Path) -> None:
    src = fixtures_dir / "resnet_tiny.onnx"
    feeds = feeds_archive(src, tmp_path / "feeds.npz")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    args = ["--method", "auto", "--calibration", feeds]
    code, _, stderr = cli("equalize", src, "-o", out, "--report", rep, *args, "--int8-ops", "all")
    assert code == 0, stderr
    report = json.loads(rep.read_text())
    assert report["verification"]["passed"]
    eq = report["equalize"]
    assert eq["method"] == "auto" and len(eq["candidates"]) == 2 + 2 * len(AUTO_P) + len(AUTO_ALPHA)
    scored = [db for _, db in eq["candidates"] if db is not None]
    chosen = dict(map(tuple, eq["candidates"]))[eq["chosen"]]
    assert chosen == max(scored) or eq["chosen"] == f"insert cle p={DEFAULT_P:g}"
    code, _, stderr = cli("equalize", src, "-o", tmp_path / "x.onnx", *args, "--mode", "insert")
    assert code == 2 and "chooses the mode itself" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
    one = ["--auto-candidates", "cle p=2", "--report", tmp_path / "one.json"]
    code, _, stderr = cli("equalize", src, "-o", tmp_path / "one.onnx", *args, *one)
    assert code == 0, stderr
    eq = json.loads((tmp_path / "one.json").read_text())["equalize"]
    assert eq["chosen"] == "cle p=2" and [n for n, _ in eq["candidates"]] == ["cle p=2"]
    bad = ["--auto-candidates", "cle p=5"]
    code, _, stderr = cli("equalize", src, "-o", tmp_path / "x.onnx", *args, *bad)
    assert code == 2 and "--auto-candidates must name" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()


def dynamic_hardswish_cnn() -> onnx.ModelProto:
    """Conv → hardswish → Conv on an input ``[n, 3, h, w]`` with symbolic sizes (like the
    rapidocr classifier's ``[None, 3, ?, ?]``); one channel of the first conv 10x wider."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hardswish = [
        helper.make_node("Add", ["h", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
        helper.make_node("Mul", ["h", "c"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["g"]),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
        *hardswish,
        helper.make_node("Conv", ["g", "w2", "b2"], ["y"]),
    ]
    wide = np.r_[10.0, np.ones(7)][:, None, None, None]
    arrays = {
        "w1": rng.normal(size=(8, 3, 3, 3)) * wide, "b1": rng.normal(size=8),
        "w2": rng.normal(size=(4, 8, 1, 1)), "b2": rng.normal(size=4),
        "three": np.array(3.0), "zero": np.array(0.0), "six": np.array(6.0),
    }  # fmt: skip
    graph = helper.make_graph(
        nodes, "dynamic_hardswish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
    )  # fmt: skip
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_auto_analyses_symbolic_inputs_at_the_calibration_shapes() -> None:
    """Without ``input_shapes`` the pass takes a symbolic input's shape from the first
    calibration feed, so it analyses (and scores) the model the CLI analyses: on the
    rapidocr classifier the Python pass without shapes built another insert candidate
    (23.16 dB simulated against the CLI's 58.03 dB).  Without the shapes the analysis
    ties the first conv's 8 channels into one class."""
    proto = dynamic_hardswish_cnn()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)} for _ in range(4)]
    # the analysis itself sizes open axes as the CLI does (complete_input_shapes; the
    # coarse analysis, 8 channels in one class, was 7 pairs against 21)
    sized = analyze_model(ir.from_proto(proto), {}, "absorb").solution.num_pairs
    fine = analyze_model(ir.from_proto(proto), {"x": (1, 3, 6, 6)}, "absorb").solution.num_pairs
    assert sized == fine
    runs = []
    for shapes in (None, {"x": (1, 3, 6, 6)}):
        model = ir.from_proto(proto)
        result = EqualizePass(method="auto", calibration=feeds, input_shapes=shapes)(model)
        assert result.figures is not None
        weights = {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}  # type: ignore[union-attr]
        runs.append((result.figures.candidates, result.figures.chosen, weights))
    (cands, chosen, weights), (cands2, chosen2, weights2) = runs
    assert cands == cands2 and chosen == chosen2
    assert weights.keys() == weights2.keys()
    assert all(np.array_equal(weights[n], weights2[n]) for n in weights)


def clip_tanh_mlp() -> onnx.ModelProto:
    """:func:`test_smooth.mlp` with ``Clip(0, 6) → Tanh`` for its Relu: absorb mode pins
    the Clip's neurons (the Tanh after it), so auto joins the split Clip back; insert mode
    frees them."""
    proto = mlp(outlier=30.0)
    nodes = list(proto.graph.node)
    k = next(i for i, n in enumerate(nodes) if n.op_type == "Relu")
    clip = onnx.helper.make_node("Clip", ["hb", "lo", "hi"], ["c"])
    nodes[k : k + 1] = [clip, onnx.helper.make_node("Tanh", ["c"], ["a"])]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    for name, v in (("lo", 0.0), ("hi", 6.0)):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(v, np.float32), name))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_auto_noise_candidate_is_the_model_method_noise_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """auto's ``insert noise`` refines the graph with every Clip split (those joined back
    split again), as ``--method noise --mode insert`` does: the same model (bit-identical
    outputs, the same ops, no Clip left) and the score it was chosen by is that model's
    simulated score."""
    proto = clip_tanh_mlp()
    monkeypatch.setattr(
        equalize, "significant_best", lambda signal, noises, default: ("insert noise", 1.0)
    )
    auto = ir.from_proto(proto)
    names = ("insert cle p=3", "insert noise")
    fig = EqualizePass(method="auto", calibration=calibration(), candidates=names)(auto).figures
    assert fig is not None and fig.chosen == "insert noise"
    noise = ir.from_proto(proto)
    EqualizePass(method="noise", mode="insert", p=3, calibration=calibration())(noise)
    a, b = ir.to_proto(auto), ir.to_proto(noise)
    assert sorted(n.op_type for n in a.graph.node) == sorted(n.op_type for n in b.graph.node)
    assert "Clip" not in {n.op_type for n in a.graph.node}
    feeds = random_feeds(proto)
    for x, y in zip(run_ort(a, feeds), run_ort(b, feeds), strict=True):
        np.testing.assert_array_equal(x, y)
    assert max_rel_err(proto, a, feeds) < 1e-5
    written = ir.from_proto(a)
    analysis = analyze_model(written)
    sim = Int8Simulation.calibrate(written, analysis, calibration(), None)
    score = sim.sqnr_db(np.ones(analysis.solution.num_pairs))
    assert dict(fig.candidates)["insert noise"] == pytest.approx(score, abs=1e-5)

"""The predicted-noise objective (graphteleport.quantnoise): its statistics, its model
of a site's noise, its gradient, and the cofactors it chooses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import max_rel_err, random_feeds
from test_smooth import calibration, mlp

from graphteleport.activations import Int8Simulation
from graphteleport.analysis import analyze_model
from graphteleport.orbit import movable_pairs
from graphteleport.passes.teleport import apply_values
from graphteleport.quantnoise import (
    NoiseObjective,
    Site,
    activation_sites,
    lbfgs,
    noise_values,
    stored_sites,
)


def sites_of(proto: onnx.ModelProto) -> tuple[ir.Model, object, list[Site]]:
    model = ir.from_proto(proto)
    analysis = analyze_model(model)
    feeds = calibration(8)
    sites = stored_sites(model, analysis, ("all",)) + activation_sites(
        model, analysis, feeds, ("all",)
    )
    return model, analysis, sites


def test_sites_and_their_statistics_match_numpy() -> None:
    proto = mlp(outlier=20.0)
    _, analysis, sites = sites_of(proto)
    by = {s.name: s for s in sites}
    # x (graph input) and z (before the graph output's Add) stay where they are: no
    # movable pair reaches them; hb is Relu's input, fused by the quantizer; the Add's b1
    # is a constant input of a quantized op (UINT8, like an activation)
    assert set(by) == {"w1", "w2", "b1", "h", "a"}
    assert by["b1"].kind == "constant" and by["b1"].levels == 255
    w = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer}
    h = np.concatenate([f["x"].astype(np.float64) @ w["w1"] for f in calibration(8)])
    np.testing.assert_allclose(by["h"].hi, np.maximum(h, 0).max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(by["h"].lo, np.maximum(-h, 0).max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(by["h"].count, np.full(h.shape[1], h.shape[0]))
    assert by["h"].signal == pytest.approx(float(np.sum(h * h)), rel=1e-5)
    assert by["w1"].levels == 127 and by["h"].levels == 255
    assert by["w1"].signal == pytest.approx(float(np.sum(w["w1"] ** 2)))
    np.testing.assert_allclose(by["w1"].lo, 0.0)  # symmetric: |W| in hi
    assert analysis is not None


def exact_ratio(w: np.ndarray, s: np.ndarray, levels: int) -> float:
    """``R = Δ²/12 · Σ_e S_e^{-2} / Σ W²`` of a symmetric site, by its definition."""
    step = np.max(np.abs(w * s)) / levels
    return float(step**2 / 12 * np.sum(s**-2.0) / np.sum(w**2))


def test_a_sites_ratio_is_its_definition_and_scale_invariant() -> None:
    """One weight [3, 4] whose rows scale by pair 0..2 and columns by 1/pair 3..6: the
    objective's R (sharp power mean) is the direct formula, and scaling the whole site
    leaves it unchanged."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 4))
    rows = np.concatenate([np.arange(12), np.arange(12)])
    cols = np.concatenate([np.repeat(np.arange(3), 4), 3 + np.tile(np.arange(4), 3)])
    coef = np.concatenate([np.ones(12), -np.ones(12)])
    hi = np.abs(w).reshape(-1)
    site = Site("w", "weight", 127, hi, np.zeros(12), np.ones(12), float(np.sum(w**2)),
                rows, cols, coef)  # fmt: skip
    obj = NoiseObjective([site], 7, p=400.0)
    u = rng.normal(size=7) * 0.5
    s = np.exp(u[:3])[:, None] * np.exp(-u[3:])[None, :]
    assert obj.per_site(u)[0] == pytest.approx(exact_ratio(w, s, 127), rel=1e-2)
    shifted = u + np.r_[np.full(3, 0.7), np.zeros(4)]  # every row x e^0.7: the whole site
    assert obj.per_site(shifted)[0] == pytest.approx(obj.per_site(u)[0], rel=1e-9)


def test_gradient_matches_finite_differences() -> None:
    _, analysis, sites = sites_of(mlp(outlier=20.0))
    n = analysis.solution.num_pairs  # type: ignore[attr-defined]
    obj = NoiseObjective(sites, n)
    rng = np.random.default_rng(2)
    u = rng.normal(size=n) * 0.3
    f, g = obj.value_and_gradient(u)
    d = rng.normal(size=n)
    eps = 1e-6
    numeric = (obj.value_and_gradient(u + eps * d)[0] - obj.value_and_gradient(u - eps * d)[0]) / (
        2 * eps
    )
    assert numeric == pytest.approx(float(g @ d), rel=1e-5)
    assert f == pytest.approx(float(obj.per_site(u).sum()))


def test_lbfgs_finds_a_quadratics_minimum() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(6, 6))
    h = a @ a.T + np.eye(6)
    b = rng.normal(size=6)

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        return float(0.5 * x @ h @ x - b @ x), h @ x - b

    x, iterations = lbfgs(fun, np.zeros(6))
    np.testing.assert_allclose(x, np.linalg.solve(h, b), rtol=1e-6, atol=1e-8)
    assert 0 < iterations < 100


def test_noise_values_lower_the_predicted_and_simulated_noise_and_keep_the_function() -> None:
    proto = mlp(outlier=30.0)
    feeds = random_feeds(proto)
    model = ir.from_proto(proto)
    analysis = analyze_model(model)
    values, figures = noise_values(model, analysis, calibration(8))
    assert figures["objective_after"] < 0.5 * figures["objective_before"]
    assert np.all(values[~movable_pairs(analysis)] == 1.0)
    sim = Int8Simulation.calibrate(model, analysis, calibration(8), ("all",))
    before = sim.sqnr_db(np.ones(analysis.solution.num_pairs))
    after = sim.sqnr_db(analysis.solution.cofactors(values))
    assert after > before + 3.0, (before, after)
    apply_values(model, analysis, values)
    assert max_rel_err(proto, ir.to_proto(model), feeds) < 1e-5


@pytest.mark.parametrize("mode", ["absorb", "insert"])
def test_method_noise_keeps_the_function_and_beats_the_model_as_is(mode: str) -> None:
    """``equalize --method noise``: on the MLP with an outlier channel (absorb mode), and on
    its Tanh form in insert mode, whose hidden classes absorb mode pins and the start's
    Muls free: the function is unchanged and the simulated INT8 model (every op
    quantized) scores above the model as is."""
    from test_equalize_auto import tanh_mlp

    from graphteleport.passes.equalize import EqualizePass

    proto = tanh_mlp() if mode == "insert" else mlp(outlier=30.0)
    feeds = random_feeds(proto)
    model = ir.from_proto(proto)
    result = EqualizePass(method="noise", mode=mode, calibration=calibration(8))(model)  # type: ignore[arg-type]
    assert result.modified
    assert max_rel_err(proto, ir.to_proto(model), feeds) < 1e-5
    if mode == "insert":
        assert result.inserted.nodes_added > 0 and result.options.mode == "insert"

    def simulated(p: onnx.ModelProto) -> float:
        m = ir.from_proto(p)
        a = analyze_model(m)
        sim = Int8Simulation.calibrate(m, a, calibration(8), ("all",))
        return sim.sqnr_db(np.ones(a.solution.num_pairs))

    assert simulated(ir.to_proto(model)) > simulated(proto) + 3.0


def test_method_noise_leaves_a_model_with_nothing_movable() -> None:
    from test_equalize_auto import tanh_mlp

    model = ir.from_proto(tanh_mlp())
    values, figures = noise_values(model, analyze_model(model), calibration(2))
    assert np.all(values == 1.0) and figures["sites"] == 0


def test_method_noise_needs_calibration() -> None:
    from graphteleport.errors import InputError
    from graphteleport.passes.equalize import EqualizePass

    with pytest.raises(InputError, match="calibration"):
        EqualizePass(method="noise")


def test_cli_noise_insert(fixtures_dir: Path, tmp_path: Path) -> None:
    """``graphteleport equalize --method noise --mode insert``: verified, reported as the
    pass's insert mode; without calibration one line and exit 2, no file."""
    from test_equalize import cli
    from test_equalize_auto import feeds_archive

    src = fixtures_dir / "resnet_tiny.onnx"
    feeds = feeds_archive(src, tmp_path / "feeds.npz")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    args = ["--method", "noise", "--mode", "insert", "--int8-ops", "all"]
    code, stdout, stderr = cli(
        "equalize", src, "-o", out, "--report", rep, *args, "--calibration", feeds
    )
    assert code == 0, stderr
    report = json.loads(rep.read_text())
    assert report["verification"]["passed"] and report["equalize"]["method"] == "noise"
    assert "method noise (p=3)" in stdout
    code, _, stderr = cli("equalize", src, "-o", tmp_path / "x.onnx", *args)
    assert code == 2 and "needs calibration" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()


def test_auto_can_choose_the_noise_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``auto`` keeps ``insert noise`` the pass redoes the refinement on the model:
    the Muls are inserted, the function is unchanged, and the written model simulates
    at the candidate's calibration score."""
    from test_equalize_auto import tanh_mlp

    from graphteleport.passes import equalize
    from graphteleport.passes.equalize import NOISE_CANDIDATE, EqualizePass

    def pick_noise(signal: object, noises: object, default: str) -> tuple[str, float]:
        return NOISE_CANDIDATE, 1.0

    monkeypatch.setattr(equalize, "significant_best", pick_noise)
    proto = tanh_mlp()
    feeds = random_feeds(proto)
    model = ir.from_proto(proto)
    cal = calibration(8)
    result = EqualizePass(method="auto", calibration=cal, int8_ops=("all",))(model)
    fig = result.figures
    assert fig is not None and fig.chosen == NOISE_CANDIDATE
    assert result.inserted.nodes_added > 0 and result.options.mode == "insert"
    assert max_rel_err(proto, ir.to_proto(model), feeds) < 1e-5
    written = ir.from_proto(ir.to_proto(model))
    plain = analyze_model(written)
    score = Int8Simulation.calibrate(written, plain, cal, ("all",)).sqnr_db(
        np.ones(plain.solution.num_pairs)
    )
    assert score == pytest.approx(dict(fig.candidates)[NOISE_CANDIDATE], abs=1e-6)


def test_the_documents_section_renders_the_results() -> None:
    from experiments.quant_noise import section

    assert "not run" in section({})
    row = {
        "sqnr_db": 12.345,
        "metric": 96.875,
        "fp32_rel_err": 7.9e-4,
        "predicted": {"total": 0.07, "by_kind": {"weight": 0.03, "activation": 0.04},
                      "top": [{"site": "w9", "kind": "weight", "r": 0.005}]},
    }  # fmt: skip
    text = section({"start": row, "refined": row, "meta": {"p": 4, "held_back": 128}})
    assert "| + noise objective | 12.35 | 96.9 | 7.9e-04 | 0.03 / 0.04 / 0 (0.07) |" in text
    assert "`w9` (weight, 0.005)" in text and "128 held-back lines" in text


def test_a_shared_constants_use_at_scale_one_keeps_the_original() -> None:
    """A constant shared by two uses, the first stored broadcast-expanded (its ``S``
    varies per channel), the second at ``S = 1`` exactly (powers of two): the second
    gets a copy of the original, not the first's expansion under the shared name (the
    rapidocr classifier's ``+3`` of two hardswish blocks of different widths, insert
    mode with powers of two: the model did not load)."""
    from types import SimpleNamespace

    from graphteleport.rewrite import _pend

    w = np.array(3.0, np.float32)
    first, second = SimpleNamespace(source="c"), SimpleNamespace(source="c")
    per_channel = np.exp2(np.arange(8.0)).reshape(1, 8, 1, 1)
    scales = [([first], per_channel), ([second], np.ones(()))]
    out, _ = _pend(w, (first, second), scales, True, 1.0)  # type: ignore[arg-type]
    assert out.new is not None and np.shape(out.new) == (1, 8, 1, 1)
    assert [(use, np.asarray(v).tolist()) for use, v in out.copies] == [(second, 3.0)]
    same = [([first], per_channel), ([second], per_channel)]
    assert _pend(w, (first, second), same, True, 1.0)[0].copies == []  # type: ignore[arg-type]


def test_the_simulation_quantizes_the_other_ops_stored_inputs() -> None:
    """With every op type quantized, the Adds' stored ``b1``, ``b2`` are simulated as
    onnxruntime's QDQ quantizer stores them: UINT8 per tensor over ``[min(c, 0),
    max(c, 0)]``."""
    from graphteleport.activations import fake_quant_constant

    model = ir.from_proto(mlp(outlier=20.0))
    analysis = analyze_model(model)
    assert set(Int8Simulation.calibrate(model, analysis, calibration(2), ("all",)).constants) == {
        "b1",
        "b2",
    }
    assert not Int8Simulation.calibrate(model, analysis, calibration(2)).constants
    c = np.array([-1.0, 0.3, 2.0], np.float32)
    s = np.array([1.0, 2.0, 1.0])
    q = fake_quant_constant(c, s)
    step = (2.0 - (-1.0)) / 255  # c·s spans [-1, 2]
    grid = (q * s - (-1.0)) / step
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-4)
    assert np.max(np.abs(q - c) * s) <= step / 2 + 1e-6 and q.dtype == c.dtype

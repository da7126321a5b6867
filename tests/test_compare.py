"""``graphteleport compare``: a model and its teleports are "same" with the drawn cofactors
recovered; a model after an SGD step is "different", naming the weights and classes that
moved; different graphs are bad input (exit 2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import FIXTURE_NAMES, ExportCache, Teleported, gemm_mlp, teleport

from graphteleport.analysis import AnalysisResult, analyze_model
from graphteleport.cli import main
from graphteleport.compare import Comparison, compare_files, compare_models, normal_system
from graphteleport.errors import InputError
from graphteleport.orbit import OrbitTerms

REL = 1e-4
SEEDS = (0, 1, 2)


def _compare(t: Teleported) -> Comparison:
    return compare_models(ir.from_proto(t.before), t.model)


def _check_recovered(t: Teleported, c: Comparison) -> None:
    """Same, and every free pair's recovered value is the drawn one (rel 1e-4)."""
    assert c.same, "\n".join(c.misfit_weights)
    assert c.max_residual < 1e-5
    free = t.solution.free
    assert c.undetermined == 0
    drawn, got = t.result.pair_values[free], c.pair_values[free]
    np.testing.assert_allclose(got, drawn, rtol=REL)


def _sgd_step(proto: onnx.ModelProto, lr: float = 1e-3, seed: int = 0) -> ir.Model:
    """The model after one step ``W − lr·g`` on every float weight of rank ≥ 1, with a
    random gradient ``g`` (standard normal)."""
    model = ir.from_proto(proto)
    rng = np.random.default_rng(seed)
    for v in model.graph.initializers.values():
        assert v.const_value is not None
        a = v.const_value.numpy()
        if a.dtype.kind == "f" and a.ndim >= 1:
            g = rng.standard_normal(a.shape)
            v.const_value = ir.tensor((a - lr * g).astype(a.dtype), name=v.name)
    return model


# -- same ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["intra_landscape", "inter_landscape"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_teleports_are_same(fixtures_dir: Path, name: str, sampling: str) -> None:
    proto = onnx.load(fixtures_dir / f"{name}.onnx")
    for seed in SEEDS:
        t = teleport(proto, seed=seed, sampling=sampling, cob_range=0.9)
        _check_recovered(t, _compare(t))


@pytest.mark.parametrize("arch", ["transformer_mlp", "resnet18", "cnn1d"])
def test_architecture_teleports_are_same(exported: ExportCache, arch: str) -> None:
    """transformer_mlp has sign-group pairs (odd activations): inter_landscape draws
    negative cofactors there, which the sign peeling must recover."""
    proto = onnx.load(exported(arch))
    negatives = 0
    for seed in SEEDS:
        t = teleport(proto, seed=seed, sampling="inter_landscape", cob_range=0.9)
        negatives += int((t.free_values < 0).sum())
        _check_recovered(t, _compare(t))
    if arch == "transformer_mlp":
        assert negatives > 0


@pytest.mark.parametrize("hf", ["bert", "gpt2_init"])
def test_hf_teleports_are_same(tmp_path: Path, hf: str) -> None:
    """gpt2_init's exporter shares uniform weights by accident: the teleport writes
    private copies, which compare reads through each use's node."""
    pytest.importorskip("transformers")
    pytest.importorskip("onnxscript")
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from models.hf import export_entry

    proto = onnx.load(export_entry(hf, tmp_path / f"{hf}.onnx"))
    for seed in SEEDS[:2]:
        t = teleport(proto, seed=seed, sampling="inter_landscape")
        assert (t.free_values < 0).any()
        assert bool(t.result.stats.copies) == (hf == "gpt2_init")
        _check_recovered(t, _compare(t))


def test_exact_teleport_has_no_residual(fixtures_dir: Path) -> None:
    t = teleport(onnx.load(fixtures_dir / "resnet_tiny.onnx"), seed=5, exact=True)
    c = _compare(t)
    _check_recovered(t, c)
    assert c.max_residual < 1e-12


def test_model_is_same_as_itself(fixtures_dir: Path) -> None:
    proto = onnx.load(fixtures_dir / "mlp_small.onnx")
    c = compare_models(ir.from_proto(proto), ir.from_proto(proto))
    assert c.same and c.max_residual == 0.0
    np.testing.assert_array_equal(c.pair_values, 1.0)


# -- the normal products -------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_kernel_normal_products_equal_rows(fixtures_dir: Path, name: str) -> None:
    """The orbit kernel's ``AᵀWA v`` (its Hessian at ``u = 0`` with ``Q = w``) is the
    row-wise ``Aᵀ(w ⊙ A v)`` on random weights and vectors; its preconditioner (the
    rank-one one, by Woodbury) is symmetric positive definite on the active pairs."""
    analysis = analyze_model(ir.from_proto(onnx.load(fixtures_dir / f"{name}.onnx")), None)
    terms = OrbitTerms.build(analysis, p=1.0)
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 2.0, terms.q.size) * (rng.random(terms.q.size) > 0.1)
    kernel, diag, precondition = normal_system(terms, w, "kernel")
    rows, diag_rows, jacobi = normal_system(terms, w, "rows")
    np.testing.assert_array_equal(diag, diag_rows)
    active = terms.movable & (diag > 0)
    assert active.any()
    for _ in range(3):
        v = np.where(active, rng.standard_normal(terms.num_pairs), 0.0)
        np.testing.assert_allclose(kernel(v)[active], rows(v)[active], rtol=1e-10, atol=1e-12)
    r, s = (np.where(active, rng.standard_normal(terms.num_pairs), 0.0) for _ in range(2))
    assert r @ precondition(s) == pytest.approx(s @ precondition(r), rel=1e-10)
    for _ in range(5):
        r = np.where(active, rng.standard_normal(terms.num_pairs), 0.0)
        assert r @ precondition(r) > 0 and r @ jacobi(r) > 0


@pytest.mark.parametrize("name", ["resnet_tiny", "mlp_small"])
def test_products_give_the_same_comparison(fixtures_dir: Path, name: str) -> None:
    """Kernel and row-wise products: the same verdicts, cofactors and misfits, for a
    teleport and for an SGD step."""
    proto = onnx.load(fixtures_dir / f"{name}.onnx")
    t = teleport(proto, seed=3)
    for b in (t.model, _sgd_step(proto)):
        kernel, rows = (
            compare_models(ir.from_proto(proto), b, products=k) for k in ("kernel", "rows")
        )
        assert kernel.same == rows.same == (b is t.model)
        assert kernel.misfit_weights == rows.misfit_weights
        assert [k.pair for k in kernel.misfit_classes] == [k.pair for k in rows.misfit_classes]
        np.testing.assert_allclose(kernel.pair_values, rows.pair_values, rtol=1e-6)
        if b is t.model:
            _check_recovered(t, kernel)
    with pytest.raises(ValueError, match="products"):
        compare_models(ir.from_proto(proto), t.model, products="dense")


# -- different -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_sgd_step_is_different(fixtures_dir: Path, name: str) -> None:
    proto = onnx.load(fixtures_dir / f"{name}.onnx")
    c = compare_models(ir.from_proto(proto), _sgd_step(proto))
    assert not c.same
    assert c.misfit_weights and c.misfit_classes
    assert all(k.block for k in c.misfit_classes)  # each class named by its layer
    assert c.max_residual > 1e-4


def test_change_no_cofactor_touches_is_named(fixtures_dir: Path) -> None:
    """The output layer's bias scales with pinned neurons only: a change there is a misfit
    weight with no class to blame, the teleport elsewhere recovered."""
    proto = onnx.load(fixtures_dir / "mlp_small.onnx")
    t = teleport(proto, seed=4)
    analysis = t.result.analysis
    last = analysis.weights[-1]
    assert not _pairs_of(analysis, last.name)
    v = last.source.stored
    assert v.const_value is not None
    v.const_value = ir.tensor(v.const_value.numpy() * np.float32(1.001), name=v.name)
    c = _compare(t)
    assert not c.same
    assert c.misfit_weights == [last.name] and c.misfit_classes == []
    free = t.solution.free
    np.testing.assert_allclose(c.pair_values[free], t.result.pair_values[free], rtol=REL)


def test_teleported_sgd_step_is_different(fixtures_dir: Path) -> None:
    """A teleport of the stepped model is still not the original teleported."""
    proto = onnx.load(fixtures_dir / "resnet_tiny.onnx")
    stepped = ir.to_proto(_sgd_step(proto))
    t = teleport(stepped, seed=2)
    assert not compare_models(ir.from_proto(proto), t.model).same


def _pairs_of(analysis: AnalysisResult, name: str) -> set[int]:
    """The free pairs a weight's elements scale with."""
    weight = analysis.weight_named(name)
    assert weight is not None
    free = analysis.solution.free
    pairs = {
        int(p)
        for u in weight.uses
        for f in u.factors
        for p in analysis.solution.pair[f.ids].ravel()
    }
    return {p for p in pairs if free[p]}


def test_one_changed_weight_is_named(fixtures_dir: Path) -> None:
    """One weight moved: it has the largest residual and is named; the misfit reaches at
    most the weights sharing a class with it (a least-squares fit may explain part of the
    change by rescaling those classes), and the classes named are among its own; every
    pair it does not touch is recovered as drawn."""
    proto = onnx.load(fixtures_dir / "resnet_tiny.onnx")
    t = teleport(proto, seed=1)
    name = "2.branch.0.0.weight"
    v = t.model.graph.initializers[name]
    assert v.const_value is not None
    a = v.const_value.numpy()
    a = a + np.float32(1e-3) * np.random.default_rng(0).standard_normal(a.shape).astype(a.dtype)
    v.const_value = ir.tensor(a, name=name)
    c = _compare(t)
    assert not c.same
    assert max(c.weights, key=lambda w: w.max_residual).name == name
    analysis = t.result.analysis
    touching = _pairs_of(analysis, name)
    neighbours = {w.name for w in analysis.weights if _pairs_of(analysis, w.name) & touching}
    assert name in c.misfit_weights
    assert set(c.misfit_weights) <= neighbours
    assert {k.pair for k in c.misfit_classes} <= touching
    others = analysis.solution.free.copy()
    others[sorted(touching)] = False
    assert others.any()
    np.testing.assert_allclose(c.pair_values[others], t.result.pair_values[others], rtol=REL)


def test_torch_sgd_step_is_different(tmp_path: Path) -> None:
    """A real training step of a registry model, exported before and after."""
    torch = pytest.importorskip("torch")
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from models.architectures import ARCHITECTURES
    from models.export import export

    model, shape = ARCHITECTURES["mlp"]()
    export(model, shape, tmp_path / "a.onnx", exporter="dynamo", fold_bn=True)
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    loss = model(torch.randn(8, *shape[1:])).pow(2).mean()
    loss.backward()
    opt.step()
    export(model, shape, tmp_path / "b.onnx", exporter="dynamo", fold_bn=True)
    c = compare_files(tmp_path / "a.onnx", tmp_path / "b.onnx")
    assert not c.same and c.misfit_classes


# -- bad input -----------------------------------------------------------------------------------
def test_different_graphs_are_bad_input(fixtures_dir: Path) -> None:
    a = ir.from_proto(onnx.load(fixtures_dir / "mlp_small.onnx"))
    b = ir.from_proto(onnx.load(fixtures_dir / "resnet_tiny.onnx"))
    with pytest.raises(InputError, match="different graphs"):
        compare_models(a, b)


def test_different_shapes_are_bad_input() -> None:
    a = ir.from_proto(gemm_mlp([4, 8, 3]))
    b = ir.from_proto(gemm_mlp([4, 9, 3]))
    with pytest.raises(InputError, match="different graphs"):
        compare_models(a, b)


def test_insert_mode_is_refused(fixtures_dir: Path) -> None:
    """Insert mode adds Mul nodes: out of scope, refused as a different graph."""
    proto = gemm_mlp([4, 8, 8, 3], "Tanh")
    t = teleport(proto, seed=0, mode="insert", sampling="inter_landscape")
    assert t.result.inserted.nodes_added > 0
    with pytest.raises(InputError, match="different graphs"):
        _compare(t)


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_exit_codes_and_report(
    fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = str(fixtures_dir / "resnet_tiny.onnx")
    out, report = tmp_path / "t.onnx", tmp_path / "r.json"
    args = ["--sampling", "inter_landscape", "--seed", "3", "-q", "--report", str(report)]
    assert main([src, "-o", str(out), *args]) == 0  # the teleport form still works
    drawn = json.loads(report.read_text())["cofactor_range"]
    cmp_report = tmp_path / "c.json"
    assert main(["compare", src, str(out), "--report", str(cmp_report)]) == 0
    assert ": same" in capsys.readouterr().out
    data = json.loads(cmp_report.read_text())
    assert data["verdict"] == "same" and data["free_cofactors"] == 112
    values = list(data["cofactors"].values())
    assert min(values) == pytest.approx(drawn[0], rel=REL)
    assert max(values) == pytest.approx(drawn[1], rel=REL)

    stepped = tmp_path / "s.onnx"
    onnx.save(ir.to_proto(_sgd_step(onnx.load(src))), stepped)
    assert main(["compare", src, str(stepped), "--report", str(cmp_report)]) == 1
    text = capsys.readouterr().out
    assert ": different" in text and "class " in text
    data = json.loads(cmp_report.read_text())
    assert data["verdict"] == "different" and data["misfit_classes"]

    other = str(fixtures_dir / "mlp_small.onnx")
    assert main(["compare", src, other]) == 2
    assert main(["compare", src, str(tmp_path / "missing.onnx")]) == 2
    assert main(["compare", src, str(out), "--tolerance", "-1"]) == 2
    with pytest.raises(SystemExit) as usage:  # a usage error, as the teleport form's
        main(["compare", src])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "different graphs" in err and "not found" in err
    assert "Traceback" not in err

"""CanonicalizePass and ``graphteleport canonicalize``: the canonical form of a model and of
its random (positive) teleports coincide, canonicalizing is idempotent, keeps the function,
lowers Σ W² to a point where its gradient vanishes; the CLI's exit codes and report."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import FIXTURE_NAMES, ExportCache, gemm_mlp, max_rel_err, weights

from graphteleport.analysis import analyze_model
from graphteleport.cli import main
from graphteleport.orbit import OrbitTerms
from graphteleport.passes.canonical import CanonicalizePass, CanonicalResult, minimize
from graphteleport.passes.teleport import TeleportPass

SEEDS = (0, 1, 2)
REL = 1e-5


def _fixture(name: str) -> Callable[[ExportCache], onnx.ModelProto]:
    from models import FIXTURES_DIR

    return lambda _exported: onnx.load(FIXTURES_DIR / f"{name}.onnx")


def _arch(name: str) -> Callable[[ExportCache], onnx.ModelProto]:
    return lambda exported: onnx.load(exported(name))


_HF_CACHE: dict[str, onnx.ModelProto] = {}


def _hf(name: str) -> Callable[[ExportCache], onnx.ModelProto]:
    def load(exported: ExportCache) -> onnx.ModelProto:
        pytest.importorskip("transformers")
        from models.hf import export_entry

        if name not in _HF_CACHE:
            path = exported.root / f"hf-{name}.onnx"
            _HF_CACHE[name] = onnx.load(export_entry(name, path))
        return _HF_CACHE[name]

    return load


MODELS: dict[str, Callable[[ExportCache], onnx.ModelProto]] = {
    **{n: _fixture(n) for n in FIXTURE_NAMES},
    "gemm_mlp": lambda _e: gemm_mlp([5, 7, 6, 3]),
    "residual_mlp": _arch("residual_mlp"),
    "vgg11_bn-keep": lambda e: onnx.load(e("vgg11_bn", fold_bn=False)),
    "hf-gpt2": _hf("gpt2"),
    "hf-bert": _hf("bert"),
}


def _feeds(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs of the declared static shapes: token ids 0/1 for integer inputs, else normal."""
    rng = np.random.default_rng(1)
    inits = {i.name for i in proto.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np.issubdtype(dtype, np.integer):
            feeds[vi.name] = rng.integers(0, 2, dims).astype(dtype)
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def canonical(proto: onnx.ModelProto | ir.Model) -> tuple[ir.Model, CanonicalResult]:
    model = ir.from_proto(proto) if isinstance(proto, onnx.ModelProto) else proto
    return model, CanonicalizePass()(model)


def assert_same_weights(a: ir.Model, b: ir.Model, rel: float) -> None:
    """Every float tensor of ``a`` equals ``b``'s to ``rel`` of its largest element."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name, x in wa.items():
        y = wb[name]
        assert x.shape == y.shape, name
        scale = float(np.max(np.abs(x), initial=0.0))
        err = float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0))
        assert err <= rel * scale, f"{name}: {err:.3g} > {rel:g} * {scale:.3g}"


@pytest.fixture(params=list(MODELS), scope="module")
def model_proto(request: pytest.FixtureRequest, exported: ExportCache) -> onnx.ModelProto:
    return MODELS[request.param](exported)


def test_teleports_share_the_canonical_form(model_proto: onnx.ModelProto) -> None:
    reference, result = canonical(model_proto)
    assert result.minimum is not None and result.minimum.iterations > 0
    for seed in SEEDS:
        moved = ir.from_proto(model_proto)
        TeleportPass(seed=seed, cob_range=0.9)(moved)
        assert max_rel_err(model_proto, moved, _feeds(model_proto)) < 1e-4
        with pytest.raises(AssertionError):  # the teleport did move the weights
            assert_same_weights(ir.from_proto(model_proto), moved, REL)
        canon, _ = canonical(moved)
        assert_same_weights(reference, canon, REL)


@pytest.mark.slow
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_twenty_seeds(name: str, exported: ExportCache) -> None:
    proto = MODELS[name](exported)
    reference, _ = canonical(proto)
    for seed in range(20):
        moved = ir.from_proto(proto)
        TeleportPass(seed=seed, cob_range=0.9)(moved)
        assert_same_weights(reference, canonical(moved)[0], REL)


def test_idempotent_and_verified(model_proto: onnx.ModelProto) -> None:
    once, first = canonical(model_proto)
    assert first.minimum is not None
    assert first.objective_after < first.objective_before
    assert first.minimum.gradient <= 1e-8  # (a last step ≤ STEP_TOL taken unread: ~1e-10)
    twice, second = canonical(ir.from_proto(ir.to_proto(once)))
    # (the float32 rounding of the stored weights moves F by ~1e-8)
    assert second.objective_after == pytest.approx(first.objective_after, rel=1e-6)
    assert_same_weights(once, twice, 1e-6)
    assert max_rel_err(model_proto, ir.to_proto(once), _feeds(model_proto)) < 1e-4


def test_gradient_vanishes_at_the_canonical_form() -> None:
    from models import FIXTURES_DIR

    proto = onnx.load(FIXTURES_DIR / "resnet_tiny.onnx")
    _, result = canonical(proto)
    assert result.minimum is not None
    terms = OrbitTerms.build(result.analysis, arrays=weights(proto))  # the original's
    u = np.log(result.pair_values)
    # the pass minimises F of Q held in float32 (each sum rounded once) to convergence ...
    single = OrbitTerms.build(result.analysis, arrays=weights(proto), single=True)
    assert single.q.dtype == np.float32
    assert np.abs(single.gradient(u)).max() <= 1e-10 * single.objective(u)
    # ... so F's own gradient there is within Q's rounding: |ε_k| ≤ 2⁻²⁴ per row moves
    # ∇F by at most p·max|coef|·2⁻²⁴·F (p = 2, |coef| = 1 in this model)
    assert np.abs(terms.coef).max() == 1.0
    g = terms.gradient(u)
    assert np.abs(g).max() <= 2 * 2.0**-24 * terms.objective(u)
    # F at the optimum is the canonical model's Σ W² (to Q's rounding), and any move raises it
    total = result.objective_after + result.minimum.constant
    assert single.objective(u) == pytest.approx(total, rel=1e-12)
    assert terms.objective(u) == pytest.approx(total, rel=2.0**-24)
    rng = np.random.default_rng(0)
    for _ in range(5):
        d = np.where(terms.movable, rng.standard_normal(terms.num_pairs), 0.0)
        assert terms.objective(u + 1e-3 * d) > terms.objective(u)


def test_not_converged_is_reported() -> None:
    from graphteleport.passes.canonical import NotConverged

    analysis = analyze_model(ir.from_proto(gemm_mlp([5, 7, 6, 3])), {})
    terms = OrbitTerms.build(analysis)
    with pytest.raises(NotConverged, match="no convergence in 1 Newton steps"):
        minimize(terms, max_iterations=1)


def test_canonical_form_of_a_chain_is_enorms_balance() -> None:
    """Linear → ReLU → Linear without biases: at the optimum each hidden neuron's
    incoming and outgoing squared norms are equal (ENorm's fixed point)."""
    proto = gemm_mlp([4, 6, 3], bias=False)
    model, _ = canonical(proto)
    w = weights(model)
    incoming = (w["W0"].astype(np.float64) ** 2).sum(axis=0)
    outgoing = (w["W1"].astype(np.float64) ** 2).sum(axis=1)
    np.testing.assert_allclose(incoming, outgoing, rtol=1e-5)


# -- CLI ----------------------------------------------------------------------------------------
def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse's usage errors
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_cli_canonicalize_writes_model_and_report(tmp_path: Path) -> None:
    from models import FIXTURES_DIR

    src = FIXTURES_DIR / "cnn_tiny_keepbn.onnx"
    dst, report = tmp_path / "c.onnx", tmp_path / "r.json"
    code, out, _ = _cli("canonicalize", str(src), "-o", str(dst), "--report", str(report))
    assert code == 0, out
    assert "sum of squared weights that move" in out and "verification: passed" in out
    data = json.loads(report.read_text())
    c = data["canonical"]
    assert c["objective_after"] < c["objective_before"] and c["iterations"] > 0
    assert data["verification"]["passed"] and data["written"]
    assert not {"sampling", "cob_range", "seed"} & set(data)  # nothing was drawn
    expected, _ = canonical(onnx.load(src))
    assert_same_weights(expected, ir.load(dst), 1e-7)


def test_cli_canonicalize_exit_codes(tmp_path: Path) -> None:
    from models import FIXTURES_DIR

    src = str(FIXTURES_DIR / "mlp_small.onnx")
    code, _, err = _cli("canonicalize", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o"))
    assert code == 2 and "not found" in err and "Traceback" not in err
    code, _, err = _cli("canonicalize", src)  # no -o
    assert code == 2 and "-o" in err
    code, _, err = _cli("canonicalize", src, "-o", src)  # would overwrite its input
    assert code == 2
    dst = tmp_path / "n.onnx"
    code, out, _ = _cli("canonicalize", src, "-o", str(dst), "--no-verify")
    assert code == 0 and "skipped" in out and dst.exists()


def test_cli_canonicalize_failed_verification_exits_1(tmp_path: Path) -> None:
    from models import FIXTURES_DIR

    src = str(FIXTURES_DIR / "mlp_small.onnx")
    dst, report = tmp_path / "c.onnx", tmp_path / "r.json"
    # a tolerance no float32 rewrite meets: verification fails, only the report is written
    code, _, err = _cli(
        "canonicalize", src, "-o", str(dst), "--rtol", "1e-15", "--report", str(report)
    )
    assert code == 1 and "nothing was written" in err
    assert not dst.exists() and not json.loads(report.read_text())["verification"]["passed"]


def test_insert_mode_canonical_form_keeps_the_function() -> None:
    from models import FIXTURES_DIR

    proto = onnx.load(FIXTURES_DIR / "cnn_tiny_keepbn.onnx")
    model = ir.from_proto(proto)
    result = CanonicalizePass(mode="insert")(model)
    assert result.minimum is not None and result.minimum.gradient <= 1e-8  # (last step unread)
    assert result.objective_after < result.objective_before
    assert max_rel_err(proto, ir.to_proto(model)) < 1e-4


@pytest.mark.parametrize("name", ["hf-gpt2", "hf-bert"])
def test_insert_mode_counts_the_inserted_constants(name: str, exported: ExportCache) -> None:
    """A GELU wrap's Muls take up scale the weights give off: uncounted, ``F`` fell
    without bound along such directions (max|u| grew until the gradient test passed;
    91 on a ConvNeXt, 519 on wav2vec2).  Counted, the minimum is a point: bounded, the
    same for the model's absorb-mode teleports, inserted constants included."""
    proto = MODELS[name](exported)
    reference = ir.from_proto(proto)
    result = CanonicalizePass(mode="insert")(reference)
    assert result.minimum is not None and float(np.abs(result.minimum.u).max()) < 5.0
    assert result.inserted.wraps > 0  # GELU wrapped
    assert max_rel_err(proto, ir.to_proto(reference), _feeds(proto)) < 1e-4
    for seed in SEEDS[:2]:
        moved = ir.from_proto(proto)
        TeleportPass(seed=seed, cob_range=0.9)(moved)
        CanonicalizePass(mode="insert")(moved)
        assert_same_weights(reference, moved, REL)


def test_insert_mode_relu_wraps_store_signs_only() -> None:
    """Where the sign rule gives a ReLU pair τ < 0, insert mode wraps the ReLU with the
    part of τ it does not commute with, ``sign τ``: constants ±1, which a positive
    teleport of the model leaves alone, so the canonical forms agree inserted constants
    included (they stored ``τ``, and differed by up to 4.2 relative here, as on T5's ReLU
    FFN)."""
    proto = gemm_mlp([6, 8, 8, 4])
    reference = ir.from_proto(proto)
    result = CanonicalizePass(mode="insert")(reference)
    assert result.inserted.wraps == 2
    assert max_rel_err(proto, ir.to_proto(reference)) < 1e-5
    inserted = [v for n, v in reference.graph.initializers.items() if "_cofactor" in n]
    values = np.concatenate([v.const_value.numpy().ravel() for v in inserted])  # type: ignore[union-attr]
    assert set(values.tolist()) == {-1.0, 1.0}
    for seed in SEEDS[:3]:
        moved = ir.from_proto(proto)
        TeleportPass(seed=seed, cob_range=0.9)(moved)
        CanonicalizePass(mode="insert")(moved)
        assert_same_weights(reference, moved, REL)


def test_a_different_network_has_a_different_canonical_form() -> None:
    proto = gemm_mlp([5, 7, 6, 3])
    other = onnx.ModelProto()
    other.CopyFrom(proto)
    w = onnx.numpy_helper.to_array(other.graph.initializer[0]).copy()
    w[0, 0] += 0.1  # not a rescaling
    other.graph.initializer[0].CopyFrom(
        onnx.numpy_helper.from_array(w, other.graph.initializer[0].name)
    )
    with pytest.raises(AssertionError):
        assert_same_weights(canonical(proto)[0], canonical(other)[0], REL)

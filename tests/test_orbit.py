"""graphteleport.orbit: F(u) is Σ|W'|^p of the rewritten model, its gradient and Hessian
match finite differences, and pair_sums is Aᵀ."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import FIXTURE_NAMES, gemm_mlp, weights

from graphteleport.analysis import analyze_model
from graphteleport.orbit import OrbitTerms, movable_pairs
from graphteleport.rewrite import rewrite


def _models() -> list[tuple[str, onnx.ModelProto]]:
    from models import FIXTURES_DIR

    out = [(n, onnx.load(FIXTURES_DIR / f"{n}.onnx")) for n in FIXTURE_NAMES]
    out.append(("gemm_mlp", gemm_mlp([5, 7, 6, 3])))
    return out


MODELS = _models()


def _random_u(terms: OrbitTerms, seed: int, scale: float = 0.4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(terms.movable, rng.uniform(-scale, scale, terms.num_pairs), 0.0)


def _sum_power(model: ir.Model, names: set[str], p: float) -> float:
    w = weights(model)
    return float(sum(np.sum(np.abs(w[n].astype(np.float64)) ** p) for n in names))


@pytest.mark.parametrize("p", [2.0, 1.0])
@pytest.mark.parametrize(("name", "proto"), MODELS, ids=[n for n, _ in MODELS])
def test_objective_is_the_rewritten_models_sum(name: str, proto: onnx.ModelProto, p: float) -> None:
    model = ir.from_proto(proto)
    analysis = analyze_model(model, {})
    terms = OrbitTerms.build(analysis, p=p)
    assert terms.movable.any()
    names = {w.name for w in analysis.weights}
    assert terms.objective(np.zeros(terms.num_pairs)) == pytest.approx(
        _sum_power(model, names, p), rel=1e-9
    )
    u = _random_u(terms, 1)
    expected = terms.objective(u)
    rewrite(model, analysis, analysis.solution.cofactors(np.exp(u)))
    assert _sum_power(model, names, p) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("name", "proto"), MODELS, ids=[n for n, _ in MODELS])
def test_gradient_and_hessian_match_finite_differences(name: str, proto: onnx.ModelProto) -> None:
    analysis = analyze_model(ir.from_proto(proto), {})
    terms = OrbitTerms.build(analysis)
    u = _random_u(terms, 2)
    g = terms.gradient(u)
    assert not g[~terms.movable].any()
    y = terms.terms(u)
    rng = np.random.default_rng(3)
    v = np.where(terms.movable, rng.standard_normal(terms.num_pairs), 0.0)
    h = 1e-5
    fd = (terms.objective(u + h * v) - terms.objective(u - h * v)) / (2 * h)
    assert float(g @ v) == pytest.approx(fd, rel=1e-6)
    fd2 = (terms.gradient(u + h * v) - terms.gradient(u - h * v)) / (2 * h)
    np.testing.assert_allclose(
        terms.hessian_vector(y, v), fd2, rtol=1e-5, atol=1e-6 * abs(fd2).max()
    )
    q = int(np.flatnonzero(terms.movable)[0])
    e = np.zeros(terms.num_pairs)
    e[q] = 1.0
    assert terms.hessian_diagonal(y)[q] == pytest.approx(terms.hessian_vector(y, e)[q], rel=1e-12)


def test_pair_sums_is_the_transpose_of_log_scale() -> None:
    analysis = analyze_model(ir.from_proto(MODELS[1][1]), {})
    terms = OrbitTerms.build(analysis)
    rng = np.random.default_rng(4)
    u = _random_u(terms, 5)
    r = rng.standard_normal(terms.q.size)
    assert float(r @ terms.log_scale(u)) == pytest.approx(float(terms.pair_sums(r) @ u), rel=1e-10)
    assert (movable_pairs(analysis) == terms.movable).all()
    assert sum(hi - lo for lo, hi in terms.spans) == terms.q.size


@pytest.mark.parametrize(("name", "proto"), MODELS, ids=[n for n, _ in MODELS])
def test_blocks_and_coordinates_are_one_map(name: str, proto: onnx.ModelProto) -> None:
    """The products (per-use broadcast blocks) equal the scatter over A's coordinates:
    ``A·u``, ``Aᵀr``, ``Σ coef² r`` and ``Σ r``; moving and active agree with the coordinates."""
    terms = OrbitTerms.build(analyze_model(ir.from_proto(proto), {}))
    u = _random_u(terms, 6)
    r = np.random.default_rng(7).standard_normal(terms.q.size)
    rows, cols, coef = terms.rows, terms.cols, terms.coef
    n, m = terms.q.size, terms.num_pairs
    np.testing.assert_allclose(
        terms.log_scale(u), np.bincount(rows, weights=coef * u[cols], minlength=n), atol=1e-12
    )
    np.testing.assert_allclose(
        terms.pair_sums(r), np.bincount(cols, weights=coef * r[rows], minlength=m), atol=1e-9
    )
    np.testing.assert_allclose(
        terms.pair_sums(r, squared=True),
        np.bincount(cols, weights=coef**2 * r[rows], minlength=m),
        atol=1e-9,
    )
    np.testing.assert_allclose(
        terms.pair_counts(r), np.bincount(cols, weights=r[rows], minlength=m), atol=1e-9
    )
    hit = np.zeros(m, dtype=bool)
    hit[cols[terms.q[rows] > 0]] = True
    assert (terms.active() == hit).all()
    has = np.zeros(n, dtype=bool)
    has[rows] = True
    moving, constant = terms.moving()
    assert (moving.q == np.where(has & (terms.q > 0), terms.q, 0.0)).all()
    assert constant == pytest.approx(float(terms.q.sum() - moving.q.sum()))


def test_moving_part_plus_constant_is_the_objective_with_a_zero_weight() -> None:
    """A row with ``q = 0`` that has columns (a zero weight element) leaves the moving
    part with its own entries: ``moving.objective(u) + constant == objective(u)``."""
    from onnx import numpy_helper

    proto = gemm_mlp([5, 7, 6, 3])
    init = proto.graph.initializer[0]
    w = numpy_helper.to_array(init).copy()
    w.flat[3] = 0.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    terms = OrbitTerms.build(analyze_model(ir.from_proto(proto), {}))
    assert (terms.q == 0).any()
    moving, constant = terms.moving()
    for seed in range(3):
        u = _random_u(terms, seed)
        assert moving.objective(u) + constant == pytest.approx(terms.objective(u), rel=1e-12)

"""graphteleport.orbit: F(u) is Σ|W'|^p of the rewritten model, its gradient and Hessian
match finite differences, and pair_sums is Aᵀ."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import FIXTURE_NAMES, gemm_mlp, weights

from graphteleport.analysis import analyze_model
from graphteleport.orbit import SINGLE_WIDTH, OrbitTerms, counted_uses, movable_pairs
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


# -- the kernel (graphteleport.orbit_kernel) ------------------------------------------------------
def _residual_mlp(width: int = 6, seed: int = 0) -> onnx.ModelProto:
    """``h = x W0 + b0; s = h + (h W1 + b1); y = relu(s) W2 + b2``: the residual class of
    ``h`` and ``s`` is one class, so ``W1`` meets each of its pairs twice (``loose`` rows)."""
    from conftest import make_model, rand
    from onnx import helper

    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["m0"]),
        helper.make_node("Add", ["m0", "b0"], ["h"]),
        helper.make_node("MatMul", ["h", "W1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["r"]),
        helper.make_node("Add", ["h", "r"], ["s"]),
        helper.make_node("Relu", ["s"], ["a"]),
        helper.make_node("MatMul", ["a", "W2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["y"]),
    ]
    inits = {
        "W0": rand([4, width], seed),
        "b0": rand([width], seed + 1),
        "W1": rand([width, width], seed + 2),
        "b1": rand([width], seed + 3),
        "W2": rand([width, 3], seed + 4),
        "b2": rand([3], seed + 5),
    }
    return make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, inits)


KERNEL_MODELS = [*MODELS, ("residual_mlp", _residual_mlp())]


def _kernel_and_terms(proto: onnx.ModelProto, p: float, float32: bool = False) -> tuple:
    from graphteleport.orbit_kernel import OrbitKernel

    terms = OrbitTerms.build(analyze_model(ir.from_proto(proto), {}), p=p)
    return OrbitKernel.of(terms, float32=float32), terms


def test_the_kernel_paths_are_all_exercised() -> None:
    """The fixtures reach every path of the kernel: bilinear blocks, single terms, rest
    blocks and loose rows (else the equality tests below would test less than they say)."""
    kernels = [_kernel_and_terms(proto, 2.0)[0] for _, proto in KERNEL_MODELS]
    assert all(k.single.size for k in kernels)
    assert sum(bool(k.matrices) for k in kernels) >= 3
    assert any(k.rest is not None and k.rest.blocks for k in kernels)
    assert any(k.rest is not None and k.rest.loose[0].size for k in kernels)


@pytest.mark.parametrize("p", [2.0, 4.0, 1.5])
@pytest.mark.parametrize(("name", "proto"), KERNEL_MODELS, ids=[n for n, _ in KERNEL_MODELS])
def test_kernel_is_the_moving_part_of_the_terms(
    name: str, proto: onnx.ModelProto, p: float
) -> None:
    """The kernel's F, gradient, diag H and H·v (float64) equal the row-wise terms' moving
    part, and its constant theirs."""
    kernel, terms = _kernel_and_terms(proto, p)
    moving, constant = terms.moving()
    assert kernel.constant == pytest.approx(constant, rel=1e-12, abs=1e-300)
    for seed in range(3):
        u = _random_u(terms, seed)
        at = kernel.point(u)
        assert at is not None
        y = moving.terms(u)
        assert at.f == pytest.approx(float(y.sum()), rel=1e-12)
        scale = float(np.abs(at.gradient).max())
        np.testing.assert_allclose(at.gradient, moving.gradient(u), rtol=1e-11, atol=1e-13 * scale)
        np.testing.assert_allclose(at.diagonal, moving.hessian_diagonal(y), rtol=1e-11)
        v = np.where(terms.movable, np.random.default_rng(seed).standard_normal(terms.num_pairs), 0)
        hv = moving.hessian_vector(y, v)
        np.testing.assert_allclose(
            kernel.hessian_vector(at, v), hv, rtol=1e-10, atol=1e-12 * abs(hv).max()
        )


@pytest.mark.parametrize(("name", "proto"), KERNEL_MODELS, ids=[n for n, _ in KERNEL_MODELS])
def test_float32_hessian_products_are_close(name: str, proto: onnx.ModelProto) -> None:
    """With ``float32``, H·v moves by float32 rounding only (F and the gradient not at all)."""
    exact, terms = _kernel_and_terms(proto, 2.0)
    single, _ = _kernel_and_terms(proto, 2.0, float32=True)
    assert all(m.q32 is not None for m in single.matrices)
    u = _random_u(terms, 1)
    a, b = exact.point(u), single.point(u)
    assert a is not None and b is not None
    assert a.f == b.f and (a.gradient == b.gradient).all()
    v = np.where(terms.movable, np.random.default_rng(2).standard_normal(terms.num_pairs), 0)
    ha = exact.hessian_vector(a, v)
    np.testing.assert_allclose(
        single.hessian_vector(b, v), ha, rtol=1e-5, atol=1e-6 * abs(ha).max()
    )


def test_point_with_a_bound_stops_early() -> None:
    """``point(u, bound)`` is None when F(u) exceeds the bound, the full point otherwise."""
    kernel, terms = _kernel_and_terms(MODELS[1][1], 2.0)
    u = _random_u(terms, 3)
    at = kernel.point(u)
    assert at is not None
    assert kernel.point(u, bound=at.f * (1 - 1e-9)) is None
    again = kernel.point(u, bound=at.f * (1 + 1e-9))
    assert again is not None and (again.gradient == at.gradient).all()


@pytest.mark.parametrize(("name", "proto"), KERNEL_MODELS, ids=[n for n, _ in KERNEL_MODELS])
def test_coarse_matrix_is_r_transpose_h_r(name: str, proto: onnx.ModelProto) -> None:
    """``coarse(at, group)`` is ``Rᵀ H R`` probed column by column with ``hessian_vector``,
    for the kernel's groups and for a partition into two groups per pair parity."""
    kernel, terms = _kernel_and_terms(proto, 2.0)
    at = kernel.point(_random_u(terms, 4))
    assert at is not None
    parity = np.where(terms.movable, np.arange(terms.num_pairs) % 2, -1)
    for group in (kernel.group, parity):
        ng = int(group.max()) + 1
        assert ng > 0
        r = np.zeros((terms.num_pairs, ng))
        r[np.flatnonzero(group >= 0), group[group >= 0]] = 1.0
        probed = np.stack([r.T @ kernel.hessian_vector(at, r[:, k]) for k in range(ng)], 1)
        np.testing.assert_allclose(kernel.coarse(at, group), probed, rtol=1e-10, atol=1e-12)


def test_coarse_groups_are_layers() -> None:
    """gemm_mlp([5, 7, 6, 3]): the hidden layers' pairs make one group each."""
    kernel, terms = _kernel_and_terms(gemm_mlp([5, 7, 6, 3]), 2.0)
    groups = kernel.group[terms.movable]
    assert sorted(np.bincount(groups).tolist()) == [6, 7]


@pytest.mark.parametrize("window", [True, False], ids=["window", "elementwise"])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 4.0, 2.5])
def test_reduced_power_counts_non_finite_elements_as_zero(p: float, window: bool) -> None:
    """Q of a use is Σ|W|^p over each compact element's window (float64: the einsum path
    for p = 1, 2, 3, 4 — a conv's 3×3 window, or elementwise where the compact layout is the
    use's shape — and the generic one else), with ±inf and nan counting 0."""
    from graphteleport.orbit import compact_shape, counted_uses, reduced_power

    analysis = analyze_model(ir.from_proto(MODELS[1][1]), {})
    uses = counted_uses(analysis)
    if window:
        use = next(u for u in uses if len(u.shape) == 4 and u.shape[2] > 1)
    else:
        use = next(u for u in uses if compact_shape(u) == u.shape and np.prod(u.shape) > 1)
    w = use.source.array().copy()
    expected_w = np.abs(w.astype(np.float64)) ** p
    axes = tuple(k for k, c in enumerate(compact_shape(use)) if c == 1 and w.shape[k] != 1)
    np.testing.assert_allclose(
        reduced_power(use, w, p), expected_w.sum(axis=axes, keepdims=True), rtol=1e-12
    )
    w.flat[0], w.flat[-1] = np.inf, np.nan
    expected_w.flat[0] = expected_w.flat[-1] = 0.0
    np.testing.assert_allclose(
        reduced_power(use, w, p), expected_w.sum(axis=axes, keepdims=True), rtol=1e-12
    )


@pytest.mark.parametrize(("name", "proto"), KERNEL_MODELS, ids=[n for n, _ in KERNEL_MODELS])
def test_trial_value_is_f(name: str, proto: onnx.ModelProto) -> None:
    """``value(u)`` is ``F(u)``: exactly without the float32 copies, to float32 rounding
    with them."""
    for float32, rel in ((False, 1e-12), (True, 1e-6)):
        kernel, terms = _kernel_and_terms(proto, 2.0, float32=float32)
        u = _random_u(terms, 5)
        at = kernel.point(u)
        assert at is not None
        assert kernel.value(u) == pytest.approx(at.f, rel=rel)


def test_minimize_at_an_exact_minimum_stops() -> None:
    """A model already balanced to the last bit (every weight ±1, zero biases: each hidden
    neuron's in- and out-norms are equal) has ∂F/∂u = 0 exactly at u = 0; minimize stops
    there (the CG forcing term must not divide by the zero gradient)."""
    from onnx import numpy_helper

    from graphteleport.passes.canonical import minimize

    proto = gemm_mlp([3, 3, 3])
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        fill = np.ones_like(w) if w.ndim == 2 else np.zeros_like(w)
        init.CopyFrom(numpy_helper.from_array(fill, init.name))
    terms = OrbitTerms.build(analyze_model(ir.from_proto(proto), {}))
    assert terms.movable.any()
    assert not terms.gradient(np.zeros(terms.num_pairs)).any()
    found = minimize(terms)
    assert not found.u.any() and found.gradient == 0.0


@pytest.mark.parametrize("p", [1.0, 1.5, 4.0])
@pytest.mark.parametrize(("name", "proto"), KERNEL_MODELS, ids=[n for n, _ in KERNEL_MODELS])
def test_minimize_on_the_kernel_reaches_the_row_wise_minimum(
    name: str, proto: onnx.ModelProto, p: float
) -> None:
    """minimize (kernel products, float32 Hessian, coarse preconditioner, extended steps)
    without the last-step rule (``step_tol=0``) ends where the row-wise terms' gradient
    vanishes (max|g|/F ≤ 1e-12) for p ≠ 2 too, and F there is below F at nearby points;
    with it (the default: a last step ≤ STEP_TOL taken unread), every weight's scale
    ``log|S| = A·u`` is within 1e-7 of that (measured ≤ 1e-8), ``F`` the same to 1e-12, and
    the gradient it reports (its CG residual's prediction) is the true one's size."""
    from graphteleport.passes.canonical import minimize

    terms = OrbitTerms.build(analyze_model(ir.from_proto(proto), {}), p=p)
    found = minimize(terms, step_tol=0.0)
    f = terms.objective(found.u)
    assert np.abs(terms.gradient(found.u)).max() <= 1e-12 * f
    assert f == pytest.approx(found.objective_after + found.constant, rel=1e-12)
    ruled = minimize(terms)
    assert ruled.iterations <= found.iterations
    shift = terms.log_scale(ruled.u) - terms.log_scale(found.u)
    assert np.abs(shift).max() <= 1e-7
    g = float(np.abs(terms.gradient(ruled.u)).max()) / terms.objective(ruled.u)
    assert g <= 2 * ruled.gradient + 1e-13 and ruled.gradient <= 1e-7
    assert terms.objective(ruled.u) == pytest.approx(
        ruled.objective_after + ruled.constant, rel=1e-12
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = np.where(terms.movable, rng.standard_normal(terms.num_pairs), 0.0)
        assert terms.objective(found.u + 1e-3 * d) > f


def _bilinear_point(proto: onnx.ModelProto, p: float, seed: int) -> tuple:
    """The kernel and terms of ``proto`` at exponent ``p`` (skip without a bilinear
    block), a generator seeded ``seed``, a random ``u`` drawn from it and the kernel
    there."""
    kernel, terms = _kernel_and_terms(proto, p)
    if not kernel.matrices:
        pytest.skip("no bilinear block")
    rng = np.random.default_rng(seed)
    u = np.where(terms.movable, 0.3 * rng.standard_normal(terms.num_pairs), 0.0)
    at = kernel.point(u)
    assert at is not None
    return kernel, terms, rng, u, at


@pytest.mark.parametrize(("name", "proto"), KERNEL_MODELS, ids=[n for n, _ in KERNEL_MODELS])
def test_rank_one_kernel_keeps_the_sums_and_its_products_are_dense_ones(
    name: str, proto: onnx.ModelProto
) -> None:
    """``rank_one(at)`` replaces each bilinear block's terms by ``r cᵀ/Σr`` of their row and
    column sums at ``at``: at ``at`` it has the same sums, F, gradient and diag H; its
    Hessian products elsewhere equal those of a kernel holding ``(r/x)(c/z)ᵀ/Σr`` densely."""
    from dataclasses import replace

    kernel, terms, rng, u, at = _bilinear_point(proto, 2.0, 1)
    cheap = kernel.rank_one(at)
    there = cheap.point(u)
    assert there is not None
    np.testing.assert_allclose(there.sums, at.sums, rtol=1e-12)
    assert there.f == pytest.approx(at.f, rel=1e-12)
    np.testing.assert_allclose(there.gradient, at.gradient, rtol=1e-9, atol=1e-12 * at.f)
    dense = []
    for m, c in zip(kernel.matrices, cheap.matrices, strict=True):
        assert c.outer is not None
        dense.append(replace(m, q=np.outer(*c.outer), q32=None))
    reference = replace(kernel, matrices=tuple(dense), plans={})
    v = rng.standard_normal(terms.num_pairs)
    w = np.where(terms.movable, 0.2 * rng.standard_normal(terms.num_pairs), 0.0)
    a, b = cheap.point(w), reference.point(w)
    assert a is not None and b is not None
    assert a.f == pytest.approx(b.f, rel=1e-12)
    np.testing.assert_allclose(
        cheap.hessian_vector(a, v), reference.hessian_vector(b, v), rtol=1e-9, atol=1e-12 * b.f
    )
    np.testing.assert_allclose(
        cheap.coarse(a, kernel.group),
        reference.coarse(b, kernel.group),
        rtol=1e-9,
        atol=1e-12 * b.f,
    )


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_minimize_from_the_rank_one_start_reaches_the_same_minimum(p: float) -> None:
    """With and without the rank-one start, and with it made once or again where it
    arrived, minimize ends at the same ``u`` and ``F``; the start took Newton steps of its
    own on a model with conv blocks, more when made again."""
    from graphteleport.passes.canonical import minimize
    from models import FIXTURES_DIR

    proto = onnx.load(FIXTURES_DIR / "resnet_tiny.onnx")
    terms = OrbitTerms.build(analyze_model(ir.from_proto(proto), {}), p=p)
    warm, cold = minimize(terms), minimize(terms, start=False)
    once = minimize(terms, restarts=0)  # (the start not made again where it arrived)
    assert warm.start[0] > once.start[0] > 0 and cold.start == (0, 0)
    for other in (cold, once):
        assert warm.objective_after == pytest.approx(other.objective_after, rel=1e-12)
        assert warm.objective_before == other.objective_before
        np.testing.assert_allclose(warm.u, other.u, rtol=0, atol=1e-7)
    # (each ends with a last step ≤ STEP_TOL taken unread: u within ~1e-8 of the minimum)
    assert np.abs(terms.gradient(warm.u)).max() <= 1e-8 * terms.objective(warm.u)


def test_float32_copy_only_where_q_fits() -> None:
    """A bilinear block gets its float32 copy when every ``Q`` is at most SINGLE_MAX (the
    bound read on the copy), not when one is beyond it or beyond float32's range."""
    from graphteleport.orbit_kernel import SINGLE_MAX, Bilinear, with_single

    for top, copied in ((1e3, True), (SINGLE_MAX * 0.5, True), (1e35, False), (1e300, False)):
        q = np.full((3, 4), 2.0)
        q[1, 2] = top
        m = with_single(Bilinear(q, 0, 3, 7))
        assert (m.q32 is not None) == copied, top
        if copied:
            assert m.q32 is not None and np.array_equal(m.q32, q.astype(np.float32))


def _rank_one_hessian(kernel, at, active: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """``H₁`` of :func:`graphteleport.orbit_kernel.low_rank` written out densely: diag H
    plus per bilinear block ``(p²/S)(u vᵀ + v uᵀ)`` from its row and column sums."""
    h = np.diag(np.where(active, at.diagonal, 0.0))
    for m in kernel.matrices:
        rows, cols = slice(m.lo, m.mid), slice(m.mid, m.hi)
        total = float(at.sums[rows].sum())
        u = np.zeros(kernel.num_pairs)
        v = np.zeros(kernel.num_pairs)
        np.add.at(u, kernel.index[rows], kernel.coef[rows] * at.sums[rows])
        np.add.at(v, kernel.index[cols], kernel.coef[cols] * at.sums[cols])
        u, v = np.where(active, u, 0.0), np.where(active, v, 0.0)
        if total > 0:
            h += kernel.p**2 / total * (np.outer(u, v) + np.outer(v, u))
    return h


@pytest.mark.parametrize(("name", "proto"), KERNEL_MODELS, ids=[n for n, _ in KERNEL_MODELS])
def test_low_rank_preconditioner_inverts_the_rank_one_hessian(
    name: str, proto: onnx.ModelProto
) -> None:
    """``low_rank`` applies ``H₁⁻¹`` (Woodbury) on the active pairs: ``H₁ · M(r) = r`` with
    ``H₁`` written out densely; ``M`` is symmetric and positive; on the rank-one kernel
    (whose Hessian is ``H₁`` when there is no rest) one preconditioned step solves
    ``H d = r``."""
    from graphteleport.orbit_kernel import low_rank

    kernel, terms, rng, u, at = _bilinear_point(proto, 3.0, 4)
    active = at.diagonal > 0
    precondition = low_rank(kernel, at, active)
    assert precondition is not None
    h1 = _rank_one_hessian(kernel, at, active)
    r, s = (np.where(active, rng.standard_normal(terms.num_pairs), 0.0) for _ in range(2))
    z = precondition(r)
    assert not z[~active].any()
    np.testing.assert_allclose(h1 @ z, r, rtol=1e-7, atol=1e-8 * np.abs(r).max())
    assert r @ precondition(s) == pytest.approx(s @ z, rel=1e-9)
    assert r @ z > 0
    if kernel.rest is not None:  # (H₁ holds the rest's diagonal only)
        return
    cheap = kernel.rank_one(at)
    there = cheap.point(u)
    assert there is not None
    exact = low_rank(cheap, there, active)
    assert exact is not None
    d = exact(r)
    hd = np.where(active, cheap.hessian_vector(there, d), 0.0)
    np.testing.assert_allclose(hd, r, rtol=1e-7, atol=1e-8 * np.abs(r).max())


def test_shares_cover_every_index_once_and_balance(monkeypatch: pytest.MonkeyPatch) -> None:
    """``shares`` cuts indices into one share per worker, each index once, sums within
    the largest size of each other; one share under PARALLEL_ELEMENTS or with one CPU."""
    from graphteleport import parallel
    from graphteleport.parallel import PARALLEL_ELEMENTS

    monkeypatch.setattr(parallel, "workers", lambda: 2)
    sizes = [int(x) for x in np.random.default_rng(0).integers(1, 1000, 50)]
    cut = parallel.shares(sizes, PARALLEL_ELEMENTS)
    assert len(cut) == 2 and sorted(i for s in cut for i in s) == list(range(50))
    sums = [sum(sizes[i] for i in s) for s in cut]
    assert abs(sums[0] - sums[1]) <= max(sizes)
    assert len(parallel.shares(sizes, PARALLEL_ELEMENTS - 1)) == 1
    monkeypatch.setattr(parallel, "workers", lambda: 1)
    (alone,) = parallel.shares(sizes, PARALLEL_ELEMENTS)
    assert sorted(alone) == list(range(50))


def test_each_runs_every_index_once_and_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """``each`` calls ``fn`` once per index — on both workers when the total is large (the
    two threads each take some), in order on the caller otherwise — and raises an
    item's exception once the threads are done, handing out no item after it."""
    import threading
    import time

    from graphteleport import parallel

    monkeypatch.setattr(parallel, "workers", lambda: 2)
    sizes = [int(x) for x in np.random.default_rng(1).integers(1, 1000, 60)]
    seen: list[tuple[int, int | None]] = []
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=10.0)  # (each thread's first item waits for the other's)

    def slow(i: int) -> None:
        with lock:
            first = threading.get_ident() not in {t for _, t in seen}
            seen.append((i, threading.get_ident()))
        if first and parallel.PARALLEL_ELEMENTS == 0:
            both.wait()

    monkeypatch.setattr(parallel, "PARALLEL_ELEMENTS", 0)
    parallel.each(slow, sizes)
    assert sorted(i for i, _ in seen) == list(range(60))
    assert len({t for _, t in seen}) == 2
    seen.clear()
    monkeypatch.setattr(parallel, "PARALLEL_ELEMENTS", sum(sizes) + 1)
    parallel.each(slow, sizes)
    assert [i for i, _ in seen] == list(range(60))  # (serial: in index order)
    monkeypatch.setattr(parallel, "PARALLEL_ELEMENTS", 0)
    calls: list[int] = []
    failed = threading.Event()

    def failing(i: int) -> None:
        calls.append(i)
        if i == int(np.argmax(sizes)):  # (the largest: handed out first)
            failed.set()
            raise ValueError("item")
        failed.wait(5.0)  # (the others wait for the failure, then take a while)
        time.sleep(0.02)

    with pytest.raises(ValueError, match="item"):
        parallel.each(failing, sizes)
    assert len(calls) <= 3  # the failing item, and what the other thread had taken


def test_writable_copies_are_views_of_one_slab() -> None:
    """``stored_arrays(writable=True)``: each tensor's own writable C-contiguous copy, equal
    to the stored tensor, the placed ones (plain dtypes, static shapes) views of one
    array at aligned offsets that do not overlap; writing one changes neither the model
    nor another copy."""
    from graphteleport.orbit import SLAB_ALIGN, stored_arrays
    from models import FIXTURES_DIR

    model = ir.from_proto(onnx.load(FIXTURES_DIR / "resnet_tiny.onnx"))
    analysis = analyze_model(model, {})
    plain = stored_arrays(analysis)
    copies = stored_arrays(analysis, writable=True)
    assert copies.keys() == plain.keys() and len(copies) > 3

    def owner(a: np.ndarray) -> np.ndarray:
        while isinstance(a.base, np.ndarray):
            a = a.base
        return a

    assert len({id(owner(c)) for c in copies.values()}) == 1
    spans = []
    for name, c in copies.items():
        assert c.flags.writeable and c.flags.c_contiguous
        assert c.dtype == plain[name].dtype and np.array_equal(c, plain[name])
        start = c.__array_interface__["data"][0]
        assert start % SLAB_ALIGN == 0
        spans.append((start, start + c.nbytes))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    first, second = list(copies)[:2]
    before = copies[second].copy()
    copies[first][...] = 7.0
    assert np.array_equal(copies[second], before)
    assert np.array_equal(stored_arrays(analysis)[first], plain[first])


def test_threads_change_no_bit_of_the_solve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Q, the kernel's products and the minimum are the same to the bit whether the
    large-array work runs on one thread or two (each use, each block on one thread)."""
    from graphteleport import parallel
    from graphteleport.passes.canonical import minimize
    from models import FIXTURES_DIR

    analysis = analyze_model(ir.from_proto(onnx.load(FIXTURES_DIR / "resnet_tiny.onnx")), {})
    monkeypatch.setattr(parallel, "PARALLEL_ELEMENTS", 0)
    for single in (False, True):
        found = []
        for threads in (1, 2):
            monkeypatch.setattr(parallel, "workers", lambda threads=threads: threads)
            terms = OrbitTerms.build(analysis, p=3.0, single=single)
            found.append((terms.q, minimize(terms)))
        (q1, m1), (q2, m2) = found
        assert np.array_equal(q1, q2)
        assert np.array_equal(m1.u, m2.u) and m1.objective_after == m2.objective_after


@pytest.mark.parametrize("p", [2.0, 3.0])
@pytest.mark.parametrize(("name", "proto"), KERNEL_MODELS, ids=[n for n, _ in KERNEL_MODELS])
def test_single_q_is_the_float64_q_rounded_once(
    name: str, proto: onnx.ModelProto, p: float
) -> None:
    """``build(single=True)`` holds each float64 statistic rounded once to float32 (the same
    sums, then one rounding) — except where computed in float32: at p = 3 one-element rows
    (``w²·|w|``: two roundings, orbit._single_powers), and rows of ``n > 1`` elements (a
    window's ``n`` powers summed in float32: ``(n + 2)·2⁻²⁴`` at p = 2 for ``n ≤``
    SINGLE_WIDTH, ``(n + 3)·2⁻²⁴`` at p = 3, orbit._single_windows) — and the kernel
    reads it exactly:
    ``F``, the gradient and the products at a point agree with the float64 kernel's to
    float32's rounding of ``Q``, and with the row-wise terms of that same float32 ``Q``
    to float64 rounding."""
    from graphteleport.orbit_kernel import OrbitKernel

    analysis = analyze_model(ir.from_proto(proto), {})
    wide, single = OrbitTerms.build(analysis, p=p), OrbitTerms.build(analysis, p=p, single=True)
    assert single.q.dtype == np.float32
    widths = np.ones(single.q.size)
    for use, (lo, hi) in zip(counted_uses(analysis), single.spans):
        widths[lo:hi] = int(np.prod(use.shape)) // max(hi - lo, 1)
    summed = widths > 1 if p == 3.0 else (widths > 1) & (widths <= SINGLE_WIDTH)
    if p == 2.0:  # (elsewhere each float64 sum rounded once: the same bits)
        assert summed.any() or name != "resnet_tiny"
        assert np.array_equal(single.q[~summed], wide.q[~summed].astype(np.float32))
    # (at most two roundings of 2⁻²⁴ each; n + 2 or n + 3 for a row of n > 1 elements)
    bound = np.where(summed, widths + p, 2.5) * 2.0**-24
    assert (np.abs(single.q / wide.q - 1)[wide.q > 0] <= bound[wide.q > 0]).all()
    assert np.array_equal(single.q == 0, wide.q == 0)
    u = _random_u(wide, 5)
    kernel = OrbitKernel.of(single)
    at = kernel.point(u)
    assert at is not None
    assert at.f + kernel.constant == pytest.approx(single.objective(u), rel=1e-12)
    np.testing.assert_allclose(
        at.gradient, single.gradient(u), rtol=1e-10, atol=1e-12 * abs(at.gradient).max()
    )
    reference = OrbitKernel.of(wide).point(u)
    assert reference is not None
    assert at.f == pytest.approx(reference.f, rel=1e-7)


@pytest.mark.parametrize(("scale", "p"), [(1e-25, 2.0), (1e11, 3.0), (1e13, 3.0)])
def test_single_q_falls_back_to_float64_where_float32_does_not_hold_it(
    scale: float, p: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``Q`` that would round to a subnormal or 0 in float32 (a row that counts would stop
    counting) or lie above SINGLE_MAX keeps ``q`` in float64, the same as without ``single``
    — found before any cast (no overflow warning, on the worker threads either)."""
    import warnings

    from graphteleport import parallel

    monkeypatch.setattr(parallel, "PARALLEL_ELEMENTS", 0)  # (the uses on two threads)
    monkeypatch.setattr(parallel, "workers", lambda: 2)
    warnings.simplefilter("error", RuntimeWarning)
    proto = gemm_mlp([5, 7, 6, 3])
    for init in proto.graph.initializer:
        if init.name.startswith("W"):
            array = onnx.numpy_helper.to_array(init).astype(np.float32)
            array[0, 0] = np.float32(scale)
            init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    analysis = analyze_model(ir.from_proto(proto), {})
    single = OrbitTerms.build(analysis, p=p, single=True)
    assert single.q.dtype == np.float64
    assert np.array_equal(single.q, OrbitTerms.build(analysis, p=p).q)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_a_window_whose_powers_underflow_keeps_q_in_float64(p: float) -> None:
    """A conv whose k×k window's powers all underflow to 0 in float32 (its float64 sum is
    positive: the row counts) is found by the float32 windows' path
    (orbit._single_windows): ``q`` stays float64, the same as without ``single``."""
    from models import FIXTURES_DIR

    proto = onnx.load(FIXTURES_DIR / "resnet_tiny.onnx")
    analysis = analyze_model(ir.from_proto(proto), {})
    conv = next(u for u in counted_uses(analysis) if u.source.array().ndim == 4)
    name = conv.source.name
    for init in proto.graph.initializer:
        if init.name == name:
            array = onnx.numpy_helper.to_array(init).astype(np.float32).copy()
            array[0] = np.float32(1e-30)  # (1e-60, 1e-90: 0 in float32, not in float64)
            init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    analysis = analyze_model(ir.from_proto(proto), {})
    assert conv.shape[2:] == (3, 3)  # (a window of 9: the float32 windows' path)
    single = OrbitTerms.build(analysis, p=p, single=True)
    assert single.q.dtype == np.float64
    assert np.array_equal(single.q, OrbitTerms.build(analysis, p=p).q)


@pytest.mark.parametrize(("name", "proto"), KERNEL_MODELS, ids=[n for n, _ in KERNEL_MODELS])
def test_last_step_unread_only_below_final_gradient(
    name: str, proto: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last-step rule takes a step unread only where the gradient it predicts is at
    most FINAL_GRADIENT·F: with that bound 0 the solve is the one without the rule, bit
    for bit; with it, a solve that ends by the rule reports a gradient within it."""
    from graphteleport.passes import canonical

    terms = OrbitTerms.build(analyze_model(ir.from_proto(proto), {}), p=2.0, single=True)
    ruled = canonical.minimize(terms)
    if ruled.gradient > canonical.TOL:  # (ended by the rule: its prediction)
        assert ruled.gradient <= canonical.FINAL_GRADIENT
    monkeypatch.setattr(canonical, "FINAL_GRADIENT", 0.0)
    never, plain = canonical.minimize(terms), canonical.minimize(terms, step_tol=0.0)
    assert np.array_equal(never.u, plain.u) and never.iterations == plain.iterations

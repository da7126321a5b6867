"""CanonicalizePass: the point of a model's orbit with the least sum of squared weights.

**The problem.**  With ``u = log t`` on the *movable* cofactor pairs (free, of group
``any`` or ``positive``; :func:`graphteleport.orbit.movable_pairs`) and ``t = exp(u) > 0``,
every stored tensor the analysis rescales becomes ``W · S(u)`` and

    ``F(u) = Σ_W Σ |W · S(u)|²  =  Σ_k q_k · exp(2·(A·u)_k)``     (:mod:`graphteleport.orbit`)

The canonical form is the model at ``argmin_u F``.  Weights and biases both count —
every tensor in ``analysis.weights``, normalisation parameters and running statistics
included: the orbit acts on all of them, and only then is the minimiser unique *as a
model*.  ``F`` is a sum of exponentials of linear functions, so it is convex; along a
direction ``d`` it is constant only if ``A·d = 0`` on every row with ``q > 0``, i.e. only
if no non-zero tensor element moves along ``d`` — then the model itself does not move,
so the minimising model is unique even where ``u`` is not (ENorm's uniqueness argument,
extended to biases, BatchNorm, residual classes, heads and tied tensors alike).  Leaving
biases out would leave directions that move only biases flat, and the form not unique.
Pairs that touch no non-zero weight keep ``t = 1``.  In insert mode the constants of the
``Mul`` nodes the rewrite inserts are stored tensors of the result too, and count like any
weight (:func:`graphteleport.orbit.inserted_rows`, ``q = 1`` per element): without them a
wrapped class (``τ·f(x/τ)``, e.g. around a GELU) whose weights all scale one way lets
``F`` fall without bound, the inserted ``Mul`` s taking up the scale (measured before
this: ``max|u|`` 91 on a ConvNeXt, 519 on wav2vec2).  An absorb-mode teleport leaves every
inserted constant at 1 (it moves no wrapped pair, and an edge's pairs only together), so
the canonical forms of a model and of its absorb-mode teleports still coincide, inserted
constants included.  A ReLU-like wrap (group ``positive``) is inserted only where the sign
rule gave a pair a negative cofactor; it stores ``sign τ`` (±1, :mod:`graphteleport.
insertion`), which a positive teleport does not change (T5's ReLU FFN: these constants
stored ``τ`` and differed before).

Because ``F`` of a teleported model is ``F`` of the original shifted by the teleport's
``log|t|``, the canonical forms of a model and of any positive teleport of it coincide
(up to the rounding of the stored weights, and of ``Q`` to float32: with
``q̃_k = q_k(1 + ε_k)``, ``|ε_k| ≤ 2⁻²⁴``, the minimiser of ``F̃`` is where
``|∂F/∂u_q| = p·|Σ_k A_kq ε_k y_k| ≤ p·max|A|·2⁻²⁴·F``: ``u`` within about 1e-8 of
``F``'s own on ResNet-50, below the weights' float32 resolution).

**The solver** (:func:`minimize`): Newton's method on the products of
:class:`~graphteleport.orbit_kernel.OrbitKernel` (per conv/Gemm weight two gemv with its
``Q`` matrix instead of elementwise work over its rows; ``Q`` is held in float32 —
``OrbitTerms.build(single=True)``, each float64 sum rounded once, float64 where float32
would not hold it — which the Hessian products and the points far from the minimum read
as it is and the other points widen to float64 in cache), started at the minimiser of
the kernel's rank-one approximation (each block's terms at ``u = 0`` replaced by the
product of their row and column sums: ``O + C`` work per product instead of ``O·C``; the
start is kept only where it lowers ``F``), that approximation made again at the point
it reached (:data:`START_RESTARTS`, :func:`_rank_one_start`).  Each direction is solved
by conjugate gradients on ``H·d = −g``, preconditioned by the inverse of the rank-one
Hessian — ``diag H`` plus each bilinear block's cross term made of its row and column
sums, inverted by Woodbury's identity (:func:`~graphteleport.orbit_kernel.low_rank`; exact
where ``Q`` has rank one, so the start's steps take one CG step each; the two-level
``diag H`` plus one coarse unknown per layer or residual stream where there is no
bilinear block) — to a relative residual ``√(max|g|/F)``, capped at 0.1 and never below
``0.1·tol/(max|g|/F)`` (what the stopping test needs of the next gradient); then a
backtracking line search, which extends a full step that beat its quadratic model by
half as much again (far from the minimum Newton's step on ``e^{p·u}`` is about ``1/p``
long).  It stops when a
Newton step from a point read in float64 is at most :data:`STEP_TOL` (1e-5) in every
entry of ``u`` and predicts a gradient of at most :data:`FINAL_GRADIENT` (3e-11) relative
— that step taken without reading ``Q`` again: ``u`` is then within about
1e-8 of the minimum (the bound in :func:`_iterate`), about a float32 ulp of every weight —
or when the relative decrease of ``F`` of the last step and ``max|∂F/∂u| / F`` are both at
most ``tol`` (default 1e-12; ``F`` here is the part that moves, without rows no movable
pair reaches, such as a mask's fill value), and raises :class:`NotConverged` after
``max_iterations``.  BLAS runs on one thread meanwhile
(:func:`graphteleport.parallel.one_blas_thread`).

**Signs** (:func:`sign_values`).  ``F`` does not see signs, so a pair whose group allows
negative cofactors (free, ``any`` or ``sign``: odd activations, linear paths, insert mode)
is given its sign by a rule.  Flipping pair q flips every stored element whose ``S`` holds
q's cofactor to an odd total power, and only those.  The pairs are decided in rounds: a
pair is decided by the first non-zero element (counted uses in analysis order; within a
use, in the row order of its compact layout, then the first non-zero element of the row)
that it flips and whose other flippable pairs are all decided already; its sign makes
that element, with the flips decided so far, positive.  Which element decides which pair
depends only on the graph and on which elements are zero — the same for a model and
every teleport of it — and each decision makes the deciding element's sign the same for
both, so a model and any teleport of it (negative cofactors included) get the same
signs.  A pair no element decides (all its elements zero, or every one shared with
another undecided pair) keeps its sign; :attr:`CanonicalResult.sign_undecided` counts
them.  Positive scales do not change signs, so the rule reads the model as it comes.

The rewrite is the teleport's (:func:`graphteleport.passes.teleport.apply_values`):
range fits included (a pair moved toward 1 to keep a weight in range is listed in
``range_fixes``, and that model is then not exactly canonical).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import onnx_ir as ir

from graphteleport.algebra import with_rank
from graphteleport.analysis import AnalysisResult, analyze_model
from graphteleport.errors import GraphTeleportError
from graphteleport.options import CofactorOptions, Mode, check_input_shapes, check_mode
from graphteleport.orbit import (
    OrbitTerms,
    compact_shape,
    counted_uses,
    inserted_rows,
    stored_arrays,
    used_values,
)
from graphteleport.orbit_kernel import KernelPoint, OrbitKernel, low_rank, two_level
from graphteleport.parallel import one_blas_thread
from graphteleport.passes.teleport import TeleportResult, apply_values, result_of
from graphteleport.rewrite import streaming

FloatArray = np.ndarray
IntArray = np.ndarray
TOL = 1e-12
MAX_ITERATIONS = 200
MAX_CG = 2000
_ARMIJO = 1e-4
_EXTEND = 8.0
#: A full step is extended only where it decreased ``F`` by at least this fraction of
#: ``−gᵀd`` (the quadratic model predicts half: a step that beat it by half as much again
#: is in the exponentials' regime; near the minimum the model holds and a trial would
#: only cost a read of ``Q``).
_EXTEND_MODEL = 0.75

#: A step is extended only where it was to decrease ``F`` by more than this, relative
#: (far from the minimum; near it a decrease that beat the model is rounding).
_EXTEND_ABOVE = 1e-6

#: The rank-one start's tolerance (:func:`_rank_one_start`) and its cap on Newton steps.
START_TOL = 1e-3
START_ITERATIONS = 50
#: How many times :func:`minimize` makes the rank-one start again at the point it reached
#: (:func:`_rank_one_start`; ResNet-50's canonical form: 3 Newton / 9 CG steps → 2 / 6).
START_RESTARTS = 1


class NotConverged(GraphTeleportError):
    """The canonical form's optimisation did not converge (CLI exit 2)."""


@dataclass(frozen=True)
class Minimum:
    """What :func:`minimize` found: ``u`` (one per pair, 0 off the active pairs), the
    moving part of ``F`` before and after, Newton iterations, ``gradient``
    (``max|∂F/∂u| / F`` at ``u``), ``decrease`` (the relative decrease of ``F`` in the last
    step) — where the last step was taken unread (:data:`STEP_TOL`), ``F`` after, the
    gradient and the decrease are the quadratic model's prediction —, ``constant``, the
    part of ``Σ W²`` no movable pair reaches, ``cg_steps``, the conjugate-gradient steps
    of all Newton steps together, and ``start``, the Newton and CG steps of the rank-one
    approximation it started from (cheap: ``O + C`` a block), and ``cpu``, the CPU
    seconds (``process_time``) of making the kernel, of that start and of the Newton
    steps after it."""

    u: FloatArray
    objective_before: float
    objective_after: float
    iterations: int
    gradient: float
    decrease: float
    constant: float = 0.0
    cg_steps: int = 0
    start: tuple[int, int] = (0, 0)  # Newton and CG steps of the rank-one start
    cpu: tuple[float, ...] = ()  # CPU seconds: the kernel, the rank-one start, Newton


def minimize(
    terms: OrbitTerms,
    *,
    tol: float = TOL,
    max_iterations: int = MAX_ITERATIONS,
    start: bool = True,
    step_tol: float | None = None,
    restarts: int = START_RESTARTS,
) -> Minimum:
    """``argmin_u F(u)`` over the pairs ``F`` depends on, by preconditioned Newton-CG
    (module docstring); raises :class:`NotConverged` past ``max_iterations``.

    The criteria are relative to the *moving* part of ``F`` (:meth:`OrbitTerms.moving`);
    ``objective_before``/``after`` are that part, ``constant`` the rest.  The products are
    :class:`~graphteleport.orbit_kernel.OrbitKernel`'s (gemv per bilinear block); with
    ``start``, Newton begins at the minimiser of their rank-one approximation
    (:func:`_rank_one_start`), else at ``u = 0`` (the same minimum).  BLAS runs on one
    thread meanwhile (:func:`graphteleport.parallel.one_blas_thread`).  ``step_tol``
    (default :data:`STEP_TOL`; ``0``: never) ends the solve with a Newton step that
    small, taken without reading ``Q`` again (:func:`_iterate`).  ``restarts``: how many
    times the rank-one start is made again where it arrived (:func:`_rank_one_start`)."""
    with one_blas_thread():  # (memory-bound gemv, already on both cores: parallel)
        c0 = time.process_time()
        kernel = OrbitKernel.of(terms)
        made = time.process_time() - c0
        step = STEP_TOL if step_tol is None else step_tol
        found = _newton(kernel, tol, max_iterations, start, step, restarts)
    return dataclasses.replace(found, constant=kernel.constant, cpu=(made, *found.cpu))


def _newton(
    kernel: OrbitKernel,
    tol: float,
    max_iterations: int,
    start: bool = True,
    step_tol: float = 0.0,
    restarts: int = 0,
) -> Minimum:
    """:func:`minimize` on the kernel (its moving part); the pairs solved for are those
    with ``diag H > 0`` at ``u = 0`` (a column of some row with ``Q > 0``).  With
    ``start``, from the minimiser of the kernel's rank-one approximation
    (:func:`_rank_one_start`) where ``F`` is lower there, else from ``u = 0``."""
    u = np.zeros(kernel.num_pairs)
    at = kernel.point(u)
    assert at is not None  # no bound
    active = at.diagonal > 0
    group = functools.cache(lambda: np.where(active, kernel.group, -1))  # (if ever needed)
    f0 = at.f
    if f0 == 0.0 or not active.any():
        return Minimum(u, f0, f0, 0, 0.0, 0.0)
    first = (0, 0)
    c0 = time.process_time()
    if start and kernel.matrices:
        at, first = _rank_one_start(kernel, at, active, group, restarts)
    c1 = time.process_time()
    found = _iterate(kernel, at, active, group, tol, max_iterations, step_tol)
    cpu = (c1 - c0, time.process_time() - c1)
    return dataclasses.replace(found, objective_before=f0, start=first, cpu=cpu)


def _rank_one_start(
    kernel: OrbitKernel,
    at: KernelPoint,
    active: np.ndarray,
    group: Callable[[], IntArray],
    restarts: int = START_RESTARTS,
) -> tuple[KernelPoint, tuple[int, int]]:
    """Newton from ``at`` (``u = 0``) on the kernel's rank-one approximation at ``at``
    (:meth:`~graphteleport.orbit_kernel.OrbitKernel.rank_one`: each bilinear block's
    products cost ``O + C``) to :data:`START_TOL`, then the kernel read (in float64) at
    its minimiser; again ``restarts`` times from the point reached, with the
    approximation made there — each round kept only where ``F`` is lower than at the
    point it started from.  Returns the point reached (``at`` if no round lowered
    ``F``) and the Newton and CG steps the approximations took.

    **Why again.**  The approximation at a point ``u_k`` replaces each block's terms
    ``y_ij`` by ``r_i c_j / S`` with the exact row sums, column sums and total there, so
    at ``u_k`` it has ``F``, the gradient and ``diag H`` of the kernel itself and differs
    only in the blocks' cross terms (the rank-one Hessian ``H₁`` of
    :func:`~graphteleport.orbit_kernel.low_rank`).  Its minimiser is a step with
    ``H₁`` in place of ``H``, taken along the approximation's own exponentials: the
    error contracts by about ``‖I − H₁⁻¹H‖`` per round, for one read of ``Q`` each.
    ResNet-50 (canonicalize, p = 2): ``max|u − u*|`` 5e-2 after the first round,
    4e-3 after the second, 9e-4, 9e-5 after more; an exact Newton step from the first
    (2 CG products and a read) reaches 1e-3.  One round more than before saves Newton a
    step: 3 Newton / 9 CG → 2 / 6 (p = 2), 4 / 14 → 3 / 11 (p = 3), the same number of
    float64 reads; two rounds more cost one read more than they save."""
    steps = [0, 0]
    for _ in range(1 + restarts):
        cheap = kernel.rank_one(at)
        if cheap.outer is None or not np.isfinite(cheap.outer).all():
            break
        origin = cheap.point(at.u)
        assert origin is not None  # no bound
        try:
            found = _iterate(cheap, origin, active, group, START_TOL, START_ITERATIONS)
        except (NotConverged, np.linalg.LinAlgError):  # then from here, as without
            break
        steps[0] += found.iterations
        steps[1] += found.cg_steps
        there = kernel.point(found.u, bound=at.f)
        if there is None:
            break
        at = there
    return at, (steps[0], steps[1])


#: A Newton step whose largest entry is at most this (in ``u = log|t|``), solved by CG to
#: a relative residual of at most :data:`FINAL_RTOL`, is the last (:func:`_iterate`).
STEP_TOL = 1e-5
#: The relative CG residual a last step is solved to (at least).
FINAL_RTOL = 1e-3
#: A last step is taken unread only where the gradient the quadratic model predicts at
#: ``u + d`` (CG's residual) is at most this times ``F`` in every entry — a third of the
#: ``1e-10·F`` the tests ask of the gradient at the minimum (the prediction is within 2×
#: of the true one there); else it is taken as any step, with a read.  Where the steps
#: before left a last step of ~1e-5, :data:`FINAL_RTOL` alone can end it at ~1e-10 (the
#: 7-layer test ResNet after :data:`START_RESTARTS`: 1.1e-10); ResNet-50's last steps
#: predict 8.5e-13 (canonical form) and 2.2e-11 (cle).
FINAL_GRADIENT = 3e-11


def _unread(residual: FloatArray, f: float) -> bool:
    """A step whose CG ``residual`` (the gradient predicted after it) is this small may
    be the last, taken unread (:data:`FINAL_GRADIENT`; ``f``: ``F`` where it starts)."""
    return float(np.abs(residual).max()) <= FINAL_GRADIENT * f


def _iterate(
    kernel: OrbitKernel,
    at: KernelPoint,
    active: np.ndarray,
    group: Callable[[], IntArray],
    tol: float,
    max_iterations: int,
    step_tol: float = 0.0,
) -> Minimum:
    """Newton steps from ``at`` until the criteria hold (module docstring), or until a
    step ``d`` from a point read in float64 is at most ``step_tol`` in every entry and
    the gradient predicted at ``u + d`` at most :data:`FINAL_GRADIENT` relative: then
    ``u + d`` is returned without reading ``Q`` there (the reads that would only confirm
    it: a point for the line search, and one for each step after).

    **The last step's error.**  With ``d_N = −H⁻¹g`` Newton's exact step and ``d`` CG's
    (relative residual ``η ≤`` :data:`FINAL_RTOL`, so ``|d − d_N| ≈ η·|d_N|`` in the
    preconditioned norm), ``u + d`` is within ``|d − d_N| + |u + d_N − u*|`` of the
    minimum; the second term is quadratic: the Hessian of ``Σ q e^{p·A·u}`` changes
    along ``d`` by the factors ``e^{p·(A·d)_k} − 1 ≈ p·|A·d|``, so the next step would be
    about ``p·max|A·d|·|d|`` — with ``|d| ≤ 1e-5``, ``p ≤ 4`` and two unit coefficients a
    row, about 1e-9.  So ``u`` ends within about ``1e-3·|d| + 1e-9 ≈ 1e-8`` of the
    minimum, a relative ``|ΔS| ≈ max|A|·1e-8`` on every weight: about a float32 ulp,
    below ``Q``'s own float32 rounding (which moves ``u`` by ~1e-8 already, module
    docstring) and three orders below the 1e-5 the model and its teleports agree to.
    (ResNet-50: the steps' largest entries fall 7e-2, 4e-3, 5e-6, 3e-10 at p = 3 and
    5e-2, 1e-3, 3e-7 at p = 2; the rule ends each solve one step and one read early;
    ``u`` within 1e-9 of the solve to ``max|g|/F ≤ 1e-12``.)  The returned ``f``,
    ``gradient`` and ``decrease`` are then the quadratic model's prediction (``F +
    gᵀd/2``, CG's residual ``max|g + H·d| / F``), not read.

    While
    ``max|g|/F`` is above :data:`FLOAT32_ABOVE` and each step decreased ``F`` by at least
    :data:`FLOAT32_DECREASE` the points may be read through the float32 copies of ``Q``;
    from there on (and for every figure returned) in float64 — a point read in float32
    is read again then.  The line search reads in float64 already once ``max|g|/F`` is
    within 10× of that bound (the next point is then likely close: not read twice)."""
    f0 = at.f
    decrease = np.inf
    cg_steps = 0
    exact = False
    for iteration in range(max_iterations + 1):
        g = np.where(active, at.gradient, 0.0)
        gmax = float(np.abs(g).max()) / at.f
        close = gmax <= FLOAT32_ABOVE or decrease < FLOAT32_DECREASE
        if close and not at.exact:
            at = _exactly(kernel, at)
            g = np.where(active, at.gradient, 0.0)
            gmax = float(np.abs(g).max()) / at.f
        exact = exact or close or gmax <= 10 * FLOAT32_ABOVE  # the next point: likely close
        if gmax <= tol and decrease <= tol:
            return Minimum(at.u, f0, at.f, iteration, gmax, decrease, cg_steps=cg_steps)
        if iteration == max_iterations:
            break
        final = step_tol if at.exact else 0.0
        d, steps, residual = _newton_direction(kernel, at, g, group, _forcing(gmax, tol), final)
        cg_steps += steps
        if float(np.abs(d).max()) <= final and _unread(residual, at.f):  # the last step
            drop = -0.5 * float(g @ d)  # (CG: dᵀHd = −gᵀd, so the model's F + gᵀd/2)
            f = at.f - max(drop, 0.0)
            gnext = float(np.abs(residual).max()) / f
            u = at.u + d
            return Minimum(u, f0, f, iteration + 1, gnext, drop / at.f, cg_steps=cg_steps)
        f = at.f
        at = _line_search(kernel, at, g, d, exact)
        decrease = max((f - at.f) / f, 0.0)
    raise NotConverged(
        f"canonical form: no convergence in {max_iterations} Newton steps "
        f"(max |gradient|/F {gmax:.3g}, last relative decrease {decrease:.3g})"
    )


#: Above this ``max|∂F/∂u| / F`` a Newton step decreases ``F`` by far more than the
#: float32 copies' rounding (about 1e-7 relative), so its points may be read through them.
FLOAT32_ABOVE = 1e-3
#: ... and while each step decreases ``F`` by at least this much, relative.
FLOAT32_DECREASE = 1e-4


def _exactly(kernel: OrbitKernel, at: KernelPoint) -> KernelPoint:
    """The kernel at ``at.u`` in float64."""
    found = kernel.point(at.u)
    assert found is not None  # no bound
    return found


def _forcing(gmax: float, tol: float) -> float:
    """The relative CG residual a Newton step solves to: ``√gmax`` (superlinear
    convergence), but no tighter than ``0.1·tol/gmax`` — what the step's new gradient
    (about the residual) needs to pass the ``tol`` criterion — and at most 0.1."""
    return min(0.1, max(float(np.sqrt(gmax)), 0.1 * tol / gmax if gmax > 0 else 0.1))


def _newton_direction(
    kernel: OrbitKernel,
    at: KernelPoint,
    g: FloatArray,
    group: Callable[[], IntArray],
    rtol: float,
    final: float = 0.0,
) -> tuple[FloatArray, int, FloatArray]:
    """``d ≈ −H⁻¹g`` on the active pairs (``g ≠ 0`` only there): conjugate gradients to a
    residual of ``rtol·|g|`` (H is positive semidefinite and ``g`` lies in its range) —
    or of :data:`FINAL_RTOL`·``|g|`` instead where ``d`` is at most ``final`` in every
    entry and the residual within :data:`FINAL_GRADIENT` (:func:`_unread`; :func:`_iterate`'s
    last step: that residual bounds its error) —, preconditioned by
    :func:`~graphteleport.orbit_kernel.low_rank` (by
    :func:`~graphteleport.orbit_kernel.two_level` where the kernel has no bilinear
    block); the number of steps taken and the residual ``−g − H·d``."""
    active = g != 0
    precondition = low_rank(kernel, at, active) or two_level(kernel, at, active, group())
    x = np.zeros_like(g)
    r = -g
    z = precondition(r)
    p = z.copy()
    rz = float(r @ z)
    gnorm = float(np.linalg.norm(g))
    steps = 0
    for steps in range(1, MAX_CG + 1):  # noqa: B007 (the count is returned)
        hp = np.where(active, kernel.hessian_vector(at, p), 0.0)
        php = float(p @ hp)
        if php <= 0.0:
            break
        a = rz / php
        x += a * p
        r -= a * hp
        norm = float(np.linalg.norm(r))
        last = float(np.abs(x).max()) <= final and _unread(r, at.f)  # (then FINAL_RTOL)
        if norm <= (FINAL_RTOL if last else rtol) * gnorm:
            break
        z = precondition(r)
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    if not x.any():
        return precondition(-g), steps, -g
    return x, steps, r


def _line_search(
    kernel: OrbitKernel, at: KernelPoint, g: FloatArray, d: FloatArray, exact: bool = True
) -> KernelPoint:
    """The kernel at the first of ``u + d, u + d/2, …`` that decreases ``F`` enough
    (Armijo, with a few ulps of slack for rounding near the minimum); ``at`` if none.
    A full step that decreased ``F`` by at least ``0.75·(−gᵀd)``, well beyond the
    quadratic model's ``−gᵀd/2`` (the exponentials still dominate: far from the minimum,
    Newton's step on ``e^{p·u}`` is about ``1/p`` long; :data:`_EXTEND_MODEL`,
    :data:`_EXTEND_ABOVE`) is extended to ``2d, 4d, …`` while ``F``
    keeps decreasing.  The
    points are float64 if ``exact``, else read through the float32 copies."""
    slope = float(g @ d)
    step = 1.0
    while step > 1e-30:
        bound = at.f + _ARMIJO * step * slope + 8e-16 * at.f
        found = kernel.point(at.u + step * d, bound=bound, exact=exact)
        if found is not None:
            if at.f - found.f >= _EXTEND_MODEL * -slope and -slope > _EXTEND_ABOVE * at.f:
                return _extend(kernel, at, found, d, exact)
            return found
        step /= 2
    return at


def _extend(
    kernel: OrbitKernel, at: KernelPoint, found: KernelPoint, d: FloatArray, exact: bool
) -> KernelPoint:
    """``found`` (at ``u + d``) or the kernel at the last of ``u + 2d, u + 4d, …`` (up to
    :data:`_EXTEND` · d) that kept decreasing ``F``: the trials by
    :meth:`OrbitKernel.value` (one float32 read of ``Q``), the point chosen then read as
    ``found`` was (kept only if it is below ``found``)."""
    best, lowest = 1.0, found.f
    step = 2.0
    while step <= _EXTEND:
        f = kernel.value(at.u + step * d)
        if not (np.isfinite(f) and f < lowest):
            break
        best, lowest = step, f
        step *= 2
    further = kernel.point(at.u + best * d, bound=found.f, exact=exact) if best > 1 else None
    return further if further is not None else found


#: Group codes (``Solution.code``) whose pairs may take a negative cofactor: any, sign.
SIGN_CODES = (0, 2)


def sign_values(
    analysis: AnalysisResult, arrays: Mapping[str, np.ndarray] | None = None
) -> tuple[FloatArray, int]:
    """±1 per pair by the sign rule (module docstring), read from the stored tensors
    (``arrays`` by name; default: the model's, ``ConstRef.array()``) — 1 on every pair
    that may not flip or that no element decides — and the number of flippable pairs no
    element decides."""
    sol = analysis.solution
    flippable = np.asarray(sol.free & np.isin(sol.code, SIGN_CODES), dtype=bool)
    if not flippable.any():
        return np.ones(sol.num_pairs), 0
    rows, cols, first = _sign_rows(analysis, flippable, arrays)
    signs, decided = _decide_signs(rows, cols, first, sol.num_pairs)
    return signs, int((flippable & ~decided).sum())


def _sign_rows(
    analysis: AnalysisResult, flippable: np.ndarray, arrays: Mapping[str, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray, FloatArray]:
    """Every counted use's rows (its compact layout, laid end to end): the coordinates
    ``(row, pair)`` of the flippable pairs each row with a non-zero element holds to an
    odd power, and per row its first non-zero element (0 where all are zero)."""
    pair = analysis.solution.pair
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    firsts: list[FloatArray] = []
    offset = 0
    for use in counted_uses(analysis):
        w = arrays[use.source.name] if arrays is not None else use.source.array()
        cshape = compact_shape(use)
        first = _first_nonzero(used_values(use, w), cshape)
        odd = [np.asarray(f.ids) for f in use.factors if f.exp % 2]
        parts = [_odd_factor(ids, cshape, pair, flippable, first) for ids in odd]
        if len(odd) > 1 and _shared_pair([pair[ids.reshape(-1)] for ids in odd], flippable):
            parts = [_odd(parts, analysis.solution.num_pairs)]
        rows.extend(offset + r for r, _ in parts)
        cols.extend(c for _, c in parts)
        firsts.append(first)
        offset += first.size
    empty = np.zeros(0, np.int64)
    return (
        np.concatenate(rows) if rows else empty,
        np.concatenate(cols) if cols else empty,
        np.concatenate(firsts) if firsts else np.zeros(0),
    )


def _odd_factor(
    ids: np.ndarray,
    cshape: tuple[int, ...],
    pair: np.ndarray,
    flippable: np.ndarray,
    first: FloatArray,
) -> tuple[np.ndarray, np.ndarray]:
    """One odd factor's coordinates ``(row, pair)`` within its use: the rows of the compact
    layout ``cshape`` with a non-zero element and a flippable pair there."""
    pairs = pair[np.broadcast_to(with_rank(np.asarray(ids), len(cshape)), cshape).reshape(-1)]
    at = np.flatnonzero(flippable[pairs] & (first != 0))
    return at, pairs[at]


def _shared_pair(pairs: list[np.ndarray], flippable: np.ndarray) -> bool:
    """Two factors of one use (the pairs of their ids) reach a common flippable pair (a
    row may hold it twice)."""
    seen = np.zeros(0, np.int64)
    for p in pairs:
        mine = np.unique(p[flippable[p]])
        if np.intersect1d(seen, mine, assume_unique=True).size:
            return True
        seen = np.union1d(seen, mine)
    return False


def _odd(
    parts: list[tuple[np.ndarray, np.ndarray]], num_pairs: int
) -> tuple[np.ndarray, np.ndarray]:
    """One use's coordinates met an odd number of times (two factors of a row on one pair,
    ``τ_out/τ_in`` of one class, cancel: ``(±1)² = 1``)."""
    keys = np.concatenate([r.astype(np.int64) * num_pairs + c for r, c in parts])
    keys, counts = np.unique(keys, return_counts=True)
    keys = keys[counts % 2 == 1]
    return keys // num_pairs, keys % num_pairs


def _first_nonzero(values: np.ndarray, cshape: tuple[int, ...]) -> FloatArray:
    """Per row of the compact layout ``cshape`` (row-major), the first non-zero element of
    the values it covers (those along the axes where ``cshape`` is 1), float64, 0 where
    none is; non-finite elements count as zero (a mask's fill: never flipped)."""
    v = np.asarray(values)
    kept = [k for k, c in enumerate(cshape) if c != 1 or v.shape[k] == 1]
    summed = [k for k in range(v.ndim) if k not in kept]
    grid = np.transpose(v, kept + summed).reshape(int(np.prod(cshape)), -1)
    hit = grid != 0
    if grid.dtype.kind in "fc":
        hit &= np.isfinite(grid)
    if not grid.size:
        return np.zeros(grid.shape[0])
    at = np.argmax(hit, axis=1)
    every = np.arange(grid.shape[0])
    out: FloatArray = np.where(hit[every, at], grid[every, at], 0).astype(np.float64)
    return out


def _decide_signs(
    rows: np.ndarray, cols: np.ndarray, first: FloatArray, num_pairs: int
) -> tuple[FloatArray, np.ndarray]:
    """The rounds of the sign rule (module docstring): each round decides every pair that
    is the one undecided pair of some row with a non-zero element, by its first such row;
    rows with no undecided pair left are dropped.  Returns the signs and which pairs were
    decided."""
    negative = first < 0
    signs = np.ones(num_pairs)
    decided = np.zeros(num_pairs, dtype=bool)
    while rows.size:
        open_ = ~decided[cols]
        count = np.bincount(rows[open_], minlength=first.size)
        ready = open_ & (count[rows] == 1)
        if not ready.any():
            break
        flips = np.bincount(rows[~open_ & (signs[cols] < 0)], minlength=first.size)
        r, q = rows[ready], cols[ready]
        order = np.lexsort((r, q))  # per pair, its first row
        r, q = r[order], q[order]
        lead = np.r_[True, q[1:] != q[:-1]]
        r, q = r[lead], q[lead]
        signs[q] = np.where(negative[r] ^ (flips[r] % 2 == 1), -1.0, 1.0)
        decided[q] = True
        alive = np.bincount(rows[~decided[cols]], minlength=first.size)[rows] > 0
        rows, cols = rows[alive], cols[alive]
    return signs, decided


@dataclass
class CanonicalResult(TeleportResult):
    """What :class:`CanonicalizePass` did: the teleport it applied (``pair_values``:
    ``t = ±exp(u)`` on the active pairs, the sign by the sign rule; ±1 or 1 elsewhere),
    the pairs the sign rule flipped and could not decide, and the optimisation
    (:class:`Minimum`: ``F`` before and after, iterations, final gradient)."""

    minimum: Minimum | None = None
    flipped: int = 0  # pairs the sign rule gave −1 (:func:`sign_values`)
    sign_undecided: int = 0  # flippable pairs no element decided (their signs kept)

    @property
    def objective_before(self) -> float:
        return self.minimum.objective_before if self.minimum else 0.0

    @property
    def objective_after(self) -> float:
        return self.minimum.objective_after if self.minimum else 0.0


class CanonicalizePass(ir.passes.InPlacePass):
    """Rewrite a model in place into its canonical form (module docstring).

    Example::

        model = ir.load("model.onnx")
        result = CanonicalizePass()(model)
        print(result.minimum.iterations, result.objective_before, result.objective_after)
    """

    def __init__(
        self,
        *,
        mode: Mode = "absorb",
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        tol: float = TOL,
        max_iterations: int = MAX_ITERATIONS,
    ) -> None:
        """``mode`` of the analysis (insert mode frees more pairs and may add ``Mul``
        nodes), ``input_shapes`` for dynamic axes, the solver's ``tol`` and cap."""
        super().__init__()
        self.options = CofactorOptions(mode=check_mode(mode), seed=0)
        check_input_shapes(input_shapes or {})
        self.input_shapes = dict(input_shapes or {})
        self.tol = tol
        self.max_iterations = max_iterations

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> CanonicalResult:
        """Canonicalize the model in place (onnx_ir's pass protocol, with the result typed:
        :meth:`call` returns a :class:`CanonicalResult`)."""
        return cast(CanonicalResult, super().__call__(model_or_result))

    def call(self, model: ir.Model) -> CanonicalResult:
        opts = self.options
        t0 = time.perf_counter()
        analysis = analyze_model(model, self.input_shapes, opts.mode)
        t1 = time.perf_counter()
        arrays = stored_arrays(analysis, writable=not streaming())  # (consumed by the rewrite)
        terms = OrbitTerms.build(analysis, arrays=arrays, single=True)
        if opts.mode == "insert":  # the inserted constants are weights too (module docstring)
            terms = terms.with_rows(*inserted_rows(analysis, lambda n: 1.0))
        found = minimize(terms, tol=self.tol, max_iterations=self.max_iterations)
        t2 = time.perf_counter()
        signs, undecided = sign_values(analysis, arrays)
        del terms
        values = np.exp(found.u) * signs
        held = None if streaming() else arrays  # (streamed: each map released once read)
        del arrays
        insert = opts.mode == "insert"
        applied = apply_values(
            model, analysis, values, insert=insert, arrays=held, consume=held is not None
        )
        seconds = {"analyze": t1 - t0, "solve": t2 - t1, "rewrite": time.perf_counter() - t2}
        flipped = int((signs < 0).sum())
        return result_of(
            CanonicalResult, model, analysis, opts, values, applied, seconds,
            minimum=found, flipped=flipped, sign_undecided=undecided,
        )  # fmt: skip

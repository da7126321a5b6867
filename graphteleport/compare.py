"""Is model B model A teleported?  Match the graphs, fit the cofactors, report what does not fit.

**Graphs.**  B must be A's graph up to names (:func:`match_graphs`): the same nodes in the
same order (op, domain, attributes — a Constant's tensor only by dtype and shape), each
input read from the same place (a graph input, the same output of the same node, or a
stored tensor of the same shape).  Insert mode's ``Mul`` nodes change the graph and are
out of scope: such a B is refused as a different graph.

**Cofactors.**  A teleport in absorb mode writes ``W' = W · S`` for every use of every
weight (:mod:`graphteleport.algebra`), ``S = Π_f τ[f.ids]^f.exp`` with ``τ_n = t_p`` or
``1/t_p`` (an inverse member).  With ``u = log|t|`` per pair,

    ``log|S|[k] = Σ_f f.exp · σ_n · u[pair[n]]``,   ``σ_n = −1`` for an inverse member,

linear in ``u``.  Per use the element ratios ``r = B/A`` (where A and B are non-zero) are
summed per cell of the use's compact layout (the elements one ``S`` value covers), and
``u`` of the free pairs is the least-squares fit of ``log|r|``: conjugate gradients on the
normal equations ``MᵀNM u = MᵀN ȳ`` (N: elements per cell), matrix-free: ``MᵀNM`` is
the Hessian of the orbit objective with ``Q = N`` at ``u = 0``, so its products are
:class:`graphteleport.orbit_kernel.OrbitKernel`'s (two gemv per conv/Gemm weight) and
its preconditioner the inverse of its rank-one approximation (each weight's ``N``
replaced by the rank-one matrix of its row and column sums; :func:`normal_system`), then
reweighted toward least absolute deviations so that a fine-tuned weight does not drag
its neighbours' classes.  Signs come first: a pair that may be negative (groups any and
sign) takes the sign its weights' ratios vote for, cell by cell, once every other pair
of the cell is known (peeling from the pinned inputs, as a teleport's signs propagate);
pairs no vote reaches stay positive.  A sign group's ``|t|`` is 1 (``u = 0``).

**Verdict.**  ``same`` when every element's ``|log|r| − log|S(u)||`` is at most the
tolerance (``1e-5`` scaled by the weight dtype's epsilon over float32's), no sign differs
from ``S``'s, no element is zero in one model only, and every other stored tensor is
equal; else ``different``, naming the weights and the cofactor classes (pairs, with the
layer that created them) whose elements do not fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphteleport.algebra import with_rank
from graphteleport.analysis import Absorb, AnalysisResult, Solution, analyze_model
from graphteleport.errors import InputError
from graphteleport.frontends import onnx as onnx_frontend
from graphteleport.io import check_paths, load_model, write_file_atomic
from graphteleport.orbit import OrbitTerms, compact_shape, counted_uses, used_values
from graphteleport.orbit_kernel import OrbitKernel, low_rank, two_level
from graphteleport.parallel import one_blas_thread

FloatArray = np.ndarray
IntArray = np.ndarray
TOLERANCE_FLOAT32 = 1e-5
_EPS32 = float(np.finfo(np.float32).eps)
_MAX_LISTED = 50


# -- the data of one use -----------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class UseData:
    """One counted use of a weight (:func:`~graphteleport.orbit.counted_uses`): its rows in
    the orbit map (``span``, one per cell of its compact layout ``cshape``), the pairs of
    its odd factors per cell (they set the sign of ``S``), the ratios ``B/A`` in the use's
    shape (float64), which elements are fitted (both non-zero and normal), and per cell
    the elements fitted (``n``), their summed ``log|r|`` and their summed sign."""

    weight: str
    span: tuple[int, int]
    cshape: tuple[int, ...]
    odd_pairs: tuple[IntArray, ...]
    ratio: FloatArray
    valid: IntArray
    zero_mismatch: int
    n: FloatArray
    log_sum: FloatArray
    sign_sum: FloatArray

    @classmethod
    def of(
        cls,
        use: Absorb,
        sol: Solution,
        span: tuple[int, int],
        ab: tuple[FloatArray, FloatArray],
        tiny: float,
    ) -> UseData:
        """The data of ``use`` from A's and B's tensor as it reads them (``ab``, float64);
        elements below ``tiny`` (the dtype's smallest normal) are not fitted."""
        a, b = ab
        cshape = compact_shape(use)
        valid = (np.abs(a) >= tiny) & (np.abs(b) >= tiny)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(valid, b / np.where(valid, a, 1.0), 1.0)
        axes = cell_axes(ratio.shape, cshape)

        def cells(x: np.ndarray) -> FloatArray:
            out: FloatArray = x.sum(axis=axes, keepdims=True).astype(np.float64).reshape(-1)
            return out

        odd = tuple(
            np.broadcast_to(sol.pair[with_rank(f.ids, len(cshape))], cshape).reshape(-1)
            for f in use.factors
            if f.exp % 2
        )
        return cls(
            weight=use.source.name,
            span=span,
            cshape=cshape,
            odd_pairs=odd,
            ratio=ratio,
            valid=valid,
            zero_mismatch=int(np.count_nonzero((a == 0) != (b == 0))),
            n=cells(valid),
            log_sum=cells(np.where(valid, np.log(np.abs(ratio)), 0.0)),
            sign_sum=cells(np.where(valid, np.sign(ratio), 0.0)),
        )

    def sign(self, s: FloatArray) -> FloatArray:
        """The sign of ``S`` per cell for pair signs ``s`` (±1): its odd factors' product."""
        out = np.ones(math.prod(self.cshape))
        for p in self.odd_pairs:
            out = out * s[p]
        return out


def cell_axes(full: tuple[int, ...], compact: tuple[int, ...]) -> tuple[int, ...]:
    """The axes of ``full`` that one compact cell spans (size 1 in ``compact``)."""
    ranked = (1,) * (len(full) - len(compact)) + tuple(compact)
    return tuple(ax for ax, (f, c) in enumerate(zip(full, ranked, strict=True)) if c == 1 and f > 1)


@dataclass(frozen=True, eq=False)
class Observations:
    """Every counted use's data, and per row of the orbit map (``terms``) the elements
    fitted (``n``), their mean ``log|r|`` and summed sign, concatenated in row order."""

    terms: OrbitTerms
    uses: tuple[UseData, ...]
    n: FloatArray
    mean: FloatArray

    @classmethod
    def of(cls, terms: OrbitTerms, uses: Sequence[UseData]) -> Observations:
        n = _rows(terms, uses, lambda d: d.n)
        log_sum = _rows(terms, uses, lambda d: d.log_sum)
        return cls(terms, tuple(uses), n, log_sum / np.maximum(n, 1.0))


def _rows(terms: OrbitTerms, uses: Sequence[UseData], get: Any) -> FloatArray:
    out = np.zeros(terms.q.size)
    for d in uses:
        out[d.span[0] : d.span[1]] = get(d)
    return out


# -- graph matching ----------------------------------------------------------------------------
def _stored(value: ir.Value | None) -> np.ndarray | None:
    """The stored tensor a value holds (an initializer or a Constant's output), or None."""
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return np.asarray(node.attributes["value"].as_tensor().numpy())
    return None


def _attr_key(attr: ir.Attr) -> object:
    """What two attributes must share: a tensor's dtype and shape, otherwise the value."""
    if attr.type == ir.AttributeType.TENSOR:
        t = attr.as_tensor()
        return ("tensor", t.dtype, tuple(t.shape))
    if attr.type == ir.AttributeType.GRAPH:
        return ("graph", len(attr.as_graph()))
    return (attr.type, repr(attr.value))


def _where(
    value: ir.Value | None, index: dict[ir.Node, int], inputs: dict[ir.Value, int]
) -> object:
    """Where a node input comes from: nothing, a graph input, a node's output, a stored
    tensor (by dtype and shape)."""
    if value is None:
        return None
    if value in inputs:
        return ("input", inputs[value])
    node = value.producer()
    if node is not None and node in index:
        return ("node", index[node], value.index())
    if value.const_value is not None:
        return ("stored", value.const_value.dtype, tuple(value.const_value.shape))
    return ("outer", value.name)


def match_graphs(a: ir.Model, b: ir.Model) -> dict[ir.Node, ir.Node]:
    """A's nodes to B's, when B is A's graph up to names (module docstring); else
    :class:`InputError` naming the first difference."""
    na, nb = list(a.graph), list(b.graph)
    if len(na) != len(nb):
        raise InputError(f"different graphs: {len(na)} nodes against {len(nb)}")
    if len(a.graph.inputs) != len(b.graph.inputs) or len(a.graph.outputs) != len(b.graph.outputs):
        raise InputError("different graphs: the graph inputs or outputs differ in number")
    ia, ib = {n: k for k, n in enumerate(na)}, {n: k for k, n in enumerate(nb)}
    ga = {v: k for k, v in enumerate(a.graph.inputs)}
    gb = {v: k for k, v in enumerate(b.graph.inputs)}
    for k, (x, y) in enumerate(zip(na, nb, strict=True)):
        what = f"node {k} ({x.op_type} {x.name!r} against {y.op_type} {y.name!r})"
        if (x.domain, x.op_type, len(x.outputs)) != (y.domain, y.op_type, len(y.outputs)):
            raise InputError(f"different graphs: {what}")
        if {n: _attr_key(t) for n, t in x.attributes.items()} != {
            n: _attr_key(t) for n, t in y.attributes.items()
        }:
            raise InputError(f"different graphs: the attributes of {what} differ")
        if [_where(v, ia, ga) for v in x.inputs] != [_where(v, ib, gb) for v in y.inputs]:
            raise InputError(f"different graphs: the inputs of {what} differ (or their shapes)")
    return dict(zip(na, nb, strict=True))


# -- the report --------------------------------------------------------------------------------
@dataclass
class WeightFit:
    """How one stored tensor fits: elements fitted, the largest and RMS residual
    ``|log|r| − log|S(u)||``, elements whose sign differs from ``S``'s, elements zero in
    one model only."""

    name: str
    elements: int
    max_residual: float
    rms_residual: float
    sign_mismatches: int
    zero_mismatches: int


@dataclass
class ClassMisfit:
    """A cofactor pair some of whose weight elements do not fit: the layer that created
    its first neuron (``block``, ``op``), its recovered value, and the elements over
    tolerance."""

    pair: int
    block: str
    op: str
    value: float
    elements: int


@dataclass
class Comparison:
    """The comparison of B with A: the verdict, the tolerance, the residual (max and RMS
    over every fitted element), the recovered value of every pair (``pair_values``: 1
    for pinned and undetermined pairs), the free pairs, the weights that do not fit, the
    classes that do not fit, the stored tensors no cofactor touches that differ, and the
    solver's iterations and seconds."""

    model_a: str
    model_b: str
    same: bool
    tolerance: float
    max_residual: float
    rms_residual: float
    pair_values: FloatArray
    free: IntArray
    undetermined: int
    weights: list[WeightFit]
    misfit_weights: list[str]
    misfit_classes: list[ClassMisfit]
    unexplained: list[str]
    iterations: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "same" if self.same else "different"

    def to_json(self) -> dict[str, Any]:
        free = np.flatnonzero(self.free)
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "verdict": self.verdict,
            "tolerance": self.tolerance,
            "max_residual": _finite(self.max_residual),
            "rms_residual": _finite(self.rms_residual),
            "free_cofactors": int(free.size),
            "undetermined_cofactors": self.undetermined,
            "cofactors": {str(int(p)): float(self.pair_values[p]) for p in free},
            "misfit_weights": list(self.misfit_weights),
            "misfit_classes": [asdict(c) for c in self.misfit_classes],
            "unexplained": list(self.unexplained),
            "weights": [asdict(w) for w in self.weights],
            "iterations": self.iterations,
            "seconds": dict(self.seconds),
        }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# -- the fit -----------------------------------------------------------------------------------
def _collect(
    analysis: AnalysisResult, nodes: Mapping[ir.Node, ir.Node]
) -> tuple[Observations, dict[str, np.dtype[Any]], list[str]]:
    """The observations of every counted use, each weight's dtype, and the weights whose
    uses read different tensors in B (A's uses share one)."""
    terms = OrbitTerms.build(analysis, p=1.0)
    sol = analysis.solution
    spans = dict(zip(map(id, counted_uses(analysis)), terms.spans, strict=True))
    data: list[UseData] = []
    dtypes: dict[str, np.dtype[Any]] = {}
    split: list[str] = []
    for w in analysis.weights:
        a_src = w.source.array()
        dtypes[w.name] = a_src.dtype
        read = [_stored(nodes[u.node].inputs[u.input_index]) for u in w.uses]
        first = read[0]
        if not w.private and any(
            r is None or first is None or not _equal(r, first) for r in read[1:]
        ):
            split.append(w.name)
        for use, b_read in zip(w.uses, read, strict=True):
            if id(use) not in spans:
                continue
            b_src = b_read if use.index is None else _source_in_b(use, nodes)
            if b_src is None:
                raise InputError(f"different graphs: {w.name} is not a stored tensor in B")
            tiny = float(np.finfo(a_src.dtype).tiny)
            ab = _use_arrays(use, a_src, b_src)
            data.append(UseData.of(use, sol, spans[id(use)], ab, tiny))
    return Observations.of(terms, data), dtypes, split


def _use_arrays(use: Absorb, a: np.ndarray, b: np.ndarray) -> tuple[FloatArray, FloatArray]:
    """A's and B's tensor as the use reads it (float64, in its shape); B's may be A's
    broadcast-expanded (a teleport stores a scalar per channel where ``S`` varies)."""
    if (use.index is not None and b.shape != a.shape) or (
        use.index is None and b.size != a.size and not use.expand
    ):
        raise InputError(f"different graphs: {use.source.name} has another shape in B")
    try:
        b_use = used_values(use, b) if b.size == a.size else _expanded(use, b)
    except ValueError as e:
        raise InputError(f"different graphs: {use.source.name} has another shape in B") from e
    return used_values(use, a).astype(np.float64), np.asarray(b_use, dtype=np.float64)


def _expanded(use: Absorb, b: np.ndarray) -> np.ndarray:
    return np.broadcast_to(with_rank(b, len(use.shape)), use.shape)


def _source_in_b(use: Absorb, nodes: Mapping[ir.Node, ir.Node]) -> np.ndarray | None:
    """B's tensor at the place of A's source (found through a node that reads it)."""
    for consumer, k in use.source.stored.uses():
        if consumer in nodes:
            return _stored(nodes[consumer].inputs[k])
    return None


def _signs(obs: Observations, sol: Solution) -> FloatArray:
    """Pair signs (±1): +1 where the group is positive or pinned; a pair that may be
    negative takes the sign its cells vote for (weighted by elements) once it is the only
    unknown odd factor of the cell, round after round (module docstring)."""
    s = np.ones(sol.num_pairs)
    unknown = sol.free & ((sol.group == "any") | (sol.group == "sign"))
    while unknown.any():
        votes = np.zeros(sol.num_pairs)
        for d in obs.uses:
            _vote(d, s, unknown, votes)
        decided = unknown & (votes != 0)
        if not decided.any():
            break
        s[decided] = np.sign(votes[decided])
        unknown = unknown & ~decided
    return s


def _vote(d: UseData, s: FloatArray, unknown: IntArray, votes: FloatArray) -> None:
    """Add the votes of a use's cells with exactly one unknown odd factor: the sign of
    their ratios over the known factors' signs."""
    size = math.prod(d.cshape)
    count, which, known = np.zeros(size), np.zeros(size, np.int64), np.ones(size)
    for p in d.odd_pairs:
        unk = unknown[p]
        count += unk
        which += np.where(unk, p, 0)
        known *= np.where(unk, 1.0, s[p])
    sel = (count == 1) & (d.sign_sum != 0)
    votes += np.bincount(which[sel], weights=d.sign_sum[sel] * known[sel], minlength=votes.size)


#: How :func:`_solve` forms the normal products: ``"kernel"`` (default) by
#: :class:`~graphteleport.orbit_kernel.OrbitKernel` (gemv per conv/Gemm weight, rank-one
#: preconditioner), ``"rows"`` row by row through :class:`~graphteleport.orbit.OrbitTerms`
#: with Jacobi (the reference: tests and ``bench/bench_compare.py`` check one against the other).
PRODUCTS = ("kernel", "rows")


def normal_system(
    terms: OrbitTerms, w: FloatArray, products: str = "kernel"
) -> tuple[Callable[[FloatArray], FloatArray], FloatArray, Callable[[FloatArray], FloatArray]]:
    """The normal matrix ``AᵀWA`` of the orbit map ``A`` (``terms``, built at ``p = 1``)
    with row weights ``w``, as its product ``v ↦ AᵀWA v``, its diagonal and a
    preconditioner.  By the kernel: ``AᵀWA`` is the Hessian ``p² Aᵀ diag(y) A`` of the
    orbit objective with ``Q = w`` at ``u = 0`` (there ``y = Q``), so
    :meth:`~graphteleport.orbit_kernel.OrbitKernel.hessian_vector` (float64 ``Q``) is the
    product and :func:`~graphteleport.orbit_kernel.low_rank` the preconditioner (the
    inverse of ``AᵀWA`` with each conv/Gemm weight's ``W`` replaced by the rank-one
    matrix of its row and column sums, by Woodbury's identity; exact where ``W`` has rank
    one, as for a model against its own teleport; where there is no such weight,
    :func:`~graphteleport.orbit_kernel.two_level`, Jacobi plus one coarse unknown per
    layer or residual stream); by ``"rows"``:
    ``Aᵀ(w ⊙ A v)`` and Jacobi.  The movable pairs with a zero diagonal are left to the
    caller."""
    diag = terms.pair_sums(w, squared=True)
    active = terms.movable & (diag > 0)
    if products == "rows":
        inv = np.where(active, 1.0 / np.where(active, diag, 1.0), 0.0)
        return (lambda v: terms.pair_sums(w * terms.log_scale(v))), diag, (lambda r: inv * r)
    kernel = OrbitKernel.of(dataclasses.replace(terms, q=w), float32=False)
    at = kernel.point(np.zeros(terms.num_pairs))
    assert at is not None  # no bound
    group = np.where(active, kernel.group, -1)
    precondition = low_rank(kernel, at, active) or two_level(kernel, at, active, group)
    return (lambda v: kernel.hessian_vector(at, v)), diag, precondition


def _solve(
    obs: Observations, w: FloatArray, products: str, *, rtol: float = 1e-12
) -> tuple[FloatArray, IntArray, int]:
    """``u`` minimizing ``Σ w·(ȳ − A·u)²`` over the rows (``ȳ`` a row's mean ``log|r|``,
    ``A`` the orbit map, :class:`~graphteleport.orbit.OrbitTerms`) over its movable pairs,
    by preconditioned conjugate gradients on ``AᵀWA u = AᵀW ȳ`` (:func:`normal_system`);
    also the movable pairs no fitted element reaches (left at 0) and the iterations."""
    terms = obs.terms
    product, diag, precondition = normal_system(terms, w, products)
    active = terms.movable & (diag > 0)
    rhs = np.where(active, terms.pair_sums(w * obs.mean), 0.0)

    def normal(u: FloatArray) -> FloatArray:
        return np.where(active, product(u), 0.0)

    u, its = _cg(normal, rhs, precondition, rtol, maxiter=10 * terms.num_pairs + 100)
    return np.where(active, u, 0.0), terms.movable & ~active, its


def _robust_fit(
    obs: Observations, delta: float, products: str = "kernel", rounds: int = 6
) -> tuple[FloatArray, IntArray, int]:
    """The least-squares fit, then iteratively reweighted toward least absolute deviations:
    a row whose mean residual exceeds ``delta`` weighs ``n·delta/|residual|``.  For a
    teleport every residual is rounding, under ``delta``, and the first fit stands; after
    a fine-tune the rows that moved drag the others less, so the misfit stays mostly on
    the weights and classes that changed.  Skipped when most elements misfit (a model
    fine-tuned throughout): then no minority of outliers is there to single out, and the
    verdict needs no more rounds."""
    u, undetermined, its = _solve(obs, obs.n, products)
    total = float(obs.n.sum())
    for _ in range(rounds):
        res = np.abs(obs.mean - obs.terms.log_scale(u))
        off = float(obs.n[res > delta].sum())
        if off == 0 or off > total / 2:  # all fit, or most moved: nothing to localize
            break
        u, undetermined, more = _solve(obs, obs.n * delta / np.maximum(res, delta), products)
        its += more
    return u, undetermined, its


def _cg(
    op: Callable[[FloatArray], FloatArray],
    rhs: FloatArray,
    precondition: Callable[[FloatArray], FloatArray],
    rtol: float,
    maxiter: int,
) -> tuple[FloatArray, int]:
    """Preconditioned conjugate gradients for ``op(u) = rhs``."""
    u = np.zeros_like(rhs)
    r = rhs.copy()
    z = precondition(r)
    p = z.copy()
    rz = float(r @ z)
    stop = rtol * max(float(np.linalg.norm(rhs)), 1e-300)
    for k in range(maxiter):
        if float(np.linalg.norm(r)) <= stop:
            return u, k
        q = op(p)
        pq = float(p @ q)
        if pq <= 0:
            return u, k
        alpha = rz / pq
        u += alpha * p
        r -= alpha * q
        z = precondition(r)
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return u, maxiter


# -- residuals and classes ---------------------------------------------------------------------
#: A weight's tally (float64, summed over its uses but for the maximum): elements fitted,
#: squared residuals, sign mismatches, zero mismatches, the largest residual.
ELEMENTS, SQUARES, SIGNS, ZEROS, LARGEST = range(5)


def _residuals(
    obs: Observations, u: FloatArray, s: FloatArray, tol: Mapping[str, float]
) -> tuple[dict[str, FloatArray], FloatArray]:
    """Per weight its tally, and per row the elements over tolerance or of another sign."""
    tallies: dict[str, FloatArray] = {}
    logs_all = obs.terms.log_scale(u)
    bad_rows = np.zeros(logs_all.size)
    for d in obs.uses:
        t = tallies.setdefault(d.weight, np.zeros(5))
        lo, hi = d.span
        logs = logs_all[lo:hi].reshape(d.cshape)
        with np.errstate(divide="ignore"):
            res = np.where(d.valid, np.abs(np.log(np.abs(d.ratio)) - logs), 0.0)
        wrong_sign = d.valid & (np.sign(d.ratio) != d.sign(s).reshape(d.cshape))
        bad = (res > tol[d.weight]) | wrong_sign
        t[:LARGEST] += (
            np.count_nonzero(d.valid),
            np.sum(res * res),
            np.count_nonzero(wrong_sign),
            d.zero_mismatch,
        )
        t[LARGEST] = max(t[LARGEST], float(res.max(initial=0.0)))
        bad_rows[lo:hi] = bad.sum(axis=cell_axes(bad.shape, d.cshape), keepdims=True).ravel()
    return tallies, bad_rows


def _bad_per_pair(obs: Observations, bad_rows: FloatArray, num_pairs: int) -> FloatArray:
    """Per pair: the misfit elements of the rows that move with it (the orbit map's
    columns), or, for a pair with ``|t| = 1`` (sign group), whose sign it sets."""
    terms = obs.terms
    out = terms.pair_counts(bad_rows)
    signs = np.zeros(num_pairs)
    for d in obs.uses:
        for p in d.odd_pairs:
            signs += np.bincount(p, weights=bad_rows[d.span[0] : d.span[1]], minlength=num_pairs)
    return np.where(terms.movable, out, signs)


def _classes(analysis: AnalysisResult, bad: FloatArray, values: FloatArray) -> list[ClassMisfit]:
    """The free pairs some misfit element touches, most elements first, with the layer
    that created each pair's first neuron."""
    sol = analysis.solution
    hit = np.flatnonzero(sol.free & (bad > 0))
    order = hit[np.argsort(-bad[hit], kind="stable")]
    first = np.full(sol.num_pairs, -1, np.int64)
    neurons = np.arange(sol.n)[::-1]
    first[sol.pair[::-1]] = neurons  # the lowest neuron of each pair wins
    starts = np.asarray([b.start for b in analysis.blocks], np.int64)
    out = []
    for p in order:
        k = int(np.searchsorted(starts, first[p], side="right")) - 1
        block = analysis.blocks[k] if k >= 0 else None
        out.append(
            ClassMisfit(
                pair=int(p),
                block=block.name if block else "",
                op=block.op if block else "",
                value=float(values[p]),
                elements=int(bad[p]),
            )
        )
    return out


def _other_tensors(
    a: ir.Model, nodes: Mapping[ir.Node, ir.Node], analysis: AnalysisResult
) -> list[str]:
    """Stored tensors read by nodes that no cofactor touches and that differ in B."""
    weights = {w.source.stored for w in analysis.weights}
    seen: set[ir.Value] = set()
    out: list[str] = []
    for node in a.graph:
        for x, y in zip(node.inputs, nodes[node].inputs, strict=True):
            if x is None or x in weights or x in seen:
                continue
            seen.add(x)
            va, vb = _stored(x), _stored(y)
            if va is not None and (vb is None or not _equal(va, vb)):
                out.append(x.name or "")
    return out


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    )


def tolerance_for(dtype: np.dtype[Any], base: float = TOLERANCE_FLOAT32) -> float:
    """The residual tolerance of a weight of ``dtype``: ``base`` scaled by its epsilon
    over float32's (float64: tighter, float16: looser)."""
    return base * float(np.finfo(dtype).eps) / _EPS32


# -- the entry point ---------------------------------------------------------------------------
def compare_models(
    a: ir.Model,
    b: ir.Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    tolerance: float = TOLERANCE_FLOAT32,
    names: tuple[str, str] = ("A", "B"),
    products: str = "kernel",
) -> Comparison:
    """Decide whether ``b`` is ``a`` teleported in absorb mode (module docstring).

    Raises :class:`InputError` when the graphs differ (one line naming where).
    ``tolerance`` is the residual allowed in float32 (scaled by each weight's epsilon);
    ``products`` how the fit's normal products are formed (:data:`PRODUCTS`).
    """
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
    t0 = time.perf_counter()
    nodes = match_graphs(a, b)
    analysis = analyze_model(a, input_shapes, "absorb")
    t1 = time.perf_counter()
    obs, dtypes, split = _collect(analysis, nodes)
    sol = analysis.solution
    signs = _signs(obs, sol)
    with one_blas_thread():  # (the kernel's gemv, memory-bound: see parallel)
        u, undetermined, its = _robust_fit(obs, tolerance, products)
    values = signs * np.exp(u)
    t2 = time.perf_counter()
    tol = {n: tolerance_for(dt, tolerance) for n, dt in dtypes.items()}
    tallies, bad_rows = _residuals(obs, u, signs, tol)
    bad = _bad_per_pair(obs, bad_rows, sol.num_pairs)
    weights = [_weight_fit(n, t) for n, t in tallies.items()]
    misfit = [w.name for w in weights if _misfits(w, tol[w.name])]
    unexplained = split + _other_tensors(a, nodes, analysis)
    total = sum(t[ELEMENTS] for t in tallies.values())
    squares = sum(t[SQUARES] for t in tallies.values())
    return Comparison(
        model_a=names[0],
        model_b=names[1],
        same=not misfit and not unexplained,
        tolerance=tolerance,
        max_residual=max((w.max_residual for w in weights), default=0.0),
        rms_residual=math.sqrt(squares / total) if total else 0.0,
        pair_values=values,
        free=sol.free,
        undetermined=int(undetermined.sum()),
        weights=weights,
        misfit_weights=misfit,
        misfit_classes=_classes(analysis, bad, values),
        unexplained=unexplained,
        iterations=its,
        seconds={"analyze": t1 - t0, "fit": t2 - t1, "residual": time.perf_counter() - t2},
    )


def _weight_fit(name: str, t: FloatArray) -> WeightFit:
    rms = math.sqrt(t[SQUARES] / t[ELEMENTS]) if t[ELEMENTS] else 0.0
    counts = [int(t[k]) for k in (ELEMENTS, SIGNS, ZEROS)]
    return WeightFit(name, counts[0], float(t[LARGEST]), rms, counts[1], counts[2])


def _misfits(w: WeightFit, tol: float) -> bool:
    return w.max_residual > tol or w.sign_mismatches > 0 or w.zero_mismatches > 0


def summary_lines(c: Comparison, limit: int = 8) -> Iterator[str]:
    """The human-readable lines of a comparison (the CLI prints them)."""
    yield f"graphteleport compare: {c.model_a} vs {c.model_b}: {c.verdict}"
    yield (
        f"  residual |log|B/A| - log|S||: max {c.max_residual:.3g}, rms {c.rms_residual:.3g} "
        f"(tolerance {c.tolerance:g} in float32)"
    )
    free = np.flatnonzero(c.free)
    if free.size:
        v = c.pair_values[free]
        yield (
            f"  cofactors: {free.size} free, recovered in [{v.min():.4g}, {v.max():.4g}] "
            f"({int((v < 0).sum())} negative, {c.undetermined} undetermined)"
        )
    named = set(c.misfit_weights[:limit])
    weights = [
        f"  weight {w.name}: max residual {w.max_residual:.3g}, "
        f"{w.sign_mismatches} signs and {w.zero_mismatches} zeros differ"
        for w in c.weights
        if w.name in named
    ]
    classes = [
        f"  class {k.pair} ({k.op} {k.block!r}, t={k.value:.4g}): {k.elements} elements do not fit"
        for k in c.misfit_classes
    ]
    yield from _listed(weights, len(c.misfit_weights), limit, "weights")
    yield from _listed(classes, len(classes), limit, "classes")
    for name in c.unexplained[:_MAX_LISTED]:
        yield f"  {name}: differs, and no cofactor scales it"


def _listed(lines: Sequence[str], total: int, limit: int, what: str) -> Iterator[str]:
    """The first ``limit`` lines, then how many more ``what`` do not fit."""
    yield from lines[:limit]
    if total > limit:
        yield f"  ... {total - limit} more {what} do not fit"


def compare_files(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    tolerance: float = TOLERANCE_FLOAT32,
    report_path: str | os.PathLike[str] | None = None,
) -> Comparison:
    """:func:`compare_models` of two files (A's dynamic input axes sized as
    ``graphteleport inspect`` sizes them); with ``report_path`` the JSON report
    (:meth:`Comparison.to_json`) is written there atomically.  Paths are checked before
    any work: a missing or unreadable model, or a report path naming a model, raises
    :class:`InputError`."""
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance > 0):
        raise InputError(f"--tolerance must be a positive number, got {tolerance}")
    reports = [] if report_path is None else [("--report", report_path)]
    check_paths([("model file", path_a), ("model file", path_b)], reports)
    t0 = time.perf_counter()
    graph = onnx_frontend.load(path_a, input_shapes)
    model_b = load_model(path_b)
    load = time.perf_counter() - t0
    out = compare_models(
        graph.model,
        model_b,
        graph.input_shapes,
        tolerance=tolerance,
        names=(str(path_a), str(path_b)),
    )
    out.seconds = {"load": load, **out.seconds}
    if report_path is not None:
        write_file_atomic(report_path, json.dumps(out.to_json(), indent=2).encode())
    return out

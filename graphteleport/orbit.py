"""How a model's weights move along its orbit: ``log|S|`` is linear in ``u = log|t|``.

**The algebra.**  With one value ``t_q`` per cofactor pair q and ``u_q = log|t_q|``, a
neuron n of pair ``q = pair[n]`` gets ``log|τ_n| = sign_n · u_q`` (``sign_n = −1`` for
the pair's inverse member, :func:`graphteleport.algebra.neuron_cofactors`).  A use of a
stored tensor (an :class:`~graphteleport.analysis.Absorb`) scales by
``S = Π_f τ[f.ids]^f.exp``, so in its *compact layout* (the broadcast of its factors' id
shapes, e.g. ``[O, C, 1, 1]`` for a conv)

    ``log|S|[k] = Σ_f f.exp · sign_n · u[pair[n]]``,   ``n = f.ids`` broadcast to k,

i.e. ``log|S| = A·u`` with a sparse matrix ``A`` (one row per compact element, one column
per pair; entries summed where a row meets a pair twice).  Every element of the use that
shares the row's ``S`` is summed into one statistic

    ``Q[k] = Σ_{elements e over k} |W[e]|^p``,

so ``Σ |W'|^p = Σ_k Q[k] · exp(p · (A·u)[k])`` over the rows of every counted use: the
objective :meth:`OrbitTerms.objective` ``F(u)``.  It is a sum of exponentials of linear
functions, hence convex; its gradient is ``p · Aᵀ y`` and its Hessian ``p² · Aᵀ diag(y) A``
with ``y = Q · exp(p·A·u)`` (:meth:`OrbitTerms.gradient`, :meth:`OrbitTerms.hessian_vector`,
:meth:`OrbitTerms.hessian_diagonal`); :meth:`OrbitTerms.pair_sums` is the scatter-add
``Aᵀ v`` of any per-row values onto the pairs.

**What counts.**  Every stored tensor the analysis says absorbs a scale
(``analysis.weights``): weights, biases, normalisation parameters and running statistics
alike — all are points of the orbit.  A tensor counts once, through its first use (its
uses agree on ``S``: the analysis tied them), except a *private* tensor (shared by an
exporter's accident), whose every use counts, as the rewrite gives each its own copy.  A
use with an element map (``index``) is counted as the use reads it, ``W.flat[index]`` in
its ``shape``; a broadcast-expanded use (``expand``) counts ``W`` broadcast to its
``shape`` (what the rewrite stores once ``S`` varies along the expanded axes).
Non-finite elements (a mask's ``-inf``) count 0: a positive scale leaves them as they are.

Only *movable* pairs are columns: free pairs whose group is ``any`` or ``positive``
(``sign`` pairs have ``|t| = 1``; pinned pairs ``t = 1``).  Everything is vectorised
over the flat rows; the per-use work is a few numpy calls per factor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from graphteleport.algebra import with_rank
from graphteleport.analysis import Absorb, AnalysisResult

FloatArray = np.ndarray
IntArray = np.ndarray

#: Group codes (``Solution.code``) whose pairs a positive ``t = exp(u)`` may move.
MOVABLE_CODES = (0, 1)  # any, positive


def compact_shape(use: Absorb) -> tuple[int, ...]:
    """The shape ``S`` of a use is computed in: its factors' ids broadcast together, with
    the rank of the use's ``shape`` (all ones for a use without factors)."""
    rank = len(use.shape)
    shapes = [with_rank(f.ids, rank).shape for f in use.factors]
    return tuple(np.broadcast_shapes((1,) * rank, *shapes))


def used_values(use: Absorb, w: np.ndarray) -> np.ndarray:
    """The stored tensor ``w`` as ``use`` reads it, in ``use.shape``: gathered through its
    element map, broadcast for an expanded use, else ``w`` itself."""
    out: np.ndarray
    if use.index is not None:
        out = np.asarray(w).reshape(-1)[use.index].reshape(use.shape)
    elif use.expand:
        out = np.broadcast_to(with_rank(np.asarray(w), len(use.shape)), use.shape)
    else:
        out = np.asarray(w).reshape(use.shape)
    return out


def reduced_power(use: Absorb, w: np.ndarray, p: float) -> FloatArray:
    """``Q = Σ |W|^p`` (float64) of the use's values summed over the axes where its
    compact layout has size 1: one value per element of :func:`compact_shape`."""
    values = np.abs(used_values(use, w).astype(np.float64))
    values = np.where(np.isfinite(values), values, 0.0)  # ±inf stays ±inf: never counts
    powered = values * values if p == 2 else values**p
    cshape = compact_shape(use)
    axes = tuple(k for k, (c, s) in enumerate(zip(cshape, use.shape)) if c == 1 and s != 1)
    out: FloatArray = np.sum(powered, axis=axes, keepdims=True).reshape(cshape)
    return out


def counted_uses(analysis: AnalysisResult) -> list[Absorb]:
    """The uses the objective counts (module docstring): each tensor's first use, or all
    the uses of a private one."""
    out: list[Absorb] = []
    for weight in analysis.weights:
        out.extend(weight.uses if weight.private else weight.uses[:1])
    return out


def movable_pairs(analysis: AnalysisResult) -> IntArray:
    """Per pair: free and in a group (any, positive) that a positive ``t`` may move."""
    sol = analysis.solution
    return np.asarray(sol.free & np.isin(sol.code, MOVABLE_CODES), dtype=bool)


@dataclass(frozen=True, eq=False)
class OrbitTerms:
    """``F(u) = Σ_k q[k] · exp(p · (A·u)[k])`` for one model (module docstring).

    ``A`` is stored as coordinates: ``rows``, ``cols`` (pairs), ``coef`` (no ``(row, col)``
    twice: a use whose factors reach a common pair has its entries merged);
    ``q`` holds one statistic per row; ``spans`` gives each counted use's rows
    (``[lo, hi)`` in :func:`counted_uses` order); ``movable`` marks the pairs that are
    columns; ``num_pairs`` is the length of every ``u``.
    """

    p: float
    q: FloatArray
    rows: IntArray
    cols: IntArray
    coef: FloatArray
    movable: IntArray
    num_pairs: int
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def build(
        cls,
        analysis: AnalysisResult,
        p: float = 2.0,
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> OrbitTerms:
        """The terms of ``analysis``'s model with ``Q = Σ |W|^p``; ``arrays`` gives the
        stored tensors by name (default: read from the model, ``ConstRef.array()``)."""
        sol = analysis.solution
        movable = movable_pairs(analysis)
        sign = np.where(np.asarray(sol.inverse, dtype=bool), -1.0, 1.0)
        qs: list[FloatArray] = []
        parts: list[tuple[IntArray, IntArray, FloatArray]] = []
        spans: list[tuple[int, int]] = []
        offset = 0
        for use in counted_uses(analysis):
            w = arrays[use.source.name] if arrays is not None else use.source.array()
            q = reduced_power(use, w, p).reshape(-1)
            cshape = compact_shape(use)
            mine: list[tuple[IntArray, IntArray, FloatArray]] = []
            for f in use.factors:
                ids = np.broadcast_to(with_rank(f.ids, len(cshape)), cshape).reshape(-1)
                pairs = sol.pair[ids]
                keep = movable[pairs]
                rows = offset + np.flatnonzero(keep)
                mine.append((rows, pairs[keep], f.exp * sign[ids[keep]]))
            parts.extend(_merge(mine, sol.num_pairs) if _overlap(mine) else mine)
            qs.append(q)
            spans.append((offset, offset + q.size))
            offset += q.size
        rows, cols, coef = _concat(parts)
        q_all = np.concatenate(qs) if qs else np.zeros(0)
        return cls(float(p), q_all, rows, cols, coef, movable, sol.num_pairs, tuple(spans))

    # -- the map and its transpose --------------------------------------------------------------
    def log_scale(self, u: FloatArray) -> FloatArray:
        """``A·u``: ``log|S|`` of every row."""
        out: FloatArray = np.bincount(
            self.rows, weights=self.coef * u[self.cols], minlength=self.q.size
        )
        return out

    def pair_sums(self, values: FloatArray, squared: bool = False) -> FloatArray:
        """The scatter-add ``Aᵀ·values`` onto the pairs (``squared``: with ``coef²``,
        ``Σ_k coef[k,q]² · values[k]``); 0 on pairs that are not columns."""
        c = self.coef * self.coef if squared else self.coef
        out: FloatArray = np.bincount(
            self.cols, weights=c * values[self.rows], minlength=self.num_pairs
        )
        return out

    # -- the objective ----------------------------------------------------------------------------
    def terms(self, u: FloatArray) -> FloatArray:
        """``y = q · exp(p·A·u)``: each row's ``Σ |W'|^p`` at ``u``."""
        out: FloatArray = self.q * np.exp(self.p * self.log_scale(u))
        return out

    def objective(self, u: FloatArray) -> float:
        """``F(u) = Σ |W'|^p`` over every counted use."""
        return float(self.terms(u).sum())

    def gradient(self, u: FloatArray) -> FloatArray:
        """``∂F/∂u = p · Aᵀ y`` per pair (0 where the pair is not a column)."""
        return self.p * self.pair_sums(self.terms(u))

    def hessian_vector(self, y: FloatArray, v: FloatArray) -> FloatArray:
        """``H·v = p² · Aᵀ (y ⊙ A·v)`` for ``y = terms(u)``."""
        return self.p * self.p * self.pair_sums(y * self.log_scale(v))

    def hessian_diagonal(self, y: FloatArray) -> FloatArray:
        """``diag H = p² · Σ_k coef[k,q]² · y[k]`` for ``y = terms(u)``."""
        return self.p * self.p * self.pair_sums(y, squared=True)

    def moving(self) -> tuple[OrbitTerms, float]:
        """The rows that move (``q > 0`` and some column), as terms of their own (``spans``
        empty), and ``Σ q`` of the others: ``F(u) = moving.objective(u) + constant``.  A
        solver should work on the moving part: a constant row (a pinned mask's huge fill
        value) would swamp every relative criterion."""
        has = np.zeros(self.q.size, dtype=bool)
        has[self.rows] = True
        keep = has & (self.q > 0)
        constant = float(self.q[~keep].sum())
        new_row = np.cumsum(keep) - 1
        sub = OrbitTerms(
            self.p, self.q[keep], new_row[self.rows], self.cols, self.coef,
            self.movable, self.num_pairs, (),
        )  # fmt: skip
        return sub, constant

    def active(self) -> IntArray:
        """Per pair: a column of some row with ``q > 0`` (F moves along it); F is constant
        along every other pair."""
        hit = np.zeros(self.num_pairs, dtype=bool)
        hit[self.cols[self.q[self.rows] > 0]] = True
        return hit


def _concat(
    parts: list[tuple[IntArray, IntArray, FloatArray]],
) -> tuple[IntArray, IntArray, FloatArray]:
    """The coordinates of ``parts`` laid end to end (int64, int64, float64)."""
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    rows = np.concatenate([r for r, _, _ in parts]).astype(np.int64)
    cols = np.concatenate([c for _, c, _ in parts]).astype(np.int64)
    coef = np.concatenate([v for _, _, v in parts]).astype(np.float64)
    return rows, cols, coef


def _overlap(parts: list[tuple[IntArray, IntArray, FloatArray]]) -> bool:
    """Two factors of one use reach a common pair (some row may meet a pair twice)."""
    seen: set[int] = set()
    for _, cols, _ in parts:
        mine = set(np.unique(cols).tolist())
        if seen & mine:
            return True
        seen |= mine
    return False


def _merge(
    parts: list[tuple[IntArray, IntArray, FloatArray]], num_pairs: int
) -> list[tuple[IntArray, IntArray, FloatArray]]:
    """One use's coordinates with duplicate ``(row, col)`` summed and zeros dropped (a row
    meeting a pair twice, as ``τ_out/τ_in`` of one class, has one entry: its net power)."""
    rows, cols, coef = _concat(parts)
    keys, inverse = np.unique(rows * num_pairs + cols, return_inverse=True)
    summed = np.bincount(inverse.reshape(-1), weights=coef, minlength=keys.size)
    nz = summed != 0
    return [(keys[nz] // num_pairs, keys[nz] % num_pairs, summed[nz])]

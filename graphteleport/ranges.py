"""Fit drawn cofactors to the weights' dtypes: no weight or constant leaves its range.

The contract (:mod:`graphteleport.numerics`): no finite non-zero element of a weight
the rewrite changes, ``W' = W · S``, becomes inf, NaN, 0 or — from a normal value —
subnormal in W's dtype, and every Mul constant insert mode adds (``1/τ``, ``τ``,
products) is a normal number of its dtype.

:func:`fit` takes the drawn values (one per cofactor pair) and the weights'
:class:`~graphteleport.numerics.Magnitudes`, which :func:`graphteleport.rewrite.prepare`
measured while computing ``W'``, and repeats:

1. bound ``|S|`` of every weight from its factors' extreme ``|τ|``
   (:func:`~graphteleport.algebra.scale_bounds`) and check the bounds against the
   weight's magnitudes (vectorised: the common path stops here);
2. for a weight whose bounds fail, check it exactly: each *cell* — the elements
   sharing one ``s``, found by reducing ``W`` over the axes where ``S`` is constant —
   against its own ``s``, and take the cofactor pairs of the offending cells' factors;
3. in insert mode, check every planned Mul constant (:func:`graphteleport.insertion.plan`)
   and take the pairs its offending elements depend on;
4. move every pair taken toward 1: halve ``log|τ|`` (``τ ← sign(τ)·|τ|^½``; with
   ``exact``, halve the power of two's exponent toward 0, so τ stays a power of two).
   After ``SHRINK_ROUNDS`` rounds a pair still taken is pinned (``τ = 1``): a cell
   whose pairs are all 1 has ``|s| = 1`` and cannot offend, so the loop ends.

Only pairs that offend move; the others keep their draws.  Each pair moved is
reported once, with the first reason (:class:`RangeFix`), e.g. "cofactor would
overflow float16 weight 'W'".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from graphteleport.algebra import RowScale, gather_at, power, row_scale, scales_of, with_rank
from graphteleport.analysis import Absorb, AnalysisResult, Factor, Weight
from graphteleport.insertion import PlannedMul, plan
from graphteleport.numerics import (
    MARGIN,
    Limits,
    Magnitudes,
    MagnitudeScan,
    cell_magnitudes,
    limits,
    out_of_range,
    violations,
)
from graphteleport.parallel import map_parts, row_parts
from graphteleport.rewrite import (
    measure_finite,
    measured_array,
    prefetch,
    release,
    streaming,
    weight_bounds,
)

log = logging.getLogger(__name__)
SHRINK_ROUNDS = 12


class RangeFix(NamedTuple):
    """A cofactor pair moved toward 1 so that the weights stay in range: its final
    value (``|value| = 1``: pinned) and why.  (A named tuple: a fit makes one per pair
    moved, 319 k for the 32-layer float16 LLaMA, where a frozen dataclass's
    ``__init__`` cost ~0.3 s.)"""

    pair: int
    value: float
    reason: str

    @property
    def pinned(self) -> bool:
        return abs(self.value) == 1.0


@dataclass
class Survey:
    """Every absorbing weight's :class:`~graphteleport.numerics.Magnitudes` (in
    ``analysis.weights`` order) and, for the weights the first round of :func:`fit`
    checks cell by cell, their cells, measured in the same read (:func:`survey`)."""

    magnitudes: list[Magnitudes]
    cells: dict[tuple[int, int], tuple[np.ndarray, ...] | _AtRisk]
    shapes: dict[int, tuple[int, ...]]
    sparse: dict[int, list[tuple[list[Absorb], _AtRisk]]] = field(default_factory=dict)
    #: per weight, whether every element is finite (empty: not recorded)
    finite: list[bool] = field(default_factory=list)

    def known(self) -> list[Magnitudes | None] | None:
        """Per weight, its magnitudes where it is finite (else None), for
        :func:`~graphteleport.rewrite.prepare` not to measure them again; None where
        finiteness was not recorded."""
        if len(self.finite) != len(self.magnitudes):
            return None
        return [m if f else None for m, f in zip(self.magnitudes, self.finite, strict=True)]


def survey(
    analysis: AnalysisResult, values: np.ndarray, arrays: Mapping[str, np.ndarray] | None = None
) -> Survey:
    """Read each absorbing weight once, releasing its map after it: its magnitudes
    (:func:`~graphteleport.rewrite.measure_finite`) and, where they fail the quick check
    against the bounds of its ``|S|`` for ``values`` as drawn — the first round of
    :func:`fit` would then read it again — its cells for that round (:class:`_AtRisk`
    or :func:`~graphteleport.numerics.cell_magnitudes`), while its pages are resident:
    one read of the model, not two (a 13.5 GB model does not stay in the page cache).
    The weights are read last first, each next one prefetched
    (:func:`~graphteleport.rewrite.prefetch`): :func:`~graphteleport.rewrite.prepare`
    then starts with the weights read most recently, the ones the page cache still
    holds, where the same order twice would find the first ones evicted.  ``arrays``:
    the tensors already read, as :func:`~graphteleport.rewrite.prepare` takes them."""
    tau = analysis.solution.cofactors(values)
    smin, smax = weight_bounds(analysis, tau)
    check = _Check(analysis, [], False)
    weights = analysis.weights
    found: dict[int, Magnitudes] = {}
    finite: dict[int, bool] = {}
    for j in reversed(range(len(weights))):  # (last first: see the docstring)
        if arrays is None or streaming():
            prefetch(weights[j - 1 : j] if j else [])
        w = measured_array(weights[j], arrays)
        bounds = (float(smin[j]), float(smax[j]))
        risk = None
        if _one_pass(weights[j], w, tau):
            risk, found[j], finite[j] = _AtRisk.surveyed(w, limits(w.dtype), *bounds)
        else:
            found[j], finite[j] = measure_finite(w)
        if out_of_range([found[j]], smin[j : j + 1], smax[j : j + 1])[0]:
            check.prime(j, w, tau, bounds, risk)
        del w, risk
        release(weights[j].source)
    mags = [found[j] for j in range(len(weights))]
    ok = [finite[j] for j in range(len(weights))]
    return Survey(mags, check.cells, check.shapes, check.sparse, ok)


def fit(
    analysis: AnalysisResult,
    values: np.ndarray,
    mags: list[Magnitudes],
    *,
    insert: bool = False,
    exact: bool = False,
    primed: Survey | None = None,
) -> list[RangeFix]:
    """Move, in place, the ``values`` (one per pair) whose weights or, with ``insert``,
    Mul constants would leave their dtype's range; return what was moved and why.
    ``primed``: :func:`survey`'s cells of ``values`` as given (not read again)."""
    check = _Check(analysis, mags, insert)
    if primed is not None:
        check.cells.update(primed.cells)
        check.shapes.update(primed.shapes)
        check.sparse.update(primed.sparse)
    reason = np.full(values.size, -1, np.int64)  # per pair: its first reason (-1: none)
    texts: dict[str, int] = {}
    rounds = 0
    while True:
        pairs, given, whys = check(values).first()
        if not pairs.size:
            break
        codes = np.array([texts.setdefault(why, len(texts)) for why in whys], dtype=np.int64)
        new = reason[pairs] < 0
        reason[pairs[new]] = codes[given[new]]
        values[pairs] = _shrink(values[pairs], exact) if rounds < SHRINK_ROUNDS else 1.0
        rounds += 1
    moved = np.flatnonzero(reason >= 0)
    if moved.size:
        log.info("range: %d cofactor pairs moved toward 1 in %d rounds", moved.size, rounds)
    said = list(texts)
    return [
        RangeFix(p, v, said[k])
        for p, v, k in zip(moved.tolist(), values[moved].tolist(), reason[moved].tolist())
    ]


class _Blamed:
    """The pairs one round of :class:`_Check` blames, each with the first reason given
    for it (what ``dict.setdefault(pair, why)`` in the order given would keep), gathered
    as arrays: a round blames up to hundreds of thousands of pairs."""

    def __init__(self) -> None:
        self._found: list[tuple[np.ndarray, str]] = []

    def add(self, pairs: np.ndarray, why: str) -> None:
        if pairs.size:
            self._found.append((np.asarray(pairs, dtype=np.int64), why))

    def first(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The pairs blamed (ascending, each once), each one's first reason as an index
        into the reasons given (the third, in the order given; one per :meth:`add`)."""
        whys = [why for _, why in self._found]
        if not self._found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), whys
        pairs = np.concatenate([p for p, _ in self._found])
        code = np.repeat(np.arange(len(self._found)), [p.size for p, _ in self._found])
        unique, first = np.unique(pairs, return_index=True)
        return unique, code[first], whys


def _shrink(v: np.ndarray, exact: bool) -> np.ndarray:
    """Halve ``log|τ|``, keeping the sign (and, ``exact``, a power of two: the exponent
    is halved toward 0, ±1 becoming 0, i.e. ``|τ| = 1``)."""
    magnitude = np.exp2(np.trunc(np.log2(np.abs(v)) / 2)) if exact else np.sqrt(np.abs(v))
    return np.asarray(np.sign(v) * magnitude, dtype=np.float64)


_DENSE_CELLS = 1 << 20  # a weight with more single-element cells keeps those at risk only
_RISK_CHUNK = 1 << 20  # elements measured at a time when finding them


@dataclass(frozen=True, slots=True)
class _AtRisk:
    """The cells of a large weight whose ``S`` varies along every axis (each element its
    own cell) that some ``|s|`` in ``[smin, smax]`` takes out of range, as flat positions,
    indices per axis and cell magnitudes (a matrix: 32 bytes an element, int32 indices
    and float32 magnitudes where exact, with the neurons the fit's rounds gather).  The
    fit only moves values toward 1, so later rounds' bounds lie inside the first's and
    every other element stays safe: memory holds the few elements at risk (near 0 or the
    dtype's largest), not three float64 copies of W."""

    shape: tuple[int, ...]
    flat: np.ndarray
    at: tuple[np.ndarray, ...]  # the elements at risk as one index array per axis (every round)
    #: each element's :func:`~graphteleport.numerics.cell_magnitudes` (``|w|`` or 0 / inf),
    #: measured once; float32 where W's dtype is 4 bytes or less (its values exactly)
    cells: tuple[np.ndarray, np.ndarray, np.ndarray]
    #: per use's factors: the neurons at each element at risk (``product_at``'s gather,
    #: made on the first round that needs it and reused: ``at`` does not change)
    gathered: dict[int, list[np.ndarray]] = field(default_factory=dict)

    @classmethod
    def of(cls, w: np.ndarray, lim: Limits, smin: float, smax: float) -> _AtRisk:
        """Measure ``w`` a chunk at a time and keep its elements at risk."""
        return cls._found(w, lim, smin, smax, False)[0]

    @classmethod
    def surveyed(
        cls, w: np.ndarray, lim: Limits, smin: float, smax: float
    ) -> tuple[_AtRisk, Magnitudes, bool]:
        """:meth:`of`, and W's :class:`Magnitudes` and whether it is finite
        (:func:`~graphteleport.rewrite.measure_finite`'s figures) from the same bits:
        one read of W, each chunk's ``|w|`` bits formed once for both."""
        risk, scans = cls._found(w, lim, smin, smax, True)
        for other in scans[1:]:
            scans[0].merge(other)
        flat_w = w.reshape(-1)
        return risk, scans[0].result(flat_w), scans[0].hi < lim.inf_bits

    @classmethod
    def _found(
        cls, w: np.ndarray, lim: Limits, smin: float, smax: float, scan: bool
    ) -> tuple[_AtRisk, list[MagnitudeScan]]:
        flat_w = w.reshape(-1)
        low, high = _risk_bits(w.dtype, lim, *_risk_thresholds(w.dtype, lim, smin, smax))
        bounds = (lim, low, high, smin, smax)
        parts = [(flat_w, bounds, i, j, scan) for i, j in row_parts(flat_w.size, flat_w.size)]
        found = map_parts(_risk_range, parts)
        flats = [f for f, _, _ in found]
        mag = np.concatenate([m for _, m, _ in found])
        flat = _narrow_ids(np.concatenate(flats))
        at = tuple(_narrow_ids(i) for i in np.unravel_index(flat, w.shape))
        kind = np.float32 if w.dtype.itemsize <= 4 else np.float64
        hi, lo_n, lo_s = (c.astype(kind) for c in cell_magnitudes(mag, (), lim))
        return cls(w.shape, flat, at, (hi, lo_n, lo_s)), [s for _, _, s in found]

    def scale(
        self, factors: Sequence[Factor], tau: np.ndarray, sub: np.ndarray | None = None
    ) -> np.ndarray:
        """``S`` at the elements at risk for ``factors`` (one use's), bit for bit
        :func:`~graphteleport.algebra.product_at`'s: the same factors multiply in the
        same order; each factor's neurons at the elements are gathered once.  ``sub``:
        only at those elements (positions into ``flat``; elementwise, so the same bits)."""
        ids = self._neurons(factors)
        if sub is not None:
            ids = [i[sub] for i in ids]
        s = np.ones(ids[0].shape if ids else self.flat.shape, dtype=np.float64)
        for f, i in zip(factors, ids, strict=True):
            s = s * power(tau[i], f.exp)
        return s

    def touched(self, factors: Sequence[Factor], moved: np.ndarray) -> np.ndarray:
        """The elements at risk (positions into ``flat``, ascending) some factor of which
        has a neuron ``moved`` (per neuron: its pair moved since the last check), the
        only ones whose ``S`` may differ from that check's; a factor none of whose own
        neurons moved is not gathered."""
        hit: np.ndarray | None = None
        for f, i in zip(factors, self._neurons(factors), strict=True):
            if moved[f.ids].any():
                hit = moved[i] if hit is None else np.logical_or(hit, moved[i], out=hit)
        return np.zeros(0, np.int64) if hit is None else np.flatnonzero(hit)

    def _neurons(self, factors: Sequence[Factor]) -> list[np.ndarray]:
        """Per factor, its neurons at the elements at risk (gathered once)."""
        ids = self.gathered.get(id(factors))
        if ids is None:
            ids = self.gathered[id(factors)] = [_narrow_ids(i) for i in gather_at(factors, self.at)]
        return ids

    def violations(self, s: np.ndarray, lim: Limits) -> tuple[np.ndarray, np.ndarray]:
        """``(over, under)`` masks in W's shape, given ``s``, this round's scale at the
        elements at risk (in ``flat`` order)."""
        hi, lo_n, lo_s = self.cells  # each element its own cell
        over_k, under_k = violations(hi, lo_n, lo_s, np.abs(s), lim)
        size = int(np.prod(self.shape, dtype=np.int64))
        masks = []
        for hit in (over_k, under_k):
            mask = np.zeros(size, dtype=bool)
            mask[self.flat[hit]] = True
            masks.append(mask.reshape(self.shape))
        return masks[0], masks[1]


def _narrow_ids(ids: np.ndarray) -> np.ndarray:
    """``ids`` (indices, ≥ 0) as int32 where they fit (kept across rounds: half the
    memory)."""
    return ids.astype(np.int32) if ids.size and int(ids.max()) < 2**31 else ids


def _risk_range(
    flat_w: np.ndarray,
    bounds: tuple[Limits, np.unsignedinteger, np.unsignedinteger, float, float],
    start: int,
    stop: int,
    scan: bool = False,
) -> tuple[np.ndarray, np.ndarray, MagnitudeScan]:
    """The elements at risk among ``flat_w[start:stop]`` (flat positions, ``|w|`` as
    float64), a chunk at a time: a filter on the bits (:func:`_candidates`), then the
    exact check of the few candidates; with ``scan``, also the elements' magnitudes
    (:meth:`~graphteleport.numerics.MagnitudeScan.add_reduced`)
    from the same bits of each chunk."""
    lim, low, high, smin, smax = bounds
    mask = lim.uint.type(lim.mask)
    flats: list[np.ndarray] = [np.zeros(0, np.int64)]
    mags: list[np.ndarray] = [np.zeros(0, np.float64)]
    figures = MagnitudeScan(flat_w.dtype)
    bits = np.empty(min(_RISK_CHUNK, stop - start), dtype=lim.uint)  # (reused: no allocation
    small = np.empty(bits.size, dtype=bool)  # a chunk)
    for at in range(start, stop, _RISK_CHUNK):
        chunk = flat_w[at : min(at + _RISK_CHUNK, stop)]
        b = np.bitwise_and(chunk.view(lim.uint), mask, out=bits[: chunk.size])  # |w|'s bits
        top = int(b.max(initial=0))
        np.subtract(b, b.dtype.type(1), out=b)  # b − 1 (0 wraps to the largest integer)
        least = int(b.min(initial=np.iinfo(b.dtype).max))
        cand = _candidates(b, top, least, low, high, small[: chunk.size], chunk, lim)
        if scan:
            figures.add_reduced(b, top, least)
        hi, lo_n, lo_s = cell_magnitudes(chunk[cand], (), lim)
        over, _ = violations(hi, lo_n, lo_s, smax, lim)
        _, under = violations(hi, lo_n, lo_s, smin, lim)
        k = cand[over | under]
        flats.append(k + at)
        mags.append(np.abs(chunk[k].astype(np.float64)))
    return np.concatenate(flats), np.concatenate(mags), figures


def _candidates(
    b: np.ndarray,
    top: int,
    least: int,
    low: np.unsignedinteger,
    high: np.unsignedinteger,
    small: np.ndarray,
    chunk: np.ndarray,
    lim: Limits,
) -> np.ndarray:
    """The positions where ``0 < |w|'s bits < low`` or ``> high``, ascending, given
    ``b`` = those bits − 1 (0 wraps to the largest integer: ``0 < bits < low`` is
    ``b < low − 1``; ``small``: a bool buffer of its size), ``top`` = the largest
    bits and ``least`` = ``min b``.  The usual chunk (``top ≤ high``) takes one compare,
    none where ``least`` shows nothing below ``low``; one with elements near overflow
    forms the bits of ``chunk`` again."""
    if top > int(high):
        bits = np.bitwise_and(chunk.view(lim.uint), lim.uint.type(lim.mask))
        return np.flatnonzero(((bits > 0) & (bits < low)) | (bits > high))
    if int(low) == 0 or least >= int(low) - 1:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.less(b, b.dtype.type(int(low) - 1), out=small))


def _risk_bits(
    dtype: np.dtype, lim: Limits, low: np.floating, high: np.floating
) -> tuple[np.unsignedinteger, np.unsignedinteger]:
    """The thresholds of :func:`_risk_thresholds` as bit patterns of ``dtype``
    (magnitudes order like their bits): ``|w| < low`` exactly where ``bits < low_bits``
    (the first pattern whose value is ``≥ low``) and ``|w| > high`` where
    ``bits > high_bits`` (the last whose value is ``≤ high``; NaN patterns lie above
    inf's and are dropped by the exact check), so the filter reads W's bits only."""
    with np.errstate(over="ignore"):
        lo_v, hi_v = (np.asarray(float(t)).astype(dtype) for t in (low, high))
    lo_b, hi_b = (int(v.view(lim.uint)) for v in (lo_v, hi_v))
    lo_b += int(float(lo_v) < float(low))
    hi_b -= int(float(hi_v) > float(high))
    return lim.uint.type(lo_b), lim.uint.type(hi_b)


def _risk_thresholds(
    dtype: np.dtype, lim: Limits, smin: float, smax: float
) -> tuple[np.floating, np.floating]:
    """``(low, high)``: an element can leave the range for some ``|s|`` in
    ``[smin, smax]`` only if ``0 < |w| < low`` (made subnormal or 0 by ``smin < 1``) or
    ``|w| > high`` (made inf by ``smax > 1``) — :func:`violations`' bounds solved for
    ``|w|``, widened by one ulp of the compare dtype (float32 for weights of 4 bytes or
    less, float64 else) so the quick filter never drops an element the exact check flags."""
    kind = np.float32 if np.dtype(dtype).itemsize <= 4 else np.float64
    with np.errstate(divide="ignore", over="ignore"):
        low = lim.tiny * (1 + MARGIN) / smin if smin < 1 else 0.0
        high = lim.max * (1 - MARGIN) / smax if smax > 1 else np.inf
        low_t = np.nextafter(kind(low), kind(np.inf))
        high_t = np.nextafter(kind(high), kind(0))
    return low_t, high_t


class _Check:
    """One round's check: the offending pairs, each with a reason."""

    def __init__(self, analysis: AnalysisResult, mags: list[Magnitudes], insert: bool) -> None:
        self.analysis = analysis
        self.sol = analysis.solution
        self.mags = mags  # per weight, in ``analysis.weights`` order
        self.insert = insert
        self.cells: dict[tuple[int, int], tuple[np.ndarray, ...] | _AtRisk] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.sparse: dict[int, list[tuple[list[Absorb], _AtRisk]]] = {}
        self.round = 0  # rounds checked so far
        self._last: np.ndarray | None = None  # the values of the last round
        self._stamp = np.zeros(0, np.int64)  # per pair: the round it last moved in
        self._since: dict[int, np.ndarray] = {}  # per round k: the neurons moved since k
        self._seen: dict[int, int] = {}  # per sparse weight: the round it was checked in

    def __call__(self, values: np.ndarray) -> _Blamed:
        self._note(values)
        tau = self.sol.cofactors(values)
        bad = _Blamed()
        smin, smax = weight_bounds(self.analysis, tau)
        for j in np.flatnonzero(out_of_range(self.mags, smin, smax)):
            self._weight(int(j), tau, values, bad, (float(smin[j]), float(smax[j])))
        if self.insert:
            for m in plan(self.analysis, tau).muls:
                self._constant(m, tau, values, bad)
        return bad

    def _weight(
        self,
        j: int,
        tau: np.ndarray,
        values: np.ndarray,
        bad: _Blamed,
        bounds: tuple[float, float],
    ) -> None:
        """Check weight ``j`` cell by cell; blame the pairs of its offending cells.  The
        weight is read once (:meth:`prime`, unless :func:`survey` did): its cells'
        magnitudes are kept for later rounds — for a large weight whose every element is
        a cell, only the elements at risk within ``bounds``, this round's
        ``smin ≤ |S| ≤ smax`` (:class:`_AtRisk`), checked without W-sized masks where
        its uses allow (:meth:`_sparse`)."""
        weight = self.analysis.weights[j]
        lim = limits(self.mags[j].dtype)
        if j not in self.shapes:
            w = weight.source.array()
            self.prime(j, w, tau, bounds)
            del w  # the cells are kept, the weight's pages need not be
            release(weight.source)
        shape = self.shapes[j]
        if j in self.sparse and self._sparse(j, tau, values, bad):
            return
        if j in self.sparse:  # S at the elements at risk only, not the whole of S
            checks = [
                (group, *risk.violations(risk.scale(group[0].factors, tau), lim))
                for group, risk in self.sparse[j]
            ]
        else:
            checks = self._cells(j, shape, tau, lim)
        for group, over, under in checks:
            layout = np.broadcast_shapes(over.shape, under.shape)
            for mask, kind, sign in ((over, "overflow", 1), (under, "underflow", -1)):
                mask = np.broadcast_to(mask, layout)
                if mask.any():
                    why = f"cofactor would {kind} {lim.name} weight {weight.name!r}"
                    bad.add(self._blame_uses(group, mask, shape, sign, tau, values), why)

    def _cells(
        self, j: int, shape: tuple[int, ...], tau: np.ndarray, lim: Limits
    ) -> list[tuple[list[Absorb], np.ndarray, np.ndarray]]:
        """Each scale of weight ``j`` with its ``(over, under)`` cell masks, from its cells'
        magnitudes (:meth:`prime`)."""
        weight = self.analysis.weights[j]
        checks: list[tuple[list[Absorb], np.ndarray, np.ndarray]] = []
        for k, (group, scale) in enumerate(_scales(shape, weight, tau)):
            cells = self.cells[j, k]
            if isinstance(cells, _AtRisk):
                at = _scale_at(scale, group, tau, cells)
                checks.append((group, *cells.violations(at, lim)))
            else:
                hi, lo_n, lo_s = cells
                sr = with_rank(_whole(scale), max(len(shape), len(scale.shape)))
                checks.append((group, *violations(hi, lo_n, lo_s, np.abs(sr), lim)))
        return checks

    def prime(
        self,
        j: int,
        w: np.ndarray,
        tau: np.ndarray,
        bounds: tuple[float, float],
        risk: _AtRisk | None = None,
    ) -> None:
        """Measure the cells of weight ``j`` (``w``) for ``tau`` (``bounds``: its
        ``|S|``'s), so that no round reads it again; a weight whose scales all keep
        :class:`_AtRisk` cells and whose uses read it whole is checked through
        :attr:`sparse` (the same pairs and reasons as its masks would give)."""
        weight = self.analysis.weights[j]
        lim = limits(w.dtype)
        self.shapes[j] = w.shape
        risky: list[tuple[list[Absorb], _AtRisk]] = []
        scales = _scales(w.shape, weight, tau)
        for k, (group, scale) in enumerate(scales):
            r = max(w.ndim, len(scale.shape))
            layout = (1,) * (r - len(scale.shape)) + tuple(scale.shape)
            cells = self.cells[j, k] = _measure_cells(w, layout, lim, bounds, risk)
            if isinstance(cells, _AtRisk):
                risky.append((group, cells))
        simple = all(ab.index is None and not ab.expand for ab in weight.uses)
        if simple and len(risky) == len(scales):
            self.sparse[j] = risky

    def _note(self, values: np.ndarray) -> None:
        """Start a round: stamp the pairs whose values moved since the last one."""
        self.round += 1
        self._since.clear()
        if self._last is None or self._last.shape != values.shape:
            self._stamp = np.zeros(values.size, np.int64)
        else:
            self._stamp[values != self._last] = self.round
        self._last = values.copy()

    def _moved_since(self, k: int) -> np.ndarray:
        """Per neuron: whether its pair moved after round ``k`` (made once a round)."""
        if k not in self._since:
            self._since[k] = (self._stamp > k)[self.sol.pair]
        return self._since[k]

    def _sparse(self, j: int, tau: np.ndarray, values: np.ndarray, bad: _Blamed) -> bool:
        """Check weight ``j`` through its elements at risk only, blaming the pairs at the
        offending elements without forming W-sized masks (:func:`_picks`): the same
        pairs, with the same reasons, as the masks would give.  False (nothing done)
        where some use's factors are not laid out like the elements at risk.

        After its first check, only the elements whose ``S`` may have changed since the
        last are checked again (:meth:`_AtRisk.touched`): an element that offended had a
        pair of the offending sign blamed, which then moved (a pinned pair, ``|τ| = 1``,
        is never of either sign), so an element none of whose pairs moved did not offend
        and still does not."""
        weight = self.analysis.weights[j]
        lim = limits(self.mags[j].dtype)
        since = self._seen.get(j)
        found: list[tuple[str, list[np.ndarray]]] = []
        for group, risk in self.sparse[j]:
            factors = group[0].factors
            sub = None if since is None else risk.touched(factors, self._moved_since(since))
            s = risk.scale(factors, tau, sub)
            hi, lo_n, lo_s = risk.cells if sub is None else (c[sub] for c in risk.cells)
            for hit, kind, sign in zip(
                violations(hi, lo_n, lo_s, np.abs(s), lim), ("overflow", "underflow"), (1, -1)
            ):
                at = np.flatnonzero(hit) if sub is None else sub[hit]
                if at.size:
                    picks = [_picks(ab, risk, at) for ab in group]
                    tied = len(group) > 1 and any(tuple(ab.shape) != risk.shape for ab in group)
                    if tied or any(p is None for p in picks):
                        return False
                    ids = [i for ab, p in zip(group, picks) if p for i in _ids(ab, p, sign, tau)]
                    found.append((f"cofactor would {kind} {lim.name} weight {weight.name!r}", ids))
        for why, ids in found:
            bad.add(self._moved(ids, values), why)
        self._seen[j] = self.round
        return True

    def _blame_uses(
        self,
        uses: list[Absorb],
        mask: np.ndarray,
        shape: tuple[int, ...],
        sign: int,
        tau: np.ndarray,
        values: np.ndarray,
    ) -> np.ndarray:
        """The pairs behind the ``True`` cells of ``mask`` (:meth:`_blame`): in a scale's
        compact layout (one use, or uses that agree), or in the weight's own ``shape``
        (uses that map elements: each use sees the cells its index reads)."""
        found: list[np.ndarray] = []
        for ab in uses:
            if mask.shape == shape and (ab.index is not None or len(uses) > 1):
                if ab.index is None and ab.expand:
                    continue  # (not written: pinned by the analysis)
                flat = mask.reshape(-1)
                sub = flat if ab.index is None else flat[ab.index.reshape(-1)]
                found.append(self._blame(ab.factors, sub.reshape(ab.shape), sign, tau, values))
            else:
                found.append(self._blame(ab.factors, mask, sign, tau, values))
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def _blame(
        self,
        factors: list[Factor],
        mask: np.ndarray,
        sign: int,
        tau: np.ndarray,
        values: np.ndarray,
    ) -> np.ndarray:
        """The pairs that push the ``True`` cells of ``mask`` out: of every factor
        ``τ[ids]^e`` at those cells, the ids whose ``e · log|τ|`` has the offending
        ``sign`` (> 0: too large, < 0: too small) — halving those moves ``log|s|`` toward 0
        and leaves the cell's other terms alone."""
        ids: list[np.ndarray] = []
        for f in factors:
            rank = max(mask.ndim, f.ids.ndim)
            try:
                at, hit = np.broadcast_arrays(with_rank(f.ids, rank), with_rank(mask, rank))
            except ValueError:  # (a use laid out unlike the scale: its pairs are tied)
                continue
            cell = at[hit]
            ids.append(cell[sign * f.exp * np.log(np.abs(tau[cell])) > 0])
        return self._moved(ids, values)

    def _moved(self, ids: list[np.ndarray], values: np.ndarray) -> np.ndarray:
        """The pairs of the neurons ``ids`` that have not been pinned yet, sorted."""
        if not ids:
            return np.zeros(0, np.int64)
        pairs = np.unique(self.sol.pair[np.concatenate(ids)])
        moved: np.ndarray = pairs[np.abs(values[pairs]) != 1.0]
        return moved

    def _constant(self, m: PlannedMul, tau: np.ndarray, values: np.ndarray, bad: _Blamed) -> None:
        """An inserted Mul's constant must be a normal number of its dtype."""
        lim: Limits = limits(np.dtype(m.dtype.numpy()))
        a = np.abs(m.s)
        with np.errstate(invalid="ignore"):
            over = ~np.isfinite(a) | (a > lim.max)
            under = a < lim.tiny
        for mask, kind, sign in ((over, "overflow", 1), (under, "underflow", -1)):
            if mask.any():
                why = f"cofactor would {kind} the {lim.name} Mul constant on {m.value.name!r}"
                bad.add(self._blame(m.factors, mask, sign, tau, values), why)


def _measure_cells(
    w: np.ndarray,
    layout: tuple[int, ...],
    lim: Limits,
    bounds: tuple[float, float],
    risk: _AtRisk | None = None,
) -> tuple[np.ndarray, ...] | _AtRisk:
    """The cells of ``w`` under a scale of ``layout`` (W's rank or more; each axis W's size
    or 1): reduced over the axes where the scale is constant
    (:func:`~graphteleport.numerics.cell_magnitudes`), or — a large W whose every element
    is a cell — its elements at risk within ``bounds`` (:class:`_AtRisk`)."""
    r = len(layout)
    wr = with_rank(w, r)
    axes = tuple(ax for ax in range(r) if layout[ax] == 1 and wr.shape[ax] > 1)
    if not axes and layout == wr.shape and wr.size > _DENSE_CELLS:
        if risk is not None and risk.shape == wr.shape:  # (found by the survey's one pass)
            return risk
        return _AtRisk.of(wr, lim, *bounds)
    return cell_magnitudes(wr, axes, lim)


def _one_pass(weight: Weight, w: np.ndarray, tau: np.ndarray) -> bool:
    """Whether the survey measures ``w``'s magnitudes and its elements at risk in one
    pass (:meth:`_AtRisk.surveyed`): a plain weight (one ``S``, formed by rows) whose
    ``S`` varies along every axis of W and which :func:`_measure_cells` would keep
    through its elements at risk — any other is scanned, then measured by cells."""
    if w.ndim == 0 or w.size <= _DENSE_CELLS or not w.flags.c_contiguous:
        return False
    lazy = row_scale(w.shape, weight.uses, weight.private, tau)
    return lazy is not None and tuple(lazy.shape) == tuple(w.shape)


def _scales(
    shape: tuple[int, ...], weight: Weight, tau: np.ndarray
) -> list[tuple[list[Absorb], np.ndarray | RowScale]]:
    """The scales of a weight as :func:`~graphteleport.algebra.scales_of` gives them,
    except that a plain weight's one ``S`` stays a :class:`~graphteleport.algebra.RowScale`
    (formed only where it is needed: no weight-sized ``S``)."""
    lazy = row_scale(shape, weight.uses, weight.private, tau)
    if lazy is not None:
        return [(list(weight.uses), lazy)]
    return [(g, s) for g, s in scales_of(shape, weight.uses, weight.private, tau)]


def _whole(scale: np.ndarray | RowScale) -> np.ndarray:
    """``S`` in its compact layout."""
    return scale.rows(0, scale.shape[0]) if isinstance(scale, RowScale) else scale


def _scale_at(
    scale: np.ndarray | RowScale, group: list[Absorb], tau: np.ndarray, risk: _AtRisk
) -> np.ndarray:
    """``S`` at the elements at risk (in ``risk.flat`` order), bit for bit as the whole
    ``S`` has it there (:func:`~graphteleport.algebra.product_at`)."""
    if isinstance(scale, RowScale):
        return risk.scale(group[0].factors, tau)
    at: np.ndarray = with_rank(scale, len(risk.shape)).reshape(-1)[risk.flat]
    return at


def _picks(ab: Absorb, risk: _AtRisk, hit: np.ndarray) -> list[tuple[np.ndarray, ...]] | None:
    """Per factor of ``ab``, the index of each offending element at risk (``hit``: their
    positions into ``risk.flat``, ascending, or a mask) into
    the factor's ids (0 along its size-1 axes) — where broadcasting those ids to the
    mask's layout would not grow it; else None (the mask path handles it)."""
    at = tuple(i[hit] for i in risk.at)
    rank = len(risk.shape)
    out: list[tuple[np.ndarray, ...]] = []
    for f in ab.factors:
        ids = with_rank(f.ids, rank)
        if ids.ndim != rank or any(
            n not in (1, m) for n, m in zip(ids.shape, risk.shape, strict=True)
        ):
            return None
        out.append(tuple(i if n > 1 else np.zeros_like(i) for i, n in zip(at, ids.shape)))
    return out


def _ids(
    ab: Absorb, picks: list[tuple[np.ndarray, ...]], sign: int, tau: np.ndarray
) -> list[np.ndarray]:
    """The neurons of ``ab``'s factors at the picked elements whose ``e · log|τ|`` has
    the offending ``sign`` (:meth:`_Check._blame`)."""
    out: list[np.ndarray] = []
    for f, pick in zip(ab.factors, picks, strict=True):
        cell = with_rank(f.ids, len(pick))[pick]
        out.append(cell[sign * f.exp * np.log(np.abs(tau[cell])) > 0])
    return out

"""Fast products of :class:`~graphteleport.orbit.OrbitTerms` for a solver: matrix-vector
products with each weight's ``Q`` instead of elementwise work over its rows.

**The algebra.**  Most counted uses are *bilinear*: a conv or Gemm weight's compact layout
is ``[O, C, 1, 1]`` (or ``[O, C]``) with ``log|S|_ij = α_i + β_j``, one factor varying
along O and one along C (``α = coef_O · u[pairs_O]``, ``β = coef_C · u[pairs_C]``).  With
``x = exp(p·α)`` and ``z = exp(p·β)`` its terms are ``y_ij = Q_ij · x_i · z_j``, so

* ``F`` of the block is ``xᵀ(Q z)``; the row sums of ``y`` are ``r = x ⊙ (Q z)`` and the
  column sums ``c = z ⊙ (Qᵀ x)`` — the gradient ``p · Aᵀy`` scatters ``coef_O ⊙ r`` and
  ``coef_C ⊙ c`` onto the pairs, and ``diag H = p² · Aᵀ(coef² ⊙ y)`` scatters
  ``coef² ⊙ r``, ``coef² ⊙ c``: two matrix-vector products (BLAS gemv) per block;
* ``H v = p² Aᵀ(y ⊙ A v)``: with ``a = coef_O ⊙ v[pairs_O]`` and ``b = coef_C ⊙
  v[pairs_C]``, the row sums of ``y ⊙ (a_i + b_j)`` are ``r ⊙ a + x ⊙ Q(z ⊙ b)`` and the
  column sums ``c ⊙ b + z ⊙ Qᵀ(x ⊙ a)``: two more gemv per block.

A use with a single moving factor (a bias, a Gemm whose other side is pinned, a
classifier read along one axis) has ``y = Q·exp(p·coef·u[pairs])`` constant along the
other axes: its ``Q`` is summed over them once, and all such uses are one vector of
*single* terms.  The other uses (factors that vary along one axis together, three
factors, ``loose`` rows) are a smaller :class:`~graphteleport.orbit.OrbitTerms` of their
own (``rest``), evaluated row by row.

**The moving part.**  As :meth:`OrbitTerms.moving`: a row that no movable pair reaches (a
bilinear row whose row and column pairs are both pinned; a single term on a pinned pair)
is left out and summed into ``constant``; ``F`` of the kernel is the moving part.

Every product is exact (only the order of summation differs from the row-wise
:class:`~graphteleport.orbit.OrbitTerms`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from graphteleport.orbit import SINGLE_MAX as SINGLE_MAX
from graphteleport.orbit import Block, OrbitTerms
from graphteleport.parallel import each

FloatArray = np.ndarray
IntArray = np.ndarray


@dataclass(frozen=True, eq=False)
class Bilinear:
    """One bilinear block: ``q`` is its ``Q`` as an ``(m, n)`` matrix; its row factor's
    entries are ``[lo, mid)`` and its column factor's ``[mid, hi)`` of the kernel's sides
    (:attr:`OrbitKernel.index`).  With ``outer = (a, b)`` the block stands for the
    rank-one ``Q = a bᵀ`` instead (``q`` unused; :meth:`OrbitKernel.rank_one`).
    ``ones`` holds ``(Q·1, Qᵀ·1)`` (float64, summed as :func:`fused` sums), made with the
    float32 copy (:func:`with_single`): the products at ``u = 0``, read then for free."""

    q: FloatArray
    lo: int
    mid: int
    hi: int
    q32: np.ndarray | None = None
    outer: tuple[FloatArray, FloatArray] | None = None
    ones: tuple[FloatArray, FloatArray] | None = None

    def times_fast(self, v: FloatArray) -> FloatArray:
        """``Q v`` by ``q32`` (``v`` scaled into float32's range) when there is one, else
        by ``q``: for a trial value of ``F``."""
        if self.outer is not None:
            a, b = self.outer
            out: FloatArray = a * float(b @ v)
            return out
        if self.q32 is None:
            exact: FloatArray = self.q @ v
            return exact
        s = float(np.abs(v).max(initial=0.0)) or 1.0
        product: np.ndarray = self.q32 @ (v / s).astype(np.float32)
        return product.astype(np.float64) * s

    def both(self, v: FloatArray, w: FloatArray) -> tuple[FloatArray, FloatArray]:
        """``(Q v, Qᵀ w)`` in float64 from ``q``, in one read of it (:func:`fused`)."""
        if self.outer is not None:
            a, b = self.outer
            return a * float(b @ v), b * float(a @ w)
        return fused(self.q, v, w)

    def rows_times(self, keep: np.ndarray, m: FloatArray) -> FloatArray:
        """``Q[keep] @ m`` for a matrix ``m`` (float64)."""
        if self.outer is not None:
            a, b = self.outer
            out: FloatArray = a[keep, None] * (b @ m)[None, :]
            return out
        product: FloatArray = self.q[keep] @ m
        return product

    def both_fast(self, v: FloatArray, w: FloatArray) -> tuple[FloatArray, FloatArray]:
        """:meth:`both` for the Hessian products: by ``q32`` (half the bytes to read),
        ``v`` and ``w`` scaled into float32's range, when there is one."""
        if self.q32 is None:
            return self.both(v, w)
        sv = float(np.abs(v).max(initial=0.0)) or 1.0
        sw = float(np.abs(w).max(initial=0.0)) or 1.0
        qv, qw = fused(self.q32, (v / sv).astype(np.float32), (w / sw).astype(np.float32))
        return qv.astype(np.float64) * sv, qw.astype(np.float64) * sw


#: The bytes of a row chunk :func:`fused` multiplies while it is in cache (L2 holds 1 MB
#: a core here; L3 32 MB).  Most of ResNet-50's blocks (≤ 512 × 512) are then one chunk:
#: one gemv each way over the whole block, and a float32 block widened once.  2^18 → 2^20:
#: an exact point of ResNet-50 (float32 ``Q`` widened) 10.3 → 7.7 ms, a float32 Hessian
#: product 5.96 → 5.72 ms (one thread, 21 rounds, load 5.6).
CHUNK_BYTES = 1 << 20


def fused(
    q: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    out: tuple[np.ndarray, np.ndarray] | None = None,
    copy: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(q v, qᵀ w)`` in one pass over ``q``: per chunk of rows (about
    :data:`CHUNK_BYTES`) both products while the chunk is in cache (two gemv); written
    into ``out`` (two arrays of ``v``'s dtype) if given; each chunk also cast into
    ``copy`` (an array of ``q``'s shape) if given.  A float32 ``q`` with float64 ``v``
    and ``w`` (a float32 ``Q`` read exactly) has each chunk widened into a float64
    buffer while in cache, then both products in float64: the exact products of the
    float32 values."""
    m, n = q.shape
    dtype = np.result_type(q.dtype, v.dtype)
    qv, qw = out if out is not None else (np.empty(m, dtype=dtype), np.empty(n, dtype=dtype))
    step = max(1, CHUNK_BYTES // max(1, n * q.itemsize))
    wide = np.empty((min(step, m), n), dtype) if dtype != q.dtype else None
    if step >= m:
        step = m
    else:
        qw[...] = 0.0
    for i in range(0, m, step):
        chunk = q[i : i + step]
        if copy is not None:
            copy[i : i + step] = chunk
        if wide is not None:
            chunk = wide[: chunk.shape[0]]
            chunk[...] = q[i : i + step]
        np.matmul(chunk, v, out=qv[i : i + step])
        if step == m:
            np.matmul(w, chunk, out=qw)
        else:
            qw += w[i : i + step] @ chunk
    return qv, qw


@dataclass(frozen=True, eq=False)
class KernelPoint:
    """The kernel at ``u``: ``f`` (the moving part of ``F``), ``scale`` (per side entry
    ``exp(p · coef · u[pair])``), ``sums`` (per side entry its rows' ``Σ y``: a single
    term's ``y``, a bilinear block's row sums ``r`` and column sums ``c``), ``rest`` (the
    rest's ``y``), ``gradient`` (``∂F/∂u``) and ``diagonal`` (``diag H``); ``exact``:
    read in float64 (else through the float32 copies)."""

    u: FloatArray
    f: float
    scale: FloatArray
    sums: FloatArray
    rest: FloatArray
    gradient: FloatArray
    diagonal: FloatArray
    exact: bool = True


def varying(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axes along which a factor of ``shape`` is not constant."""
    return tuple(k for k, n in enumerate(shape) if n != 1)


def bilinear_split(block: Block) -> int | None:
    """For a block of two factors varying along disjoint runs of axes, one before the
    other: the index (0 or 1) of the factor along the leading axes; else ``None``."""
    if len(block.factors) != 2:
        return None
    first, second = (varying(f.shape) for f in block.factors)
    if not first or not second:
        return None
    if max(first) < min(second):
        return 0
    if max(second) < min(first):
        return 1
    return None


@dataclass
class _Sides:
    """The kernel's side entries as they are collected: pairs, coefficients, and the
    single terms' ``Q`` (the first ``len(single)`` entries)."""

    pairs: list[IntArray]
    coef: list[FloatArray]
    single: list[FloatArray]
    size: int = 0

    def add(self, pairs: IntArray, coef: FloatArray) -> int:
        """Append entries; returns the offset where they start."""
        lo = self.size
        self.pairs.append(pairs)
        self.coef.append(coef)
        self.size += pairs.size
        return lo


def single_terms(block: Block, q: FloatArray, sides: _Sides) -> float:
    """Add a one-factor block's terms (``Q`` summed over the factor's constant axes) to
    ``sides``; returns the ``Σ Q`` of its entries on pinned pairs (constant)."""
    (f,) = block.factors
    view = q.reshape(block.shape)
    summed = (view.sum(axis=f.axes, dtype=np.float64) if f.axes else view).reshape(-1)
    moves = f.coef != 0
    sides.add(f.pairs[moves], f.coef[moves])
    sides.single.append(summed[moves])
    return float(summed[~moves].sum(dtype=np.float64))


def bilinear_terms(block: Block, q: FloatArray, lead: int, sides: _Sides) -> tuple[Bilinear, float]:
    """``block`` as a :class:`Bilinear` (factor ``lead`` along its rows), its side entries
    added to ``sides``; returns it and the ``Σ Q`` of rows whose pairs are both pinned
    (left out of its ``q``, a copy then)."""
    rows, cols = block.factors[lead], block.factors[1 - lead]
    matrix = q.reshape(int(np.prod(rows.shape)), int(np.prod(cols.shape)))
    pinned_rows, pinned_cols = rows.coef == 0, cols.coef == 0
    constant = 0.0
    if pinned_rows.any() and pinned_cols.any():
        matrix = matrix.copy()
        part = np.ix_(pinned_rows, pinned_cols)
        constant = float(matrix[part].sum(dtype=np.float64))
        matrix[part] = 0.0
    lo = sides.add(rows.pairs, rows.coef)
    mid = sides.add(cols.pairs, cols.coef)
    return Bilinear(matrix, lo, mid, mid + cols.pairs.size), constant


def with_single(m: Bilinear) -> Bilinear:
    """``m`` with its float32 copy when ``Q ≤`` :data:`SINGLE_MAX` (a float32 ``Q`` is its
    own copy: none made), and its ``ones`` (``Q·1`` and ``Qᵀ·1`` in float64, by
    :func:`fused` in the same pass over ``Q``).  ``Q`` is non-negative (sums of
    ``|W|^p``), so the bound holds where every row sum is within it; only otherwise is
    the copy read for its largest entry."""
    if not m.q.size:
        return m
    rows, cols = np.ones(m.q.shape[0]), np.ones(m.q.shape[1])
    if m.q.dtype == np.float32:  # (OrbitTerms.build(single=True): within SINGLE_MAX)
        ones = fused(m.q, cols, rows)
        return replace(m, q32=m.q, ones=ones)
    q32 = np.empty(m.q.shape, np.float32)
    with np.errstate(over="ignore"):  # (a Q beyond float32's range: no copy, below)
        ones = fused(m.q, cols, rows, copy=q32)
    peak = float(ones[0].max())  # Q ≥ 0: no entry above its row's sum
    if not peak <= SINGLE_MAX and not float(q32.max()) <= SINGLE_MAX:  # (then read it)
        return replace(m, ones=ones)
    return replace(m, q32=q32, ones=ones)


def with_singles(matrices: list[Bilinear]) -> list[Bilinear]:
    """:func:`with_single` of each block, the copies made on both cores for a large
    kernel (:func:`graphteleport.parallel.each`)."""
    sizes = [m.q.size for m in matrices]
    out = list(matrices)

    def copy(i: int) -> None:
        out[i] = with_single(matrices[i])

    each(copy, sizes)
    return out


def uncovered(terms: OrbitTerms) -> float:
    """``Σ q`` of the rows neither a block nor a ``loose`` entry holds (a use whose
    entries all cancel): the gaps between the blocks, less the loose rows."""
    rows = np.unique(terms.loose[0])
    total = 0.0
    lo = 0
    for b in [*sorted(terms.blocks, key=lambda b: b.lo), Block(terms.q.size, 0, (), ())]:
        if b.lo > lo:
            gap = np.ones(b.lo - lo, dtype=bool)
            mine = rows[(rows >= lo) & (rows < b.lo)]
            gap[mine - lo] = False
            total += float(terms.q[lo : b.lo][gap].sum(dtype=np.float64))
        lo = max(lo, b.hi)
    return total


def restricted(terms: OrbitTerms, blocks: list[Block]) -> OrbitTerms | None:
    """The terms of ``blocks`` and ``terms.loose`` alone (rows renumbered from 0; no
    ``spans``), or ``None`` if there are none."""
    rows, cols, coef = terms.loose
    if not blocks and not rows.size:
        return None
    qs: list[FloatArray] = []
    moved: list[Block] = []
    offset = 0
    for b in blocks:
        qs.append(terms.q[b.lo : b.hi])
        moved.append(replace(b, lo=offset, hi=offset + b.hi - b.lo))
        offset += b.hi - b.lo
    kept, inverse = np.unique(rows, return_inverse=True)
    qs.append(terms.q[kept])
    loose = (offset + inverse.reshape(-1), cols, coef)
    return replace(terms, q=np.concatenate(qs), spans=(), blocks=tuple(moved), loose=loose)


@dataclass(frozen=True, eq=False)
class OrbitKernel:
    """The moving part of an :class:`~graphteleport.orbit.OrbitTerms` (module docstring):
    ``index``/``coef`` are the *side entries* (one per single term, per row and per column
    of every bilinear block: its pair and coefficient), ``single`` the single terms' ``Q``
    (the first entries), ``matrices`` the bilinear blocks, ``rest`` the other rows (their
    moving part) and ``constant`` the ``Σ Q`` left out."""

    p: float
    num_pairs: int
    index: IntArray
    coef: FloatArray
    single: FloatArray
    matrices: tuple[Bilinear, ...]
    rest: OrbitTerms | None
    constant: float
    blocks: tuple[Block, ...] = ()  # (the terms' blocks: for :attr:`group`)
    plans: dict[bytes, CoarsePlan] = field(default_factory=dict)  # per group (coarse)
    low_rank_plans: list[LowRankPlan] = field(default_factory=list)  # (at most one)

    @cached_property
    def group(self) -> IntArray:
        """Per pair its coarse group (:func:`coarse_groups` of :attr:`blocks`), made on
        first use: only :func:`two_level` reads it, the preconditioner of a kernel without
        bilinear blocks (ResNet-50's kernel: 2.4 ms not spent)."""
        return coarse_groups(self, self.blocks)

    @property
    def num_groups(self) -> int:
        """How many coarse groups :attr:`group` names."""
        return int(self.group.max(initial=-1)) + 1

    @classmethod
    def of(cls, terms: OrbitTerms, float32: bool = True) -> OrbitKernel:
        """The kernel of ``terms``: each block bilinear, single or left to ``rest``; with
        ``float32``, the Hessian products read a float32 copy of each bilinear ``Q`` whose
        values float32 holds (:data:`SINGLE_MAX`): a relative error of about 1e-7 in
        ``H·v`` only, which an inexact Newton step absorbs — ``F``, its gradient and
        ``diag H`` stay float64."""
        sides = _Sides([], [], [])
        singles: list[Block] = []
        split: list[tuple[Block, int]] = []
        others: list[Block] = []
        constant = uncovered(terms)
        for b in terms.blocks:
            lead = bilinear_split(b)
            if lead is not None:
                split.append((b, lead))
            elif len(b.factors) == 1:
                singles.append(b)
            elif b.factors:
                others.append(b)
            else:  # no movable pair: every row constant
                constant += float(terms.q[b.lo : b.hi].sum(dtype=np.float64))
        for b in singles:
            constant += single_terms(b, terms.q[b.lo : b.hi], sides)
        matrices: list[Bilinear] = []
        for b, lead in split:
            matrix, pinned = bilinear_terms(b, terms.q[b.lo : b.hi], lead, sides)
            matrices.append(matrix)
            constant += pinned
        if float32:
            matrices = with_singles(matrices)
        rest = restricted(terms, others)
        if rest is not None:
            rest, pinned = rest.moving()
            constant += pinned
        index = np.concatenate([*sides.pairs, np.zeros(0, np.intp)]).astype(np.intp)
        coef = np.concatenate([*sides.coef, np.zeros(0)])
        single = np.concatenate([*sides.single, np.zeros(0)])
        mats, blocks = tuple(matrices), terms.blocks
        return cls(terms.p, terms.num_pairs, index, coef, single, mats, rest, constant, blocks)

    def rank_one(self, at: KernelPoint) -> OrbitKernel:
        """This kernel with each bilinear block's terms ``y = x_i Q_ij z_j`` at ``at``
        replaced by the rank-one ``r_i c_j / Σr`` of their row sums ``r`` and column sums
        ``c`` (:attr:`KernelPoint.sums`: the same sums and total; what ``y`` would be if
        its rows and columns were independent), i.e. ``Q ≈ (r/x)(c/z)ᵀ / Σr``.  Its
        products cost ``O + C`` per block instead of ``O·C``: a solver's cheap first
        approximation (:func:`~graphteleport.passes.canonical.minimize`'s start), exact
        where ``Q`` has rank one; the single terms and the rest are kept as they are."""
        mats: list[Bilinear] = []
        for m in self.matrices:
            r, c = at.sums[m.lo : m.mid], at.sums[m.mid : m.hi]
            total = float(r.sum())
            a = r / at.scale[m.lo : m.mid] / total if total > 0 else np.zeros_like(r)
            mats.append(
                Bilinear(np.zeros((0, 0)), m.lo, m.mid, m.hi, None, (a, c / at.scale[m.mid : m.hi]))
            )
        return replace(self, matrices=tuple(mats), plans={})

    @cached_property
    def outer(self) -> FloatArray | None:
        """When every bilinear block is rank one (:meth:`rank_one`): their factors laid
        out as the side entries are (a block's ``a`` on its rows, ``b`` on its columns,
        from its first entry on); else ``None``."""
        if not self.matrices or any(m.outer is None for m in self.matrices):
            return None
        return np.concatenate([f for m in self.matrices if m.outer for f in m.outer])

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """The bilinear blocks' ``Q`` sizes: the products read the blocks on both worker
        threads, each taking the largest left (:func:`graphteleport.parallel.each`;
        numpy's BLAS releases the GIL; the blocks write disjoint side entries)."""
        return tuple(m.q.size for m in self.matrices)

    @property
    def low_rank_plan(self) -> LowRankPlan:
        """What :func:`low_rank` needs of the bilinear blocks alone: made on first use,
        shared with :meth:`rank_one`'s kernel (the same side entries)."""
        if not self.low_rank_plans:
            self.low_rank_plans.append(LowRankPlan.of(self))
        return self.low_rank_plans[0]

    @cached_property
    def counted(self) -> FloatArray:
        """Per side entry 1 if its sums count once in ``F`` (a single term, a bilinear
        block's row), 0 for a block's column: ``F = counted · sums``."""
        out = np.ones(self.index.size)
        for m in self.matrices:
            out[m.mid : m.hi] = 0.0
        return out

    @cached_property
    def segments(self) -> tuple[IntArray, IntArray, IntArray]:
        """The bilinear blocks' side entries as segments (each block's rows, then its
        columns): their starts and lengths, and per segment its partner's index (rows ↔
        columns of the same block)."""
        bounds = [(m.lo, m.mid, m.hi) for m in self.matrices]
        starts = np.array([b for lo, mid, _ in bounds for b in (lo, mid)], dtype=np.intp)
        lengths = np.array([n for lo, mid, hi in bounds for n in (mid - lo, hi - mid)], np.intp)
        partner = np.arange(starts.size) ^ 1
        return starts, lengths, partner

    def products(self, w: FloatArray, fast: bool) -> FloatArray:
        """Per side entry of a bilinear block, the product of its ``Q`` with the other
        side's entries of ``w``: ``Q w[cols]`` on its rows, ``Qᵀ w[rows]`` on its columns
        (0 on single terms).  ``fast``: by the float32 copies where there are, each
        segment of ``w`` scaled by its largest magnitude into float32's range (one
        vectorised scaling for all blocks, the scales applied back to the products)."""
        out = np.zeros_like(w)
        if not self.matrices:
            return out
        starts, lengths, partner = self.segments
        lo = int(starts[0])
        if self.outer is not None:  # rank one: a (b·w_cols) on rows, b (a·w_rows) on columns
            dots = np.add.reduceat(self.outer * w[lo:], starts - lo)
            np.multiply(self.outer, np.repeat(dots[partner], lengths), out=out[lo:])
            return out
        if not fast and all(m.ones is not None for m in self.matrices) and (w[lo:] == 1).all():
            for m in self.matrices:  # at u = 0: the products made with the copies
                assert m.ones is not None
                out[m.lo : m.mid], out[m.mid : m.hi] = m.ones
            return out
        copies = fast and all(m.q32 is not None for m in self.matrices)
        if copies:
            peak = np.maximum.reduceat(np.abs(w[lo:]), starts - lo)
            peak = np.where(np.isfinite(peak) & (peak > 0), peak, 1.0)
            w32 = (w[lo:] / np.repeat(peak, lengths)).astype(np.float32)
            out32 = np.empty_like(w32)

        def work(i: int) -> None:
            m = self.matrices[i]
            rows, cols = slice(m.lo, m.mid), slice(m.mid, m.hi)
            if copies:
                a, b, c = m.lo - lo, m.mid - lo, m.hi - lo
                assert m.q32 is not None
                fused(m.q32, w32[b:c], w32[a:b], out=(out32[a:b], out32[b:c]))
            elif m.outer is not None or (fast and m.q32 is not None):
                out[rows], out[cols] = (m.both_fast if fast else m.both)(w[cols], w[rows])
            else:
                fused(m.q, w[cols], w[rows], out=(out[rows], out[cols]))

        each(work, self.sizes)
        if copies:
            np.multiply(out32, np.repeat(peak[partner], lengths), out=out[lo:])
        return out

    def _scatter(self, values: FloatArray) -> FloatArray:
        """``Σ values`` of the side entries per pair."""
        out: FloatArray = np.bincount(self.index, weights=values, minlength=self.num_pairs)
        return out

    def point(
        self, u: FloatArray, bound: float | None = None, exact: bool = True
    ) -> KernelPoint | None:
        """The kernel at ``u`` (:class:`KernelPoint`), one read of each bilinear ``Q``;
        with ``bound``, ``None`` when ``F(u)`` exceeds it or is not finite.  Not
        ``exact``: the bilinear products by the float32 copies (half the bytes; a
        relative error of about 1e-7 per product, in ``F``, the gradient and
        ``diag H``), for a solver far from the minimum."""
        with np.errstate(over="ignore", invalid="ignore"):
            scale = np.exp(self.p * self.coef * u[self.index])
            n = self.single.size
            sums = self.products(scale, fast=not exact)
            sums *= scale
            np.multiply(self.single, scale[:n], out=sums[:n])
            f = float(sums @ self.counted)
            rest = self.rest.terms(u) if self.rest is not None else np.zeros(0)
            f += float(rest.sum())
        if bound is not None and not (np.isfinite(f) and f <= bound):
            return None
        gradient = self.p * self._scatter(self.coef * sums)
        diagonal = self.p * self.p * self._scatter(self.coef * self.coef * sums)
        if self.rest is not None:
            gradient += self.rest.p * self.rest.pair_sums(rest)
            diagonal += self.rest.hessian_diagonal(rest)
        return KernelPoint(u, f, scale, sums, rest, gradient, diagonal, exact)

    def value(self, u: FloatArray) -> float:
        """``F(u)`` for a trial step: one gemv per bilinear block, by its float32 copy
        where it has one (a relative error of about 1e-7; :meth:`point` is exact)."""
        if self.outer is not None:  # rank one: a point costs no more
            at = self.point(u)
            return at.f if at is not None else np.inf
        with np.errstate(over="ignore", invalid="ignore"):
            scale = np.exp(self.p * self.coef * u[self.index])
            n = self.single.size
            f = float(self.single @ scale[:n])
            for m in self.matrices:
                f += float(scale[m.lo : m.mid] @ m.times_fast(scale[m.mid : m.hi]))
            if self.rest is not None:
                f += self.rest.objective(u)
        return f

    def hessian_vector(self, at: KernelPoint, v: FloatArray) -> FloatArray:
        """``H·v`` at ``at`` (module docstring): per bilinear block two gemv in one read
        of its ``Q`` (float32 when the kernel has the copies)."""
        a = self.coef * v[self.index]
        out = self.products(at.scale * a, fast=True)
        out *= at.scale
        out += at.sums * a
        hv = self.p * self.p * self._scatter(self.coef * out)
        if self.rest is not None:
            hv += self.rest.hessian_vector(at.rest, v)
        return hv

    # -- the coarse space -----------------------------------------------------------------------
    def coarse(self, at: KernelPoint, group: IntArray) -> FloatArray:
        """``E = Rᵀ H R`` at ``at`` for the coarse space ``R`` of ``group`` (per pair its
        group, ``-1``: none; ``R[q, group[q]] = 1``): with ``ρ_k = Σ_q A[k,q] e_{group[q]}``
        per row, ``E = p² Σ_k y_k ρ_k ρ_kᵀ`` — the squares from every side entry's
        ``coef² · Σ y``, a bilinear block's cross term ``Σ_ij y_ij coef_i coef_j`` from its
        row sums when its column coefficients are one value (one gemv otherwise), and the
        rest's rows from its coordinates.  What depends on ``group`` alone (which entries
        meet which groups: :class:`CoarsePlan`) is made once per ``group``."""
        key = group.tobytes()
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = CoarsePlan.of(self, group)
        ng = plan.ng
        flat = np.bincount(plan.keys, weights=plan.weights(self, at), minlength=ng * ng)
        out: FloatArray = self.p * self.p * flat.reshape(ng, ng)
        return out


@dataclass(frozen=True, eq=False)
class CrossPlan:
    """A bilinear block's part of a :class:`CoarsePlan`: its rows in some group
    (``keep``), their coefficients ``rows``, and either ``factor`` (every column in one
    group with one coefficient κ: the weights are ``κ · ρ_i · r_i``) or the columns'
    groups (``on``: the columns in some group, ``where``: the index of each one's group
    among ``targets``; the weights ``ρ_i x_i (Q Z)_i`` with ``Z`` the columns' ``κ ⊙ z``
    spread over their groups)."""

    m: Bilinear
    keep: np.ndarray
    rows: FloatArray
    factor: FloatArray | None
    cols: FloatArray
    on: IntArray
    where: IntArray
    targets: IntArray

    def weights(self, at: KernelPoint) -> FloatArray:
        """The cross terms at ``at``, in the order of the plan's keys."""
        m = self.m
        if self.factor is not None:
            out: FloatArray = self.factor * at.sums[m.lo : m.mid][self.keep]
            return out
        spread = np.zeros((self.cols.size, self.targets.size))
        spread[self.on, self.where] = (self.cols * at.scale[m.mid : m.hi])[self.on]
        rows = (self.rows * at.scale[m.lo : m.mid])[self.keep, None]
        per: FloatArray = (rows * m.rows_times(self.keep, spread)).reshape(-1)
        return per


@dataclass(frozen=True, eq=False)
class CoarsePlan:
    """What :meth:`OrbitKernel.coarse` needs of ``group`` alone: ``ng`` groups, the flat
    keys ``a·ng + b`` of every contribution (side entries, each bilinear block's cross
    terms both ways round, the rest's rows) and how to weigh them at a point: the side
    entries in a group (``side``), the blocks' :class:`CrossPlan`, and the rest's
    contributions ``y[rest_rows] · rest_factor``."""

    ng: int
    keys: IntArray
    side: np.ndarray
    cross: tuple[CrossPlan, ...]
    rest_rows: IntArray
    rest_factor: FloatArray

    @classmethod
    def of(cls, kernel: OrbitKernel, group: IntArray) -> CoarsePlan:
        """The plan of ``kernel`` for ``group``."""
        ng = int(group.max(initial=-1)) + 1
        g = group[kernel.index]
        side = g >= 0
        keys = [g[side] * (ng + 1)]
        cross: list[CrossPlan] = []
        for m in kernel.matrices:
            found = cross_plan(kernel, m, group, ng)
            if found is not None:
                plan, mk = found
                cross.append(plan)
                keys.extend([mk, (mk % ng) * ng + mk // ng])  # (a, b) and (b, a)
        rest_rows, rest_factor = np.zeros(0, np.intp), np.zeros(0)
        if kernel.rest is not None:
            rk, rest_rows, rest_factor = rest_plan(kernel.rest, group, ng)
            keys.append(rk)
        return cls(ng, np.concatenate(keys), side, tuple(cross), rest_rows, rest_factor)

    def weights(self, kernel: OrbitKernel, at: KernelPoint) -> FloatArray:
        """Every contribution's weight at ``at``, in the order of :attr:`keys`."""
        parts = [(kernel.coef * kernel.coef * at.sums)[self.side]]
        for c in self.cross:
            w = c.weights(at)
            parts.extend([w, w])
        parts.append(at.rest[self.rest_rows] * self.rest_factor)
        return np.concatenate(parts)


def cross_plan(
    kernel: OrbitKernel, m: Bilinear, group: IntArray, ng: int
) -> tuple[CrossPlan, IntArray] | None:
    """The cross terms ``Σ_ij y_ij ρ_i κ_j`` of a bilinear block (rows i with coefficient
    ``ρ_i`` in group ``a_i``, columns j with ``κ_j`` in ``b_j``) summed per ``(a, b)``: the
    block's :class:`CrossPlan` and its flat keys ``a·ng + b`` (``None``: none) — with ``Z``
    the columns' ``κ ⊙ z`` spread over their groups, ``ρ ⊙ x ⊙ (Q Z)``, or, when every
    column has one group and one coefficient ``κ`` (a layer's channels), ``κ · ρ_i r_i``
    from the row sums."""
    rows, cols = kernel.coef[m.lo : m.mid], kernel.coef[m.mid : m.hi]
    ga, gb = group[kernel.index[m.lo : m.mid]], group[kernel.index[m.mid : m.hi]]
    rows = np.where(ga >= 0, rows, 0.0)
    cols = np.where(gb >= 0, cols, 0.0)
    targets, where = np.unique(gb[gb >= 0], return_inverse=True)
    if not targets.size or not rows.any():
        return None
    keep = ga >= 0
    empty = np.zeros(0, np.intp)
    if targets.size == 1 and (cols[gb >= 0] == cols[gb >= 0][0]).all() and (gb >= 0).all():
        plan = CrossPlan(m, keep, rows, cols[0] * rows[keep], cols, empty, empty, targets)
        return plan, ga[keep] * ng + targets[0]
    on = np.flatnonzero(gb >= 0)
    plan = CrossPlan(m, keep, rows, None, cols, on, where.reshape(-1), targets)
    return plan, (ga[keep, None] * ng + targets[None, :]).reshape(-1)


def rest_plan(rest: OrbitTerms, group: IntArray, ng: int) -> tuple[IntArray, IntArray, FloatArray]:
    """The rest's part of a :class:`CoarsePlan`: per row ``k`` and groups ``a, b`` it
    touches, the contribution ``y_k · ρ_k[a] · ρ_k[b]`` (:meth:`OrbitKernel.coarse`,
    without ``p²``), as flat keys ``a·ng + b``, the rows ``k`` and the factors
    ``ρ_k[a] · ρ_k[b]``."""
    rows, cols, coef = rest.coordinates
    g = group[cols]
    ok = g >= 0
    keys, inverse = np.unique(rows[ok] * ng + g[ok], return_inverse=True)
    rho = np.bincount(inverse.reshape(-1), weights=coef[ok], minlength=keys.size)
    row, grp = keys // max(ng, 1), keys % max(ng, 1)
    out_keys, out_rows, out_factor = [grp * (ng + 1)], [row], [rho * rho]
    for shift in range(1, keys.size):
        same = row[:-shift] == row[shift:]
        if not same.any():
            break
        a, b = grp[:-shift][same], grp[shift:][same]
        r, f = row[:-shift][same], (rho[:-shift] * rho[shift:])[same]
        out_keys.extend([a * ng + b, b * ng + a])
        out_rows.extend([r, r])
        out_factor.extend([f, f])
    return np.concatenate(out_keys), np.concatenate(out_rows), np.concatenate(out_factor)


#: The most coarse groups :func:`coarse_groups` keeps (the largest; ``E`` is dense).
MAX_GROUPS = 512


def coarse_groups(kernel: OrbitKernel, blocks: tuple[Block, ...]) -> IntArray:
    """Per pair its coarse group (``-1``: none): the pairs of one block factor (a layer's
    channels) belong together, so groups are the connected sets of pairs that share a
    factor — a layer, or a residual stream over all the layers it joins.  Groups of one
    pair are left out (``diag H`` covers them), as are all but the :data:`MAX_GROUPS`
    largest."""
    label = np.arange(kernel.num_pairs)
    members = [f.pairs[f.coef != 0] for b in blocks for f in b.factors]
    members = [m for m in members if m.size > 1]
    changed = True
    while changed:  # label propagation: each factor takes its least label, then chase
        before = label.copy()
        for m in members:
            label[m] = label[m].min()
        label = label[label]
        changed = bool((label != before).any())
    roots, inverse, counts = np.unique(label, return_inverse=True, return_counts=True)
    size = counts[inverse]
    keep = size > 1
    if roots.size and (counts > 1).sum() > MAX_GROUPS:
        cut = np.sort(counts)[::-1][MAX_GROUPS - 1]
        keep &= size >= cut
    _, group = np.unique(np.where(keep, label, -1), return_inverse=True)
    group = group.reshape(-1) - (0 if keep.all() else 1)
    return np.where(keep, group, -1).astype(np.intp)


def two_level(
    kernel: OrbitKernel, at: KernelPoint, active: np.ndarray, group: IntArray
) -> Callable[[FloatArray], FloatArray]:
    """A preconditioner for ``H`` at ``at`` on the ``active`` pairs (the Newton-CG of
    :func:`~graphteleport.passes.canonical.minimize`, the least-squares fit of
    :mod:`graphteleport.compare`), two-level additive: ``M⁻¹ r = D⁻¹ r + R E⁺ Rᵀ r`` with
    ``D = diag H`` on the active pairs and the coarse space ``R`` of ``group``
    (:attr:`OrbitKernel.group` restricted to the active pairs: one value per layer or
    residual stream, :meth:`OrbitKernel.coarse`; ``E⁺`` its pseudo-inverse).  The coarse
    part carries what Jacobi cannot: a layer's channels moving together, whose curvature
    the neighbouring layers' opposite moves cancel."""
    diag = at.diagonal
    inv = np.where(active & (diag > 0), 1.0 / np.where(diag > 0, diag, 1.0), 0.0)
    members = np.flatnonzero(active & (group >= 0))
    if not members.size:
        return lambda r: inv * r
    of = group[members]
    ng = int(of.max()) + 1
    values, vectors = np.linalg.eigh(kernel.coarse(at, group)[:ng, :ng])
    keep = values > 1e-12 * max(float(values.max()), 0.0)
    pinv = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T

    def apply(r: FloatArray) -> FloatArray:
        out: FloatArray = inv * r
        out[members] += (pinv @ np.bincount(of, weights=r[members], minlength=ng))[of]
        return out

    return apply


def unique_inverse(values: np.ndarray) -> tuple[np.ndarray, IntArray]:
    """``np.unique(values, return_inverse=True)`` of a 1-D array (the sorted distinct
    values and each value's index among them) by one stable argsort: the same result;
    numpy 2.4's own took 2.4 ms on 49 k integers here against 0.3 ms (the low-rank
    plan of ResNet-50: 8.4 → 3.6 ms)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.ones(ordered.size, dtype=bool)
    new[1:] = ordered[1:] != ordered[:-1]
    inverse = np.empty(ordered.size, np.intp)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], inverse


def _group_slots(
    group: IntArray, pair: IntArray, seg: IntArray, n: int
) -> tuple[IntArray, tuple[tuple[IntArray, IntArray], ...]]:
    """:meth:`LowRankPlan.of`'s slots: for entries ``(pair, seg)`` (sorted by pair, then
    segment; each once) in groups ``group`` (``0 … G−1``), each group's sorted pairs
    (``members``) and segments (``segs``), and per entry its slot ``offset_g + row ·
    len(segs) + col`` (``row``, ``col``: its pair's and segment's ranks in the group) in
    the groups' dense matrices laid end to end — by one stable sort on the group, not a
    pass over all entries per group."""
    ng = int(group.max(initial=-1)) + 1
    order = np.argsort(group, kind="stable")  # (within a group: by pair, then segment)
    g, p, s = group[order], pair[order], seg[order]
    new = np.ones(g.size, dtype=bool)
    new[1:] = (p[1:] != p[:-1]) | (g[1:] != g[:-1])
    rank = np.cumsum(new) - 1
    first = np.searchsorted(g, np.arange(ng))
    row = rank - rank[first][g]
    counts = np.bincount(g, weights=new, minlength=ng).astype(np.intp)
    combos, _ = unique_inverse(g * n + s)  # (group, segment), by group then segment
    owner, cols = combos // n, combos % n
    width = np.bincount(owner, minlength=ng)
    col = np.searchsorted(combos, g * n + s) - np.searchsorted(owner, np.arange(ng))[g]
    offset = np.concatenate([[0], np.cumsum(counts * width)[:-1]]).astype(np.intp)
    slot = np.empty(g.size, np.intp)
    slot[order] = offset[g] + row * width[g] + col
    members = np.split(p[new], np.cumsum(counts)[:-1])
    segs = np.split(cols, np.cumsum(width)[:-1])
    return slot, tuple(zip(members, segs, strict=True))


@dataclass(frozen=True, eq=False)
class LowRankPlan:
    """What :func:`low_rank` needs of a kernel's bilinear blocks alone: ``lo``, where
    their side entries start; per side entry from there its ``segment`` (a block's rows
    ``2b``, its columns ``2b + 1``) and its ``slot``; and the pairs those entries reach
    grouped by the set of segments each meets (a layer's channels, a residual stream's),
    each group ``(pairs, segments)`` a dense ``len(pairs) × len(segments)`` matrix of
    slots (row-major, one group after the other): ``UᵀD⁻¹U`` is then one small product
    per group."""

    lo: int
    segment: IntArray
    slot: IntArray
    groups: tuple[tuple[IntArray, IntArray], ...]
    flat_cells: dict[int, tuple[IntArray, ...]] = field(default_factory=dict)  # (cells)

    @classmethod
    def of(cls, kernel: OrbitKernel) -> LowRankPlan:
        """The plan of ``kernel`` (its bilinear blocks' side entries, which follow the
        single terms).  A pair's set of segments is told by a random weight per segment
        summed over the set in segment order (sets that agree sum alike); pairs whose sums
        agree form a group over the union of their segments (so a coincidence of sums
        would cost room, not correctness)."""
        starts, lengths, _ = kernel.segments
        n = starts.size
        lo = int(starts[0])
        segment = np.repeat(np.arange(n), lengths)
        keys, entry_combo = unique_inverse(kernel.index[lo:] * n + segment)
        pair, seg = keys // n, keys % n  # each (pair, segment) met once, by pair then segment
        weight = np.random.default_rng(0).random(n)
        tag = np.bincount(pair, weights=weight[seg], minlength=kernel.num_pairs)
        _, group = unique_inverse(tag[pair])
        slot, groups = _group_slots(group.reshape(-1), pair, seg, n)
        return cls(lo, segment, slot[entry_combo.reshape(-1)], tuple(groups))

    def gram(self, w: FloatArray, inv: FloatArray, n: int) -> FloatArray:
        """``UᵀD⁻¹U`` (``n × n``, one row and column per segment) for the side entries'
        values ``w`` (their ``U`` entries) and ``inv = D⁻¹`` per pair."""
        dense = np.bincount(self.slot, weights=w, minlength=self.size)
        out = np.zeros(n * n)
        offset = 0
        for (members, segs), cells in zip(self.groups, self.cells(n), strict=True):
            v = dense[offset : offset + members.size * segs.size].reshape(members.size, -1)
            out[cells] += (v.T @ (v * inv[members, None])).reshape(-1)
            offset += members.size * segs.size
        return out.reshape(n, n)

    def cells(self, n: int) -> tuple[IntArray, ...]:
        """Per group, the flat indices in an ``n × n`` matrix of its ``segments ×
        segments`` block (row-major), made once: :meth:`gram` adds each group's product
        there by one indexed add instead of an ``np.ix_`` per group and call."""
        if n not in self.flat_cells:
            groups = self.groups
            self.flat_cells[n] = tuple((s[:, None] * n + s[None, :]).reshape(-1) for _, s in groups)
        return self.flat_cells[n]

    @cached_property
    def size(self) -> int:
        """The slots of all groups."""
        return sum(m.size * s.size for m, s in self.groups)


def capacitance_inverse(gram: FloatArray) -> FloatArray:
    """The inverse of Woodbury's ``C⁻¹ + UᵀD⁻¹U`` (:func:`low_rank`): by LU; a block
    without terms (its rows and columns all zero: ``u = v = 0``) is decoupled with a 1 on
    its diagonal; the pseudo-inverse where LU finds the matrix singular."""
    empty = ~gram.any(axis=1)
    gram[empty, empty] = 1.0
    try:
        out: FloatArray = np.linalg.inv(gram)
    except np.linalg.LinAlgError:
        out = np.linalg.pinv(gram, hermitian=True)
    return out if np.isfinite(out).all() else np.linalg.pinv(gram, hermitian=True)


def low_rank(
    kernel: OrbitKernel, at: KernelPoint, active: np.ndarray
) -> Callable[[FloatArray], FloatArray] | None:
    """A preconditioner for ``H`` at ``at`` on the ``active`` pairs: the inverse of
    ``H₁``, the Hessian with each bilinear block's terms ``y_ij`` replaced by the rank-one
    ``r_i c_j / S`` of their row sums ``r``, column sums ``c`` and total ``S``
    (:meth:`OrbitKernel.rank_one`'s approximation, at ``at``) and every other term
    (single terms, the rest) by its diagonal.  ``H₁`` keeps ``D = diag H`` exactly and
    adds, per block with row entries (pairs ``P_i``, coefficients ``α_i``) and columns
    (``Q_j``, ``β_j``), the cross term ``(p²/S)(u vᵀ + v uᵀ)`` with ``u = Σ α_i r_i
    e_{P_i}`` and ``v = Σ β_j c_j e_{Q_j}``: ``H₁ = D + U C Uᵀ`` with two columns of
    ``U`` per block and ``C`` its ``(p²/S)·[[0, 1], [1, 0]]``, inverted by Woodbury's
    identity ``H₁⁻¹ = D⁻¹ − D⁻¹U (C⁻¹ + UᵀD⁻¹U)⁻¹ UᵀD⁻¹`` (a ``2B × 2B`` system for B
    blocks; ``UᵀD⁻¹U`` per group of pairs that meet the same blocks,
    :class:`LowRankPlan`).  ``H₁`` is the Hessian of a sum of non-negative terms (the
    rank-one ones have the exact row and column sums), so positive semidefinite, and
    ``H`` itself where every ``Q`` has rank one and there is no rest (the solver's
    start).  ``None`` without bilinear blocks."""
    if not kernel.matrices:
        return None
    plan = kernel.low_rank_plan
    diag = at.diagonal
    inv = np.where(active & (diag > 0), 1.0 / np.where(diag > 0, diag, 1.0), 0.0)
    lo, n = plan.lo, int(kernel.segments[0].size)
    w = kernel.coef[lo:] * at.sums[lo:]
    gram = plan.gram(w, inv, n)
    totals = np.add.reduceat(at.sums[lo:], kernel.segments[0] - lo)[::2]  # each block's S
    pos = np.arange(0, n, 2)
    gram[pos, pos + 1] += totals / (kernel.p * kernel.p)
    gram[pos + 1, pos] += totals / (kernel.p * kernel.p)
    solve = capacitance_inverse(gram)
    index = kernel.index[lo:]

    def apply(r: FloatArray) -> FloatArray:
        z: FloatArray = inv * r
        t = np.add.reduceat(w * z[index], kernel.segments[0] - lo)
        s = solve @ t
        z -= inv * np.bincount(index, weights=w * s[plan.segment], minlength=z.size)
        return z

    return apply

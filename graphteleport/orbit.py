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

**The products.**  A use whose factors reach no common pair (nearly all: a conv weight
``τ_out[O,1,1,1] · τ_in[1,C,1,1]^-1``, a bias) is kept as a :class:`Block`: per factor,
its pairs and coefficients in the factor's own id shape.  Its rows of ``A·u`` are the
broadcast sum ``Σ_f (coef_f · u[pairs_f])`` over the compact layout (no gather over
``O·C``), and ``Aᵀv`` sums ``v`` over the axes each factor is constant along before
scattering onto its pairs (``O + C`` entries, not ``O·C``).  The other uses go through
the coordinates (``loose``).  Both give ``A`` exactly; only the order of summation
differs.  A solver uses :class:`graphteleport.orbit_kernel.OrbitKernel`, which reads a
conv/Gemm weight's ``Q`` as a matrix (gemv) instead of row by row.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import onnx_ir as ir

from graphteleport.algebra import with_rank
from graphteleport.analysis import Absorb, AnalysisResult, ConstRef
from graphteleport.parallel import each, one_blas_thread

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


def reduced_power(
    use: Absorb,
    w: np.ndarray,
    p: float,
    out: FloatArray | None = None,
    factor: float = 1.0,
    cshape: tuple[int, ...] | None = None,
) -> FloatArray:
    """``Q = factor · Σ |W|^p`` of the use's values summed over the axes where its compact
    layout has size 1: one value per element of :func:`compact_shape` (written into
    ``out``, a float64 or float32 array of that size, if given; else float64).

    For ``p`` in 1, 2, 3, 4 one ``einsum`` per use, accumulating in float64 (each product
    of two float32 is exact in float64); a non-finite element (a mask's ``±inf``) makes
    its sum non-finite, and only then are the values filtered (they count 0).  A float32
    ``out`` gets each float64 sum rounded once; :class:`Narrow` is raised where one would
    not be a normal float32 (above :data:`SINGLE_MAX` or a positive sum below float32's
    smallest normal): the caller then works in float64."""
    values = used_values(use, w)
    cshape = compact_shape(use) if cshape is None else cshape
    target = np.empty(cshape) if out is None else out.reshape(cshape)
    if p in (1.0, 2.0, 3.0, 4.0) and values.dtype in _EINSUM_DTYPES:
        total = _power_sum(values, target, p, factor)
        if np.isfinite(total):  # (a sum too large for float64 takes the path below)
            return target
    if target.dtype != np.float64:  # (then Narrow: not finite in float64 either)
        _narrow_into(reduced_power(use, w, p, None, factor).reshape(-1), target.reshape(-1))
        return target
    values = np.abs(values.astype(np.float64))
    values = np.where(np.isfinite(values), values, 0.0)  # ±inf stays ±inf: never counts
    powered = values * values if p == 2 else values**p
    axes = tuple(k for k, (c, s) in enumerate(zip(cshape, use.shape)) if c == 1 and s != 1)
    target[...] = np.sum(powered, axis=axes, keepdims=True).reshape(cshape)
    if factor != 1.0:
        target *= factor
    return target


#: The largest ``Q`` a float32 ``Q`` holds (:func:`reduced_power`; well inside float32's
#: range, so that the float32 products ``Q·v`` with ``|v| ≤ 1`` cannot overflow).
SINGLE_MAX = 1e30
_SINGLE_TINY = float(np.finfo(np.float32).tiny)


class Narrow(ArithmeticError):
    """A ``Q`` that float32 does not hold as a normal number (:func:`reduced_power`)."""


def fits_single(wide: FloatArray) -> bool:
    """Every value of ``wide`` (float64, ``≥ 0``) is a normal float32 at most
    :data:`SINGLE_MAX`, or 0: finite, not above it, and not positive below float32's
    smallest normal (it would round to a subnormal or to 0: a row that counts would stop
    counting)."""
    if not wide.size:
        return True
    hi, lo = float(wide.max()), float(wide.min())
    if not hi <= SINGLE_MAX:
        return False
    return lo >= _SINGLE_TINY or not bool(((wide > 0) & (wide < _SINGLE_TINY)).any())


def _narrow_into(wide: FloatArray, out: np.ndarray) -> None:
    """``out[...] = wide`` (float64 sums, rounded once into float32 ``out``); raises
    :class:`Narrow` unless :func:`fits_single`."""
    if not fits_single(wide):
        raise Narrow
    out[...] = wide


_EINSUM_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _power_sum(values: np.ndarray, out: FloatArray, p: float, factor: float = 1.0) -> float:
    """``out = factor · Σ |values|^p`` (p = 1, 2, 3 or 4) over the axes where ``out``
    (float64, or float32: each sum rounded once, :func:`_narrow_into`) has size 1, and
    the sum of ``out`` (non-finite where an element is, or where the sum is beyond
    float64); non-finite elements make their sums non-finite.
    A contiguous ``values`` summed over trailing axes (a conv's kernel window) or over
    nothing (a 1×1 conv, a bias) is read as a matrix, one row per element of ``out``
    (:func:`_power_rows`)."""
    kept = [k for k, c in enumerate(out.shape) if c != 1]
    rows = math.prod(out.shape)
    if values.flags.c_contiguous and (values.size == out.size or kept == list(range(len(kept)))):
        return _power_rows(values.reshape(rows, -1), out.reshape(-1), p, factor)
    if out.dtype != np.float64:  # float32: summed in float64, each sum rounded once
        wide = np.empty(out.shape)
        total = _power_sum(values, wide, p, factor)
        if np.isfinite(total):
            _narrow_into(wide.reshape(-1), out.reshape(-1))
        return total
    letters, target = "abcdefghijklmnopqrstuvwxyz"[: values.ndim], out
    result = "".join(letters[k] for k in range(values.ndim) if target.shape[k] != 1)
    view = target.reshape([target.shape[k] for k in range(values.ndim) if target.shape[k] != 1])
    if p == 1.0:
        np.einsum(f"{letters}->{result}", np.abs(values), dtype=np.float64, out=view)
    elif p == 2.0:
        np.einsum(f"{letters},{letters}->{result}", values, values, dtype=np.float64, out=view)
    else:  # |w|³ = w²·|w|, w⁴ = w²·w²: one rounding each in float64
        squares = np.square(values, dtype=np.float64)
        other = np.abs(values).astype(np.float64) if p == 3.0 else squares
        np.einsum(f"{letters},{letters}->{result}", squares, other, out=view)
    if factor != 1.0:
        view *= factor
    return float(view.sum())


#: The float64 elements of a chunk :func:`_power_rows` works on while it is in cache.
POWER_CHUNK = 1 << 15
#: The elements of a chunk the float32 paths (:func:`_single_powers`, :func:`_single_windows`)
#: work on: 512 KB a buffer, the chunk's few numpy calls paid ~110 times on ResNet-50
#: instead of ~440. cle's ``balance_terms``, interleaved against 2^15 (21 rounds, load
#: ~4): 2^16 CPU −4 %, 2^17 −5 to −8 %, 2^18 −7 %, 2^19 +1 %.
SINGLE_CHUNK = 1 << 17


@functools.cache
def _ones32() -> np.ndarray:
    """:data:`SINGLE_CHUNK` float32 ones, read-only (:func:`_single_powers`' dot products)."""
    ones = np.ones(SINGLE_CHUNK, np.float32)
    ones.setflags(write=False)
    return ones


def _power_rows(values: np.ndarray, out: FloatArray, p: float, factor: float = 1.0) -> float:
    """``out[i] = factor · Σ_j |values[i, j]|^p`` for a matrix ``values`` (p = 1, 2, 3 or
    4), a chunk of rows at a time in one float64 buffer: ``|w|`` cast exactly, ``w²``
    exact, ``|w|³ = w²·|w|`` and ``w⁴ = (w²)²`` rounded once, the row sums by a
    matrix-vector product with ``factor`` s (or the powers themselves, times ``factor``
    while in cache, for one column); returns ``Σ out``, summed chunk by chunk while in
    cache.  A float32 ``out`` gets each float64 row sum rounded once
    (:func:`_narrow_into`: :class:`Narrow` where float32 does not hold it)."""
    rows, width = values.shape
    single = out.dtype == np.float32 and values.dtype == np.float32
    if width == 1 and single and p in (1.0, 2.0, 3.0, 4.0):
        total = _single_powers(values.reshape(-1), out, p, factor)
        if total is not None:
            return total
    elif single and (p == 3.0 or (p == 2.0 and width <= SINGLE_WIDTH)):
        return _single_windows(values, out, p, factor)
    step = max(1, POWER_CHUNK // max(width, 1))
    buffer = np.empty(min(step, rows) * width)
    squares = np.empty_like(buffer) if p == 3.0 else buffer
    narrow = out.dtype != np.float64
    sums = np.empty(min(step, rows)) if narrow else out
    ones = np.full(width, factor)
    total = 0.0
    for i in range(0, rows, step):
        chunk = values[i : i + step]
        k = chunk.shape[0]
        n = k * width
        a, sq = buffer[:n].reshape(chunk.shape), squares[:n].reshape(chunk.shape)
        mine = sums[:k] if narrow else out[i : i + k]
        if width == 1:  # the powers are the sums: computed where they go
            a = mine.reshape(chunk.shape)
            sq = a if p != 3.0 else sq
        np.absolute(chunk, out=a)
        if p != 1.0:
            np.square(a, out=sq)
        if p == 3.0:
            a *= sq
        elif p == 4.0:
            np.square(a, out=a)
        if width != 1:
            np.matmul(a, ones, out=mine)
        elif factor != 1.0:
            a *= factor
        total += float(mine.sum())
        if narrow:  # (Q ≥ 0: no sum above the running total; checked before the cast)
            if not total <= SINGLE_MAX or (
                float(mine.min()) < _SINGLE_TINY and not fits_single(mine)
            ):
                raise Narrow  # (also a non-finite element: the float64 path filters it)
            out[i : i + k] = mine
    return total


#: The widest row (in elements: a conv's k×k window) the float32 build sums in float32 at
#: p = 2 (:func:`_single_windows`; the error grows with the width); at p = 3 every width
#: is (its float64 path costs twice as much).
SINGLE_WIDTH = 64


def _single_windows(values: np.ndarray, out: np.ndarray, p: float, factor: float = 1.0) -> float:
    """``out[i] = factor · Σ_j |values[i, j]|^p`` (p = 2 or 3) for a float32 matrix
    ``values`` (a conv's k×k windows) into float32 ``out``, in float32 a chunk of rows at
    a time: ``w²`` rounded once, ``|w|³ = w²·|w|`` twice, the row sums by a matrix-vector
    product with ``float32(factor)``s (:func:`_power_rows` does the same in float64);
    returns ``Σ out``, summed chunk by chunk in float64.  Raises :class:`Narrow` as
    :func:`_power_rows` does: a sum above :data:`SINGLE_MAX` (an overflow to inf
    included, found on the sums, the warning silenced), a non-finite element, a positive
    sum below float32's smallest normal — or a zero sum of a row with a non-zero element
    (every power underflowed: a row that counts would stop counting).

    **Rounding.**  Each row ``Σ_j c·|w_j|^p`` of ``n`` terms carries a relative error of
    at most ``(n + 2)·2⁻²⁴`` at p = 2 and ``(n + 3)·2⁻²⁴`` at p = 3 (one or two roundings
    of each power, the factor's, ``n − 1`` additions of positive terms, in any order;
    float32's gradual underflow adds at most ``2⁻¹⁵⁰`` a term, below that relative to a
    normal sum) instead of the float64 path's ``2⁻²⁴``: for a 3×3 window ``11·2⁻²⁴ ≈
    7e-7``.  As for :func:`_single_powers`, that is of the order of the stored weights'
    own float32 rounding (``p·2⁻²⁴`` per ``|w|^p``) and moves the minimum ``u`` far
    below what the invariance asks of the weights (ResNet-50's canonical form: 1e-8).
    ResNet-50's cle (p = 3, 11.3 M elements in 3×3 windows): this part of the build
    ~1.3 → ~0.8 ns an element; its canonical form (p = 2): ``OrbitTerms.build`` CPU
    33.9 → 28.0 ms (per-round 0.81–0.83, 21 rounds, load 4)."""
    rows, width = values.shape
    step = max(1, SINGLE_CHUNK // width)
    a = np.empty((min(step, rows), width), np.float32)
    squares = np.empty_like(a)
    weights = np.full(width, factor, np.float32)
    total = 0.0
    for i in range(0, rows, step):
        chunk = values[i : i + step]
        k = chunk.shape[0]
        mine, part, sq = out[i : i + k], a[:k], squares[:k]
        with np.errstate(over="ignore", invalid="ignore"):  # (found on the sums below)
            if p == 2.0:
                np.square(chunk, out=part)
            else:
                np.absolute(chunk, out=part)
                np.multiply(part, part, out=sq)
                part *= sq
            np.matmul(part, weights, out=mine)
        total += float(mine.sum(dtype=np.float64))
        # (Q ≥ 0: no sum above the running total; a NaN or inf makes it non-finite)
        if not total <= SINGLE_MAX or (float(mine.min()) < _SINGLE_TINY and not _held(mine, chunk)):
            raise Narrow
    return total


def _held(sums: np.ndarray, rows: np.ndarray) -> bool:
    """The float32 row sums ``sums`` of ``rows`` (:func:`_single_windows`) hold what they
    sum: each is a normal float32 or 0 (:func:`fits_single`), and 0 only where its row is."""
    zero = sums == 0
    return fits_single(sums) and not (zero.any() and bool((rows[zero] != 0).any()))


def _single_powers(
    values: np.ndarray, out: np.ndarray, p: float, factor: float = 1.0
) -> float | None:
    """``out = factor · |values|^p`` (p = 1, 2, 3 or 4) of a float32 ``values`` into float32
    ``out`` (one element per row: no sums), computed in float32 a chunk at a time, or None
    where some value is not a normal float32 at most :data:`SINGLE_MAX` (0, inf, NaN too:
    the caller then takes the float64 path, which raises :class:`Narrow` as it does);
    returns ``Σ out``, each chunk summed in float32 by a dot product with ones (BLAS;
    ≤ 2¹⁷ terms: a relative error below 1e-2 — the callers use the total only to tell
    whether it is finite and within :data:`SINGLE_MAX`, not as a statistic).  Each chunk's
    smallest value is checked (0, a subnormal, NaN: None); no largest one — ``out ≥ 0``,
    so a value above :data:`SINGLE_MAX` or inf makes the total so.  At even p the first
    pass squares ``w`` itself (``w² = |w|²``, the same bits) instead of taking ``|w|``
    first.

    **Rounding.**  At p = 1 or 2 without a factor these are the float64 path's bits
    (``|w|`` is exact, ``w²`` exact in float64 and correctly rounded in float32).  At p = 3
    (``w²·|w|``), p = 4 (``(w²)²``) or with a factor, each element is rounded two to four
    times instead of once: a relative error of at most ``4·2⁻²⁴`` per row instead of
    ``2⁻²⁴``.  That is harmless for what ``Q`` is for: a model and its teleport agree only
    to their stored weights' float32 rounding, ``2⁻²⁴`` relative per element and so
    ``p·2⁻²⁴`` per ``|w|^p`` already — ``Q``'s own rounding moves the minimum ``u`` by
    ~1e-8 on ResNet-50 (cle, p = 3: 1.6e-8 more with this), three orders below the 1e-5
    the invariance asks of the weights.  About a third of the float64 path's arithmetic:
    ResNet-50's cle (p = 3, 14.2 M one-element rows) ``OrbitTerms.build`` CPU −9 ms."""
    total = 0.0
    spare = np.empty(min(SINGLE_CHUNK, values.size), np.float32) if p == 3.0 else None
    ones = _ones32()
    scale = np.float32(factor)
    for i in range(0, values.size, SINGLE_CHUNK):
        a, chunk = out[i : i + SINGLE_CHUNK], values[i : i + SINGLE_CHUNK]
        with np.errstate(over="ignore"):  # (an inf is found below: then None)
            if p in (1.0, 3.0):
                np.absolute(chunk, out=a)
            else:  # w² = |w|²: the same bits, one pass fewer
                np.square(chunk, out=a)
            if p == 3.0:
                assert spare is not None
                sq = spare[: a.size]
                np.multiply(a, a, out=sq)
                a *= sq
            elif p == 4.0:
                np.square(a, out=a)
            if factor != 1.0:
                a *= scale
        if not (a.size == 0 or float(a.min()) >= _SINGLE_TINY):  # (NaN: False)
            return None
        total += float(a @ ones[: a.size])  # (inf, or above SINGLE_MAX: the total is too)
    return total if total <= SINGLE_MAX else None


def stored_arrays(analysis: AnalysisResult, writable: bool = False) -> dict[str, np.ndarray]:
    """Every stored tensor ``analysis`` rescales, by name, read once: each
    ``ConstRef.array()`` copies the tensor's bytes out of its proto, so a pass that reads
    them several times (the statistics, the sign rule, one-sided pairs, the report's
    figures) reads them from here.  With ``writable``, each is the pass's own writable
    C-contiguous copy (an array over the proto's bytes is read-only), which the rewrite
    may write its product into (:func:`graphteleport.rewrite.prepare`'s ``consume``),
    the copies made on the :mod:`~graphteleport.parallel` workers (:func:`each` tensor
    on the thread that takes it; numpy's copy releases the GIL).

    **One slab.**  The copies are views of one array (:func:`_slab`), not one allocation
    each: most of ResNet-50's tensors are under numpy's 4 MB huge-page threshold, so
    their fresh memory was faulted in 4 KiB pages — a cle pass took 8–9 k minor faults,
    1–2 k with the slab (whole passes, with :func:`~graphteleport.parallel.each`: wall
    per-round 0.93, bench/README.md).  The slab lives as long as any of its views (the
    rewritten model's weights are most of them): no more memory than the copies took
    before."""
    if not writable:
        return {w.source.name: w.source.array() for w in analysis.weights}
    weights = analysis.weights
    places = [_place(w.source) for w in weights]
    slab, offsets = _slab(places)
    copies: list[np.ndarray | None] = [None] * len(weights)

    def read(k: int) -> None:
        w, place = weights[k].source.array(), places[k]
        if place is None or (w.dtype, w.shape) != place:  # (its own array, as it came)
            copies[k] = np.array(w, order="C")
            return
        copy = slab[offsets[k] : offsets[k] + w.nbytes].view(w.dtype).reshape(w.shape)
        np.copyto(copy, w)
        copies[k] = copy

    each(read, [int(np.prod(w.uses[0].shape)) for w in weights])  # (sizes: about)
    return {w.source.name: c for w, c in zip(weights, copies, strict=True) if c is not None}


#: Each copy in the slab starts on a multiple of this many bytes (a cache line).
SLAB_ALIGN = 64

Place = tuple[np.dtype, tuple[int, ...]]


def _place(ref: ConstRef) -> Place | None:
    """The dtype and shape ``ref.array()`` has, where the initializer says them without
    being read (a plain numeric type, a static shape), else None (its copy: its own)."""
    tensor = None if ref.is_node or isinstance(ref.value, ir.Node) else ref.value.const_value
    if tensor is None or tensor.dtype.bitwidth not in (8, 16, 32, 64):
        return None
    try:
        dtype = np.dtype(tensor.dtype.numpy())
    except TypeError:
        return None
    dims = tuple(d for d in tensor.shape if isinstance(d, int))
    return (dtype, dims) if len(dims) == len(tensor.shape) else None


def _slab(places: Sequence[Place | None]) -> tuple[np.ndarray, list[int]]:
    """One byte array for every placed copy, starting on a multiple of :data:`SLAB_ALIGN`
    bytes, and each one's offset in it (aligned too; that of the next for those without a
    place)."""
    offsets, end = [], 0
    for place in places:
        offsets.append(end)
        if place is not None:
            n = place[0].itemsize * int(np.prod(place[1], dtype=np.int64))
            end += -(-n // SLAB_ALIGN) * SLAB_ALIGN
    raw = np.empty(end + SLAB_ALIGN, np.uint8)
    shift = -raw.ctypes.data % SLAB_ALIGN
    return raw[shift : shift + end], offsets


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
class BlockFactor:
    """One factor of a :class:`Block`: ``shape`` (its ids' shape at the block's rank),
    ``axes`` (where it is 1 and the block is not: summed over by ``Aᵀ``), and per id its
    pair and coefficient ``exp · sign`` (0 where the pair is not movable)."""

    shape: tuple[int, ...]
    axes: tuple[int, ...]
    pairs: IntArray
    coef: FloatArray


@dataclass(frozen=True, eq=False)
class Block:
    """The rows ``[lo, hi)`` of one use in its compact layout ``shape``:
    ``(A·u)[lo:hi] = Σ_f coef_f · u[pairs_f]`` broadcast to ``shape`` (module docstring)."""

    lo: int
    hi: int
    shape: tuple[int, ...]
    factors: tuple[BlockFactor, ...]


def block_of(
    use: Absorb,
    lo: int,
    pair: IntArray,
    sign: FloatArray,
    movable: IntArray,
    cshape: tuple[int, ...] | None = None,
) -> Block:
    """``use``'s rows from ``lo`` as a :class:`Block` (its factors reach no common pair;
    ``cshape``: its :func:`compact_shape`, if at hand); factors without a movable pair are
    left out."""
    cshape = compact_shape(use) if cshape is None else cshape
    factors: list[BlockFactor] = []
    for f in use.factors:
        ids = with_rank(np.asarray(f.ids), len(cshape))
        pairs = pair[ids.reshape(-1)]
        keep = movable[pairs]
        if not keep.any():
            continue
        axes = tuple(k for k, (i, c) in enumerate(zip(ids.shape, cshape)) if i == 1 and c != 1)
        coef = np.where(keep, f.exp * sign[ids.reshape(-1)], 0.0)
        factors.append(BlockFactor(ids.shape, axes, pairs.astype(np.intp), coef))
    return Block(lo, lo + math.prod(cshape), cshape, tuple(factors))


def block_coordinates(
    block: Block, f: BlockFactor, movable: IntArray
) -> tuple[IntArray, IntArray, FloatArray]:
    """The coordinates ``(rows, cols, coef)`` of factor ``f`` of ``block``: one entry per
    row of the block and movable pair of ``f`` there (rows in order)."""

    def spread(values: np.ndarray) -> np.ndarray:
        return np.broadcast_to(values.reshape(f.shape), block.shape).reshape(-1)

    keep = spread(movable[f.pairs])
    rows = block.lo + np.flatnonzero(keep)
    return rows, spread(f.pairs)[keep], spread(f.coef)[keep]


@dataclass(frozen=True, eq=False)
class OrbitTerms:
    """``F(u) = Σ_k q[k] · exp(p · (A·u)[k])`` for one model (module docstring).

    ``A`` is held as ``blocks`` (module docstring) and ``loose``, the coordinates
    ``(rows, cols, coef)`` of the rows no block holds (no ``(row, col)`` twice: a use whose
    factors reach a common pair has its entries merged); :attr:`rows`, :attr:`cols`,
    :attr:`coef` are all of ``A``'s coordinates, made on first use.  ``q`` holds one
    statistic per row; ``spans`` gives each counted use's rows (``[lo, hi)`` in
    :func:`counted_uses` order); ``movable`` marks the pairs that are columns;
    ``num_pairs`` is the length of every ``u``.
    """

    p: float
    q: FloatArray
    movable: IntArray
    num_pairs: int
    spans: tuple[tuple[int, int], ...]
    blocks: tuple[Block, ...]
    loose: tuple[IntArray, IntArray, FloatArray]

    @cached_property
    def scratch(self) -> FloatArray:
        """One row-sized buffer that :meth:`hessian_vector` reuses (a fresh 100 MB array
        per product costs its page faults again)."""
        return np.empty(self.q.size)

    @cached_property
    def blocked(self) -> bool:
        """Every row belongs to a block (no use is held by ``loose``)."""
        return sum(b.hi - b.lo for b in self.blocks) == self.q.size

    @cached_property
    def coordinates(self) -> tuple[IntArray, IntArray, FloatArray]:
        """All of ``A``'s coordinates ``(rows, cols, coef)``: the blocks' then ``loose``."""
        parts = [block_coordinates(b, f, self.movable) for b in self.blocks for f in b.factors]
        return _concat([*parts, self.loose])

    @property
    def rows(self) -> IntArray:
        """Each coordinate's row."""
        return self.coordinates[0]

    @property
    def cols(self) -> IntArray:
        """Each coordinate's column (pair)."""
        return self.coordinates[1]

    @property
    def coef(self) -> FloatArray:
        """Each coordinate's coefficient."""
        return self.coordinates[2]

    @classmethod
    def build(
        cls,
        analysis: AnalysisResult,
        p: float = 2.0,
        arrays: Mapping[str, np.ndarray] | None = None,
        hold: np.ndarray | None = None,
        scales: Sequence[float] | None = None,
        single: bool = False,
    ) -> OrbitTerms:
        """The terms of ``analysis``'s model with ``Q = Σ |W|^p``; ``arrays`` gives the
        stored tensors by name (default: read from the model, ``ConstRef.array()``);
        ``hold`` marks pairs that keep ``t = 1`` (not columns, though movable);
        ``scales`` gives per counted use (:func:`counted_uses` order) a factor its ``Q``
        is multiplied by (default 1).  The statistics of large models are computed on
        both cores (:func:`shares` of the values each use reads; each use's rows are its
        own).  With ``single``, ``q`` is float32 (each float64 sum rounded once: a
        relative change of at most 2⁻²⁴ per row, half the bytes for every later read of
        it), unless some ``Q`` is not a normal float32 at most :data:`SINGLE_MAX`
        (:class:`Narrow`): then float64, as without."""
        sol = analysis.solution
        movable = movable_pairs(analysis)
        if hold is not None:
            movable = movable & ~np.asarray(hold, dtype=bool)
        sign = np.where(np.asarray(sol.inverse, dtype=bool), -1.0, 1.0)
        uses = counted_uses(analysis)
        factors = [1.0] * len(uses) if scales is None else [float(x) for x in scales]
        cshapes = [compact_shape(use) for use in uses]  # (each once: ~7 µs a call)
        bounds = [0, *itertools.accumulate(math.prod(c) for c in cshapes)]
        q_all = np.empty(bounds[-1], np.float32 if single else np.float64)

        def power(k: int) -> None:
            use = uses[k]
            w = arrays[use.source.name] if arrays is not None else use.source.array()
            reduced_power(use, w, p, q_all[bounds[k] : bounds[k + 1]], factors[k], cshapes[k])

        work = [math.prod(use.shape) for use in uses]  # the values each use reads
        try:
            with one_blas_thread():  # (the row sums' gemv: both cores already, by each)
                each(power, work)
        except Narrow:
            return cls.build(analysis, p, arrays, hold, scales, single=False)
        loose: list[tuple[IntArray, IntArray, FloatArray]] = []
        blocks: list[Block] = []
        for use, offset, cshape in zip(uses, bounds, cshapes):
            block = block_of(use, offset, sol.pair, sign, movable, cshape)
            if _overlap([f.pairs[movable[f.pairs]] for f in block.factors], sol.num_pairs):
                mine = [block_coordinates(block, f, movable) for f in block.factors]
                loose.extend(_merge(mine, sol.num_pairs))
            else:
                blocks.append(block)
        spans = tuple(itertools.pairwise(bounds))
        return cls(float(p), q_all, movable, sol.num_pairs, spans, tuple(blocks), _concat(loose))

    def with_rows(
        self, q: FloatArray, coordinates: tuple[IntArray, IntArray, FloatArray]
    ) -> OrbitTerms:
        """These terms and ``len(q)`` more rows after them: ``coordinates`` ``(rows, cols,
        coef)`` index the new rows from 0 (no ``(row, col)`` twice; entries on pairs that
        are not columns are dropped); the new rows belong to no span or block.  With no
        rows, these terms themselves (``q`` is not copied)."""
        if not len(q):
            return self
        rows, cols, coef = coordinates
        keep = self.movable[cols].astype(bool)
        extra = (np.asarray(rows)[keep] + self.q.size, np.asarray(cols)[keep], coef[keep])
        q_all = np.concatenate([self.q, q], dtype=np.float64)
        if self.q.dtype != np.float64 and fits_single(q_all[self.q.size :]):
            q_all = q_all.astype(np.float32)  # float32 terms stay float32 if the rows fit
        return replace(self, q=q_all, loose=_concat([self.loose, extra]))

    # -- the map and its transpose --------------------------------------------------------------
    def log_scale(self, u: FloatArray, out: FloatArray | None = None) -> FloatArray:
        """``A·u``: ``log|S|`` of every row (into ``out``, float64 of ``q``'s size, if
        given)."""
        rows, cols, coef = self.loose
        if out is None:
            out = np.empty(self.q.size)
        if rows.size:
            out[...] = np.bincount(rows, weights=coef * u[cols], minlength=self.q.size)
        elif not self.blocked:
            out[...] = 0.0  # else every row is a block's: written below
        for b in self.blocks:
            view = out[b.lo : b.hi].reshape(b.shape)
            parts = [(f.coef * u[f.pairs]).reshape(f.shape) for f in b.factors]
            if len(parts) >= 2:  # one pass over the block for the first two factors
                np.add(parts[0], parts[1], out=view)
            else:
                view[...] = parts[0] if parts else 0.0
            for part in parts[2:]:
                view += part
        return out

    def pair_sums(self, values: FloatArray, squared: bool = False) -> FloatArray:
        """The scatter-add ``Aᵀ·values`` onto the pairs (``squared``: with ``coef²``,
        ``Σ_k coef[k,q]² · values[k]``); 0 on pairs that are not columns."""
        return self._scatter(values, lambda c, _: c * c if squared else c)

    def pair_counts(self, values: FloatArray) -> FloatArray:
        """``Σ_k values[k]`` over the rows ``k`` each pair is a column of (``Aᵀ·values``
        with every entry of ``A`` taken as 1); 0 on pairs that are not columns."""
        return self._scatter(values, lambda _, pairs: self.movable[pairs].astype(np.float64))

    def _scatter(
        self, values: FloatArray, weigh: Callable[[FloatArray, IntArray], FloatArray]
    ) -> FloatArray:
        """``Σ_k w[k,q] · values[k]`` per pair q, ``w = weigh(coef, pairs)`` of ``A``'s
        entries: a block factor's row sums of ``values`` over the axes it is constant
        along, times its weights, scattered onto its pairs; ``loose`` entry by entry."""
        rows, cols, coef = self.loose
        idx = [cols]
        weights = [weigh(coef, cols) * values[rows]]
        for b in self.blocks:
            view = values[b.lo : b.hi].reshape(b.shape)
            for f in b.factors:
                sums = view.sum(axis=f.axes) if f.axes else view
                idx.append(f.pairs)
                weights.append(weigh(f.coef, f.pairs) * sums.reshape(-1))
        out: FloatArray = np.bincount(
            np.concatenate(idx), weights=np.concatenate(weights), minlength=self.num_pairs
        )
        return out.astype(np.float64, copy=False)

    # -- the objective ----------------------------------------------------------------------------
    def terms(self, u: FloatArray) -> FloatArray:
        """``y = q · exp(p·A·u)``: each row's ``Σ |W'|^p`` at ``u``."""
        out = self.log_scale(u)
        out *= self.p
        np.exp(out, out=out)
        overflow = bool(np.isinf(out).any())
        out *= self.q
        if overflow:  # 0 · inf: a row that does not count (q = 0) stays 0
            out[self.q == 0] = 0.0
        return out

    def objective(self, u: FloatArray) -> float:
        """``F(u) = Σ |W'|^p`` over every counted use."""
        return float(self.terms(u).sum())

    def gradient(self, u: FloatArray) -> FloatArray:
        """``∂F/∂u = p · Aᵀ y`` per pair (0 where the pair is not a column)."""
        return self.p * self.pair_sums(self.terms(u))

    def hessian_vector(self, y: FloatArray, v: FloatArray) -> FloatArray:
        """``H·v = p² · Aᵀ (y ⊙ A·v)`` for ``y = terms(u)``."""
        av = self.log_scale(v, out=self.scratch)
        av *= y
        return self.p * self.p * self.pair_sums(av)

    def hessian_diagonal(self, y: FloatArray) -> FloatArray:
        """``diag H = p² · Σ_k coef[k,q]² · y[k]`` for ``y = terms(u)``."""
        return self.p * self.p * self.pair_sums(y, squared=True)

    def moving(self) -> tuple[OrbitTerms, float]:
        """The rows that move (``q > 0`` and some column), as terms of their own (the
        other rows kept with ``q = 0``, ``spans`` empty), and ``Σ q`` of the others:
        ``F(u) = moving.objective(u) + constant``.  A solver should work on the moving
        part: a constant row (a pinned mask's huge fill value) would swamp every relative
        criterion."""
        has = np.zeros(self.q.size, dtype=bool)
        has[self.loose[0]] = True
        for b in self.blocks:
            view = has[b.lo : b.hi].reshape(b.shape)
            for f in b.factors:
                view |= self.movable[f.pairs].reshape(f.shape)
        keep = has & (self.q > 0)
        constant = float(self.q[~keep].sum(dtype=np.float64))
        return replace(self, q=np.where(keep, self.q, 0.0), spans=()), constant

    def active(self) -> IntArray:
        """Per pair: a column of some row with ``q > 0`` (F moves along it); F is constant
        along every other pair."""
        rows, cols, _ = self.loose
        hit = np.zeros(self.num_pairs, dtype=bool)
        hit[cols[self.q[rows] > 0]] = True
        for b in self.blocks:
            counts = self.q[b.lo : b.hi].reshape(b.shape) > 0
            for f in b.factors:
                there = counts.any(axis=f.axes) if f.axes else counts
                hit[f.pairs[there.reshape(-1) & self.movable[f.pairs]]] = True
        return hit


def inserted_rows(
    analysis: AnalysisResult, weight: Callable[[int], float]
) -> tuple[FloatArray, tuple[IntArray, IntArray, FloatArray]]:
    """Insert mode's constants as rows of an objective ``Σ q·|S|^p`` (``q`` and coordinates
    ``(rows, cols, coef)`` from row 0, for :meth:`OrbitTerms.with_rows`): each element
    ``|Π τ^e|^p`` of a constant of ``n`` elements with ``q = weight(n)`` (all ``τ`` are 1
    at ``u = 0``; the canonical form counts them as weights, ``q = 1``; equalize as a
    tensor no quantizer quantizes, ``q = 1e-6/n``).  A wrap ``τ·f(x/τ)`` adds its
    ``Mul(1/τ)`` and ``Mul(τ)`` (not for an activation that commutes with positive scales:
    ``t > 0`` inserts none there); an edge its ``Mul(Π τ^e)``.  Without them a direction
    that leaves the weights or moves them all the same way — a transformer layer's
    stream and MLP classes together, the GELU wrapped — lets the objective fall without
    bound, the inserted ``Mul`` s taking up the scale."""
    sign = np.where(np.asarray(analysis.solution.inverse, dtype=bool), -1.0, 1.0)
    parts: list[list[tuple[np.ndarray, float]]] = []
    for wrap in analysis.wraps:
        if wrap.group != "positive":
            ids = np.asarray(wrap.ids).reshape(-1)
            parts += [[(ids, -1.0)], [(ids, 1.0)]]
    for edge in analysis.edges:
        shape = np.broadcast_shapes(*(np.shape(f.ids) for f in edge.factors))
        parts.append([(np.broadcast_to(f.ids, shape).reshape(-1), f.exp) for f in edge.factors])
    pair = analysis.solution.pair
    q: list[FloatArray] = []
    coords: list[tuple[np.ndarray, np.ndarray, FloatArray]] = []
    offset = 0
    for factors in parts:
        n = factors[0][0].size
        rows = np.concatenate([np.arange(n) for _ in factors])
        cols = np.concatenate([pair[ids] for ids, _ in factors])
        coef = np.concatenate([e * sign[ids] for ids, e in factors])
        keys, where = np.unique(rows * analysis.solution.num_pairs + cols, return_inverse=True)
        merged = np.bincount(where.reshape(-1), weights=coef, minlength=keys.size)
        coords.append(
            (
                offset + keys // analysis.solution.num_pairs,
                keys % analysis.solution.num_pairs,
                merged,
            )
        )
        q.append(np.full(n, weight(n)))
        offset += n
    if not parts:
        empty = np.zeros(0, np.int64)
        return np.zeros(0), (empty, empty, np.zeros(0))
    rows_, cols_, coef_ = (np.concatenate(c) for c in zip(*coords, strict=True))
    return np.concatenate(q), (rows_, cols_, coef_)


def _concat(
    parts: list[tuple[IntArray, IntArray, FloatArray]],
) -> tuple[IntArray, IntArray, FloatArray]:
    """The coordinates of ``parts`` laid end to end (int64, int64, float64)."""
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    rows = np.concatenate([r for r, _, _ in parts], dtype=np.int64, casting="same_kind")
    cols = np.concatenate([c for _, c, _ in parts], dtype=np.int64, casting="same_kind")
    coef = np.concatenate([v for _, _, v in parts], dtype=np.float64, casting="same_kind")
    return rows, cols, coef


def _overlap(pairs: list[IntArray], num_pairs: int) -> bool:
    """Two factors of one use (their movable ``pairs``) reach a common pair (some row may
    meet a pair twice); a pair repeated within one factor is no overlap.  (A mark per
    pair, no sorting: most uses have one or two factors of a few hundred ids.)"""
    if len(pairs) < 2:
        return False
    seen = np.zeros(num_pairs, dtype=bool)
    for cols in pairs:
        if seen[cols].any():
            return True
        seen[cols] = True
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

"""A float dtype's range, and when ``|w| · a`` leaves it.

The contract the rewrite keeps (:mod:`graphteleport.ranges`): for a weight ``W`` and
its scale ``S`` (``W' = W · S``), every element ``w`` that is finite and non-zero
gives a finite, non-zero ``w · s`` in W's dtype, and a normal ``w`` a normal one:

* ``|s| ≤ 1``, or ``|w| · |s| ≤ max``                   — no inf;
* ``|s| ≥ 1``, or ``|w| · |s| ≥ tiny``   (w normal)     — no subnormal, no 0;
* ``|s| ≥ 1``, or ``|w| · |s| ≥ min subnormal`` (w subnormal) — no 0.

Rounding to nearest is monotone and the bounds are representable, so bounds on the
exact product hold for the rounded one; ``MARGIN`` (2^-20 relative) covers ``S``'s own
rounding to float32 before the product.  Only ``|s| > 1`` can overflow and only
``|s| < 1`` underflow (``w · 1 = w``), so nothing else is flagged.
An ``s`` that is itself inf, NaN or 0 (float64 overflow of a product of cofactors) is
always flagged: it would turn even a zero element into NaN.

Every check needs only three numbers per group of elements that share one ``s`` (a
*cell*): the largest finite ``|w|``, the smallest normal and the smallest subnormal
non-zero ``|w|`` (:class:`Magnitudes`).  For a whole weight they come from one scan
of its bits (:func:`magnitudes`: a float's magnitude orders like its bit pattern with
the sign cleared), chunked so that no temporary of the weight's size is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

MARGIN = 2.0**-20
#: Elements a :class:`MagnitudeScan` works on at a time: a native product's block on the
#: rewrite's grid path (:data:`graphteleport.rewrite.GRID_BLOCK`) in one chunk, a watched
#: one's in two (ResNet-50's rewrite on one thread, 15-21 rounds interleaved, load ~3.9:
#: 2^16 → 2^17 canonicalize CPU 38.1 → 36.6 and 37.3 → 35.7 ms, cle 80.6 → 77.4;
#: 2^17 → 2^18 within noise).
_CHUNK = 1 << 17


@dataclass(frozen=True)
class Limits:
    """A float dtype's largest finite, smallest normal and smallest subnormal magnitude,
    and the bit patterns :func:`magnitudes` compares (``uint``: the same-size unsigned
    type; ``mask``: every bit but the sign)."""

    name: str
    max: float
    tiny: float
    sub: float
    uint: np.dtype
    mask: int
    inf_bits: int
    tiny_bits: int

    def value(self, bits: int, dtype: np.dtype) -> float:
        return float(np.array(bits, dtype=self.uint).view(dtype))


@cache
def limits(dtype: np.dtype) -> Limits:
    """The range of a float dtype, read from its bit layout (so also for ml_dtypes'
    bfloat16, which ``np.finfo`` does not know): +inf sets every exponent bit and no
    mantissa bit, so the mantissa is the bits below inf's lowest set bit; the smallest
    normal is 1 in the exponent's lowest bit, the largest finite is inf's bits − 1."""
    dtype = np.dtype(dtype)
    uint = np.dtype(f"u{dtype.itemsize}")
    inf_bits = int(np.array(np.inf).astype(dtype).view(uint))
    tiny_bits = inf_bits & -inf_bits

    def value(bits: int) -> float:
        return float(np.array(bits, dtype=uint).view(dtype))

    return Limits(
        name=dtype.name,
        max=value(inf_bits - 1),
        tiny=value(tiny_bits),
        sub=value(1),
        uint=uint,
        mask=(1 << (8 * dtype.itemsize - 1)) - 1,
        inf_bits=inf_bits,
        tiny_bits=tiny_bits,
    )


@dataclass(frozen=True, slots=True)
class Magnitudes:
    """A weight's finite non-zero magnitudes: the largest (0 when none), the smallest
    normal and the smallest subnormal (inf when none); ``dtype`` is the weight's."""

    hi: float
    lo_normal: float
    lo_sub: float
    dtype: np.dtype


def magnitudes(w: np.ndarray) -> Magnitudes:
    """:class:`Magnitudes` of a whole weight, from its bits (:class:`MagnitudeScan`)."""
    scan = MagnitudeScan(w.dtype)
    scan.add(w)
    return scan.result(w)


class MagnitudeScan:
    """:func:`magnitudes`, fed a contiguous piece of the weight at a time (the rewrite
    scans each block of rows while it is in cache for the product).

    With ``b = bits & mask`` (``|w|``'s pattern): ``max b`` is the largest magnitude;
    ``min (b − 1) mod 2^k`` skips zeros (0 wraps to the largest integer) and gives the
    smallest non-zero one; ``min (b − tiny) mod 2^k`` (zeros and subnormals wrap) the
    smallest normal — in a chunk without subnormal elements that is ``min (b − 1) + 1 −
    tiny``, so the extra pass runs only on chunks that hold one, while the chunk is in
    cache (not a second read of the weight).  An inf or NaN element (``max b ≥ inf``)
    sends the weight to the float path, which leaves them out.  Each piece is worked on
    in chunks of one small buffer: no temporary of the weight's size.
    """

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.lim = limits(self.dtype)
        self.hi = 0
        self.lo = self.lo_normal = (1 << (8 * self.dtype.itemsize)) - 1
        self.buf = np.empty(_CHUNK, dtype=self.lim.uint)

    def add(self, piece: np.ndarray, keep: np.ndarray | None = None) -> bool:
        """Take a C-contiguous piece of the weight into account; returns whether it holds
        a zero (``±0``).  ``keep`` (W's unsigned integer dtype, at least the piece's
        size): the piece's ``b = bits & mask`` are written there whole (``|w|``'s bits,
        for a caller that wants ``|w|`` too) and scanned there instead of by chunks."""
        bits = piece.reshape(-1).view(self.lim.uint)
        if keep is not None:
            kept = keep[: bits.size]
            np.bitwise_and(bits, bits.dtype.type(self.lim.mask), out=kept)
            hi, lo, lo_normal, zero = _scan(kept, self.lim, self.buf, masked=True)
        else:
            hi, lo, lo_normal, zero = _scan(bits, self.lim, self.buf)
        self.hi, self.lo = max(self.hi, hi), min(self.lo, lo)
        self.lo_normal = min(self.lo_normal, lo_normal)
        return zero

    def add_reduced(self, b: np.ndarray, top: int, least: int) -> None:
        """Take a chunk into account from its masked bits − 1 (``b``, overwritten), their
        largest ``top`` and ``least = min b``, for a caller that formed them already (the
        range survey's risk filter, :mod:`graphteleport.ranges`): what :meth:`add` finds,
        without its own passes."""
        self.hi, self.lo = max(self.hi, top), min(self.lo, least)
        self.lo_normal = min(self.lo_normal, _least_normal(b, least, 1, self.lim, b))

    def merge(self, other: MagnitudeScan) -> None:
        """Take the pieces ``other`` (of the same weight) saw into account."""
        self.hi, self.lo = max(self.hi, other.hi), min(self.lo, other.lo)
        self.lo_normal = min(self.lo_normal, other.lo_normal)

    def result(self, w: np.ndarray) -> Magnitudes:
        """The magnitudes of ``w``, every piece of which was added."""
        lim, dtype = self.lim, self.dtype
        if self.hi >= lim.inf_bits:
            return _float_magnitudes(w, lim)
        if self.hi == 0:  # all zero (or empty)
            return Magnitudes(0.0, np.inf, np.inf, dtype)
        hi, nonzero = lim.value(self.hi, dtype), self.lo + 1
        if nonzero >= lim.tiny_bits:  # no subnormal element (the usual case)
            return Magnitudes(hi, lim.value(nonzero, dtype), np.inf, dtype)
        normal = (
            lim.value(self.lo_normal + lim.tiny_bits, dtype)
            if self.lo_normal < lim.inf_bits - lim.tiny_bits
            else np.inf
        )
        return Magnitudes(hi, normal, lim.value(nonzero, dtype), dtype)


def _scan(
    bits: np.ndarray, lim: Limits, buf: np.ndarray, masked: bool = False
) -> tuple[int, int, int, bool]:
    """``max b``, ``min (b − 1) mod 2^k`` and ``min (b − tiny) mod 2^k`` over
    ``b = bits & mask`` (``masked``: ``bits`` are ``b`` already, left as they are), a
    chunk at a time in ``buf`` (:class:`MagnitudeScan`), and whether some ``b`` is 0.  A
    chunk without zeros (``min b > 0``, the usual case) has ``min (b − 1) = min b − 1``:
    no subtraction pass."""
    n = bits.size
    kind = bits.dtype.type
    top = (1 << (8 * bits.dtype.itemsize)) - 1
    hi, lo, lo_normal, zero = 0, top, top, False
    for start in range(0, n, buf.size):
        b = buf[: min(buf.size, n - start)]
        src = bits[start : start + buf.size]
        if not masked:
            np.bitwise_and(src, kind(lim.mask), out=b)
            src = b
        hi = max(hi, int(src.max()))
        smallest = int(src.min())
        if smallest > 0:
            least, shift = smallest - 1, 0  # (b as it is)
        else:
            zero = True
            np.subtract(src, kind(1), out=b)
            src, least, shift = b, int(b.min()), 1  # (b − 1)
        lo = min(lo, least)
        lo_normal = min(lo_normal, _least_normal(src, least, shift, lim, b))
    return hi, lo, lo_normal, zero


def _least_normal(src: np.ndarray, least: int, shift: int, lim: Limits, out: np.ndarray) -> int:
    """``min (b − tiny) mod 2^k`` over a chunk whose masked bits ``b`` are given as ``src
    = b − shift`` (``shift`` 0 or 1), with ``least = min (b − 1) mod 2^k``: where no
    element is a zero or subnormal that is ``least + 1 − tiny`` (no pass), else one
    subtraction into ``out`` (zeros and subnormals wrap to the top)."""
    top = np.iinfo(src.dtype).max
    if least + 1 >= lim.tiny_bits:  # no subnormal: the smallest normal is the least
        return least + 1 - lim.tiny_bits if least < top else top
    np.subtract(src, src.dtype.type(lim.tiny_bits - shift), out=out)  # (b − tiny)
    return int(out.min())


def _float_magnitudes(w: np.ndarray, lim: Limits) -> Magnitudes:
    hi, lo_n, lo_s = cell_magnitudes(w, tuple(range(w.ndim)), lim)
    return Magnitudes(float(hi.max()), float(lo_n.min()), float(lo_s.min()), w.dtype)


def cell_magnitudes(
    w: np.ndarray, axes: tuple[int, ...], lim: Limits
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:class:`Magnitudes` of every cell, reducing ``w`` over ``axes`` (kept, size 1):
    largest finite, smallest normal and smallest subnormal ``|w|`` (float64 arrays).

    A large ``w`` is measured a block of rows (axis 0) at a time, the blocks' cells
    combined (max, min, min) where axis 0 is reduced and stacked where it is not, so
    the float64 temporaries are a block's, not W's."""
    rows = max(1, _CELL_BLOCK // max(1, math.prod(w.shape[1:]))) if w.ndim else 0
    if w.ndim == 0 or rows >= w.shape[0]:
        return _cells(w, axes, lim)
    parts = [_cells(w[i : i + rows], axes, lim) for i in range(0, w.shape[0], rows)]
    if 0 in axes:
        hi = np.maximum.reduce([p[0] for p in parts])
        lo_n = np.minimum.reduce([p[1] for p in parts])
        lo_s = np.minimum.reduce([p[2] for p in parts])
        return hi, lo_n, lo_s
    hi, lo_n, lo_s = (np.concatenate([p[k] for p in parts]) for k in range(3))
    return hi, lo_n, lo_s


_CELL_BLOCK = 1 << 22  # elements of W measured at a time by cell_magnitudes


def _cells(
    w: np.ndarray, axes: tuple[int, ...], lim: Limits
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`cell_magnitudes` of one block, in one go."""
    x = np.abs(w.astype(np.float64))
    finite = np.isfinite(x)
    hi = np.where(finite, x, 0.0).max(axis=axes, keepdims=True, initial=0.0)
    normal = finite & (x >= lim.tiny)
    lo_n = np.where(normal, x, np.inf).min(axis=axes, keepdims=True, initial=np.inf)
    sub = (x > 0) & (x < lim.tiny)
    lo_s = np.where(sub, x, np.inf).min(axis=axes, keepdims=True, initial=np.inf)
    return hi, lo_n, lo_s


def violations(
    hi: np.ndarray | float,
    lo_n: np.ndarray | float,
    lo_s: np.ndarray | float,
    a: np.ndarray | float,
    lim: Limits | tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Where cells of magnitudes ``hi, lo_n, lo_s`` times ``a = |s|`` leave the range
    (``lim``, or arrays ``(max, tiny, sub)`` per cell): ``(over, under)``, broadcast.
    ``over``: some element would become inf (or ``s`` is not finite); ``under``: some
    element would become subnormal or 0 (or ``s`` is 0)."""
    top, tiny, sub = (lim.max, lim.tiny, lim.sub) if isinstance(lim, Limits) else lim
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        over = ~np.isfinite(a) | ((a > 1) & (hi * a > top * (1 - MARGIN)))
        low = (lo_n * a < tiny * (1 + MARGIN)) | (lo_s * a < sub * (1 + MARGIN))
        under = (a == 0) | ((a < 1) & low)
    return over, under


def out_of_range(mags: list[Magnitudes], smin: np.ndarray, smax: np.ndarray) -> np.ndarray:
    """Per weight: whether some ``|s|`` in ``[smin, smax]`` takes an element of a weight
    of magnitudes ``mags`` out of its dtype's range (:func:`violations` is monotone in
    ``|s|``: overflow is worst at ``smax``, underflow at ``smin``).  Vectorised."""
    if not mags:
        return np.zeros(0, dtype=bool)
    hi, lo_n, lo_s = (np.array([getattr(m, f) for m in mags]) for f in _FIELDS)
    lims = [limits(m.dtype) for m in mags]
    bounds = tuple(np.array([getattr(lim, f) for lim in lims]) for f in ("max", "tiny", "sub"))
    over, _ = violations(hi, lo_n, lo_s, smax, bounds)  # type: ignore[arg-type]
    _, under = violations(hi, lo_n, lo_s, smin, bounds)  # type: ignore[arg-type]
    return np.asarray(over | under, dtype=bool)


_FIELDS = ("hi", "lo_normal", "lo_sub")


def fits_float32(smin: float, smax: float) -> bool:
    """``S`` rounds to a normal float32 (float32 weights may then multiply in float32)."""
    lim = limits(np.dtype(np.float32))
    return bool(lim.tiny <= smin and smax <= lim.max)

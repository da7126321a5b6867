"""Rewrite the stored weights for chosen cofactors (absorb mode).

For every stored tensor the analysis said can absorb a scaling
(:attr:`~graphteleport.analysis.AnalysisResult.weights`), ``W' = W · S`` with
``S = Π τ[ids]^e`` over the factors its rule gave (``W'[o, i] = W[o, i] · τ_out[o] / τ_in[i]``
for a linear layer, ``b' = b · τ_out`` for a bias, …), as :mod:`graphteleport.algebra`
computes it.  A weight used by several nodes gets one ``S`` (the analysis tied its
uses), except a uniform weight shared only by an exporter's accident, which gets a
private copy for each use whose ``S`` differs.  Each weight is read and written once;
this module owns how ``W · S`` is rounded into W's dtype.

Inside :func:`streamed` the rewrite is streamed: each new initializer goes to a
:class:`WeightSink` (the staged output data file) as soon as it is computed, the
model keeps the tensor the sink returns, and each external source tensor's
memory map is closed once read — memory holds one weight at a time, not the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import onnx_ir as ir

from graphteleport import halfcast
from graphteleport.algebra import RowScale, row_scale, scale_bounds, scales_of, with_rank
from graphteleport.analysis import FLOAT_TYPES, Absorb, AnalysisResult, ConstRef, Weight
from graphteleport.halfcast import HALVES
from graphteleport.numerics import (
    Magnitudes,
    MagnitudeScan,
    fits_float32,
    limits,
    magnitudes,
    out_of_range,
)
from graphteleport.parallel import map_parts, row_parts, workers


@dataclass
class RewriteStats:
    """What the rewrite changed."""

    changed: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    weights_total: int = 0
    elements_changed: int = 0
    elements_total: int = 0

    @property
    def weights_changed(self) -> int:
        return len(self.changed)


class WeightSink(Protocol):
    """Where a streamed rewrite puts new weights (:class:`graphteleport.io.DataFile`)."""

    def put(self, name: str, array: np.ndarray) -> ir.ExternalTensor:
        """Store ``array`` and return a tensor that reads it back."""
        ...

    def rewind(self) -> None:
        """Forget everything stored (the rewrite starts over)."""
        ...

    def scratch(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """An array to compute the next stored weight in, valid until the ``put`` after
        the one that stores it (:meth:`graphteleport.io.DataFile.scratch`)."""
        ...


@runtime_checkable
class OrderedSink(WeightSink, Protocol):
    """A sink that chooses the order the weights are computed in and is told as each is
    done (:class:`graphteleport.fused.FusedSink`: each block of the graph verified as
    soon as its weights are written)."""

    def order(self, analysis: AnalysisResult, tau: np.ndarray) -> Sequence[int]:
        """The indices of ``analysis.weights`` in the order to compute them (called by
        every :func:`prepare`, after :meth:`rewind`, with its cofactors ``tau``)."""
        ...

    def done(
        self, index: int, ref: ConstRef, new: np.ndarray | ir.TensorProtocol | None, copies: bool
    ) -> None:
        """Weight ``index`` (stored at ``ref``) is computed: ``new`` the tensor :meth:`put`
        returned (None: unchanged; an array: a Constant node's, kept in memory);
        ``copies``: some use of it gets a private copy."""
        ...


_SINK: contextvars.ContextVar[WeightSink | None] = contextvars.ContextVar(
    "graphteleport_weight_sink", default=None
)


class BlockWatch(Protocol):
    """Sees the blocks of one weight's product on the grid path (:func:`_grid_rows_into`)
    while they are in cache: a pass that wants figures of every ``W`` and its ``S`` (the
    equalize report) gathers them there instead of reading each weight again."""

    def begin(self, parts: int, overwrite: bool = False, positive: bool = False) -> None:
        """The product is cut into ``parts`` row ranges, each on one thread; with
        ``overwrite`` it is written over W's array (:func:`prepare`'s ``consume``); with
        ``positive`` every ``S`` shown is positive (no factor's ``τ`` is negative)."""
        ...

    def see(
        self,
        part: int,
        start: int,
        w: np.ndarray,
        grid: np.ndarray,
        zero: bool | None = None,
        mags: np.ndarray | None = None,
    ) -> int:
        """Rows ``start:start + len(w)`` of W (``w``, W's trailing shape) and their ``S``
        on the grid as multiplied (``grid``: one value per cell, W's dtype), in row range
        ``part`` (``zero``: whether they hold a ``±0``, and ``mags``: their ``|w|``, where
        the rewrite's scan knows: its buffer, valid during the call only); returns the
        non-zero elements whose ``S`` is not 1 (the rewrite's count of the elements it
        changed, :func:`_grid_changed`)."""
        ...


#: Given a plain weight, its array and its ``S``'s layout: a :class:`BlockWatch` of its
#: product, or None (:func:`observed`).
Observer = Callable[[Weight, np.ndarray, tuple[int, ...]], BlockWatch | None]

_OBSERVER: contextvars.ContextVar[Observer | None] = contextvars.ContextVar(
    "graphteleport_block_observer", default=None
)


@contextlib.contextmanager
def observed(observer: Observer) -> Iterator[None]:
    """Within the block (in memory, not :func:`streamed`), :func:`prepare` asks
    ``observer`` for a :class:`BlockWatch` of each plain weight's product and shows it
    each block of the grid path; a weight whose product takes another path is not shown
    (its watch sees fewer rows than W has)."""
    token = _OBSERVER.set(observer)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


@contextlib.contextmanager
def streamed(sink: WeightSink) -> Iterator[None]:
    """Within the block, :func:`prepare` hands every new initializer to ``sink`` as it is
    computed (Constant-node tensors stay in memory: they are small) and releases each
    external source tensor's memory map after reading it.  A :func:`prepare` that runs
    again (values refitted to the weights' ranges) rewinds the sink first."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def write(ref: ConstRef, array: np.ndarray | ir.TensorProtocol) -> None:
    """Store ``array`` (or a tensor: a streamed weight) where ``ref`` lives, keeping its
    name and dtype."""
    if isinstance(array, np.ndarray | np.generic):  # a 0-d product may come back a scalar
        tensor: ir.TensorProtocol = ir.Tensor(np.asarray(array), name=ref.name)
    else:
        tensor = array
    shape = ir.Shape(list(tensor.shape.numpy()))
    node = ref.value
    if isinstance(node, ir.Node):
        node.attributes["value"] = ir.AttrTensor("value", tensor)
        if node.outputs[0].type is not None:
            node.outputs[0].shape = shape
    else:
        node.const_value = tensor
        node.shape = shape


def _apply(w: np.ndarray, s: np.ndarray, float32_scale: bool = True) -> np.ndarray:
    """``W · S``, rounded once into W's dtype.

    float64 weights multiply by S itself; float32 weights by S rounded to float32 (exact
    for powers of two) where ``float32_scale`` (S is a normal float32).  float16 and
    bfloat16 weights, where ``float32_scale``, through float32 (:func:`_half_product`):
    W widened (exactly), times S rounded to float32, the product rounded to float32 and
    then to W's dtype — a float16 weight never sees S rounded to float16 (a cofactor of
    1e-6 would be 0 there).  Otherwise (an S outside float32's range) the product is taken
    in float64 and rounded once into W's dtype.  A constant is broadcast-expanded only along
    the axes where ``S`` really varies (a scalar becoming per-channel); along the
    others — a sequence axis whose neurons the analysis tied — W keeps its size, so the
    model still accepts any length there.
    """
    s = _shrink(s, w.shape)
    flat = s.reshape(-1)
    uniform = flat.size > 0 and bool(np.all(flat == flat[0]))
    native = w.dtype == np.float64 or (w.dtype == np.float32 and float32_scale)
    out: np.ndarray
    if native and uniform:
        out = w * w.dtype.type(flat[0])
        return out
    target = np.broadcast_shapes(w.shape, s.shape)
    if native:
        out = np.broadcast_to(w, target) * s.astype(w.dtype)
        return out
    if float32_scale and w.dtype in HALVES:
        return _half_product(np.broadcast_to(w, target), np.broadcast_to(s, target))
    if float32_scale:
        s = s.astype(np.float32).astype(np.float64)
    out = np.multiply(np.broadcast_to(w, target), s, dtype=np.float64).astype(w.dtype)
    return out


def _half_product(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``W · S`` of a float16 or bfloat16 W (``S`` of W's shape, a normal float32 where
    rounded) through float32: ``round_W(round_32(w · round_32(s)))``.

    The float32 product of an 11-bit (8-bit) w and a 24-bit s is rounded twice, first to
    24 bits; it differs from the exactly rounded product ``round_W(w · round_32(s))`` only
    where the first rounding lands on a tie of W's dtype — then by 1 ulp of W's dtype, at
    most, and rarely (about one element in 2^13 for random data).  Powers of two (the
    ``--exact`` cofactors) stay exact: the product has at most 11 (8) significant bits,
    which float32 holds exactly, or, in float32's subnormal range, too few to reach a tie
    of W's dtype by rounding at float32's last place.  Overflow gives ±inf and underflow ±0
    as the exact rounding does.  The conversions are :func:`graphteleport.halfcast.chosen`'s,
    as in the streamed blocks, so both paths give the same bits (a NaN's too)."""
    casts = halfcast.chosen()
    w32 = np.empty(w.shape, dtype=np.float32)
    casts.copy(np.ascontiguousarray(w).reshape(-1), w32.reshape(-1))
    out = np.empty(w.shape, dtype=w.dtype)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        np.multiply(w32, s.astype(np.float32), out=w32)
        casts.copy(w32.reshape(-1), out.reshape(-1))  # overflow to ±inf: as documented
    return out


def _product(
    w: np.ndarray, s: np.ndarray, float32_scale: bool, smin: float = 0.0
) -> tuple[np.ndarray, int, Magnitudes]:
    """:func:`_apply`, the number of elements it changed, and W's :class:`Magnitudes`, in
    one read of W (:func:`_product_rows`).  (A broadcast-expanded or non-contiguous W
    takes :func:`_apply` and separate passes.)"""
    s = _shrink(s, w.shape)
    if w.ndim == 0 or not w.flags.c_contiguous or np.broadcast_shapes(w.shape, s.shape) != w.shape:
        scan = MagnitudeScan(w.dtype)
        new = _apply(w, s, float32_scale)
        scan.add(np.ascontiguousarray(w))
        changed = int(np.count_nonzero(new != w)) if new.shape == w.shape else new.size
        return new, changed, scan.result(w)
    sr = with_rank(s, w.ndim)
    lead = sr.shape[0] > 1
    return _product_rows(w, lambda i, j: sr[i:j] if lead else sr, float32_scale, sr.shape, smin)


def _product_rows(
    w: np.ndarray,
    rows_of: Callable[[int, int], np.ndarray],
    float32_scale: bool,
    layout: tuple[int, ...] | None = None,
    smin: float = 0.0,
    fill: Fill | None = None,
    out: np.ndarray | None = None,
    known: Magnitudes | None = None,
    watch: BlockWatch | None = None,
    original: Callable[[], np.ndarray] | None = None,
    positive: bool = False,
) -> tuple[np.ndarray, int, Magnitudes]:
    """``W · S`` as :func:`_apply` rounds it, the number of elements changed and W's
    :class:`Magnitudes`, for a C-contiguous W (ndim ≥ 1) whose ``S`` rows ``i:j`` are
    ``rows_of(i, j)`` (broadcastable to W's rows; ``layout``: S's shape, each axis W's
    size or 1 — None: W's own; ``fill(i, j, out)``, where given, writes those rows into a
    buffer of the grid's shape instead — float64, or float32 (rounding each value once)
    for a float32, float16 or bfloat16 W with ``float32_scale`` —
    :meth:`~graphteleport.algebra.RowScale.rows_into`), into ``out`` where given (W's
    shape and dtype, C-contiguous: a streamed rewrite's reused buffer, :meth:`WeightSink.
    scratch`), else into a new array.  A large W is cut into row ranges
    worked on by :func:`~graphteleport.parallel.workers` threads at once (numpy releases
    the GIL), each a block of rows at a time (:func:`_rows_into`): no W-sized ``S`` or
    float64 temporary.

    The count: where W's dtype multiplies S natively (:func:`_grid_rows_into`), an
    element changes iff it is non-zero and its ``S`` (as multiplied) is not 1 — exact for
    a finite W without subnormal elements whose smallest non-zero ``|w|`` times ``smin``
    (a lower bound of ``|S|``, :func:`~graphteleport.algebra.scale_bounds`) stays above
    twice the smallest normal: then ``W·s`` is normal, or overflows, and a product of a normal
    ``w`` and ``s ≠ 1`` rounded to W's precision is never ``w`` again.  Otherwise the
    bits of W and W' are compared (:func:`_changed_bits`).

    ``known``: W's magnitudes as measured already (:func:`~graphteleport.ranges.survey`),
    given only for a W found finite — then W is not scanned again, and its float16
    conversions skip their NaN check (:meth:`~graphteleport.halfcast.Casts.copy_finite`:
    a finite W times a finite ``S`` holds no NaN).  ``watch``: shown each block of the
    grid path (:class:`BlockWatch`; its count replaces :func:`_grid_changed`'s; ``positive``:
    every ``S`` is, :meth:`BlockWatch.begin`).
    ``out`` may be W itself on the native grid path (each block is read before it is
    written); ``original`` then reads W as it was, for the rare counts that compare W
    and W' (a non-finite W, or a count :func:`_count_exact` does not vouch for)."""
    out = np.empty(w.shape, dtype=w.dtype) if out is None else out
    split = _grid_axes(w.shape, layout or w.shape)
    if fill is None:
        fill = _filler(rows_of, split)
    half = float32_scale and w.dtype in HALVES  # (the backend chosen here, not on a worker)
    casts = halfcast.chosen() if half else None
    ranges = row_parts(w.shape[0], w.size)
    if watch is not None:
        watch.begin(len(ranges), overwrite=out is w, positive=positive)
    parts = [
        (w, out, rows_of, fill, float32_scale, split, i, j, casts, known is None, watch, k)
        for k, (i, j) in enumerate(ranges)
    ]
    done = map_parts(_rows_into, parts)
    scan = MagnitudeScan(w.dtype)
    for _, part in done:
        scan.merge(part)
    changed = sum(c for c, _ in done)

    def before() -> np.ndarray:  # W as it was (read again where ``out`` is W itself)
        return original() if out is w and original is not None else w

    finite = scan.hi < scan.lim.inf_bits  # (a finite W's magnitudes are the scan's alone)
    mags = scan.result(w if finite else before()) if known is None else known
    if known is None and not finite:  # inf or NaN in W: count as ``!=`` does
        changed = int(np.count_nonzero(out != before()))
    elif _native(w.dtype, float32_scale) and not _count_exact(scan, mags, smin):
        changed = _changed_bits(before(), out)
    return out, changed, mags


def _grid_axes(shape: tuple[int, ...], layout: tuple[int, ...]) -> int:
    """The number of leading axes of W its ``S`` may vary along: the trailing axes where
    ``layout`` is 1 (a conv's kernel window) are multiplied by one value per element of
    the leading ones (the small ``[O, C]`` grid)."""
    t = len(shape)
    while t > 1 and layout[t - 1] == 1:
        t -= 1
    return t


def _native(dtype: np.dtype, float32_scale: bool) -> bool:
    """Whether W's dtype multiplies ``S`` natively: float64, or float32 with ``S``
    rounded to float32."""
    return dtype == np.float64 or (dtype == np.float32 and float32_scale)


def _count_exact(scan: MagnitudeScan, mags: Magnitudes, smin: float) -> bool:
    """Whether :func:`_grid_rows_into`'s count of a finite W is exact
    (:func:`_product_rows`)."""
    if mags.hi == 0.0:
        return True
    # (a margin of 2: S as multiplied, rounded to W's dtype, may lie a little below smin)
    return mags.lo_sub == np.inf and mags.lo_normal * smin > 2.0 * scan.lim.tiny


def _rows_into(
    w: np.ndarray,
    out: np.ndarray,
    rows_of: Callable[[int, int], np.ndarray],
    fill: Fill,
    float32_scale: bool,
    split: int,
    start: int,
    stop: int,
    casts: halfcast.Casts | None,
    scan: bool = True,
    watch: BlockWatch | None = None,
    part: int = 0,
) -> tuple[int, MagnitudeScan]:
    """Rows ``start:stop`` of :func:`_product_rows` into ``out``: on the grid
    (:func:`_grid_rows_into`: natively, or a float16/bfloat16 W through float32 by
    ``casts``) or through float64 (:func:`_wide_rows_into`).  ``scan`` False: W's
    magnitudes are known and W finite (the grid path neither scans nor checks for NaN).
    ``watch`` (row range ``part``) sees the native grid path's blocks only."""
    if _native(w.dtype, float32_scale):
        return _grid_rows_into(w, out, fill, split, start, stop, None, scan, watch, part)
    if casts is not None:
        return _grid_rows_into(w, out, fill, split, start, stop, casts, scan)
    return _wide_rows_into(w, out, rows_of, float32_scale, start, stop)


Fill = Callable[[int, int, np.ndarray], None]


def _filler(rows_of: Callable[[int, int], np.ndarray], split: int) -> Fill:
    """A :data:`Fill` copying ``rows_of``'s rows (trailing axes from ``split`` on: 1)."""

    def fill(start: int, stop: int, out: np.ndarray) -> None:
        s = rows_of(start, stop)  # (W's rank; its axes from ``split`` on are 1)
        np.copyto(out, s.reshape(s.shape[:split]), casting="same_kind")

    return fill


def _grid_rows_into(
    w: np.ndarray,
    out: np.ndarray,
    fill: Fill,
    split: int,
    start: int,
    stop: int,
    casts: halfcast.Casts | None = None,
    scan_rows: bool = True,
    watch: BlockWatch | None = None,
    part: int = 0,
) -> tuple[int, MagnitudeScan]:
    """Rows ``start:stop`` of ``W · S`` into ``out``, a block of about :data:`GRID_BLOCK`
    elements (:data:`WATCHED_BLOCK` where watched, ``_HALF_BLOCK`` for a half-precision W)
    at a time in buffers reused across blocks, ``S`` rounded once on the block's grid (W's
    first ``split`` axes) and applied by one ``multiply`` per block, broadcast over the
    trailing axes; the elements changed and the rows' magnitudes.

    A float32 or float64 W (``casts`` None) is multiplied natively by ``S`` rounded to
    its dtype, and the elements changed are counted from the grid (non-zero elements
    where ``S ≠ 1``: exact under :func:`_count_exact`).  A float16 or bfloat16 W as
    :func:`_half_product` rounds it: ``S`` rounded to float32, W widened into a float32
    buffer by ``casts`` (:mod:`graphteleport.halfcast`: torch's vectorised conversions
    where importable), the product converted back into ``out``; the elements whose bits
    changed are counted (:func:`_half_changed`: ``S`` is not rounded to W's dtype, so an
    ``s ≠ 1`` may leave ``w`` as it was).  ``scan_rows`` False (W's magnitudes known, W
    finite): the rows are not scanned (the scan returned saw nothing) and the
    conversions skip their NaN check.  ``watch`` (native W only) is shown each block and
    its grid, and counts the elements changed (:class:`BlockWatch`); where the rows are
    scanned, the scan keeps the block's masked bits whole (``|W|``, bit for bit) and the
    watch is shown them too, so it does not form ``|W|`` again."""
    scan = MagnitudeScan(w.dtype)
    block = GRID_BLOCK if casts is None else _HALF_BLOCK
    inner, row, rows, cells = _blocks(w.shape, split, block if watch is None else WATCHED_BLOCK)
    grid = np.empty(rows * cells, dtype=w.dtype if casts is None else np.float32)
    w32 = np.empty(0 if casts is None else rows * row, dtype=np.float32)
    differ = np.empty(w32.size, dtype=bool)
    kept = min(rows, stop - start) * row if watch is not None and scan_rows else 0
    keep = np.empty(kept, dtype=scan.lim.uint)  # (the watched blocks' |W|: see the scan)
    changed = 0
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for i in range(start, stop, rows):
            n = min(i + rows, stop) - i
            wc, oc = w[i : i + n].reshape(-1, inner), out[i : i + n].reshape(-1, inner)
            g = grid[: n * cells]
            fill(i, i + n, g.reshape((n, *w.shape[1:split])))  # (float32: S rounded once)
            if casts is None:  # (W read before the product: ``out`` may be W itself)
                if watch is None:
                    zero = scan.add(wc) if scan_rows else None
                    changed += _grid_changed(wc, g, zero)
                else:  # (|W| from the scan's masked bits where it scans)
                    zero = scan.add(wc, keep) if scan_rows else None
                    wb = w[i : i + n]
                    mags = keep[: wb.size].view(w.dtype).reshape(wb.shape) if scan_rows else None
                    changed += watch.see(part, i, wb, g, zero, mags)
                _times_grid(wc, g, oc)
            else:
                b = w32[: n * row].reshape(-1, inner)
                copy = casts.copy if scan_rows else casts.copy_finite
                copy(wc.reshape(-1), b.reshape(-1))
                _times_grid(b, g, b)
                copy(b.reshape(-1), oc.reshape(-1))
                changed += _half_changed(wc, oc, g, differ)
                if scan_rows:
                    scan.add(wc)
    return changed, scan


def _times_grid(wc: np.ndarray, g: np.ndarray, oc: np.ndarray) -> None:
    """``oc = wc · g`` for a block of rows of ``inner`` elements sharing each grid value:
    where ``inner > 1`` with ``g`` repeated ``inner`` times into an operand of ``wc``'s
    shape (numpy runs the contiguous product as one flat loop), where numpy's broadcast
    over a short last axis runs its inner loop per row (2^17 float32 elements, 3×3
    windows: 59.5 µs broadcast against 44.8 repeated; 2 to 49 elements a row all faster);
    the same products."""
    if wc.shape[1] == 1:
        np.multiply(wc, g[:, None], out=oc)
    else:
        np.multiply(wc, g.repeat(wc.shape[1]).reshape(wc.shape), out=oc)


def _blocks(shape: tuple[int, ...], split: int, block: int) -> tuple[int, int, int, int]:
    """A block's geometry for W of ``shape`` whose ``S`` varies along its first ``split``
    axes: the elements per grid cell, per row, the rows per block (about ``block``
    elements) and the grid cells per row."""
    inner = max(1, math.prod(shape[split:]))
    row = max(1, math.prod(shape[1:]))
    return inner, row, max(1, block // row), row // inner


def _half_changed(wc: np.ndarray, oc: np.ndarray, g: np.ndarray, buf: np.ndarray) -> int:
    """:func:`_bits_changed` of a block whose ``S`` is the grid ``g``: where every ``s``
    is positive a zero keeps its sign (``±0 · s = ±0``), so no zero changes only its
    sign and the count is that of the words that differ — one compare into ``buf`` (a
    reused bool buffer) and a count."""
    if not (g.size and g.min() > 0):
        return _bits_changed(wc, oc)
    uint = limits(wc.dtype).uint
    differ = buf[: wc.size].reshape(wc.shape)
    np.not_equal(wc.view(uint), oc.view(uint), out=differ)
    return int(np.count_nonzero(differ))


def _grid_changed(wc: np.ndarray, g: np.ndarray, zero: bool | None = None) -> int:
    """The non-zero elements of ``wc`` (one row per grid cell) whose cell's ``g`` is not 1
    (``zero``: whether ``wc`` holds a ``±0``, where known)."""
    moved = g != 1
    k = int(np.count_nonzero(moved))
    if k == 0:
        return 0
    if k == g.size:
        if zero is False:
            return int(wc.size)
        return int(np.count_nonzero(wc != 0))  # (faster than counting floats)
    return int(np.count_nonzero(wc[moved] != 0))


def _changed_bits(w: np.ndarray, out: np.ndarray) -> int:
    """The elements whose bits differ between a finite ``w`` and ``out`` (a zero that only
    changed sign not counted), by row ranges on the workers."""
    parts = [(w, out, i, j) for i, j in row_parts(w.shape[0], w.size)]
    return sum(map_parts(_changed_rows, parts))


def _changed_rows(w: np.ndarray, out: np.ndarray, start: int, stop: int) -> int:
    """:func:`_changed_bits` of rows ``start:stop``, a block at a time."""
    rows = max(1, _BLOCK // max(1, math.prod(w.shape[1:])))
    return sum(
        _bits_changed(w[i : min(i + rows, stop)], out[i : min(i + rows, stop)])
        for i in range(start, stop, rows)
    )


def _bits_changed(wc: np.ndarray, oc: np.ndarray) -> int:
    """The elements whose bits differ between ``wc`` and ``oc``, a zero that only changed
    sign not counted."""
    lim = limits(wc.dtype)
    uint, mask = lim.uint, lim.uint.type(lim.mask)
    wb, ob = wc.view(uint), oc.view(uint)
    differ = wb != ob
    return int(np.count_nonzero(differ)) - int(np.count_nonzero(differ & (((wb | ob) & mask) == 0)))


def _wide_rows_into(
    w: np.ndarray,
    out: np.ndarray,
    rows_of: Callable[[int, int], np.ndarray],
    float32_scale: bool,
    start: int,
    stop: int,
) -> tuple[int, MagnitudeScan]:
    """Rows ``start:stop`` of a ``W · S`` whose S leaves float32's range into ``out``, a
    block of about ``_BLOCK`` elements at a time in buffers reused across blocks: the
    exact products in float64 (of S rounded to float32 where ``float32_scale``), rounded
    once; the elements whose bits changed (counted by
    :func:`_bits_changed`; finite W) and the rows' magnitudes."""
    scan = MagnitudeScan(w.dtype)
    row = max(1, math.prod(w.shape[1:]))
    rows = max(1, _BLOCK // row)
    s64 = np.empty(rows * row, dtype=np.float64)
    s32 = np.empty(rows * row, dtype=np.float32)
    w64 = np.empty(rows * row, dtype=np.float64)
    changed = 0
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for i in range(start, stop, rows):
            wc, oc = w[i : min(i + rows, stop)], out[i : min(i + rows, stop)]
            sc = np.broadcast_to(rows_of(i, i + len(wc)), wc.shape)
            b32, b64 = s32[: wc.size].reshape(wc.shape), s64[: wc.size].reshape(wc.shape)
            if float32_scale:
                np.copyto(b32, sc, casting="same_kind")
                sc = b32
            np.copyto(b64, sc)
            np.copyto(w64[: wc.size].reshape(wc.shape), wc)  # (faster than a mixed multiply)
            np.multiply(w64[: wc.size].reshape(wc.shape), b64, out=b64)
            np.copyto(oc, b64, casting="same_kind")
            scan.add(wc)
            changed += _bits_changed(wc, oc)
    return changed, scan


_BLOCK = 1 << 16
#: Elements per block of a native product on the grid (:func:`_grid_rows_into`, not
#: watched): a block's fixed cost (some ten numpy calls — ``S`` on the grid, the scan, the
#: count, the product — and the GIL handed between the row ranges' threads) is paid ~210
#: times a pass on ResNet-50's calling thread instead of ~340 (canonicalize's rewrite,
#: interleaved in one process, 15-21 rounds: 2^16 → 2^17 wall ratio 0.80 (load 0.3),
#: 2^16 → 2^18 0.80–0.83, 2^17 → 2^18 1.02, 2^18 → 2^19 1.06–1.12, 2^18 → 2^20 1.20).
GRID_BLOCK = 1 << 17
#: Elements per block of a product a :class:`BlockWatch` sees: its own work per block is
#: some twenty numpy calls on the block's cells, so larger blocks pay (ResNet-50 cle,
#: rewrite + figures CPU, medians of 13 interleaved rounds at load ~6: 2^16 136 ms, 2^17
#: 123, 2^18 120, 2^19 127).  Not larger: from 2^19 the figures' matrix-vector sums cross
#: OpenBLAS's threading threshold and its threads spin (cle's rewrite CPU 94 → 173 ms).
WATCHED_BLOCK = 1 << 18
#: Elements per block of a half-precision product: onnxruntime's conversions cost ~8 µs
#: a run (:mod:`graphteleport.halfcast`), so blocks larger than the cache pay — CPU ns an
#: element for widen + multiply + narrow + count + scan + S, one thread, an 11008 × 4096
#: float16 weight: 3.5 at 2^15, 2.4 at 2^16, 1.7 at 2^18, 1.6 at 2^20.
_HALF_BLOCK = 1 << 18


def _shrink(s: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reduce ``S`` to size 1 along axes where W has size 1 and S does not vary."""
    ranked = (1,) * (s.ndim - len(shape)) + tuple(shape)
    for ax in range(s.ndim):
        if ranked[ax] == 1 and s.shape[ax] > 1:
            first = s.take([0], axis=ax)
            if np.array_equal(s, np.broadcast_to(first, s.shape)):
                s = first
    extra = s.ndim - len(shape)
    if extra > 0 and all(d == 1 for d in s.shape[:extra]):
        s = s.reshape(s.shape[extra:])
    return s


@dataclass(slots=True)
class _Pending:
    """One weight's new value, computed and not yet stored (``new`` None: unchanged),
    and the private copies other uses of it get."""

    ref: ConstRef
    new: np.ndarray | ir.ExternalTensor | None
    changed: int = 0
    grown: int = 0  # elements a broadcast expansion added
    copies: list[tuple[Absorb, np.ndarray]] = field(default_factory=list)


@dataclass
class Prepared:
    """Every weight's new value (not yet in the model), each weight's magnitudes (in
    ``analysis.weights`` order), and the weights whose quick range check failed."""

    pending: list[_Pending]
    magnitudes: list[Magnitudes]
    out_of_range: list[int]


def prepare(
    analysis: AnalysisResult,
    tau: np.ndarray,
    arrays: Mapping[str, np.ndarray] | None = None,
    known: Sequence[Magnitudes | None] | None = None,
    consume: bool = False,
) -> Prepared:
    """Compute ``W · S`` for every absorbing weight without storing it, measuring each
    weight's :class:`Magnitudes` in the same read (:func:`_product`), and check them
    against the bounds of its ``|S|`` (:func:`~graphteleport.algebra.scale_bounds`,
    :func:`~graphteleport.numerics.out_of_range`).  ``arrays``: the stored tensors as a
    pass already read them (:func:`graphteleport.orbit.stored_arrays`), by name, used
    instead of reading each again (a proto-backed tensor's read is a copy); ignored
    inside :func:`streamed`, which reads each tensor from its map and releases it.
    ``known``: per weight, its magnitudes as :func:`~graphteleport.ranges.survey`
    measured them where it found the weight finite (else None): such a weight's product
    does not scan it again (:func:`_product_rows`) and they are its magnitudes here.

    ``consume``: ``arrays`` are the caller's own writable copies
    (:func:`~graphteleport.orbit.stored_arrays` with ``writable``), which a plain
    weight's product on the native grid path writes over (no fresh array of W's size: on
    ResNet-50 102 MB of new pages, 20-50 ms of page faults here) — under an
    :func:`observed` block only the weights it watches (the observer reads the others
    again).  The model's tensors are untouched until :func:`commit`: a :func:`prepare`
    after this one reads them from the model, not from ``arrays``."""
    smin, smax = weight_bounds(analysis, tau)
    pending: list[_Pending] = []
    mags: list[Magnitudes] = []
    written: set[int] = set()  # (``consume``: the arrays written over, by id)
    sink = _SINK.get()
    order: Sequence[int] = range(len(analysis.weights))
    if sink is not None:
        sink.rewind()
        arrays = None
        order = _order(sink, analysis, tau)
    slots: list[tuple[_Pending, Magnitudes] | None] = [None] * len(analysis.weights)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for n, j in enumerate(order):
            weight = analysis.weights[j]
            if arrays is None:
                prefetch([analysis.weights[k] for k in order[n + 1 : n + 2]])
            w = arrays[weight.source.name] if arrays is not None else weight.source.array()
            if id(w) in written:  # (an earlier weight of the same name wrote over it)
                w = weight.source.array()
            mine = known[j] if known else None
            p, m = _compute(weight, w, tau, (smin[j], smax[j]), mine, consume and sink is None)
            if consume and w.flags.writeable:
                written.add(id(w))
            del w  # a live view keeps the memory map: _stream could not release it
            if sink is not None:
                _stream(p, sink, j)
            slots[j] = (p, m)
    for slot in slots:
        assert slot is not None
        pending.append(slot[0])
        mags.append(slot[1])
    flagged = out_of_range(mags, smin, smax)
    return Prepared(pending, mags, np.flatnonzero(flagged).tolist())


def _compute(
    weight: Weight,
    w: np.ndarray,
    tau: np.ndarray,
    bounds: tuple[float, float],
    known: Magnitudes | None = None,
    consume: bool = False,
) -> tuple[_Pending, Magnitudes]:
    """One weight's (``w``) new value and magnitudes, ``bounds`` its ``|S|``'s: a plain
    weight's ``S`` formed a block of rows at a time
    (:class:`~graphteleport.algebra.RowScale`), any other's whole
    (:func:`~graphteleport.algebra.scales_of`, :func:`_pend`); ``known``: its magnitudes
    if measured already on a finite W (:func:`_product_rows`); ``consume``: ``w`` may be
    overwritten with the product (:func:`prepare`)."""
    f32 = fits_float32(*bounds)
    lazy = row_scale(w.shape, weight.uses, weight.private, tau)
    if lazy is None or not w.flags.c_contiguous:
        scales = scales_of(w.shape, weight.uses, weight.private, tau)
        return _pend(w, weight.uses, scales, f32, bounds[0])
    sink = _SINK.get()
    streams = sink is not None and not weight.source.is_node and w.ndim > 0
    out = sink.scratch(w.shape, w.dtype) if sink is not None and streams else None
    observer = _OBSERVER.get() if sink is None else None
    watch = observer(weight, w, lazy.shape) if observer is not None else None
    mine = consume and (watch is not None or observer is None) and known is None
    if out is None and mine and w.flags.writeable and _native(w.dtype, f32):
        out = w  # (the caller's own copy: no fresh array of W's size)
    return _pend_rows(w, weight.uses[0], lazy, f32, bounds[0], out, known, watch)


def _pend_rows(
    w: np.ndarray,
    use: Absorb,
    lazy: RowScale,
    f32: bool,
    smin: float,
    out: np.ndarray | None = None,
    known: Magnitudes | None = None,
    watch: BlockWatch | None = None,
) -> tuple[_Pending, Magnitudes]:
    """:func:`_pend` of a weight with one :class:`~graphteleport.algebra.RowScale` (its
    product into ``out`` where given — W itself included, then read again from the
    model where needed —, shown to ``watch``: :func:`_product_rows`)."""
    rows_into, original = lazy.rows_into, use.source.array
    positive = watch is not None and _positive(lazy)
    new, changed, mags = _product_rows(
        w, lazy.rows, f32, lazy.shape, smin, rows_into, out, known, watch, original, positive
    )
    return _Pending(use.source, new if changed else None, changed), mags


def _positive(lazy: RowScale) -> bool:
    """Whether every ``S`` of ``lazy`` is positive: each factor's ``τ`` over its ids is (a
    product of positive powers; ``τ`` is never 0)."""
    return all(bool(np.all(lazy.tau[np.asarray(f.ids)] > 0)) for f in lazy.factors)


def narrow(analysis: AnalysisResult) -> bool:
    """Whether some absorbing weight has a dtype whose smallest normal magnitude is above
    :data:`NARROW_TINY` (float16: 6.1e-5).  Trained and random weights of such a dtype
    routinely hold elements so close to 0 that any ``|s| < 1`` flushes them, so the range
    fit nearly always moves cofactors: :func:`measure` first, then fit, then
    :func:`prepare` once, costs a scan of the bits where fitting after :func:`prepare`
    costs a second product of every weight.  (float32, float64 and bfloat16 share
    float32's or a wider exponent: elements near their smallest normal are rare.)"""
    return any(limits(_dtype(w.source)).tiny > NARROW_TINY for w in analysis.weights)


NARROW_TINY = 2.0**-30


def _dtype(ref: ConstRef) -> np.dtype:
    """The numpy dtype of the tensor ``ref`` stores, without reading it."""
    if isinstance(ref.value, ir.Node):
        tensor: ir.TensorProtocol = ref.value.attributes["value"].as_tensor()
    else:
        assert ref.value.const_value is not None
        tensor = ref.value.const_value
    return np.dtype(tensor.dtype.numpy())


def measure(
    analysis: AnalysisResult, arrays: Mapping[str, np.ndarray] | None = None
) -> list[Magnitudes]:
    """Every absorbing weight's :class:`Magnitudes` (in ``analysis.weights`` order), one
    scan of its bits each, releasing each external tensor's map after it: the same
    figures :func:`prepare` measures while it computes the products, without them.
    ``arrays``: the tensors already read, as :func:`prepare` takes them."""
    mags: list[Magnitudes] = []
    for weight in analysis.weights:
        w = measured_array(weight, arrays)
        mags.append(measure_one(w))
        del w
        release(weight.source)
    return mags


def measured_array(weight: Weight, arrays: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """The stored array of ``weight``: from ``arrays`` (read already) where given and no
    :func:`streamed` block is active, else read (from its map, for an external tensor)."""
    if arrays is not None and _SINK.get() is None:
        return arrays[weight.source.name]
    return weight.source.array()


def measure_one(w: np.ndarray) -> Magnitudes:
    """One weight's :class:`Magnitudes` (:func:`measure`)."""
    return measure_finite(w)[0]


def measure_finite(w: np.ndarray) -> tuple[Magnitudes, bool]:
    """One weight's :class:`Magnitudes` and whether every element is finite."""
    return _magnitudes(np.ascontiguousarray(w))


def _magnitudes(w: np.ndarray) -> tuple[Magnitudes, bool]:
    """:func:`~graphteleport.numerics.magnitudes` of a C-contiguous ``w``, its row
    ranges scanned by the workers at once (:func:`~graphteleport.parallel.map_parts`),
    and whether every element is finite."""
    if w.ndim == 0:
        return magnitudes(w), bool(np.isfinite(w))
    scans = map_parts(_scan_rows, [(w, i, j) for i, j in row_parts(w.shape[0], w.size)])
    for other in scans[1:]:
        scans[0].merge(other)
    return scans[0].result(w), scans[0].hi < scans[0].lim.inf_bits


def _scan_rows(w: np.ndarray, start: int, stop: int) -> MagnitudeScan:
    scan = MagnitudeScan(w.dtype)
    scan.add(w[start:stop])
    return scan


def _stream(p: _Pending, sink: WeightSink, index: int) -> None:
    """Hand ``p``'s new initializer to ``sink`` (keeping the tensor it returns), close
    the source tensor's memory map (kept if a view of it is still alive) and tell a sink
    that follows the weights (:class:`OrderedSink`) that weight ``index`` is done."""
    if isinstance(p.new, np.ndarray) and not p.ref.is_node:
        p.new = sink.put(p.ref.name, p.new)
    release(p.ref)
    if isinstance(sink, OrderedSink):
        sink.done(index, p.ref, p.new, bool(p.copies))


def _order(sink: WeightSink, analysis: AnalysisResult, tau: np.ndarray) -> Sequence[int]:
    """The order a streamed :func:`prepare` computes the weights in: the sink's where it
    chooses one (:class:`OrderedSink`), else ``analysis.weights``' own."""
    if isinstance(sink, OrderedSink):
        return sink.order(analysis, tau)
    return range(len(analysis.weights))


def copy_ahead(model: ir.Model, analysis: AnalysisResult, tau: np.ndarray) -> None:
    """Inside :func:`streamed`, have the sink copy the initializers no weight rewrite
    touches into the output now, on a background thread, where the layout will hold
    them if exactly the absorbing initializers whose ``S`` is not 1 for ``tau`` (the
    drawn cofactors) are rewritten (``copy_ahead`` of :class:`graphteleport.io.DataFile`,
    which checks that at the end): the kernel copies while the range fit runs on one
    core, not after the products.  (Before the survey instead, the copies took CPU from
    its two scanning threads: 32-layer float16 LLaMA, survey 11.7 / 12.4 → 17.5 /
    15.3 s wall; during the fit at load ~4, with no core idle, the fit took 5.0 / 4.9 →
    12.0 / 11.6 s and the whole run 49.5 / 53.1 → 53.5 / 50.6 s: so only where
    :func:`core_free`.)"""
    sink = _SINK.get()
    ahead = getattr(sink, "copy_ahead", None)
    if ahead is None or not core_free():  # (no idle core: the copies would slow the fit)
        return
    first: list[ir.Value] = []
    for weight in analysis.weights:
        value = weight.source.stored
        tensor = value.const_value
        ones = all(np.all(tau[f.ids] == 1.0) for ab in weight.uses for f in ab.factors)
        if not (weight.source.is_node or tensor is None or len(tensor.shape) == 0 or ones):
            first.append(value)
    ahead(model, first)


def core_free() -> bool:
    """Whether a core is likely idle beside this process's one thread: two or more
    :func:`~graphteleport.parallel.workers` and a 1-minute load average below their
    number less 0.5 (other processes' threads, and this process's own recent ones)."""
    cpus = workers()
    return cpus >= 2 and hasattr(os, "getloadavg") and os.getloadavg()[0] < cpus - 0.5


def trim_heap() -> None:
    """Hand the memory freed so far back to the system (glibc's ``malloc_trim``; nothing
    elsewhere).  The survey's cells — many arrays made on the worker threads, freed
    after the fit — otherwise stay in the threads' heaps, fragmented, as resident memory
    through the products (32-layer float16 LLaMA: ~0.4 GB)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def prefetch(weights: Sequence[Weight]) -> None:
    """Ask the kernel to read the external data of ``weights`` into the page cache in the
    background (``posix_fadvise(WILLNEED)``), so that the disk reads the next weight
    while this one is computed, instead of each page being read when first touched (a
    memory-mapped weight is otherwise read a page fault at a time, on the computing
    thread).  Nothing where the platform has no ``posix_fadvise`` or a file cannot be
    opened (the read itself then reports it)."""
    advise = getattr(os, "posix_fadvise", None)
    for weight in weights:
        source = None if weight.source.is_node else weight.source.stored.const_value
        if advise is None or not isinstance(source, ir.ExternalTensor):
            continue
        length = source.length if source.length is not None else source.nbytes
        with contextlib.suppress(OSError):
            fd = os.open(source.path, os.O_RDONLY)
            try:
                advise(fd, source.offset or 0, length, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


def release(ref: ConstRef) -> None:
    """Close the memory map of the external tensor ``ref`` reads, if any (its pages then
    leave this process's resident set; a later read maps it again).  Kept while a view
    of it is alive."""
    source = None if ref.is_node else ref.stored.const_value
    if isinstance(source, ir.ExternalTensor):
        with contextlib.suppress(BufferError):
            source.release()


def weight_bounds(analysis: AnalysisResult, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per weight (in ``analysis.weights`` order): ``smin ≤ |S| ≤ smax`` over all its uses
    (:func:`~graphteleport.algebra.scale_bounds`)."""
    return scale_bounds(analysis.factor_table, [w.uses for w in analysis.weights], tau)


def _pend(
    w: np.ndarray,
    uses: tuple[Absorb, ...],
    scales: list[tuple[list[Absorb], np.ndarray]],
    f32: bool,
    smin: float,
) -> tuple[_Pending, Magnitudes]:
    """The new value of one weight, and its magnitudes (``smin``: a lower bound of its
    ``|S|``): the first scale's product is stored in place; a private weight's other
    uses get copies where their products differ from what the weight's name then holds
    (the first product where it changed, else the original) — a use whose ``S`` is 1
    keeps the original where the first use's product replaced it (on the rapidocr
    classifier in insert mode with powers of two: a shared ``+3`` stored per-channel for
    one hardswish was read by another of a different width)."""
    first, changed, mags = _product(w, scales[0][1], f32, smin)
    news = [first, *(_apply(w, s, f32) for _, s in scales[1:])]
    out = _Pending(uses[0].source, first if changed else None, changed, first.size - w.size)
    stored = first if changed else w
    for (group, _), new in zip(scales[1:], news[1:]):
        if not (new.shape == stored.shape and np.array_equal(new, stored)):
            out.copies.append((group[0], new))
    return out, mags


class _Writer:
    def __init__(self, model: ir.Model, stats: RewriteStats) -> None:
        self.graph = model.graph
        self.stats = stats
        self.names = {v.name for v in self.graph.initializers.values()} | {
            o.name for n in self.graph for o in n.outputs
        }

    def store(self, p: _Pending) -> None:
        if p.new is None:
            return
        write(p.ref, p.new)
        self.stats.elements_total += p.grown  # a broadcast-expanded constant
        self.stats.changed.append(p.ref.name)
        self.stats.elements_changed += p.changed

    def private_copy(self, ab: Absorb, new: np.ndarray) -> None:
        """Give one use of a shared weight its own initializer."""
        base = ab.source.name or "w"
        k = 1
        while f"{base}__gt{k}" in self.names:
            k += 1
        name = f"{base}__gt{k}"
        self.names.add(name)
        value = ir.Value(
            name=name,
            shape=ir.Shape(new.shape),
            type=ir.TensorType(ir.DataType.from_numpy(new.dtype)),
            const_value=ir.Tensor(new, name=name),
        )
        self.graph.register_initializer(value)
        ab.node.replace_input_with(ab.input_index, value)
        self.stats.copies.append(name)
        self.stats.changed.append(name)
        self.stats.elements_changed += new.size
        self.stats.elements_total += new.size
        self.stats.weights_total += 1


def count_weights(model: ir.Model) -> tuple[int, int]:
    """(number, elements) of float weights: initializers and Constant-node tensors."""
    count = elements = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None and v.const_value.dtype in FLOAT_TYPES:
            count += 1
            elements += v.const_value.size
    for node in model.graph:
        attr = node.attributes.get("value") if node.op_type == "Constant" else None
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            t = attr.as_tensor()
            if t.dtype in FLOAT_TYPES:
                count += 1
                elements += t.size
    return count, elements


def commit(model: ir.Model, prepared: Prepared) -> RewriteStats:
    """Store every prepared weight (and private copy) in ``model``."""
    stats = RewriteStats()
    stats.weights_total, stats.elements_total = count_weights(model)
    writer = _Writer(model, stats)
    for p in prepared.pending:
        writer.store(p)
        for ab, new in p.copies:
            writer.private_copy(ab, new)
    return stats


def streaming() -> bool:
    """Whether a :func:`streamed` block is active (its rewrite reads each tensor from its
    map and releases it: a pass should not hold its tensors across it)."""
    return _SINK.get() is not None


def rewrite(model: ir.Model, analysis: AnalysisResult, tau: np.ndarray) -> RewriteStats:
    """Scale every absorbing weight of ``model`` in place by per-neuron cofactors ``tau``
    (no range check: :class:`~graphteleport.passes.teleport.TeleportPass` fits ``tau``
    to the weights' dtypes first, :mod:`graphteleport.ranges`)."""
    return commit(model, prepare(analysis, tau))

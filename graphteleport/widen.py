"""float16 weights widened to float32 once per block, for onnxruntime's CPU provider.

The CPU provider has no float16 kernel for MatMul, Gemm and most arithmetic: its
``InsertCastTransformer`` runs such a node in float32 between inserted Casts,

    y = Cast₁₆(Op(Cast₃₂(x), Cast₃₂(W))),

and a Cast of an initializer stays in the graph at any optimisation level we use, so
every run converts every float16 weight of the model (1.9 ns an element on this machine,
unpacked).  The pieces' verification runs each block several times (draws, both models,
the per-tensor check), so those conversions were most of its time.

:func:`widen_proto` rewrites a model proto so that ``W`` (float16, read only by such
nodes) becomes

    W = Cast₁₆(W₃₂),   W₃₂ = float32(W)  (a graph input, fed from an array made once),

— the same function, since float16 → float32 is exact and Cast₁₆ rounds it back to W.
onnxruntime then inserts its ``Cast₃₂`` after ``Cast₁₆`` as before, and its own
``RemoveDuplicateCastTransformer`` removes the pair ``Cast₃₂ ∘ Cast₁₆`` of a graph input
(types float32 → float16 → float32, the first not lossy in its type groups): the node
reads ``W₃₂`` directly, which is bit for bit what ``Cast₃₂(W)`` gave.  Nothing else
in the graph changes type or neighbours (the new Cast has no input edge, so the
transformer's isolated-node rule sees the same graph), and a graph input is never
prepacked, like the inserted Cast's output: outputs are bit-identical to the plain
session's (tests/test_widen.py).  A weight also read by an op that has a float16 kernel
(an embedding's Gather, a tied head's Transpose) is left as it is: its Cast₁₆ would then
run on every run.

:class:`Widened` holds the float32 arrays of one block (both models), keyed by where
their bytes live, so every session of the block — the draws, the per-tensor check's
recording and cut models — feeds the same arrays; the caller drops them after the block.
Within a byte budget it drops the least recently used first (verification by pieces
keeps one model's block, a peak 0.5 GB lower for the 7B shape; it runs all of the
original's runs of a block — its block run, its half of the per-tensor check — before
the teleported's, so each model's weights are converted once a block: 8 layers of the
7B shape, 170 → 114 conversions; at 32 layers a median −8 % of the verified run's CPU, four runs).
Its copies live in one pool kept across blocks (:class:`Widened`), so they are written
into memory already mapped rather than fresh pages.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from graphteleport import halfcast
from graphteleport.io import read_exactly
from graphteleport.tensorcheck import reads

__all__ = ["MIN_ELEMENTS", "Widened", "casting_ops", "widen_proto"]

logger = logging.getLogger(__name__)

#: Weights with fewer elements stay float16 (their casts cost nothing worth a copy).
MIN_ELEMENTS = 1 << 16
_SUFFIX = "__gt_wide"

Feeds = Mapping[str, np.ndarray]
Run = Callable[[Feeds], list[np.ndarray]]
Opener = Callable[[onnx.ModelProto, str], Run]


@functools.cache
def casting_ops() -> frozenset[str]:
    """Ops of the default domain that onnxruntime's CPU provider runs in float32 between
    inserted Casts when fed float16 (no CPU kernel of theirs accepts float16)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    half: set[str] = set()
    every: set[str] = set()
    for k in C.get_all_opkernel_def():
        if k.provider != "CPUExecutionProvider" or k.domain not in ("", "ai.onnx"):
            continue
        every.add(k.op_name)
        if any("tensor(float16)" in types for types in k.type_constraints.values()):
            half.add(k.op_name)
    return frozenset(every - half)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes reading each name (subgraph reads count as their node's)."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for x in dict.fromkeys(reads(node)):
            found.setdefault(x, []).append(node)
    return found


def _widenable(proto: onnx.ModelProto, min_elements: int) -> list[onnx.TensorProto]:
    """float16 initializers of at least *min_elements*, read only (and directly) by
    nodes of :func:`casting_ops` in the default domain, and not graph inputs."""
    graph = proto.graph
    users = _consumers(graph)
    inputs = {v.name for v in graph.input}
    ops = casting_ops()
    chosen = []
    for t in graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT16 or t.name in inputs:
            continue
        if int(np.prod(t.dims, dtype=np.int64)) < min_elements:
            continue
        nodes = users.get(t.name, [])
        plain = all(n.op_type in ops and n.domain in ("", "ai.onnx") for n in nodes)
        direct = all(t.name in n.input for n in nodes)  # not read from inside a subgraph
        if nodes and plain and direct:
            chosen.append(t)
    return chosen


def widen_proto(
    proto: onnx.ModelProto, min_elements: int = MIN_ELEMENTS
) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """*proto* with each widenable float16 weight ``W`` (module docstring) replaced by
    ``Cast₁₆(W₃₂)`` of a new float32 graph input ``W₃₂`` (named ``W + "__gt_wide"``);
    returns the new proto and the replaced initializers (their data references, to feed
    :class:`Widened`).  Without any, *proto* itself and ``[]``."""
    chosen = _widenable(proto, min_elements)
    if not chosen:
        return proto, []
    names = {t.name for t in chosen}
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = [t for t in out.graph.initializer if t.name not in names]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    casts = [
        onnx.helper.make_node(
            "Cast",
            [t.name + _SUFFIX],
            [t.name],
            to=onnx.TensorProto.FLOAT16,
            name=t.name + _SUFFIX,
        )
        for t in chosen
    ]
    nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend([*casts, *nodes])
    out.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name + _SUFFIX, onnx.TensorProto.FLOAT, list(t.dims))
        for t in chosen
    )
    return out, chosen


class Widened:
    """float32 copies of float16 weights, made once and fed to every session opened
    through :meth:`opener` (module docstring); :meth:`clear` drops them.

    With *budget_bytes*, the copies held stay within it: the least recently used are
    dropped first (a run looks its weights up when it runs, so a dropped copy is freed
    and made again if needed) — one model's weights at a time where a block's two do not
    fit, at the price of converting them again.

    With a budget, the copies live in one pool of *budget_bytes*, made on first use and
    kept across :meth:`clear`: a copy takes the smallest free extent of the pool that
    holds it (the extents of the copies held and of dropped ones still held elsewhere are
    taken), so the conversions write into memory already mapped instead of fresh pages
    the kernel must fault in and zero (0.63–0.69 ns an element against 10.9 for fresh
    ``np.empty`` memory).  The pool decides only *where* a copy is written, never which
    copies are dropped (that stays least-recently-used within the budget): where no
    extent is free the copy gets fresh memory outside it (counted in :attr:`fresh`).
    8 layers of the 7B shape: 42 of 114 conversions into fresh memory → 7 (the pool's
    first touches: the first block, the LM head), the widening's CPU −37 %, peak RSS
    +0.1 GB (the pool stays resident).  Without a budget every copy gets fresh memory."""

    def __init__(self, min_elements: int = MIN_ELEMENTS, budget_bytes: int | None = None):
        self.min_elements = min_elements
        self.budget_bytes = budget_bytes
        self._arrays: dict[tuple[Any, ...], np.ndarray] = {}
        self._pool: np.ndarray | None = None  # flat float32, budget_bytes // 4 elements
        self._pinned: list[weakref.ref[np.ndarray]] = []  # dropped, still held elsewhere
        self._written: list[tuple[int, int]] = []  # extents of the pool written so far
        self._half = np.empty(0, np.float16)  # the file's bytes, a piece at a time
        self.widened = 0  # conversions made (a weight reused is counted once)
        self.fresh = 0  # conversions that wrote into memory never written before

    def clear(self) -> None:
        """Drop the copies (the pool, and the extents of copies held elsewhere, kept)."""
        arrays = list(self._arrays.values())
        self._arrays.clear()
        while arrays:
            self._release(arrays.pop())

    @property
    def nbytes(self) -> int:
        """Bytes of the copies held (the pool's free room not counted)."""
        return sum(a.nbytes for a in self._arrays.values())

    @property
    def pool_bytes(self) -> int:
        """Bytes of the pool (0 before its first use or without a budget)."""
        return 0 if self._pool is None else self._pool.nbytes

    def opener(self, base: Opener) -> Opener:
        """*base* (``open(proto, folder) -> run``) on widened protos, the float32
        weights added to every run's feeds."""

        def open_model(proto: onnx.ModelProto, folder: str) -> Run:
            wide, chosen = widen_proto(proto, self.min_elements)
            run = base(wide, folder)
            return _Fed(run, self, chosen, folder) if chosen else run

        return open_model

    def array(self, tensor: onnx.TensorProto, folder: str) -> np.ndarray:
        """The float32 value of the float16 initializer *tensor* (its external data
        relative to *folder*), converted on first use (or again, once dropped)."""
        key = _where(tensor, folder)
        found = self._arrays.pop(key, None)
        if found is None:
            shape = tuple(int(d) for d in tensor.dims)
            n = int(np.prod(shape, dtype=np.int64))
            self._make_room(4 * n)
            out = self._buffer(n)
            self._half = _widen_into(tensor, folder, out, self._half)
            found = out.reshape(shape)
            self.widened += 1
        self._arrays[key] = found  # the most recently used last
        return found

    def _make_room(self, need: int) -> None:
        """Drop the least recently used copies while *need* more bytes pass the budget."""
        while self._arrays and self.budget_bytes is not None:
            if self.nbytes + need <= self.budget_bytes:
                return
            self._release(self._arrays.pop(next(iter(self._arrays))))

    def _release(self, array: np.ndarray) -> None:
        """Free the extent of a dropped copy — kept taken while anything else holds the
        copy (besides this call's name and ``getrefcount``'s argument)."""
        if self._extent(array) is not None and sys.getrefcount(array) > 2:
            self._pinned.append(weakref.ref(array))

    def _extent(self, array: np.ndarray) -> tuple[int, int] | None:
        """Where *array* lies in the pool (start, elements), or None (its own memory)."""
        if self._pool is None or array.base is not self._pool:
            return None
        return (array.ctypes.data - self._pool.ctypes.data) // 4, array.size

    def _buffer(self, n: int) -> np.ndarray:
        """A flat float32 buffer of *n* elements: the smallest free extent of the pool
        that holds it, else fresh memory."""
        start = self._free_extent(n)
        if start < 0:
            self.fresh += 1
            return np.empty(n, dtype=np.float32)
        assert self._pool is not None
        if not _covers(self._written, start, start + n):
            self.fresh += 1
            self._written = _merged([*self._written, (start, start + n)])
        return self._pool[start : start + n]

    def _free_extent(self, n: int) -> int:
        """The start of the smallest free extent of at least *n* elements (-1: none)."""
        if self.budget_bytes is None or n > self.budget_bytes // 4:
            return -1
        if self._pool is None:
            self._pool = np.empty(self.budget_bytes // 4, dtype=np.float32)
        held = [*self._arrays.values(), *(r() for r in self._pinned)]
        self._pinned = [r for r in self._pinned if r() is not None]
        taken = sorted(e for a in held if a is not None and (e := self._extent(a)) is not None)
        best, room, at = -1, self._pool.size + 1, 0
        for s, k in [*taken, (self._pool.size, 0)]:
            if s - at >= n and s - at < room:
                best, room = at, s - at
            at = max(at, s + k)
        return best


def _merged(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of half-open *extents* ``[a, b)`` as disjoint sorted ones."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(extents):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _covers(extents: list[tuple[int, int]], a: int, b: int) -> bool:
    """Whether the disjoint sorted *extents* cover ``[a, b)``."""
    return any(s <= a and b <= e for s, e in extents)


class _Fed:
    """A run feeding the widened weights of *chosen* (looked up in *cache* at each run:
    a copy the cache dropped is not kept alive); keeps ``output_names``."""

    def __init__(
        self, run: Run, cache: Widened, chosen: list[onnx.TensorProto], folder: str
    ) -> None:
        self._run = run
        self._cache = cache
        self._chosen = chosen
        self._folder = folder
        self.output_names: list[str] = list(getattr(run, "output_names", []))

    def __call__(self, feeds: Feeds) -> list[np.ndarray]:
        weights = {t.name + _SUFFIX: self._cache.array(t, self._folder) for t in self._chosen}
        return self._run({**feeds, **weights})


def _where(tensor: onnx.TensorProto, folder: str) -> tuple[Any, ...]:
    """Where the bytes of *tensor* live: file, offset and length for external data (two
    models' weights of one name differ there), else a digest of its inline bytes."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = tuple(sorted((e.key, e.value) for e in tensor.external_data))
        return (os.path.realpath(folder), tensor.name, info)
    digest = hashlib.blake2b(tensor.SerializeToString(), digest_size=16).digest()
    return ("inline", tensor.name, digest)


#: float16 elements read from the file per piece (8 MiB).
PIECE = 1 << 22


def _widen_into(
    tensor: onnx.TensorProto, folder: str, out: np.ndarray, half: np.ndarray
) -> np.ndarray:
    """Write the float32 of a float16 initializer into the flat *out*: external bytes
    read piece by piece (``os.preadv`` into *half*, a reused float16 buffer, grown to
    :data:`PIECE` where smaller; returned) — no memory map to fault in — and converted
    by :func:`graphteleport.halfcast.chosen` (onnxruntime's vectorised Cast where torch
    is not loaded: 0.45-0.9 CPU-ns an element against numpy's 2.5-3.2; exact either
    way), without its check for NaN payloads (``copy_finite``): the copy stands for
    onnxruntime's own ``Cast₃₂(W)``, the same conversion, whose NaNs are onnxruntime's
    too (a piece of 2^22 elements into the pool, alone: 0.27 → 0.18 ns an element)."""
    cast = halfcast.chosen()
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        cast.copy_finite(numpy_helper.to_array(tensor).reshape(-1), out)
        return half
    if half.size < min(PIECE, out.size):
        half = np.empty(min(PIECE, max(out.size, 1)), np.float16)
    info = {e.key: e.value for e in tensor.external_data}
    offset = int(info.get("offset", 0))
    fd = os.open(os.path.join(folder, info["location"]), os.O_RDONLY)
    short = f"the data file of weight '{tensor.name}' ends before its bytes"
    try:
        for i in range(0, out.size, half.size):
            k = min(half.size, out.size - i)
            read_exactly(fd, half[:k].data.cast("B"), offset + 2 * i, short)
            cast.copy_finite(half[:k], out[i : i + k])
    finally:
        os.close(fd)
    return half

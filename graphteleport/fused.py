"""Verification by pieces fused with the streamed rewrite: each block of the graph
(:func:`graphteleport.pieces.plan_blocks`) is checked as soon as the rewrite has
written its weights, while the original's (just read) and the teleported model's
(just written) are in the page cache, the rewrite going on beside it.

**Order.**  :class:`FusedSink` is the streamed rewrite's sink
(:class:`graphteleport.rewrite.OrderedSink`): it has the weights computed in the order
of the first block that reads them, and once every weight of blocks ``0..k`` is
computed it places block ``k``'s other initializers in the output data file (copied by
the kernel, as :meth:`graphteleport.io.StreamedSave.finish` would later: a tensor whose
cofactors are all 1, a weight the analysis does not rescale), waits for the write in
flight and hands block ``k`` to the verifier thread.  The output data file is thus laid
out in block order; a weight read by several blocks (tied embeddings) is written once,
for the first, and read there by the others.  A bounded queue keeps the rewrite at
most :data:`AHEAD` blocks ahead (their pages still cached when checked).

**The check.**  The verifier thread runs :class:`graphteleport.pieces.BlockRunner` on
the original (its own files) and on a teleported model made of the original's graph
whose initializers are the output's, at their offsets in the staged data file, as each
block arrives: the same blocks, the same per-tensor check on the first input set, the
same findings as :func:`graphteleport.verify.verify_teleport` by pieces run on the
written files afterwards.

**What was verified is what was written.**  The graph is the original's only where the
rewrite changed weights and nothing else (absorb mode, no private copies, no
Constant-node weights rewritten): :meth:`FusedVerification.result` therefore compares
the written model file, once saved, with what the blocks ran — every node (op, inputs,
outputs, attributes), every initializer a block read (type, shape, and its offset and
length in the data file, or its inline bytes), the graph's inputs and declared value
types, the opsets — and the promise (scales)
and tolerance with the pass's final ones.  Any difference, a second
:func:`~graphteleport.rewrite.prepare` (values refitted: the file is rewound), an error
in the thread, or a block not run gives None: the caller verifies the written files as
before.  An interrupt stops the thread after its current block (:meth:`close`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx.external_data_helper import ExternalDataInfo

from graphteleport import pieces
from graphteleport.analysis import AnalysisResult, ConstRef
from graphteleport.io import INLINE_MAX, DataFile
from graphteleport.pieces import BlockRunner, block_weights
from graphteleport.tensorcheck import LoadedModel, TensorScales
from graphteleport.verify import VerificationResult, open_proto, pieces_result, pieces_sets

__all__ = ["AHEAD", "FusedSink", "FusedVerification"]

logger = logging.getLogger(__name__)

#: Blocks the rewrite may run ahead of the verifier (written, not yet checked): ~3 GB of
#: source and output pages for the 7B shape, which the page cache keeps.  Measured
#: (32-layer float16 LLaMA, one run each, load 3.3-4.3 from other jobs): 8 → 105.5 s,
#: 2 → 133.6 s (the two stages' stalls add up), 64 → 190.2 s (the verifier, far behind,
#: read its blocks back from disk); 8-layer, two rounds: 35.4 / 24.1 s against 47.3 /
#: 47.3 with 2.
AHEAD = 8

Feeds = Mapping[str, np.ndarray]
Promise = Callable[[AnalysisResult, np.ndarray], TensorScales]
#: Where a block's initializer lives in the output data file: (location, offset, length).
Placed = tuple[str, int, int]


class FusedVerification:
    """The verifier thread and what it ran (module docstring).

    ``promise(analysis, tau)`` gives the scales the blocks are checked against (None:
    no per-tensor promise, both chains run on their own, as :func:`~graphteleport.
    pieces.verify_blocks` without scales); ``folder``: where the output data file is
    staged; ``budget_bytes``: the blocks' (None: :data:`~graphteleport.pieces.
    DEFAULT_BLOCK_BYTES`, read when made)."""

    def __init__(
        self,
        original: LoadedModel,
        feed_sets: Sequence[Feeds],
        promise: Promise | None,
        folder: str,
        *,
        rtol: float,
        seed: int = 0,
        budget_bytes: int | None = None,
    ) -> None:
        self.original = original
        self.draws = len(feed_sets)
        self.sets = pieces_sets(original.proto.graph, feed_sets)
        self.promise = promise
        self.folder = folder
        self.rtol, self.seed = rtol, seed
        self.budget_bytes = pieces.DEFAULT_BLOCK_BYTES if budget_bytes is None else budget_bytes
        self.inits = dict(original.initializers)  # the teleported model's, filled as placed
        self.runner: BlockRunner | None = None
        self.reads: set[str] = set()  # the initializers the blocks read
        self.scales: TensorScales | None = None
        self.abandoned: str | None = None  # why the fused check does not stand
        self._queue: queue.Queue[tuple[int, dict[str, Placed]] | None] = queue.Queue(AHEAD)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ended = threading.Event()
        self._error: BaseException | None = None
        self._ran = 0
        self._seconds = 0.0

    def start(self, analysis: AnalysisResult, tau: np.ndarray) -> list[list[str]]:
        """Start the thread for cofactors ``tau``; returns each block's initializers."""
        self.scales = self.promise(analysis, tau) if self.promise is not None else None
        tele = dataclasses.replace(
            self.original, folder=self.folder, initializers=self.inits, light=False
        )
        self.runner = BlockRunner(
            self.original, tele, self.sets, self.scales, open_proto,
            rtol=self.rtol, seed=self.seed, budget_bytes=self.budget_bytes,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._work, name="gt-fused", daemon=True)
        self._thread.start()
        graph = self.original.proto.graph
        reads = [block_weights(graph, b) for b in self.runner.blocks]
        self.reads = {n for names in reads for n in names}
        return reads

    def send(self, index: int, placed: dict[str, Placed]) -> None:
        """Hand block ``index`` (its initializers now at ``placed``) to the thread,
        waiting while it is :data:`AHEAD` blocks behind (not once it has ended)."""
        self._offer((index, placed))

    def _offer(self, item: tuple[int, dict[str, Placed]] | None) -> None:
        """Put ``item`` on the queue, waiting while it is full, unless the thread has
        ended (then nothing takes it)."""
        while not self._ended.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def abandon(self, why: str) -> None:
        """Give the fused check up (the caller verifies the written files)."""
        if self.abandoned is None:
            self.abandoned = why
            logger.info("verification after the rewrite: %s", why)
        self._stop.set()

    def close(self) -> None:
        """Stop the thread (after its current block) and wait for it."""
        self._stop.set()
        self._join()

    def _join(self) -> None:
        if self._thread is None:
            return
        while self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=0.1)
            self._thread.join(timeout=0.1)

    def _work(self) -> None:
        assert self.runner is not None
        start = time.perf_counter()
        try:
            while not self._stop.is_set():
                item = self._queue.get()
                if item is None or self._stop.is_set():
                    return
                index, placed = item
                for name, where in placed.items():
                    self.inits[name] = _external(self.original.initializers[name], where)
                self._ran += 1
                if not self.runner.run(self.runner.blocks[index]):
                    return  # (a value the model lacks: a failure, the rest cannot run)
        except BaseException as e:  # (result() reports it: the caller verifies again)
            self._error = e
        finally:
            self._seconds = time.perf_counter() - start
            self._ended.set()

    def result(
        self, model_path: str, scales: TensorScales | None, rtol: float
    ) -> VerificationResult | None:
        """The verification of the written model (its file ``model_path``, the pass's
        final ``scales`` and ``rtol``), or None where the fused check does not stand for
        it (module docstring)."""
        self._queue_end()
        self._join()
        why = self._why_not(model_path, scales, rtol)
        if why is not None:
            self.abandon(why)
            return None
        assert self.runner is not None
        found = self.runner.result()
        result = pieces_result(self.original, found, self.draws, len(self.sets), self.rtol)
        result.method, result.fused, result.seconds = "pieces", True, self._seconds
        return result

    def _queue_end(self) -> None:
        """Tell the thread no block follows (it ends once the queue is empty)."""
        if self._thread is not None:
            self._offer(None)

    def _why_not(self, model_path: str, scales: TensorScales | None, rtol: float) -> str | None:
        if self.abandoned is not None:
            return self.abandoned
        if self._error is not None:
            return f"the blocks did not run ({type(self._error).__name__}: {self._error})"
        if self.runner is None:
            return "the rewrite did not stream its weights"
        if self._ran < len(self.runner.blocks) and not self.runner.state.failures:
            return f"{self._ran} of {len(self.runner.blocks)} blocks ran"
        if rtol != self.rtol or not _same_scales(scales, self.scales):
            return "the promise changed after the weights were written"
        written = onnx.load(model_path, load_external_data=False)
        return _differs(self.original.proto, written, {n: self.inits[n] for n in self.reads})


class FusedSink:
    """The streamed rewrite's sink (:class:`graphteleport.rewrite.OrderedSink`) over the
    output ``data`` file of ``model`` (module docstring: *Order*)."""

    def __init__(self, data: DataFile, model: ir.Model, verification: FusedVerification):
        self.data = data
        self.model = model
        self.verification = verification
        self._reads: list[list[str]] = []
        self._left: list[int] = []  # per block, its weights not computed yet
        self._first: dict[str, int] = {}  # initializer → the first block reading it
        self._next = 0  # the next block to send
        self._put: dict[str, ir.ExternalTensor] = {}  # weights the rewrite wrote
        self._where: dict[str, Placed | None] = {}  # placed initializers (None: inline)
        self._restore: list[tuple[ir.Value, ir.TensorProtocol | None]] = []

    # the WeightSink protocol: the data file's
    def put(self, name: str, array: np.ndarray) -> ir.ExternalTensor:
        return self.data.put(name, array)

    def scratch(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        return self.data.scratch(shape, dtype)

    def rewind(self) -> None:
        """Empty the file; after blocks were sent, the fused check is given up (the
        weights are computed again for other values)."""
        self.data.rewind()
        if self._next:
            self.verification.abandon("the weights were computed again")
        for value, tensor in reversed(self._restore):
            value.const_value = tensor
        self._restore.clear()
        self._put.clear()
        self._where.clear()
        self._next = 0

    def order(self, analysis: AnalysisResult, tau: np.ndarray) -> Sequence[int]:
        """The weights by the first block reading them (stable); starts the thread."""
        natural = range(len(analysis.weights))
        if self.verification.abandoned is not None:
            return natural
        if self.verification.runner is not None:
            self.verification.abandon("the weights were computed again")
            return natural
        self._reads = self.verification.start(analysis, tau)
        for k, names in reversed(list(enumerate(self._reads))):
            self._first.update(dict.fromkeys(names, k))
        blocks = [self._first.get(w.source.name, 0) for w in analysis.weights]
        self._left = [0] * len(self._reads)
        if self._left:  # (no blocks: nothing is sent)
            for k in blocks:
                self._left[k] += 1
        self._send_ready()
        return sorted(natural, key=blocks.__getitem__)

    def done(
        self, index: int, ref: ConstRef, new: np.ndarray | ir.TensorProtocol | None, copies: bool
    ) -> None:
        """Weight ``index`` is computed: send the blocks now complete."""
        if self.verification.abandoned is not None or not self._left:
            return
        if copies or (ref.is_node and new is not None):
            self.verification.abandon("the rewrite changes the graph, not only its weights")
            return
        if isinstance(new, ir.ExternalTensor):
            self._put[ref.name] = new
        self._left[self._first.get(ref.name, 0)] -= 1
        self._send_ready()

    def _send_ready(self) -> None:
        while self._next < len(self._left) and self._left[self._next] == 0:
            if self.verification.abandoned is not None:
                return
            placed = {n: w for n in self._reads[self._next] if (w := self._place(n)) is not None}
            self.data.wait()  # (the bytes the thread reads are in the file)
            self.verification.send(self._next, placed)
            self._next += 1

    def _place(self, name: str) -> Placed | None:
        """Where initializer ``name`` is in the output file, put or copied there now if
        not yet (None: it stays inline in the model, as :meth:`~graphteleport.io.
        StreamedSave.finish` keeps it)."""
        if name in self._where:
            return self._where[name]
        value = self.model.graph.initializers[name]
        put = self._put.get(name)
        tensor = value.const_value if put is None else put
        if isinstance(tensor, ir.ExternalTensor) and tensor.path == str(self.data.path):
            new: ir.ExternalTensor | None = tensor
        elif isinstance(tensor, ir.ExternalTensor):
            new = self.data.copy(tensor)
        elif tensor is not None and tensor.nbytes > INLINE_MAX:
            new = self.data.put(name, tensor.numpy())
        else:
            new = None
        if new is not None and new is not tensor:
            self._restore.append((value, value.const_value))
            value.const_value = new
        self._where[name] = None if new is None else _placed(new)
        return self._where[name]


def _placed(tensor: ir.ExternalTensor) -> Placed:
    length = tensor.length if tensor.length is not None else tensor.nbytes
    return os.fspath(tensor.location), tensor.offset or 0, length


def _external(like: onnx.TensorProto, where: Placed) -> onnx.TensorProto:
    """An initializer of ``like``'s name, type and shape stored at ``where``."""
    out = onnx.TensorProto(name=like.name, data_type=like.data_type, dims=like.dims)
    out.data_location = onnx.TensorProto.EXTERNAL
    location, offset, length = where
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = out.external_data.add()
        entry.key, entry.value = key, str(value)
    return out


def _same_scales(a: TensorScales | None, b: TensorScales | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.tracked != b.tracked or a.scales.keys() != b.scales.keys():
        return False
    return all(np.array_equal(a.scales[n], b.scales[n]) for n in a.scales)


def _differs(
    original: onnx.ModelProto, written: onnx.ModelProto, inits: Mapping[str, onnx.TensorProto]
) -> str | None:
    """Why the ``written`` model is not the one the blocks ran (the ``original``'s graph
    with initializers ``inits``), or None where it is."""
    if _opsets(original) != _opsets(written):
        return "the written model imports other opsets"
    a, b = original.graph, written.graph
    if len(a.node) != len(b.node) or any(_node(x) != _node(y) for x, y in zip(a.node, b.node)):
        return "the written model's nodes are not the original's"
    if [o.name for o in a.output] != [o.name for o in b.output]:
        return "the written model's outputs are not the original's"
    stored = {t.name: t for t in b.initializer}
    if _declared(a, stored) != _declared(b, stored):
        return "the written model declares other inputs or value types"
    for name, ran in inits.items():
        if name not in stored:
            return f"the written model lacks initializer '{name}'"
        if not _same_tensor(ran, stored[name]):
            return f"the written initializer '{name}' is not the one verified"
    return None


def _declared(graph: onnx.GraphProto, stored: Mapping[str, object]) -> set[bytes]:
    """The graph's inputs and value types other than the initializers' own (a saved
    model declares every initializer's type, as its tensor has it)."""
    infos = [*graph.input, *graph.value_info]
    return {v.SerializeToString(deterministic=True) for v in infos if v.name not in stored}


def _opsets(model: onnx.ModelProto) -> set[tuple[str, int]]:
    return {(o.domain or "ai.onnx", o.version) for o in model.opset_import}


def _node(n: onnx.NodeProto) -> tuple[object, ...]:
    attrs = sorted((a.name, a.SerializeToString(deterministic=True)) for a in n.attribute)
    return n.op_type, n.domain or "", tuple(n.input), tuple(n.output), tuple(attrs)


def _same_tensor(ran: onnx.TensorProto, stored: onnx.TensorProto) -> bool:
    """Whether two initializers hold the same value: the same type and shape, and the
    same place in the same external file, or the same inline bytes."""
    if ran.data_type != stored.data_type or list(ran.dims) != list(stored.dims):
        return False
    ext = onnx.TensorProto.EXTERNAL
    if ran.data_location == ext or stored.data_location == ext:
        return _where(ran) == _where(stored)
    x, y = onnx.numpy_helper.to_array(ran), onnx.numpy_helper.to_array(stored)
    return x.tobytes() == y.tobytes()


def _where(t: onnx.TensorProto) -> tuple[str, int, int] | None:
    """An external initializer's (location, offset, length; -1: not given), by onnx's
    own reading of its entries."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = ExternalDataInfo(t)
    return info.location, info.offset or 0, -1 if info.length is None else info.length

"""Verification by pieces: the proof of DESIGN.md §5 one block of the graph at a time, so
peak memory is one block's weights (original and teleported) plus the activations that
cross a block boundary, never two whole models.

**Blocks.**  A block is a *topological chunk with bounded weight bytes*
(:func:`plan_blocks`): the original's computing nodes (those of constants excluded), in
graph order, are cut into consecutive runs whose weights (the initializers they read,
directly or through constant-only nodes) stay within a byte budget; a node whose own
weights exceed it is a block alone.  Any topological order of any graph can be cut this
way: a block's *inputs* are the computed values it reads that earlier blocks (or the
graph's inputs) produce, its *outputs* the values it produces that later blocks read or
that are graph outputs.  Constants are never cut: every block recomputes the constant
nodes it reads.  For a transformer the cut falls on the residual stream (and the few
values such as RoPE tables or masks that every layer reads).

**The check.**  For each block ``B`` with inputs ``x`` and outputs ``y = B(x)``, the
analysis promises ``B'(s_x ⊙ x) = s_y ⊙ y`` (``s`` from :class:`~graphteleport.
tensorcheck.TensorScales`, 1 for untracked values), where ``B'`` is the teleported
model's part that computes the same names from the same names (walked back in the
teleported graph, so inserted ``Mul`` nodes and renamed constants come along).  The
original's block runs on the original's recorded boundary tensors (its own previous
blocks' outputs, starting from the user's inputs), and the teleported block on ``s ⊙``
the same tensors; every output is compared with ``s ⊙`` the original's by the node-local
rule (:func:`~graphteleport.tensorcheck.compare_tensor`).  Errors therefore do not
accumulate across blocks, and the first failing block is named with its failing value.
Without scales (no analysis promise), both models run their own chains block by block
and only graph outputs are compared.  On the first input set the per-tensor check
(:func:`~graphteleport.tensorcheck.check_tensors`) also runs inside each block, node by
node, with its mirrored pass.

Each block is a small ONNX model built in memory whose initializers stay references into
the external data files (onnxruntime reads only that block's weights); its session is
released before the next is opened.

**Runs.**  Per block and model, one session runs every input set stacked along axis 0
in one run where :func:`graphteleport.rows.stackable` proves no node mixes rows (else
one by one; the same outputs either way, bit for bit); the original's run also gives
the first set's rows of the tensors the per-tensor check records (:class:`_Check`),
which then runs its mirrored pass on the original's cut model (right after the
original's block run, while its widened weights are at hand: :class:`~graphteleport.
tensorcheck.OriginalFirst`) and both passes on the teleported one's, stacked the same
way: 4 runs a block, each model's weights widened once.  At 16 tokens a run costs about
what reading (and repacking) the block's weights does, so fewer, taller runs pay:
`verify_teleport` by pieces alone on a 2-layer hidden-4096 float16 LLaMA, 8 draws, CPU
8.78 / 8.84 s with 7 runs a block → 7.98 / 8.53 / 7.56 / 8.35 s with 4 (separate
processes alternating, load 5.7–6.7), the same findings to the bit.  A block's float16
weights read only by ops without a float16 CPU kernel are widened once for all its
sessions (:class:`graphteleport.widen.Widened`).

Measured (8-layer hidden-2048 float16 LLaMA shape, 1.08 GB of weights, 8 draws,
per-tensor check on): peak RSS 1.05 GB by pieces (5 blocks of at most 256 MiB), 3.58 GB
whole.

**Fused.**  :class:`BlockRunner` runs one block at a time, in order, reading the
teleported model's initializers as each block runs: :mod:`graphteleport.fused` drives
it from a thread while the streamed rewrite writes the blocks' weights, each block
checked as soon as its weights are in the output file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from graphteleport.rows import run_sets
from graphteleport.tensorcheck import (
    LoadedModel,
    OriginalFirst,
    TensorCheckResult,
    TensorFailure,
    TensorScales,
    check_tensors,
    compare_tensor,
    constant_names,
    reads,
    recording_names,
    saturation_floors,
    sub_model,
    tolerance_scale,
)
from graphteleport.widen import MIN_ELEMENTS, Widened

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "Block",
    "BlockRunner",
    "PiecesResult",
    "block_weights",
    "plan_blocks",
    "verify_blocks",
    "weight_sizes",
]

logger = logging.getLogger(__name__)

#: Weight bytes one block may read (a node with larger weights is a block alone).
DEFAULT_BLOCK_BYTES = 256 * 2**20

Feeds = Mapping[str, np.ndarray]
Run = Callable[[Feeds], list[np.ndarray]]
Opener = Callable[[onnx.ModelProto, str], Run]


@dataclasses.dataclass(frozen=True)
class Block:
    """One piece of the original graph (see the module docstring).

    ``nodes``: indices of the original's nodes it runs (its chunk and the constant nodes
    they need), in graph order; ``inputs``/``outputs``: the values fed and given;
    ``weight_bytes``: bytes of the initializers it reads.
    """

    index: int
    nodes: list[int]
    inputs: list[str]
    outputs: list[str]
    weight_bytes: int

    def describe(self, graph: onnx.GraphProto, blocks: int) -> str:
        first, last = graph.node[self.nodes[0]], graph.node[self.nodes[-1]]
        span = f"nodes '{first.name or first.op_type}' … '{last.name or last.op_type}'"
        return f"block {self.index + 1} of {blocks} ({span})"


def _nbytes(t: onnx.TensorProto) -> int:
    """Bytes of an initializer from its dims and type (its data is not read)."""
    try:
        item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        item = 4
    return int(np.prod(t.dims, dtype=np.int64)) * item


def weight_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    """Bytes of every initializer, by name."""
    return {t.name: _nbytes(t) for t in graph.initializer}


class _Walker:
    """Backward walks over one graph: producers and the names a node reads."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {y: k for k, n in enumerate(graph.node) for y in n.output if y}

    def walk(self, start: Sequence[int], stop: Callable[[str], bool]) -> tuple[set[int], list[str]]:
        """Nodes reached from *start* walking back until names where *stop* holds (and
        names nothing produces: initializers, graph inputs); returns (nodes, stop names
        reached, in first-reached order)."""
        keep: set[int] = set()
        fed: dict[str, None] = {}
        stack = list(start)
        while stack:
            k = stack.pop()
            if k in keep:
                continue
            keep.add(k)
            for x in reads(self.graph.node[k]):
                if stop(x):
                    fed.setdefault(x, None)
                elif x in self.producer:
                    stack.append(self.producer[x])
        return keep, list(fed)


def plan_blocks(graph: onnx.GraphProto, budget_bytes: int = DEFAULT_BLOCK_BYTES) -> list[Block]:
    """Cut the graph into blocks (module docstring): consecutive computing nodes while
    their weights stay within *budget_bytes*."""
    const = constant_names(graph)
    sizes = weight_sizes(graph)
    walker = _Walker(graph)
    computed = [k for k, n in enumerate(graph.node) if any(y and y not in const for y in n.output)]
    chunks: list[list[int]] = []
    chunk: list[int] = []
    weights: set[str] = set()
    for k in computed:
        const_nodes, _ = walker.walk([k], lambda x: x not in const)
        mine = {x for j in const_nodes for x in reads(graph.node[j]) if x in sizes}
        new = mine - weights
        if chunk and sum(sizes[x] for x in weights | new) > budget_bytes:
            chunks.append(chunk)
            chunk, weights = [], set()
            new = mine
        chunk.append(k)
        weights |= new
    if chunk:
        chunks.append(chunk)
    return _blocks(graph, chunks, const, walker, sizes)


def block_weights(graph: onnx.GraphProto, block: Block) -> list[str]:
    """The initializers *block* reads (its nodes and the constant nodes they need), in
    the order its nodes first read them."""
    stored = {t.name for t in graph.initializer}
    names = (x for k in block.nodes for x in reads(graph.node[k]) if x in stored)
    return list(dict.fromkeys(names))


def _fed_from_outside(stored: set[str], produced: set[str]) -> Callable[[str], bool]:
    """Whether a name a block reads is fed: computed, and not by the block itself."""
    return lambda x: x not in stored and x not in produced


def _blocks(
    graph: onnx.GraphProto,
    chunks: Sequence[Sequence[int]],
    const: set[str],
    walker: _Walker,
    sizes: Mapping[str, int],
) -> list[Block]:
    """Blocks of the chunks: inputs, outputs, the constant nodes each recomputes."""
    produced = [{y for k in c for y in graph.node[k].output if y} for c in chunks]
    walks = [
        walker.walk(list(c), _fed_from_outside(const | set(sizes), p))
        for c, p in zip(chunks, produced, strict=True)
    ]
    graph_outputs = {o.name for o in graph.output}
    blocks = []
    for i, (nodes, fed) in enumerate(walks):
        later = {x for _, f in walks[i + 1 :] for x in f}
        outs = [
            y
            for k in sorted(nodes)
            for y in graph.node[k].output
            if y in produced[i] and (y in later or y in graph_outputs)
        ]
        read = {x for k in nodes for x in reads(graph.node[k]) if x in sizes}
        blocks.append(
            Block(i, sorted(nodes), fed, list(dict.fromkeys(outs)), sum(sizes[x] for x in read))
        )
    return blocks


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class PiecesResult:
    """What :func:`verify_blocks` found.

    ``reference``/``candidate``: per input set, the graph outputs of the original and of
    the teleported blocks (in the original's output order: for :func:`graphteleport.
    verify.compare`); ``failures``: one line per failing block output (graph outputs are
    compared by the caller); ``max_rel_err``: the largest block-output error relative to
    its scale; ``tensors``: the per-tensor check over all blocks (None without scales).
    """

    blocks: int
    output_names: list[str]
    reference: list[list[np.ndarray]]
    candidate: list[list[np.ndarray]]
    failures: list[str]
    max_rel_err: float
    compared: int
    tensors: TensorCheckResult | None
    peak_block_bytes: int


class _TensorTotals:
    """The per-tensor check summed over blocks; the first failing block's failure."""

    def __init__(self) -> None:
        self.total = TensorCheckResult(
            passed=False, tensors=0, elements=0, max_rel_err=0.0, groups=0
        )
        self.failure: TensorFailure | None = None

    def add(self, r: TensorCheckResult, where: str) -> None:
        t = self.total
        t.tensors, t.elements, t.groups = (
            t.tensors + r.tensors,
            t.elements + r.elements,
            t.groups + r.groups,
        )
        t.max_rel_err = max(t.max_rel_err, r.max_rel_err)
        t.failures += r.failures
        if self.failure is None and r.failure is not None:
            self.failure = dataclasses.replace(r.failure, block=where)

    def result(self) -> TensorCheckResult:
        self.total.failure = self.failure
        self.total.passed = self.failure is None and self.total.elements > 0
        return self.total


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class _Pair:
    """Both models, their blocks' teleported counterparts, and what is checked."""

    orig: LoadedModel
    tele: LoadedModel
    scales: TensorScales | None
    open_model: Opener
    rtol: float
    seed: int

    def tele_part(self, block: Block) -> tuple[list[int], list[str]]:
        """The teleported model's nodes computing ``block.outputs`` from ``block.inputs``
        (and from nothing the original computes elsewhere), in graph order, and what they
        read of the original's values."""
        graph = self.tele.proto.graph
        walker = _Walker(graph)
        missing = [y for y in block.outputs if y not in walker.producer]
        if missing:
            raise _Missing(f"the rewritten model computes no value '{missing[0]}'")
        inputs = set(block.inputs)
        nodes, fed = walker.walk([walker.producer[y] for y in block.outputs], inputs.__contains__)
        return sorted(nodes), fed


class _Missing(Exception):
    """The teleported model lacks a value a block gives (a failed verification)."""


def verify_blocks(
    original: str | LoadedModel,
    teleported: str | LoadedModel,
    feed_sets: Sequence[Feeds],
    scales: TensorScales | None,
    open_model: Opener,
    *,
    rtol: float = 1e-5,
    seed: int = 0,
    budget_bytes: int = DEFAULT_BLOCK_BYTES,
    widen_elements: int | None = MIN_ELEMENTS,
) -> PiecesResult:
    """Check the teleport block by block (module docstring).

    *open_model* is ``open_model(proto, folder) -> run`` (:func:`graphteleport.verify.
    open_proto`); each block's two sessions live one at a time.  A value the teleported
    model lacks fails the result (it does not raise).  Each block's float16 weights of
    at least *widen_elements* elements that only float32-run ops read are widened once
    for all its sessions (:mod:`graphteleport.widen`; the same outputs, bit for bit);
    None: never.
    """
    orig = original if isinstance(original, LoadedModel) else LoadedModel.load(original)
    tele = teleported if isinstance(teleported, LoadedModel) else LoadedModel.load(teleported)
    runner = BlockRunner(
        orig, tele, feed_sets, scales, open_model,
        rtol=rtol, seed=seed, budget_bytes=budget_bytes, widen_elements=widen_elements,
    )  # fmt: skip
    for block in runner.blocks:
        if not runner.run(block):
            break
    return runner.result()


class BlockRunner:
    """:func:`verify_blocks` one block at a time, in order (``blocks``): :meth:`run`
    checks a block, :meth:`result` says what all blocks run found.  The teleported
    model's proto is read as each block runs, so its weights may be filled in as they
    are written (:mod:`graphteleport.fused`)."""

    def __init__(
        self,
        orig: LoadedModel,
        tele: LoadedModel,
        feed_sets: Sequence[Feeds],
        scales: TensorScales | None,
        open_model: Opener,
        *,
        rtol: float = 1e-5,
        seed: int = 0,
        budget_bytes: int = DEFAULT_BLOCK_BYTES,
        widen_elements: int | None = MIN_ELEMENTS,
    ) -> None:
        self.graph = orig.proto.graph
        self.blocks = plan_blocks(self.graph, budget_bytes)
        self.state = _State(feed_sets, self.blocks, [o.name for o in self.graph.output])
        self.floors = saturation_floors(self.graph)
        self.scales = scales
        # one model's block widened at a time (2 bytes → 4): where both fit, no conversion
        # is made twice; the LM head's (0.5 GB each for the 7B shape) are not held together
        wide = None if widen_elements is None else Widened(widen_elements, 2 * budget_bytes)
        self.wide = wide
        opener = self.wide.opener(open_model) if self.wide is not None else open_model
        self.pair = _Pair(orig, tele, scales, opener, rtol, seed)

    def run(self, block: Block) -> bool:
        """Check ``block`` (the one after the last run); False where the teleported
        model lacks a value it gives (a failure: no later block can run)."""
        where = block.describe(self.graph, len(self.blocks))
        try:
            _run_block(self.pair, block, self.state, self.floors, where)
        except _Missing as e:
            self.state.failures.append(f"{where}: {e}")
            return False
        finally:
            if self.wide is not None:
                self.wide.clear()  # the next block reads other weights
        self.state.release(block.index)
        logger.debug("%s checked", where)
        return True

    def result(self) -> PiecesResult:
        return self.state.result(len(self.blocks), tele_sets=self.scales is None)


class _State:
    """The boundary tensors alive between blocks, per input set, and what was found."""

    def __init__(self, feed_sets: Sequence[Feeds], blocks: Sequence[Block], names: list[str]):
        self.names = names
        self.orig: list[dict[str, np.ndarray]] = [dict(f) for f in feed_sets]
        self.tele: list[dict[str, np.ndarray]] = [dict(f) for f in feed_sets]
        self.last_use = {x: b.index for b in blocks for x in b.inputs}
        self.ref: list[dict[str, np.ndarray]] = [{} for _ in feed_sets]
        self.got: list[dict[str, np.ndarray]] = [{} for _ in feed_sets]
        self.failures: list[str] = []
        self.max_rel = 0.0
        self.compared = 0
        self.tensors = _TensorTotals()
        self.checked_tensors = False
        self.peak = 0

    def release(self, index: int) -> None:
        """Drop the tensors no block after *index* reads."""
        for store in (*self.orig, *self.tele):
            for x in [x for x in store if self.last_use.get(x, -1) <= index]:
                del store[x]

    def result(self, blocks: int, tele_sets: bool) -> PiecesResult:
        missing = [n for n in self.names if not self.ref or n not in self.got[0]]
        reference = [[r[n] for n in self.names if n not in missing] for r in self.ref]
        candidate = [[g[n] for n in self.names if n not in missing] for g in self.got]
        return PiecesResult(
            blocks=blocks,
            output_names=[n for n in self.names if n not in missing],
            reference=reference,
            candidate=candidate,
            failures=self.failures,
            max_rel_err=self.max_rel,
            compared=self.compared,
            tensors=self.tensors.result() if self.checked_tensors else None,
            peak_block_bytes=self.peak,
        )


def _run_block(
    pair: _Pair, block: Block, state: _State, floors: Mapping[str, float], where: str
) -> None:
    """Run one block of both models on every input set, compare, record its outputs.
    Where the per-tensor check follows, the original's run on the first set also gives
    the tensors it records (:class:`_Check`: one run fewer a block)."""
    tele_part = pair.tele_part(block)
    state.peak = max(state.peak, block.weight_bytes)
    outs = block.outputs
    check = _Check.plan(pair, block, tele_part, state)
    extra = (check.extra if check is not None else None) or []
    proto = _block_proto(pair.orig, block.nodes, block.inputs, [*outs, *extra], state)
    feeds = [{x: s[x] for x in block.inputs} for s in state.orig]
    ran = run_sets(pair.open_model, proto, pair.orig.folder, feeds)  # one session at a time
    ref = [dict(zip(outs, r[: len(outs)], strict=True)) for r in ran]
    if check is not None:  # copies: the other sets' rows of a stacked run are freed
        check.record([np.array(v) for v in ran[0][len(outs) :]], state.orig[0], block.inputs)
    del ran
    if check is not None:  # the original's check runs while its widened weights are at hand
        check.start(pair, block, state.orig[0], ref[0])
    tele_proto = _block_proto(pair.tele, *tele_part, outs, state)
    feeds = [
        _tele_feeds(pair.scales, tele_part[1], o, t)
        for o, t in zip(state.orig, state.tele, strict=True)
    ]
    got = [
        dict(zip(outs, r, strict=True))
        for r in run_sets(pair.open_model, tele_proto, pair.tele.folder, feeds)
    ]
    for k, (r, g) in enumerate(zip(ref, got, strict=True)):
        state.orig[k].update(r)
        state.tele[k].update(g)
        state.ref[k].update({n: r[n] for n in state.names if n in r})
        state.got[k].update({n: g[n] for n in state.names if n in g})
    if pair.scales is not None:
        _compare_outputs(pair, block, ref, got, state, floors, where)
        if check is not None:  # after a failure: the first one names it
            check.run(pair, block, state, where)


def _block_proto(
    model: LoadedModel,
    nodes: Sequence[int],
    inputs: Sequence[str],
    outputs: Sequence[str],
    state: _State,
) -> onnx.ModelProto:
    """A block of *model* as a model (inputs typed after the first set's tensors)."""
    store = state.orig[0]
    fed = {x: store[x] for x in inputs}
    return sub_model(model, nodes, fed, outputs, shaped=False, own_inputs=True)


def _tele_feeds(
    scales: TensorScales | None, inputs: Sequence[str], orig: Feeds, tele: Feeds
) -> dict[str, np.ndarray]:
    """The teleported block's inputs: ``s ⊙`` the original's tensors, or (without scales)
    the teleported chain's own."""
    if scales is None:
        return {x: tele[x] for x in inputs}
    return {x: scales.rounded(x, orig[x]) for x in inputs}


def _compare_outputs(
    pair: _Pair,
    block: Block,
    ref: Sequence[Mapping[str, np.ndarray]],
    got: Sequence[Mapping[str, np.ndarray]],
    state: _State,
    floors: Mapping[str, float],
    where: str,
) -> None:
    """Each block output against ``s ⊙`` the original's, on every input set."""
    assert pair.scales is not None
    scales = pair.scales
    producer = _Walker(pair.orig.proto.graph).producer
    for k, (r, g) in enumerate(zip(ref, got, strict=True)):
        fed = state.orig[k]
        in_mag = max(
            (
                tolerance_scale(scales.apply(x, fed[x]))
                for x in block.inputs
                if fed[x].dtype.kind == "f"
            ),
            default=0.0,
        )
        for name in block.outputs:
            node = pair.orig.proto.graph.node[producer[name]]
            failure, elements, rel = compare_tensor(
                name, node, scales.apply(name, r[name]), g[name], pair.rtol,
                floor=floors.get(name, 0.0), in_mag=in_mag, label=f"set {k} recorded",
            )  # fmt: skip
            state.compared += elements
            state.max_rel = max(state.max_rel, rel)
            if failure is not None:
                state.failures.append(f"{where}: {failure.describe()}")


@dataclasses.dataclass
class _Check:
    """The per-tensor check of one block on the first input set: both blocks as models
    (:func:`_as_loaded`), the original's tensors it records (``extra``, given by the
    block's own first run where one run records them all, :func:`~graphteleport.
    tensorcheck.recording_names`: the same nodes on the same inputs), and those
    tensors once recorded."""

    models: tuple[LoadedModel, LoadedModel]
    extra: list[str] | None  # None: the check records them itself (several groups)
    recorded: dict[str, np.ndarray] | None = None
    started: OriginalFirst | None = None

    @classmethod
    def plan(
        cls, pair: _Pair, block: Block, tele_part: tuple[list[int], list[str]], state: _State
    ) -> _Check | None:
        """The check of *block*, or None where none runs (no scales, or an earlier
        block's check failed: the first failure names the tensor)."""
        if pair.scales is None or state.tensors.failure is not None:
            return None
        fed = state.orig[0]
        orig = _as_loaded(pair.orig, block.nodes, block.inputs, block.outputs, fed)
        tele = _as_loaded(pair.tele, *tele_part, block.outputs, fed)
        names = recording_names(orig, tele)
        taken = {*block.inputs, *block.outputs}
        extra = None if names is None else [n for n in names if n not in taken]
        return cls((orig, tele), extra)

    def record(self, values: Sequence[np.ndarray], fed: Feeds, inputs: Sequence[str]) -> None:
        """The first set's run gave ``extra`` (and the block outputs it returns anyway)."""
        if self.extra is not None:
            self.recorded = {x: fed[x] for x in inputs}
            self.recorded.update(zip(self.extra, values, strict=True))

    def start(self, pair: _Pair, block: Block, fed: Feeds, outputs: Feeds) -> None:
        """The original's half of the check (:class:`~graphteleport.tensorcheck.
        OriginalFirst`), where one run recorded every tensor: on the first set's inputs
        *fed*, the block's *outputs* on them recorded with the rest."""
        if self.recorded is None or pair.scales is None:
            return
        recorded = {**self.recorded, **{y: outputs[y] for y in block.outputs}}
        self.started = OriginalFirst.start(
            self.models[0], self.models[1], {x: fed[x] for x in block.inputs}, pair.scales,
            pair.open_model, recorded, rtol=pair.rtol, seed=pair.seed + block.index,
        )  # fmt: skip

    def run(self, pair: _Pair, block: Block, state: _State, where: str) -> None:
        """Check every tensor of the block, node by node (the teleported half, where
        :meth:`start` ran the original's)."""
        assert pair.scales is not None
        state.checked_tensors = True
        if self.started is not None:
            state.tensors.add(self.started.finish(pair.open_model, stack=True), where)
            self.started = None
            return
        fed = state.orig[0]
        recorded = None
        if self.recorded is not None:
            recorded = {**self.recorded, **{y: fed[y] for y in block.outputs}}
        r = check_tensors(
            self.models[0], self.models[1], {x: fed[x] for x in block.inputs}, pair.scales,
            pair.open_model, rtol=pair.rtol, seed=pair.seed + block.index, recorded=recorded,
            stack=True,
        )  # fmt: skip
        state.tensors.add(r, where)


def _as_loaded(
    model: LoadedModel,
    nodes: Sequence[int],
    inputs: Sequence[str],
    outputs: Sequence[str],
    fed: Feeds,
) -> LoadedModel:
    """A block of *model* as a :class:`LoadedModel` the per-tensor check accepts."""
    proto = sub_model(model, nodes, {x: fed[x] for x in inputs}, outputs, own_inputs=True)
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model.skeleton)
    del skeleton.graph.input[:]
    skeleton.graph.input.extend(proto.graph.input)
    inits = {t.name: t for t in proto.graph.initializer}
    return LoadedModel(proto, model.folder, skeleton, inits)

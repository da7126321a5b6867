"""Run the rule table over a graph and solve: the symmetry analysis.

``analyze(model)`` walks the nodes in topological order.  Graph inputs get one
pinned neuron each; every node's rule (or, when the op is unknown or its rule
does not apply, a pin of all its neurons with the reason) states constraints;
graph outputs are pinned.  Weights used by several nodes must scale the same
way under every use: uses with the same structure are tied factor by factor,
others become monomials; weights whose elements are all equal (exporters merge
such initializers, e.g. every LayerNorm weight = 1 at initialization) are
instead given a private copy per use when their scalings differ.  A weight some
read of which is not one of its absorbs (a subgraph body, a function call, an
unknown op, a graph input or output: :mod:`graphteleport.analysis.uses`) keeps its
value: its absorbs' factors are pinned.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphteleport.analysis.constraints import Absorb, Factor, Pinned, Unsupported
from graphteleport.analysis.context import Context
from graphteleport.analysis.graphinfo import GraphInfo
from graphteleport.analysis.rules import RULES, SHAPE_ONLY, Rule
from graphteleport.analysis.solve import Solution, solve
from graphteleport.analysis.uses import foreign_read, subgraphs

log = logging.getLogger(__name__)


def run_rules(ctx: Context) -> None:
    """Seed the graph inputs, apply every node's rule, pin the graph outputs."""
    graph = ctx.info.graph
    for v in graph.inputs:
        if ctx.info.is_float(v) and not ctx.const(v):
            ctx.begin_value()
            shape = ctx.info.shape(v)
            ids = ctx.new([1] * len(shape) if shape is not None else [], v.name or "input")
            ctx.pin(ids, "graph input")
            ctx.set(v, ids)
            ctx.commit()
    for node, rule in _rule_plan(ctx.info):
        apply_rule(ctx, node, rule)
    for v in graph.outputs:
        if ctx.act(v):
            ctx.pin(ctx.ids(v), "graph output")


def _rule_plan(info: GraphInfo) -> list[tuple[ir.Node, Rule | None]]:
    """The nodes a rule must see, in order, each with its rule (None: an unknown op).

    Constant nodes (their outputs are all constant exactly when the node is), nodes
    without outputs and shape-only ops are left out.  Listed once per graph: the list is
    structural, so :meth:`GraphInfo.fresh` copies share it.
    """
    plan = info.memo.get("rule_plan")
    if plan is None:
        plan = info.memo["rule_plan"] = [
            (node, RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None)
            for node in info.graph
            if id(node) not in info.constant_nodes
            and node.outputs
            and node.op_type not in SHAPE_ONLY
        ]
    return plan


def apply_rule(ctx: Context, node: ir.Node, rule: Rule | None) -> None:
    """Apply ``rule`` to ``node``; on :class:`Unsupported`, undo it and pin the node."""
    mark = ctx.begin(node)
    try:
        if id(node) in ctx.info.with_subgraphs:
            raise Unsupported(f"{node.op_type} has subgraphs")
        if rule is None:
            raise Unsupported(f"unknown op {_op_name(node)}")
        rule(ctx, node)
        _seed_untracked_outputs(ctx, node)
    except Unsupported as e:
        ctx.abort(mark)
        _pin_node(ctx, node, _reason(node, str(e), rule is None or isinstance(e, Pinned)))
    except (ValueError, IndexError, TypeError, ArithmeticError) as e:  # an unforeseen case
        log.debug("rule for %s failed", node.name, exc_info=True)
        ctx.abort(mark)
        _pin_node(ctx, node, f"{node.op_type}: rule failed ({type(e).__name__})")
    ctx.commit()


def _op_name(node: ir.Node) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _reason(node: ir.Node, message: str, bare: bool) -> str:
    """The message, prefixed with the op unless it names it already (``bare``)."""
    return message if bare else f"{node.op_type}: {message}"


def _seed_untracked_outputs(ctx: Context, node: ir.Node) -> None:
    for v in node.outputs:
        if not ctx.act(v) and ctx.info.is_float(v) and not ctx.const(v):
            raise Unsupported(f"output {v.name!r} was not tracked")


def _pin_node(ctx: Context, node: ir.Node, reason: str) -> None:
    """Pin every neuron the node touches: inputs (also those its subgraphs read) and outputs.

    The pinned neurons are *held* (:attr:`Constraints.held`): a working rule would have
    let weights depend on them, so the report counts them with this reason even when no
    weight does now.
    """
    held = ctx.c.held
    for k, v in enumerate(node.inputs):
        if v is not None and ctx.act(v) and not _unscaled(ctx, k):
            ctx.pin(ctx.ids(v), reason)
            held.append(ctx.ids(v))
    for v in _captured(node):
        if ctx.act(v):
            ctx.pin(ctx.ids(v), reason)
            held.append(ctx.ids(v))
    for v in node.outputs:
        if ctx.info.is_float(v) and not ctx.const(v):
            shape = ctx.info.shape(v)
            ids = ctx.new([1] * len(shape) if shape is not None else [], v.name or "")
            ctx.pin(ids, reason)
            ctx.set(v, ids)
            held.append(ids)


def _unscaled(ctx: Context, k: int) -> bool:
    """Insert mode: the node sees input k unscaled (a Mul by 1/τ on the edge) instead."""
    if not ctx.insert:
        return False
    try:
        ctx.unscale(k)
    except Unsupported:
        return False
    return True


def _captured(node: ir.Node) -> list[ir.Value]:
    """Values of the outer graphs read inside the node's subgraphs, at any depth: inputs
    of their nodes, and subgraph outputs that name an outer value directly."""
    inner: dict[int, ir.Graph] = {}
    todo = [g for _, g in subgraphs(node)]
    while todo:
        g = todo.pop()
        inner[id(g)] = g
        todo.extend(sub for n in g for _, sub in subgraphs(n))
    out: list[ir.Value] = []
    for g in inner.values():
        for n in g:
            out.extend(v for v in n.inputs if v is not None and id(v.graph) not in inner)
        out.extend(v for v in g.outputs if id(v.graph) not in inner)
    return out


# -- shared weights -------------------------------------------------------------------------
def is_uniform(tensor: np.ndarray) -> bool:
    """All elements equal: sharing such a tensor between uses is an exporter's accident."""
    flat = tensor.reshape(-1)
    return flat.size == 0 or bool(np.all(flat == flat[0]))


def by_source(absorbs: list[Absorb]) -> dict[int, list[Absorb]]:
    """Absorbs grouped by the stored tensor they rewrite (keyed by ``id`` of its value)."""
    out: dict[int, list[Absorb]] = defaultdict(list)
    for ab in absorbs:
        out[id(ab.source.value)].append(ab)
    return out


def pin_foreign_reads(ctx: Context, sources: Mapping[int, list[Absorb]]) -> None:
    """Pin every factor of the absorbs of a stored tensor that something other than its
    absorbs reads (:func:`graphteleport.analysis.uses.foreign_read`): ``S = 1``, so the
    tensor keeps its value for that reader."""
    for uses in sources.values():
        why = foreign_read(ctx.info, uses)
        if why is not None:
            for ab in uses:
                for f in ab.factors:
                    ctx.pin(f.ids, why)


def tie_shared_weights(ctx: Context, sources: Mapping[int, list[Absorb]]) -> set[int]:
    """Make every weight used more than once (``sources``: :func:`by_source`) scale
    consistently.

    Returns the ids of the sources that get a private copy per use instead.
    """
    private: set[int] = set()
    for key, uses in sources.items():
        if len(uses) < 2:
            continue
        if is_uniform(_source_array(uses[0])):
            private.add(key)
            continue
        first = uses[0]
        for other in uses[1:]:
            _consistent(ctx, first, other)
    return private


def _source_array(ab: Absorb) -> np.ndarray:
    ref = ab.source
    if ref.is_node:
        return np.asarray(ref.value.attributes["value"].as_tensor().numpy())  # type: ignore[attr-defined]
    return np.asarray(ref.value.const_value.numpy())  # type: ignore[attr-defined]


def _in_source_space(ab: Absorb, size: int) -> tuple[IntArrayPair, list[Factor]]:
    """Each factor's ids at the source's flat elements, with the elements covered."""
    index = np.arange(size) if ab.index is None else ab.index.reshape(-1)
    if ab.expand:
        raise Unsupported("broadcast-expanded weight shared by several uses")
    return index, [Factor(np.broadcast_to(f.ids, ab.shape).reshape(-1), f.exp) for f in ab.factors]


IntArrayPair = np.ndarray


def _consistent(ctx: Context, a: Absorb, b: Absorb) -> None:
    """Uses a and b of one weight must give each element the same scale."""
    size = _source_array(a).size
    try:
        ia, fa = _in_source_space(a, size)
        ib, fb = _in_source_space(b, size)
    except Unsupported:
        for ab in (a, b):
            for f in ab.factors:
                ctx.pin(f.ids, f"weight {ab.source.name} is shared and broadcast")
        return
    common, pa, pb = np.intersect1d(ia, ib, return_indices=True)
    if not common.size:
        return
    if [f.exp for f in fa] == [f.exp for f in fb]:
        for x, y in zip(fa, fb):
            ctx.tie(x.ids[pa], y.ids[pb])
        return
    ctx.monomial([(f.ids[pa], f.exp) for f in fa] + [(f.ids[pb], -f.exp) for f in fb])


def _inserted_ids(ctx: Context) -> Iterator[np.ndarray]:
    """Ids of every neuron an inserted node (insert mode) depends on."""
    yield from (w.ids for w in ctx.c.wraps)
    for e in ctx.c.edges:
        yield from (f.ids for f in e.factors)


class FactorTable:
    """The factors of every absorb laid end to end, so that ``S`` of all of them takes
    one gather of ``τ``.

    ``ids`` holds every factor's ids (flat, in absorb order); per factor ``starts`` and
    ``sizes`` locate it, ``shapes`` give its layout and ``exps`` its exponent;
    ``first[id(ab)]`` is the index of absorb ``ab``'s first factor.
    """

    __slots__ = (
        "_empty",
        "_inverse",
        "_powers",
        "_squares",
        "_trailing_empty",
        "exps",
        "first",
        "ids",
        "shapes",
        "sizes",
        "starts",
    )

    def __init__(self, absorbs: Sequence[Absorb]) -> None:
        arrays: list[np.ndarray] = []
        self.exps: list[int] = []
        self.first: dict[int, int] = {}
        for ab in absorbs:
            self.first[id(ab)] = len(arrays)
            for f in ab.factors:
                arrays.append(f.ids)
                self.exps.append(f.exp)
        self.shapes = [a.shape for a in arrays]
        self.sizes = [a.size for a in arrays]
        self.starts = np.asarray([0, *self.sizes[:-1]], dtype=np.int64).cumsum()
        self._empty = [k for k, n in enumerate(self.sizes) if n == 0]
        self._trailing_empty = bool(self.sizes) and self.sizes[-1] == 0
        empty = np.zeros(0, dtype=np.int64)
        self.ids = np.concatenate(arrays, axis=None) if arrays else empty  # flattened
        exps = np.asarray(self.exps, dtype=np.int64).repeat(self.sizes)
        self._inverse = (exps == -1).nonzero()[0]
        other = (np.abs(exps) != 1).nonzero()[0]  # powers other than ±1 (BatchNorm's τ²)
        self._powers = (other, exps[other].astype(np.float64))
        self._squares = bool(other.size) and bool((exps[other] == 2).all())

    def values(self, tau: np.ndarray) -> np.ndarray:
        """``τ[ids]^e`` of every element, float64 (split by ``sizes`` per factor); almost
        every exponent is ±1 (a reciprocal, by index: ``np.divide``'s ``where=`` is several
        times slower), the rest mostly 2 (a square)."""
        out = tau[self.ids]
        inv = self._inverse
        out[inv] = 1.0 / out[inv]
        other, exps = self._powers
        if other.size:
            base = tau[self.ids[other]]
            out[other] = base * base if self._squares else base**exps
        return out

    def span(self, ab: Absorb) -> tuple[int, int]:
        """Where absorb ``ab``'s first factor lies in ``ids`` (and in :meth:`values`)."""
        j = self.first[id(ab)]
        lo = int(self.starts[j])
        return lo, lo + self.sizes[j]

    def moved(self, values: np.ndarray) -> list[bool]:
        """Per factor: some element of ``values`` (:meth:`values`) differs from 1."""
        if not self.ids.size:
            return [False] * len(self.sizes)
        differ = values != 1.0
        if self._trailing_empty:  # a sentinel keeps their start (the end) in range
            differ = np.append(differ, False)
        peaks = np.logical_or.reduceat(differ, self.starts)
        if self._empty:
            peaks[self._empty] = False  # (reduceat gives an empty span another's element)
        out: list[bool] = peaks.tolist()
        return out


# -- entry point ----------------------------------------------------------------------------
class Analysis:
    """The result of the analysis: the rules' context and the solved classes."""

    def __init__(
        self,
        ctx: Context,
        solution: Solution,
        private: set[int],
        sources: dict[int, list[Absorb]],
        table: FactorTable,
    ) -> None:
        self.ctx = ctx
        self.solution = solution
        self.private = private
        self.by_source = sources  # the absorbs per stored tensor (:func:`by_source`)
        self.factor_table = table  # every absorb's factors, end to end

    @property
    def absorbs(self) -> list[Absorb]:
        return self.ctx.c.absorbs


def analyze_model(
    model: ir.Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    mode: str = "absorb",
    rescale_residual: bool = False,
    *,
    writable: Callable[[str], bool] | None = None,
    training: bool = False,
    info: GraphInfo | None = None,
) -> Analysis:
    """Find every cofactor ``model`` admits (see DESIGN.md §3).

    ``writable`` limits the stored tensors that may absorb a scaling (the torch
    frontend: parameters and buffers only); ``training`` keeps BatchNorm right in
    training mode and stored tensors at their shapes.  ``info``: the graph's facts
    when already indexed (:meth:`GraphInfo.fresh`); else computed here.
    """
    info = GraphInfo(model, input_shapes, writable) if info is None else info.fresh(writable)
    ctx = Context(info, mode, rescale_residual, training)
    run_rules(ctx)
    sources = by_source(ctx.c.absorbs)
    pin_foreign_reads(ctx, sources)
    private = tie_shared_weights(ctx, sources)
    table = FactorTable(ctx.c.absorbs)
    touched = np.zeros(ctx.c.n, dtype=bool)
    touched[table.ids] = True  # neurons some weight or inserted node depends on
    for ids in _inserted_ids(ctx):
        touched[ids.reshape(-1)] = True
    for ids in ctx.c.held:  # pinned where a rule failed: reported with their reason
        touched[ids.reshape(-1)] = True
    solution = solve(ctx.c, touched.nonzero()[0])
    return Analysis(ctx, solution, private, sources, table)

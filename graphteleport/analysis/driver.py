"""Run the rule table over a graph and solve: the symmetry analysis.

:func:`analyze_model` indexes the graph (:class:`GraphIndex`, or one given) and walks its
nodes in topological order.  Graph inputs get one pinned neuron each; every node's rule
(or, when the op is unknown or its rule does not apply, a pin of all its neurons with the
reason) states constraints into the rules' context; graph outputs are pinned.  Weights
used by several nodes must scale the same way under every use: uses with the same
structure are tied factor by factor, others become monomials; weights whose elements are
all equal (exporters merge such initializers, e.g. every LayerNorm weight = 1 at
initialization) are instead given a private copy per use when their scalings differ.  A
weight some read of which is not one of its absorbs (a subgraph body, a function call, an
unknown op, a graph input or output: :mod:`graphteleport.analysis.uses`) keeps its value:
its absorbs' factors are pinned.  The constraints are then solved
(:mod:`graphteleport.analysis.solve`), and the context is reduced to the narrow
:class:`~graphteleport.analysis.result.AnalysisResult` — the classes, the neurons of each
value, each weight's uses and factors, insert mode's nodes — which is all that leaves
the package.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from graphteleport.algebra import Factor, FactorTable
from graphteleport.analysis.constraints import Absorb, Pinned, Unsupported
from graphteleport.analysis.context import Context
from graphteleport.analysis.graphinfo import GraphInfo
from graphteleport.analysis.result import AnalysisResult, Weight
from graphteleport.analysis.rules import QUANTIZED_OPS, RULES, SHAPE_ONLY, Rule
from graphteleport.analysis.solve import Solution, solve
from graphteleport.analysis.uses import foreign_read, subgraphs
from graphteleport.frontends.onnx import ort_probe, resolve_input_shapes

log = logging.getLogger(__name__)
IntArray = np.ndarray


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
        if is_uniform(uses[0].source.array()):
            private.add(key)
            continue
        first = uses[0]
        for other in uses[1:]:
            _consistent(ctx, first, other)
    return private


def _in_source_space(ab: Absorb, size: int) -> tuple[IntArray, list[Factor]]:
    """Each factor's ids at the source's flat elements, with the elements covered."""
    index = np.arange(size) if ab.index is None else ab.index.reshape(-1)
    if ab.expand:
        raise Unsupported("broadcast-expanded weight shared by several uses")
    return index, [Factor(np.broadcast_to(f.ids, ab.shape).reshape(-1), f.exp) for f in ab.factors]


def _consistent(ctx: Context, a: Absorb, b: Absorb) -> None:
    """Uses a and b of one weight must give each element the same scale."""
    size = a.source.array().size
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


# -- entry point ----------------------------------------------------------------------------
class GraphIndex:
    """A graph's static facts, indexed once (:func:`index_graph`): shapes (by shape
    inference, or one onnxruntime run where it leaves some open), types, which values are
    constant, and — on demand — their values.

    Give it to :func:`analyze_model` (``index=``) to analyse one graph several times
    without indexing it again (the torch frontend: one trace, a teleport per call); each
    analysis starts from a copy with its own caches.  A frontend may also read constants
    through it (:meth:`constant_value`) to fold glue before the analysis.  The graph must
    not change between indexing and analysis.
    """

    __slots__ = ("_info",)

    def __init__(self, info: GraphInfo) -> None:
        self._info = info

    def is_constant(self, node: ir.Node) -> bool:
        """Every output of ``node`` is constant: it reads only initializers, Constant
        nodes, the shape of statically shaped values, or values computed from those."""
        return id(node) in self._info.constant_nodes

    def constant_value(self, v: ir.Value) -> np.ndarray:
        """The value of constant ``v``, evaluated node by node with ``onnx.reference`` (and
        memoised); raises when ``v`` is not constant or cannot be evaluated."""
        return self._info.value(v)


def complete_input_shapes(
    model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """``input_shapes`` completed with a concrete shape for every real input (graph input
    that is not an initializer) whose declared shape has a dynamic axis and that
    ``input_shapes`` lacks, sized as the CLI sizes it
    (:func:`graphteleport.frontends.onnx.resolve_input_shapes` with an onnxruntime probe:
    ``input_shapes`` as overrides, shared symbols, batch 1, integer sequences, declared
    hints, then the ladder).  Without concrete sizes a value's shape is unknown and its
    neurons collapse into one class (a conv's output channels of an input ``[N, 3, H, W]``),
    so an analysis would depend on whether its caller sized the inputs.  Returned
    unchanged (as tuples) when nothing is missing; raises
    :class:`~graphteleport.errors.InputError` when an axis cannot be sized (unknown rank,
    no size at which onnxruntime runs the model)."""
    given = {name: tuple(int(d) for d in shape) for name, shape in (input_shapes or {}).items()}
    if not any(_open_input(v, given) for v in model.graph.inputs):
        return given
    resolved = resolve_input_shapes(model, given, probe=ort_probe(model))
    return {**resolved.shapes, **given}


def _open_input(v: ir.Value, given: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether real input ``v`` has a dynamic (or unknown) axis ``given`` does not size."""
    if v.is_initializer() or (v.name or "") in given:
        return False
    return v.shape is None or not all(isinstance(d, int) for d in v.shape)


def index_graph(
    model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> GraphIndex:
    """Index ``model``'s graph (concrete ``input_shapes`` for dynamic dimensions; those
    missing are sized by :func:`complete_input_shapes`)."""
    return GraphIndex(GraphInfo(model, complete_input_shapes(model, input_shapes)))


def analyze_model(
    model: ir.Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    mode: str = "absorb",
    rescale_residual: bool = False,
    *,
    writable: Callable[[str], bool] | None = None,
    training: bool = False,
    index: GraphIndex | None = None,
) -> AnalysisResult:
    """Find every cofactor ``model`` admits (see DESIGN.md §3 and the module docstring).

    ``writable`` limits the stored tensors that may absorb a scaling (the torch
    frontend: parameters and buffers only); ``training`` keeps BatchNorm right in
    training mode and stored tensors at their shapes.  ``index``: the graph's facts when
    already indexed (:func:`index_graph`, with the same ``input_shapes``); else indexed
    here, the dynamic axes ``input_shapes`` does not size sized as the CLI sizes them
    (:func:`complete_input_shapes`).  The model is not changed.
    """
    if index is None:
        info = GraphInfo(model, complete_input_shapes(model, input_shapes), writable)
    else:
        info = index._info.fresh(writable)
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
    return _result(ctx, solution, sources, private, table)


def _result(
    ctx: Context,
    solution: Solution,
    sources: Mapping[int, list[Absorb]],
    private: set[int],
    table: FactorTable,
) -> AnalysisResult:
    """The narrow result: what the passes need of ``ctx``, and no more."""
    info = ctx.info
    return AnalysisResult(
        solution=solution,
        neurons=_neurons(ctx),
        weights=tuple(
            Weight(uses[0].source, tuple(uses), key in private) for key, uses in sources.items()
        ),
        absorbs=tuple(ctx.c.absorbs),
        factor_table=table,
        wraps=tuple(
            replace(
                w,
                input_dtype=_dtype(info, w.node.inputs[0]),
                output_dtype=_dtype(info, w.node.outputs[0]),
            )
            for w in ctx.c.wraps
        ),
        edges=tuple(replace(e, dtype=_dtype(info, e.node.inputs[e.index])) for e in ctx.c.edges),
        blocks=tuple(ctx.c.blocks),
        nothing_to_rescale="" if solution.touched.any() else nothing_to_rescale(ctx),
    )


def _neurons(ctx: Context) -> dict[str, IntArray]:
    """The neuron ids of every named value that carries neurons, in the order the rules
    gave them (values without a name cannot be told apart by name, and are left out)."""
    out: dict[str, IntArray] = {}
    for key, ids in ctx.values.items():
        name = ctx.outputs[key].name
        if name:
            out[name] = ids
    return out


def _dtype(info: GraphInfo, v: ir.Value | None) -> ir.DataType:
    """The type of ``v`` (declared or inferred), FLOAT where unknown."""
    return (info.dtype(v) if v is not None else None) or ir.DataType.FLOAT


def nothing_to_rescale(ctx: Context) -> str:
    """Why a model has no cofactor at all (no weight depends on any float neuron)."""
    quantized = sorted(
        {n.op_type for n in ctx.info.graph.all_nodes() if n.op_type in QUANTIZED_OPS}
    )
    if quantized:
        return f"nothing to rescale: the model computes with quantized ops ({', '.join(quantized)})"
    if not ctx.values:
        return "nothing to rescale: no float tensor is computed from the inputs"
    return "nothing to rescale: no stored float weight is read by an op the rules know"

"""Insert mode: add the cofactor nodes the analysis asked for.

* A *wrap* of an activation f whose input neurons have cofactors τ makes it
  ``f'(x') = r · f(x'/r)``: ``Mul(1/r)`` before f and ``Mul(r)`` after it, ``r`` the
  part of τ outside the group f commutes with (``sign τ`` for ReLU, ``|τ|`` for an odd
  f, τ otherwise).  Since the incoming weights already scaled ``x' = τx``, f sees
  ``(τ/r)·x`` and ``f'(x') = τ f(x)``.  It is only inserted where some τ is outside
  that group (for ReLU: τ < 0; for an odd f: |τ| ≠ 1; otherwise τ ≠ 1).
* An *edge scale* multiplies one input of one node by ``S = Π τ^e``: an operand a
  node must see unscaled (``S = 1/τ``: the gate of x·σ(x), a normalization's
  input, an op we do not understand), or one branch of a residual Add
  (``S = τ_out/τ_branch``).
* A wrap's ``Mul(τ)`` whose only consumer is an edge scale merges with it; when the
  product is 1 (``x·σ(x)``: ``τ · 1/τ``) neither node is added.

Constants are stored in the compact layout of the neurons (e.g. ``[1, C, 1, 1]``
for NCHW) in the tensor's dtype (ONNX's Mul wants both operands alike), rounded once
from float64; powers of two keep everything exact.  :func:`plan` lists the Muls
without touching the graph, so that :mod:`graphteleport.ranges` can check every
constant against its dtype's range (a float16 ``τ = 1e-6`` would be 0) before
:func:`insert_nodes` adds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphteleport.algebra import group_part, product, with_rank, wrap_needed
from graphteleport.analysis import AnalysisResult, EdgeScale, Factor, Wrap


@dataclass
class InsertStats:
    """What insert mode added to the graph."""

    nodes_added: int = 0
    wraps: int = 0
    edge_scales: int = 0
    merged: int = 0
    names: list[str] = field(default_factory=list)
    # wrapped outputs → their group: f's output is now group_part(τ) ⊙ f(x), not τ ⊙ f(x)
    wrapped: dict[str, str] = field(default_factory=dict)


class FreshNames:
    """Names ``BASE_gtK`` unique among a graph's initializers, inputs and node outputs."""

    def __init__(self, graph: ir.Graph) -> None:
        self.taken = (
            {v.name for v in graph.initializers.values()}
            | {o.name for n in graph for o in n.outputs}
            | {v.name for v in graph.inputs}
        )

    def __call__(self, base: str) -> str:
        k = 0
        while f"{base}_gt{k}" in self.taken:
            k += 1
        name = f"{base}_gt{k}"
        self.taken.add(name)
        return name


def add_initializer(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    """Register ``arr`` as a new initializer called ``name`` and return its value."""
    c = ir.Value(
        name=name,
        shape=ir.Shape(arr.shape),
        type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
        const_value=ir.tensor(arr, name=name),
    )
    graph.register_initializer(c)
    return c


class _Inserter:
    def __init__(self, model: ir.Model, tau: np.ndarray, stats: InsertStats) -> None:
        self.graph = model.graph
        self.tau = tau
        self.stats = stats
        self._name = FreshNames(self.graph)

    def _const(self, value: ir.Value, s: np.ndarray, dtype: ir.DataType) -> ir.Value:
        arr = s.astype(dtype.numpy())  # from float64: rounded once
        return add_initializer(self.graph, self._name(f"{value.name or 'v'}_cofactor"), arr)

    def _mul(self, x: ir.Value, s: np.ndarray, dtype: ir.DataType) -> ir.Node:
        c = self._const(x, s, dtype)
        out = ir.Value(name=self._name(f"{x.name or 'v'}_scaled"), type=x.type, shape=x.shape)
        node = ir.Node("", "Mul", [x, c], outputs=[out], name=self._name("cofactor_mul"))
        self.stats.nodes_added += 1
        self.stats.names.append(node.name or "")
        return node

    def scale_input(self, node: ir.Node, k: int, s: np.ndarray, dtype: ir.DataType) -> None:
        """``node`` reads input k times s (a constant of ``dtype``, the input's)."""
        x = node.inputs[k]
        assert x is not None
        mul = self._mul(x, with_rank(s, len(x.shape)) if x.shape is not None else s, dtype)
        self.graph.insert_before(node, mul)
        node.replace_input_with(k, mul.outputs[0])

    def scale_output(self, node: ir.Node, s: np.ndarray, dtype: ir.DataType) -> None:
        """Every consumer of ``node``'s first output reads it times s (of ``dtype``)."""
        y = node.outputs[0]
        uses = list(y.uses())
        mul = self._mul(y, with_rank(s, len(y.shape)) if y.shape is not None else s, dtype)
        self.graph.insert_after(node, mul)
        for use in uses:
            use.node.replace_input_with(use.idx, mul.outputs[0])


@dataclass(slots=True)
class PlannedMul:
    """One Mul to insert: input ``index`` of ``node`` times ``s`` (``index`` None: every
    consumer of the node's first output); ``s = Π τ[f.ids]^f.exp`` over ``factors``
    (each broadcastable to ``s``), stored as ``dtype``: the scaled value's (declared or
    inferred; ONNX's Mul takes two operands of one type)."""

    node: ir.Node
    index: int | None
    s: np.ndarray
    factors: list[Factor]
    dtype: ir.DataType

    @property
    def value(self) -> ir.Value:
        """The value the Mul scales."""
        return scaled_value(self.node, self.index)


def scaled_value(node: ir.Node, index: int | None) -> ir.Value:
    """The value a Mul on ``node`` scales: its input ``index``, or (None) its first output."""
    v = node.outputs[0] if index is None else node.inputs[index]
    assert v is not None
    return v


@dataclass
class Plan:
    """The Muls insert mode adds for one τ, in order, and what they amount to."""

    muls: list[PlannedMul] = field(default_factory=list)
    wraps: int = 0
    edge_scales: int = 0
    merged: int = 0
    # wrapped outputs → their group: f's output is now group_part(τ) ⊙ f(x), not τ ⊙ f(x)
    wrapped: dict[str, str] = field(default_factory=dict)


def plan(analysis: AnalysisResult, tau: np.ndarray) -> Plan:
    """The Muls the wraps and edge scales need for per-neuron cofactors ``tau``."""
    out = Plan()
    edges = {(id(e.node), e.index): e for e in analysis.edges}
    merged: set[tuple[int, int]] = set()
    for w in analysis.wraps:
        _plan_wrap(out, w, tau, edges, merged)
    for key, e in edges.items():
        if key not in merged:
            _plan_edge(out, e, tau)
    return out


def insert_nodes(model: ir.Model, analysis: AnalysisResult, tau: np.ndarray) -> InsertStats:
    """Add the wraps' and edge scales' Mul nodes for per-neuron cofactors ``tau``."""
    p = plan(analysis, tau)
    stats = InsertStats(
        wraps=p.wraps, edge_scales=p.edge_scales, merged=p.merged, wrapped=p.wrapped
    )
    ins = _Inserter(model, tau, stats)
    for m in p.muls:
        if m.index is None:
            ins.scale_output(m.node, m.s, m.dtype)
        else:
            ins.scale_input(m.node, m.index, m.s, m.dtype)
    return stats


def _plan_wrap(
    out: Plan,
    w: Wrap,
    tau: np.ndarray,
    edges: dict[tuple[int, int], EdgeScale],
    merged: set[tuple[int, int]],
) -> None:
    """``r · f(x'/r)`` with ``r`` the part of τ outside f's group (``sign τ`` for the
    ReLU family, ``|τ|`` for odd f, τ otherwise; :func:`~graphteleport.algebra.
    group_part`): f then sees ``g ⊙ x`` and gives ``g ⊙ f(x)``, ``g = τ/r``, and the
    ``Mul(r)`` after it restores ``τ ⊙ f(x)``.  A ReLU wrap's constants are ±1, which a
    positive teleport of the model leaves alone (canonical forms rely on it)."""
    if not wrap_needed(tau[w.ids], w.group):
        return
    node = w.node
    out.wraps += 1
    out.wrapped[node.outputs[0].name or ""] = w.group
    t = product([Factor(w.ids, 1)], tau)
    rest = t / group_part(t, w.group)  # exact: a division by |t|, ±1 or 1
    moving = [] if w.group == "positive" else [Factor(w.ids, 1)]  # what |rest| follows
    pre = [Factor(f.ids, -f.exp) for f in moving]
    out.muls.append(PlannedMul(node, 0, 1.0 / rest, pre, w.input_dtype))
    extra: list[Factor] = []
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and (id(uses[0].node), uses[0].idx) in edges:
        key = (id(uses[0].node), uses[0].idx)
        merged.add(key)
        out.merged += 1
        extra = list(edges[key].factors)
    # the whole τ (any): the factors multiplied in order, as for any other Mul
    post = product(moving + extra, tau) if w.group == "any" else rest * product(extra, tau)
    if np.any(post != 1):
        out.muls.append(PlannedMul(node, None, post, moving + extra, w.output_dtype))


def _plan_edge(out: Plan, e: EdgeScale, tau: np.ndarray) -> None:
    s = product(e.factors, tau)
    if np.any(s != 1):
        out.edge_scales += 1
        out.muls.append(PlannedMul(e.node, e.index, s, list(e.factors), e.dtype))

"""Insert mode: add the cofactor nodes the analysis asked for.

* A *wrap* of an activation f whose input neurons have cofactors τ makes it
  ``f'(x') = τ · f(x'/τ)``: ``Mul(1/τ)`` before f and ``Mul(τ)`` after it.  Since
  the incoming weights already scaled ``x' = τx``, ``f'(x') = τ f(x)``.  It is only
  inserted where some τ is outside the group f commutes with (for ReLU: τ < 0;
  for an odd f: |τ| ≠ 1; otherwise τ ≠ 1).
* An *edge scale* multiplies one input of one node by ``S = Π τ^e``: an operand a
  node must see unscaled (``S = 1/τ``: the gate of x·σ(x), a normalization's
  input, an op we do not understand), or one branch of a residual Add
  (``S = τ_out/τ_branch``).
* A wrap's ``Mul(τ)`` whose only consumer is an edge scale merges with it; when the
  product is 1 (``x·σ(x)``: ``τ · 1/τ``) neither node is added.

Constants are stored in the compact layout of the neurons (e.g. ``[1, C, 1, 1]``
for NCHW) in the tensor's dtype; powers of two keep everything exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphteleport.analysis.constraints import EdgeScale, Factor, Wrap
from graphteleport.analysis.context import align
from graphteleport.analysis.driver import Analysis


@dataclass
class InsertStats:
    """What insert mode added to the graph."""

    nodes_added: int = 0
    wraps: int = 0
    edge_scales: int = 0
    merged: int = 0
    names: list[str] = field(default_factory=list)
    unscaled: list[str] = field(default_factory=list)  # wrapped outputs: now f(x), not τ f(x)


def _needed(t: np.ndarray, group: str) -> bool:
    if group == "positive":
        return bool(np.any(t < 0))
    if group == "sign":
        return bool(np.any(np.abs(t) != 1))
    return bool(np.any(t != 1))


def _product(factors: list[Factor], tau: np.ndarray) -> np.ndarray:
    s: np.ndarray = np.ones((), dtype=np.float64)
    for f in factors:
        s = s * tau[f.ids] ** f.exp
    return s


class _Inserter:
    def __init__(self, model: ir.Model, tau: np.ndarray, stats: InsertStats) -> None:
        self.graph = model.graph
        self.tau = tau
        self.stats = stats
        self.names = (
            {v.name for v in self.graph.initializers.values()}
            | {o.name for n in self.graph for o in n.outputs}
            | {v.name for v in self.graph.inputs}
        )

    def _name(self, base: str) -> str:
        k = 0
        while f"{base}_gt{k}" in self.names:
            k += 1
        name = f"{base}_gt{k}"
        self.names.add(name)
        return name

    def _const(self, value: ir.Value, s: np.ndarray) -> ir.Value:
        dtype = value.dtype or ir.DataType.FLOAT
        arr = s.astype(dtype.numpy())
        name = self._name(f"{value.name or 'v'}_cofactor")
        c = ir.Value(
            name=name,
            shape=ir.Shape(arr.shape),
            type=ir.TensorType(dtype),
            const_value=ir.tensor(arr, name=name),
        )
        self.graph.register_initializer(c)
        return c

    def _mul(self, x: ir.Value, s: np.ndarray) -> ir.Node:
        c = self._const(x, s)
        out = ir.Value(name=self._name(f"{x.name or 'v'}_scaled"), type=x.type, shape=x.shape)
        node = ir.Node("", "Mul", [x, c], outputs=[out], name=self._name("cofactor_mul"))
        self.stats.nodes_added += 1
        self.stats.names.append(node.name or "")
        return node

    def scale_input(self, node: ir.Node, k: int, s: np.ndarray) -> None:
        """``node`` reads input k times s."""
        x = node.inputs[k]
        assert x is not None
        mul = self._mul(x, align(s, len(x.shape or ())) if x.shape is not None else s)
        self.graph.insert_before(node, mul)
        node.replace_input_with(k, mul.outputs[0])

    def scale_output(self, node: ir.Node, s: np.ndarray) -> None:
        """Every consumer of ``node``'s first output reads it times s."""
        y = node.outputs[0]
        uses = list(y.uses())
        mul = self._mul(y, align(s, len(y.shape or ())) if y.shape is not None else s)
        self.graph.insert_after(node, mul)
        for use in uses:
            use.node.replace_input_with(use.idx, mul.outputs[0])


def insert_nodes(model: ir.Model, analysis: Analysis, tau: np.ndarray) -> InsertStats:
    """Add the wraps' and edge scales' Mul nodes for per-neuron cofactors ``tau``."""
    stats = InsertStats()
    ins = _Inserter(model, tau, stats)
    edges = {(id(e.node), e.index): e for e in analysis.ctx.c.edges}
    merged: set[tuple[int, int]] = set()
    for w in analysis.ctx.c.wraps:
        _apply_wrap(ins, w, edges, merged)
    for key, e in edges.items():
        if key not in merged:
            _apply_edge(ins, e)
    return stats


def _apply_wrap(
    ins: _Inserter, w: Wrap, edges: dict[tuple[int, int], EdgeScale], merged: set[tuple[int, int]]
) -> None:
    t = ins.tau[w.ids]
    if not _needed(t, w.group):
        return
    node: ir.Node = w.node  # type: ignore[assignment]
    ins.stats.wraps += 1
    ins.stats.unscaled.append(node.outputs[0].name or "")
    ins.scale_input(node, 0, 1.0 / t)
    post = t
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and (id(uses[0].node), uses[0].idx) in edges:
        key = (id(uses[0].node), uses[0].idx)
        merged.add(key)
        ins.stats.merged += 1
        post = post * _product(edges[key].factors, ins.tau)
    if np.any(post != 1):
        ins.scale_output(node, post)


def _apply_edge(ins: _Inserter, e: EdgeScale) -> None:
    s = _product(e.factors, ins.tau)
    if np.any(s != 1):
        ins.stats.edge_scales += 1
        ins.scale_input(e.node, e.index, s)  # type: ignore[arg-type]

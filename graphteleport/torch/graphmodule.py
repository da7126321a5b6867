"""Insert mode on any traceable module: the cofactor ``Mul`` nodes in a ``torch.fx.GraphModule``.

Insert mode wraps activations, ``τ · f(x / τ)``, and scales some edges (a normalisation's
input, the operand of an op the rules do not know, …): Muls on the traced ONNX graph
(:func:`planned_muls`).  Where each Mul the module could need sits at the boundary of a
parameter-free leaf activation module called once per data-flow piece (decided for the
module, whatever the draw), :mod:`graphteleport.torch.insert` applies them with forward
hooks on the user's own module.  Elsewhere — functional activations (``F.relu``, ``torch.tanh``,
``x.sigmoid()``), a module called where its hooks cannot tell the calls apart, a LayerNorm's
input, GPT-2's attention — :class:`GraphInsertion` puts them in a GraphModule, which the
teleport returns as ``result.model``:

* the GraphModule the FX path translated (``graph.fx_module``: train and eval mode work as in
  the user's module: the FX path is only taken where its graph, traced in eval mode, also
  computes what the module computes in train mode), or, for a module only the exporter traced,
  ``program.exported_program.module()`` — an inference graph: ``torch.export`` traced eval
  mode, so dropout is gone, BatchNorm is in its eval form and torch refuses ``train()``;
* it has a Mul for every wrap and edge scale the analysis found (constant 1 where the draw
  does not need it), so its buffers depend on the module alone;
* each Mul is ``operator.mul(value, buffer)``, right after the FX node that computes the value
  (a scale of an op's output, for every reader: buffer ``graphteleport_out_<k>``) or right
  before the FX node that reads it (one input: ``graphteleport_in_<k>``); ``state_dict``
  carries the buffers, so a GraphModule built the same way loads it and computes the same
  function bit for bit;
* the GraphModule's parameters and buffers are the user's module's own tensors (rebound where
  the exporter's module holds others), so the in-place rewrite of the weights reaches both and
  an optimizer built on ``model.parameters()`` trains the GraphModule.  The user's module keeps
  the rewritten weights but not the Muls: after an insert-mode teleport that made a
  GraphModule, ``result.model`` is the model.

ONNX nodes lead back to FX nodes through the metadata both frontends write
(``graphteleport.fx_node``; the exporter's ``pkg.torch.onnx.fx_node``), ONNX values by name
(an FX node's result is the value named after it).  A Mul on a value inside one FX node's
translation (SiLU's ``σ(x)``) first lowers that node to FX nodes of its ONNX form
(:func:`lowering_of`); where that is not possible an :class:`~graphteleport.errors.InputError`
names the node, before anything changed.

The analysis is read in one place, :func:`planned_muls`.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import to_torch_dtype
from torch import fx, nn
from torch.nn import functional as F

from graphteleport.algebra import Factor, power, product, wrap_needed
from graphteleport.analysis import AnalysisResult, EdgeScale, Wrap
from graphteleport.errors import InputError
from graphteleport.frontends.fx import FX_NODE
from graphteleport.frontends.torch import TorchGraph, quiet
from graphteleport.insertion import scaled_value
from graphteleport.torch.result import TorchTeleport

_EXPORTED_FX_NODE = re.compile(r"%(\S+) :")  # pkg.torch.onnx.fx_node: "%name : [...] = ..."


@dataclass
class Insertions:
    """What insert mode reads of the analysis: its wraps (``node``, ``ids``, ``group``), edge
    scales (``node``, ``index``, ``factors`` of ``ids`` and ``exp``), and which neurons are
    free (the others' τ is 1, whatever is drawn)."""

    wraps: tuple[Wrap, ...]
    edges: tuple[EdgeScale, ...]
    free: np.ndarray

    @classmethod
    def of(cls, analysis: AnalysisResult) -> Insertions:
        """The one place this module reads the analysis."""
        sol = analysis.solution
        return cls(analysis.wraps, analysis.edges, sol.free[sol.pair])


@dataclass
class Mul:
    """Input ``index`` of ONNX ``node`` times ``s`` (``index`` None: its first output, for
    every reader)."""

    node: ir.Node
    index: int | None
    s: np.ndarray

    @property
    def value(self) -> ir.Value:
        return scaled_value(self.node, self.index)


def planned_muls(analysis: AnalysisResult, tau: np.ndarray) -> list[Mul]:
    """Every Mul insert mode can need, whatever ``tau`` is, so that the GraphModule's
    structure (its buffers) depends on the module alone: a pair per wrap, ``1/τ`` before the
    activation and ``τ`` after it (both 1 where ``tau`` commutes with it), and one per edge
    scale ``S = Π τ^e``, except where every neuron involved is pinned (τ = 1 always).  A
    wrap's output Mul whose only reader is an edge scale is merged with it, and left out
    where the two cancel (``x · σ(x)``: the wrap then always applies)."""
    found = Insertions.of(analysis)
    by_input = {(id(e.node), e.index): e for e in found.edges if _moves(e.factors, found.free)}
    muls: list[Mul] = []
    for w in found.wraps:
        if not found.free[w.ids].any():
            continue
        node = w.node
        edge = _sole_edge(node, by_input)
        exps = [(w.ids, 1), *((f.ids, f.exp) for f in edge.factors)] if edge else []
        t = tau[w.ids]
        if not (wrap_needed(t, w.group) or _cancels(exps)):
            t = np.ones_like(t)
        muls.append(Mul(node, 0, power(t, -1)))
        if edge is not None:
            by_input.pop((id(edge.node), edge.index))
            if _cancels(exps):
                continue
            t = t * product(edge.factors, tau)
        muls.append(Mul(node, None, t))
    muls += [Mul(e.node, e.index, product(e.factors, tau)) for e in by_input.values()]
    return muls


def _moves(factors: Sequence[Factor], free: np.ndarray) -> bool:
    """Some factor of an edge scale involves a free neuron."""
    return any(free[f.ids].any() for f in factors)


def _sole_edge(node: ir.Node, by_input: dict[tuple[int, int], EdgeScale]) -> EdgeScale | None:
    """The edge scale on the only reader of ``node``'s output, if there is one."""
    uses = list(node.outputs[0].uses())
    return by_input.get((id(uses[0].node), uses[0].idx)) if len(uses) == 1 else None


def _cancels(exps: list[tuple[np.ndarray, int]]) -> bool:
    """The factors ``τ[ids]^exp`` multiply to 1 whatever τ is (each ``ids`` to a total 0)."""
    total: dict[tuple[tuple[int, ...], bytes], int] = {}
    for ids, exp in exps:
        key = (ids.shape, ids.tobytes())
        total[key] = total.get(key, 0) + exp
    return bool(total) and not any(total.values())


@dataclass
class Placement:
    """One Mul: FX node ``value``'s result times ``s`` (in the value's rank and ``dtype``), for
    FX node ``reader`` only, or (None) for every reader."""

    value: str
    reader: str | None
    s: np.ndarray
    dtype: torch.dtype

    @property
    def key(self) -> tuple[str, str | None]:
        return self.value, self.reader


class _Inside(Exception):
    """A Mul falls inside the translation of FX node ``name`` (lower it, or give up)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(why)
        self.name = name


class GraphInsertion:
    """The GraphModule of one trace, with the Muls of every teleport so far."""

    def __init__(self, graph: TorchGraph, model: nn.Module) -> None:
        self.graph = graph
        self.gm = graph_module(graph)
        self.nodes: dict[str, fx.Node] = {n.name: n for n in self.gm.graph.nodes}
        self.buffers: dict[tuple[str, str | None], str] = {}
        self.heads: dict[str, fx.Node] = {}  # an FX node's last output Mul
        self.lowered: dict[str, dict[str, fx.Node]] = {}  # FX node -> its ONNX ops' FX nodes
        ref = next(iter(model.parameters()), None)
        self.device = ref.device if ref is not None else torch.device("cpu")

    # -- planning ------------------------------------------------------------------------------
    def place(self, muls: list[Mul]) -> list[Placement]:
        """Each planned Mul's place in the GraphModule, lowering FX nodes where a Mul falls
        inside one; an ``InputError`` where it cannot be placed."""
        for _ in range(len(muls) + 1):
            try:
                return [self._place(m, muls) for m in muls]
            except _Inside as inside:
                self._lower(inside.name, str(inside))
        raise InputError("insert mode: the Muls could not be placed")  # pragma: no cover

    def _place(self, m: Mul, muls: list[Mul]) -> Placement:
        v = m.value
        rank = len(v.shape) if v.shape is not None else m.s.ndim
        s = m.s.reshape((1,) * (rank - m.s.ndim) + m.s.shape) if m.s.ndim < rank else m.s
        value = self._value(v)
        reader = None
        if m.index is not None:
            reader = self._reader(m.node)
            reads = self.heads.get(value.name, value) in reader.all_input_nodes
            if not reads and (value.name, reader.name) not in self.buffers:
                raise InputError(f"insert mode: FX node {reader.name} does not read {value.name}")
            self._check_reads(m, reader, muls)
        dtype = to_torch_dtype(v.dtype or ir.DataType.FLOAT)
        return Placement(value.name, reader.name if reader else None, s, dtype)

    def _reader(self, node: ir.Node) -> fx.Node:
        """The FX node an ONNX node was translated from (or, once lowered, made into)."""
        name = fx_origin(node)
        if name in self.lowered:
            part = self.lowered[name].get(node.op_type)
            if part is None:
                raise InputError(f"insert mode: {node.op_type} of FX node {name} after lowering")
            return part
        found = self.nodes.get(name or "")
        if found is None:
            raise InputError(f"insert mode: {node.op_type} ({node.name}) has no FX node")
        return found

    def _value(self, v: ir.Value) -> fx.Node:
        """The FX node whose result ONNX value ``v`` is."""
        producer = v.producer()
        if producer is None:  # a graph input: the placeholder of its name
            found = self.nodes.get(v.name or "")
            if found is None or found.op != "placeholder":
                raise InputError(f"insert mode: input {v.name!r} has no FX placeholder")
            return found
        name = fx_origin(producer)
        if name in self.lowered:
            return self._reader(producer)
        found = self.nodes.get(v.name or "")
        if found is not None and (found.name == name or name in _input_names(found)):
            return found
        raise _Inside(name or "", f"value {v.name!r} is computed inside FX node {name}")

    def _check_reads(self, m: Mul, reader: fx.Node, muls: list[Mul]) -> None:
        """Every ONNX read of the value by ``reader``'s translation takes the same Mul: the
        FX node reads the value once, for all of them."""
        planned = {(id(p.node), p.index): p.s for p in muls if p.index is not None}
        v = m.value
        for use in v.uses():
            if self._reads_for(use.node, reader):
                s = planned.get((id(use.node), use.idx))
                if s is None or not np.array_equal(s, m.s):
                    raise _Inside(reader.name, f"FX node {reader.name} reads {v.name!r} twice")

    def _reads_for(self, node: ir.Node, reader: fx.Node) -> bool:
        try:
            return self._reader(node) is reader
        except InputError:
            return False

    def _lower(self, name: str, why: str) -> None:
        node = self.nodes.get(name)
        lowering = lowering_of(self.gm, node) if node is not None else None
        if node is None or lowering is None:
            raise InputError(f"insert mode: {why}, which has no lowering")
        parts, result = lowering(self.gm.graph, node)
        node.replace_all_uses_with(result)
        self.gm.graph.erase_node(node)
        self.lowered[name] = parts
        self.nodes.update({n.name: n for n in parts.values()})
        del self.nodes[name]
        self.gm.recompile()

    # -- inserting -----------------------------------------------------------------------------
    def apply(self, placements: list[Placement], result: TorchTeleport) -> None:
        """Insert each placement's Mul and buffer, or multiply the buffer already there (a
        later teleport composes); record each buffer's factor for ``undo``."""
        for p in placements:
            t = torch.as_tensor(np.ascontiguousarray(p.s), dtype=p.dtype, device=self.device)
            name = self.buffers.get(p.key)
            if name is None:
                name = self._insert(p, t)
            else:
                with torch.no_grad():
                    self.gm.get_buffer(name).mul_(t)
            result.factors[name] = (t,)
        if placements:
            self.gm.recompile()
        result.model = self.gm
        result.inserted = sorted(self.buffers.values())

    def _fresh(self, kind: str) -> str:
        """``graphteleport_<kind>_<k>``, numbered on from the buffers made so far and past
        the names the GraphModule has (one teleported before has some)."""
        k = len(self.buffers)
        while hasattr(self.gm, f"graphteleport_in_{k}") or hasattr(
            self.gm, f"graphteleport_out_{k}"
        ):
            k += 1
        return f"graphteleport_{kind}_{k}"

    def _insert(self, p: Placement, t: torch.Tensor) -> str:
        name = self._fresh("out" if p.reader is None else "in")
        self.gm.register_buffer(name, t.clone())
        self.buffers[p.key] = name
        graph = self.gm.graph
        head = self.heads.get(p.value, self.nodes[p.value])
        if p.reader is None:
            with graph.inserting_after(head):
                buffer = graph.get_attr(name)
            with graph.inserting_after(buffer):
                mul = graph.call_function(operator.mul, (head, buffer))
            head.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)
            self.heads[p.value] = mul
        else:
            reader = self.nodes[p.reader]
            with graph.inserting_before(reader):
                buffer = graph.get_attr(name)
                mul = graph.call_function(operator.mul, (head, buffer))
            reader.replace_input_with(head, mul)
        return name


def fx_origin(node: ir.Node) -> str | None:
    """The name of the FX node an ONNX node was translated from (either frontend)."""
    name = node.metadata_props.get(FX_NODE)
    if name is not None:
        return name
    found = _EXPORTED_FX_NODE.match(node.metadata_props.get("pkg.torch.onnx.fx_node", ""))
    return found.group(1) if found else None


def _input_names(node: fx.Node) -> set[str]:
    return {n.name for n in node.all_input_nodes}


def graph_module(graph: TorchGraph) -> fx.GraphModule:
    """The GraphModule to insert into (see the module docstring), holding the traced module's
    own tensors."""
    if graph.fx_module is not None:
        gm: fx.GraphModule = graph.fx_module
    else:
        with quiet():
            gm = graph.program.exported_program.module()
    share_tensors(gm, graph.tensors)
    return gm


def share_tensors(gm: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Rebind each of ``gm``'s parameters and buffers to the tensor of the same name in
    ``tensors`` (the user's module's), where it holds another."""
    for kind, named in (("parameter", gm.named_parameters), ("buffer", gm.named_buffers)):
        for name, t in list(named(remove_duplicate=False)):
            mine = tensors.get(name)
            if mine is None or mine is t:
                continue
            if mine.shape != t.shape:
                raise InputError(f"insert mode: the GraphModule's {name!r} is not the module's")
            owner, _, attr = name.rpartition(".")
            module = gm.get_submodule(owner)
            if kind == "parameter" and isinstance(mine, nn.Parameter):
                module.register_parameter(attr, mine)
            else:
                module.register_buffer(attr, mine)


# -- lowerings: an FX node rewritten as the FX nodes of its ONNX translation ---------------------
Lowering = Callable[[fx.Graph, fx.Node], tuple[dict[str, fx.Node], fx.Node]]


def _lower_silu(graph: fx.Graph, node: fx.Node) -> tuple[dict[str, fx.Node], fx.Node]:
    """``silu(x)`` as ``x · σ(x)``: its ONNX form's Sigmoid and Mul (the result)."""
    x = node.args[0]
    with graph.inserting_before(node):
        s = graph.call_function(torch.sigmoid, (x,))
        y = graph.call_function(operator.mul, (x, s))
    return {"Sigmoid": s, "Mul": y}, y


_SILU_TARGETS = {F.silu, torch.ops.aten.silu.default}


def lowering_of(gm: fx.GraphModule, node: fx.Node) -> Lowering | None:
    """The lowering of an FX node (a function of the graph and the node giving the new FX
    node of each ONNX op, and the result), if it has one: SiLU as module, function or aten op."""
    if node.op == "call_module":
        module: Any = gm.get_submodule(str(node.target))
        return _lower_silu if type(module) is nn.SiLU else None
    if node.op == "call_function" and node.target in _SILU_TARGETS:
        return _lower_silu
    return None

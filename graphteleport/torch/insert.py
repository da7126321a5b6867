"""Insert mode's Muls on a traced module: forward hooks on its activation modules where they
suffice, else a ``torch.fx.GraphModule`` (:mod:`graphteleport.torch.graphmodule`).

Insert mode makes non-equivariant activations compute ``τ_out · f(x / τ_in)``.  Where every
such activation is a parameter-free leaf *module*, each gets two buffers, ``graphteleport_in``
(``1/τ_in``) and ``graphteleport_out`` (``τ_out``), applied by forward hooks on the user's
own module — so ``state_dict()`` carries them and a freshly teleported module that loads it
computes exactly the same function.  A module called at several places in ``forward`` (one
``nn.ReLU`` for a whole block) gets a pair per call (``graphteleport_in_1``, …), applied in
call order; the calls are told apart by the traced data flow and checked against a counted
forward of the example inputs.  A later teleport multiplies the buffers it finds (the
analysis treats them as constants: :func:`graphteleport.torch.tracing.analyze`).

:class:`Insertion` decides, for the module and not for one draw, whether hooks suffice;
where they do not (activations called functionally, a LayerNorm's input, GPT-2's attention)
it places the Muls in a GraphModule, which the teleport returns as ``result.model``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from graphteleport.algebra import power, product, wrap_needed
from graphteleport.analysis import AnalysisResult
from graphteleport.errors import InputError
from graphteleport.frontends.torch import TorchGraph
from graphteleport.torch.graphmodule import GraphInsertion, Insertions, Placement, planned_muls
from graphteleport.torch.result import TorchTeleport
from graphteleport.torch.tracing import IN, OUT
from graphteleport.unionfind import components

Hooks = list[tuple[str, list[np.ndarray], list[np.ndarray]]]  # (module path, 1/τ_in, τ_out)


@dataclass
class InsertPlan:
    """One teleport's Muls: per hooked module one ``(1/τ_in, τ_out)`` pair per call, or the
    Muls' places in the GraphModule (never both)."""

    hooks: Hooks
    placements: list[Placement]


class Insertion:
    """Insert mode's Muls for one traced module: hooks while they suffice, then a
    :class:`~graphteleport.torch.graphmodule.GraphInsertion`, kept for every later teleport
    of the trace."""

    def __init__(self, model: nn.Module, graph: TorchGraph) -> None:
        self.model = model
        self.graph = graph
        self.inserted: GraphInsertion | None = None

    def plan(self, analysis: AnalysisResult, tau: np.ndarray) -> InsertPlan:
        """Hooks where they suffice and no GraphModule was made before, else placements in
        the GraphModule.  Whether hooks suffice is decided for the module, not the draw:
        they must take cofactors that need every wrap and edge scale (−2 on every free
        neuron).  Nothing changes (a lowering keeps the GraphModule's function); an
        ``InputError`` says why neither works."""
        if self.inserted is None:
            try:
                _plan_hooks(self.model, self.graph, analysis, _every_mul(analysis))
                return InsertPlan(_plan_hooks(self.model, self.graph, analysis, tau), [])
            except InputError as e:
                refused = str(e)
        else:
            refused = "insert mode: the module was teleported into a GraphModule before"
        try:
            inserted = self.inserted or GraphInsertion(self.graph, self.model)
            placements = inserted.place(planned_muls(analysis, tau))
        except InputError as e:
            raise InputError(f"{refused}; and in a GraphModule: {e}") from e
        self.inserted = inserted
        return InsertPlan([], placements)

    def apply(self, plan: InsertPlan, result: TorchTeleport) -> None:
        """Hook the planned modules (or compose with their buffers), or insert the placed
        Muls; in the GraphModule case ``result.model`` becomes the GraphModule."""
        for path, s_in, s_out in plan.hooks:
            _hook(self.model.get_submodule(path), path, s_in, s_out, result)
        if self.inserted is not None:
            self.inserted.apply(plan.placements, result)


def _every_mul(analysis: AnalysisResult) -> np.ndarray:
    """Cofactors that need every wrap and edge scale: −2 on every free neuron."""
    return np.where(Insertions.of(analysis).free, -2.0, 1.0)


def _scope(node: ir.Node) -> str | None:
    """The module path a node was traced in (``pkg.torch.onnx.name_scopes``)."""
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    scopes = [s.strip(" '\"") for s in raw.strip("[]").split(",")]
    return scopes[-2] if len(scopes) >= 2 else ""


def _plan_hooks(
    model: nn.Module, graph: TorchGraph, analysis: AnalysisResult, tau: np.ndarray
) -> Hooks:
    """The activation modules to wrap, ``τ_out · f(x / τ_in)``, with their cofactors: one
    ``(1/τ_in, τ_out)`` pair per call of the module (a module called at several places in
    ``forward`` gets one pair per call, in call order)."""
    needed: dict[str, list[ir.Node]] = defaultdict(list)
    for w in analysis.wraps:
        if wrap_needed(tau[w.ids], w.group):
            needed[_module_of(model, w.node)].append(w.node)
    for e in analysis.edges:
        if np.any(product(e.factors, tau) != 1):
            needed[_module_of(model, e.node)].append(e.node)
    members = _members(graph)
    neurons = analysis.neurons
    plan = []
    for path in needed:
        bounds = [_boundary(path, nodes, neurons) for nodes in _calls(members[path])]
        s_in = [power(tau[neurons[x]], -1) for x, _ in bounds]
        s_out = [tau[neurons[y]] for _, y in bounds]
        plan.append((path, s_in, s_out))
    _check_calls(model, graph, plan)
    return plan


def _calls(nodes: Sequence[ir.Node]) -> list[list[ir.Node]]:
    """A module's nodes split into its calls: the connected pieces of its data flow, in
    graph (execution) order."""
    inside = {id(n): k for k, n in enumerate(nodes)}
    pairs = [
        (k, inside[id(producer)])
        for k, node in enumerate(nodes)
        for v in node.inputs
        if v is not None and (producer := v.producer()) is not None and id(producer) in inside
    ]
    edges = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    label = components(len(nodes), edges[:, 0], edges[:, 1])
    pieces: dict[int, list[ir.Node]] = {}
    for k, node in enumerate(nodes):  # labels are each piece's first node: pieces in order
        pieces.setdefault(int(label[k]), []).append(node)
    return list(pieces.values())


def _check_calls(model: nn.Module, graph: TorchGraph, plan: Hooks) -> None:
    """Each hooked module must be called once per piece of its data flow (or, for one piece
    whose output keeps its input's cofactors, any number of times in a chain), since its
    hooks take the pieces' cofactors in call order."""
    ambiguous = [path for path, s_in, s_out in plan if len(s_in) > 1 or not _keeps(s_in, s_out)]
    if not ambiguous:
        return
    counts = _count_calls(model, graph, ambiguous)
    for path, s_in, _ in plan:
        if path in counts and counts[path] != len(s_in):
            raise InputError(
                f"insert mode: module {path!r} is called {counts[path]} times but its traced "
                f"calls form {len(s_in)} separate pieces (calls chained into each other?); give "
                "each call its own module, or use mode='absorb'"
            )


def _keeps(s_in: list[np.ndarray], s_out: list[np.ndarray]) -> bool:
    """Every call's output keeps its input's cofactors (``τ_out = τ_in``)."""
    return all(np.allclose(a * b, 1.0, rtol=1e-12, atol=0.0) for a, b in zip(s_in, s_out))


def _count_calls(model: nn.Module, graph: TorchGraph, paths: list[str]) -> dict[str, int]:
    """How often one eval-mode forward of the example inputs calls each module."""
    counts = dict.fromkeys(paths, 0)

    def counter(path: str) -> Any:
        def hook(_module: nn.Module, _args: tuple[Any, ...]) -> None:
            counts[path] += 1

        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(counter(p)) for p in paths]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            model(*graph.args, **graph.kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts


def _module_of(model: nn.Module, node: ir.Node) -> str:
    path = _scope(node)
    what = f"{node.op_type} ({node.name})"
    if path is None or path == "":
        raise InputError(
            f"insert mode: {what} is not inside an activation module "
            "(a functional call in forward?); use mode='absorb' or an nn.Module"
        )
    module = model.get_submodule(path)
    if list(module.children()) or any(True for _ in module.parameters(recurse=False)):
        raise InputError(
            f"insert mode: {what} is inside module {path!r}, which is not a "
            "parameter-free leaf module; use mode='absorb'"
        )
    return path


def _members(graph: TorchGraph) -> dict[str, list[ir.Node]]:
    out: dict[str, list[ir.Node]] = defaultdict(list)
    for node in graph.model.graph:
        path = _scope(node)
        if path:
            out[path].append(node)
    return out


def _boundary(
    path: str, nodes: Sequence[ir.Node], neurons: Mapping[str, np.ndarray]
) -> tuple[str, str]:
    """The names of the one activation a module reads and the one it returns."""
    inside = {id(n) for n in nodes}
    ins = {
        v.name or ""
        for n in nodes
        for v in n.inputs
        if v is not None
        and (v.name or "") in neurons
        and (v.producer() is None or id(v.producer()) not in inside)
    }
    outs = {
        o.name or ""
        for n in nodes
        for o in n.outputs
        if (o.name or "") in neurons
        and (o.is_graph_output() or any(id(u.node) not in inside for u in o.uses()))
    }
    if len(ins) != 1 or len(outs) != 1:
        raise InputError(
            f"insert mode: module {path!r} does not read and return one tensor per call; "
            "use mode='absorb'"
        )
    return next(iter(ins)), next(iter(outs))


def _hook(
    module: nn.Module,
    path: str,
    s_in: list[np.ndarray],
    s_out: list[np.ndarray],
    result: TorchTeleport,
) -> None:
    """Give ``module`` its cofactor buffers (call 0: ``graphteleport_in``/``_out``, call k > 0:
    ``graphteleport_in_k``/``_out_k``) and, the first time, the hooks that apply them."""
    ref = next(iter(result.model.parameters()), None)
    kw: dict[str, Any] = {
        "dtype": ref.dtype if ref is not None else torch.float32,
        "device": ref.device if ref is not None else None,
    }
    calls = len(s_in)
    fresh = not hasattr(module, IN)
    for k, (a, b) in enumerate(zip(s_in, s_out)):
        names = _buffer_names(k)
        for name, arr in zip(names, (a, b)):
            t = torch.as_tensor(np.ascontiguousarray(arr), **kw)
            if fresh:  # the buffer apart from the factor: a later teleport multiplies it
                module.register_buffer(name, t.clone())
            else:  # teleported before: compose with the cofactors it has
                with torch.no_grad():
                    getattr(module, name).mul_(t)
            result.factors[f"{path}.{name}"] = (t,)
    if fresh:
        module._graphteleport_calls = calls  # type: ignore[assignment]
        module._graphteleport_next = 0  # type: ignore[assignment]
        module.register_forward_pre_hook(_scale_input)
        module.register_forward_hook(_scale_output)
        if calls > 1:
            _reset_on_forward(result.model, module)
    result.hooked.append(path)


def _buffer_names(call: int) -> tuple[str, str]:
    return (IN, OUT) if call == 0 else (f"{IN}_{call}", f"{OUT}_{call}")


def _reset_on_forward(root: nn.Module, module: nn.Module) -> None:
    """Start ``module``'s call count over at every forward of ``root`` (one hook for all)."""
    reset: list[nn.Module] | None = getattr(root, "_graphteleport_reset", None)
    if reset is None:
        reset = []
        root._graphteleport_reset = reset  # type: ignore[assignment]

        def start_over(*_: Any) -> None:
            for m in reset:
                m._graphteleport_next = 0  # type: ignore[assignment]

        root.register_forward_pre_hook(start_over)
    reset.append(module)


def _scale_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    name = _buffer_names(getattr(module, "_graphteleport_next", 0))[0]
    return (args[0] * getattr(module, name), *args[1:])


def _scale_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    call = getattr(module, "_graphteleport_next", 0)
    calls = getattr(module, "_graphteleport_calls", 1)
    module._graphteleport_next = (call + 1) % calls  # type: ignore[assignment]
    return output * getattr(module, _buffer_names(call)[1])

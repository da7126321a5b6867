"""FX frontend: an ``nn.Module`` traced by ``torch.fx.symbolic_trace`` and translated, node by
node, into the graph form the exporter gives (:mod:`graphteleport.frontends.torch`).

Tracing through ``torch.onnx.export`` costs seconds (about 1.7 s for a ResNet-18);
``symbolic_trace`` takes milliseconds, and one interpreted forward of the example inputs
(:class:`Recorder`) gives every value's shape and type, and each BatchNorm module's input
variance (what :func:`~graphteleport.frontends.torch.batchnorm_input_variance` measures, in
the same pass).  The translation keeps the exporter's conventions, so the analysis and the
rewrite cannot tell the two apart:

* parameters and buffers are initializers named by their ``state_dict`` key, wrapping the
  module's own tensors without a copy (a tensor reached under two names, like a tied
  embedding, is one initializer);
* each FX node's result is the value named after the node (the node's *final* value; a
  translation of several ONNX nodes names the others ``<node>_gt<k>``); every ONNX node
  carries the FX node it comes from (:data:`FX_NODE`) and, when it reads a computed value,
  the module path it was traced in (``pkg.torch.onnx.name_scopes``, as the exporter writes
  it, so insert mode's hooks find their modules);
* each op has the torch op's exact semantics: ``nn.Linear`` is ``Gemm(transB=1)`` on 2-D
  inputs and ``Transpose``/``MatMul``/``Add`` on others, BatchNorm its eval form with the
  running statistics as inputs (the analysis reads it in its training form), ``Dropout`` an
  ``Identity`` (a random mask commutes with any per-neuron scale), ``view``/``flatten``/
  ``squeeze``… a ``Reshape`` to the recorded shape, SiLU ``x · Sigmoid(x)`` as exported.
  Functional and method forms (``F.relu``, ``torch.relu``, ``x.relu()``, ``operator.add``,
  ``x.add``) share one translation.

Integers computed from shapes (``x.shape[0]``, ``x.size(1) * 2``) are constants, as in the
exporter's static-shape trace; a number computed from a tensor's *values* (``.item()``) is
not, and stops the translation.  So does every op, module or argument outside the
translation table (:mod:`graphteleport.frontends.fx_ops`), an in-place op whose input is read
again later, a module with forward hooks (FX calls leaf modules without showing what their
hooks do), and a module ``symbolic_trace`` cannot trace (control flow on values, most Hugging
Face models): :func:`trace_fx` raises :class:`Untranslatable`, and
:func:`graphteleport.frontends.torch.trace` falls back to the exporter.
"""

from __future__ import annotations

import inspect
import operator
from collections import Counter
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype
from torch import fx, nn

from graphteleport.analysis import index_graph
from graphteleport.frontends.fx_ops import (
    Attrs,
    Call,
    Inputs,
    Metas,
    TensorMeta,
    Untranslatable,
    handler_of,
    meta_of,
)
from graphteleport.frontends.torch import TorchGraph, as_args, module_tensors, quiet

__all__ = ["FX_NODE", "SCOPES", "TensorMeta", "Translator", "Untranslatable", "trace_fx"]

OPSET = 20  # the exporter's (torch 2.13): Gelu, ReduceMean with its axes as an input
FX_NODE = "graphteleport.fx_node"  # metadata: the FX node an ONNX node was translated from
SCOPES = "pkg.torch.onnx.name_scopes"  # metadata: module path, as the exporter writes it


def trace_fx(model: nn.Module, example_inputs: Any) -> TorchGraph:
    """``model``'s graph form through ``torch.fx`` (see the module docstring); raises
    :class:`Untranslatable` where it has none.  The module is not changed: the recorded
    forward restores its modes, buffers and the random number generators."""
    if _hooked(model):
        raise Untranslatable("the module has forward hooks, which FX does not trace")
    args, kwargs = as_args(example_inputs)
    values, concrete = bind_inputs(model, args, kwargs)
    gm = symbolic_trace(model, concrete)  # in eval mode: see record()
    recorder = record(gm, model, values, (args, kwargs))
    onnx_model = Translator(gm, recorder.records).run()
    graph = TorchGraph(
        onnx_model, None, module_tensors(model), args, kwargs, tracer="fx", fx_module=gm
    )
    graph.index = index_graph(onnx_model, graph.input_shapes)
    graph.bn_var = recorder.batchnorm_variances()
    return graph


def _hooked(model: nn.Module) -> bool:
    """Forward hooks anywhere (global ones too): FX would not see what they compute."""
    glob = torch.nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def bind_inputs(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """``forward``'s arguments in order (defaults filled in) and those that are not tensors,
    which tracing specialises to their values (``concrete_args``)."""
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise Untranslatable(f"forward's arguments: {e}") from e
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if any(p.kind in variadic for p in signature.parameters.values()):
        raise Untranslatable("forward takes *args or **kwargs")
    bound.apply_defaults()
    concrete = {k: v for k, v in bound.arguments.items() if not isinstance(v, torch.Tensor)}
    if any(map(_holds_tensor, concrete.values())):
        raise Untranslatable("an input holds tensors in a container")
    return list(bound.arguments.values()), concrete


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, (tuple, list)) and any(map(_holds_tensor, value))


def symbolic_trace(model: nn.Module, concrete: dict[str, Any]) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` of the module in eval mode (as the exporter traces it;
    modes restored after); any failure is :class:`Untranslatable`."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with quiet():
            model.eval()
            return fx.symbolic_trace(model, concrete_args=concrete or None)
    except Exception as e:
        raise Untranslatable(f"torch.fx cannot trace it: {brief(e)}") from e
    finally:
        for m, mode in modes:
            m.training = mode


def brief(e: BaseException | None) -> str:
    """An exception in one short line: its type and the start of its message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


# -- the recorded forward ------------------------------------------------------------------------
def describe(value: Any) -> Any:
    """A value's record: a tensor's :class:`TensorMeta` (a tuple of them for a sequence of
    tensors); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(describe(v) for v in value)
    return value


def is_tensor_like(record: Any) -> bool:
    """A tensor's record, or a tuple holding one (the result of ``split``)."""
    if isinstance(record, TensorMeta):
        return True
    return isinstance(record, tuple) and any(isinstance(r, TensorMeta) for r in record)


class Recorder(fx.Interpreter):
    """One forward through the GraphModule: each node's record (:func:`describe`) and, with
    ``measure``, the biased per-channel variance of each BatchNorm module's input."""

    def __init__(self, gm: fx.GraphModule, measure: bool) -> None:
        super().__init__(gm)
        self.records: dict[str, Any] = {}
        self.measure = measure
        self.variances: dict[str, np.ndarray] = {}
        self.calls: Counter[str] = Counter()
        self.result: Any = None  # what the forward returned

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.records[n.name] = describe(out)
        return out

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self.fetch_attr(target)
        if self.measure and isinstance(module, nn.modules.batchnorm._BatchNorm) and args:
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            self.variances[target] = x.double().var(dim=dims, unbiased=False).cpu().numpy()
            self.calls[target] += 1
        return super().call_module(target, args, kwargs)

    def batchnorm_variances(self) -> dict[str, np.ndarray]:
        """Per BatchNorm module called once: its input's variance (a module called twice has
        none, as in :func:`~graphteleport.frontends.torch.batchnorm_input_variance`)."""
        return {path: v for path, v in self.variances.items() if self.calls[path] == 1}


def record(
    gm: fx.GraphModule,
    model: nn.Module,
    values: list[Any],
    call: tuple[tuple[Any, ...], dict[str, Any]],
) -> Recorder:
    """Run ``gm`` on ``values`` (recorded) and the module itself on its example inputs
    ``call``, both from one random state, in train mode (BatchNorm input variances measured)
    or, where train mode fails (a BatchNorm over one value per channel), in eval mode.  The two
    must agree, or FX's graph is not the module's function: :class:`Untranslatable`.  This
    catches a tensor mutated through an alias (FX records ``x += y`` as ``x + y``) and, since
    the graph was traced in eval mode, Python that reads ``self.training`` (a functional
    dropout, an ``if``), which FX fixes at its traced value.  Modes, buffers and random number
    generators are restored."""
    failure: Exception | None = None
    for train in (True, False):
        try:
            recorder, expected = _run(gm, model, values, call, train)
        except Exception as e:
            failure = e
            continue
        if not agree(recorder.result, expected):
            raise Untranslatable("the traced graph computes other values than the module")
        return recorder
    raise Untranslatable(f"the module does not run: {brief(failure)}")


def _run(
    gm: fx.GraphModule,
    model: nn.Module,
    values: list[Any],
    call: tuple[tuple[Any, ...], dict[str, Any]],
    train: bool,
) -> tuple[Recorder, Any]:
    modules = [*model.modules(), gm]
    modes = [(m, m.training) for m in modules]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    tensors = [*model.parameters(), *model.buffers()]
    devices = sorted({t.device.index for t in tensors if t.device.type == "cuda"})
    recorder = Recorder(gm, measure=train)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), quiet():
            for m in modules:
                m.training = train
            states = [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]
            recorder.result = recorder.run(*values)
            _restore(buffers)
            torch.set_rng_state(states[0])
            for d, state in zip(devices, states[1:]):
                torch.cuda.set_rng_state(state, d)
            expected = model(*call[0], **call[1])
    finally:
        for m, mode in modes:
            m.training = mode
        _restore(buffers)
    return recorder, expected


def _restore(buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)


def agree(a: Any, b: Any) -> bool:
    """Two forwards' outputs hold the same values: tensors to rounding (1e-5 relative, the
    same kernels ran), sequences and dicts item by item, anything else equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and _close(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(agree, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(agree(a[k], b[k]) for k in a)
    try:
        return bool(a is b or a == b)
    except Exception:
        return False


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or not a.is_floating_point() or a.numel() == 0:
        return a.dtype == b.dtype and torch.equal(a, b)
    scale = float(a.detach().nan_to_num(0.0, 0.0, 0.0).abs().max())
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale, equal_nan=True)


# -- the translation ------------------------------------------------------------------------------
_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "get_device"})
_PURE = frozenset(
    {
        operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
        operator.truediv, operator.mod, operator.neg, operator.pow, operator.eq, operator.ne,
        operator.lt, operator.le, operator.gt, operator.ge, operator.not_,
    }
)  # fmt: skip
"""Python operations that, on constants, give constants."""


class Translator:
    """Builds the onnx_ir model of one GraphModule from its recorded forward."""

    def __init__(self, gm: fx.GraphModule, records: dict[str, Any]) -> None:
        self.gm = gm
        self.records = records
        self.order = {n: k for k, n in enumerate(gm.graph.nodes)}
        self.nodes: list[ir.Node] = []
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self.initializers: dict[int, ir.Value] = {}  # by id of the torch tensor
        self.values: dict[str, ir.Value | tuple[ir.Value, ...]] = {}  # tensor nodes' values
        self.static: dict[str, Any] = {}  # constant nodes' Python values
        self.used: set[str] = {n.name for n in gm.graph.nodes}
        self.current: fx.Node | None = None

    def run(self) -> ir.Model:
        for node in self.gm.graph.nodes:
            self.visit(node)
        graph = ir.Graph(
            self.inputs,
            self.outputs,
            nodes=self.nodes,
            initializers=list(self.initializers.values()),
            opset_imports={"": OPSET},
            name="main_graph",
        )
        _check_unique_names(graph)
        return ir.Model(graph, ir_version=10, producer_name="graphteleport.fx")

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self._placeholder(node)
        elif node.op == "get_attr":
            self._get_attr(node)
        elif node.op == "output":
            self._output(node)
        elif self._is_static(node):
            self.static[node.name] = self.records[node.name]
        elif is_tensor_like(self.records.get(node.name)) or node.users:
            self._call(node)
        # else: a call whose non-tensor result nothing reads (FX's argument asserts)

    def _is_static(self, node: fx.Node) -> bool:
        """The node computes a constant: a shape query, or plain Python on constants."""
        if is_tensor_like(self.records.get(node.name)):
            return False
        if node.op == "call_function" and node.target is getattr:
            return len(node.args) == 2 and node.args[1] in _SHAPE_ATTRS
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return True
        return (
            node.op == "call_function"
            and node.target in _PURE
            and all(n.name in self.static for n in node.all_input_nodes)
        )

    def _placeholder(self, node: fx.Node) -> None:
        meta = self.records[node.name]
        if not isinstance(meta, TensorMeta):
            self.static[node.name] = meta
            return
        v = _value(node.name, meta)
        self.inputs.append(v)
        self.values[node.name] = v

    def _get_attr(self, node: fx.Node) -> None:
        target = str(node.target)
        attr = _fetch(self.gm, target)
        if isinstance(attr, torch.Tensor):
            self.values[node.name] = self.initializer(attr, target)
        else:
            self.static[node.name] = attr

    def initializer(self, t: torch.Tensor, name: str) -> ir.Value:
        """The initializer of module tensor ``t`` (first reached as ``name``), no copy."""
        known = self.initializers.get(id(t))
        if known is None:
            known = ir.Value(
                name=name,
                shape=ir.Shape(tuple(t.shape)),
                type=ir.TensorType(from_torch_dtype(t.dtype)),
                const_value=TorchTensor(t, name=name),
            )
            self.initializers[id(t)] = known
            self.used.add(name)
        return known

    def _output(self, node: fx.Node) -> None:
        leaves: list[Any] = []
        fx.node.map_aggregate(node.args[0], leaves.append)
        for leaf in leaves:
            found = self.values.get(leaf.name) if isinstance(leaf, fx.Node) else None
            if found is None:
                raise Untranslatable(f"an output is not a tensor ({leaf!r})")
            for v in found if isinstance(found, tuple) else [found]:
                if v in self.outputs or v.is_graph_input() or v.is_initializer():
                    self.current = leaf
                    v = self.emit("Identity", [v], outputs=[meta_of(v)])[0]
                self.outputs.append(v)

    def _call(self, node: fx.Node) -> None:
        handler, module = handler_of(self.gm, node)
        if handler is None:
            raise Untranslatable(f"no translation for {describe_node(node)}")
        for n in node.all_input_nodes:
            if n.name not in self.values and n.name not in self.static:
                raise Untranslatable(f"{node.name} reads {n.name}, computed from tensor values")
        self.current = node
        start = len(self.nodes)
        result = handler(Call(self, node, module))
        if isinstance(result, tuple):
            self.values[node.name] = result
            return
        if result.producer() not in self.nodes[start:]:
            result = self.emit("Identity", [result])
        result.name = node.name  # the node's final value carries its name
        self.values[node.name] = result

    # -- what handlers build with --------------------------------------------------------------
    def fresh(self, base: str) -> str:
        k = 0
        while f"{base}_gt{k}" in self.used:
            k += 1
        self.used.add(f"{base}_gt{k}")
        return f"{base}_gt{k}"

    def emit(self, op: str, inputs: Inputs, attrs: Attrs = None, outputs: Metas = None) -> Any:
        """Append an ONNX node; its outputs are typed by ``outputs`` (default: the current FX
        node's record).  Returns the one output, or a tuple of them when ``outputs`` is given."""
        node = self._node()
        metas = outputs if outputs is not None else [self.records[node.name]]
        values = [_value(self.fresh(node.name), m) for m in metas]
        props = {FX_NODE: node.name}
        if any(v is not None and not _constant(v) for v in inputs):
            props[SCOPES] = repr(scopes(node))
        attributes = [attribute(k, v) for k, v in (attrs or {}).items()]
        self.nodes.append(
            ir.Node("", op, inputs, attributes, outputs=values,
                    name=self.fresh(f"node_{node.name}"), metadata_props=props)
        )  # fmt: skip
        return tuple(values) if outputs is not None else values[0]

    def const(self, array: np.ndarray) -> ir.Value:
        """A ``Constant`` node's value (its ``const_value`` set, so the analysis reads it)."""
        name = self.fresh(f"{self._node().name}_const")
        tensor = ir.tensor(array, name=name)
        v = ir.Value(
            name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )  # fmt: skip
        self.nodes.append(
            ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)], outputs=[v], name=name)
        )
        return v

    def _node(self) -> fx.Node:
        assert self.current is not None
        return self.current

    def static_value(self, arg: Any) -> Any:
        """The Python value of an argument that must be a constant (nested lists included)."""

        def value_of(n: fx.Node) -> Any:
            if n.name not in self.static:
                raise Untranslatable(f"{self._node().name}: argument {n.name} is not a constant")
            return self.static[n.name]

        return fx.node.map_arg(arg, value_of)


def attribute(name: str, value: Any) -> ir.Attr:
    """An ONNX attribute of a Python value: an int (or bool, or a DataType), a float, a
    string or a list of ints (``ir.node``'s generic conversion costs ~0.2 ms a node)."""
    if isinstance(value, (bool, int)):  # ir.DataType is an int enum
        return ir.AttrInt64(name, int(value))
    if isinstance(value, float):
        return ir.AttrFloat32(name, value)
    if isinstance(value, str):
        return ir.AttrString(name, value)
    return ir.AttrInt64s(name, [int(v) for v in value])


def _check_unique_names(graph: ir.Graph) -> None:
    names = [v.name for v in graph.inputs]
    names += [v.name for v in graph.initializers.values()]
    names += [o.name for n in graph for o in n.outputs]
    if len(set(names)) != len(names):
        raise Untranslatable("a parameter's name is also an FX node's")


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _value(name: str, meta: TensorMeta) -> ir.Value:
    return ir.Value(
        name=name, shape=ir.Shape(meta.shape), type=ir.TensorType(from_torch_dtype(meta.dtype))
    )


def _constant(v: ir.Value) -> bool:
    producer = v.producer()
    return v.is_initializer() or (producer is not None and producer.op_type == "Constant")


def scopes(node: fx.Node) -> list[str]:
    """The exporter's ``name_scopes`` of an FX node: the module path's prefixes, then the node
    (a functional call: the module whose ``forward`` made it; '' at the top)."""
    if node.op == "call_module":
        path = str(node.target)
    else:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
    parts = path.split(".") if path else []
    return ["", *(".".join(parts[: k + 1]) for k in range(len(parts))), node.name]


def describe_node(node: fx.Node) -> str:
    """``call_function relu`` style: what an FX node calls."""
    return f"{node.op} {getattr(node.target, '__name__', None) or node.target}"

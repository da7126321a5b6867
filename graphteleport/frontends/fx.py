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
not, and stops the translation.  So does every op, module or argument outside the tables
(:data:`MODULES`, :data:`FUNCTIONS`, :data:`METHODS`), an in-place op whose input is read
again later, a module with forward hooks (FX calls leaf modules without showing what their
hooks do), and a module ``symbolic_trace`` cannot trace (control flow on values, most Hugging
Face models): :func:`trace_fx` raises :class:`Untranslatable`, and
:func:`graphteleport.frontends.torch.trace` falls back to the exporter.
"""

from __future__ import annotations

import inspect
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype, to_torch_dtype
from torch import fx, nn
from torch.nn import functional as F

from graphteleport.analysis.graphinfo import GraphInfo
from graphteleport.frontends.torch import TorchGraph, as_args, module_tensors, quiet

OPSET = 20  # the exporter's (torch 2.13): Gelu, ReduceMean with its axes as an input
FX_NODE = "graphteleport.fx_node"  # metadata: the FX node an ONNX node was translated from
SCOPES = "pkg.torch.onnx.name_scopes"  # metadata: module path, as the exporter writes it


class Untranslatable(Exception):
    """The module, or one of its FX nodes, has no exact translation here (fall back)."""


@dataclass(frozen=True)
class TensorMeta:
    """What the recorded forward saw of a tensor: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


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
    graph.info = GraphInfo(onnx_model, graph.input_shapes)
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
        handler, module = _handler(self.gm, node)
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

    def emit(
        self,
        op: str,
        inputs: Sequence[ir.Value | None],
        attrs: dict[str, Any] | None = None,
        outputs: Sequence[TensorMeta] | None = None,
    ) -> Any:
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


# -- handlers ------------------------------------------------------------------------------------
_REQUIRED: Any = object()


@dataclass
class Call:
    """One FX call seen by its handler: arguments by position or name, a module's attributes,
    and the translator to emit with.  Position 0 is the tensor operated on (a module's or a
    function's first argument, a method's ``self``)."""

    cx: Translator
    node: fx.Node
    module: nn.Module | None

    @property
    def out(self) -> Any:
        """The record of this call's result."""
        return self.cx.records[self.node.name]

    def arg(self, pos: int, name: str, default: Any = _REQUIRED) -> Any:
        if pos < len(self.node.args):
            return self.node.args[pos]
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        if default is _REQUIRED:
            raise Untranslatable(f"{self.node.name}: argument {name!r} missing")
        return default

    def option(self, name: str, pos: int, default: Any = _REQUIRED) -> Any:
        """A constant setting: the module's attribute ``name``, else the call's argument."""
        if self.module is not None:
            found = getattr(self.module, name, default)
            if found is _REQUIRED:
                raise Untranslatable(f"{self.node.name}: the module has no {name!r}")
            return found
        return self.cx.static_value(self.arg(pos, name, default))

    def input(self, pos: int = 0, name: str = "input") -> ir.Value:
        """A tensor argument's value."""
        arg = self.arg(pos, name)
        v = self.cx.values.get(arg.name) if isinstance(arg, fx.Node) else None
        if not isinstance(v, ir.Value):
            raise Untranslatable(f"{self.node.name}: argument {name!r} is not a tensor")
        return v

    def maybe_input(self, pos: int, name: str) -> ir.Value | None:
        return None if self.arg(pos, name, None) is None else self.input(pos, name)

    def param(self, name: str) -> ir.Value | None:
        """The module's tensor attribute ``name`` as an initializer (None when unset)."""
        assert self.module is not None
        t = getattr(self.module, name)
        return None if t is None else self.cx.initializer(t, f"{self.node.target}.{name}")

    def inplace(self, pos: int) -> None:
        """An in-place call (``inplace=True``) is a value op only when nothing reads its input
        after it (FX's data flow does not show the mutation)."""
        if self.option("inplace", pos, False):
            self.check_inplace()

    def check_inplace(self) -> None:
        x = self.node.args[0]
        order = self.cx.order
        if not isinstance(x, fx.Node) or x.op == "get_attr":
            raise Untranslatable(f"{self.node.name}: in-place op on a module tensor")
        if any(u is not self.node and order[u] > order[self.node] for u in x.users):
            raise Untranslatable(f"{self.node.name}: in-place op on a value read again later")

    def emit(
        self, op: str, inputs: Sequence[ir.Value | None], attrs: dict[str, Any] | None = None
    ) -> ir.Value:
        return self.cx.emit(op, inputs, attrs)  # type: ignore[no-any-return]

    def emit_typed(
        self, op: str, inputs: Sequence[ir.Value | None], meta: TensorMeta, **attrs: Any
    ) -> ir.Value:
        """An internal value of another shape or type than the call's result."""
        return self.cx.emit(op, inputs, attrs, outputs=[meta])[0]  # type: ignore[no-any-return]

    def ints(self, values: Sequence[int]) -> ir.Value:
        return self.cx.const(np.asarray(list(values), dtype=np.int64))

    def scalar(self, x: float, like: ir.Value) -> ir.Value:
        dtype = like.dtype.numpy() if like.dtype is not None else np.float32
        return self.cx.const(np.asarray(x, dtype=dtype))


Handler = Callable[[Call], Any]


def shape(v: ir.Value) -> tuple[int, ...]:
    assert v.shape is not None
    return tuple(d if isinstance(d, int) else -1 for d in v.shape)


def meta_of(v: ir.Value) -> TensorMeta:
    assert v.dtype is not None
    return TensorMeta(shape(v), to_torch_dtype(v.dtype))


def _tuple(x: Any, d: int) -> list[int]:
    """An int or a sequence, as ``d`` ints (torch's ``_ntuple``)."""
    if isinstance(x, int):
        return [x] * d
    out = [int(v) for v in x]
    if len(out) == 1:
        return out * d
    if len(out) != d:
        raise Untranslatable(f"expected {d} values, got {out}")
    return out


def _handler(gm: fx.GraphModule, node: fx.Node) -> tuple[Handler | None, nn.Module | None]:
    """The node's handler (None: none), and the module it calls."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        for cls in type(module).__mro__:
            if cls in MODULES:  # only where the class's own forward runs
                found = MODULES[cls] if type(module).forward is cls.forward else None
                return found, module
        return None, module
    if node.op == "call_function":
        try:
            return FUNCTIONS.get(node.target), None
        except TypeError:  # unhashable target
            return None, None
    if node.op == "call_method":
        return METHODS.get(str(node.target)), None
    return None, None


def _activation(
    op: str, *options: tuple[str, str, int, Any], inplace: int | None = None
) -> Handler:
    """A one-input op with attributes ``(attribute, torch name, position, default)``, each of
    its default's type (``LeakyReLU(0)``'s slope is the float 0.0)."""

    def translate(call: Call) -> ir.Value:
        if inplace is not None:
            call.inplace(inplace)
        attrs = {a: type(d)(call.option(name, pos, d)) for a, name, pos, d in options}
        return call.emit(op, [call.input()], attrs)

    return translate


def _identity(inplace: int | None = None) -> Handler:
    """Identity (Dropout: a random mask commutes with every per-neuron scale)."""
    return _activation("Identity", inplace=inplace)


def _softmax(op: str) -> Handler:
    def translate(call: Call) -> ir.Value:
        dim = call.option("dim", 1, None)
        if dim is None or (call.module is None and call.option("dtype", 3, None) is not None):
            raise Untranslatable(f"{call.node.name}: softmax without dim, or with a dtype")
        return call.emit(op, [call.input()], {"axis": int(dim)})

    return translate


def _clip(lo: tuple[str, int, Any], hi: tuple[str, int, Any], inplace: int | None) -> Handler:
    """Clip to constant bounds (Hardtanh, ReLU6, clamp); a bound None is open."""

    def translate(call: Call) -> ir.Value:
        if inplace is not None:
            call.inplace(inplace)
        x = call.input()
        bounds = [call.option(*lo), call.option(*hi)]
        return call.emit("Clip", [x, *(None if b is None else call.scalar(b, x) for b in bounds)])

    return translate


def _relu6(call: Call) -> ir.Value:
    call.inplace(1)
    x = call.input()
    return call.emit("Clip", [x, call.scalar(0.0, x), call.scalar(6.0, x)])


def _silu(call: Call) -> ir.Value:
    """``x · σ(x)``, as the exporter writes SiLU."""
    call.inplace(1)
    x = call.input()
    return call.emit("Mul", [x, call.emit("Sigmoid", [x])])


def _linear(call: Call, x: ir.Value, w: ir.Value, b: ir.Value | None) -> ir.Value:
    """``x Wᵀ + b``: Gemm(transB=1) on a 2-D input, else Transpose, MatMul and Add."""
    if len(shape(x)) == 2:
        return call.emit("Gemm", [x, w, *([b] if b is not None else [])], {"transB": 1})
    out, fan_in = shape(w)
    wt = call.emit_typed("Transpose", [w], TensorMeta((fan_in, out), meta_of(w).dtype), perm=[1, 0])
    y = call.emit("MatMul", [x, wt])
    return y if b is None else call.emit("Add", [y, b])


def _linear_module(call: Call) -> ir.Value:
    w = call.param("weight")
    assert w is not None
    return _linear(call, call.input(), w, call.param("bias"))


def _linear_function(call: Call) -> ir.Value:
    return _linear(call, call.input(), call.input(1, "weight"), call.maybe_input(2, "bias"))


def _conv_pads(padding: Any, kernel: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """ONNX pads (begins, then ends) of torch's ``padding``: ints, ``'valid'`` or ``'same'``
    (the odd one out of a total ``dilation·(k − 1)`` at the end, as torch pads)."""
    d = len(kernel)
    if padding == "valid":
        return [0] * (2 * d)
    if padding == "same":
        total = [dl * (k - 1) for k, dl in zip(kernel, dilation)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    p = _tuple(padding, d)
    return [*p, *p]


def _conv(
    call: Call, x: ir.Value, w: ir.Value, b: ir.Value | None, settings: dict[str, Any]
) -> ir.Value:
    kernel = list(shape(w)[2:])
    d = len(kernel)
    if len(shape(x)) != d + 2:
        raise Untranslatable(f"{call.node.name}: unbatched convolution")
    dilation = _tuple(settings["dilation"], d)
    attrs = {
        "group": int(settings["groups"]),
        "kernel_shape": kernel,
        "strides": _tuple(settings["stride"], d),
        "pads": _conv_pads(settings["padding"], kernel, dilation),
        "dilations": dilation,
    }
    return call.emit("Conv", [x, w, *([b] if b is not None else [])], attrs)


_CONV_SETTINGS = (("stride", 3, 1), ("padding", 4, 0), ("dilation", 5, 1), ("groups", 6, 1))


def _conv_module(call: Call) -> ir.Value:
    assert call.module is not None
    if call.module.padding_mode != "zeros":
        raise Untranslatable(f"{call.node.name}: padding_mode {call.module.padding_mode!r}")
    settings = {name: call.option(name, pos, d) for name, pos, d in _CONV_SETTINGS}
    w = call.param("weight")
    assert w is not None
    return _conv(call, call.input(), w, call.param("bias"), settings)


def _conv_function(call: Call) -> ir.Value:
    settings = {name: call.option(name, pos, d) for name, pos, d in _CONV_SETTINGS}
    x, w = call.input(), call.input(1, "weight")
    return _conv(call, x, w, call.maybe_input(2, "bias"), settings)


def _conv_transpose_module(call: Call) -> ir.Value:
    m = call.module
    assert isinstance(m, nn.modules.conv._ConvTransposeNd)
    if m.padding_mode != "zeros" or call.arg(1, "output_size", None) is not None:
        raise Untranslatable(f"{call.node.name}: ConvTranspose with output_size or padding_mode")
    w = call.param("weight")
    assert w is not None
    kernel = list(shape(w)[2:])
    d = len(kernel)
    attrs = {
        "group": m.groups,
        "kernel_shape": kernel,
        "strides": _tuple(m.stride, d),
        "pads": _conv_pads(m.padding, kernel, _tuple(m.dilation, d)),
        "dilations": _tuple(m.dilation, d),
        "output_padding": _tuple(m.output_padding, d),
    }
    b = call.param("bias")
    return call.emit("ConvTranspose", [call.input(), w, *([b] if b is not None else [])], attrs)


def _batchnorm(call: Call, inputs: list[ir.Value | None], eps: float, momentum: Any) -> ir.Value:
    """BatchNorm's eval form, ``γ (x − mean)/sqrt(var + ε) + β`` over axis 1."""
    if any(v is None for v in inputs) or len(shape(inputs[0])) < 2:  # type: ignore[arg-type]
        raise Untranslatable(f"{call.node.name}: BatchNorm without affine or running statistics")
    m = 0.1 if momentum is None else float(momentum)
    return call.emit("BatchNormalization", inputs, {"epsilon": float(eps), "momentum": 1 - m})


def _batchnorm_module(call: Call) -> ir.Value:
    m = call.module
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    names = ("weight", "bias", "running_mean", "running_var")
    return _batchnorm(call, [call.input(), *map(call.param, names)], m.eps, m.momentum)


def _batchnorm_function(call: Call) -> ir.Value:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
    eps)`` with ``training=False``."""
    if call.option("training", 5, False):
        raise Untranslatable(f"{call.node.name}: functional batch_norm in training mode")
    stats = [call.maybe_input(k, n) for k, n in ((3, "weight"), (4, "bias"))]
    stats += [call.maybe_input(k, n) for k, n in ((1, "running_mean"), (2, "running_var"))]
    eps, momentum = call.option("eps", 7, 1e-5), call.option("momentum", 6, 0.1)
    return _batchnorm(call, [call.input(), *stats], eps, momentum)


def _layernorm(
    call: Call, x: ir.Value, w: ir.Value | None, b: ir.Value | None, dims: Any, eps: float
) -> ir.Value:
    if w is None:
        raise Untranslatable(f"{call.node.name}: LayerNorm without a weight")
    axis = -1 if isinstance(dims, int) else -len(dims)
    inputs = [x, w, *([b] if b is not None else [])]
    return call.emit("LayerNormalization", inputs, {"axis": axis, "epsilon": float(eps)})


def _layernorm_module(call: Call) -> ir.Value:
    assert isinstance(call.module, nn.LayerNorm)
    w, b = call.param("weight"), call.param("bias")
    return _layernorm(call, call.input(), w, b, call.module.normalized_shape, call.module.eps)


def _layernorm_function(call: Call) -> ir.Value:
    w, b = call.maybe_input(2, "weight"), call.maybe_input(3, "bias")
    dims, eps = call.option("normalized_shape", 1), call.option("eps", 4, 1e-5)
    return _layernorm(call, call.input(), w, b, dims, eps)


def _embedding_module(call: Call) -> ir.Value:
    assert isinstance(call.module, nn.Embedding)
    if call.module.max_norm is not None:
        raise Untranslatable(f"{call.node.name}: Embedding with max_norm")
    return call.emit("Gather", [call.param("weight"), call.input()], {"axis": 0})


def _embedding_function(call: Call) -> ir.Value:
    if call.option("max_norm", 3, None) is not None:
        raise Untranslatable(f"{call.node.name}: embedding with max_norm")
    return call.emit("Gather", [call.input(1, "weight"), call.input()], {"axis": 0})


def _pool(op: str, d: int, options: dict[str, Any], call: Call, **extra: Any) -> ir.Value:
    """Max or average pooling over ``d`` axes.  ``ceil_mode`` only where it changes no
    output size (torch and ONNX place a ceil-mode window that starts in the padding
    differently)."""
    x = call.input()
    if len(shape(x)) != d + 2:
        raise Untranslatable(f"{call.node.name}: unbatched pooling")
    kernel = _tuple(options["kernel_size"], d)
    stride = _tuple(options["stride"] or kernel, d)
    pads = _tuple(options["padding"], d)
    dilation = _tuple(options.get("dilation", 1), d)
    spatial = shape(x)[2:]
    floor = [(n + 2 * p - dl * (k - 1) - 1) // s + 1 for n, p, dl, k, s in
             zip(spatial, pads, dilation, kernel, stride)]  # fmt: skip
    if floor != list(call.out.shape[2:]):
        raise Untranslatable(f"{call.node.name}: ceil_mode changes the output size")
    attrs = {"kernel_shape": kernel, "strides": stride, "pads": [*pads, *pads], **extra}
    return call.emit(op, [x], attrs)


def _max_pool(d: int) -> Handler:
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    defaults = (_REQUIRED, None, 0, 1, False, False)

    def translate(call: Call) -> ir.Value:
        o = {n: call.option(n, k + 1, v) for k, (n, v) in enumerate(zip(names, defaults))}
        if o["return_indices"]:
            raise Untranslatable(f"{call.node.name}: max pooling with indices")
        return _pool("MaxPool", d, o, call, dilations=_tuple(o["dilation"], d))

    return translate


def _avg_pool(d: int) -> Handler:
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
    defaults = (_REQUIRED, None, 0, False, True)

    def translate(call: Call) -> ir.Value:
        o = {n: call.option(n, k + 1, v) for k, (n, v) in enumerate(zip(names, defaults))}
        if d > 1 and call.option("divisor_override", 6, None) is not None:
            raise Untranslatable(f"{call.node.name}: average pooling with divisor_override")
        return _pool("AveragePool", d, o, call, count_include_pad=int(o["count_include_pad"]))

    return translate


def _adaptive_pool(global_op: str, d: int) -> Handler:
    """Adaptive pooling to size 1 (the global pool) or to the input's own size (identity)."""

    def translate(call: Call) -> ir.Value:
        x = call.input()
        if len(shape(x)) != d + 2 or call.option("return_indices", 2, False):
            raise Untranslatable(f"{call.node.name}: unbatched adaptive pooling, or indices")
        spatial = list(shape(x)[2:])
        if list(call.out.shape[2:]) == [1] * d:
            return call.emit(global_op, [x])
        if list(call.out.shape[2:]) == spatial:
            return call.emit("Identity", [x])
        raise Untranslatable(f"{call.node.name}: adaptive pooling to {call.out.shape[2:]}")

    return translate


def _reshape(call: Call) -> ir.Value:
    """``view``, ``reshape``, ``flatten``, ``squeeze``…: a row-major reshape to the recorded
    shape (its arguments are constants, or tensors read for their shape)."""
    x = call.input()
    if meta_of(x).dtype != call.out.dtype:
        raise Untranslatable(f"{call.node.name}: a view as another dtype")
    return call.emit("Reshape", [x, call.ints(call.out.shape)], {"allowzero": 1})


def _expand(call: Call) -> ir.Value:
    return call.emit("Expand", [call.input(), call.ints(call.out.shape)])


def _permute(call: Call) -> ir.Value:
    args = [call.cx.static_value(a) for a in call.node.args[1:]]
    dims = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
    dims = call.cx.static_value(call.node.kwargs.get("dims", dims))
    rank = len(call.out.shape)
    return call.emit("Transpose", [call.input()], {"perm": [int(d) % rank for d in dims]})


def _transpose(call: Call) -> ir.Value:
    rank = len(call.out.shape)
    a, b = (int(call.option(n, k)) % rank for n, k in (("dim0", 1), ("dim1", 2)))
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return call.emit("Transpose", [call.input()], {"perm": perm})


def _t(call: Call) -> ir.Value:
    x = call.input()
    if len(shape(x)) < 2:
        return call.emit("Identity", [x])
    return call.emit("Transpose", [x], {"perm": [1, 0]})


def _cast(call: Call) -> ir.Value:
    """``to``/``float``/``type_as``…: Identity where the dtype stays, else a Cast to a float
    type (exact: float to float rounds to nearest even in both, int to float is exact)."""
    x = call.input()
    target = call.out.dtype
    if meta_of(x).dtype == target:
        return call.emit("Identity", [x])
    if not target.is_floating_point:
        raise Untranslatable(f"{call.node.name}: cast to {target}")
    return call.emit("Cast", [x], {"to": from_torch_dtype(target)})


def _operand(call: Call, arg: Any) -> ir.Value:
    """A binary op's operand in the result's dtype: a tensor of that dtype, or a Python number
    made a constant of it."""
    dtype = from_torch_dtype(call.out.dtype)
    if isinstance(arg, fx.Node) and isinstance(call.cx.values.get(arg.name), ir.Value):
        v = call.cx.values[arg.name]
        assert isinstance(v, ir.Value)
        if v.dtype != dtype:
            raise Untranslatable(f"{call.node.name}: operands of mixed dtypes")
        return v
    x = call.cx.static_value(arg)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise Untranslatable(f"{call.node.name}: operand {x!r}")
    return call.cx.const(np.asarray(x, dtype=dtype.numpy()))


def _binary(op: str) -> Handler:
    """Add/Sub/Mul/Div/MatMul of tensors and numbers (numpy broadcasting, as torch's);
    ``alpha`` 1 and ``rounding_mode`` None only."""

    def translate(call: Call) -> ir.Value:
        if call.cx.static_value(call.node.kwargs.get("alpha", 1)) != 1:
            raise Untranslatable(f"{call.node.name}: alpha")
        if call.node.kwargs.get("rounding_mode") is not None:
            raise Untranslatable(f"{call.node.name}: rounding_mode")
        a, b = call.arg(0, "input"), call.arg(1, "other")
        return call.emit(op, [_operand(call, a), _operand(call, b)])

    return translate


def _in_place(handler: Handler) -> Handler:
    """The in-place form of ``handler`` (``x.relu_()``, ``x += y``): see
    :meth:`Call.check_inplace`."""

    def translate(call: Call) -> Any:
        call.check_inplace()
        return handler(call)

    return translate


def _concat(call: Call) -> ir.Value:
    tensors = call.arg(0, "tensors")
    dim = call.cx.static_value(call.arg(1, "dim", call.node.kwargs.get("axis", 0)))
    values = [_operand(call, t) for t in tensors]
    return call.emit("Concat", values, {"axis": int(dim)})


def _reduce(op: str) -> Handler:
    """``mean``/``sum`` over ``dim`` (all axes when None), with ``keepdim``."""

    def translate(call: Call) -> ir.Value:
        x = call.input()
        if meta_of(x).dtype != call.out.dtype or call.node.kwargs.get("dtype") is not None:
            raise Untranslatable(f"{call.node.name}: reduction that changes the dtype")
        dim = call.option("dim", 1, None)
        keep = {"keepdims": int(bool(call.option("keepdim", 2, False)))}
        if dim is None:
            return call.emit(op, [x], keep)
        axes = [dim] if isinstance(dim, int) else list(dim)
        if not axes:
            raise Untranslatable(f"{call.node.name}: reduction over dim=[]")
        return call.emit(op, [x, call.ints(axes)], keep)

    return translate


def _split(call: Call) -> tuple[ir.Value, ...]:
    """``split``/``chunk``: one Split into the recorded pieces."""
    x = call.input()
    dim = int(call.option("dim", 2, 0))
    pieces = call.out
    sizes = [p.shape[dim] for p in pieces]
    outputs: tuple[ir.Value, ...] = call.cx.emit(
        "Split", [x, call.ints(sizes)], {"axis": dim}, pieces
    )
    return outputs


def _getitem(call: Call) -> ir.Value:
    """One piece of a ``split``; indexing a tensor has no translation here."""
    container = call.arg(0, "input")
    pieces = call.cx.values.get(container.name) if isinstance(container, fx.Node) else None
    k = call.cx.static_value(call.arg(1, "index"))
    if not isinstance(pieces, tuple) or not isinstance(k, int):
        raise Untranslatable(f"{call.node.name}: indexing a tensor")
    return call.emit("Identity", [pieces[k]])


_RELU = _activation("Relu", inplace=1)
_LEAKY = _activation("LeakyRelu", ("alpha", "negative_slope", 1, 0.01), inplace=2)
_ELU = _activation("Elu", ("alpha", "alpha", 1, 1.0), inplace=2)
_GELU = _activation("Gelu", ("approximate", "approximate", 1, "none"))
_SIGMOID, _TANH = _activation("Sigmoid"), _activation("Tanh")
_HARDTANH = _clip(("min_val", 1, -1.0), ("max_val", 2, 1.0), inplace=3)
_CLAMP = _clip(("min", 1, None), ("max", 2, None), inplace=None)
_ADD, _SUB, _MUL, _DIV = _binary("Add"), _binary("Sub"), _binary("Mul"), _binary("Div")
_MATMUL = _binary("MatMul")

MODULES: dict[type[nn.Module], Handler] = {
    nn.Linear: _linear_module,
    nn.Conv1d: _conv_module,
    nn.Conv2d: _conv_module,
    nn.Conv3d: _conv_module,
    nn.ConvTranspose1d: _conv_transpose_module,
    nn.ConvTranspose2d: _conv_transpose_module,
    nn.ConvTranspose3d: _conv_transpose_module,
    nn.modules.batchnorm._BatchNorm: _batchnorm_module,
    nn.LayerNorm: _layernorm_module,
    nn.Embedding: _embedding_module,
    nn.ReLU: _RELU,
    nn.LeakyReLU: _LEAKY,
    nn.Hardtanh: _HARDTANH,  # ReLU6 too
    nn.ELU: _ELU,
    nn.GELU: _GELU,
    nn.Sigmoid: _SIGMOID,
    nn.Tanh: _TANH,
    nn.SiLU: _silu,
    nn.Softmax: _softmax("Softmax"),
    nn.LogSoftmax: _softmax("LogSoftmax"),
    nn.Identity: _identity(),
    nn.Dropout: _identity(inplace=1),
    nn.Dropout1d: _identity(inplace=1),
    nn.Dropout2d: _identity(inplace=1),
    nn.Dropout3d: _identity(inplace=1),
    nn.MaxPool1d: _max_pool(1),
    nn.MaxPool2d: _max_pool(2),
    nn.MaxPool3d: _max_pool(3),
    nn.AvgPool1d: _avg_pool(1),
    nn.AvgPool2d: _avg_pool(2),
    nn.AvgPool3d: _avg_pool(3),
    nn.AdaptiveAvgPool1d: _adaptive_pool("GlobalAveragePool", 1),
    nn.AdaptiveAvgPool2d: _adaptive_pool("GlobalAveragePool", 2),
    nn.AdaptiveAvgPool3d: _adaptive_pool("GlobalAveragePool", 3),
    nn.AdaptiveMaxPool1d: _adaptive_pool("GlobalMaxPool", 1),
    nn.AdaptiveMaxPool2d: _adaptive_pool("GlobalMaxPool", 2),
    nn.AdaptiveMaxPool3d: _adaptive_pool("GlobalMaxPool", 3),
    nn.Flatten: _reshape,
    nn.Unflatten: _reshape,
}
"""Leaf modules (``torch.nn``'s, which FX does not trace into) by class."""

FUNCTIONS: dict[Any, Handler] = {
    torch.relu: _RELU, F.relu: _RELU,
    F.leaky_relu: _LEAKY, F.elu: _ELU, F.gelu: _GELU,
    torch.sigmoid: _SIGMOID, torch.tanh: _TANH,
    F.hardtanh: _HARDTANH, F.relu6: _relu6, torch.clamp: _CLAMP, torch.clip: _CLAMP,
    F.silu: _silu,
    F.softmax: _softmax("Softmax"), torch.softmax: _softmax("Softmax"),
    F.log_softmax: _softmax("LogSoftmax"), torch.log_softmax: _softmax("LogSoftmax"),
    F.dropout: _identity(inplace=3), F.dropout1d: _identity(inplace=3),
    F.dropout2d: _identity(inplace=3), F.dropout3d: _identity(inplace=3),
    F.linear: _linear_function,
    F.conv1d: _conv_function, F.conv2d: _conv_function, F.conv3d: _conv_function,
    F.batch_norm: _batchnorm_function, F.layer_norm: _layernorm_function,
    F.embedding: _embedding_function,
    F.max_pool1d: _max_pool(1), F.max_pool2d: _max_pool(2), F.max_pool3d: _max_pool(3),
    F.avg_pool1d: _avg_pool(1), F.avg_pool2d: _avg_pool(2), F.avg_pool3d: _avg_pool(3),
    F.adaptive_avg_pool1d: _adaptive_pool("GlobalAveragePool", 1),
    F.adaptive_avg_pool2d: _adaptive_pool("GlobalAveragePool", 2),
    F.adaptive_avg_pool3d: _adaptive_pool("GlobalAveragePool", 3),
    torch.flatten: _reshape, torch.reshape: _reshape, torch.squeeze: _reshape,
    torch.unsqueeze: _reshape,
    torch.permute: _permute, torch.transpose: _transpose, torch.t: _t,
    operator.add: _ADD, torch.add: _ADD, operator.sub: _SUB, torch.sub: _SUB,
    operator.mul: _MUL, torch.mul: _MUL, operator.truediv: _DIV, torch.div: _DIV,
    operator.neg: _activation("Neg"), torch.neg: _activation("Neg"), torch.abs: _activation("Abs"),
    operator.matmul: _MATMUL, torch.matmul: _MATMUL, torch.mm: _MATMUL, torch.bmm: _MATMUL,
    torch.cat: _concat, torch.concat: _concat, torch.concatenate: _concat,
    torch.mean: _reduce("ReduceMean"), torch.sum: _reduce("ReduceSum"),
    torch.split: _split, torch.chunk: _split,
    operator.getitem: _getitem,
}  # fmt: skip
"""Functions by identity (``torch.relu``, ``F.relu``, ``operator.add``, …)."""

METHODS: dict[str, Handler] = {
    "relu": _RELU, "relu_": _in_place(_RELU), "sigmoid": _SIGMOID, "tanh": _TANH,
    "clamp": _CLAMP, "clip": _CLAMP,
    "softmax": _softmax("Softmax"), "log_softmax": _softmax("LogSoftmax"),
    "view": _reshape, "reshape": _reshape, "view_as": _reshape, "reshape_as": _reshape,
    "flatten": _reshape, "unflatten": _reshape, "squeeze": _reshape, "unsqueeze": _reshape,
    "expand": _expand, "expand_as": _expand,
    "permute": _permute, "transpose": _transpose, "t": _t,
    "contiguous": _identity(), "clone": _identity(), "detach": _identity(),
    "to": _cast, "float": _cast, "double": _cast, "half": _cast, "type_as": _cast,
    "add": _ADD, "sub": _SUB, "mul": _MUL, "div": _DIV,
    "add_": _in_place(_ADD), "sub_": _in_place(_SUB),
    "mul_": _in_place(_MUL), "div_": _in_place(_DIV),
    "neg": _activation("Neg"), "abs": _activation("Abs"),
    "matmul": _MATMUL, "mm": _MATMUL, "bmm": _MATMUL,
    "mean": _reduce("ReduceMean"), "sum": _reduce("ReduceSum"),
    "split": _split, "chunk": _split,
}  # fmt: skip
"""Tensor methods by name (``x.relu()``, ``x.view(...)``, …)."""

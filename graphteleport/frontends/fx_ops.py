"""The FX frontend's translation table: how each torch op becomes ONNX nodes.

Three tables (:data:`MODULES` by class, :data:`FUNCTIONS` by identity, :data:`METHODS` by
name) map what an FX node calls to a *handler*, a small function of one :class:`Call` that
emits the op's ONNX form with the torch op's exact semantics on the recorded shapes, or
raises :class:`Untranslatable` where it has none (an argument outside what it covers, an
in-place op whose input is read again).  Functional and method forms share one handler
(``F.relu``, ``torch.relu``, ``x.relu()`` and ``nn.ReLU``: four entries, one handler).
:mod:`graphteleport.frontends.fx` traces, records and walks the graph; this module only
translates, so an op is added here, in one place.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import from_torch_dtype, to_torch_dtype
from torch import fx, nn
from torch.nn import functional as F

_REQUIRED: Any = object()


class Untranslatable(Exception):
    """The module, or one of its FX nodes, has no exact translation here (fall back)."""


@dataclass(frozen=True)
class TensorMeta:
    """What the recorded forward saw of a tensor: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


Inputs = Sequence[ir.Value | None]
Attrs = dict[str, Any] | None
Metas = Sequence[TensorMeta] | None


class Emitter(Protocol):
    """What handlers build with (:class:`graphteleport.frontends.fx.Translator`)."""

    records: dict[str, Any]  # per FX node: its result's TensorMeta, or its Python value
    values: dict[str, ir.Value | tuple[ir.Value, ...]]  # per tensor FX node: its ONNX value(s)
    order: dict[fx.Node, int]  # FX nodes in execution order

    def emit(self, op: str, inputs: Inputs, attrs: Attrs = None, outputs: Metas = None) -> Any: ...

    def const(self, array: np.ndarray) -> ir.Value: ...

    def initializer(self, t: torch.Tensor, name: str) -> ir.Value: ...

    def static_value(self, arg: Any) -> Any: ...


@dataclass
class Call:
    """One FX call seen by its handler: arguments by position or name, a module's attributes,
    and the translator to emit with.  Position 0 is the tensor operated on (a module's or a
    function's first argument, a method's ``self``)."""

    cx: Emitter
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


def handler_of(gm: fx.GraphModule, node: fx.Node) -> tuple[Handler | None, nn.Module | None]:
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

"""Static facts about an ONNX graph the rules need: shapes, constants, provenance.

* Shapes come from ``onnx.shape_inference`` run on a light copy of the graph
  (large initializers declared as inputs, so no weight bytes are copied), with
  the graph inputs' dynamic dimensions replaced by concrete sizes.
* A value is *constant* when it is an initializer, a Constant node's output, a
  ``Shape``/``Size`` of a statically shaped value, or computed only from
  constants.  Constants are evaluated lazily, one node at a time, with
  ``onnx.reference``.
* The *provenance* of a constant tells which elements of which stored tensor it
  is made of, when it was derived from one tensor by data-movement ops only
  (e.g. ``Transpose(embedding)`` used as an LM head): running the same ops on the
  element indices of the source gives the map.  Such a constant can absorb a
  scaling, which is then written back to the stored tensor.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphteleport.analysis.constraints import ConstRef
from graphteleport.errors import AnalysisError
from graphteleport.interrupts import import_held

log = logging.getLogger(__name__)

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
)
_SMALL_INITIALIZER = 4096  # bytes kept in the copy given to shape inference
_NOT_CONSTANT_OPS = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)
# Ops through which a constant keeps a one-to-one element map to its source.
INDEX_OPS = frozenset(
    {
        "Transpose",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Slice",
        "Gather",
        "Split",
        "Concat",
        "DepthToSpace",
        "SpaceToDepth",
    }
)


def default_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13)))


def _shape_of(type_proto: onnx.TypeProto) -> tuple[int, ...] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = type_proto.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims):
        return None
    return tuple(int(d.dim_value) for d in dims)


def _light_graph(
    graph: ir.Graph,
    input_shapes: Mapping[str, Sequence[int]],
    folded: Mapping[str, np.ndarray] | None = None,
) -> onnx.GraphProto:
    """A GraphProto with the same nodes, big weights declared as typed inputs.

    Nodes all of whose outputs are in ``folded`` are replaced by those values as
    initializers (constant axes and shapes inference cannot propagate itself).
    """
    folded = folded or {}
    gp = onnx.GraphProto(name=graph.name or "g")
    for v in graph.inputs:
        if v.name in graph.initializers:
            continue
        shape = input_shapes.get(v.name or "", v.shape)
        elem = int(v.dtype) if v.dtype is not None else onnx.TensorProto.FLOAT
        dims = [d if isinstance(d, int) else None for d in (shape or [])]
        if dims and dims[0] is None and (v.name or "") not in input_shapes:
            dims[0] = 1  # a dynamic batch axis: analyse with batch 1
        gp.input.append(onnx.helper.make_tensor_value_info(v.name or "", elem, dims))
    for name, v in graph.initializers.items():
        t = v.const_value
        if t is not None and t.nbytes <= _SMALL_INITIALIZER:
            gp.initializer.append(ir.serde.serialize_tensor(t))
        elif t is not None:
            dims = list(t.shape.numpy())
            gp.input.append(onnx.helper.make_tensor_value_info(name, int(t.dtype), dims))
    for node in graph:
        if node.outputs and all((o.name or "") in folded for o in node.outputs):
            for o in node.outputs:
                gp.initializer.append(onnx.numpy_helper.from_array(folded[o.name or ""], o.name))
            continue
        gp.node.append(ir.serde.serialize_node(node))
    for v in graph.outputs:
        gp.output.append(onnx.ValueInfoProto(name=v.name))
    return gp


def static_shapes(
    model: ir.Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    folded: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Concrete shapes and element types of every value inference can resolve, by name."""
    shapes = {k: tuple(int(d) for d in s) for k, s in (input_shapes or {}).items()}
    dtypes: dict[str, int] = {}
    gp = _light_graph(model.graph, shapes, folded)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(gp, opset_imports=opsets, ir_version=model.ir_version)
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:
        raise AnalysisError(f"shape inference failed: {str(e).splitlines()[0]}") from e
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        shape = _shape_of(vi.type)
        if shape is not None:
            shapes.setdefault(vi.name, shape)
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            dtypes[vi.name] = int(vi.type.tensor_type.elem_type)
    for name, v in model.graph.initializers.items():
        if v.const_value is not None:
            shapes[name] = tuple(v.const_value.shape.numpy())
    return shapes, dtypes


def _gather_elements(node: ir.Node, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    """GatherElements (onnx.reference's uses ``np.choose``, limited to 64 choices)."""
    data, idx = inputs[0], inputs[1]
    assert data is not None and idx is not None
    axis = node.attributes.get("axis")
    ax = axis.as_int() if axis is not None else 0
    return [np.take_along_axis(data, np.where(idx < 0, idx + data.shape[ax], idx), axis=ax)]


def _ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.as_ints())


def _expand(node: ir.Node, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    """Expand: bidirectional broadcast of the data to the given shape."""
    data, shape = inputs[0], inputs[1]
    assert data is not None and shape is not None
    target = np.broadcast_shapes(data.shape, tuple(int(d) for d in shape))
    return [np.broadcast_to(data, target).copy()]


def _cast_like(node: ir.Node, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    data, like = inputs[0], inputs[1]
    assert data is not None and like is not None
    return [data.astype(like.dtype)]


def _reshape(node: ir.Node, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    """Reshape: a 0 copies the input's dimension unless ``allowzero``; -1 is inferred."""
    data, shape = inputs[0], inputs[1]
    assert data is not None and shape is not None
    allowzero = node.attributes.get("allowzero")
    dims = [int(d) for d in shape]
    if allowzero is None or not allowzero.as_int():
        dims = [data.shape[k] if d == 0 else d for k, d in enumerate(dims)]
    return [data.reshape(dims)]


def _unsqueeze(node: ir.Node, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    data = inputs[0]
    axes_in = inputs[1] if len(inputs) > 1 else None
    axes = [int(a) for a in axes_in] if axes_in is not None else _ints(node, "axes")
    assert data is not None and axes is not None
    rank = data.ndim + len(axes)
    return [np.expand_dims(data, tuple(sorted(a % rank for a in axes)))]


def _transpose(node: ir.Node, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    data = inputs[0]
    assert data is not None
    return [np.transpose(data, _ints(node, "perm"))]


def _slice(node: ir.Node, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    """Slice (starts, ends, axes, steps as inputs; before opset 10 the first three as
    attributes): ONNX clamps each start and end into the axis exactly as a Python
    ``slice`` does (a negative value counts from the end; past either end, the end;
    with a negative step, the first element's index −1 for "before the start")."""
    data = inputs[0]
    assert data is not None
    if len(inputs) >= 3:
        starts, ends = inputs[1], inputs[2]
        assert starts is not None and ends is not None
        axes_in = inputs[3] if len(inputs) > 3 else None
        steps_in = inputs[4] if len(inputs) > 4 else None
        start, end = [int(x) for x in starts], [int(x) for x in ends]
        axes = [int(a) for a in axes_in] if axes_in is not None else list(range(len(start)))
        steps = [int(k) for k in steps_in] if steps_in is not None else [1] * len(start)
    else:
        start, end = _ints(node, "starts") or [], _ints(node, "ends") or []
        axes = _ints(node, "axes") or list(range(len(start)))
        steps = [1] * len(start)
    cut = [slice(None)] * data.ndim
    for a, b, e, k in zip(axes, start, end, steps, strict=True):
        cut[a % data.ndim] = slice(b, e, k)
    return [data[tuple(cut)].copy()]


def _concat(node: ir.Node, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    axis = node.attributes.get("axis")
    assert axis is not None and all(x is not None for x in inputs)
    return [np.concatenate(list(inputs), axis=axis.as_int())]


# Ops evaluated directly in numpy: the shape glue exporters wrap constants in (a conv's
# zero bias is Shape/Expand/CastLike in torch's dynamo export) and the index maps of
# provenance.  Each is one numpy call; a ReferenceEvaluator per node costs ~100 µs.
_OWN_EVALUATORS = {
    "GatherElements": _gather_elements,
    "Expand": _expand,
    "CastLike": _cast_like,
    "Identity": lambda node, inputs: [inputs[0]],
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Transpose": _transpose,
    "Slice": _slice,  # (with Concat, a RoPE's rotate-half: no onnx.reference import)
    "Concat": _concat,
}


def _has_subgraph(node: ir.Node) -> bool:
    return any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for a in node.attributes.values()
    )


def declared_shapes(
    model: ir.Model, input_shapes: Mapping[str, Sequence[int]]
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]] | None:
    """The shapes and types the model itself declares, when every computed value has a
    static one and no requested input shape differs from the declared; else None.

    Values computed only from constants (a zero bias built by Shape/Expand/CastLike)
    need none: the analysis evaluates those.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, int] = {}
    constant = set(model.graph.initializers)
    for v in model.graph.inputs:
        if v.name not in constant and not _record(v, shapes, dtypes):
            return None
    for node in model.graph:
        inputs = node.inputs[:1] if node.op_type in ("CastLike", "Shape", "Size") else node.inputs
        if all(x is None or x.name in constant for x in inputs):
            constant.update(o.name for o in node.outputs if o.name)
            continue
        if not all(_record(o, shapes, dtypes) for o in node.outputs):
            return None
    if any(tuple(shapes.get(k, ())) != tuple(s) for k, s in input_shapes.items()):
        return None
    for name, v in model.graph.initializers.items():
        if v.const_value is not None:
            shapes[name] = tuple(v.const_value.shape.numpy())
    return shapes, dtypes


def _record(v: ir.Value, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, int]) -> bool:
    dims = v.shape
    if dims is None or v.dtype is None or not all(isinstance(d, int) for d in dims):
        return False
    shapes[v.name or ""] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    dtypes[v.name or ""] = int(v.dtype)
    return True


def evaluate(node: ir.Node, inputs: Sequence[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Run one node on numpy inputs with ``onnx.reference`` (imported here: most graphs need
    only the own evaluators)."""
    own = _OWN_EVALUATORS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if own is not None:
        return own(node, inputs)
    proto = ir.serde.serialize_node(node)
    names = [f"i{k}" if x is not None else "" for k, x in enumerate(inputs)]
    del proto.input[:]
    proto.input.extend(names)
    outs = [o.name or f"o{k}" for k, o in enumerate(node.outputs)]
    del proto.output[:]
    proto.output.extend(outs)
    opsets = {node.domain or "": opset}
    feeds = {n: x for n, x in zip(names, inputs) if n}
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(proto, opsets=opsets).run(None, feeds))


def run_for_shapes(
    model: ir.Model, names: Sequence[str], shapes: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """Values ``names`` of one onnxruntime run on zeros of the inputs' shapes."""
    import_held("onnxruntime")
    import onnxruntime as ort

    proto = ir.to_proto(model)
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        dims = shapes.get(i.name) or [d if isinstance(d, int) else 1 for d in i.shape]
        dtype = _ORT_TYPES.get(i.type, np.float32)
        feeds[i.name] = np.zeros(tuple(dims), dtype=dtype)  # zeros: valid ids, masks, data
    return dict(zip(names, sess.run(list(names), feeds)))


_ORT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


_UNKNOWN: Any = object()


class GraphInfo:
    """Shapes, constants and provenance of one graph, computed once."""

    def __init__(
        self,
        model: ir.Model,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        writable: Callable[[str], bool] | None = None,
    ) -> None:
        self.model = model
        self.writable = writable  # which stored tensors may be rewritten (None: all)
        self.graph = model.graph
        self.opset = default_opset(model)
        self._values: dict[int, np.ndarray] = {}
        # per value: its stored tensor, element map and the name ``writable`` is asked about
        self._sources: dict[int, tuple[ConstRef, np.ndarray | None, str] | None] = {}
        self.constant: set[int] = set()
        self.constant_nodes: set[int] = set()
        self._float: dict[int, bool] = {}  # is_float per value: types do not change
        self._shape: dict[int, tuple[int, ...]] = {}  # shape per value, once found
        self.memo: dict[str, Any] = {}  # structural facts the analysis derives, shared by fresh()
        declared = declared_shapes(model, input_shapes or {})
        if declared is not None:  # the exporter typed every value (torch's dynamo does)
            self.shapes, self.dtypes = declared
            self._find_constants()
        self.with_subgraphs = {id(n) for n in self.graph if _has_subgraph(n)}
        missing = declared is None or self._missing_shapes()
        if missing:
            self.shapes, self.dtypes = static_shapes(model, input_shapes)
            self._shape.clear()
            self.constant.clear()
            self._find_constants()
            missing = self._missing_shapes()
        if missing:
            self.shapes, self.dtypes = static_shapes(model, input_shapes, self._small_constants())
            self._shape.clear()
            self._values.clear()
            self.constant.clear()
            self._find_constants()
            missing = self._missing_shapes()
        if missing:
            self._shapes_from_a_run(input_shapes or {})
        self._float.clear()  # the types and shapes are final now
        self._shape.clear()

    def fresh(self, writable: Callable[[str], bool] | None = None) -> GraphInfo:
        """The same structural facts (shapes, types, which values are constant, which stored
        tensor each constant comes from) with an empty value cache and the given
        ``writable``: to analyse the graph again after its stored tensors changed (the torch
        frontend indexes a trace once)."""
        other = copy.copy(self)
        other.writable = writable
        other._values = {}
        return other

    def _missing_shapes(self) -> bool:
        return any(
            o.name not in self.shapes and not self.is_const(o)
            for n in self.graph
            for o in n.outputs
        )

    def _shapes_from_a_run(self, input_shapes: Mapping[str, Sequence[int]]) -> None:
        """Shapes inference could not give (ops it does not type, e.g. GroupNormalization):
        run the model once in onnxruntime with every missing value as an output."""
        missing = [
            o.name
            for n in self.graph
            for o in n.outputs
            if o.name and o.name not in self.shapes and not self.is_const(o)
        ]
        try:
            arrays = run_for_shapes(self.model, missing, {**self.shapes, **input_shapes})
        except Exception:  # ORT cannot run it either: those values stay unknown (pinned)
            log.debug("could not run the model for shapes", exc_info=True)
            return
        for name, arr in arrays.items():
            if not isinstance(arr, np.ndarray):
                continue  # a sequence (SplitToSequence): no tensor shape
            self.shapes[name] = tuple(arr.shape)
            self.dtypes.setdefault(name, int(ir.DataType.from_numpy(arr.dtype)))

    def _small_constants(self) -> dict[str, np.ndarray]:
        """Evaluated values of the small computed integer constants (axes, shapes)."""
        out: dict[str, np.ndarray] = {}
        for node in self.graph:
            for o in node.outputs:
                if not self.is_const(o) or o.is_initializer() or node.op_type == "Constant":
                    continue
                try:
                    arr = self.value(o)
                except Exception:
                    continue
                if arr.size <= 1024 and arr.dtype.kind in "iub":
                    out[o.name or ""] = arr
        return out

    # -- shapes -------------------------------------------------------------------------
    def shape(self, v: ir.Value | None) -> tuple[int, ...] | None:
        """``v``'s static shape, or None when unknown (cached per value)."""
        known = self._shape.get(id(v))
        if known is not None:
            return known
        shape = self._find_shape(v)
        if shape is not None:
            self._shape[id(v)] = shape
        return shape

    def _find_shape(self, v: ir.Value | None) -> tuple[int, ...] | None:
        if v is None:
            return None
        shape = self.shapes.get(v.name) if v.name else None  # initializers' too (unique names)
        if shape is not None:
            return shape
        if v.const_value is not None:
            return tuple(v.const_value.shape.numpy())
        if v.shape is not None and all(isinstance(d, int) for d in v.shape):
            shape = tuple(int(d) for d in v.shape)  # type: ignore[arg-type] # declared value_info
        if shape is None and self.is_const(v):
            try:
                shape = tuple(self.value(v).shape)  # inference gave up; evaluation does not
            except Exception:
                return None
            self.shapes[v.name or ""] = shape
        return shape

    def dtype(self, v: ir.Value) -> ir.DataType | None:
        if v.dtype is not None:
            return v.dtype
        code = self.dtypes.get(v.name or "")
        return ir.DataType(code) if code is not None else None

    def is_float(self, v: ir.Value) -> bool:
        """Float, or of unknown type (treated as carrying neurons, to stay sound)."""
        known = self._float.get(id(v))
        if known is None:
            dtype = self.dtype(v)
            known = self._float[id(v)] = dtype is None or dtype in FLOAT_TYPES
        return known

    # -- constants ----------------------------------------------------------------------
    def _find_constants(self) -> None:
        self.constant_nodes = set()  # nodes computed from constants alone: no rule applies
        for v in self.graph.initializers.values():
            self.constant.add(id(v))
        for node in self.graph:
            if self._node_is_constant(node):
                self.constant.update(id(o) for o in node.outputs)
                self.constant_nodes.add(id(node))

    def _node_is_constant(self, node: ir.Node) -> bool:
        if node.op_type in _NOT_CONSTANT_OPS or node.domain not in ("", "ai.onnx"):
            return False
        if _has_subgraph(node):
            return False
        if node.op_type in ("Shape", "Size"):
            return self.shape(node.inputs[0]) is not None
        inputs = node.inputs[:1] if node.op_type == "CastLike" else node.inputs  # type only
        return all(v is None or id(v) in self.constant for v in inputs)

    def is_const(self, v: ir.Value | None) -> bool:
        return v is not None and id(v) in self.constant

    def is_activation(self, v: ir.Value | None) -> bool:
        """A float tensor computed from the graph inputs: it carries neurons."""
        return v is not None and not self.is_const(v) and self.is_float(v)

    def value(self, v: ir.Value) -> np.ndarray:
        """The numpy value of a constant (evaluated and cached on first use)."""
        key = id(v)
        if key not in self._values:
            self._values[key] = self._compute(v)
        return self._values[key]

    def _compute(self, v: ir.Value) -> np.ndarray:
        tensor = ir.convenience.get_const_tensor(v)
        if tensor is not None:
            return np.asarray(tensor.numpy())
        node = v.producer()
        if node is None:
            raise AnalysisError(f"value {v.name!r} has no constant value")
        if node.op_type == "Shape":
            return self._shape_op(node)
        if node.op_type == "Size":
            return np.array(int(np.prod(self.shape(node.inputs[0]) or ())), dtype=np.int64)
        ins = [
            None if x is None else self._input_value(node, k, x) for k, x in enumerate(node.inputs)
        ]
        outs = evaluate(node, ins, self.opset)
        for o, arr in zip(node.outputs, outs):
            self._values[id(o)] = np.asarray(arr)
        return self._values[id(v)]

    def _input_value(self, node: ir.Node, k: int, x: ir.Value) -> np.ndarray:
        if node.op_type == "CastLike" and k == 1 and not self.is_const(x):
            dtype = self.dtype(x)
            return np.zeros(0, dtype=dtype.numpy() if dtype is not None else np.float32)
        return self.value(x)

    def _shape_op(self, node: ir.Node) -> np.ndarray:
        shape = np.array(self.shape(node.inputs[0]), dtype=np.int64)
        start = node.attributes.get("start")
        end = node.attributes.get("end")
        lo = start.as_int() if start is not None else 0
        hi = end.as_int() if end is not None else len(shape)
        return shape[lo:hi]

    # -- provenance ---------------------------------------------------------------------
    def not_stored(self, v: ir.Value) -> str:
        """Why the constant ``v`` has no stored tensor to rewrite: what computes it
        (``weight 'W' is computed (Cast from bfloat16 'W_bf16'), not stored``)."""
        node = v.producer()
        if v.is_initializer() or (node is not None and node.op_type == "Constant"):
            return f"weight {v.name!r} may not be rewritten"  # ``writable`` says no
        if node is None:
            return f"weight {v.name!r} is not a stored tensor"
        return f"weight {v.name!r} is computed ({self._computed_by(node)}), not stored"

    def _computed_by(self, node: ir.Node) -> str:
        x = node.inputs[0] if node.inputs else None
        dtype = self.dtype(x) if x is not None else None
        of = f"{dtype.name.lower()} {x.name!r}" if x is not None and dtype is not None else ""
        if node.op_type in ("Cast", "CastLike"):
            return f"Cast from {of}" if of else "Cast"
        if node.op_type == "DequantizeLinear":
            return f"DequantizeLinear of {of}: quantized tensor (QDQ)"
        return f"{node.op_type} of constants"

    def source(self, v: ir.Value) -> tuple[ConstRef, np.ndarray | None] | None:
        """The stored float tensor a constant is made of, and the element map (None:
        itself); None too when ``writable`` says that tensor may not be rewritten."""
        key = id(v)
        found = self._sources.get(key, _UNKNOWN)
        if found is _UNKNOWN:  # structural: shared by fresh() copies
            found = self._sources[key] = self._trace_source(v) if self.is_float(v) else None
        if found is None:
            return None
        ref, index, stored_as = found
        if self.writable is not None and not self.writable(stored_as):
            return None  # not a tensor the caller can rewrite (torch frontend)
        return ref, index

    def _trace_source(self, v: ir.Value) -> tuple[ConstRef, np.ndarray | None, str] | None:
        if v.is_initializer() and v.const_value is not None:
            return ConstRef(v.name or "", v), None, v.name or ""
        node = v.producer()
        if node is None:
            return None
        if node.op_type == "Constant" and node.attributes.get("value") is not None:
            return ConstRef(v.name or node.name or "", node, is_node=True), None, v.name or ""
        if node.op_type not in INDEX_OPS:
            return None
        data = node.inputs[0]
        if data is None or not self.is_const(data):
            return None
        try:
            return self._derive_source(node, v, data)
        except Exception:
            log.debug("no element map for %s", v.name, exc_info=True)
            return None

    def _derive_source(
        self, node: ir.Node, v: ir.Value, data: ir.Value
    ) -> tuple[ConstRef, np.ndarray | None, str] | None:
        if id(data) not in self._sources:
            self._sources[id(data)] = self._trace_source(data)
        src = self._sources[id(data)]
        if src is None or node.op_type == "Concat":
            return None
        ref, index, stored_as = src
        if index is None:
            index = np.arange(self.value(data).size, dtype=np.int64).reshape(self.value(data).shape)
        rest: list[Any] = [None if x is None else self.value(x) for x in node.inputs[1:]]
        outs = evaluate(node, [index, *rest], self.opset)
        mapped = np.asarray(outs[list(node.outputs).index(v)])
        return ref, mapped, stored_as

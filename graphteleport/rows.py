"""A block's input sets stacked along axis 0 into one run, where no node mixes rows.

Verification by pieces runs each block once per input set (8 draws by default) for each
model; at 16 tokens a run costs about as much as repacking the block's weights
(onnxruntime's CPU GEMM packs an unpacked ``B`` on every call), so one run of the sets
stacked along axis 0 costs a fraction of the runs one by one.  Stacking is exact only
where every node keeps the rows of axis 0 apart: :func:`stackable` proves that by a rule
per op over the block's values (ranks from onnx's shape inference on the first set's
shapes), marking *row* values (computed from the fed tensors, axis 0 indexing rows) and
*constant* ones (initializers and what is computed from them alone):

* elementwise ops (broadcasting): every row operand of the output's rank, of equal
  axis 0; a constant operand of lower rank or of axis 0 of size 1;
* ``MatMul``: ``rows @ constant`` with the constant of rank ≤ 2 (or broadcast over axis
  0), ``rows @ rows`` of equal rank ≥ 3 (batched), ``constant @ rows`` with the rows of
  rank ≥ 3 and the constant broadcast; ``Gemm`` of rows ``A`` (no ``transA``);
* reductions, Softmax, Slice, Concat, Split, Squeeze/Unsqueeze, Gather, Flatten,
  normalisations: along axes other than 0; ``Transpose`` with ``perm[0] = 0``;
  convolutions, pooling and inference BatchNorm (per sample);
* ``Reshape`` to a constant shape whose first entry is 0 (copy axis 0), or equals axis 0
  of its input on the first set (``[1, T, H, D]`` of a batch-1 export): that entry is
  rewritten to 0, the same shape on every set alone (with ``allowzero=1``, as torch
  exports it, only a shape without zeros, and the attribute is cleared);

anything else (Shape, Expand, subgraphs, an op not in the table) is not stackable.
:func:`split_rows` checks the stacked outputs' shapes (a row value's axis 0 = the sets'
count times its size on one set, where shape inference knows it) before cutting them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from graphteleport.errors import InputError

__all__ = ["Stacking", "run_sets", "split_rows", "stack_rows", "stackable"]

logger = logging.getLogger(__name__)

Shape = tuple[int | None, ...]
Feeds = Mapping[str, np.ndarray]
Opener = Callable[[onnx.ModelProto, str], Callable[[Feeds], list[np.ndarray]]]
_UNARY = frozenset(
    {
        "Neg", "Sqrt", "Reciprocal", "Sigmoid", "Tanh", "Relu", "Exp", "Log", "Erf", "Abs",
        "Cast", "Identity", "Softplus", "Softsign", "Gelu", "LeakyRelu", "Elu", "Selu",
        "HardSigmoid", "HardSwish", "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN",
        "IsInf", "Clip", "Dropout", "Sin", "Cos", "Mish", "Celu", "ThresholdedRelu",
    }
)  # fmt: skip
_BROADCAST = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where", "Equal",
        "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod",
        "PRelu", "BitShift",
    }
)  # fmt: skip
_REDUCE = frozenset(
    {
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
    }
)  # fmt: skip
_PER_SAMPLE = frozenset(
    {
        "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool",
        "GlobalMaxPool", "InstanceNormalization", "BatchNormalization",
    }
)  # fmt: skip
_SUFFIX = "__gt_rows"


class _Block:
    """The values of one block proto: shapes (rank and sizes where known), which are
    rows, constants' data where small and stored, and the rewrites found."""

    def __init__(self, proto: onnx.ModelProto, fed: Mapping[str, np.ndarray]) -> None:
        self.graph = proto.graph
        self.shapes = _shapes(proto, fed)
        self.rows = set(fed)
        self.data = {t.name: t for t in proto.graph.initializer}
        self.consts: dict[str, np.ndarray] = {}
        for node in proto.graph.node:
            if node.op_type == "Constant" and node.attribute:
                attr = node.attribute[0]
                if attr.name == "value":
                    self.consts[node.output[0]] = numpy_helper.to_array(attr.t)
        self.reshapes: dict[int, np.ndarray] = {}  # node index: its new shape constant

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def dim0(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return shape[0] if shape else None

    def value(self, name: str) -> np.ndarray | None:
        """A constant's value where it is small and stored in the proto (inline)."""
        if name in self.consts:
            return self.consts[name]
        t = self.data.get(name)
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)


def _shapes(proto: onnx.ModelProto, fed: Mapping[str, np.ndarray]) -> dict[str, Shape]:
    """Every value's shape onnx's inference finds, the fed ones as given."""
    typed = onnx.ModelProto()
    typed.CopyFrom(proto)
    for v in typed.graph.input:
        if v.name in fed:
            elem = v.type.tensor_type.elem_type
            shape = list(fed[v.name].shape)
            v.CopyFrom(onnx.helper.make_tensor_value_info(v.name, elem, shape))
    try:
        inferred = onnx.shape_inference.infer_shapes(typed)
    except Exception:  # onnx raises its own types; no shapes: nothing is stackable
        return {n: tuple(a.shape) for n, a in fed.items()}
    found: dict[str, Shape] = {}
    g = inferred.graph
    for v in [*g.input, *g.value_info, *g.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            found[v.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
            )
    for t in g.initializer:
        found[t.name] = tuple(int(d) for d in t.dims)
    found.update({n: tuple(a.shape) for n, a in fed.items()})
    return found


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _axes(b: _Block, node: onnx.NodeProto, rank: int | None, index: int = 1) -> list[int] | None:
    """The node's axes (attribute or constant input *index*), normalised; None if unknown."""
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > index and node.input[index]:
        value = b.value(node.input[index])
        axes = None if value is None else value.reshape(-1).tolist()
    if axes is None or rank is None:
        return None
    return [int(a) + rank if int(a) < 0 else int(a) for a in axes]  # type: ignore[attr-defined]


def _not_axis0(axis: object, rank: int | None) -> bool:
    if rank is None or not isinstance(axis, int):
        return False
    return (axis + rank if axis < 0 else axis) != 0


def _broadcast_ok(b: _Block, node: onnx.NodeProto) -> bool:
    """Row operands of the output's rank and equal axis 0; constants broadcast over it."""
    names = [x for x in node.input if x]
    ranks = [b.rank(x) for x in names]
    if any(r is None for r in ranks):
        return False
    top = max(r for r in ranks if r is not None)
    dims = set()
    for x, r in zip(names, ranks, strict=True):
        if x in b.rows:
            if r != top or b.dim0(x) is None:
                return False
            dims.add(b.dim0(x))
        elif r == top and b.dim0(x) != 1:
            return False
    return len(dims) == 1


def _matmul_ok(b: _Block, node: onnx.NodeProto) -> bool:
    a, w = node.input[0], node.input[1]
    ra, rw = b.rank(a), b.rank(w)
    if ra is None or rw is None:
        return False
    if a in b.rows and w in b.rows:
        return ra == rw >= 3 and b.dim0(a) == b.dim0(w) is not None
    if a in b.rows:  # a constant of higher rank would put its own axes before the rows
        return ra >= 2 and rw <= ra and (rw <= 2 or rw < ra or b.dim0(w) == 1)
    return rw >= 3 and (ra < rw or (ra == rw and b.dim0(a) == 1))


def _gemm_ok(b: _Block, node: onnx.NodeProto) -> bool:
    rows = [x for x in node.input if x in b.rows]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    flat_bias = bias is None or (b.rank(bias) or 0) <= 1 or b.dim0(bias) == 1
    return rows == [node.input[0]] and not _attr(node, "transA", 0) and flat_bias


def _reshape_ok(b: _Block, k: int, node: onnx.NodeProto) -> bool:
    """Axis 0 copied (0), or a literal equal to the input's axis 0 (rewritten to 0).

    With ``allowzero=1`` a 0 is a literal size, so only a shape without zeros passes —
    the same reshape either way (torch's exporter writes ``allowzero=1`` on every
    Reshape) — and the rewrite clears the attribute."""
    allowzero = bool(_attr(node, "allowzero", 0))
    if node.input[1] in b.rows:
        return False
    shape = b.value(node.input[1])
    first = b.dim0(node.input[0])
    if shape is None or shape.ndim != 1 or not shape.size:
        return False
    if allowzero and not np.all(shape != 0):
        return False
    if int(shape[0]) == 0:
        return True
    if first is None or int(shape[0]) != first:
        return False
    new = shape.copy()
    new[0] = 0
    b.reshapes[k] = new
    return True


def _gather_ok(b: _Block, node: onnx.NodeProto) -> bool:
    data, index = node.input[0], node.input[1]
    axis = _attr(node, "axis", 0)
    if data in b.rows and index not in b.rows:
        return _not_axis0(axis, b.rank(data))
    return data not in b.rows and axis == 0 and (b.rank(index) or 0) >= 1


def _perm_keeps_axis0(node: onnx.NodeProto) -> bool:
    perm = _attr(node, "perm")
    return isinstance(perm, list) and bool(perm) and perm[0] == 0


def _rule(b: _Block, k: int, node: onnx.NodeProto) -> bool:
    """Whether *node*, reading some row value, keeps rows apart (module docstring)."""
    op, x = node.op_type, node.input[0] if node.input else ""
    rank = b.rank(x)
    rows_only_first = all(y not in b.rows for y in node.input[1:] if y)
    checks: dict[str, Callable[[], bool]] = {
        "MatMul": lambda: _matmul_ok(b, node),
        "Gemm": lambda: _gemm_ok(b, node),
        "Reshape": lambda: _reshape_ok(b, k, node),
        "Gather": lambda: _gather_ok(b, node),
        "Transpose": lambda: _perm_keeps_axis0(node),
        "Softmax": lambda: _not_axis0(_attr(node, "axis", -1), rank),
        "LogSoftmax": lambda: _not_axis0(_attr(node, "axis", -1), rank),
        "Concat": lambda: (
            _not_axis0(_attr(node, "axis"), rank)
            and all(y in b.rows and b.rank(y) == rank for y in node.input if y)
        ),
        "Split": lambda: rows_only_first and _not_axis0(_attr(node, "axis", 0), rank),
        "Flatten": lambda: _attr(node, "axis", 1) == 1,
        "LayerNormalization": lambda: rows_only_first and _not_axis0(_attr(node, "axis", -1), rank),
        "SimplifiedLayerNormalization": lambda: (
            rows_only_first and _not_axis0(_attr(node, "axis", -1), rank)
        ),
    }
    if op in checks:
        return checks[op]()
    if op in _UNARY:
        return rows_only_first
    if op in _BROADCAST:
        return _broadcast_ok(b, node)
    if op in _PER_SAMPLE:
        return rows_only_first and not _attr(node, "training_mode", 0)
    if op in _REDUCE:
        if op in ("ArgMax", "ArgMin"):
            return _not_axis0(_attr(node, "axis", 0), rank)
        axes = _axes(b, node, rank)
        return rows_only_first and bool(axes) and 0 not in (axes or [0])
    if op in ("Slice",):
        axes = _axes(b, node, rank, index=3)
        consts = all(y not in b.rows for y in node.input[1:] if y)
        return consts and axes is not None and 0 not in axes
    if op in ("Squeeze", "Unsqueeze"):
        out_rank = b.rank(node.output[0]) if op == "Unsqueeze" else rank
        axes = _axes(b, node, out_rank)
        return rows_only_first and bool(axes) and 0 not in (axes or [0])
    return False


class Stacking(NamedTuple):
    """A block made ready to run stacked input sets: the model (its batch-1 Reshape
    constants rewritten to copy axis 0) and the values whose axis 0 indexes rows, each
    with its axis 0 on one set where shape inference knows it (the other values are
    computed from constants alone: the same for every set)."""

    proto: onnx.ModelProto
    rows: Mapping[str, int | None]


def stackable(proto: onnx.ModelProto, fed: Mapping[str, np.ndarray]) -> Stacking | None:
    """*proto* (a block: its graph inputs are the *fed* values, typed after them) made
    ready to run input sets stacked along axis 0, or None where some node may mix rows."""
    b = _Block(proto, fed)
    if any(b.rank(x) in (None, 0) for x in fed):
        return None
    for k, node in enumerate(proto.graph.node):
        if not any(x in b.rows for x in node.input if x):
            continue  # computed from constants alone
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            return None
        if not _rule(b, k, node):
            logger.debug("not stackable at %s '%s'", node.op_type, node.name)
            return None
        b.rows.update(y for y in node.output if y)
    return Stacking(_rewritten(proto, b.reshapes), {x: b.dim0(x) for x in b.rows})


def _rewritten(proto: onnx.ModelProto, reshapes: Mapping[int, np.ndarray]) -> onnx.ModelProto:
    """*proto* with the *reshapes* made and every graph input's axis 0 declared free
    (the stacked sets arrive there); *proto* itself where nothing changes."""
    fixed = [v for v in proto.graph.input if _fixed_axis0(v)]
    if not reshapes and not fixed:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for v in out.graph.input:
        if _fixed_axis0(v):
            v.type.tensor_type.shape.dim[0].dim_param = "rows"
    for k, shape in reshapes.items():
        node = out.graph.node[k]
        name = f"{node.input[1]}{_SUFFIX}{k}"
        out.graph.initializer.append(numpy_helper.from_array(shape.astype(np.int64), name))
        node.input[1] = name
        kept = [a for a in node.attribute if a.name != "allowzero"]  # (its shape has no 0)
        del node.attribute[:]
        node.attribute.extend(kept)
    return out


def _fixed_axis0(v: onnx.ValueInfoProto) -> bool:
    dims = v.type.tensor_type.shape.dim
    return v.type.HasField("tensor_type") and bool(dims) and dims[0].HasField("dim_value")


def stack_rows(
    sets: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]
) -> dict[str, np.ndarray] | None:
    """The sets' values of *names* stacked along axis 0; None unless every set's value
    has the first set's shape (then the rows of each set are where the split expects)."""
    if any(
        np.shape(s[x]) != np.shape(sets[0][x]) or not np.ndim(s[x]) for s in sets for x in names
    ):
        return None
    return {x: np.concatenate([s[x] for s in sets]) for x in names}


def split_rows(
    values: Sequence[np.ndarray], names: Sequence[str], rows: Mapping[str, int | None], n: int
) -> list[list[np.ndarray]] | None:
    """The outputs *values* (named *names*) of *n* stacked sets cut back into the sets:
    a row value's axis 0 into *n* equal parts in the sets' order (views), any other the
    same for every set; None where a row value's axis 0 is not *n* times its size on
    one set (where known), or does not divide by *n*."""
    for v, name in zip(values, names, strict=True):
        if name not in rows:
            continue
        one = rows[name]
        if not v.ndim or v.shape[0] % n or (one is not None and v.shape[0] != n * one):
            return None
    return [
        [_part(v, k, n) if name in rows else v for v, name in zip(values, names, strict=True)]
        for k in range(n)
    ]


def _part(v: np.ndarray, k: int, n: int) -> np.ndarray:
    size = v.shape[0] // n
    return v[k * size : (k + 1) * size]


def run_sets(
    open_model: Opener, proto: onnx.ModelProto, folder: str, feeds: Sequence[Feeds]
) -> list[list[np.ndarray]]:
    """*proto*'s outputs on every input set, from one session (``open_model(proto,
    folder)`` gives ``run(feeds) -> outputs``): all sets stacked along axis 0 into one
    run where :func:`stackable` proves no node mixes rows and the shapes fit (the same
    outputs, bit for bit, at about the cost of one run where the weights' reads dominate);
    else one by one."""
    stacked = stack_rows(feeds, list(feeds[0])) if len(feeds) >= 2 else None
    plan = stackable(proto, feeds[0]) if stacked is not None else None
    run = open_model(plan.proto if plan is not None else proto, folder)
    if stacked is not None and plan is not None:
        names = [o.name for o in plan.proto.graph.output]
        try:
            split = split_rows(run(stacked), names, plan.rows, len(feeds))
        except InputError as e:  # a shape the rules did not foresee: one by one
            logger.debug("stacked sets did not run: %s", e)
            split = None
        if split is not None:
            return split
    return [run(f) for f in feeds]

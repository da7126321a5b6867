"""The per-tensor proof: every intermediate tensor of a teleported model is ``τ ⊙`` the
original's, node by node (DESIGN.md §5).

Outputs alone are a weak witness: a corrupted neuron that is inactive on the drawn inputs
(a dead ReLU, a saturated sigmoid) leaves them unchanged.  The analysis knows the cofactor
of every neuron of every tensor, so the strong check is local.  For each value ``v`` that
a node of the original computes (constants excluded) the analysis promises

    v' = s_v ⊙ v,    s_v = τ[ids(v)]  (1 for values it does not track),

where ``v'`` is the value of the same name in the teleported model (insert mode: the
output of a wrapped activation carries only the part of τ it commutes with — 1, ``|τ|``
or ``sign τ`` — and the inserted ``Mul`` of the rest follows).
A network is the composition of its nodes, so the promise holds for the whole model
exactly when it holds for every node ``N`` on every input:

    N'(s_in ⊙ x) = s_out ⊙ N(x).

:func:`check_tensors` tests that identity for all nodes at once.  Both models are *cut*
at every value ``v`` the original computes: each use of ``v`` reads a fresh graph input
instead, and ``v`` becomes a graph output.  The original's cut model is fed the tensors
it really computes on the user's inputs (recorded by one run of the whole original), the
teleported cut model ``s ⊙`` the same tensors; then every node's output is compared with
``s_out ⊙`` what the original's cut model gives on them.  A second pass feeds them
mirrored, ``−v`` plus Gaussian noise of half their RMS, so every neuron is exercised — one
that no drawn input activates too.  Errors do not accumulate across nodes, and the first
failing tensor in topological order names the node at fault.

Comparisons mix relative and absolute error per tensor (see :func:`tolerance_scale`): the
absolute part is ``rtol`` times the largest of the tensor's magnitude, the magnitude of
the node's activation inputs (a difference of large values may be small), and the range
of a saturating op (Sigmoid, Tanh, Softmax… have absolute, not relative, accuracy in
their tails).  Tensors are checked in groups whose recorded size stays under a byte
budget, so memory is bounded on large models.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from graphteleport.rows import run_sets
from graphteleport.wire import light_encoding, mapped

logger = logging.getLogger(__name__)

__all__ = [
    "SATURATING_OPS",
    "LoadedModel",
    "OriginalFirst",
    "TensorCheckResult",
    "TensorFailure",
    "TensorScales",
    "check_tensors",
    "compare_tensor",
    "constant_names",
    "nonfinite_mismatch",
    "reads",
    "recording_model",
    "recording_names",
    "recording_superset",
    "saturation_floors",
    "sub_model",
    "tolerance_scale",
]

#: Ops whose outputs are bounded by 1 in magnitude and computed with absolute accuracy there.
SATURATING_OPS = frozenset(
    {"Sigmoid", "HardSigmoid", "Tanh", "Softmax", "Erf", "Softsign", "HardSwish", "Mish"}
)
#: Ops that only move, select or repeat elements: a floor passes through them.
_MOVING_OPS = frozenset(
    {
        "Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice",
        "Concat", "Split", "Gather", "GatherElements", "Expand", "Tile", "Pad",
        "DepthToSpace", "SpaceToDepth", "Cast", "MaxPool", "AveragePool",
        "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample", "ReduceMax", "ReduceMin",
    }
)  # fmt: skip
_CUT_SUFFIX = "__gt_cut"
#: Recorded bytes one group of checked tensors may hold (per model, per pass).
DEFAULT_BUDGET_BYTES = 512 * 2**20


# --------------------------------------------------------------------------- promises


@dataclasses.dataclass(frozen=True)
class TensorScales:
    """The analysis' promise for every tensor: ``v' = s_v ⊙ v``.

    ``scales`` maps a value's name to ``s_v`` in a compact layout that broadcasts to the
    value's shape (a conv activation's is ``[1, C, 1, 1]``); names it lacks keep ``s = 1``.
    ``tracked`` names the values whose neurons the analysis followed: the promise holds for
    *any* values of those (they are the ones mirrored); every other value (shape
    arithmetic, masks, a bias computed as zeros) keeps what the model computes.
    """

    scales: Mapping[str, np.ndarray]
    tracked: frozenset[str] = frozenset()

    def apply(self, name: str, array: np.ndarray) -> np.ndarray:
        """``s_v ⊙ array`` in float64 (complex stays complex); *array* unchanged if s = 1."""
        s = self.scales.get(name)
        if s is None or array.dtype.kind not in "fc" or not array.size:
            return array
        wide = np.result_type(array.dtype, np.float64)
        out: np.ndarray = np.multiply(array, _fit(s, array.ndim), dtype=wide)  # one pass
        return out

    def rounded(self, name: str, array: np.ndarray) -> np.ndarray:
        """:meth:`apply` rounded once to *array*'s dtype (what the teleported model is fed),
        in one pass: the float64 products are cast chunk by chunk, never held whole."""
        s = self.scales.get(name)
        if s is None or array.dtype.kind not in "fc" or not array.size:
            return array
        fitted = _fit(s, array.ndim)
        wide = np.result_type(array.dtype, np.float64)
        out = np.empty(np.broadcast_shapes(array.shape, fitted.shape), dtype=array.dtype)
        np.multiply(array, fitted, out=out, dtype=wide, casting="same_kind")
        return out

    def peak(self, name: str, array: np.ndarray) -> float:
        """``max |s_v ⊙ array|`` over its finite elements (:func:`tolerance_scale` of
        :meth:`apply`), the same float64 number without forming the product for a float
        array whose elements are all finite: each ``s`` times the largest ``|x|`` it
        scales (rounding is monotonic, so the largest rounded product is the rounded
        product of the largest)."""
        s = self.scales.get(name)
        fitted = None if s is None else _fit(s, array.ndim)
        fits = fitted is not None and all(
            d in (1, n) for d, n in zip(fitted.shape, array.shape, strict=True)
        )
        if fitted is None or not fits or array.dtype.kind != "f" or not array.size:
            return tolerance_scale(self.apply(name, array))
        axes = tuple(k for k, d in enumerate(fitted.shape) if d == 1)
        wide = _reducible(array)
        hi = wide.max(axis=axes, keepdims=True).astype(np.float64)
        lo = wide.min(axis=axes, keepdims=True).astype(np.float64)
        largest = np.maximum(hi, -lo)  # max |x| under each s
        peak = float(np.max(np.abs(fitted) * largest, initial=0.0))
        if not math.isfinite(peak):  # a NaN/inf somewhere: masked, as tolerance_scale does
            return tolerance_scale(self.apply(name, array))
        return peak


def _reducible(array: np.ndarray) -> np.ndarray:
    """*array* for ``max``/``min``: a float16 one widened to float32 first (exact, and
    order-preserving: the same extremes, NaN still NaN), since numpy reduces float16
    element by element — max and min of a [128, 11008] activation 11.0 ns an element
    against 1.8 for the float32 copy and its vectorised reductions; others as they are."""
    return array.astype(np.float32) if array.dtype == np.float16 else array


def _fit(s: np.ndarray, rank: int) -> np.ndarray:
    """``s`` with leading size-1 axes added or dropped to match *rank*."""
    if s.ndim < rank:
        return s.reshape((1,) * (rank - s.ndim) + s.shape)
    if s.ndim > rank:
        return s.reshape(s.shape[s.ndim - rank :])
    return s


# --------------------------------------------------------------------------- tolerance


def saturation_floors(graph: onnx.GraphProto) -> dict[str, float]:
    """Per value: 1.0 when it comes from a saturating op (through data movement), else 0."""
    floors: dict[str, float] = {}
    for node in graph.node:
        if node.op_type in SATURATING_OPS:
            floor = 1.0
        elif node.op_type in _MOVING_OPS:
            floor = max((floors.get(x, 0.0) for x in node.input if x), default=0.0)
        else:
            continue
        for y in node.output:
            if y and floor:
                floors[y] = floor
    return floors


def tolerance_scale(reference: np.ndarray, floor: float = 0.0, inputs: float = 0.0) -> float:
    """The magnitude the absolute part of a tolerance is relative to.

    ``max(max|ref|, floor, inputs)`` over finite elements: ``floor`` is a saturating op's
    range (:func:`saturation_floors`), ``inputs`` the largest magnitude among the node's
    activation inputs (node-local checks only).
    """
    peak = 0.0
    if reference.size and reference.dtype.kind == "f":  # two reductions
        wide = _reducible(reference)
        peak = max(float(wide.max()), -float(wide.min()))
    if reference.size and not (reference.dtype.kind == "f" and math.isfinite(peak)):
        finite = reference[np.isfinite(reference)]  # NaN/inf (or complex): mask them out
        peak = float(np.max(np.abs(finite), initial=0.0))
    return max(peak, floor, inputs)


def nonfinite_mismatch(
    a: np.ndarray, b: np.ndarray, finite_a: np.ndarray, finite_b: np.ndarray
) -> str | None:
    """Why the NaN/inf patterns of *a* (reference) and *b* differ, or None when they
    agree (same places, same values; NaN equals NaN)."""
    if np.any(finite_a & ~finite_b):
        return "NaN/inf in the candidate where the reference is finite"
    if np.any(~finite_a & finite_b):
        return "the reference has NaN/inf where the candidate is finite"
    if not np.array_equal(a[~finite_a], b[~finite_b], equal_nan=True):
        return "NaN/inf values differ"
    return None


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class TensorFailure:
    """The first tensor (in topological order) whose check failed, and why."""

    tensor: str
    node: str
    op_type: str
    max_abs_err: float
    max_rel_err: float
    reason: str
    feeds: str  # "recorded" or "mirrored"
    block: str = ""  # the block it was found in, when checked by pieces

    def describe(self) -> str:
        where = f" in {self.block}" if self.block else ""
        return (
            f"tensor '{self.tensor}' (output of {self.op_type} node '{self.node}'{where}, "
            f"{self.feeds} inputs): {self.reason}"
        )


@dataclasses.dataclass
class TensorCheckResult:
    """What :func:`check_tensors` compared and found.

    Attributes:
        passed: every checked tensor within tolerance, and something was compared.
        tensors: tensors checked (per pass; the same tensors in both passes).
        elements: finite elements compared over both passes.
        max_rel_err: the largest ``max|a' - s⊙a| / scale`` over tensors.
        groups: how many groups the tensors were checked in (memory bound).
        failure: the first failing tensor, or None.
        failures: how many tensor checks failed in all.
    """

    passed: bool
    tensors: int
    elements: int
    max_rel_err: float
    groups: int
    failure: TensorFailure | None = None
    failures: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["max_rel_err"] = self.max_rel_err if np.isfinite(self.max_rel_err) else None
        if self.failure is not None:
            for key in ("max_abs_err", "max_rel_err"):
                v = out["failure"][key]
                out["failure"][key] = v if np.isfinite(v) else None
        return out


# --------------------------------------------------------------------------- models


@dataclasses.dataclass
class LoadedModel:
    """A model proto without its external data, and the folder its data lives in
    (parse a model once: :func:`check_tensors` takes one as its original).

    ``skeleton`` is the proto without nodes, initializers and outputs: cut models are
    built on it with just the nodes and initializers they need (``initializers``, by
    name).  From :meth:`load`, each weight stored as ``raw_data`` of over
    :data:`LIGHT_BYTES` is a reference to its bytes in the model file itself (external
    data: location the file, the offset of its ``raw_data``;
    :func:`graphteleport.wire.light_encoding`), so the proto is kilobytes, a cut model
    too, and onnxruntime reads the weights from the file, the very bytes the model
    holds — a copy of every weight per cut model, serialised and parsed again, would
    dominate the check's time on a large model.
    """

    proto: onnx.ModelProto
    folder: str
    skeleton: onnx.ModelProto
    initializers: dict[str, onnx.TensorProto]
    #: whether ``proto`` is the light encoding of a binary model file (its large inline
    #: weights references into the file): a session of ``proto`` then runs the file's
    #: own bytes without onnxruntime parsing the weights out of protobuf
    light: bool = False

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LoadedModel:
        light = _light_proto(path)
        proto = light or onnx.load(os.fspath(path), load_external_data=False)
        skeleton = onnx.ModelProto()
        _copy_without_weights(proto, skeleton)
        del skeleton.graph.node[:]
        del skeleton.graph.output[:]
        inits = {t.name: t for t in proto.graph.initializer}
        folder = os.path.dirname(os.path.abspath(path))
        return cls(proto, folder, skeleton, inits, light=light is not None)


#: Inline weights over this many bytes are read by cut models from the model file.
LIGHT_BYTES = 1024


def _light_proto(path: str | os.PathLike[str]) -> onnx.ModelProto | None:
    """The model file at ``path`` parsed with its large weights as references into it
    (:class:`LoadedModel`); None where that cannot be: not binary protobuf, a link into
    another folder, an encoding the walk cannot read (then the caller parses it whole)."""
    ext = os.path.splitext(os.fspath(path))[1]
    binary = onnx.serialization.registry.get_format_from_file_extension(ext) in (None, "protobuf")
    if not binary or not _resolves_in_place(path):
        return None
    try:
        with mapped(path) as buf:
            light = light_encoding(buf, os.path.basename(os.fspath(path)), LIGHT_BYTES)
        proto = onnx.ModelProto()
        proto.ParseFromString(light or b"")
    except (OSError, ValueError, DecodeError):
        return None
    return proto if light else None


def _resolves_in_place(path: str | os.PathLike[str]) -> bool:
    """Whether the file at ``path`` lies in the folder it is named in, links followed
    (onnxruntime refuses external data that resolves outside the model's folder: a
    model that is a symbolic link to another folder keeps its weights inline)."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(folder)


def _copy_without_weights(proto: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """``out`` = ``proto`` without its initializers, copied field by field (the weights
    are neither copied nor touched)."""
    _copy_fields(proto, out, skip="graph")
    _copy_fields(proto.graph, out.graph, skip="initializer")


def _copy_fields(src: Any, dst: Any, skip: str) -> None:
    """Copy every set field of the message ``src`` but ``skip`` into ``dst``."""
    dst.SetInParent()
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def constant_names(graph: onnx.GraphProto) -> set[str]:
    """Values computed from stored tensors alone (weights and what is derived from them)."""
    real_inputs = {v.name for v in graph.input}
    const = {t.name for t in graph.initializer if t.name not in real_inputs}
    const |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        inputs = [x for x in node.input if x]
        from_stored = (node.op_type == "Constant" or inputs) and all(x in const for x in inputs)
        if from_stored and not _has_subgraph(node):
            const.update(y for y in node.output if y)
    return const


def _has_subgraph(node: onnx.NodeProto) -> bool:
    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds for a in node.attribute)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which values are cut, in the original's topological order, with their producers."""

    cut: list[str]  # computed values of the original that the teleported model also has
    producer: dict[str, onnx.NodeProto]
    inputs_of: dict[str, list[str]]  # per cut value: the cut values its node reads
    graph_inputs: list[str]


def _plan(original: onnx.GraphProto, teleported: onnx.GraphProto) -> _Plan:
    const = constant_names(original)
    produced_t = {y for n in teleported.node for y in n.output if y}
    init = {t.name for t in original.initializer}
    graph_inputs = [v.name for v in original.input if v.name not in init]
    cut: list[str] = []
    producer: dict[str, onnx.NodeProto] = {}
    inputs_of: dict[str, list[str]] = {}
    for node in original.node:
        acts = [x for x in node.input if x and x not in const]
        for y in node.output:
            if y and y not in const and y in produced_t:
                cut.append(y)
                producer[y] = node
                inputs_of[y] = acts
    return _Plan(cut, producer, inputs_of, graph_inputs)


def _with_outputs(model: LoadedModel, names: Sequence[str]) -> onnx.ModelProto:
    """The model's proto with *names* as its outputs (types left to onnxruntime), carrying
    ``model.initializers`` (the large ones references into the model file)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.skeleton)
    proto.graph.node.extend(model.proto.graph.node)
    proto.graph.initializer.extend(model.initializers.values())
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return proto


@dataclasses.dataclass(frozen=True)
class _Cut:
    """The part of a model that computes one group of values from fed tensors."""

    keep: list[int]  # node indices, in the model's order
    boundary: list[str]  # cut values read: fed, under a fresh name when in the group


def _cut(model: LoadedModel, plan: _Plan, group: Sequence[str]) -> _Cut:
    """Walk back from the group's values: a value the original computes (a cut value) is
    a boundary; anything else (constants, a teleported model's inserted ``Mul`` and its
    cofactor) is computed by the kept nodes."""
    graph = model.proto.graph
    producer = {y: k for k, n in enumerate(graph.node) for y in n.output if y}
    cut = set(plan.cut)
    stored = {t.name for t in graph.initializer} | set(plan.graph_inputs)
    keep: set[int] = set()
    boundary: dict[str, None] = {}
    stack = [producer[y] for y in group if y in producer]
    while stack:
        k = stack.pop()
        if k in keep:
            continue
        keep.add(k)
        for x in reads(graph.node[k]):
            if x in cut:
                boundary.setdefault(x, None)
            elif x not in stored and x in producer:
                stack.append(producer[x])
    return _Cut(sorted(keep), list(boundary))


def _cut_proto(
    model: LoadedModel, cut: _Cut, group: Sequence[str], fed: Mapping[str, np.ndarray]
) -> onnx.ModelProto:
    """The model reduced to ``cut.keep``, reading ``cut.boundary`` as graph inputs (typed
    after *fed*) and giving *group* as its outputs."""
    return sub_model(model, cut.keep, {n: fed[n] for n in cut.boundary}, group, rename=group)


def sub_model(
    model: LoadedModel,
    keep: Sequence[int],
    fed: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    *,
    rename: Sequence[str] = (),
    shaped: bool = True,
    own_inputs: bool = False,
) -> onnx.ModelProto:
    """The model's nodes ``keep`` (indices, in order) as a model of their own: the values
    in *fed* are graph inputs (typed after the arrays, shaped too when *shaped*), the
    initializers the nodes read come along (external ones stay references into
    ``model.folder``: nothing is loaded), *outputs* are its outputs (types left to
    onnxruntime).  Reads of a name in *rename* read ``name + "__gt_cut"`` instead (a
    value that is both fed and computed).  With *own_inputs* the fed values are its only
    graph inputs (else the model's own inputs stay too)."""
    graph = model.proto.graph
    inside = set(rename)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.skeleton)
    if own_inputs:
        del proto.graph.input[:]
    read: set[str] = set()
    for k in keep:
        node = proto.graph.node.add()
        node.CopyFrom(graph.node[k])
        read.update(reads(node))
        for j, x in enumerate(node.input):
            if x in inside:
                node.input[j] = x + _CUT_SUFFIX
    proto.graph.initializer.extend(t for n, t in model.initializers.items() if n in read)
    proto.graph.input.extend(_value_info(_fed_name(n, inside), a, shaped) for n, a in fed.items())
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    return proto


def _fed_name(name: str, inside: set[str]) -> str:
    return name + _CUT_SUFFIX if name in inside else name


def reads(node: onnx.NodeProto) -> list[str]:
    """Every name *node* reads: its inputs and the outer values its subgraphs use."""
    names = [x for x in node.input if x]
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            local = {t.name for t in g.initializer} | {v.name for v in g.input}
            local |= {y for n in g.node for y in n.output}
            for n in g.node:
                names.extend(x for x in reads(n) if x not in local)
    return names


def _value_info(name: str, array: np.ndarray, shaped: bool = True) -> onnx.ValueInfoProto:
    elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    return onnx.helper.make_tensor_value_info(name, elem, list(array.shape) if shaped else None)


# --------------------------------------------------------------------------- running


def _groups(plan: _Plan, sizes: Mapping[str, int], budget: int) -> Iterator[list[str]]:
    """The cut values in topological order, split so each group's recorded bytes (its
    values and the values its nodes read) stay under *budget* (at least one per group)."""
    group: list[str] = []
    used = 0
    for name in plan.cut:
        need = sizes.get(name, 0) + sum(sizes.get(x, 0) for x in plan.inputs_of[name])
        if group and used + need > budget:
            yield group
            group, used = [], 0
        group.append(name)
        used += need
    if group:
        yield group


def _mirrored(
    arrays: Mapping[str, np.ndarray], tracked: frozenset[str], seed: int
) -> dict[str, np.ndarray]:
    """Tracked float tensors mirrored and noised, ``−v + N(0, (RMS/2)²)`` on their finite
    elements (every element that had a sign takes the other: a ReLU neuron dead on the
    recorded inputs is active here, and zeros become noise); the rest as recorded.

    The noise of each tensor is a window, at a random offset, into one pool of standard
    normal draws twice the largest tensor's size (drawing every element afresh cost
    more than the rest of the pass); the arithmetic is in the tensor's dtype (float32
    at least)."""
    rng = np.random.default_rng(seed)
    chosen = [n for n, a in arrays.items() if n in tracked and a.dtype.kind == "f" and a.size]
    largest = max((arrays[n].size for n in chosen), default=0)
    pool = rng.standard_normal(2 * largest, dtype=np.float32)
    out = dict(arrays)
    for name in chosen:
        start = int(rng.integers(0, pool.size - arrays[name].size + 1))
        out[name] = _mirror(arrays[name], pool[start : start + arrays[name].size])
    return out


def _mirror(a: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``sigma · noise − a`` where *a* is finite (else *a*), within *a*'s dtype's range
    (an element that overflowed to ±inf is clipped to the dtype's largest finite value);
    ``sigma`` is half the RMS of *a*'s finite elements (1 when that is 0)."""
    finite = np.isfinite(a)
    everywhere = bool(finite.all())  # the usual case: no mask to apply
    values = a.reshape(-1) if everywhere else a[finite]
    rms = float(np.sqrt(np.mean(np.square(values, dtype=np.float64)))) if values.size else 0
    sigma = 0.5 * rms if rms > 0 else 1.0
    work = np.result_type(a.dtype, np.float32)
    with np.errstate(over="ignore"):  # near the dtype's max (a mask's fill): clipped below
        noisy: np.ndarray = np.multiply(noise.reshape(a.shape), sigma, dtype=work)
        noisy -= a  # sigma · noise − a, in place
    if not everywhere:
        noisy = np.where(finite, noisy, a)
    limit = float(np.finfo(a.dtype).max)
    np.clip(noisy, -limit, limit, out=noisy)
    return noisy.astype(a.dtype, copy=False)


def check_tensors(
    original: str | os.PathLike[str] | LoadedModel,
    teleported: str | os.PathLike[str] | LoadedModel,
    feeds: Mapping[str, np.ndarray],
    scales: TensorScales,
    open_model: Opener,
    *,
    rtol: float = 1e-5,
    seed: int = 0,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    recorded: Mapping[str, np.ndarray] | None = None,
    stack: bool = False,
) -> TensorCheckResult:
    """Check ``N'(s_in ⊙ x) = s_out ⊙ N(x)`` for every node (see the module docstring).

    *open_model* is ``open_model(proto, folder) -> run`` with ``run(feeds) -> list of
    arrays`` in the proto's output order (onnxruntime, optimisations off:
    :func:`graphteleport.verify.open_proto`).  The original's tensors are recorded on
    *feeds*; *scales* is the analysis' promise.  Graph inputs are fed as they are to the
    original and ``s ⊙`` them to the teleported model (``s = 1`` for a whole model's
    inputs; a block of :mod:`graphteleport.pieces` reads scaled tensors as its inputs).
    *recorded*: the original's tensors on *feeds* when a run already gave them (every
    value :func:`recording_names` lists: the whole model's own run for its outputs, then
    no run records them again).  *stack*: the teleported cut model runs both passes as
    one run stacked along axis 0 where no node mixes rows (:func:`graphteleport.rows.
    run_sets`) — it pays where reading the weights dominates a run (a block of a large
    model at a few tokens), not for a compute-bound one (a conv net).
    """
    orig = original if isinstance(original, LoadedModel) else LoadedModel.load(original)
    tele = teleported if isinstance(teleported, LoadedModel) else LoadedModel.load(teleported)
    plan = _plan(orig.proto.graph, tele.proto.graph)
    floors = saturation_floors(orig.proto.graph)
    acc = _Accumulator()
    groups = list(_groups(plan, _value_sizes(orig), budget_bytes))
    for k, group in enumerate(groups):
        half = _OriginalHalf.run(orig, tele, plan, group, feeds, scales, open_model, recorded)
        half.finish(_Checked(plan, floors, rtol, _group_seed(seed, k)), open_model, stack, acc)
    return acc.result(len(plan.cut), len(groups))


def _group_seed(seed: int, k: int) -> int:
    """The seed of group *k*'s mirrored draws."""
    return seed + 7919 * (k + 1)


class OriginalFirst:
    """:func:`check_tensors` of a check that takes one group whose tensors are all
    recorded already, in two halves: :meth:`start` runs the original's cut model on the
    mirrored pass (right after the caller's run of the original, whose widened weights
    are then at hand), :meth:`finish` the teleported's and the comparisons.  The same
    runs on the same inputs as :func:`check_tensors`, hence the same result."""

    def __init__(self, half: _OriginalHalf, checked: _Checked, tensors: int) -> None:
        self._half, self._checked, self._tensors = half, checked, tensors

    @classmethod
    def start(
        cls,
        original: LoadedModel,
        teleported: LoadedModel,
        feeds: Mapping[str, np.ndarray],
        scales: TensorScales,
        open_model: Opener,
        recorded: Mapping[str, np.ndarray],
        *,
        rtol: float = 1e-5,
        seed: int = 0,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
    ) -> OriginalFirst | None:
        """The first half (the original's tensors recorded by a run of its own where
        *recorded* lacks one); None where the check takes several groups
        (:func:`check_tensors` then runs it whole, a group at a time)."""
        plan = _plan(original.proto.graph, teleported.proto.graph)
        groups = list(_groups(plan, _value_sizes(original), budget_bytes))
        if len(groups) != 1:
            return None
        half = _OriginalHalf.run(
            original, teleported, plan, groups[0], feeds, scales, open_model, recorded
        )
        floors = saturation_floors(original.proto.graph)
        checked = _Checked(plan, floors, rtol, _group_seed(seed, 0))
        half.mirror(checked, open_model)
        return cls(half, checked, len(plan.cut))

    def finish(self, open_model: Opener, stack: bool = False) -> TensorCheckResult:
        """The teleported half; the check's result."""
        acc = _Accumulator()
        self._half.finish(self._checked, open_model, stack, acc)
        return acc.result(self._tensors, 1)


@dataclasses.dataclass(frozen=True)
class _Checked:
    """What every group of one check shares: the plan, the floors, the tolerance, and
    the mirrored pass's seed for the group."""

    plan: _Plan
    floors: Mapping[str, float]
    rtol: float
    seed: int


@dataclasses.dataclass
class _OriginalHalf:
    """One group's check after the original's runs: its recorded tensors, the cut
    models, and the original's cut model run on the mirrored pass (made from the
    recorded tensors).  :meth:`finish` runs the teleported cut model on both passes and
    compares.  The original's runs come first, together: where a caller has just run
    the original (verification by pieces), its widened weights (:mod:`graphteleport.
    widen`) are still at hand, and each model's are converted once."""

    orig: LoadedModel
    tele: LoadedModel
    cuts: tuple[_Cut, _Cut]
    group: Sequence[str]
    arrays: dict[str, np.ndarray]
    scales: TensorScales
    mirrored_ref: Mapping[str, np.ndarray] | None = None
    mirrored: dict[str, np.ndarray] | None = None

    @classmethod
    def run(
        cls,
        orig: LoadedModel,
        tele: LoadedModel,
        plan: _Plan,
        group: Sequence[str],
        feeds: Mapping[str, np.ndarray],
        scales: TensorScales,
        open_model: Opener,
        recorded: Mapping[str, np.ndarray] | None,
    ) -> _OriginalHalf:
        """Record the group's tensors (unless *recorded* has them all); the mirrored
        pass is made and run by :meth:`mirror`."""
        cuts = (_cut(orig, plan, group), _cut(tele, plan, group))
        names = _recorded_names(cuts, group)
        if recorded is not None and all(n in recorded for n in names):
            arrays = {n: recorded[n] for n in names}
        else:  # one session at a time: each is released before the next is opened
            arrays = _named(open_model(_with_outputs(orig, names), orig.folder))(feeds)
        arrays.update({n: np.asarray(feeds[n]) for n in plan.graph_inputs if n in feeds})
        return cls(orig, tele, cuts, group, arrays, scales)

    def mirror(self, checked: _Checked, open_model: Opener) -> list[_Job]:
        """Both passes' jobs; the original's cut model run on the mirrored one (once)."""
        if self.mirrored is None:
            self.mirrored = _mirrored(self.arrays, self.scales.tracked, checked.seed)
        jobs = [
            _Job(checked.plan, self.group, arrays, self.scales, checked.floors, checked.rtol, label)
            for label, arrays in (("recorded", self.arrays), ("mirrored", self.mirrored))
        ]
        if self.mirrored_ref is None:
            cut = _cut_proto(self.orig, self.cuts[0], self.group, self.arrays)
            run = _named(open_model(cut, self.orig.folder))
            self.mirrored_ref = run(_group_feeds(jobs[1], self.cuts[0], False))
        return jobs

    def finish(self, checked: _Checked, open_model: Opener, stack: bool, acc: _Accumulator) -> None:
        """The teleported cut model on both passes, each value compared."""
        jobs = self.mirror(checked, open_model)
        assert self.mirrored_ref is not None
        tele_cut = _cut_proto(self.tele, self.cuts[1], self.group, self.arrays)
        gots = _both_passes(open_model, tele_cut, self.tele.folder, jobs, self.cuts[1], stack)
        recorded_ref = _recorded_ref(self.orig, self.cuts[0], jobs[0], gots[0], open_model)
        for job, ref, got in zip(jobs, [recorded_ref, self.mirrored_ref], gots, strict=True):
            _check_group(ref, got, job, acc)


def _both_passes(
    open_model: Opener,
    proto: onnx.ModelProto,
    folder: str,
    jobs: Sequence[_Job],
    cut: _Cut,
    stack: bool,
) -> list[dict[str, np.ndarray]]:
    """The teleported cut model on both passes' tensors, with *stack* in one run where no
    node mixes rows (:func:`graphteleport.rows.run_sets`), else one run each."""
    feeds = [_group_feeds(job, cut, True) for job in jobs]
    if stack:
        ran = run_sets(open_model, proto, folder, feeds)
    else:
        run = open_model(proto, folder)
        ran = [run(f) for f in feeds]
    names = [o.name for o in proto.graph.output]
    return [dict(zip(names, r, strict=True)) for r in ran]


def _recorded_ref(
    orig: LoadedModel, cut: _Cut, job: _Job, got: Mapping[str, np.ndarray], open_model: Opener
) -> Mapping[str, np.ndarray]:
    """What the original's nodes give on the recorded tensors: the recorded values of the
    group themselves (the whole run computed them from those very inputs), unless one's
    shape differs from the teleported cut model's (onnxruntime returned shape [1] for a
    value the whole LLaMA export's run returned as [], tests/test_hf_models.py): then the
    original's cut model runs on them, as it does on the mirrored tensors."""
    if all(np.shape(job.arrays[n]) == np.shape(got[n]) for n in job.group):
        return job.arrays
    run = _named(open_model(_cut_proto(orig, cut, job.group, job.arrays), orig.folder))
    return run(_group_feeds(job, cut, False))


def _recorded_names(cuts: tuple[_Cut, _Cut], group: Sequence[str]) -> list[str]:
    """The original's tensors a group's check feeds or compares: the boundaries of both
    cut models and the group's values."""
    return list(dict.fromkeys([*cuts[0].boundary, *cuts[1].boundary, *group]))


def recording_names(
    original: LoadedModel, teleported: LoadedModel, budget_bytes: int = DEFAULT_BUDGET_BYTES
) -> list[str] | None:
    """The original's tensors :func:`check_tensors` records, when one run records them all
    (the check takes one group under *budget_bytes*); None when it takes several."""
    plan = _plan(original.proto.graph, teleported.proto.graph)
    groups = list(_groups(plan, _value_sizes(original), budget_bytes))
    if len(groups) != 1:
        return None
    cuts = (_cut(original, plan, groups[0]), _cut(teleported, plan, groups[0]))
    return _recorded_names(cuts, groups[0])


def recording_superset(
    original: LoadedModel, budget_bytes: int = DEFAULT_BUDGET_BYTES
) -> list[str] | None:
    """Every tensor :func:`recording_names` may list for any teleported model of
    *original* — every value the original computes but its constants, in topological
    order — when one run records them all (one group under *budget_bytes*; a teleported
    model's groups hold a subset of these values); None when the check takes several."""
    plan = _plan(original.proto.graph, original.proto.graph)
    groups = list(_groups(plan, _value_sizes(original), budget_bytes))
    return plan.cut if len(groups) == 1 else None


def recording_model(model: LoadedModel, names: Sequence[str]) -> onnx.ModelProto:
    """The whole model with its own outputs (as declared) and then *names* as outputs: one
    run gives both the outputs and the tensors :func:`check_tensors` records."""
    own = [o.name for o in model.proto.graph.output]
    proto = _with_outputs(model, [])
    proto.graph.output.extend(model.proto.graph.output)
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in own)
    return proto


Feeds = Mapping[str, np.ndarray]
Run = Callable[[Feeds], list[np.ndarray]]
Opener = Callable[[onnx.ModelProto, str], Run]
NamedRun = Callable[[Feeds], dict[str, np.ndarray]]


def _named(run: Run) -> NamedRun:
    """*run* returning ``{output name: array}``."""
    names: list[str] = list(getattr(run, "output_names", []))

    def named(feeds: Feeds) -> dict[str, np.ndarray]:
        return dict(zip(names, run(feeds), strict=True))

    return named


def _value_sizes(model: LoadedModel) -> dict[str, int]:
    """Bytes of every value whose shape onnx's inference knows (unknown dims count 1)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_large_weights(model))
    except Exception:  # advisory only: unknown sizes just share a group
        return {}
    out: dict[str, int] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        try:
            item = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
        except (KeyError, TypeError, ValueError):
            item = 4
        out[vi.name] = int(np.prod(dims, dtype=np.int64)) * item
    return out


def _without_large_weights(model: LoadedModel) -> onnx.ModelProto:
    """The model with every initializer over 1 KiB declared as a graph input instead (shape
    inference needs their shapes, not their bytes; small ones may be shapes it reads).
    The large ones of :meth:`LoadedModel.load` are references already (no bytes read)."""
    light = onnx.ModelProto()
    _copy_without_weights(model.proto, light)
    for t in model.initializers.values():
        if len(t.raw_data) <= LIGHT_BYTES and not t.HasField("data_location"):
            light.graph.initializer.append(t)
        else:
            light.graph.input.append(
                onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
            )
    return light


@dataclasses.dataclass
class _Accumulator:
    elements: int = 0
    max_rel: float = 0.0
    failures: int = 0
    first: TensorFailure | None = None
    first_index: int = -1

    def add(self, index: int, failure: TensorFailure | None, elements: int, rel: float) -> None:
        self.elements += elements
        self.max_rel = max(self.max_rel, rel)
        if failure is None:
            return
        self.failures += 1
        if self.first is None or index < self.first_index:
            self.first, self.first_index = failure, index

    def result(self, tensors: int, groups: int) -> TensorCheckResult:
        return TensorCheckResult(
            passed=self.first is None and self.elements > 0,
            tensors=tensors,
            elements=self.elements,
            max_rel_err=self.max_rel,
            groups=groups,
            failure=self.first,
            failures=self.failures,
        )


@dataclasses.dataclass(frozen=True)
class _Job:
    """One group checked on one set of tensors."""

    plan: _Plan
    group: Sequence[str]
    arrays: Mapping[str, np.ndarray]  # the original's tensors (recorded or mirrored)
    scales: TensorScales
    floors: Mapping[str, float]
    rtol: float
    label: str


def _group_feeds(job: _Job, cut: _Cut, scaled: bool) -> dict[str, np.ndarray]:
    """A cut model's inputs: the job's tensors (graph inputs and boundary), ``s ⊙`` them
    for the teleported model (*scaled*)."""
    arrays, scales, inside = job.arrays, job.scales, set(job.group)
    names = [n for n in job.plan.graph_inputs if n in arrays] + list(cut.boundary)
    return {
        _fed_name(n, inside): scales.rounded(n, arrays[n]) if scaled else arrays[n] for n in names
    }


def _check_group(
    ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], job: _Job, acc: _Accumulator
) -> None:
    """Compare each value of the group the teleported cut model gave (*got*, run on
    ``s ⊙`` the tensors) with ``s ⊙`` the original's (*ref*)."""
    arrays, scales = job.arrays, job.scales
    index = {n: i for i, n in enumerate(job.plan.cut)}
    mags: dict[str, float] = {}  # max|s ⊙ x| of each fed tensor, once per pass

    def magnitude(x: str) -> float:
        if x not in mags:
            mags[x] = scales.peak(x, arrays[x])
        return mags[x]

    for name in job.group:
        in_mag = max((magnitude(x) for x in job.plan.inputs_of[name] if x in arrays), default=0.0)
        node, floor = job.plan.producer[name], job.floors.get(name, 0.0)
        slabs = _scaled_extremes(scales, name, ref[name], got[name])
        if slabs is not None:  # every element finite: the same figures, slab by slab
            failure, elements, rel = _judge(name, node, *slabs, job.rtol, floor, in_mag, job.label)
        else:
            failure, elements, rel = _compare_tensor(
                name, node, scales.apply(name, ref[name]), got[name],
                job.rtol, floor, in_mag, job.label,
            )  # fmt: skip
        acc.add(index[name], failure, elements, rel)


#: Elements per slab of :func:`_scaled_extremes` (float64: 256 KiB, a core's L2 cache).
SLAB_ELEMENTS = 1 << 15


def _scaled_extremes(
    scales: TensorScales, name: str, ref: np.ndarray, got: np.ndarray
) -> tuple[float, float, int] | None:
    """``(max |a - got|, max |a|, elements)`` with ``a = s ⊙ ref`` in float64, as
    :func:`_compare_tensor` computes them from :meth:`TensorScales.apply`'s ``a``, slab by
    slab (:data:`SLAB_ELEMENTS`; the full-size float64 ``a`` and ``a - got``, and the four
    passes over them, never formed: a slab's product, difference and extremes stay in
    cache).  Each element's ``a`` and ``a - got`` are the very same float64 numbers
    (one rounding each), so the maxima are equal.  None where this does not apply (then
    the whole-array path runs): other shapes or dtypes than real floats, a scale that
    does not broadcast, or a non-finite element (NaN/inf take the masked path)."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape or ref.dtype.kind != "f" or got.dtype.kind != "f" or not ref.size:
        return None
    s = scales.scales.get(name)
    fitted = np.ones((1,) * ref.ndim) if s is None else _fit(s, ref.ndim)
    if fitted.ndim != ref.ndim or any(
        d not in (1, n) for d, n in zip(fitted.shape, ref.shape, strict=True)
    ):
        return None
    wide = np.result_type(ref.dtype, np.float64)
    spread = np.broadcast_to(fitted, ref.shape)
    a_buf = np.empty(min(ref.size, SLAB_ELEMENTS), dtype=wide)
    d_buf = np.empty_like(a_buf)
    max_diff = max_a = 0.0
    for at in _slabs(ref.shape, SLAB_ELEMENTS):
        r = ref[at]
        a = a_buf[: r.size].reshape(r.shape)
        np.multiply(r, spread[at], out=a, dtype=wide)
        d = d_buf[: r.size].reshape(r.shape)
        np.subtract(a, got[at], out=d, dtype=wide)
        slab_diff = max(float(d.max()), -float(d.min()))
        slab_a = max(float(a.max()), -float(a.min()))
        if not (math.isfinite(slab_diff) and math.isfinite(slab_a)):
            return None  # (max() would drop a NaN)
        max_diff, max_a = max(max_diff, slab_diff), max(max_a, slab_a)
    return max_diff, max_a, ref.size


def _slabs(shape: tuple[int, ...], limit: int) -> Iterator[tuple[int | slice, ...]]:
    """Indices that cut an array of ``shape`` into slabs of at most ``limit`` elements
    (or one element of each leading index, where the last axis alone is longer), in
    C order: whole trailing axes, a range of the axis before them, single indices of
    the axes before that."""
    k, inner = len(shape), 1
    while k > 0 and inner * shape[k - 1] <= limit:
        k -= 1
        inner *= shape[k]
    if k == 0:
        yield ()
        return
    step = max(1, limit // inner)
    for lead in np.ndindex(*shape[: k - 1]):
        for start in range(0, shape[k - 1], step):
            yield (*lead, slice(start, min(start + step, shape[k - 1])))


def _max_abs_diff(a: np.ndarray, got: np.ndarray) -> float:
    """``max |a - got|`` (0 for no elements), computed in ``a``'s dtype, or NaN when an
    element of either is not finite.  Without a mask: ``a - got`` is finite exactly where
    both are (inf - x is inf, inf - inf and NaN - x are NaN), and a NaN or inf difference
    makes the largest or smallest difference NaN or infinite."""
    if not a.size:
        return 0.0
    diff = np.subtract(a, got, dtype=a.dtype)
    if diff.dtype.kind == "c":
        peak = float(np.max(np.abs(diff)))
    else:
        peak = max(float(diff.max()), -float(diff.min()))
    return peak if math.isfinite(peak) else math.nan


def compare_tensor(
    name: str,
    node: onnx.NodeProto,
    expected: np.ndarray,
    got: np.ndarray,
    rtol: float,
    *,
    floor: float = 0.0,
    in_mag: float = 0.0,
    label: str = "recorded",
) -> tuple[TensorFailure | None, int, float]:
    """Compare *got* with *expected* (``s ⊙`` the reference) for the value *name* that
    *node* computes: the rule of the node-local check (``max|a - b| <= rtol · scale``,
    scale from :func:`tolerance_scale`; NaN/inf must agree).  Returns (the failure or
    None, finite elements compared, relative error)."""
    return _compare_tensor(name, node, expected, got, rtol, floor, in_mag, label)


def _compare_tensor(
    name: str,
    node: onnx.NodeProto,
    expected: np.ndarray,
    got: np.ndarray,
    rtol: float,
    floor: float,
    in_mag: float,
    label: str,
) -> tuple[TensorFailure | None, int, float]:
    """(failure or None, finite elements compared, relative error) for one tensor."""
    expected, got = np.asarray(expected), np.asarray(got)

    def fail(reason: str, abs_err: float = np.inf, rel: float = np.inf) -> TensorFailure:
        return TensorFailure(name, node.name, node.op_type, abs_err, rel, reason, label)

    if expected.shape != got.shape:
        return fail(f"shape {list(got.shape)}, expected {list(expected.shape)}"), 0, np.inf
    if expected.dtype.kind not in "fc":
        if np.array_equal(expected, got):
            return None, expected.size, 0.0
        return fail(f"{expected.dtype} values differ"), 0, np.inf
    wide = np.complex128 if expected.dtype.kind == "c" else np.float64
    a = expected.astype(wide, copy=False)
    max_abs = _max_abs_diff(a, got)  # NaN when some element of either is not finite
    compared = a.size
    if not math.isfinite(max_abs):
        b = got.astype(wide, copy=False)
        fa, fb = np.isfinite(a), np.isfinite(b)
        why = nonfinite_mismatch(a, b, fa, fb)
        if why is not None:
            return fail(why), 0, np.inf
        diff, compared = np.abs(a[fa] - b[fa]), int(fa.sum())
        max_abs = float(np.max(diff, initial=0.0))
    peak = tolerance_scale(a)
    return _judge(name, node, max_abs, peak, compared, rtol, floor, in_mag, label)


def _judge(
    name: str,
    node: onnx.NodeProto,
    max_abs: float,
    peak: float,
    compared: int,
    rtol: float,
    floor: float,
    in_mag: float,
    label: str,
) -> tuple[TensorFailure | None, int, float]:
    """The verdict on one tensor from ``max |a - b|`` and ``max |a|`` over its ``compared``
    finite elements: ``max|a - b| <= rtol · max(peak, floor, in_mag)``."""
    scale = max(peak, floor, in_mag)  # tolerance_scale's rule
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf)
    if max_abs > rtol * scale:
        failure = TensorFailure(
            name, node.name, node.op_type, max_abs, rel,
            f"max abs err {max_abs:.3g} (rel {rel:.3g}) exceeds rtol", label,
        )  # fmt: skip
        return failure, 0, rel
    return None, compared, rel

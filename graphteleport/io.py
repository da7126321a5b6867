"""Loading and saving ONNX models safely.

Loading goes through :func:`onnx_ir.load`, which memory-maps external data instead of
reading it, and then checks that the file is a *complete* model: protobuf happily
parses a file cut at a field boundary (an empty file is a valid, empty ``ModelProto``),
so a truncated download would otherwise look like a model with no graph, no opset
imports or missing weights.  Every failure becomes one :class:`InputError` line.

Saving is atomic and staged.  :func:`staged_save` writes the model (and its external
data) into a private temporary directory beside the target, lets the caller check the
files — the CLI runs onnxruntime on them — and only :meth:`StagedSave.commit` renames
them into place, data file first, model file last, then any companion file staged with
:meth:`StagedSave.stage_file` (the CLI's report).  Anything else (an exception, a
signal, or leaving the ``with`` block without committing) deletes the temporaries and
leaves the targets untouched; SIGINT/SIGTERM are held back during the renames, so a
commit is all or nothing.  Paths listed in ``protect`` (the CLI's input model) and the
files the model still reads its weights from are never overwritten.

Paths are checked before any work (:func:`check_paths`): every input must be a regular
file (a FIFO is never opened), every output a regular file or a new name in an existing
directory, and no output may name an input or another output — through ``..``,
symbolic or hard links alike.

Example::

    model = load_model("in.onnx")
    with staged_save(model, "out.onnx", protect=["in.onnx"]) as staged:
        verify(original="in.onnx", teleported=staged.model_path, feeds=feeds)
        staged.commit()
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import mmap
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir import external_data as ir_external_data

from graphteleport.errors import InputError
from graphteleport.interrupts import signals_held as _signals_held
from graphteleport.wire import MIN_SWAP_BYTES, hollow_encoding, raw_data_spans, save_inline

__all__ = [
    "EXTERNAL_DATA_THRESHOLD_BYTES",
    "DataFile",
    "StagedSave",
    "StreamedSave",
    "check_paths",
    "check_regular_file",
    "external_data_files",
    "initializer_nbytes",
    "load_model",
    "output_data_path",
    "save_model_atomic",
    "staged_save",
    "staged_stream",
    "view_inline_initializers",
    "write_file_atomic",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Above this many bytes of initializers a model is saved with external data by default
#: (protobuf cannot serialise a message over 2 GiB; 1.5 GiB leaves room for the graph).
EXTERNAL_DATA_THRESHOLD_BYTES = int(1.5 * 2**30)
_PROTOBUF_LIMIT_BYTES = 2**31 - 1
#: Standard domains a node may use without a matching local function.
_ONNX_DOMAIN_ALIASES = {"": "", "ai.onnx": ""}


# --------------------------------------------------------------------------- loading


def load_model(path: PathLike) -> ir.Model:
    """Load an ONNX model, memory-mapping its external data, and check it is usable.

    Contract: returns an :class:`onnx_ir.Model` whose graph has nodes and outputs,
    whose nodes' domains and ``ai.onnx`` opset are known, whose every graph reads each
    value only after a node, input or initializer (of it or an enclosing graph) defines
    it, whose graph outputs are all defined, whose inline initializers hold exactly the
    bytes their shapes need, whose external data files lie inside the model's folder,
    exist and are long enough, and which :func:`onnx.checker.check_model` accepts.
    Otherwise raises :class:`InputError` with one line naming the file and the problem:
    missing, a directory or another non-regular file (a FIFO is never opened), not
    ONNX, truncated/corrupt, sparse initializers (not rewritten, so refused), external
    data outside the folder, undefined or out-of-order values, missing weights.
    Tensor data is not copied: external tensors stay memory-mapped, lazily, and inline
    initializers are views of the bytes read (:func:`view_inline_initializers`); the
    large ones are not even parsed (:func:`graphteleport.wire.hollow_encoding`).
    """
    if not os.fspath(path):
        raise InputError("the model file path is empty")
    p = Path(path)
    _check_is_readable_file(p)
    content, proto, hollowed = _parse(p)
    _check_no_sparse_initializers(proto, p)
    model = _deserialize(proto, p)
    del proto  # (the graph is the model's now; a hollow proto held no weights)
    spans = raw_data_spans(content) if content is not None else {}
    _check_complete(model, p, {name: length for name, (_, length) in spans.items()})
    inline = not external_data_files(model)  # then the bytes read are the whole model
    _check_with_onnx_checker(p, content if inline else None)
    if content is not None:
        _fill_hollow(model, content, spans, hollowed)
        view_inline_initializers(model, content, spans)
    logger.debug("loaded %s: %d nodes, opsets %s", p, len(model.graph), model.opset_imports)
    return model


def check_regular_file(path: PathLike, what: str) -> Path:
    """Return *path* if it names an existing regular file (links followed), else raise.

    Uses :func:`os.stat` only: a FIFO, device or socket is refused without being
    opened (opening a FIFO blocks until a writer appears).  *what* names the file in
    the one-line :class:`InputError` ("model file", "inputs file", ...).
    """
    p = Path(path)
    if not os.fspath(path):
        raise InputError(f"the {what} path is empty")
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise InputError(f"{what} not found: {p}") from None
    except OSError as e:
        raise InputError(f"cannot access {what} {p}: {e.strerror or e}") from e
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} is a directory, not a file: {p}")
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {p} is {_file_kind(mode)}, not a regular file")
    return p


def _file_kind(mode: int) -> str:
    """'a FIFO', 'a socket', ... for a non-regular file's ``st_mode``."""
    kinds = [
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _check_is_readable_file(p: Path) -> None:
    """Raise InputError unless *p* is an existing, readable, non-empty regular file."""
    if not p.exists():
        raise InputError(f"model file not found: {p}")
    if p.is_dir():
        raise InputError(f"model path is a directory, not an ONNX file: {p}")
    check_regular_file(p, "model file")
    try:
        with p.open("rb") as f:
            first = f.read(1)
    except OSError as e:
        raise InputError(f"cannot read model file {p}: {e.strerror or e}") from e
    if not first:
        raise InputError(f"model file is empty: {p}")


Hollowed = Mapping[str, tuple[int, int]]


def _parse(p: Path) -> tuple[bytes | None, onnx.ModelProto, Hollowed]:
    """The file's ModelProto, external data not loaded (what :func:`onnx_ir.load` reads),
    the bytes read when they are binary protobuf (the checker takes them rather than
    reading and decoding the file a second time), and the initializers whose bytes the
    proto lacks: binary protobuf is parsed hollow (:func:`~graphteleport.wire.hollow_encoding`:
    the large weights' ``raw_data`` empty, ``{name: (start, end)}`` of their messages in
    the bytes; :func:`_fill_hollow` gives them their bytes back), else whole."""
    fmt = onnx.serialization.registry.get_format_from_file_extension(p.suffix) or "protobuf"
    try:
        content = p.read_bytes()
        if fmt != "protobuf":
            return None, onnx.load_model_from_string(content, format=fmt), {}
        hollow = hollow_encoding(content, MIN_SWAP_BYTES)
        encoding, hollowed = hollow if hollow is not None else (content, {})
        # as onnx.load(p) reads it (hollow: the same proto, the large raw_data empty)
        return content, onnx.load_model_from_string(encoding, format=fmt), hollowed
    except DecodeError as e:
        raise InputError(_decode_error_message(p)) from e
    except Exception as e:  # onnx and protobuf raise many types on corrupt input
        raise InputError(f"cannot load {p} as an ONNX model: {_one_line(e)}") from e


def _fill_hollow(model: ir.Model, content: bytes, spans: Mapping[str, tuple[int, int]],
                 hollowed: Hollowed) -> None:  # fmt: skip
    """Give each initializer parsed hollow (:func:`_parse`) its bytes: a read-only view of
    ``content`` where its bytes are plainly its array (:func:`_span_array`), else its own
    message parsed from ``content`` (``hollowed``: where it lies)."""
    for name, (start, end) in hollowed.items():
        value = model.graph.initializers.get(name)
        tensor = None if value is None else value.const_value
        if value is None or not isinstance(tensor, ir.TensorProtoTensor):
            continue
        span = spans.get(name)
        array = None
        if sys.byteorder == "little" and span is not None:
            array = _span_array(tensor, content, span)
        if array is not None:
            value.const_value = ir.Tensor(
                array, dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string
            )
        else:
            value.const_value = ir.serde.TensorProtoTensor(
                onnx.TensorProto.FromString(content[start:end])
            )


def view_inline_initializers(
    model: ir.Model, content: bytes, spans: Mapping[str, tuple[int, int]]
) -> None:
    """Give each main-graph initializer stored inline a tensor over its bytes in
    ``content`` (the model file as read; ``spans``: each one's ``(offset, length)`` there,
    :func:`graphteleport.wire.raw_data_spans`): ``np.frombuffer``, no copy, where reading
    a proto-backed tensor copies its ``raw_data`` each time.  Only where every proto-backed
    tensor of the model is such an initializer (no Constant-node tensor, subgraph
    initializer or function): another would keep the parsed proto, and so a second copy
    of the weights, alive beside ``content``."""
    if sys.byteorder != "little" or not spans or model.functions or _held_protos(model):
        return
    for value in model.graph.initializers.values():
        tensor = value.const_value
        span = spans.get(value.name or "")
        if not isinstance(tensor, ir.TensorProtoTensor) or span is None:
            continue
        array = _span_array(tensor, content, span)
        if array is not None:
            value.const_value = ir.Tensor(
                array, dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string
            )


_VIEWED_FIELDS = frozenset({"dims", "data_type", "name", "raw_data", "doc_string"})


def _span_array(
    tensor: ir.TensorProtoTensor, content: bytes, span: tuple[int, int]
) -> np.ndarray | None:
    """``tensor``'s values as a read-only view of ``content`` at ``span``, or None where the
    bytes are not plainly its array (packed or wide types, other proto fields, a length
    that does not match)."""
    dtype = tensor.dtype
    if dtype.bitwidth not in (8, 16, 32, 64) or dtype == ir.DataType.STRING:
        return None
    if _other_fields(tensor.raw) or tensor.metadata_props:
        return None
    np_dtype = np.dtype(dtype.numpy())
    offset, length = span
    if np_dtype.itemsize * tensor.size != length:
        return None
    array = np.frombuffer(content, dtype=np_dtype, count=tensor.size, offset=offset)
    return array.reshape(tensor.shape.numpy())


def _other_fields(proto: onnx.TensorProto) -> bool:
    """Whether ``proto`` sets a field beyond :data:`_VIEWED_FIELDS` (asked field by field:
    ``ListFields`` would copy ``raw_data``)."""
    for fd in proto.DESCRIPTOR.fields:
        if fd.name in _VIEWED_FIELDS:
            continue
        if fd.is_repeated:
            if len(getattr(proto, fd.name)):
                return True
        elif proto.HasField(fd.name):
            return True
    return False


def _held_protos(model: ir.Model) -> bool:
    """Whether a tensor other than a main-graph initializer is proto-backed."""
    for graph in model.graphs():
        if graph is not model.graph and any(
            isinstance(v.const_value, ir.TensorProtoTensor) for v in graph.initializers.values()
        ):
            return True
        for node in graph:
            for attr in node.attributes.values():
                if isinstance(attr, ir.Attr) and attr.type in (
                    ir.AttributeType.TENSOR,
                    ir.AttributeType.TENSORS,
                ):
                    return True
    return False


def _deserialize(proto: onnx.ModelProto, p: Path) -> ir.Model:
    """*proto* as an onnx_ir model whose external tensors resolve beside *p*.

    This is :func:`onnx_ir.load` after the parse.  onnx_ir's own warnings about a
    broken graph are silenced: :func:`_check_complete` names the problem in one line.
    """
    try:
        with _quiet_logger("onnx_ir"):
            model = ir.serde.deserialize_model(proto)
    except Exception as e:  # onnx_ir raises many types on malformed graphs
        cause: BaseException = e
        while cause.__cause__ is not None:  # SerdeError wraps the reason
            cause = cause.__cause__
        raise InputError(f"{p} is not a valid ONNX model: {_one_line(cause)}") from e
    ir_external_data.set_base_dir(model.graph, os.path.dirname(os.path.abspath(p)))
    return model


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Drop the warnings of logger *name* for the duration (restores its level)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_no_sparse_initializers(proto: onnx.ModelProto, p: Path) -> None:
    """Refuse sparse initializers: onnx_ir drops them, so the output would lack them."""
    names = list(_sparse_initializer_names(proto.graph))
    if names:
        listed = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        raise InputError(
            f"{p} has {len(names)} sparse initializer{'s' if len(names) > 1 else ''} "
            f"({listed}); graphteleport rewrites dense weights only: store them densely"
        )


def _sparse_initializer_names(graph: onnx.GraphProto) -> Iterator[str]:
    """Names of the sparse initializers of *graph* and of every subgraph in it."""
    for sparse in graph.sparse_initializer:
        yield sparse.values.name
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _sparse_initializer_names(attr.g)
            for sub in attr.graphs:
                yield from _sparse_initializer_names(sub)


def _check_with_onnx_checker(p: Path, content: bytes | None = None) -> None:
    """Run :func:`onnx.checker.check_model` on the file (schemas, attributes, SSA, IR):
    on ``content``, its bytes already read, when given (a model without external data,
    under protobuf's 2 GiB: the same check), else on the path."""
    source: bytes | str = os.path.abspath(p)
    if content is not None and len(content) <= onnx.checker.MAXIMUM_PROTOBUF:
        source = content
    try:
        onnx.checker.check_model(source)
    except onnx.checker.ValidationError as e:
        raise InputError(f"{p} is not a valid ONNX model: {_one_line(e)}") from e


def _decode_error_message(p: Path) -> str:
    """Say whether an undecodable file looks like a damaged ONNX file or something else.

    Every ONNX serialiser writes ``ir_version`` (field 1, varint: tag byte 0x08) first.
    """
    with p.open("rb") as f:
        first = f.read(1)
    if first == b"\x08":
        return f"{p} is a truncated or corrupt ONNX file (protobuf decoding failed)"
    return f"{p} is not an ONNX model file (protobuf decoding failed)"


def _check_complete(model: ir.Model, p: Path, raw_lengths: Mapping[str, int]) -> None:
    """Raise InputError if *model* (loaded from *p*) is empty, cut short or lacks weights.
    *raw_lengths*: the ``raw_data`` lengths of main-graph initializers, read from the file's
    encoding (:func:`graphteleport.wire.raw_data_spans`; others are measured)."""
    if model.ir_version <= 0 and not model.graph.outputs and len(model.graph) == 0:
        raise InputError(f"{p} is not an ONNX model (no ir_version or graph found)")
    problem = _structure_problem(model) or _initializer_problem(model, raw_lengths)
    if problem is not None:
        raise InputError(
            f"{p} is not a complete ONNX model ({problem}); the file may be truncated or corrupt"
        )
    problem = _opset_problem(model) or _scope_problem(model.graph, frozenset())
    if problem is not None:
        raise InputError(f"{p} is not a valid ONNX model: {problem}")
    _check_external_data(model, p)


def _structure_problem(model: ir.Model) -> str | None:
    """Describe what is missing from the model's top-level structure, or None."""
    graph = model.graph
    if len(graph) == 0:
        return "the graph has no nodes"
    if not graph.outputs:
        return "the graph has no outputs"
    if not model.opset_imports:
        return "it imports no operator sets"
    known = {_ONNX_DOMAIN_ALIASES.get(d, d) for d in model.opset_imports}
    known |= {domain for (domain, _name, _overload) in model.functions}
    for node in graph:
        domain = _ONNX_DOMAIN_ALIASES.get(node.domain, node.domain)
        if domain not in known:
            return f"node '{node.name}' ({node.op_type}) uses unimported domain '{node.domain}'"
    return None


def _opset_problem(model: ir.Model) -> str | None:
    """An ``ai.onnx`` opset this onnx does not know (0, negative or newer), or None."""
    newest = onnx.defs.onnx_opset_version()
    for domain in ("", "ai.onnx"):
        version = model.opset_imports.get(domain)
        if version is not None and not 1 <= version <= newest:
            return f"it imports ai.onnx opset {version}; opsets 1 to {newest} exist"
    return None


def _scope_problem(graph: ir.Graph, outer: frozenset[ir.Value]) -> str | None:
    """The first value *graph* reads before anything defines it, or None.

    ONNX graphs are topologically sorted: a node may read a graph input, an
    initializer, an earlier node's output or (in a subgraph) a value defined before
    the node that owns the subgraph.  A value nothing defines (a dangling name) and
    one defined only later (unsorted nodes, a cycle) both break that rule; the
    analysis reads nodes in order, so either would mis-teleport.  Graph outputs must
    be defined too.
    """
    defined = set(outer) | set(graph.inputs) | set(graph.initializers.values())
    for node in graph:
        for value in node.inputs:
            if value is not None and value not in defined:
                return _undefined_read(node, value)
        for sub in _node_subgraphs(node):
            problem = _scope_problem(sub, frozenset(defined))
            if problem is not None:
                return problem
        defined.update(node.outputs)
    for value in graph.outputs:
        if value not in defined:
            return f"graph output '{value.name}' is not produced by any node, input or initializer"
    return None


def _undefined_read(node: ir.Node, value: ir.Value) -> str:
    """Why *node* may not read *value* here (see :func:`_scope_problem`)."""
    where = f"node '{node.name}' ({node.op_type}) reads '{value.name}'"
    if value.producer() is not None:
        return f"{where} before it is produced (the nodes are not topologically sorted, or cycle)"
    return f"{where}, which no node, graph input or initializer defines"


def _node_subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    """The graphs held by *node*'s attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attributes.values():
        if not isinstance(attr, ir.Attr):
            continue
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.as_graphs()


def _initializer_problem(model: ir.Model, raw_lengths: Mapping[str, int]) -> str | None:
    """Check each inline initializer's raw bytes against its shape and dtype (the length
    of a main-graph one from *raw_lengths* when there: reading ``raw_data`` copies it)."""
    for graph in model.graphs():
        known = raw_lengths if graph is model.graph else {}
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.TensorProtoTensor):
                continue
            proto = tensor.raw
            if not proto.HasField("raw_data") or tensor.dtype == ir.DataType.STRING:
                continue
            needed = (tensor.size * tensor.dtype.bitwidth + 7) // 8  # sub-byte types packed
            name = value.name or ""
            held = known[name] if name and name in known else len(proto.raw_data)
            if held != needed:
                return (
                    f"initializer '{value.name}' holds {held} bytes, "
                    f"its shape {tensor.shape} {tensor.dtype.name} needs {needed}"
                )
    return None


def _check_external_data(model: ir.Model, p: Path) -> None:
    """Raise InputError if an external tensor's file lies outside the model's folder,
    is missing or is shorter than it needs."""
    sizes: dict[str, int] = {}
    for tensor in _all_external_tensors(model):
        problem = _location_problem(tensor)
        if problem is not None:
            raise InputError(f"external data of tensor '{tensor.name}' of {p} {problem}")
        data_path = os.fspath(tensor.path)
        if data_path not in sizes and os.path.lexists(data_path):
            check_regular_file(data_path, "external data file")  # a FIFO would block mmap
        if data_path not in sizes:
            if not os.path.isfile(data_path):
                raise InputError(
                    f"external data file not found: {data_path} (tensor '{tensor.name}' of {p}; "
                    "keep the data file next to the model)"
                )
            sizes[data_path] = os.path.getsize(data_path)
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[data_path]:
            raise InputError(
                f"external data file {data_path} is truncated: tensor '{tensor.name}' of {p} "
                f"needs bytes up to {end}, the file has {sizes[data_path]}"
            )


def _location_problem(tensor: ir.ExternalTensor) -> str | None:
    """Why onnx_ir would refuse to read *tensor*'s file (it does so late), or None.

    The rules onnx_ir enforces when it first reads the data: the location is
    relative, stays inside the model's folder lexically (no ``..`` out of it) and
    after following symbolic links, and the file has a single hard link.
    """
    location = os.fspath(tensor.location)
    inside = "keep the data file in the model's folder, at a relative location"
    if os.path.isabs(location):
        return f"has an absolute location ({location}); {inside}"
    base = os.path.abspath(tensor.base_dir)
    if not _inside(os.path.normpath(os.path.join(base, location)), base):
        return f"points outside the model's folder ({location}); {inside}"
    real = os.path.realpath(os.path.join(base, location))
    if not _inside(real, os.path.realpath(base)):
        return f"is a symbolic link out of the model's folder ({location} -> {real}); {inside}"
    with contextlib.suppress(OSError):
        if os.stat(real).st_nlink > 1:
            return (
                f"is a file with several hard links ({location}), which onnx_ir refuses to "
                "read; give it a copy of its own"
            )
    return None


def _inside(path: str, folder: str) -> bool:
    """True if the normalised *path* is *folder* or lies below it."""
    folder = folder.rstrip(os.sep) + os.sep
    return path == folder.rstrip(os.sep) or path.startswith(folder)


def _all_external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every external tensor the model reads: initializers and node attributes
    (a ``Constant``'s value), in every graph."""
    yield from _external_tensors(model)
    for graph in model.graphs():
        for node in graph:
            for attr in node.attributes.values():
                if not isinstance(attr, ir.Attr):
                    continue
                if attr.type == ir.AttributeType.TENSOR:
                    tensors = [attr.value]
                elif attr.type == ir.AttributeType.TENSORS:
                    tensors = list(attr.value)
                else:
                    continue
                yield from (t for t in tensors if isinstance(t, ir.ExternalTensor))


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Yield every initializer tensor of every graph that lives in an external file."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def external_data_files(model: ir.Model) -> list[Path]:
    """The external data files the (lazily loaded) *model* still reads its weights from."""
    return sorted({Path(os.path.abspath(t.path)) for t in _all_external_tensors(model)})


def _one_line(e: BaseException) -> str:
    """An exception's message condensed to a single line."""
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- saving


class StagedSave:
    """A model written to temporary files beside its target, waiting to be committed.

    Attributes:
        model_path: the temporary model file; load it to check the output before commit.
        data_path: its temporary external data file, or None when the weights are inline.
        target: where :meth:`commit` puts the model.
        data_target: where :meth:`commit` puts the external data (``<target>.data``), or None.

    Created by :func:`staged_save`; its temporary directories are removed when the
    ``with`` block ends whether or not :meth:`commit` ran.
    """

    def __init__(self, tmpdir: Path, target: Path, data_name: str | None) -> None:
        self._tmpdir = tmpdir
        self._dirs = {target.parent: tmpdir}  # one private temporary directory per folder
        self._companions: list[tuple[Path, Path]] = []  # (staged temporary, final path)
        self.target = target
        self.model_path = tmpdir / target.name
        self.data_path = tmpdir / data_name if data_name else None
        self.data_target = target.parent / data_name if data_name else None
        self.committed = False

    @property
    def paths(self) -> list[Path]:
        """The final model paths :meth:`commit` writes, model first (companions not included)."""
        return [self.target] + ([self.data_target] if self.data_target else [])

    def drop_empty_data(self) -> None:
        """Forget (and delete) the data file when no tensor was big enough to go there."""
        if self.data_path is not None and self.data_path.stat().st_size == 0:
            self.data_path.unlink()
            self.data_path = self.data_target = None

    def stage_file(self, target: PathLike, data: bytes) -> Path:
        """Write *data* to a temporary that :meth:`commit` renames to *target* after the model.

        The temporary lies in a private directory in *target*'s own folder (the model's
        when they share one), so its rename is atomic and never crosses filesystems.
        A file that cannot be staged raises :class:`InputError` before anything is
        committed.  Returns the final path.
        """
        final = Path(os.path.abspath(target))
        check_output_target(final, "output file")
        if final.parent not in self._dirs:
            self._dirs[final.parent] = _make_tmpdir(final.parent)
        fd, name = tempfile.mkstemp(dir=self._dirs[final.parent], suffix=".staged")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as e:
            raise InputError(f"cannot write {final}: {e.strerror or e}") from e
        self._companions.append((Path(name), final))
        return final

    def commit(self) -> list[Path]:
        """Rename the temporaries into place (data, then model, then companions).

        Each rename is atomic (same directory, so same filesystem), and SIGINT/SIGTERM
        are held back until all are done, so an interrupt never leaves a model without
        its data or a report without its model.  Returns the model paths.  Raises
        :class:`InputError` if called twice or if a rename fails.
        """
        if self.committed:
            raise InputError(f"{self.target} was already committed")
        moves = [(self.data_path, self.data_target), (self.model_path, self.target)]
        moves += self._companions
        with _signals_held():
            for tmp, final in moves:
                if tmp is None or final is None:
                    continue
                try:
                    os.replace(tmp, final)
                except OSError as e:
                    raise InputError(f"cannot write {final}: {e.strerror or e}") from e
            self.committed = True
        logger.info("wrote %s", ", ".join(str(f) for _, f in moves if f is not None))
        return self.paths

    def discard(self) -> None:
        """Delete the temporary directories and everything in them (idempotent)."""
        for tmpdir in self._dirs.values():
            shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def staged_save(
    model: ir.Model,
    path: PathLike,
    *,
    external_data: bool | None = None,
    protect: Sequence[PathLike] = (),
) -> Iterator[StagedSave]:
    """Write *model* to temporaries beside *path*; commit them only if the caller does.

    Args:
        model: the model to write; it is not modified (external tensors stay mapped).
        path: the final model path; its directory must exist.
        external_data: True puts tensors over 256 bytes in ``<path>.data`` beside
            the model; False inlines everything (reading external tensors into memory);
            None chooses True when the model already has external tensors or more than
            :data:`EXTERNAL_DATA_THRESHOLD_BYTES` of initializers.
        protect: files that must never be overwritten (the input model and its data).
            The files *model* still reads external weights from are always protected.

    Yields:
        a :class:`StagedSave`; call its ``commit()`` inside the ``with`` block
        (after :meth:`StagedSave.stage_file` for files committed with the model).

    Raises:
        InputError: a protected target, a missing directory, an over-large inline
            model or a failed write.  Nothing at *path* changes and no temporary is left.
    """
    target = Path(os.path.abspath(path))
    use_external = _wants_external_data(model, external_data)
    data_name = f"{target.name}.data" if use_external else None
    _check_target(target, data_name, _kept(model, protect))
    staged = StagedSave(_make_tmpdir(target.parent), target, data_name)
    try:
        _write(model, staged.model_path, data_name)
        staged.drop_empty_data()
        yield staged
    finally:
        staged.discard()
        if not staged.committed:
            logger.debug("discarded staged output for %s", target)


def _kept(model: ir.Model, protect: Sequence[PathLike]) -> list[tuple[Path, str]]:
    """The files a save must not overwrite, each with the reason: ``protect`` and the
    files ``model`` still reads its weights from."""
    kept = [(Path(p), "it is a protected input") for p in protect]
    kept += [(p, "the model still reads its weights from it") for p in external_data_files(model)]
    return kept


def write_file_atomic(path: PathLike, data: bytes) -> Path:
    """Write *data* to *path* through a temporary beside it and one atomic rename.

    *path* is checked like an output of :func:`check_paths`; on any failure nothing
    at *path* changes, no temporary is left and :class:`InputError` is raised.
    """
    target = Path(os.path.abspath(path))
    check_output_target(target, "output file")
    tmpdir = _make_tmpdir(target.parent)
    try:
        tmp = tmpdir / target.name
        try:
            tmp.write_bytes(data)
            with _signals_held():
                os.replace(tmp, target)
        except OSError as e:
            raise InputError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return target


def output_data_path(
    model: ir.Model, path: PathLike, external_data: bool | None = None
) -> Path | None:
    """The data file :func:`staged_save` may write beside *path* (``<path>.data``), or None
    when the model will be saved inline."""
    if not _wants_external_data(model, external_data):
        return None
    target = Path(os.path.abspath(path))
    return target.parent / f"{target.name}.data"


def check_paths(
    inputs: Sequence[tuple[str, PathLike]], outputs: Sequence[tuple[str, PathLike]]
) -> None:
    """Refuse, before any work, files that cannot be used or that a run would destroy.

    Args:
        inputs: ``(role, path)`` for every file a run reads (the model, its external
            data, an ``.npz`` of feeds); each must be an existing regular file.
        outputs: ``(role, path)`` for every file a run writes (the model, its data
            file, the report); each must be a non-empty path in an existing, writable
            directory that is either new or a regular file.

    No output may be the same file as an input or as another output: paths are
    compared after resolving ``..`` and symbolic links, and by inode where both
    exist (hard links).  ``role`` names the file in the one-line :class:`InputError`.
    """
    for role, path in inputs:
        check_regular_file(path, role)
    for role, path in outputs:
        check_output_target(path, role)
    for i, (role, path) in enumerate(outputs):
        for in_role, in_path in inputs:
            if _same_file(Path(path), Path(in_path)):
                raise InputError(
                    f"refusing to overwrite {in_role} {in_path} with {role} {path}; "
                    "choose another path"
                )
        for other_role, other in outputs[:i]:
            if _same_file(Path(path), Path(other)):
                raise InputError(
                    f"{role} {path} and {other_role} {other} are the same file; "
                    "choose different paths"
                )


def check_output_target(path: PathLike, role: str) -> None:
    """Raise InputError unless *path* can be (re)written by a rename into its folder.

    The folder must exist and be writable; an existing *path* must be a regular file
    (or a link to one): a directory, FIFO, device or socket is never replaced.
    """
    if not os.fspath(path):
        raise InputError(f"the {role} path is empty")
    target = Path(os.path.abspath(path))
    if not target.parent.is_dir():
        raise InputError(f"output directory does not exist: {target.parent} ({role} {path})")
    try:
        mode: int | None = os.stat(target).st_mode
    except OSError:  # a new file (or a dangling link, which the rename replaces)
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise InputError(f"{role} names a directory, not a file: {path}")
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"{role} {path} is {_file_kind(mode)}; refusing to replace it")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {target.parent} ({role} {path}): permission denied")


def save_model_atomic(
    model: ir.Model, path: PathLike, *, external_data: bool | None = None
) -> list[Path]:
    """Write *model* to *path* atomically and return the paths written (model first).

    Same arguments and errors as :func:`staged_save`, committed immediately.
    """
    with staged_save(model, path, external_data=external_data) as staged:
        return staged.commit()


def _wants_external_data(model: ir.Model, external_data: bool | None) -> bool:
    """Resolve ``external_data=None`` to a decision (see :func:`staged_save`)."""
    if external_data is not None:
        return external_data
    if any(True for _ in _external_tensors(model)):
        return True
    return initializer_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


def initializer_nbytes(model: ir.Model) -> int:
    """Total bytes of every initializer in every graph, without loading external data."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def _check_target(target: Path, data_name: str | None, protect: Sequence[tuple[Path, str]]) -> None:
    """Raise InputError if writing *target* (and its data file) is unsafe or impossible.

    *protect* pairs each file that must not be overwritten with the reason why.
    """
    if not target.parent.is_dir():
        raise InputError(f"output directory does not exist: {target.parent}")
    if target.is_dir():
        raise InputError(f"output path is a directory: {target}")
    outputs = [target] + ([target.parent / data_name] if data_name else [])
    for out in outputs:
        for kept, why in protect:
            if _same_file(out, kept):
                raise InputError(f"refusing to overwrite {out}: {why} (choose another output path)")


def _same_file(a: Path, b: Path) -> bool:
    """True if *a* and *b* name the same file (``..``, hard and symbolic links included).

    Existing files are compared by device and inode; otherwise by their real paths
    (symbolic links followed as far as they exist).
    """
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _make_tmpdir(parent: Path) -> Path:
    """A private temporary directory in *parent*, so renames out of it are atomic."""
    try:
        return Path(tempfile.mkdtemp(prefix=".graphteleport-", dir=parent))
    except OSError as e:
        raise InputError(f"cannot write to {parent}: {e.strerror or e}") from e


def _write(model: ir.Model, model_path: Path, data_name: str | None) -> None:
    """Serialise *model* to *model_path*, weights to *data_name* beside it if given."""
    try:
        if data_name is not None:
            with _inlined_external_attributes(model):  # ir.save moves initializers only
                ir.save(model, model_path, external_data=data_name)
            return
        nbytes = initializer_nbytes(model)
        if nbytes > _PROTOBUF_LIMIT_BYTES:
            raise InputError(
                f"model weights total {nbytes / 2**30:.2f} GiB, over the 2 GiB limit of a "
                "single ONNX file; save with external data"
            )
        with _inlined_external_tensors(model), _inlined_external_attributes(model):
            save_inline(model, model_path)  # ir.save's bytes, weights copied once
    except OSError as e:
        raise InputError(f"cannot write {model_path.name}: {e.strerror or e}") from e


@contextlib.contextmanager
def _inlined_external_tensors(model: ir.Model) -> Iterator[None]:
    """Temporarily replace external initializers by in-memory copies (restored after)."""
    values = [
        v
        for graph in model.graphs()
        for v in graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    ]
    originals = [v.const_value for v in values]
    try:
        loaded = ir_external_data.convert_tensors_from_external(
            [t for t in originals if isinstance(t, ir.ExternalTensor)]
        )
        for value, tensor in zip(values, loaded, strict=True):
            value.const_value = tensor
        yield
    finally:
        for value, original in zip(values, originals, strict=True):
            value.const_value = original


@contextlib.contextmanager
def _inlined_external_attributes(model: ir.Model) -> Iterator[None]:
    """Temporarily give node attributes (a ``Constant``'s value) held in external data
    in-memory copies, restored after.

    :func:`onnx_ir.save` rewrites the external references of initializers only; an
    attribute's would keep its old location, relative to the new file's folder, and
    the saved model would not load.  Such attribute tensors are small constants.
    """
    swapped: list[tuple[ir.Node, str, ir.Attr]] = []
    try:
        for graph in model.graphs():
            for node in graph:
                for name, attr in list(node.attributes.items()):
                    inlined = _inlined_attribute(attr)
                    if inlined is not None:
                        node.attributes[name] = inlined
                        swapped.append((node, name, attr))
        yield
    finally:
        for node, name, attr in swapped:
            node.attributes[name] = attr


def _inlined_attribute(attr: object) -> ir.Attr | None:
    """An in-memory copy of a TENSOR/TENSORS attribute with external data, else None."""
    if not isinstance(attr, ir.Attr) or attr.type not in (
        ir.AttributeType.TENSOR,
        ir.AttributeType.TENSORS,
    ):
        return None
    tensors = [attr.value] if attr.type == ir.AttributeType.TENSOR else list(attr.value)
    if not any(isinstance(t, ir.ExternalTensor) for t in tensors):
        return None
    loaded = [
        ir_external_data.convert_tensors_from_external([t])[0]
        if isinstance(t, ir.ExternalTensor)
        else t
        for t in tensors
    ]
    value = loaded[0] if attr.type == ir.AttributeType.TENSOR else loaded
    return ir.Attr(attr.name, attr.type, value, doc_string=attr.doc_string)


# --------------------------------------------------------------------------- streaming

#: In-memory initializers of at most this many bytes stay inline in a streamed model.
INLINE_MAX = 256
#: Offsets of tensors in a :class:`DataFile` are multiples of this (aligned numpy views).
DATA_ALIGN = 64
_COPY_CHUNK = 1 << 26  # bytes per copy_file_range / pwrite call
#: Direct writes (``O_DIRECT``) cover whole blocks of this many bytes, from memory aligned
#: alike (a multiple of every logical block size in use: 512 and 4096).
DIRECT_ALIGN = 4096
_BOUNCE = 1 << 23  # bytes of the aligned buffer a direct copy reads the source into


def _no_progress(_: int) -> None:
    return None


class DataFile:
    """An external data file written one tensor at a time (the streaming save).

    :meth:`put` appends an array's bytes, :meth:`copy` the bytes of another file's
    external tensor, each at an offset aligned to :data:`DATA_ALIGN`; both return an
    :class:`onnx_ir.ExternalTensor` that reads them back lazily.  :meth:`copy` never
    decodes nor maps the tensor: ``os.copy_file_range`` has the kernel move the bytes
    (on ext4 a copy inside the kernel; btrfs and XFS may share the blocks instead), with
    ``pread``/``pwrite`` where the kernel refuses.  ``on_bytes`` is told the size of
    every tensor written (a progress bar's update).  The file is created new (``O_EXCL``).
    :meth:`scratch` lends the caller a buffer to compute the next :meth:`put`'s array in
    (two kept, reused: no fresh memory to fault in for every weight).

    With ``direct`` (where nothing reads the file back while it is written: the CLI's
    ``--no-verify``), the whole :data:`DIRECT_ALIGN`-byte blocks of each tensor are
    written with ``O_DIRECT`` from the caller's memory (a :meth:`scratch` buffer is
    aligned for it; a copied tensor goes through a reused aligned buffer, read with
    ``pread``), the partial blocks at its ends through the page cache: the bytes in the
    file are the same, but the kernel allocates and fills no page-cache page for them.
    Measured on this project's 2-core VM, buffered writes into fresh page-cache pages cost
    ~2 CPU-s per GB of system time (the first touch of guest memory; a `cp` pays it too),
    direct ones ~0.04.  Where the filesystem refuses ``O_DIRECT`` (tmpfs) or a write is
    not aligned, the bytes go through the page cache as without ``direct``.

    :meth:`precopy` copies tensors the final layout is expected to hold at known offsets
    ahead of time, on a background thread (while the range fit runs, before anything is
    put: :meth:`copy_ahead`): :meth:`copy` then finds such a tensor in place when its
    actual offset is the planned one, and otherwise drops every copy made ahead of
    time beyond the bytes written so far (the file truncated, the padding between
    tensors zeroed again) and copies as usual — the same bytes either way.
    """

    def __init__(
        self, path: Path, on_bytes: Callable[[int], None] = _no_progress, direct: bool = False
    ) -> None:
        self.path = path
        self.offset = 0
        self.on_bytes = on_bytes
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._direct = _Direct.open(path) if direct else None
        self._waited = 0.0  # seconds the caller waited for writes in flight (logged)
        self._sources: dict[str, int] = {}  # open source data files, by path
        self._reported = 0  # bytes told to on_bytes since the last rewind
        self._writer: list[ThreadPoolExecutor] = []  # made on the first put
        self._pending: Future[None] | None = None
        self._buffers: list[np.ndarray] = [np.empty(0, np.uint8) for _ in range(2)]
        self._busy = -1  # the buffer whose bytes the write in flight reads, if any
        self._extents: list[tuple[int, int]] = []  # (start, stop) of every tensor appended
        # copies made ahead of time: planned start and its job, by (path, offset, length)
        self._planned: dict[tuple[str, int, int], tuple[int, Future[None]]] = {}
        self._ahead: list[ThreadPoolExecutor] = []

    def scratch(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype`` (contents undefined) in one of
        two buffers this file keeps — never the one the write in flight reads — grown to
        the largest size asked.  It stays valid until the :meth:`put` after the one that
        stores it (the caller must not keep it past that: :meth:`put` it or drop it)."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        k = 1 if self._busy == 0 else 0
        if self._buffers[k].size < nbytes + DIRECT_ALIGN:
            self._buffers[k] = np.empty(0, np.uint8)  # (the old one freed first)
            self._buffers[k] = np.empty(nbytes + DIRECT_ALIGN, np.uint8)
        # starts where a direct write of the next put's blocks needs it (address ≡ offset)
        skip = (self._start() - self._buffers[k].ctypes.data) % DIRECT_ALIGN
        return self._buffers[k][skip : skip + nbytes].view(dtype).reshape(tuple(shape))

    def put(self, name: str, array: np.ndarray) -> ir.ExternalTensor:
        """Append ``array`` (C order) and return it as an external tensor named ``name``.

        The bytes are written by a background thread while the caller computes the next
        weight (one write in flight: ``array`` must not change until the next call); a
        write error is raised by the next :meth:`put`, :meth:`copy`, :meth:`rewind` or
        :meth:`close`, and the tensor returned is readable once :meth:`close` returned."""
        data = np.ascontiguousarray(array)
        raw = data.reshape(-1).view(np.uint8).data
        start = self._start()
        self.wait()
        self._settle(start, start + len(raw))  # (a copy ahead of time there: done first)
        self._busy = next(
            (k for k, b in enumerate(self._buffers) if b.size and np.may_share_memory(b, data)), -1
        )
        if not self._writer:
            self._writer.append(ThreadPoolExecutor(1, thread_name_prefix="gt-write"))
        write = self._direct.write if self._direct is not None else _pwrite_chunks
        self._pending = self._writer[0].submit(write, self._file(), raw, start)
        dtype = ir.DataType.from_numpy(data.dtype)
        return self._appended(name, dtype, data.shape, start, len(raw))

    def wait(self) -> None:
        """Wait for the write in flight; its error, if any, as an :class:`InputError`."""
        pending, self._pending = self._pending, None
        self._busy = -1
        try:
            if pending is not None:
                t = time.perf_counter()
                pending.result()
                self._waited += time.perf_counter() - t
        except OSError as e:
            raise InputError(f"cannot write {self.path.name}: {e.strerror or e}") from e

    def copy(self, tensor: ir.ExternalTensor) -> ir.ExternalTensor:
        """Append the bytes of ``tensor`` (another file's), copied by the kernel (or
        already, by :meth:`precopy`, if planned at this very offset)."""
        length = tensor.length if tensor.length is not None else tensor.nbytes
        start = self._start()
        self.wait()
        if not self._in_place(tensor, start, length):
            self._drop_plan()
            src = self._source(tensor.path)
            self._copier(0)(src, self._file(), tensor.offset or 0, start, length)
        return self._appended(tensor.name or "", tensor.dtype, tensor.shape.numpy(), start, length)

    def precopy(self, plan: Sequence[tuple[ir.ExternalTensor, int]]) -> None:
        """Copy each ``(tensor, start)`` of ``plan`` (another file's tensor, at the
        offset the final layout is expected to give it, past everything to be put
        before) on a background thread, in order; :meth:`copy` uses them where the
        layout turns out as planned.  Only on an empty file, once."""
        if self.offset or self._planned or not plan:
            return
        self._ahead.append(ThreadPoolExecutor(1, thread_name_prefix="gt-ahead"))
        for tensor, start in plan:
            length = tensor.length if tensor.length is not None else tensor.nbytes
            key = (tensor.path, tensor.offset or 0, length)
            src, dst = self._source(tensor.path), self._file()
            job = self._ahead[0].submit(self._copier(1), src, dst, key[1], start, length)
            self._planned[key] = (start, job)

    def _in_place(self, tensor: ir.ExternalTensor, start: int, length: int) -> bool:
        """Whether :meth:`precopy` put ``tensor`` at ``start`` (waiting for its copy;
        the plan forgets it)."""
        key = (tensor.path, tensor.offset or 0, length)
        planned = self._planned.get(key)
        if planned is None or planned[0] != start:
            return False
        try:
            planned[1].result()
        except (OSError, InputError, CancelledError):
            return False  # (copied again below, where a real error is reported)
        del self._planned[key]
        return True

    def _settle(self, lo: int = 0, hi: int | None = None) -> None:
        """Wait for the copies ahead of time into bytes ``lo:hi`` (all: every one; their
        errors: :meth:`copy` copies again)."""
        for (_, _, length), (start, job) in self._planned.items():
            if start + length > lo and (hi is None or start < hi):
                with contextlib.suppress(OSError, InputError, CancelledError):
                    job.result()

    def copy_ahead(self, model: ir.Model, first: Sequence[ir.Value]) -> None:
        """:meth:`precopy` the tensors :meth:`StreamedSave.finish` will copy, where the
        layout puts them if each initializer of ``first`` (their tensors' own sizes, in
        this order) is :meth:`put` before and nothing else — the rewritten weights."""
        mine = {id(v) for v in first}
        offset = 0
        for value in first:
            offset = _aligned(offset) + _size(value.const_value)
        plan: list[tuple[ir.ExternalTensor, int]] = []
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if id(value) in mine or tensor is None:
                    continue
                if isinstance(tensor, ir.ExternalTensor) and tensor.path != str(self.path):
                    plan.append((tensor, _aligned(offset)))
                elif isinstance(tensor, ir.ExternalTensor) or tensor.nbytes <= 256:
                    continue
                offset = _aligned(offset) + _size(tensor)
        self.precopy(plan)

    def _drop_plan(self) -> None:
        """Forget the copies made ahead of time not used yet: the file is cut to the
        bytes written so far and the padding between the tensors appended after the
        first such copy's start is zeroed again (it may have written there)."""
        if not self._planned:
            return
        for _, job in self._planned.values():
            job.cancel()
        self._settle()
        first = min(start for start, _ in self._planned.values())
        self._planned.clear()
        fd = self._file()
        os.ftruncate(fd, self.offset)
        end = 0
        for lo, hi in self._extents:
            if lo > end and lo > first:
                gap = max(end, first)
                _pwrite_all(fd, memoryview(bytes(lo - gap)), gap)
            end = hi

    def rewind(self) -> None:
        """Empty the file: tensors returned so far are no longer valid (``on_bytes`` is
        told minus what it was told so far)."""
        self.wait()
        if not self._extents:
            return  # (nothing appended: the copies ahead of time stay)
        self._drop_plan()
        os.ftruncate(self._file(), 0)
        self.offset = 0
        self._extents.clear()
        self.on_bytes(-self._reported)
        self._reported = 0

    def close(self) -> None:
        """Finish the write in flight and close the file and the source files
        (idempotent); a failed write raises after everything is closed."""
        try:
            self.wait()
            self._drop_plan()  # (copies ahead of time the layout did not use)
        finally:
            self._close_files()

    def _close_files(self) -> None:
        if self._fd is not None:
            logger.debug(
                "%s: %d bytes, %s, %.2f s waited for writes", self.path.name, self.offset,
                "direct" if self._direct is not None else "buffered", self._waited,
            )  # fmt: skip
        self._buffers = [np.empty(0, np.uint8) for _ in range(2)]
        for pool in [*self._writer, *self._ahead]:
            pool.shutdown(cancel_futures=True)
        self._writer.clear()
        self._ahead.clear()
        self._planned.clear()
        if self._direct is not None:
            self._direct.close()
        for fd in [self._fd, *self._sources.values()]:
            if fd is not None:
                os.close(fd)
        self._fd = None
        self._sources.clear()

    def _file(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def _copier(self, k: int) -> Callable[[int, int, int, int, int], None]:
        """How a tensor is copied: by the kernel, or direct through bounce buffer ``k``
        (0: the caller's thread, 1: the copies ahead of time)."""
        return _copy_range if self._direct is None else self._direct.copier(k)

    def _source(self, path: str) -> int:
        if path not in self._sources:
            self._sources[path] = os.open(path, os.O_RDONLY)
        return self._sources[path]

    def _start(self) -> int:
        return _aligned(self.offset)

    def _appended(
        self, name: str, dtype: ir.DataType, shape: Sequence[int], start: int, length: int
    ) -> ir.ExternalTensor:
        self.offset = start + length
        self._extents.append((start, self.offset))
        self._reported += length
        self.on_bytes(length)
        return ir.ExternalTensor(
            self.path.name, start, length, dtype,
            shape=ir.Shape(list(shape)), name=name, base_dir=str(self.path.parent),
        )  # fmt: skip


def _aligned(offset: int) -> int:
    return -(-offset // DATA_ALIGN) * DATA_ALIGN


def _size(tensor: ir.TensorProtocol | None) -> int:
    """The bytes ``tensor`` takes in a data file."""
    if isinstance(tensor, ir.ExternalTensor) and tensor.length is not None:
        return tensor.length
    return 0 if tensor is None else tensor.nbytes


def _pwrite_chunks(fd: int, raw: memoryview, start: int) -> None:
    """Write ``raw`` at ``start``, :data:`_COPY_CHUNK` bytes per call."""
    for i in range(0, len(raw), _COPY_CHUNK):
        _pwrite_all(fd, raw[i : i + _COPY_CHUNK], start + i)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` is at ``offset``."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def read_exactly(fd: int, view: memoryview, offset: int, short: str) -> None:
    """``os.preadv`` into the byte view ``view`` from ``offset`` of ``fd`` until it is full;
    :class:`InputError` with the line ``short`` where the file ends first."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise InputError(short)
        done += got


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    """Copy ``length`` bytes between files at the given offsets, in the kernel where it
    can (``os.copy_file_range``), else through a buffer."""
    done = 0
    while done < length:
        n = min(_COPY_CHUNK, length - done)
        try:
            got = os.copy_file_range(src, dst, n, src_offset + done, dst_offset + done)
        except OSError:  # EXDEV, ENOSYS, EINVAL on some filesystems: copy by hand
            got = os.pwrite(dst, os.pread(src, n, src_offset + done), dst_offset + done)
        if got <= 0:
            raise InputError(f"external data ends early (needed {length} bytes at {src_offset})")
        done += got


class _Direct:
    """The ``O_DIRECT`` side of a :class:`DataFile`: a second descriptor of the file, and
    aligned bounce buffers for copies.  A write splits ``[start, start + n)`` at the
    :data:`DIRECT_ALIGN` boundaries inside it: the whole blocks go direct where the memory
    is aligned alike, the ends (and everything, after the first refusal) through the page
    cache — the same bytes at the same offsets either way."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd  # None once refused or closed
        self._own = fd  # closed by close()
        self._bounce: dict[int, mmap.mmap] = {}  # page-aligned, made on first use

    @classmethod
    def open(cls, path: Path) -> _Direct | None:
        """Direct writes to ``path`` (created already), or None where the system refuses."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            return cls(os.open(path, os.O_WRONLY | flag))
        except OSError:  # EINVAL: tmpfs and others
            return None

    def write(self, fd: int, raw: memoryview, start: int) -> None:
        """Write ``raw`` (a C-contiguous byte view) at ``start`` of the file ``fd`` is."""
        lo, hi = _blocks_inside(start, len(raw))
        address = np.frombuffer(raw, np.uint8).ctypes.data if len(raw) else 0
        if self.fd is None or hi <= lo or (address + lo - start) % DIRECT_ALIGN:
            _pwrite_chunks(fd, raw, start)
            return
        _pwrite_all(fd, raw[: lo - start], start)
        done = self._write_blocks(raw[lo - start : hi - start], lo)
        _pwrite_chunks(fd, raw[lo - start + done :], lo + done)

    def _write_blocks(self, blocks: memoryview, offset: int) -> int:
        """Write ``blocks`` direct at ``offset`` (both aligned) in :data:`_COPY_CHUNK`s;
        the bytes written, all of them unless the system refused (then no more direct
        writes)."""
        done = 0
        try:
            while done < len(blocks) and self.fd is not None:
                n = os.pwrite(self.fd, blocks[done : done + _COPY_CHUNK], offset + done)
                done += n - n % DIRECT_ALIGN  # (a partial tail goes through the page cache)
                if n % DIRECT_ALIGN or n == 0:
                    break
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            logger.debug("direct writes refused (%s): through the page cache", e)
            self.fd = None
        return done

    def copier(self, k: int) -> Callable[[int, int, int, int, int], None]:
        """:func:`_copy_range` with the destination's whole blocks read into bounce buffer
        ``k`` (one per thread) and written direct."""

        def copy(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
            lo, hi = _blocks_inside(dst_offset, length)
            if self.fd is None or hi <= lo:
                _copy_range(src, dst, src_offset, dst_offset, length)
                return
            _copy_range(src, dst, src_offset, dst_offset, lo - dst_offset)
            at = lo
            while at < hi and self.fd is not None:
                at += self._bounced(k, src, src_offset + at - dst_offset, at, min(_BOUNCE, hi - at))
            _copy_range(src, dst, src_offset + at - dst_offset, at, dst_offset + length - at)

        return copy

    def _bounced(self, k: int, src: int, src_offset: int, offset: int, n: int) -> int:
        """Read ``n`` bytes of ``src`` into bounce buffer ``k`` and write them direct at
        ``offset``; the bytes written (fewer only where direct writes were refused)."""
        if k not in self._bounce:
            self._bounce[k] = mmap.mmap(-1, _BOUNCE)
        view = memoryview(self._bounce[k])[:n]
        short = f"external data ends early (needed {n} bytes at {src_offset})"
        read_exactly(src, view, src_offset, short)
        return self._write_blocks(view, offset)

    def close(self) -> None:
        fd, self._own, self.fd = self._own, -1, None
        if fd >= 0:
            os.close(fd)
        for buf in self._bounce.values():
            with contextlib.suppress(BufferError):
                buf.close()
        self._bounce.clear()


def _blocks_inside(start: int, length: int) -> tuple[int, int]:
    """The first and last :data:`DIRECT_ALIGN` boundaries within ``[start, start +
    length]`` (``lo > hi`` where no whole block lies inside)."""
    lo = -(-start // DIRECT_ALIGN) * DIRECT_ALIGN
    return lo, (start + length) // DIRECT_ALIGN * DIRECT_ALIGN


class StreamedSave(StagedSave):
    """A :class:`StagedSave` whose external data file is written as the weights are made.

    ``data`` (a :class:`DataFile`, the staged ``<target>.data``) takes rewritten weights
    while a pass runs (:func:`graphteleport.rewrite.streamed`); :meth:`finish` then
    appends every other weight — an external one copied by the kernel, an in-memory one
    over 256 bytes written — and writes the model file, once.  After that the model's
    initializers read the staged file: they are valid until the ``with`` block of
    :func:`staged_stream` ends.  Verify and :meth:`commit` as for a :class:`StagedSave`.
    """

    def __init__(
        self,
        tmpdir: Path,
        target: Path,
        data_name: str,
        on_bytes: Callable[[int], None],
        direct: bool = False,
    ) -> None:
        super().__init__(tmpdir, target, data_name)
        assert self.data_path is not None
        self.data = DataFile(self.data_path, on_bytes, direct=direct)

    def finish(self, model: ir.Model) -> None:
        """Complete the data file with the weights not in it yet and write the model file.

        Raises :class:`InputError` if a file cannot be written.
        """
        mine = str(self.data.path)
        try:
            for graph in model.graphs():
                for value in graph.initializers.values():
                    tensor = value.const_value
                    if isinstance(tensor, ir.ExternalTensor) and tensor.path != mine:
                        value.const_value = self.data.copy(tensor)
                    elif (
                        not isinstance(tensor, ir.ExternalTensor | None)
                        and tensor.nbytes > INLINE_MAX
                    ):
                        value.const_value = self.data.put(tensor.name or "", tensor.numpy())
            self.data.close()
            with _inlined_external_attributes(model):
                ir.save(model, self.model_path)
        except OSError as e:
            raise InputError(f"cannot write {self.target}: {e.strerror or e}") from e
        self.drop_empty_data()


@contextlib.contextmanager
def staged_stream(
    model: ir.Model,
    path: PathLike,
    *,
    protect: Sequence[PathLike] = (),
    on_bytes: Callable[[int], None] = _no_progress,
    direct: bool = False,
) -> Iterator[StreamedSave]:
    """Stage ``path`` and ``<path>.data`` for a model whose weights are written one by one.

    The targets are checked as :func:`staged_save` checks them (``protect`` and the
    files the model reads are never overwritten; ``direct``: the data file written past
    the page cache where it can, :class:`DataFile`); the yielded :class:`StreamedSave`
    lives in a private temporary directory beside ``path`` that is removed when the
    block ends, committed or not (an exception, SIGINT or SIGTERM leave nothing).
    """
    target = Path(os.path.abspath(path))
    data_name = f"{target.name}.data"
    _check_target(target, data_name, _kept(model, protect))
    tmpdir = _make_tmpdir(target.parent)
    try:
        staged = StreamedSave(tmpdir, target, data_name, on_bytes, direct)
    except OSError as e:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise InputError(f"cannot write to {target.parent}: {e.strerror or e}") from e
    except BaseException:  # an interrupt (SIGINT, SIGTERM) while the staging opens
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    try:
        yield staged
    finally:
        with contextlib.suppress(OSError, InputError):  # (finish() reports a failed write)
            staged.data.close()
        staged.discard()
        if not staged.committed:
            logger.debug("discarded streamed output for %s", target)

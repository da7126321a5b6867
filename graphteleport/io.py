"""Loading and saving ONNX models safely.

Loading goes through :func:`onnx_ir.load`, which memory-maps external data instead of
reading it, and then checks that the file is a *complete* model: protobuf happily
parses a file cut at a field boundary (an empty file is a valid, empty ``ModelProto``),
so a truncated download would otherwise look like a model with no graph, no opset
imports or missing weights.  Every failure becomes one :class:`InputError` line.

Saving is atomic and staged.  :func:`staged_save` writes the model (and its external
data) into a private temporary directory beside the target, lets the caller check the
files — the CLI runs onnxruntime on them — and only :meth:`StagedSave.commit` renames
them into place, data file first, model file last.  Anything else (an exception, or
leaving the ``with`` block without committing) deletes the temporaries and leaves the
target untouched.  Paths listed in ``protect`` (the CLI's input model) and the files
the model still reads its weights from are never overwritten.

Example::

    model = load_model("in.onnx")
    with staged_save(model, "out.onnx", protect=["in.onnx"]) as staged:
        verify(original="in.onnx", teleported=staged.model_path, feeds=feeds)
        staged.commit()
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir import external_data as ir_external_data

from graphteleport.errors import InputError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD_BYTES",
    "StagedSave",
    "external_data_files",
    "initializer_nbytes",
    "load_model",
    "save_model_atomic",
    "staged_save",
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
    """Load an ONNX model, memory-mapping its external data, and check it is complete.

    Contract: returns an :class:`onnx_ir.Model` whose graph has nodes and outputs,
    whose nodes' domains are imported, whose inline initializers hold exactly the bytes
    their shapes need and whose external data files exist and are long enough.
    Otherwise raises :class:`InputError` with one line naming the file and the
    problem (missing, a directory, not ONNX, truncated/corrupt, missing weights).
    Tensor data is not copied: external tensors stay memory-mapped, lazily.
    """
    p = Path(path)
    _check_is_readable_file(p)
    try:
        model = ir.load(os.path.abspath(p))
    except DecodeError as e:
        raise InputError(_decode_error_message(p)) from e
    except Exception as e:  # onnx and protobuf raise many types on corrupt input
        raise InputError(f"cannot load {p} as an ONNX model: {_one_line(e)}") from e
    _check_complete(model, p)
    logger.debug("loaded %s: %d nodes, opsets %s", p, len(model.graph), model.opset_imports)
    return model


def _check_is_readable_file(p: Path) -> None:
    """Raise InputError unless *p* is an existing, readable, non-empty regular file."""
    if not p.exists():
        raise InputError(f"model file not found: {p}")
    if p.is_dir():
        raise InputError(f"model path is a directory, not an ONNX file: {p}")
    try:
        with p.open("rb") as f:
            first = f.read(1)
    except OSError as e:
        raise InputError(f"cannot read model file {p}: {e.strerror or e}") from e
    if not first:
        raise InputError(f"model file is empty: {p}")


def _decode_error_message(p: Path) -> str:
    """Say whether an undecodable file looks like a damaged ONNX file or something else.

    Every ONNX serialiser writes ``ir_version`` (field 1, varint: tag byte 0x08) first.
    """
    with p.open("rb") as f:
        first = f.read(1)
    if first == b"\x08":
        return f"{p} is a truncated or corrupt ONNX file (protobuf decoding failed)"
    return f"{p} is not an ONNX model file (protobuf decoding failed)"


def _check_complete(model: ir.Model, p: Path) -> None:
    """Raise InputError if *model* (loaded from *p*) is empty, cut short or lacks weights."""
    if model.ir_version <= 0 and not model.graph.outputs and len(model.graph) == 0:
        raise InputError(f"{p} is not an ONNX model (no ir_version or graph found)")
    problem = _structure_problem(model) or _initializer_problem(model)
    if problem is not None:
        raise InputError(
            f"{p} is not a complete ONNX model ({problem}); the file may be truncated or corrupt"
        )
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


def _initializer_problem(model: ir.Model) -> str | None:
    """Check each inline initializer's raw bytes against its shape and dtype."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.TensorProtoTensor):
                continue
            proto = tensor.raw
            if not proto.HasField("raw_data") or tensor.dtype == ir.DataType.STRING:
                continue
            needed = (tensor.size * tensor.dtype.bitwidth + 7) // 8  # sub-byte types packed
            if len(proto.raw_data) != needed:
                return (
                    f"initializer '{value.name}' holds {len(proto.raw_data)} bytes, "
                    f"its shape {tensor.shape} {tensor.dtype.name} needs {needed}"
                )
    return None


def _check_external_data(model: ir.Model, p: Path) -> None:
    """Raise InputError if an external tensor's file is missing or shorter than it needs."""
    sizes: dict[str, int] = {}
    for tensor in _external_tensors(model):
        data_path = os.fspath(tensor.path)
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


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Yield every initializer tensor of every graph that lives in an external file."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def external_data_files(model: ir.Model) -> list[Path]:
    """The external data files the (lazily loaded) *model* still reads its weights from."""
    return sorted({Path(os.path.abspath(t.path)) for t in _external_tensors(model)})


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

    Created by :func:`staged_save`; its temporary directory is removed when the
    ``with`` block ends whether or not :meth:`commit` ran.
    """

    def __init__(self, tmpdir: Path, target: Path, data_name: str | None) -> None:
        self._tmpdir = tmpdir
        self.target = target
        self.model_path = tmpdir / target.name
        self.data_path = tmpdir / data_name if data_name else None
        self.data_target = target.parent / data_name if data_name else None
        self.committed = False

    @property
    def paths(self) -> list[Path]:
        """The final paths :meth:`commit` writes, model first."""
        return [self.target] + ([self.data_target] if self.data_target else [])

    def drop_empty_data(self) -> None:
        """Forget (and delete) the data file when no tensor was big enough to go there."""
        if self.data_path is not None and self.data_path.stat().st_size == 0:
            self.data_path.unlink()
            self.data_path = self.data_target = None

    def commit(self) -> list[Path]:
        """Rename the temporaries into place (data first, model last); return the paths.

        Each rename is atomic (same directory, so same filesystem).  Raises
        :class:`InputError` if called twice or if a rename fails.
        """
        if self.committed:
            raise InputError(f"{self.target} was already committed")
        try:
            if self.data_path is not None and self.data_target is not None:
                os.replace(self.data_path, self.data_target)
            os.replace(self.model_path, self.target)
        except OSError as e:
            raise InputError(f"cannot write {self.target}: {e.strerror or e}") from e
        self.committed = True
        logger.info("wrote %s", ", ".join(map(str, self.paths)))
        return self.paths

    def discard(self) -> None:
        """Delete the temporary directory and everything in it (idempotent)."""
        shutil.rmtree(self._tmpdir, ignore_errors=True)


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
        a :class:`StagedSave`; call its ``commit()`` inside the ``with`` block.

    Raises:
        InputError: a protected target, a missing directory, an over-large inline
            model or a failed write.  Nothing at *path* changes and no temporary is left.
    """
    target = Path(os.path.abspath(path))
    use_external = _wants_external_data(model, external_data)
    data_name = f"{target.name}.data" if use_external else None
    kept = [(Path(p), "it is a protected input") for p in protect]
    kept += [(p, "the model still reads its weights from it") for p in external_data_files(model)]
    _check_target(target, data_name, kept)
    tmpdir = _make_tmpdir(target.parent)
    staged = StagedSave(tmpdir, target, data_name)
    try:
        _write(model, staged.model_path, data_name)
        staged.drop_empty_data()
        yield staged
    finally:
        staged.discard()
        if not staged.committed:
            logger.debug("discarded staged output for %s", target)


def save_model_atomic(
    model: ir.Model,
    path: PathLike,
    *,
    external_data: bool | None = None,
    protect: Sequence[PathLike] = (),
) -> list[Path]:
    """Write *model* to *path* atomically and return the paths written (model first).

    Same arguments and errors as :func:`staged_save`, committed immediately.
    """
    with staged_save(model, path, external_data=external_data, protect=protect) as staged:
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
    """True if *a* and *b* name the same file (hard links and symlinks included)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


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
            ir.save(model, model_path, external_data=data_name)
            return
        nbytes = initializer_nbytes(model)
        if nbytes > _PROTOBUF_LIMIT_BYTES:
            raise InputError(
                f"model weights total {nbytes / 2**30:.2f} GiB, over the 2 GiB limit of a "
                "single ONNX file; save with external data"
            )
        with _inlined_external_tensors(model):
            ir.save(model, model_path)
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

"""Model files at the protobuf wire level: written, and read, without copying weights.

:func:`onnx_ir.save` builds a ``ModelProto`` holding every weight (one copy of each
tensor's bytes), serialises it into one string (a second copy) and writes that.  For an
inline model of 100 MB most of a save is those copies.  :func:`save_inline` writes the
same file, byte for byte, with the weights' bytes going from memory to the file once:

1. every large initializer of the main graph is swapped, for the serialisation only, for
   a *placeholder*: a tensor of the same name, dtype and shape whose bytes are empty;
2. onnx_ir serialises that light model and protobuf encodes it (the graph, the nodes,
   the value infos: kilobytes);
3. the encoding is walked at the protobuf wire level (:func:`fields`) and each
   placeholder's ``raw_data`` field (number 9) is given the real bytes, the lengths of
   the enclosing messages (the initializer, field 5 of the graph; the graph, field 7 of
   the model) re-encoded for them;
4. the pieces are written in order.

Protobuf encodes a message as its set fields in field-number order (length-delimited
ones as tag, varint length, bytes), so a placeholder encoded with empty ``raw_data`` and
then given its bytes encodes exactly as the tensor would have.  Tensors that are not
plain raw bytes in memory (packed 4-bit and 6-bit types, strings, external data, a proto
with fields of its own beyond name, dtype, dims and raw data) are not swapped: onnx_ir
serialises them as before.  Formats other than binary protobuf (``.json``,
``.textproto``) take :func:`onnx_ir.save`.

Reading: :func:`raw_data_offsets` (and :func:`raw_data_spans`) say where each weight's
bytes lie in a model file, walking only the fields' headers; :func:`light_encoding`
turns a model file into the same model whose large weights are references to those
bytes (external data), for a reader that needs the graph and the weights' shapes, or
lets onnxruntime read the weights from the file (the per-tensor check's models,
:class:`graphteleport.tensorcheck.LoadedModel`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "MIN_SWAP_BYTES",
    "fields",
    "hollow_encoding",
    "light_encoding",
    "raw_data_offsets",
    "raw_data_spans",
    "save_inline",
    "varint",
]

#: Initializers with fewer bytes than this are serialised by protobuf (not worth a swap).
MIN_SWAP_BYTES = 1024

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_NAME = 8  # TensorProto.name
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
_TENSOR_EXTERNAL_DATA = 13  # TensorProto.external_data
_TENSOR_DATA_LOCATION = 14  # TensorProto.data_location
_LENGTH_DELIMITED = 2
_PLAIN_PROTO_FIELDS = frozenset({"dims", "data_type", "name", "raw_data"})

Chunk = bytes | memoryview
Buffer = bytes | mmap.mmap


def save_inline(model: ir.Model, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` with every tensor inline, as :func:`onnx_ir.save` would
    (the same bytes), copying each large initializer's bytes once, straight to the file.

    The model is not changed (placeholders are swapped back before returning, also on
    error).  Raises what :func:`onnx_ir.save` raises (OSError on a failed write).
    """
    ext = os.path.splitext(os.fspath(path))[1]
    if onnx.serialization.registry.get_format_from_file_extension(ext) not in (None, "protobuf"):
        ir.save(model, path)
        return
    with _placeholders(model) as payloads:
        encoded = ir.serde.serialize_model(model).SerializeToString()
    _write_chunks(Path(path), splice(encoded, payloads))


def varint(value: int) -> bytes:
    """``value`` (non-negative) as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: Buffer, pos: int) -> tuple[int, int]:
    """The varint at ``buf[pos:]`` and the position after it."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(buf: Buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """The fields of the message encoded in ``buf[start:end]``, in order, as
    ``(number, field start, value start, value end)``: the field's bytes are
    ``buf[field start:value end]``, a length-delimited field's contents
    ``buf[value start:value end]``.  Raises ValueError on a malformed encoding."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _read_varint(buf, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:  # varint
            _, stop = _read_varint(buf, pos)
        elif kind == 1:  # 64-bit
            stop = pos + 8
        elif kind == _LENGTH_DELIMITED:
            length, pos = _read_varint(buf, pos)
            stop = pos + length
        elif kind == 5:  # 32-bit
            stop = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {kind} at byte {first}")
        if stop > end:
            raise ValueError(f"protobuf field {number} at byte {first} runs past its message")
        yield number, first, pos, stop
        pos = stop


def splice(encoded: bytes, payloads: dict[str, Chunk]) -> list[Chunk]:
    """The pieces of ``encoded`` (a ModelProto) with the ``raw_data`` of each initializer
    of the main graph named in ``payloads`` set to those bytes (the initializers' and
    the graph's lengths re-encoded).  Raises ValueError if one is not found."""

    def give(buf: Buffer, begin: int, stop: int) -> list[Chunk] | None:
        name = _tensor_name(buf, begin, stop)
        return (
            None if name not in payloads else _tensor_chunks(buf, begin, stop, payloads.pop(name))
        )

    out = _edit_initializers(encoded, give)
    if payloads:
        raise ValueError(f"initializers not found in the encoding: {sorted(payloads)[:3]}")
    return out


def light_encoding(buf: Buffer, location: str, min_bytes: int) -> bytes | None:
    """``buf`` (a ModelProto's encoding, the file ``location``) with the ``raw_data`` of
    every main-graph initializer over ``min_bytes`` replaced by a reference to where it
    lies in that file (``data_location`` EXTERNAL; ``external_data`` location, offset,
    length): the model without copies of its weights, for a reader that needs their
    shapes, or reads them from the file.  None when ``buf`` cannot be walked."""

    def refer(data: Buffer, begin: int, stop: int) -> list[Chunk] | None:
        found = {n: (b, e) for n, _, b, e in fields(data, begin, stop)}
        raw = found.get(_TENSOR_RAW_DATA)
        if raw is None or raw[1] - raw[0] <= min_bytes or _TENSOR_DATA_LOCATION in found:
            return None
        kept = bytearray()
        for number, first, _, end in fields(data, begin, stop):
            if number != _TENSOR_RAW_DATA:
                kept += data[first:end]
        ref = {"location": location, "offset": str(raw[0]), "length": str(raw[1] - raw[0])}
        for key, value in ref.items():
            entry = _string(1, key) + _string(2, value)
            kept += _header(_TENSOR_EXTERNAL_DATA, len(entry)) + entry
        kept += varint(_TENSOR_DATA_LOCATION << 3) + varint(1)  # EXTERNAL
        return [bytes(kept)]

    try:
        return b"".join(_edit_initializers(buf, refer))
    except (ValueError, IndexError):
        return None


def hollow_encoding(buf: bytes, min_bytes: int) -> tuple[bytes, dict[str, tuple[int, int]]] | None:
    """``buf`` (a ModelProto's encoding) with the ``raw_data`` of every main-graph
    initializer over ``min_bytes`` made empty (the field kept, length 0), and where each
    such initializer's message lies in ``buf``: ``{name: (start, end)}``.  Parsing the
    hollow encoding gives the model without a copy of its weights (protobuf copies every
    ``raw_data`` it parses: 100 MB for ResNet-50); the bytes stay in ``buf``, for views.
    Only initializers with a name of their own are emptied (a name two share is left
    whole).  None when ``buf`` cannot be walked."""
    spans: dict[str, tuple[int, int]] = {}
    shared: set[str] = set()

    def empty(data: Buffer, begin: int, stop: int) -> list[Chunk] | None:
        name, raw = None, None
        for number, _, v_begin, v_stop in fields(data, begin, stop):
            if number == _TENSOR_NAME:
                name = data[v_begin:v_stop].decode("utf-8")
            elif number == _TENSOR_RAW_DATA:
                raw = (v_begin, v_stop)
        if name is None or raw is None or raw[1] - raw[0] <= min_bytes:
            if name is not None and name in spans:
                shared.add(name)
            return None
        if name in spans:
            shared.add(name)
            return None
        spans[name] = (begin, stop)
        kept = bytearray()
        for number, first, _, end in fields(data, begin, stop):
            kept += _header(_TENSOR_RAW_DATA, 0) if number == _TENSOR_RAW_DATA else data[first:end]
        return [bytes(kept)]

    try:
        pieces = _edit_initializers(buf, empty)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    if shared:  # a name two initializers share: its span would be ambiguous
        return None
    return b"".join(pieces), spans


def _string(number: int, text: str) -> bytes:
    data = text.encode("utf-8")
    return _header(number, len(data)) + data


Edit = Callable[[Buffer, int, int], list[Chunk] | None]


def _edit_initializers(encoded: Buffer, edit: Edit) -> list[Chunk]:
    """The pieces of ``encoded`` (a ModelProto) with each main-graph initializer that
    ``edit(encoded, start, end)`` (its contents' span) gives pieces for replaced by them;
    the initializers' and the graph's lengths re-encoded."""
    out: list[Chunk] = []
    pos = 0
    for number, first, begin, stop in fields(encoded, 0, len(encoded)):
        if number != _MODEL_GRAPH:
            continue
        graph = _graph_chunks(encoded, begin, stop, edit)
        out += [encoded[pos:first], _header(_MODEL_GRAPH, _size(graph)), *graph]
        pos = stop
    out.append(encoded[pos:])
    return out


def _graph_chunks(encoded: Buffer, start: int, end: int, edit: Edit) -> list[Chunk]:
    """The graph message's pieces, initializers replaced where ``edit`` says."""
    out: list[Chunk] = []
    pos = start
    for number, first, begin, stop in fields(encoded, start, end):
        if number != _GRAPH_INITIALIZER:
            continue
        tensor = edit(encoded, begin, stop)
        if tensor is None:
            continue
        out += [encoded[pos:first], _header(_GRAPH_INITIALIZER, _size(tensor)), *tensor]
        pos = stop
    out.append(encoded[pos:end])
    return out


def _tensor_name(encoded: Buffer, start: int, end: int) -> str | None:
    for number, _, begin, stop in fields(encoded, start, end):
        if number == _TENSOR_NAME:
            return encoded[begin:stop].decode("utf-8")
    return None


def _tensor_chunks(encoded: Buffer, start: int, end: int, payload: Chunk) -> list[Chunk]:
    """The tensor message's pieces with ``raw_data`` = ``payload``, in field order (the
    placeholder's empty ``raw_data``, if encoded, is dropped)."""
    before, after = bytearray(), bytearray()
    for number, first, _, stop in fields(encoded, start, end):
        if number < _TENSOR_RAW_DATA:
            before += encoded[first:stop]
        elif number > _TENSOR_RAW_DATA:
            after += encoded[first:stop]
        elif stop != first + 2:  # tag 0x4a, length 0
            raise ValueError("a placeholder tensor was encoded with data")
    return [bytes(before), _header(_TENSOR_RAW_DATA, len(payload)), payload, bytes(after)]


@contextlib.contextmanager
def mapped(path: str | os.PathLike[str]) -> Iterator[mmap.mmap]:
    """A read-only memory map of the file at ``path``, closed when the block ends.

    Where an exception leaves the block while a view of the map is still alive — an
    interrupt (SIGINT/SIGTERM raised by the CLI's handler) inside a run that reads it
    leaves the view in the traceback's frames — closing would raise ``BufferError`` over
    the exception; the map is then left to close with its last view, and the exception
    goes on.  A map still viewed when the block ends normally is a bug: that raises."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield buf
    except BaseException:
        with contextlib.suppress(BufferError):
            buf.close()
        raise
    buf.close()


def raw_data_offsets(path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """Where each initializer of the main graph keeps its ``raw_data`` in the binary model
    file at ``path``: ``{name: (byte offset, length)}``.  The file is memory-mapped and
    only the fields' headers are read (a few pages of a 100 MB model); initializers without
    ``raw_data`` are left out, and so is everything when the file is not binary protobuf
    that this walk can read (empty, truncated, malformed: ``{}``)."""
    try:
        with mapped(path) as buf:
            return raw_data_spans(buf)
    except (OSError, ValueError):  # ValueError: an empty file cannot be mapped
        return {}


def raw_data_spans(buf: Buffer) -> dict[str, tuple[int, int]]:
    """:func:`raw_data_offsets` of a model's encoding in memory (``{}`` when it cannot be
    walked)."""
    try:
        return _raw_data_spans(buf)
    except (ValueError, IndexError, UnicodeDecodeError):
        return {}


def _raw_data_spans(buf: Buffer) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for number, _, begin, stop in fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH:
            continue
        for field, _, t_begin, t_stop in fields(buf, begin, stop):
            if field != _GRAPH_INITIALIZER:
                continue
            name, raw = None, None
            for f, _, v_begin, v_stop in fields(buf, t_begin, t_stop):
                if f == _TENSOR_NAME:
                    name = buf[v_begin:v_stop].decode("utf-8")
                elif f == _TENSOR_RAW_DATA:
                    raw = (v_begin, v_stop - v_begin)
            if name is not None and raw is not None:
                out[name] = raw
    return out


def _header(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return varint(number << 3 | _LENGTH_DELIMITED) + varint(length)


def _size(chunks: Sequence[Chunk]) -> int:
    return sum(len(c) for c in chunks)


def _write_chunks(path: Path, chunks: Sequence[Chunk]) -> None:
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)


@contextlib.contextmanager
def _placeholders(model: ir.Model) -> Iterator[dict[str, Chunk]]:
    """Swap the main graph's large plain initializers for empty placeholders; yields
    their bytes by name; swaps the tensors back on exit."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    payloads: dict[str, Chunk] = {}
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            payload = None if tensor is None else _payload(tensor)
            if tensor is None or payload is None or not value.name:
                continue
            value.const_value = _placeholder(tensor)
            swapped.append((value, tensor))
            payloads[value.name] = payload
        yield payloads
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _payload(tensor: ir.TensorProtocol) -> Chunk | None:
    """The bytes ``raw_data`` would hold for ``tensor``, or None when it is not worth
    or not safe to swap (small, packed, strings, external, a proto with more fields)."""
    dtype = tensor.dtype
    if tensor.nbytes < MIN_SWAP_BYTES or dtype.bitwidth not in (8, 16, 32, 64, 128):
        return None
    if dtype == ir.DataType.STRING or tensor.metadata_props:
        return None
    if isinstance(tensor, ir.serde.TensorProtoTensor):
        proto = tensor.raw
        if {f.name for f, _ in proto.ListFields()} - _PLAIN_PROTO_FIELDS:
            return None
        return proto.raw_data if proto.HasField("raw_data") else None
    if isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray):
        return _array_bytes(tensor.raw) or tensor.tobytes()
    return None


def _array_bytes(array: np.ndarray) -> memoryview | None:
    """The memory of ``array`` when it already is what :meth:`onnx_ir.Tensor.tobytes` gives
    (little-endian, C order, one element per item: the bitwidths :func:`_payload`
    accepts), without copying it; else None."""
    little = sys.byteorder == "little" and array.dtype.byteorder != ">"
    if not little or not array.flags.c_contiguous:
        return None
    return array.reshape(-1).view(np.uint8).data


def _placeholder(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """An empty tensor that serialises with ``tensor``'s name, dtype, dims and doc string
    (and ``raw_data`` empty)."""
    empty = np.empty(0, dtype=tensor.dtype.numpy())
    return ir.Tensor(
        empty,
        tensor.dtype,
        shape=ir.Shape(tensor.shape.numpy()),
        name=tensor.name,
        doc_string=tensor.doc_string or None,
    )

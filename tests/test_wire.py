"""The inline save without protobuf copies of the weights (graphteleport.wire): the file
it writes must be the very bytes :func:`onnx_ir.save` writes, for every kind of tensor,
and loading it must give the initializers the slow path gives."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphteleport import io as gt_io
from graphteleport import wire
from graphteleport.pipeline import TeleportOptions, teleport_file

MODELS = Path(__file__).resolve().parent.parent / "models" / "onnx"


def rich_model() -> onnx.ModelProto:
    """Initializers of many dtypes and sizes, one with a doc string, one with metadata,
    one stored as float_data, a Constant node, a subgraph with its own weight."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal((32, 64)).astype(np.float32)
    inits = [
        numpy_helper.from_array(big, "w_f32"),
        numpy_helper.from_array(rng.standard_normal(600).astype(np.float16), "w_f16"),
        numpy_helper.from_array(rng.standard_normal(300).astype(np.float64), "w_f64"),
        numpy_helper.from_array(rng.integers(0, 9, 400).astype(np.int64), "w_i64"),
        numpy_helper.from_array(rng.integers(0, 2, 2000).astype(bool), "w_bool"),
        numpy_helper.from_array(
            (rng.standard_normal(300) + 1j * rng.standard_normal(300)).astype(np.complex64),
            "w_c64",
        ),
        numpy_helper.from_array(np.arange(4, dtype=np.float32), "small"),
        helper.make_tensor("w_floatdata", TensorProto.FLOAT, [512], rng.standard_normal(512)),
    ]
    inits[0].doc_string = "a documented weight"
    entry = inits[1].metadata_props.add()
    entry.key, entry.value = "origin", "test"
    bf16 = TensorProto(name="w_bf16", data_type=TensorProto.BFLOAT16, dims=[1024])
    bf16.raw_data = rng.standard_normal(1024).astype(ml_dtypes.bfloat16).tobytes()
    inits.append(bf16)
    then = helper.make_graph(
        [helper.make_node("Add", ["x", "sub_w"], ["y_then"])],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [32, 64])],
        [numpy_helper.from_array(big * 3, "sub_w")],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [32, 64])],
    )
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(big, "c")),
        helper.make_node("Add", ["x", "w_f32"], ["a"]),
        helper.make_node("Add", ["a", "c"], ["b"]),
        helper.make_node("ReduceSum", ["b"], ["flag_f"], keepdims=0),
        helper.make_node("Greater", ["flag_f", "zero"], ["flag"]),
        helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other),
    ]
    inits.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    graph = helper.make_graph(
        nodes,
        "rich",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 64])],
        inits,
        doc_string="graph doc",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"author": "tests"})
    return model


def _changed(model: ir.Model) -> ir.Model:
    """Every other initializer replaced by a new in-memory (numpy) tensor, as a rewrite
    leaves them."""
    for k, value in enumerate(list(model.graph.initializers.values())):
        tensor = value.const_value
        if k % 2 == 0 and tensor is not None:
            array = tensor.numpy()
            new = array[::-1].copy() if array.ndim else array
            value.const_value = ir.Tensor(new, tensor.dtype, name=value.name)
    return model


def _both(model: ir.Model, tmp_path: Path) -> tuple[bytes, bytes]:
    slow, fast = tmp_path / "slow.onnx", tmp_path / "fast.onnx"
    ir.save(model, slow)
    wire.save_inline(model, fast)
    return slow.read_bytes(), fast.read_bytes()


def _initializers(data: bytes) -> dict[str, np.ndarray]:
    proto = onnx.load_model_from_string(data)
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.parametrize("change", [False, True])
def testrich_model_same_bytes_as_onnx_ir(tmp_path: Path, change: bool) -> None:
    model = ir.serde.deserialize_model(rich_model())
    if change:
        model = _changed(model)
    slow, fast = _both(model, tmp_path)
    assert fast == slow
    got, want = _initializers(fast), _initializers(slow)
    assert list(got) == list(want) and len(got) == len(model.graph.initializers)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array)
    onnx.checker.check_model(onnx.load_model_from_string(fast))


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.onnx")), ids=lambda p: p.name)
def test_shipped_models_same_bytes(tmp_path: Path, path: Path) -> None:
    slow, fast = _both(_changed(ir.load(path)), tmp_path)
    assert fast == slow


def test_swaps_the_large_plain_tensors_only() -> None:
    """A test that could pass without the fast path would prove nothing: the large raw
    weights must really go around protobuf, the others through it."""
    model = _changed(ir.serde.deserialize_model(rich_model()))
    with wire._placeholders(model) as payloads:
        swapped = set(payloads)
        placeholders = [model.graph.initializers[n].const_value for n in swapped]
        assert all(t is not None and t.numpy().size == 0 for t in placeholders)
    assert {"w_f32", "w_f64", "w_i64", "w_bool", "w_c64", "w_bf16"} <= swapped
    assert not swapped & {"small", "zero", "w_f16", "w_floatdata"}  # small, metadata, float_data
    assert model.graph.initializers["w_f32"].const_value.nbytes == 32 * 64 * 4  # restored


def test_model_unchanged_and_restored_on_error(tmp_path: Path) -> None:
    model = _changed(ir.serde.deserialize_model(rich_model()))
    before = {n: v.const_value for n, v in model.graph.initializers.items()}
    with pytest.raises(OSError):
        wire.save_inline(model, tmp_path / "missing" / "out.onnx")
    assert {n: v.const_value for n, v in model.graph.initializers.items()} == before


def test_text_formats_take_onnx_ir(tmp_path: Path) -> None:
    model = ir.load(MODELS / "mlp_small.onnx")
    ir.save(model, tmp_path / "slow.json")
    wire.save_inline(model, tmp_path / "fast.json")
    assert (tmp_path / "fast.json").read_bytes() == (tmp_path / "slow.json").read_bytes()


def test_varint_and_fields_round_trip() -> None:
    for value in (0, 1, 127, 128, 300, 2**31, 2**63 - 1):
        assert wire._read_varint(wire.varint(value), 0) == (value, len(wire.varint(value)))
    t = TensorProto(name="n", data_type=1, dims=[2, 3], raw_data=b"\0" * 24)
    data = t.SerializeToString()
    assert [f[0] for f in wire.fields(data, 0, len(data))] == [1, 1, 2, 8, 9]
    with pytest.raises(ValueError):
        list(wire.fields(data[:-3], 0, len(data) - 3))


def test_teleport_output_same_as_slow_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's save: a teleported model written the fast way is the slow way's file."""
    opts = TeleportOptions(seed=3, verify=False)
    src = MODELS / "resnet_tiny.onnx"
    teleport_file(src, tmp_path / "fast.onnx", opts)
    monkeypatch.setattr(gt_io, "save_inline", ir.save)
    teleport_file(src, tmp_path / "slow.onnx", opts)
    fast, slow = (tmp_path / "fast.onnx").read_bytes(), (tmp_path / "slow.onnx").read_bytes()
    assert fast == slow
    original = _initializers((src).read_bytes())
    changed = [n for n, a in _initializers(fast).items() if not np.array_equal(a, original[n])]
    assert len(changed) > 10  # the teleport moved the weights


def test_non_contiguous_arrays(tmp_path: Path) -> None:
    """An array whose memory is not the raw bytes (Fortran order, a strided view) is
    converted as onnx_ir converts it."""
    model = ir.serde.deserialize_model(rich_model())
    for name, change in (("w_f32", np.asfortranarray), ("w_i64", lambda a: a[::2])):
        value = model.graph.initializers[name]
        assert value.const_value is not None
        array = change(value.const_value.numpy())
        assert not array.flags.c_contiguous
        value.const_value = ir.Tensor(array, name=name)
    slow, fast = _both(model, tmp_path)
    assert fast == slow


def test_raw_data_offsets_point_at_the_weights(tmp_path: Path) -> None:
    path = tmp_path / "rich.onnx"
    onnx.save(rich_model(), path)
    data = path.read_bytes()
    offsets = wire.raw_data_offsets(path)
    proto = onnx.load(path)
    raw = {t.name: t.raw_data for t in proto.graph.initializer if t.HasField("raw_data")}
    assert set(offsets) == set(raw) and "w_floatdata" not in offsets
    for name, (offset, length) in offsets.items():
        assert data[offset : offset + length] == raw[name]
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    assert wire.raw_data_offsets(tmp_path / "empty.onnx") == {}
    assert wire.raw_data_offsets(tmp_path / "cut.onnx") == {}


def test_light_encoding_refers_to_the_files_bytes(tmp_path: Path) -> None:
    """The light model is the model with each large raw weight replaced by a reference to
    its bytes in the file; everything else is the same."""
    path = tmp_path / "rich.onnx"
    onnx.save(rich_model(), path)
    data = path.read_bytes()
    light = wire.light_encoding(data, "rich.onnx", 1024)
    assert light is not None
    got, want = onnx.load_model_from_string(light), onnx.load(path)
    refs = [t for t in got.graph.initializer if t.HasField("data_location")]
    moved = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in refs)
    assert len(refs) >= 5 and len(light) < len(data) - moved + 64 * len(refs)
    for a, b in zip(got.graph.initializer, want.graph.initializer, strict=True):
        if not a.HasField("data_location"):
            assert a == b and (not b.HasField("raw_data") or len(b.raw_data) <= 1024)
            continue
        ref = {e.key: e.value for e in a.external_data}
        offset, length = int(ref["offset"]), int(ref["length"])
        assert ref["location"] == "rich.onnx" and data[offset : offset + length] == b.raw_data
        assert (a.name, a.data_type, list(a.dims)) == (b.name, b.data_type, list(b.dims))
    del got.graph.initializer[:], want.graph.initializer[:]
    assert got == want
    assert wire.light_encoding(data[:-7], "rich.onnx", 1024) is None


def test_hollow_encoding_empties_the_large_weights_only(tmp_path: Path) -> None:
    """The hollow model is the model with each large raw weight's bytes empty (the field
    kept); each span is the whole message of that weight in the file."""
    path = tmp_path / "rich.onnx"
    onnx.save(rich_model(), path)
    data = path.read_bytes()
    hollow = wire.hollow_encoding(data, 1024)
    assert hollow is not None
    encoding, spans = hollow
    got, want = onnx.load_model_from_string(encoding), onnx.load(path)
    emptied = sum(len(t.raw_data) for t in want.graph.initializer if t.name in spans)
    assert len(spans) >= 5 and len(encoding) < len(data) - emptied + 8 * len(spans)
    for a, b in zip(got.graph.initializer, want.graph.initializer, strict=True):
        if a.name not in spans:
            assert a == b and (not b.HasField("raw_data") or len(b.raw_data) <= 1024)
            continue
        assert a.HasField("raw_data") and a.raw_data == b"" and len(b.raw_data) > 1024
        start, end = spans[a.name]
        assert onnx.TensorProto.FromString(data[start:end]) == b
        a.raw_data = b.raw_data
        assert a == b
    assert got == want
    assert wire.hollow_encoding(data[:-7], 1024) is None


def test_hollow_encoding_leaves_shared_names_to_the_whole_parse() -> None:
    model = rich_model()
    twin = onnx.TensorProto()
    twin.CopyFrom(model.graph.initializer[0])
    model.graph.initializer.append(twin)
    assert wire.hollow_encoding(model.SerializeToString(), 1024) is None


def test_load_gives_every_weight_its_bytes(tmp_path: Path) -> None:
    """Loaded through the hollow parse: every initializer equals onnx.load's, the plain
    large ones as views of the bytes read, the one with metadata from its own message."""
    path = tmp_path / "rich.onnx"
    onnx.save(rich_model(), path)
    model = gt_io.load_model(path)
    want = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    got = model.graph.initializers
    assert set(got) == set(want)
    for name, array in want.items():
        tensor = got[name].const_value
        assert tensor is not None
        np.testing.assert_array_equal(tensor.numpy(), array, err_msg=name)
    assert isinstance(got["w_f32"].const_value, ir.Tensor)
    assert got["w_f32"].const_value.doc_string == "a documented weight"
    kept = got["w_f16"].const_value
    assert isinstance(kept, ir.TensorProtoTensor) and kept.raw.metadata_props[0].key == "origin"


def test_mapped_lets_an_interrupt_through_a_live_view(tmp_path: Path) -> None:
    """An exception leaving the block while a view of the map is alive (as a SIGTERM
    inside an onnxruntime run reading it leaves one in the traceback) is raised as is,
    not replaced by the map's ``BufferError``; the map closes with its last view."""
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(range(64)))
    with pytest.raises(KeyboardInterrupt), wire.mapped(path) as buf:
        view = np.frombuffer(buf, dtype=np.uint8)
        assert view[5] == 5
        raise KeyboardInterrupt
    with wire.mapped(path) as buf:
        assert bytes(buf[:3]) == b"\x00\x01\x02"
    assert buf.closed


def test_mapped_refuses_a_view_left_alive_at_a_normal_end(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(16))
    with pytest.raises(BufferError), wire.mapped(path) as buf:
        view = np.frombuffer(buf, dtype=np.uint8)
    del view

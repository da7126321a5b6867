"""Tests of graphteleport.io: complete-model loading and atomic, staged saving."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphteleport import io as gt_io
from graphteleport.errors import InputError
from graphteleport.io import (
    check_output_target,
    check_paths,
    external_data_files,
    load_model,
    save_model_atomic,
    staged_save,
    write_file_atomic,
)


def mlp_proto(seed: int = 0, hidden: int = 64) -> onnx.ModelProto:
    """x[batch,4] -> Gemm -> Relu -> Gemm -> y[batch,3]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, hidden)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, 3)).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_proto(), path)
    return path


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        name: v.const_value.numpy()
        for name, v in model.graph.initializers.items()
        if v.const_value is not None
    }


def load_error(path: Path) -> str:
    with pytest.raises(InputError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- loading


def test_load_valid_model(mlp_path: Path) -> None:
    model = load_model(mlp_path)
    assert [n.op_type for n in model.graph] == ["Gemm", "Relu", "Gemm"]
    assert set(weights(model)) == {"W1", "b1", "W2"}


def test_inline_initializers_are_views_of_the_file_bytes(mlp_path: Path, tmp_path: Path) -> None:
    """A loaded model's inline initializers read without a copy: each array is a view of
    one buffer (the file's bytes), equal to the stored values, of their dtypes and shapes;
    a model with a Constant-node tensor keeps its proto-backed tensors (viewing only some
    would keep the parsed proto alive beside the bytes); the model saves back unchanged."""
    model = load_model(mlp_path)
    got = weights(model)
    want = {t.name: numpy_helper.to_array(t) for t in onnx.load(mlp_path).graph.initializer}
    bases = set()
    for name, array in got.items():
        assert isinstance(model.graph.initializers[name].const_value, ir.Tensor), name
        assert not array.flags.owndata and not array.flags.writeable, name
        assert array.dtype == want[name].dtype and np.array_equal(array, want[name]), name
        base = array
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        bases.add(id(base))
    assert len(bases) == 1  # one buffer: the bytes read
    out = tmp_path / "again.onnx"
    save_model_atomic(model, out)
    again = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert again.keys() == want.keys()
    assert all(np.array_equal(again[k], want[k]) for k in want)

    proto = mlp_proto()
    shape = numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "shape")
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["s"], value=shape))
    proto.graph.node.insert(1, helper.make_node("Reshape", ["x0", "s"], ["x"]))
    proto.graph.input[0].name = "x0"
    path = tmp_path / "with_constant.onnx"
    onnx.save(proto, path)
    kept = load_model(path)
    assert all(
        isinstance(v.const_value, ir.TensorProtoTensor) for v in kept.graph.initializers.values()
    )


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.onnx"
    assert load_error(path) == f"model file not found: {path}"


def test_load_directory(tmp_path: Path) -> None:
    assert load_error(tmp_path) == f"model path is a directory, not an ONNX file: {tmp_path}"


def test_load_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert load_error(path) == f"model file is empty: {path}"


def test_load_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    rng = np.random.default_rng(3)
    path.write_bytes(b"\xff" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    assert load_error(path) == f"{path} is not an ONNX model file (protobuf decoding failed)"


def test_load_text_file(tmp_path: Path) -> None:
    path = tmp_path / "readme.onnx"
    path.write_text("This is a README, not a neural network.\n")
    assert load_error(path) == f"{path} is not an ONNX model file (protobuf decoding failed)"


def test_load_file_cut_in_half(mlp_path: Path) -> None:
    data = mlp_path.read_bytes()
    mlp_path.write_bytes(data[: len(data) // 2])
    assert load_error(mlp_path) == (
        f"{mlp_path} is a truncated or corrupt ONNX file (protobuf decoding failed)"
    )


def test_load_every_truncation_is_rejected(tmp_path: Path) -> None:
    """Protobuf parses some prefixes cleanly; each must still be caught."""
    data = mlp_proto().SerializeToString()
    path = tmp_path / "cut.onnx"
    for n in range(1, len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(InputError):
            load_model(path)


def test_load_cut_after_graph_reports_missing_opsets(tmp_path: Path) -> None:
    proto = mlp_proto()
    full = proto.SerializeToString()
    del proto.opset_import[:]
    prefix = proto.SerializeToString()
    assert full.startswith(prefix) and len(prefix) < len(full)  # a clean field-boundary cut
    path = tmp_path / "cut.onnx"
    path.write_bytes(prefix)
    assert load_error(path) == (
        f"{path} is not a complete ONNX model (it imports no operator sets); "
        "the file may be truncated or corrupt"
    )


def test_load_cut_before_graph_reports_no_nodes(tmp_path: Path) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes(mlp_proto().SerializeToString()[:2])  # ir_version only
    assert "(the graph has no nodes)" in load_error(path)


def test_load_unimported_domain(tmp_path: Path) -> None:
    proto = mlp_proto()
    proto.graph.node[1].domain = "com.example"
    path = tmp_path / "custom.onnx"
    onnx.save(proto, path)
    assert "node 'relu' (Relu) uses unimported domain 'com.example'" in load_error(path)


def test_load_initializer_with_short_raw_data(tmp_path: Path) -> None:
    proto = mlp_proto()
    w1 = proto.graph.initializer[0]
    w1.raw_data = w1.raw_data[:-4]
    path = tmp_path / "short.onnx"
    onnx.save(proto, path)
    assert "initializer 'W1' holds 1020 bytes, its shape [4,64] FLOAT needs 1024" in load_error(
        path
    )


# ----------------------------------------------------------------------- external data


def test_external_data_round_trip(mlp_path: Path, tmp_path: Path) -> None:
    model = load_model(mlp_path)
    out = tmp_path / "ext.onnx"
    written = save_model_atomic(model, out, external_data=True)
    assert written == [out, tmp_path / "ext.onnx.data"]
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data", "mlp.onnx"]
    loaded = load_model(out)
    external = {
        name
        for name, v in loaded.graph.initializers.items()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    assert external == {"W1", "W2"}  # b1 (256 bytes) is small enough to stay inline
    assert external_data_files(loaded) == [tmp_path / "ext.onnx.data"]
    for name, array in weights(model).items():
        np.testing.assert_array_equal(weights(loaded)[name], array)


def test_external_data_without_big_tensors_writes_no_data_file(tmp_path: Path) -> None:
    path = tmp_path / "small.onnx"
    onnx.save(mlp_proto(hidden=4), path)
    written = save_model_atomic(load_model(path), tmp_path / "out.onnx", external_data=True)
    assert written == [tmp_path / "out.onnx"]
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "small.onnx"]


def test_external_model_resaves_with_external_data_by_default(
    mlp_path: Path, tmp_path: Path
) -> None:
    save_model_atomic(load_model(mlp_path), tmp_path / "a.onnx", external_data=True)
    (tmp_path / "sub").mkdir()
    written = save_model_atomic(load_model(tmp_path / "a.onnx"), tmp_path / "sub" / "b.onnx")
    assert written == [tmp_path / "sub" / "b.onnx", tmp_path / "sub" / "b.onnx.data"]
    np.testing.assert_array_equal(
        weights(load_model(written[0]))["W1"], weights(load_model(mlp_path))["W1"]
    )


def test_external_model_saved_inline_leaves_model_unchanged(mlp_path: Path, tmp_path: Path) -> None:
    save_model_atomic(load_model(mlp_path), tmp_path / "a.onnx", external_data=True)
    model = load_model(tmp_path / "a.onnx")
    written = save_model_atomic(model, tmp_path / "inline.onnx", external_data=False)
    assert written == [tmp_path / "inline.onnx"]
    inline = onnx.load(tmp_path / "inline.onnx", load_external_data=False)
    assert not any(t.external_data for t in inline.graph.initializer)
    assert isinstance(model.graph.initializers["W1"].const_value, ir.ExternalTensor)


def test_missing_external_data_file(mlp_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "ext.onnx"
    save_model_atomic(load_model(mlp_path), out, external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    assert load_error(out).startswith(
        f"external data file not found: {tmp_path / 'ext.onnx.data'} (tensor 'W1' of {out};"
    )


def test_truncated_external_data_file(mlp_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "ext.onnx"
    save_model_atomic(load_model(mlp_path), out, external_data=True)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    assert load_error(out).startswith(f"external data file {data} is truncated: tensor 'W1'")


# ---------------------------------------------------------------------- atomic saving


def test_save_inline_writes_one_file_and_no_temporaries(mlp_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert save_model_atomic(load_model(mlp_path), out) == [out]
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx", "out.onnx"]
    assert onnx.load(out).graph.node[0].op_type == "Gemm"


def test_save_replaces_an_existing_output(mlp_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    save_model_atomic(load_model(mlp_path), out)
    assert len(load_model(out).graph) == 3
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx", "out.onnx"]


def test_staged_exception_before_commit_leaves_target_untouched(
    mlp_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    model = load_model(mlp_path)
    with (
        pytest.raises(RuntimeError, match="check failed"),
        staged_save(model, out, external_data=True) as staged,
    ):
        assert staged.model_path.is_file()
        assert staged.data_path is not None and staged.data_path.is_file()
        assert load_model(staged.model_path).graph.node(0).op_type == "Gemm"
        raise RuntimeError("check failed")
    assert out.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx", "out.onnx"]


def test_staged_without_commit_writes_nothing(mlp_path: Path, tmp_path: Path) -> None:
    with staged_save(load_model(mlp_path), tmp_path / "out.onnx") as staged:
        assert staged.paths == [tmp_path / "out.onnx"]
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx"]


def test_staged_commit_moves_files_into_place(mlp_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    with staged_save(load_model(mlp_path), out, protect=[mlp_path], external_data=True) as staged:
        written = staged.commit()
        with pytest.raises(InputError, match="already committed"):
            staged.commit()
    assert written == [out, tmp_path / "out.onnx.data"]
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx", "out.onnx", "out.onnx.data"]
    assert len(load_model(out).graph) == 3


def test_failed_write_leaves_no_temporaries(
    mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_save(model: ir.Model, path: str | os.PathLike[str], **kwargs: object) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", failing_save)
    monkeypatch.setattr(gt_io, "save_inline", failing_save)  # the inline writer
    with pytest.raises(InputError, match=r"cannot write out\.onnx: No space left on device"):
        save_model_atomic(load_model(mlp_path), tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx"]


def test_protect_refuses_the_input_path(mlp_path: Path) -> None:
    before = mlp_path.read_bytes()
    with (
        pytest.raises(InputError) as info,
        staged_save(load_model(mlp_path), mlp_path, protect=[mlp_path]),
    ):
        pass
    assert str(info.value) == (
        f"refusing to overwrite {mlp_path}: it is a protected input (choose another output path)"
    )
    assert mlp_path.read_bytes() == before
    assert sorted(os.listdir(mlp_path.parent)) == ["mlp.onnx"]


@pytest.mark.parametrize("link", ["symlink", "hardlink", "relative"])
def test_protect_sees_through_aliases(
    mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link: str
) -> None:
    alias = tmp_path / "alias.onnx"
    if link == "symlink":
        alias.symlink_to(mlp_path)
    elif link == "hardlink":
        os.link(mlp_path, alias)
    else:
        monkeypatch.chdir(tmp_path)
        alias = Path("mlp.onnx")
    with (
        pytest.raises(InputError, match="refusing to overwrite"),
        staged_save(load_model(mlp_path), alias, protect=[mlp_path]),
    ):
        pass


def test_refuses_to_overwrite_weights_the_model_still_reads(mlp_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.onnx"
    save_model_atomic(load_model(mlp_path), out, external_data=True)
    model = load_model(out)
    with pytest.raises(InputError, match="the model still reads its weights from it"):
        save_model_atomic(model, out)
    np.testing.assert_array_equal(weights(model)["W1"], weights(load_model(mlp_path))["W1"])


def test_save_into_missing_directory(mlp_path: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="output directory does not exist"):
        save_model_atomic(load_model(mlp_path), tmp_path / "missing" / "out.onnx")


def test_save_onto_a_directory(mlp_path: Path, tmp_path: Path) -> None:
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(InputError, match="output path is a directory"):
        save_model_atomic(load_model(mlp_path), tmp_path / "out.onnx")


# ----------------------------------------------------------- staged companions, signals, paths


def test_staged_companion_in_another_folder_commits_after_the_model(
    mlp_path: Path, tmp_path: Path
) -> None:
    (tmp_path / "reports").mkdir()
    out, report = tmp_path / "out.onnx", tmp_path / "reports" / "r.json"
    with staged_save(load_model(mlp_path), out) as staged:
        staged.stage_file(report, b"{}")
        temporaries = sorted(p.name for p in tmp_path.rglob(".graphteleport-*"))
        assert len(temporaries) == 2  # one private folder beside each target
        assert not out.exists() and not report.exists()
        staged.commit()
    assert report.read_bytes() == b"{}" and len(load_model(out).graph) == 3
    assert not list(tmp_path.rglob(".graphteleport-*"))


def test_staged_companion_is_discarded_without_commit(mlp_path: Path, tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    with staged_save(load_model(mlp_path), tmp_path / "out.onnx") as staged:
        staged.stage_file(tmp_path / "reports" / "r.json", b"{}")
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx", "reports"]
    assert os.listdir(tmp_path / "reports") == []


def test_commit_holds_sigterm_until_every_file_is_in_place(
    mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM that arrives during the first rename is delivered after the last one:
    the model, its data and the report are all there, then the handler runs."""

    class Stop(Exception):
        pass

    def handler(_signum: int, _frame: object) -> None:
        raise Stop

    real_replace = os.replace
    sent: list[int] = []

    def replace_and_signal(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if not sent:
            sent.append(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        real_replace(src, dst)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        out, report = tmp_path / "out.onnx", tmp_path / "r.json"
        with staged_save(load_model(mlp_path), out, external_data=True) as staged:
            staged.stage_file(report, b"{}")
            monkeypatch.setattr(os, "replace", replace_and_signal)
            with pytest.raises(Stop):
                staged.commit()
            monkeypatch.undo()
        assert sent and staged.committed
        assert out.exists() and (tmp_path / "out.onnx.data").exists() and report.exists()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_output_in_an_unwritable_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)  # root can write anywhere
    with pytest.raises(InputError, match="permission denied"):
        check_output_target(tmp_path / "r.json", "--report")


def test_check_paths_sees_aliases_of_files_not_yet_written(tmp_path: Path) -> None:
    """A dangling symlink to a future output is that output."""
    (tmp_path / "link.json").symlink_to(tmp_path / "o.onnx")
    with pytest.raises(InputError, match="are the same file"):
        check_paths([], [("-o", tmp_path / "o.onnx"), ("--report", tmp_path / "link.json")])


def test_check_paths_accepts_distinct_files(mlp_path: Path, tmp_path: Path) -> None:
    check_paths([("model file", mlp_path)], [("-o", tmp_path / "o.onnx")])


def test_write_file_atomic_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_bytes(b"old")
    write_file_atomic(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["r.json"]

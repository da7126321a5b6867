"""Verification fused with the streamed rewrite (graphteleport.fused, issue 15): each
block checked as soon as its weights are written finds what verifying the written files
afterwards finds; a written model that is not what the blocks ran is verified again;
nothing is left behind by a failure or a signal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphteleport import fused, pieces, verify
from graphteleport import io as gt_io
from graphteleport.errors import VerificationError
from graphteleport.pipeline import TeleportOptions, teleport_file
from models.llama import LlamaShape, make_llama

ROOT = Path(__file__).resolve().parents[1]
SMALL = LlamaShape(layers=2, hidden=128, heads=4, vocab=512, seq=8)
BLOCK_BYTES = 40_000  # the small model in ~20-30 blocks


def _model(folder: Path, dtype: str = "float32") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shape = LlamaShape(**{**SMALL.__dict__, "dtype": dtype})
    return make_llama(folder / "llama.onnx", shape)[0]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _comparable(result: verify.VerificationResult) -> dict[str, object]:
    d = result.to_dict()
    d.pop("seconds"), d.pop("fused")
    return d


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pieces, "DEFAULT_BLOCK_BYTES", BLOCK_BYTES)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_verification_finds_what_verifying_the_written_files_finds(
    tmp_path: Path, dtype: str, small_blocks: None
) -> None:
    src = _model(tmp_path / "in", dtype)
    opts = TeleportOptions(seed=2, verify_by="pieces")
    report = teleport_file(src, tmp_path / "t.onnx", opts)
    got = report.verification
    assert got is not None and got.passed and got.fused and got.method == "pieces"
    assert got.blocks > 10 and got.tensors is not None and got.tensors.passed

    # the same check of the files as written, after the fact
    plain = TeleportOptions(seed=2, verify=False)
    again = teleport_file(src, tmp_path / "n.onnx", plain)
    feeds = _feeds(src, opts)
    after = verify.verify_teleport(
        src, tmp_path / "t.onnx", feeds, _scales(src, opts), got.tolerance["rtol"],  # type: ignore[arg-type]
        seed=2, by="pieces", block_bytes=BLOCK_BYTES,
    )  # fmt: skip
    assert not after.fused and _comparable(after) == _comparable(got)
    # the output holds the same tensors as the unverified run's (laid out by block)
    written, unverified = _arrays(tmp_path / "t.onnx"), _arrays(tmp_path / "n.onnx")
    assert written.keys() == unverified.keys()
    for name, value in unverified.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    assert again.stats.weights_changed == report.stats.weights_changed


def _feeds(src: Path, opts: TeleportOptions) -> list[dict[str, np.ndarray]]:
    from graphteleport.io import load_model
    from graphteleport.pipeline import _feeds as pipeline_feeds

    return pipeline_feeds(load_model(src), opts, src)[0]


def _scales(src: Path, opts: TeleportOptions) -> object:
    from graphteleport.io import load_model
    from graphteleport.passes.teleport import TeleportPass

    model = load_model(src)
    result = TeleportPass(options=opts, input_shapes={"ids": (1, SMALL.seq)})(model)
    return result.tensor_scales()


def test_a_wrong_weight_fails_in_its_block_and_nothing_is_written(
    tmp_path: Path, small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _model(tmp_path / "in")
    put = gt_io.DataFile.put
    spoiled: list[str] = []

    def spoil(self: gt_io.DataFile, name: str, array: np.ndarray) -> object:
        if name == "layers.1.mlp.up.weight" and not spoiled:  # one weight, one element off
            array = array.copy()
            array.flat[0] = array.flat[0] * 1.5 + 1.0
            spoiled.append(name)
        return put(self, name, array)

    monkeypatch.setattr(gt_io.DataFile, "put", spoil)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(VerificationError) as caught:
        teleport_file(src, out / "t.onnx", TeleportOptions(seed=2, verify_by="pieces"))
    assert spoiled
    result = caught.value.report.verification  # type: ignore[attr-defined]
    assert result.fused and not result.passed and "block" in result.failures[0]
    assert list(out.iterdir()) == []


def test_insert_mode_changes_the_graph_so_the_written_files_are_verified(
    tmp_path: Path, small_blocks: None
) -> None:
    src = _model(tmp_path / "in", "float16")
    opts = TeleportOptions(seed=1, mode="insert", verify_by="pieces")
    report = teleport_file(src, tmp_path / "t.onnx", opts)
    assert report.inserted.nodes_added > 0
    v = report.verification
    assert v is not None and v.passed and not v.fused and v.method == "pieces"


def test_the_written_model_must_be_what_the_blocks_ran(tmp_path: Path) -> None:
    """_differs: the same graph and initializers pass; another offset, node or opset not."""
    src = _model(tmp_path / "in")
    original = onnx.load(str(src), load_external_data=False)
    inits = {t.name: t for t in original.graph.initializer}
    assert fused._differs(original, original, inits) is None
    moved = onnx.ModelProto()
    moved.CopyFrom(original)
    t = next(t for t in moved.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entry = next(e for e in t.external_data if e.key == "offset")
    entry.value = str(int(entry.value) + 64)
    assert "not the one verified" in (fused._differs(original, moved, inits) or "")
    other = onnx.ModelProto()
    other.CopyFrom(original)
    other.graph.node[-1].input[0] = other.graph.input[0].name
    assert "nodes" in (fused._differs(original, other, inits) or "")
    newer = onnx.ModelProto()
    newer.CopyFrom(original)
    newer.opset_import[0].version += 1
    assert "opsets" in (fused._differs(original, newer, inits) or "")


def test_weights_computed_again_give_the_fused_check_up(
    tmp_path: Path, small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second prepare (values refitted) rewinds the file: the blocks sent are stale, so
    the written files are verified afterwards, and pass."""
    from graphteleport.passes import teleport as teleport_pass

    prepare = teleport_pass.prepare
    calls: list[int] = []

    def twice(*args: object, **kwargs: object) -> object:
        calls.append(1)
        first = prepare(*args, **kwargs)  # type: ignore[arg-type]
        return prepare(*args, **kwargs) if len(calls) == 1 else first  # type: ignore[arg-type]

    monkeypatch.setattr(teleport_pass, "prepare", twice)
    src = _model(tmp_path / "in")
    report = teleport_file(src, tmp_path / "t.onnx", TeleportOptions(seed=2, verify_by="pieces"))
    v = report.verification
    assert len(calls) == 1 and v is not None and v.passed and not v.fused and v.blocks > 0


# a child running the CLI that signals itself right after TARGET returns (test_scale's)
from test_scale import _CHILD  # noqa: E402


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(
    "target",
    [
        "graphteleport.fused:FusedVerification.send",  # a block handed to the thread
        "graphteleport.pieces:BlockRunner.run",  # a block checked (on the thread)
        "graphteleport.fused:FusedVerification.result",  # verified, not committed
    ],
)
def test_a_signal_during_fused_verification_leaves_nothing(
    tmp_path: Path, target: str, sig: str
) -> None:
    _model(tmp_path / "in", "float16")
    (tmp_path / "out").mkdir()
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(script), target, sig, "in/llama.onnx", "-o", "out/t.onnx"]
    args += ["--verify-by", "pieces", "--report", "out/r.json"]
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == (130 if sig == "SIGINT" else 143), p.stderr
    assert "no partial output" in p.stderr
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == []
    assert sorted(x.name for x in (tmp_path / "in").iterdir()) == ["llama.onnx", "llama.onnx.data"]


def test_a_written_model_declaring_other_value_types_is_not_the_one_verified(
    tmp_path: Path,
) -> None:
    src = _model(tmp_path / "in")
    original = onnx.load(str(src), load_external_data=False)
    inits = {t.name: t for t in original.graph.initializer}
    declared = onnx.ModelProto()
    declared.CopyFrom(original)  # a saved model types its initializers: that is the same
    declared.graph.value_info.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in original.graph.initializer
    )
    assert fused._differs(original, declared, inits) is None
    typed = onnx.ModelProto()
    typed.CopyFrom(declared)  # a computed value typed otherwise
    name = original.graph.node[-1].input[0]
    typed.graph.value_info.append(onnx.helper.make_tensor_value_info(name, 10, [7]))
    assert "declares" in (fused._differs(original, typed, inits) or "")

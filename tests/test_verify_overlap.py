"""Whole-model verification with the draws beside the per-tensor check (two threads).

Where the per-tensor check's tensors come from the original's first run and memory allows,
the other draws run in a worker thread while the main thread checks tensors, then both
take what draws are left.  It must prove exactly what the one-after-the-other order
proves: the same draws, tensors and verdicts, the same first failure, and the same
errors (a teleported model that does not run is a failed verification).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import signalled_child

from graphteleport import verify
from graphteleport.errors import InputError, VerificationError
from graphteleport.frontends import onnx as onnx_frontend
from graphteleport.io import load_model
from graphteleport.passes.teleport import TeleportPass

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "onnx"


def case(tmp_path: Path, model: str = "resnet_tiny.onnx") -> tuple[Path, Any, Any, Any]:
    """(source path, its teleported model, the feed sets, the promise)."""
    src = FIXTURES / model
    feeds = verify.draw_feed_sets(onnx_frontend.input_specs(load_model(src)))
    result = TeleportPass(seed=3)(load_model(src))
    return src, result.model, feeds, result.tensor_scales()


def verify_both(
    monkeypatch: pytest.MonkeyPatch, src: Path, out: Path, feeds: Any, scales: Any
) -> dict[bool, verify.VerificationResult]:
    """The verification of ``out``, with and without the overlap."""
    results = {}
    for overlap in (False, True):
        monkeypatch.setattr(verify, "_may_overlap", lambda _model, o=overlap: o)
        results[overlap] = verify.verify_teleport(src, out, feeds, scales)
    return results


def same(a: verify.VerificationResult, b: verify.VerificationResult) -> None:
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d.pop("seconds"), d.pop("overlapped")
    assert da == db


@pytest.mark.parametrize("model", ["resnet_tiny.onnx", "mlp_small.onnx"])
def test_overlapped_and_sequential_verification_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    src, teleported, feeds, scales = case(tmp_path, model)
    out = tmp_path / "t.onnx"
    ir.save(teleported, out)
    results = verify_both(monkeypatch, src, out, feeds, scales)
    assert results[True].overlapped and not results[False].overlapped
    assert results[True].passed and results[True].inputs == 8
    assert results[True].tensors is not None and results[True].tensors.tensors > 5
    same(results[False], results[True])


def test_overlapped_verification_names_the_same_wrong_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, teleported, feeds, scales = case(tmp_path)
    name = max(
        teleported.graph.initializers,
        key=lambda n: teleported.graph.initializers[n].const_value.size,
    )
    w = teleported.graph.initializers[name].const_value.numpy().copy()
    w.reshape(-1)[::7] *= 1.01
    teleported.graph.initializers[name].const_value = ir.tensor(w, name=name)
    out = tmp_path / "bad.onnx"
    ir.save(teleported, out)
    results = verify_both(monkeypatch, src, out, feeds, scales)
    assert not results[True].passed and results[True].overlapped
    assert results[True].tensors is not None and results[True].tensors.failure is not None
    same(results[False], results[True])


def test_overlapped_draws_of_a_model_that_does_not_match_fail_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other output names: a VerificationError, as without the overlap."""
    src, teleported, feeds, scales = case(tmp_path)
    teleported.graph.outputs[0].name = "renamed"
    out = tmp_path / "bad.onnx"
    ir.save(teleported, out)
    for overlap in (False, True):
        monkeypatch.setattr(verify, "_may_overlap", lambda _model, o=overlap: o)
        with pytest.raises(VerificationError, match="output names differ"):
            verify.verify_teleport(src, out, feeds, scales)


def test_overlap_needs_two_cpus_and_the_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    model = verify.LoadedModel.load(FIXTURES / "resnet_tiny.onnx")
    need = 2 * verify.whole_model_bytes(model.proto.graph)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setattr(verify, "available_memory", lambda: int(need / 0.8) + 1)
    assert verify._may_overlap(model)
    monkeypatch.setattr(verify, "available_memory", lambda: int(need / 0.8) - 1)
    assert not verify._may_overlap(model)
    monkeypatch.setattr(verify, "available_memory", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert not verify._may_overlap(model)


def test_mirrored_tensors_flip_signs_and_keep_dtype_and_nonfinite() -> None:
    """The mirrored pass: -v + noise of half the RMS, NaN kept, in the dtype."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal(10_000).astype(np.float32) * 3
    h = rng.standard_normal((50, 40)).astype(np.float16)
    h[0, 0] = np.nan
    m = verify_mirrored({"a": a, "h": h, "k": np.arange(5)}, frozenset({"a", "h", "k"}))
    assert m["a"].dtype == np.float32 and m["h"].dtype == np.float16
    assert np.array_equal(m["k"], np.arange(5))  # not a float: as recorded
    flipped = np.mean(np.sign(m["a"]) != np.sign(a))
    assert 0.75 < flipped < 0.95  # most signs flip; the noise flips some back
    noise = (m["a"].astype(np.float64) + a) / np.sqrt(np.mean(np.square(a, dtype=np.float64)))
    assert 0.45 < np.std(noise) < 0.55 and abs(np.mean(noise)) < 0.05
    assert np.isnan(m["h"][0, 0]) and np.isfinite(m["h"].reshape(-1)[1:]).all()
    again = verify_mirrored({"a": a}, frozenset({"a"}))
    assert np.array_equal(again["a"], m["a"])  # reproducible by seed


def verify_mirrored(arrays: dict[str, np.ndarray], tracked: frozenset[str]) -> Any:
    from graphteleport import tensorcheck

    return tensorcheck._mirrored(arrays, tracked, seed=5)


@pytest.mark.parametrize("model", ["resnet_tiny.onnx", "mlp_small.onnx"])
@pytest.mark.parametrize("outputs_only", [False, True])
def test_early_draws_give_the_same_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, outputs_only: bool
) -> None:
    """The original's draws run before the teleported model exists (the CLI starts them
    before the pass): the same report as the draws run during verification."""
    src, teleported, feeds, scales = case(tmp_path, model)
    scales = None if outputs_only else scales
    out = tmp_path / "t.onnx"
    ir.save(teleported, out)
    monkeypatch.setattr(verify, "_may_overlap", lambda _model: True)
    plain = verify.verify_teleport(src, out, feeds, scales)
    with verify.EarlyDraws(src, feeds) as early:
        started = verify.verify_teleport(src, out, feeds, scales, early=early)
    assert started.overlapped and started.passed and started.inputs == 8
    same(plain, started)


@pytest.mark.parametrize("baked", [False, True])
def test_early_draws_batch_where_the_model_allows(tmp_path: Path, baked: bool) -> None:
    """A dynamic batch axis: the early draws run as one batch, unless a Reshape bakes
    the batch size in (then one by one, as verification itself does)."""
    from test_proof import batch_model

    src = tmp_path / "m.onnx"
    onnx.save(batch_model(baked), src)
    feeds = verify.draw_feed_sets(onnx_frontend.input_specs(load_model(src)))
    with verify.EarlyDraws(src, feeds) as early:
        time.sleep(0.5)  # (result() stops the draws: the rest is left to verification)
        got = early.result()
    names, sets, outputs = got.names, got.sets, got.outputs
    assert names == ["y"] and got.recorded is None  # batched or not: no per-tensor check
    assert len(sets) == (8 if baked else 1) and 1 <= len(outputs) <= len(sets)
    stacked = np.concatenate([o[0] for o in outputs])
    expected = np.concatenate([verify.run(src, f)[0] for f in feeds])
    np.testing.assert_allclose(stacked, expected[: len(stacked)], rtol=1e-5, atol=1e-6)


def test_early_draws_stopped_at_once_leave_the_rest_to_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked for at once, the early draws hand over after the recording run: the other
    draws run during verification, on their session, with the same report."""
    src, teleported, feeds, scales = case(tmp_path)
    out = tmp_path / "t.onnx"
    ir.save(teleported, out)
    monkeypatch.setattr(verify, "_may_overlap", lambda _model: True)
    plain = verify.verify_teleport(src, out, feeds, scales)
    superset = verify.recording_superset

    def slow(model: Any) -> Any:  # the stop comes before the early thread's first run
        time.sleep(0.3)
        return superset(model)

    monkeypatch.setattr(verify, "recording_superset", slow)
    with verify.EarlyDraws(src, feeds) as early:
        got = early.result()
        assert len(got.outputs) == 1 and got.recorded is not None
        started = verify.verify_teleport(src, out, feeds, scales, early=early)
    assert started.overlapped and started.passed
    same(plain, started)


def test_the_cli_starts_the_original_draws_early(tmp_path: Path) -> None:
    """Two CPUs and memory: the report says the draws ran in a second thread."""
    from graphteleport.cli import main

    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    rc = main([str(FIXTURES / "resnet_tiny.onnx"), "-o", str(out), "--report", str(rep), "-q"])
    assert rc == 0
    v = json.loads(rep.read_text())["verification"]
    two = len(os.sched_getaffinity(0)) >= 2
    assert v["overlapped"] is two and v["passed"] and v["inputs"] == 8
    assert v["tensors"]["passed"]


CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import graphteleport.verify as v
real = v.check_tensors
def slow_check(*args, **kwargs):  # the draws run in the other threads meanwhile
    print("checking", flush=True)
    time.sleep(60)
    return real(*args, **kwargs)
v.check_tensors = slow_check
from graphteleport.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_overlapped_verification_leaves_nothing(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """Stopped while the per-tensor check and the draws run in their threads: exit
    130/143 with one line, no temporary, no model, no report; the threads end."""
    shutil.copy(FIXTURES / "resnet_tiny.onnx", tmp_path / "m.onnx")
    args = ["m.onnx", "-o", "o.onnx", "--report", "r.json", "-q"]

    def staged() -> None:
        assert [p.name for p in tmp_path.glob(".graphteleport-*")], "nothing staged"

    returncode, err = signalled_child(CHILD, args, tmp_path, "checking", sig, staged)
    assert returncode == code, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_verification_by_pieces_stops_the_early_draws(tmp_path: Path) -> None:
    """By pieces, the early draws are not used: closed, their arrays dropped."""
    src, teleported, feeds, scales = case(tmp_path)
    out = tmp_path / "t.onnx"
    ir.save(teleported, out)
    with verify.EarlyDraws(src, feeds) as early:
        result = verify.verify_teleport(src, out, feeds, scales, by="pieces", early=early)
        assert result.method == "pieces" and result.passed and not result.overlapped
        with pytest.raises(InputError, match="stopped"):
            early.result()


def test_teleported_session_from_the_light_encoding_runs_the_files_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teleported model's session is made from its light encoding (weights read from
    the file in place) and computes what the file's own session does, to the bit; after
    the file's largest weight is changed on disk, the light session computes the change."""
    _, teleported, feeds, _ = case(tmp_path)
    out = tmp_path / "t.onnx"
    ir.save(teleported, out)
    parsed = verify.LoadedModel.load(out)
    assert parsed.light
    names = [o.name for o in parsed.proto.graph.output]
    sources: list[type] = []
    made = verify._session
    monkeypatch.setattr(
        verify, "_session", lambda m, *a, **k: sources.append(type(m)) or made(m, *a, **k)
    )
    light = verify._teleported_session(out, names, 1, parsed)
    plain = verify._teleported_session(out, names, 1)
    assert sources == [bytes, str]
    for feed in feeds[:3]:
        for a, b in zip(light.run(names, feed), plain.run(names, feed), strict=True):
            assert np.array_equal(a, b)
    before = [a.copy() for a in light.run(names, feeds[0])]
    name = max(parsed.initializers, key=lambda n: _bytes(parsed, n))
    offset = next(e.value for e in parsed.initializers[name].external_data if e.key == "offset")
    with open(out, "r+b") as f:  # the weight's first float changed in place
        f.seek(int(offset))
        first = np.frombuffer(f.read(4), np.float32)
        f.seek(int(offset))
        f.write((-first - 1).tobytes())
    changed = verify._teleported_session(out, names, 1, verify.LoadedModel.load(out))
    after = changed.run(names, feeds[0])
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def _bytes(parsed: verify.LoadedModel, name: str) -> int:
    fields = {e.key: e.value for e in parsed.initializers[name].external_data}
    return int(fields.get("length", 0))

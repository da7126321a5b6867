"""The streamed rewrite of external-data models (issue 15): same output as the in-memory
path, nothing left behind by an interrupt at any phase, quiet with -q.

The models are small LLaMA-shaped ones from :mod:`models.llama` (a few MB, weights in
``NAME.onnx.data``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphteleport import io as gt_io
from graphteleport.io import load_model, save_model_atomic
from graphteleport.passes.teleport import TeleportPass
from graphteleport.pipeline import TeleportOptions, teleport_file
from models.llama import LlamaShape, make_llama

ROOT = Path(__file__).resolve().parents[1]
SMALL = LlamaShape(layers=2, hidden=128, heads=4, vocab=512, seq=8)  # ~2.6 MB in float32


def _model(folder: Path, dtype: str = "float32") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shape = LlamaShape(**{**SMALL.__dict__, "dtype": dtype})
    return make_llama(folder / "llama.onnx", shape)[0]


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))  # external data loaded
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_output_verifies_and_equals_the_in_memory_rewrite(
    tmp_path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _model(tmp_path / "in", dtype)
    calls: list[str] = []
    put, copy = gt_io.DataFile.put, gt_io.DataFile.copy
    monkeypatch.setattr(gt_io.DataFile, "put", lambda f, *a: calls.append("put") or put(f, *a))
    monkeypatch.setattr(gt_io.DataFile, "copy", lambda f, *a: calls.append("copy") or copy(f, *a))
    report = teleport_file(src, tmp_path / "streamed.onnx", TeleportOptions(seed=3))
    assert report.verification is not None and report.verification.passed
    assert {"put", "copy"} <= set(calls)  # rewritten weights written, unchanged ones copied
    assert report.stats.weights_changed > 0

    model = load_model(src)  # the in-memory path: the pass, then one save of the model
    TeleportPass(options=TeleportOptions(seed=3), input_shapes={"ids": (1, SMALL.seq)})(model)
    save_model_atomic(model, tmp_path / "memory.onnx", external_data=True)

    streamed, memory = (
        _initializers(tmp_path / "streamed.onnx"),
        _initializers(tmp_path / "memory.onnx"),
    )
    original = _initializers(src)
    assert streamed.keys() == memory.keys() == original.keys()
    for name, value in memory.items():
        assert streamed[name].dtype == value.dtype, name
        np.testing.assert_array_equal(streamed[name], value, err_msg=name)
    moved = [n for n in original if not np.array_equal(original[n], streamed[n])]
    assert len(moved) == report.stats.weights_changed
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in", "memory.onnx", "memory.onnx.data", "streamed.onnx", "streamed.onnx.data"
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_insert_mode_streams_and_verifies(tmp_path: Path, dtype: str) -> None:
    """Insert mode through the streamed rewrite: scalar constants come back from the
    product as numpy scalars, and the inserted Muls' constants join the data file (both
    crashed the streamed save once)."""
    src = _model(tmp_path / "in", dtype)
    options = TeleportOptions(seed=1, mode="insert")
    report = teleport_file(src, tmp_path / "t.onnx", options)
    assert report.verification is not None and report.verification.passed
    assert report.stats.weights_changed > 0 and report.inserted.nodes_added > 0
    assert (tmp_path / "t.onnx.data").stat().st_size > 0


# A child that runs the CLI and signals itself right after ``TARGET`` returns (a phase
# reached): deterministic, unlike a timer.  argv: TARGET SIGNAL CLI-ARGS...
_CHILD = textwrap.dedent(
    """
    import importlib, os, signal, sys
    # a child started from a background job inherits SIGINT ignored: give it Python's handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    target, sig = sys.argv[1], getattr(signal, sys.argv[2])
    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)

    def signalled(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), sig)
        return result

    setattr(owner, name, signalled)
    from graphteleport.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)

PHASES = [
    "graphteleport.pipeline:load_model",  # loaded
    "graphteleport.pipeline:staged_stream",  # staging opened (before the pass)
    "graphteleport.passes.teleport:analyze_model",  # analysed
    "graphteleport.io:DataFile.put",  # a rewritten weight written
    "graphteleport.io:DataFile.copy",  # an unchanged weight copied
    "graphteleport.io:StreamedSave.finish",  # model file staged
    "graphteleport.verify:verify_teleport",  # verified, not committed
]


def _run_child(tmp_path: Path, target: str, sig: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(script), target, sig, "in/llama.onnx", "-o", "out/t.onnx"]
    args += ["--report", "out/r.json"]
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("target", PHASES)
def test_a_signal_in_any_phase_leaves_no_partial_output(
    tmp_path: Path, target: str, sig: str
) -> None:
    _model(tmp_path / "in")
    (tmp_path / "out").mkdir()
    p = _run_child(tmp_path, target, sig)
    assert p.returncode == (130 if sig == "SIGINT" else 143), p.stderr
    assert "no partial output" in p.stderr
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == []
    assert sorted(x.name for x in (tmp_path / "in").iterdir()) == ["llama.onnx", "llama.onnx.data"]


def test_a_signal_during_the_commit_is_held_until_the_output_is_whole(tmp_path: Path) -> None:
    _model(tmp_path / "in")
    (tmp_path / "out").mkdir()
    p = _run_child(tmp_path, "os:replace", "SIGTERM")  # after the first rename
    assert p.returncode == 143, p.stderr
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == [
        "r.json", "t.onnx", "t.onnx.data"
    ]  # fmt: skip
    load_model(tmp_path / "out" / "t.onnx")  # complete and loadable


@pytest.mark.parametrize("delay", [0.8, 1.6, 2.4])
def test_an_external_sigterm_at_any_time_leaves_all_or_nothing(
    tmp_path: Path, delay: float
) -> None:
    _model(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "graphteleport", "in/llama.onnx", "-o", "out/t.onnx"]
    proc = subprocess.Popen([*args, "-q"], cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode in (0, 143, -signal.SIGTERM)
    names = sorted(p.name for p in out.iterdir())
    assert names in ([], ["t.onnx", "t.onnx.data"]), names
    if names:
        load_model(out / "t.onnx")


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    _model(tmp_path / "in")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "graphteleport", "in/llama.onnx", "-o", "t.onnx", "-q"]
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == ""


def test_the_range_fit_of_large_weights_keeps_only_elements_at_risk_and_fits_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float16 weights with elements near 0 make the fit move cofactors; checking large
    weights through their elements at risk (every weight here, with the limit at 0) must
    move exactly the same ones as the dense check."""
    from graphteleport import ranges

    src = _model(tmp_path, "float16")

    def fitted() -> tuple[list[ranges.RangeFix], dict[str, np.ndarray]]:
        model = load_model(src)
        result = TeleportPass(seed=5, input_shapes={"ids": (1, SMALL.seq)})(model)
        weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
        return result.range_fixes, weights  # type: ignore[return-value]

    dense_fixes, dense = fitted()
    monkeypatch.setattr(ranges, "_DENSE_CELLS", 0)
    created: list[int] = []
    of = ranges._AtRisk.of
    monkeypatch.setattr(ranges._AtRisk, "of", lambda *a: created.append(1) or of(*a))
    sparse_fixes, sparse = fitted()
    assert dense_fixes and created  # the fit ran, through the sparse path
    assert sparse_fixes == dense_fixes
    for name, value in dense.items():
        np.testing.assert_array_equal(sparse[name], value, err_msg=name)


def _counted(monkeypatch: pytest.MonkeyPatch, cls: type, name: str, log: list[str]) -> None:
    """Record each call of ``cls.name`` in ``log`` (its first argument, if any)."""
    real = getattr(cls, name)
    monkeypatch.setattr(
        cls, name, lambda f, *a: log.append(str(a[0]) if a else name) or real(f, *a)
    )


def test_a_float16_model_with_weights_near_zero_is_rewritten_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fit runs before the products (:func:`graphteleport.rewrite.narrow`): every weight
    is written to the output data file once and the sink never rewound for a second
    rewrite, though the fit moves cofactors; no non-zero element becomes 0, inf or
    subnormal (from normal)."""
    src = _model(tmp_path / "in", "float16")
    puts: list[str] = []
    rewinds: list[str] = []
    _counted(monkeypatch, gt_io.DataFile, "put", puts)
    _counted(monkeypatch, gt_io.DataFile, "rewind", rewinds)
    report = teleport_file(src, tmp_path / "out.onnx", TeleportOptions(seed=5, verify=False))
    assert sum(r.cofactors for r in report.range_fixes) > 0  # the fit moved some
    assert len(rewinds) == 1  # prepare's own, before its first weight
    assert len(puts) == len(set(puts))  # no tensor written twice
    assert set(report.stats.changed) <= set(puts)
    tiny = np.finfo(np.float16).tiny
    original, new = _initializers(src), _initializers(tmp_path / "out.onnx")
    for name, w in original.items():
        a, b = np.abs(w.astype(np.float64)), np.abs(new[name].astype(np.float64))
        assert np.all(np.isfinite(b)), name
        assert np.all((b > 0) == (a > 0)), name
        assert np.all(b[a >= tiny] >= tiny), name


def test_fitting_before_the_products_gives_what_fitting_after_them_gave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit-identical weights and the same fixes whether a float16 model is fitted before
    its products or, as float32 models are, after them (then computed again)."""
    from graphteleport.passes import teleport

    src = _model(tmp_path, "float16")

    def run(mode: str) -> tuple[list[object], dict[str, np.ndarray]]:
        model = load_model(src)
        result = TeleportPass(seed=5, mode=mode, input_shapes={"ids": (1, SMALL.seq)})(model)
        weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
        return list(result.range_fixes), weights  # type: ignore[misc]

    for mode in ("absorb", "insert"):
        before = run(mode)
        with monkeypatch.context() as m:
            m.setattr(teleport, "narrow", lambda analysis: False)
            after = run(mode)
        assert before[0] and before[0] == after[0], mode
        assert before[1].keys() == after[1].keys()
        for name, value in after[1].items():
            np.testing.assert_array_equal(before[1][name], value, err_msg=f"{mode} {name}")


def test_the_fit_after_the_products_still_catches_what_the_early_measure_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net: magnitudes measured before the products that disagree with the
    products' own (here: every weight claimed all zero, so the early fit moves nothing)
    send the values through the fit again, and the result is what fitting after the
    products gives."""
    from graphteleport.numerics import Magnitudes
    from graphteleport.passes import teleport

    src = _model(tmp_path, "float16")

    def run() -> tuple[list[object], dict[str, np.ndarray]]:
        model = load_model(src)
        result = TeleportPass(seed=5, input_shapes={"ids": (1, SMALL.seq)})(model)
        weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
        return list(result.range_fixes), weights  # type: ignore[misc]

    reference = run()
    zero = Magnitudes(0.0, np.inf, np.inf, np.dtype(np.float16))
    monkeypatch.setattr(teleport, "measure", lambda analysis: [zero] * len(analysis.weights))
    netted = run()
    assert reference[0] and netted[0] == reference[0]
    for name, value in reference[1].items():
        np.testing.assert_array_equal(netted[1][name], value, err_msg=name)

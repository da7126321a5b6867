"""The streamed rewrite of external-data models (issue 15): same output as the in-memory
path, nothing left behind by an interrupt at any phase, quiet with -q.

The models are small LLaMA-shaped ones from :mod:`models.llama` (a few MB, weights in
``NAME.onnx.data``)."""

from __future__ import annotations

import fcntl
import itertools
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
        # what exists in the output folder when the signal lands (the test reads it)
        print("at signal:", sorted(os.listdir("out")), file=sys.stderr, flush=True)
        os.kill(os.getpid(), sig)
        return result

    setattr(owner, name, signalled)
    from graphteleport.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)

PHASES = [
    "graphteleport.pipeline:load_model",  # loaded
    "graphteleport.io:StreamedSave.__init__",  # staging opened (before the pass)
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
    # past the load the staging existed when the signal landed: the cleanup is exercised
    staged_then = "'.graphteleport-" in p.stderr.split("at signal:")[1].splitlines()[0]
    assert staged_then == (target != PHASES[0]), p.stderr
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


# A child that sends itself ``SIGNAL`` while module ``MODULE`` is being imported (when the
# import system looks for it), and says whether ``CHECK`` (module:attribute) existed when
# the CLI's handler ran: the signal must be handled after the import, not in it (an
# interrupt inside a compiled module's initialisation can come out as an ImportError:
# exit 3).  argv: MODULE CHECK SIGNAL CLI-ARGS...
_IMPORT_CHILD = textwrap.dedent(
    """
    import importlib, os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)
    module, check, sig = sys.argv[1], sys.argv[2], getattr(signal, sys.argv[3])

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name == module:
                sys.meta_path.remove(self)
                print("signal sent", file=sys.stderr, flush=True)
                os.kill(os.getpid(), sig)
            return None

    def imported():
        owner, _, attr = check.partition(":")
        return hasattr(sys.modules.get(owner), attr)

    import graphteleport.cli as cli

    raise_terminated = cli._raise_terminated
    def seen(signum, frame):
        print("handled; imported:", imported(), file=sys.stderr, flush=True)
        raise_terminated(signum, frame)
    cli._raise_terminated = seen
    default_int = signal.default_int_handler
    def seen_int(signum, frame):
        print("handled; imported:", imported(), file=sys.stderr, flush=True)
        default_int(signum, frame)
    signal.signal(signal.SIGINT, seen_int)
    sys.meta_path.insert(0, Finder())
    sys.exit(cli.main(sys.argv[4:]))
    """
)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(
    ("module", "check"),
    [
        ("onnx_ir._core", "graphteleport.pipeline:teleport_file"),  # the CLI's imports
        ("onnxruntime.capi.onnxruntime_pybind11_state", "onnxruntime:InferenceSession"),
    ],
)
def test_a_signal_during_an_import_is_handled_after_it(
    tmp_path: Path, module: str, check: str, sig: str
) -> None:
    _model(tmp_path / "in")
    (tmp_path / "out").mkdir()
    script = tmp_path / "child.py"
    script.write_text(_IMPORT_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(script), module, check, sig, "in/llama.onnx", "-o", "out/t.onnx"]
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "signal sent" in p.stderr, p.stderr  # the import happened in this run
    assert "handled; imported: True" in p.stderr, p.stderr
    assert p.returncode == (130 if sig == "SIGINT" else 143), p.stderr
    assert "no partial output" in p.stderr
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == []


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
    found = ranges._AtRisk._found  # (of and the survey's one pass: surveyed)
    monkeypatch.setattr(
        ranges._AtRisk, "_found", classmethod(lambda _, *a: created.append(1) or found(*a))
    )
    sparse_fixes, sparse = fitted()
    assert dense_fixes and created  # the fit ran, through the sparse path
    assert sparse_fixes == dense_fixes
    for name, value in dense.items():
        np.testing.assert_array_equal(sparse[name], value, err_msg=name)


def test_the_fits_later_rounds_check_only_the_elements_whose_pairs_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a weight's first check, a round checks again only its elements at risk
    whose pairs moved since (``_AtRisk.touched``): the same pairs move, with the same
    reasons and values, as when every element at risk is checked every round."""
    from graphteleport import ranges

    src = _model(tmp_path, "float16")
    monkeypatch.setattr(ranges, "_DENSE_CELLS", 0)  # (every weight through the sparse path)

    def fitted() -> tuple[list[ranges.RangeFix], dict[str, np.ndarray]]:
        model = load_model(src)
        result = TeleportPass(seed=5, input_shapes={"ids": (1, SMALL.seq)})(model)
        weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
        return result.range_fixes, weights  # type: ignore[return-value]

    sizes: list[tuple[int, int]] = []  # (elements checked again, elements at risk)
    touched = ranges._AtRisk.touched

    def counted(risk: ranges._AtRisk, *a: object) -> np.ndarray:
        out = touched(risk, *a)  # type: ignore[arg-type]
        sizes.append((out.size, risk.flat.size))
        return out

    monkeypatch.setattr(ranges._AtRisk, "touched", counted)
    fixes, weights = fitted()
    assert fixes and sizes and any(n < total for n, total in sizes)  # some elements skipped
    note = ranges._Check._note

    def every_element(check: ranges._Check, values: np.ndarray) -> None:
        note(check, values)
        check._seen.clear()  # (no weight checked before: all its elements again)

    monkeypatch.setattr(ranges._Check, "_note", every_element)
    all_fixes, all_weights = fitted()
    assert fixes == all_fixes
    for name, value in all_weights.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)


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


def test_the_survey_reads_each_weight_once_and_the_fit_reads_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float16 model's weights are read twice in all: once by the survey (magnitudes
    and the first round's cells — the elements at risk of dense weights too, here with
    ``_DENSE_CELLS`` lowered), once for the products; the fit reads none again, and its
    fixes and the weights are those of a fit that measures its cells itself."""
    from graphteleport import ranges
    from graphteleport.analysis.constraints import ConstRef

    monkeypatch.setattr(ranges, "_DENSE_CELLS", 64)
    src = _model(tmp_path, "float16")

    def run() -> tuple[list[object], dict[str, np.ndarray], dict[str, int]]:
        reads: dict[str, int] = {}
        array = ConstRef.array

        def counted(ref: ConstRef) -> np.ndarray:
            reads[ref.name] = reads.get(ref.name, 0) + 1
            return array(ref)

        with monkeypatch.context() as m:
            m.setattr(ConstRef, "array", counted)
            model = load_model(src)
            result = TeleportPass(seed=5, input_shapes={"ids": (1, SMALL.seq)})(model)
        weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
        return list(result.range_fixes), weights, reads  # type: ignore[misc]

    fixes, weights, reads = run()
    weights_read = {k: n for k, n in reads.items() if k.endswith(".weight")}  # (not eps, mask)
    assert fixes and len(weights_read) == 21 and set(weights_read.values()) == {2}, reads
    monkeypatch.setattr(ranges, "survey", _survey_without_cells)
    fixes_unprimed, weights_unprimed, reads_unprimed = run()
    assert fixes_unprimed == fixes
    assert max(n for k, n in reads_unprimed.items() if k.endswith(".weight")) == 3
    for name, value in weights.items():
        np.testing.assert_array_equal(weights_unprimed[name], value, err_msg=name)


def _survey_without_cells(analysis: object, values: np.ndarray, arrays: object = None) -> object:
    from graphteleport import ranges

    found = _REAL_SURVEY(analysis, values, arrays)  # type: ignore[operator]
    return ranges.Survey(found.magnitudes, {}, {})


def _real_survey() -> object:
    from graphteleport import ranges

    return ranges.survey


_REAL_SURVEY = _real_survey()


def test_the_fit_after_the_products_still_catches_what_the_early_measure_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net: magnitudes measured before the products that disagree with the
    products' own (here: every weight claimed all zero, so the early fit moves nothing)
    send the values through the fit again, and the result is what fitting after the
    products gives."""
    from graphteleport import ranges
    from graphteleport.numerics import Magnitudes

    src = _model(tmp_path, "float16")

    def run() -> tuple[list[object], dict[str, np.ndarray]]:
        model = load_model(src)
        result = TeleportPass(seed=5, input_shapes={"ids": (1, SMALL.seq)})(model)
        weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
        return list(result.range_fixes), weights  # type: ignore[misc]

    reference = run()
    zero = Magnitudes(0.0, np.inf, np.inf, np.dtype(np.float16))
    monkeypatch.setattr(
        ranges, "survey", lambda analysis, *_: ranges.Survey([zero] * len(analysis.weights), {}, {})
    )
    netted = run()
    assert reference[0] and netted[0] == reference[0]
    for name, value in reference[1].items():
        np.testing.assert_array_equal(netted[1][name], value, err_msg=name)


# -- the streamed path's kernels (rows of S, row ranges on threads, bits filter, writes) -------


def _factors(o: int, i: int) -> list[object]:
    from graphteleport.algebra import Factor

    return [
        Factor(np.arange(o).reshape(o, 1), 1),
        Factor(np.arange(o, o + i).reshape(1, i), -1),
        Factor(np.arange(o).reshape(o, 1) % 3, 2),
    ]


def test_rows_of_s_equal_the_whole_product_bit_for_bit() -> None:
    """:class:`~graphteleport.algebra.RowScale` forms ``S`` a block of rows at a time; each
    block is the whole product's rows bit for bit, also where a factor is constant along
    the rows; a use that maps elements or a private weight's several uses get None."""
    from graphteleport.algebra import product, row_scale
    from graphteleport.analysis import Absorb

    rng = np.random.default_rng(3)
    tau = rng.uniform(0.1, 7.0, 64) * rng.choice([-1.0, 1.0], 64)
    for factors, shape in ((_factors(9, 5), (9, 5)), (_factors(9, 5)[1:2], (9, 5))):
        use = Absorb(None, shape, factors, None, 0)  # type: ignore[arg-type]
        lazy = row_scale(shape, [use], False, tau)
        assert lazy is not None
        whole = np.broadcast_to(product(factors, tau, 2), shape)  # type: ignore[arg-type]
        for i, j in ((0, 9), (0, 1), (2, 7), (8, 9)):
            got = np.broadcast_to(lazy.rows(i, j), (j - i, shape[1]))
            assert np.array_equal(got, whole[i:j]), (i, j)
    use = Absorb(None, (9, 5), _factors(9, 5), None, 0)  # type: ignore[arg-type]
    mapped = Absorb(None, (9, 5), _factors(9, 5), None, 0, index=np.arange(45).reshape(9, 5))  # type: ignore[arg-type]
    assert row_scale((9, 5), [mapped], False, tau) is None
    assert row_scale((9, 5), [use, use], True, tau) is None
    assert row_scale((9, 5, 1), [use], False, tau) is None  # layout of another rank


def test_rows_into_writes_the_rows_bit_for_bit() -> None:
    """:meth:`~graphteleport.algebra.RowScale.rows_into` writes :meth:`rows`' values (the
    same factors, the same order) into a float64 grid buffer, and those values rounded
    once into a float32 one, for three factors, two, one and none, and a layout whose
    trailing (kernel) axes are 1."""
    from graphteleport.algebra import Factor, RowScale

    rng = np.random.default_rng(4)
    tau = rng.uniform(0.1, 7.0, 64) * rng.choice([-1.0, 1.0], 64)
    kernel = [Factor(f.ids.reshape(*f.ids.shape, 1, 1), f.exp) for f in _factors(9, 5)]  # type: ignore[attr-defined]
    for factors, shape in (
        (_factors(9, 5), (9, 5)),
        (_factors(9, 5)[1:2], (9, 5)),
        (_factors(9, 5)[:2], (9, 5)),
        ([], (9, 5)),
        (kernel, (9, 5, 1, 1)),
    ):
        lazy = RowScale(factors, tau, shape)  # type: ignore[arg-type]
        for i, j in ((0, 9), (2, 7), (8, 9)):
            want = np.broadcast_to(lazy.rows(i, j), (j - i, *shape[1:])).reshape(j - i, 5)
            for dtype in (np.float64, np.float32):  # float32: the float64 values rounded once
                out = np.full((j - i, 5), np.nan, dtype=dtype)
                lazy.rows_into(i, j, out)
                assert np.array_equal(out, want.astype(dtype)), (len(factors), shape, i, j)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_native_products_count_changes_from_the_grid(
    dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float32/float64 W·S on the ``[O, C]`` grid (S constant over a 3×3 window) by one
    broadcast multiply per block, on two threads: the product is :func:`_apply`'s bit for
    bit, and the count taken from the grid (non-zero elements where S ≠ 1, given a lower
    bound of |S|) is ``new != W``'s — with zeros, cells whose S is exactly 1 and negative
    S; and where the grid cannot tell (a subnormal element, an S that takes the smallest
    elements below the normal range, an unknown bound) the bits are compared instead."""
    from graphteleport import parallel, rewrite
    from graphteleport.numerics import limits, magnitudes

    monkeypatch.setattr(parallel, "PARALLEL_ELEMENTS", 64)
    monkeypatch.setattr(rewrite, "_BLOCK", 100)
    monkeypatch.setattr(rewrite, "GRID_BLOCK", 100)
    monkeypatch.setattr(rewrite, "_HALF_BLOCK", 100)  # several blocks per range
    rng = np.random.default_rng(12)
    tiny = limits(np.dtype(dtype)).tiny
    for case in ("plain", "subnormal", "underflow", "unknown"):
        w = rng.standard_normal((23, 7, 3, 3)).astype(dtype)
        w[::4, ::3] = 0.0
        w[1::5, 2] = -0.0
        s = rng.uniform(0.3, 3.0, (23, 1, 1, 1)) * rng.choice([-1.0, 1.0], (1, 7, 1, 1))
        s[3] = 1.0  # a row of cells unchanged
        s[5, 2] = -1.0
        smin = float(np.abs(s).min())
        if case == "subnormal":
            w[2, 3, 1, 1] = tiny / 8
        if case == "underflow":  # tiny · (1 − ε/2) is a tie that rounds back to tiny
            w[6, 1, 0, 0] = tiny
            s[6, 1] = 1.0 - float(np.finfo(dtype).eps) / 2
        new, changed, mags = rewrite._product_rows(
            w, lambda i, j, s=s: s[i:j], True, s.shape, 0.0 if case == "unknown" else smin
        )
        ref = rewrite._apply(w, s, True)
        assert np.array_equal(new.view(np.uint8), ref.view(np.uint8)), (dtype, case)
        assert changed == int(np.count_nonzero(ref != w)), (dtype, case)
        assert mags == magnitudes(w)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("f32", [True, False])
def test_products_by_row_ranges_on_threads_equal_the_whole_product(
    dtype: str, f32: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``W · S`` by row ranges on two threads, a block at a time in reused buffers, is
    :func:`_apply`'s product bit for bit; the count of changed elements is ``new != W``'s
    (a zero whose sign flipped is not a change; NaN always is) and the magnitudes are
    :func:`~graphteleport.numerics.magnitudes`'."""
    import ml_dtypes

    from graphteleport import parallel, rewrite
    from graphteleport.numerics import magnitudes

    monkeypatch.setattr(parallel, "PARALLEL_ELEMENTS", 64)
    monkeypatch.setattr(rewrite, "_BLOCK", 40)
    monkeypatch.setattr(rewrite, "GRID_BLOCK", 40)
    monkeypatch.setattr(rewrite, "_HALF_BLOCK", 40)  # several blocks per range
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(11)
    for special in (False, True):
        w = (rng.standard_normal((37, 13)) * 1e-3).astype(np_dtype)
        w[::5, ::3] = 0.0
        w[1::7, ::2] = -0.0
        w[2, 3] = np.asarray(6e-8, dtype=np.float64).astype(np_dtype)  # subnormal in float16
        if special:
            w[4, 4], w[5, 5] = np.nan, np.inf
        s = rng.uniform(0.3, 3.0, (37, 1)) * rng.choice([-1.0, 1.0], (1, 13))
        s[:12] = np.abs(s[:12])  # (blocks whose S is positive: zeros keep their sign)
        new, changed, mags = rewrite._product_rows(w, lambda i, j, s=s: s[i:j], f32)
        ref = rewrite._apply(w, s, f32)
        assert new.dtype == w.dtype
        assert np.array_equal(new.view(np.uint8), ref.view(np.uint8)), (dtype, f32, special)
        assert changed == int(np.count_nonzero(ref != w))
        assert mags == magnitudes(w)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_the_at_risk_filter_on_bits_finds_what_the_exact_check_finds(dtype: str) -> None:
    """:meth:`ranges._AtRisk.of` filters W's bits against thresholds in W's dtype; the
    elements it keeps are exactly those the exact per-element check flags for
    ``smin`` or ``smax`` (zeros, subnormals, the largest values, inf and NaN included)."""
    import ml_dtypes

    from graphteleport import ranges
    from graphteleport.numerics import cell_magnitudes, limits, violations

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    lim = limits(np_dtype)
    rng = np.random.default_rng(5)
    exps = rng.uniform(np.log2(lim.sub), np.log2(lim.max), 4000)
    w = (np.exp2(exps) * rng.choice([-1.0, 1.0], 4000)).astype(np_dtype)
    w[:40] = np.array([0.0, -0.0, np.inf, -np.inf, np.nan] * 8).astype(np_dtype)
    w[40:60] = np.asarray(lim.max).astype(np_dtype)
    w[60:80] = np.asarray(lim.tiny).astype(np_dtype)
    w = w.reshape(80, 50)
    # (and a weight of small magnitudes only: the one-compare path of ranges._candidates)
    small = (np.exp2(exps.clip(None, 0.0)) * rng.choice([-1.0, 1.0], 4000)).astype(np_dtype)
    small[:10] = 0.0
    bounds = ((0.5, 2.0), (1e-3, 1.0), (1.0, 1e3), (0.999, 1.001), (2.0**-20, 2.0**20))
    found = []
    for v, (smin, smax) in itertools.product((w, small.reshape(80, 50)), bounds):
        risk = ranges._AtRisk.of(v, lim, smin, smax)
        hi, lo_n, lo_s = cell_magnitudes(v, (), lim)
        over, _ = violations(hi, lo_n, lo_s, smax, lim)
        _, under = violations(hi, lo_n, lo_s, smin, lim)
        expected = np.flatnonzero((over | under).reshape(-1))
        found.append(expected.size)
        assert np.array_equal(np.sort(risk.flat), expected), (dtype, smin, smax)
        assert tuple(map(tuple, risk.at)) == tuple(map(tuple, np.unravel_index(risk.flat, v.shape)))
    assert all(found[:3]) and all(found[5:7])  # (elements at risk in both weights)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("chunk", [300, 1 << 20])
def test_the_surveys_one_pass_finds_the_magnitudes_and_elements_at_risk_of_two(
    dtype: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """:meth:`ranges._AtRisk.surveyed` (one read of W) gives the elements at risk of
    :meth:`ranges._AtRisk.of` and the magnitudes and finiteness of
    :func:`graphteleport.rewrite.measure_finite` (two reads): weights with zeros,
    subnormals, the largest values, inf and NaN, only small or only normal values; in
    one chunk and in many (some without a subnormal, some with nothing at risk)."""
    import ml_dtypes

    from graphteleport import ranges
    from graphteleport.numerics import limits
    from graphteleport.rewrite import measure_finite

    monkeypatch.setattr(ranges, "_RISK_CHUNK", chunk)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    lim = limits(np_dtype)
    rng = np.random.default_rng(7)
    exps = rng.uniform(np.log2(lim.sub), np.log2(lim.max), 4000)
    signs = rng.choice([-1.0, 1.0], 4000)
    wide = (np.exp2(exps) * signs).astype(np_dtype)
    special = wide.copy()
    special[1000:1040] = np.array([0.0, -0.0, np.inf, -np.inf, np.nan] * 8).astype(np_dtype)
    special[2000:2020] = np.asarray(lim.max).astype(np_dtype)
    small = (np.exp2(exps.clip(None, 0.0)) * signs).astype(np_dtype)
    small[:10] = 0.0
    normal = (rng.uniform(1.0, 2.0, 4000) * signs).astype(np_dtype)
    bounds = ((0.5, 2.0), (1e-3, 1.0), (1.0, 1e3), (2.0**-20, 2.0**20))
    for v, (smin, smax) in itertools.product((wide, special, small, normal), bounds):
        v = v.reshape(80, 50)
        risk, mags, finite = ranges._AtRisk.surveyed(v, lim, smin, smax)
        ref = ranges._AtRisk.of(v, lim, smin, smax)
        assert np.array_equal(risk.flat, ref.flat), (dtype, smin, smax)
        for got, want in zip((*risk.at, *risk.cells), (*ref.at, *ref.cells), strict=True):
            assert got.dtype == want.dtype and np.array_equal(got, want)
        assert (mags, finite) == measure_finite(v), (dtype, smin, smax)


def test_row_parts_cover_the_rows_once_and_map_parts_keeps_order() -> None:
    from graphteleport import parallel

    for n, size in ((1, 10**7), (7, 10**7), (1000, 10**7), (1000, 10)):
        parts = parallel.row_parts(n, size)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
        assert len(parts) == (
            1 if size < parallel.PARALLEL_ELEMENTS or n == 1 else parallel.workers()
        )
    assert parallel.map_parts(lambda a, b: a * b, [(k, k + 1) for k in range(9)]) == [
        k * (k + 1) for k in range(9)
    ]


def test_map_parts_runs_the_first_part_here_and_waits_for_every_part() -> None:
    """``map_parts`` works on the first part on the calling thread, the others on the
    pool, and returns or raises only once every part has finished."""
    import threading
    import time

    from graphteleport import parallel

    here = threading.get_ident()
    ids = parallel.map_parts(threading.get_ident, [(), ()])
    assert ids[0] == here and ids[1] != here
    done: list[int] = []

    def work(k: int) -> int:
        time.sleep(0.05 * k)
        done.append(k)
        if k == 0:
            raise ValueError("first part")
        return k

    with pytest.raises(ValueError, match="first part"):
        parallel.map_parts(work, [(0,), (1,)])
    assert sorted(done) == [0, 1]  # (the pool's part finished before the first's error)


def test_data_file_scratch_never_lends_the_buffer_being_written(tmp_path: Path) -> None:
    """``DataFile.scratch`` alternates between its two buffers: never the one whose write
    is in flight, grown when a larger array is asked for; every tensor reads back what
    was computed in its buffer."""
    f = gt_io.DataFile(tmp_path / "d.data")
    tensors, arrays = [], []
    for k, n in enumerate((1000, 1000, 3000, 10, 3000)):
        a = f.scratch((n,), np.dtype(np.float32))
        assert all(not np.shares_memory(a, b) for b in arrays[-1:]), k  # (in flight)
        a[:] = k + 1
        tensors.append(f.put(f"t{k}", a))
        arrays.append(a)
    f.close()
    for k, t in enumerate(tensors):
        assert np.array_equal(t.numpy(), np.full(t.shape.numpy(), k + 1, np.float32)), k


def _source_tensors(tmp_path: Path) -> list[object]:
    """Three float32 tensors of 37, 100 and 5 elements in one source data file."""
    import onnx_ir as ir

    rng = np.random.default_rng(4)
    parts = [rng.standard_normal(n).astype(np.float32) for n in (37, 100, 5)]
    (tmp_path / "src.data").write_bytes(b"".join(p.tobytes() for p in parts))
    out, at = [], 0
    for k, p in enumerate(parts):
        out.append(
            ir.ExternalTensor("src.data", at, p.nbytes, ir.DataType.FLOAT, shape=ir.Shape(p.shape),
                              name=f"s{k}", base_dir=str(tmp_path))
        )  # fmt: skip
        at += p.nbytes
    return out


@pytest.mark.parametrize("spare", [1, 2])
def test_a_streamed_float16_rewrite_copies_untouched_tensors_ahead_where_a_core_is_free(
    tmp_path: Path, spare: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With both cores free the tensors no rewrite touches are copied during the fit
    and the save finds them in place (no copy at the end); with one, nothing is copied
    ahead; the output files are byte for byte those of the other case."""
    import threading

    from graphteleport import rewrite

    src = _model(tmp_path / "in", "float16")
    outputs = []
    precopy, real = gt_io.DataFile.precopy, gt_io._copy_range
    for free in (spare, 3 - spare):
        monkeypatch.setattr(rewrite, "core_free", lambda free=free: free == 2)
        planned: list[int] = []
        at_end: list[int] = []  # copies the save makes itself (on the main thread)

        def counted(*a: object, log: list[int] = at_end) -> None:
            if threading.current_thread() is threading.main_thread():
                log.append(1)
            real(*a)  # type: ignore[arg-type]

        def plan(f: gt_io.DataFile, p: list[object], log: list[int] = planned) -> None:
            log.append(len(p))
            precopy(f, p)  # type: ignore[arg-type]

        monkeypatch.setattr(gt_io.DataFile, "precopy", plan)
        monkeypatch.setattr(gt_io, "_copy_range", counted)
        out = tmp_path / f"out{free}" / "t.onnx"
        out.parent.mkdir()
        report = teleport_file(src, out, TeleportOptions(seed=3, verify=False))
        assert report.stats.weights_changed > 0
        assert bool(planned and planned[0] > 0) == (free == 2), (free, planned)
        assert (len(at_end) == 0) == (free == 2), (free, at_end)
        outputs.append((out.read_bytes(), out.with_name("t.onnx.data").read_bytes()))
    assert outputs[0] == outputs[1]


_AHEAD_CASES = {  # steps: ("put", bytes) or ("copy", source tensor); copies made again
    "as planned": ([("put", 100), ("copy", 0), ("copy", 1), ("copy", 2)], 0),
    "put smaller": ([("put", 40), ("copy", 0), ("copy", 1), ("copy", 2)], 3),
    "put larger": ([("put", 200), ("copy", 0), ("copy", 1), ("copy", 2)], 3),
    "one not copied": ([("put", 100), ("copy", 0), ("copy", 1)], 0),
    "puts between": ([("put", 100), ("copy", 0), ("put", 380), ("put", 4), ("copy", 1)], 1),
}


@pytest.mark.parametrize("case", list(_AHEAD_CASES))
def test_copies_made_ahead_of_time_give_the_bytes_of_copying_at_the_end(
    tmp_path: Path, case: str
) -> None:
    """``DataFile.precopy`` writes tensors where a layout is expected to put them, before
    anything is put; whatever the puts and copies then do — as planned, a put smaller or
    larger than planned (over a planned copy), a planned tensor never copied, unplanned
    puts leaving padding inside a planned copy's bytes — the file holds exactly the
    bytes of doing the same puts and copies without the plan, and the copies made ahead
    are used (not copied again) where the layout held."""
    src = _source_tensors(tmp_path)
    steps, again = _AHEAD_CASES[case]

    def run(name: str, plan: bool) -> tuple[bytes, int]:
        f = gt_io.DataFile(tmp_path / name)
        copied: list[int] = []
        real = gt_io._copy_range
        if plan:  # (as if 100 bytes were put first: offsets 128, 128 + 37*4 -> 320, 768)
            f.precopy([(src[0], 128), (src[1], 320), (src[2], 768)])
        f.rewind()  # (a rewrite's first step: keeps the plan on an empty file)
        gt_io._copy_range = lambda *a: (copied.append(1), real(*a))[1]  # type: ignore[assignment]
        try:
            for k, (op, arg) in enumerate(steps):
                if op == "put":
                    f.put(f"p{k}", np.full(arg // 4, k + 0.5, dtype=np.float32))
                else:
                    f.copy(src[arg])  # type: ignore[arg-type]
            f.close()
        finally:
            gt_io._copy_range = real
        return (tmp_path / name).read_bytes(), len(copied)

    reference, _ = run("ref.data", False)
    got, copies_after = run("planned.data", True)
    assert got == reference
    assert copies_after == again


def test_a_failed_background_write_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A weight written by the background thread that fails (the disk full) is reported
    as one line, exit 2, and the staged files are removed."""
    import errno

    from graphteleport.cli import main

    src = _model(tmp_path / "in", "float16")
    out = tmp_path / "out"
    out.mkdir()

    def full(fd: int, raw: memoryview, start: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gt_io, "_pwrite_chunks", full)
    code = main([str(src), "-o", str(out / "t.onnx"), "--no-verify", "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().count("\n") == 0 and "No space left on device" in err
    assert list(out.iterdir()) == []


def _ordered(a: np.ndarray) -> np.ndarray:
    """A half-precision array's bits as integers ordered like the values (ulps apart)."""
    b = a.view(np.uint16).astype(np.int64)
    return np.where(b & 0x8000, -(b & 0x7FFF), b)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_products_through_float32_are_within_one_ulp_and_exact_for_powers_of_two(
    dtype: str,
) -> None:
    """``_half_product`` (float32, rounded twice) against the exactly rounded product
    ``round_W(w · round_32(s))`` (taken in float64: 11 or 8 bits times 24 fit in 53):
    at most 1 ulp of W's dtype apart, equal on almost every element, and equal bit for
    bit where S is a power of two (normal and subnormal results, overflow, underflow)."""
    import ml_dtypes

    from graphteleport import rewrite
    from graphteleport.numerics import limits

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    lim = limits(np_dtype)
    rng = np.random.default_rng(3)
    n = 1 << 18
    w = (np.exp2(rng.uniform(np.log2(lim.sub), np.log2(lim.max), n))).astype(np_dtype)
    w *= rng.choice([-1, 1], n).astype(np_dtype)
    for s in (
        rng.uniform(0.01, 100.0, n).astype(np.float32),
        np.exp2(rng.integers(-40, 40, n)).astype(np.float32),
    ):
        got = rewrite._half_product(w, s)
        with np.errstate(over="ignore"):
            exact = (w.astype(np.float64) * s.astype(np.float64)).astype(np_dtype)
        finite = np.isfinite(exact.astype(np.float32)) & np.isfinite(got.astype(np.float32))
        assert np.array_equal(~np.isfinite(exact.astype(np.float32)), ~finite)  # same overflow
        ulps = np.abs(_ordered(got[finite]) - _ordered(exact[finite]))
        assert ulps.max() <= 1, dtype
        if np.all(np.log2(s) == np.round(np.log2(s))):
            assert np.array_equal(got.view(np.uint16), exact.view(np.uint16)), dtype
        else:
            assert 0 < np.count_nonzero(ulps) < n // 1000, np.count_nonzero(ulps)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_torch_or_onnxruntime_and_numpy_half_conversions_give_the_same_bits(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """:mod:`graphteleport.halfcast`'s backends: every float16 pattern and bfloat16
    values of every exponent widen to the same float32 as numpy's, and float32 values
    (ties, subnormal results, overflow, ±0, ±inf) narrow to the same half-precision
    bits, also across several pieces."""
    import ml_dtypes

    from graphteleport import halfcast

    monkeypatch.setattr(halfcast, "ORT_PIECE", halfcast.PIECE)  # several runs
    torch_casts = halfcast.torch_casts() if backend == "torch" else halfcast.ort_casts()
    if torch_casts is None:
        pytest.skip(f"{backend} not installed")
    numpy_casts = halfcast.numpy_casts()
    rng = np.random.default_rng(4)
    n = 3 * halfcast.PIECE + 5
    for dtype in halfcast.HALVES:
        src = rng.integers(0, 1 << 16, n, dtype=np.uint16).view(dtype)
        src = src[~np.isnan(src.astype(np.float32))]  # (NaN payloads are not promised)
        wide = [np.empty(src.size, np.float32) for _ in range(2)]
        for casts, dst in zip((numpy_casts, torch_casts), wide, strict=True):
            casts.copy(src, dst)
        assert np.array_equal(wide[0].view(np.uint32), wide[1].view(np.uint32)), dtype
        lim = ml_dtypes.finfo(dtype)
        x = np.exp2(rng.uniform(np.log2(float(lim.smallest_subnormal)) - 2, 130, n))
        x = (x * rng.choice([-1.0, 1.0], n)).astype(np.float32)
        x[:8] = [0.0, -0.0, np.inf, -np.inf, 1 + 2.0**-11, 1 + 2.0**-8, 65520.0, 2.0**-25]
        narrow = [np.empty(n, dtype) for _ in range(2)]
        for casts, dst in zip((numpy_casts, torch_casts), narrow, strict=True):
            casts.copy(x, dst)
        assert np.array_equal(narrow[0].view(np.uint16), narrow[1].view(np.uint16)), dtype


def test_onnxruntime_half_conversions_keep_numpys_nan_payloads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A piece holding a NaN is converted again by numpy: the float16 and float32 NaN
    patterns (signalling ones too) come out as numpy writes them, and the other elements
    of the piece as before."""
    from graphteleport import halfcast

    monkeypatch.setattr(halfcast, "ORT_PIECE", 64)
    casts = halfcast.ort_casts()
    assert casts is not None
    half = np.arange(0x7C00, 0x8000, dtype=np.uint16)  # +inf, then every positive NaN
    half = np.concatenate([half, half | 0x8000, np.arange(0, 300, dtype=np.uint16)]).view(
        np.float16
    )
    wide = np.empty(half.size, np.float32)
    casts.copy(half, wide)
    assert np.array_equal(wide.view(np.uint32), half.astype(np.float32).view(np.uint32))
    single = np.array([0x7F800001, 0x7FC00000, 0xFF800123, 0x7FBFFFFF], dtype=np.uint32)
    single = np.concatenate([single, np.arange(0x3F800000, 0x3F800000 + 200, dtype=np.uint32)])
    narrow = np.empty(single.size, np.float16)
    casts.copy(single.view(np.float32), narrow)
    assert np.array_equal(
        narrow.view(np.uint16), single.view(np.float32).astype(np.float16).view(np.uint16)
    )


@pytest.mark.parametrize("backend", ["numpy", "torch", "onnxruntime"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_products_by_blocks_on_either_backend_equal_the_whole_product(
    dtype: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streamed product of a half-precision conv weight (S on its [O, C] grid) and of
    a matrix, by row ranges on two threads with either conversion backend, is
    :func:`_half_product`'s bit for bit, with the bits-changed count."""
    import ml_dtypes

    from graphteleport import halfcast, parallel, rewrite

    backends = {"torch": halfcast.torch_casts, "numpy": halfcast.numpy_casts}
    backends["onnxruntime"] = halfcast.ort_casts
    casts = backends[backend]()
    if casts is None:
        pytest.skip(f"{backend} not installed")
    monkeypatch.setattr(halfcast, "ORT_PIECE", 70)
    monkeypatch.setattr(parallel, "PARALLEL_ELEMENTS", 64)
    monkeypatch.setattr(rewrite, "_BLOCK", 300)
    monkeypatch.setattr(rewrite, "GRID_BLOCK", 300)
    monkeypatch.setattr(rewrite, "_HALF_BLOCK", 300)
    monkeypatch.setattr(halfcast, "PIECE", 70)  # several pieces per block
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(12)
    halfcast.use(casts)
    try:
        for shape, layout in (((29, 6, 3, 3), (29, 6, 1, 1)), ((41, 17), (41, 17))):
            w = rng.standard_normal(shape).astype(np_dtype)
            if backend != "torch":  # (torch's vector and scalar loops give NaNs other bits)
                w.reshape(-1)[[-30, -7]] = [np.nan, -np.inf]  # (late blocks: checked again)
            s = rng.uniform(0.3, 3.0, layout)
            s[::4] = 1.0
            new, changed, _ = rewrite._product_rows(w, lambda i, j, s=s: s[i:j], True, layout)
            ref = rewrite._apply(w, s, True)
            assert np.array_equal(new.view(np.uint16), ref.view(np.uint16)), (dtype, shape)
            assert changed == int(np.count_nonzero(ref != w))
            assert backend == "torch" or np.isnan(new.reshape(-1)[-30])
    finally:
        halfcast.use(None)


@pytest.mark.parametrize("backend", ["onnxruntime", "numpy"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_products_of_a_weight_measured_already_skip_the_scan_and_give_the_same_bits(
    dtype: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given the magnitudes the survey measured on a finite W (``known``), the streamed
    product neither scans W nor checks its conversions for NaN, and gives the same bits,
    count and magnitudes as measuring — also where ``W · S`` overflows to inf; the
    survey offers its magnitudes only for finite weights (:meth:`Survey.known`)."""
    import ml_dtypes

    from graphteleport import halfcast, parallel, ranges, rewrite
    from graphteleport.numerics import MagnitudeScan, magnitudes

    casts = halfcast.ort_casts() if backend == "onnxruntime" else halfcast.numpy_casts()
    if casts is None:
        pytest.skip(f"{backend} not installed")
    monkeypatch.setattr(parallel, "PARALLEL_ELEMENTS", 64)
    monkeypatch.setattr(rewrite, "_HALF_BLOCK", 300)
    monkeypatch.setattr(halfcast, "ORT_PIECE", 70)
    scanned: list[int] = []
    real_add = MagnitudeScan.add
    monkeypatch.setattr(
        MagnitudeScan, "add", lambda self, piece: (scanned.append(1), real_add(self, piece))[1]
    )
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(13)
    w = rng.standard_normal((41, 17)).astype(np_dtype)
    w[3, 4] = np.asarray(60000.0 if dtype == "float16" else 3e38).astype(np_dtype)  # overflows
    s = rng.uniform(0.3, 3.0, (41, 17))
    s[3, 4] = 2.5
    halfcast.use(casts)
    try:
        ref, ref_changed, ref_mags = rewrite._product_rows(w, lambda i, j: s[i:j], True)
        ref = ref.copy()
        assert scanned
        known = magnitudes(w)
        scanned.clear()
        new, changed, mags = rewrite._product_rows(w, lambda i, j: s[i:j], True, known=known)
    finally:
        halfcast.use(None)
    assert not scanned
    assert np.isinf(new[3, 4].astype(np.float64))
    assert np.array_equal(new.view(np.uint8), ref.view(np.uint8))
    assert (changed, mags) == (ref_changed, ref_mags)
    assert rewrite.measure_finite(w) == (ref_mags, True)
    w[5, 5] = np.nan
    assert rewrite.measure_finite(w)[1] is False
    survey = ranges.Survey([known, known], {}, {}, finite=[True, False])
    assert survey.known() == [known, None]
    assert ranges.Survey([known], {}, {}).known() is None  # (finiteness not recorded)


def test_the_cli_never_imports_torch_for_the_half_conversions(tmp_path: Path) -> None:
    """torch's conversions are used only where the process imported torch already: the
    CLI on a float16 model never loads it --
    its libraries cost the verified 7B-shaped run ~0.4 GB of its 2 GB budget -- and a
    process that has torch loaded gets them."""
    src = _model(tmp_path / "in", "float16")
    code = (
        "import sys; from graphteleport import halfcast; from graphteleport.cli import main; "
        "sys.argv[1] == 'torch' and __import__('torch'); "
        "rc = main([sys.argv[2], '-o', sys.argv[3], '--no-verify', '-q']); "
        "print(rc, 'torch' in sys.modules, halfcast.chosen().name)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    found = []
    for first in ("none", "torch"):
        dst = tmp_path / f"out-{first}" / "t.onnx"
        dst.parent.mkdir()
        args = [sys.executable, "-c", code, first, str(src), str(dst)]
        p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        found.append(p.stdout.split())
    assert found[0] == ["0", "False", "onnxruntime"], found
    assert found[1] == ["0", "True", "torch"], found


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_streamed_rewrite_releases_every_memory_map_it_reads(
    tmp_path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peak memory grows with the largest tensor, not the model, only if each external
    tensor's memory map is closed once its product is written: a release refused because
    a view of the map is still alive (``BufferError``) would keep every page read so far
    resident (an 8-layer fp16 LLaMA peaked at 4.4 GB instead of 1.0 when ``prepare`` held
    the array it read across the release)."""
    import onnx_ir as ir

    src = _model(tmp_path / "in", dtype)
    refused: list[str] = []
    real = ir.ExternalTensor.release

    def release(tensor: ir.ExternalTensor) -> None:
        try:
            real(tensor)
        except BufferError:
            refused.append(str(tensor.name))
            raise

    monkeypatch.setattr(ir.ExternalTensor, "release", release)
    report = teleport_file(src, tmp_path / "out.onnx", TeleportOptions(seed=2, verify=False))
    assert report.stats.weights_changed > 0
    assert refused == []


def _direct_run(tmp_path: Path, name: str, direct: bool) -> tuple[bytes, int]:
    """Puts (scratch buffers and plain arrays, sizes across the 4096-byte blocks) and
    copies (of a source file's tensors) into a new :class:`DataFile`: its bytes and how
    many bytes went direct."""
    import onnx_ir as ir

    rng = np.random.default_rng(7)
    parts = [rng.integers(0, 65535, n, dtype=np.uint16) for n in (5000, 3, 40000, 2048, 9001)]
    (tmp_path / "dsrc.data").write_bytes(b"".join(p.tobytes() for p in parts))
    src, at = [], 1  # (odd source offsets: the bounce buffer reads them as they come)
    for k, p in enumerate(parts):
        src.append(ir.ExternalTensor("dsrc.data", at - 1 + (k % 2), p.nbytes - 2 * (k % 2),
                                     ir.DataType.UINT8, shape=ir.Shape([p.nbytes - 2 * (k % 2)]),
                                     name=f"s{k}", base_dir=str(tmp_path)))  # fmt: skip
        at += p.nbytes
    f = gt_io.DataFile(tmp_path / name, direct=direct)
    direct_bytes = [0]
    if f._direct is not None:
        real = f._direct._write_blocks

        def counted(blocks: memoryview, offset: int) -> int:
            done = real(blocks, offset)
            direct_bytes[0] += done
            return done

        f._direct._write_blocks = counted  # type: ignore[method-assign]
    for k, n in enumerate((70000, 3, 12289, 4096, 100000, 7)):
        if k % 2 == 0:
            a = f.scratch((n,), np.dtype(np.uint16))
            a[:] = rng.integers(0, 65535, n, dtype=np.uint16)
        else:
            a = rng.integers(0, 65535, n, dtype=np.uint16)
        f.put(f"p{k}", a)
        f.copy(src[k % len(src)])  # type: ignore[arg-type]
    f.close()
    return (tmp_path / name).read_bytes(), direct_bytes[0]


def test_direct_writes_give_the_bytes_of_buffered_ones(tmp_path: Path) -> None:
    """A :class:`DataFile` written with ``direct`` (whole blocks past the page cache, the
    ends through it; copies through an aligned buffer) holds exactly the bytes of one
    written through the page cache; where the filesystem takes ``O_DIRECT``, most of
    them went direct."""
    reference, none = _direct_run(tmp_path, "ref.data", False)
    got, direct_bytes = _direct_run(tmp_path, "direct.data", True)
    assert none == 0
    assert got == reference
    if gt_io._Direct.open(tmp_path / "ref.data") is None:
        pytest.skip("this filesystem refuses O_DIRECT: the fallback was tested")
    assert direct_bytes > len(reference) // 2, (direct_bytes, len(reference))


def test_refused_direct_writes_fall_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a direct write fails with EINVAL (a filesystem that opens with ``O_DIRECT``
    but refuses the write), the bytes go through the page cache: the same file."""
    import errno as errno_mod

    reference, _ = _direct_run(tmp_path, "ref.data", False)
    real = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(fd)
            raise OSError(errno_mod.EINVAL, "refused")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    got, direct_bytes = _direct_run(tmp_path, "direct.data", True)
    assert got == reference and direct_bytes == 0
    if gt_io._Direct.open(tmp_path / "ref.data") is not None:
        assert refused


def test_an_unverified_streamed_run_writes_the_files_a_buffered_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--no-verify`` writes the data file direct (:class:`graphteleport.io.DataFile`):
    the model and data files are byte for byte those written through the page cache."""
    src = _model(tmp_path / "in", "float16")
    outputs = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(gt_io._Direct, "open", classmethod(lambda cls, path: None))
        out = tmp_path / f"out{direct}" / "t.onnx"
        out.parent.mkdir()
        report = teleport_file(src, out, TeleportOptions(seed=3, verify=False))
        assert report.stats.weights_changed > 0
        outputs.append((out.read_bytes(), out.with_name("t.onnx.data").read_bytes()))
    assert outputs[0] == outputs[1]

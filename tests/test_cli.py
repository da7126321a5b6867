"""The ``graphteleport`` command: exit codes, one-line errors, atomic output, the report.

Exit 0 done; 1 verification failed (nothing written); 2 bad input or usage (one line on
stderr, no traceback, nothing written).  The input file is never modified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO_ROOT, gemm_mlp, make_model, max_rel_err, rand, run_ort, weights
from onnx import helper

import graphteleport.algebra
from graphteleport.analysis import Absorb
from graphteleport.cli import main

FIXTURE = "mlp_small.onnx"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """Run the CLI in-process; usage errors leave argparse's way, as SystemExit."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def work(tmp_path: Path, fixtures_dir: Path) -> Iterator[Path]:
    """A directory holding a copy of the MLP fixture as ``m.onnx`` (checked unchanged after)."""
    shutil.copy(fixtures_dir / FIXTURE, tmp_path / "m.onnx")
    digest = sha(tmp_path / "m.onnx")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(cwd)
    assert sha(tmp_path / "m.onnx") == digest, "the input model was modified"


def listing(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def assert_one_line_error(rc: int, err: str, code: int = 2) -> None:
    assert rc == code
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("graphteleport:")


def dynamic_model(path: Path, batch: str | int = 1) -> Path:
    """x[batch, T, 4] → MatMul → Relu → MatMul → y[batch, T, 3]; T is dynamic."""
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "W0"], ["h"]),
        n("Relu", ["h"], ["a"]),
        n("MatMul", ["a", "W1"], ["y"]),
    ]
    proto = make_model(
        nodes,
        {"x": [batch, "T", 4]},
        {"y": [batch, "T", 3]},
        {"W0": rand([4, 6], 0), "W1": rand([6, 3], 1)},
    )
    onnx.save(proto, path)
    return path


# -- bad input: exit 2 ------------------------------------------------------------------------
def _setup_bad(work: Path, case: str) -> list[str]:
    """Create what ``case`` needs in ``work``; return the CLI arguments."""
    if case == "missing file":
        return ["nope.onnx", "-o", "o.onnx"]
    if case == "not onnx":
        (work / "t.onnx").write_text("hello, I am not a model\n")
        return ["t.onnx", "-o", "o.onnx"]
    if case == "truncated onnx":
        data = (work / "m.onnx").read_bytes()
        (work / "cut.onnx").write_bytes(data[: len(data) // 2])
        return ["cut.onnx", "-o", "o.onnx"]
    if case == "empty file":
        (work / "e.onnx").write_bytes(b"")
        return ["e.onnx", "-o", "o.onnx"]
    if case == "-o is the input":
        return ["m.onnx", "-o", "m.onnx"]
    if case == "-o is the input via ..":
        (work / "sub").mkdir()
        return ["m.onnx", "-o", "sub/../m.onnx"]
    if case == "-o is the input via absolute path":
        return ["m.onnx", "-o", str(work / "m.onnx")]
    if case == "-o is a symlink to the input":
        (work / "link.onnx").symlink_to("m.onnx")
        return ["m.onnx", "-o", "link.onnx"]
    if case == "input is a symlink to -o":
        (work / "link.onnx").symlink_to("m.onnx")
        return ["link.onnx", "-o", "m.onnx"]
    if case == "dynamic dim no size runs":  # only T = 5 fits the Reshape
        nodes = [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("MatMul", ["r", "W"], ["y"]),
        ]
        shape = np.array([1, 5, 4], dtype=np.int64)
        inits = {"shape": shape, "W": rand([4, 3], 0)}
        onnx.save(make_model(nodes, {"x": [1, "T", 4]}, {"y": [1, 5, 3]}, inits), work / "d.onnx")
        return ["d.onnx", "-o", "o.onnx"]
    if case == "bad --input-shape syntax":
        return ["m.onnx", "-o", "o.onnx", "--input-shape", "input=1,x"]
    if case == "--input-shape without =":
        return ["m.onnx", "-o", "o.onnx", "--input-shape", "input"]
    if case == "--input-shape with a zero":
        return ["m.onnx", "-o", "o.onnx", "--input-shape", "input=0,784"]
    if case == "--input-shape of an unknown input":
        return ["m.onnx", "-o", "o.onnx", "--input-shape", "nothere=1,784"]
    if case == "unknown --sampling":
        return ["m.onnx", "-o", "o.onnx", "--sampling", "sideways"]
    if case == "unknown --mode":
        return ["m.onnx", "-o", "o.onnx", "--mode", "teleport-harder"]
    if case == "negative --cob-range":
        return ["m.onnx", "-o", "o.onnx", "--cob-range", "-1"]
    if case == "missing -o":
        return ["m.onnx"]
    if case == "missing --inputs file":
        return ["m.onnx", "-o", "o.onnx", "--inputs", "nope.npz"]
    if case == "output directory missing":
        return ["m.onnx", "-o", "no/such/dir/o.onnx"]
    raise AssertionError(case)


BAD_CASES = [
    "missing file",
    "not onnx",
    "truncated onnx",
    "empty file",
    "-o is the input",
    "-o is the input via ..",
    "-o is the input via absolute path",
    "-o is a symlink to the input",
    "input is a symlink to -o",
    "dynamic dim no size runs",
    "bad --input-shape syntax",
    "--input-shape without =",
    "--input-shape with a zero",
    "--input-shape of an unknown input",
    "unknown --sampling",
    "unknown --mode",
    "negative --cob-range",
    "missing -o",
    "missing --inputs file",
    "output directory missing",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_quiet(work: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """With -q: exit 2, one line on stderr, no traceback, nothing written."""
    args = _setup_bad(work, case)
    before = listing(work)
    rc, _, err = cli(capsys, *args, "-q")
    assert_one_line_error(rc, err)
    assert listing(work) == before, "a failed run must write nothing"


@pytest.mark.parametrize(
    "case",
    [c for c in BAD_CASES],
)
def test_bad_input_default(work: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """Without -q (what users run): still exactly one line on stderr."""
    args = _setup_bad(work, case)
    before = listing(work)
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err)
    assert listing(work) == before


def test_dynamic_dim_gets_a_size_that_runs(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """T is sized by the frontend's ladder (tests/test_dynamic.py has the rules)."""
    dynamic_model(work / "dyn.onnx")
    rc, _, err = cli(capsys, "dyn.onnx", "-o", "o.onnx", "--report", "r.json", "-q")
    assert rc == 0, err
    shapes = json.loads((work / "r.json").read_text())["input_shapes"]
    assert shapes["x"]["shape"] == [1, 32, 4] and shapes["x"]["axes"]["1"] == "ladder: 32"


def test_input_shape_makes_a_dynamic_model_work(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dynamic_model(work / "dyn.onnx")
    rc, _, err = cli(
        capsys, "dyn.onnx", "-o", "o.onnx", "--input-shape", "x=1,5,4", "--report", "r.json", "-q"
    )
    assert rc == 0, err
    r = json.loads((work / "r.json").read_text())
    assert r["free_cofactors"] == 6 and r["verification"]["passed"]
    feeds = {"x": rand([1, 9, 4], 3)}  # another T: the teleported model is still dynamic
    assert max_rel_err(onnx.load(work / "dyn.onnx"), onnx.load(work / "o.onnx"), feeds) <= 1e-5


def test_dynamic_batch_defaults_to_one(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proto = gemm_mlp([4, 6, 3])
    for vi in (proto.graph.input[0], proto.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(proto, work / "b.onnx")
    rc, _, err = cli(capsys, "b.onnx", "-o", "o.onnx", "-q")
    assert rc == 0, err
    feeds = {"x": rand([5, 4], 1)}
    assert max_rel_err(proto, onnx.load(work / "o.onnx"), feeds) <= 1e-5


# -- verification failure: exit 1 ------------------------------------------------------------
def test_verification_failure_writes_nothing(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Corrupt one weight matrix's scaling (×1.5 on top of τ): the check must catch it
    (exit 1), the report still says why, and no model (nor a temp file) is left behind."""
    real = graphteleport.algebra.scale
    done: list[bool] = []

    def corrupt(ab: Absorb, tau: np.ndarray) -> np.ndarray:
        s = real(ab, tau)
        if not done and s.ndim == 2:
            s = s * 1.5
            done.append(True)
        return s

    real_rows = graphteleport.algebra.RowScale.rows

    def corrupt_rows(self: graphteleport.algebra.RowScale, start: int, stop: int) -> np.ndarray:
        s = real_rows(self, start, stop)  # (a plain weight's S, formed a block of rows at a time)
        if not done and len(self.shape) == 2:
            s = s * 1.5
            done.append(True)
        return s

    real_rows_into = graphteleport.algebra.RowScale.rows_into

    def corrupt_rows_into(
        self: graphteleport.algebra.RowScale, start: int, stop: int, out: np.ndarray
    ) -> None:
        real_rows_into(self, start, stop, out)  # (the rewrite's float32/float64 path)
        if not done and len(self.shape) == 2:
            out *= 1.5
            done.append(True)

    monkeypatch.setattr(graphteleport.algebra, "scale", corrupt)
    monkeypatch.setattr(graphteleport.algebra.RowScale, "rows", corrupt_rows)
    monkeypatch.setattr(graphteleport.algebra.RowScale, "rows_into", corrupt_rows_into)
    before = listing(work)
    rc, _, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--report", "r.json", "-q")
    assert done, "the corruption was never applied"
    assert_one_line_error(rc, err, code=1)
    assert "verification failed" in err
    assert listing(work) == before | {"r.json"}
    v = json.loads((work / "r.json").read_text())["verification"]
    assert v["passed"] is False and v["max_rel_err"] > 1e-5


def test_tiny_tolerance_fails_honestly(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Continuous cofactors round at ~1e-7: with --rtol 1e-12 that is a failure (exit 1).
    (--rtol 0 is refused as a bad value, exit 2: --exact asks for bit-identical outputs.)"""
    before = listing(work)
    rc, _, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--rtol", "1e-12", "-q")
    assert_one_line_error(rc, err, code=1)
    assert listing(work) == before


# -- success ----------------------------------------------------------------------------------
def test_teleport_writes_a_verified_model_and_report(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--report", "r.json", "--seed", "3")
    assert rc == 0, err
    assert "Traceback" not in err
    assert listing(work) == {"m.onnx", "o.onnx", "r.json"}, "temp files left behind"
    r = json.loads((work / "r.json").read_text())
    for key in (
        "free_cofactors",
        "pinned",
        "verification",
        "initializers_changed",
        "initializers_total",
        "elements_changed",
        "elements_total",
        "seconds",
    ):
        assert key in r, key
    assert r["free_cofactors"] == 192
    assert all("reason" in p for p in r["pinned"])
    v = r["verification"]
    assert v["passed"] is True and 0 < v["max_rel_err"] <= 1e-5
    assert v["max_abs_err"] >= 0 and "rtol" in v["tolerance"]
    assert set(r["seconds"]) >= {"analyze", "rewrite", "verify", "total"}
    assert r["elements_changed"] >= 0.95 * r["elements_total"]
    assert r["initializers_changed"] <= r["initializers_total"]
    w0, w1 = weights(onnx.load(work / "m.onnx")), weights(onnx.load(work / "o.onnx"))
    changed = sum(int(np.count_nonzero(w1[k] != w)) for k, w in w0.items())
    assert changed == r["elements_changed"]
    assert max_rel_err(onnx.load(work / "m.onnx"), onnx.load(work / "o.onnx")) <= 1e-5
    assert "free cofactors: 192" in out


def test_output_overwrites_an_existing_target_atomically(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (work / "o.onnx").write_bytes(b"old")
    rc, _, err = cli(capsys, "m.onnx", "-o", "o.onnx", "-q")
    assert rc == 0, err
    assert listing(work) == {"m.onnx", "o.onnx"}
    onnx.checker.check_model(onnx.load(work / "o.onnx"))


def test_failed_run_keeps_an_existing_target(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (work / "o.onnx").write_bytes(b"old")
    rc, _, _ = cli(capsys, "m.onnx", "-o", "o.onnx", "--rtol", "1e-12", "-q")
    assert rc == 1
    assert (work / "o.onnx").read_bytes() == b"old"


def test_exact_flag_is_bit_exact(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--exact", "--report", "r.json", "-q")
    assert rc == 0, err
    v = json.loads((work / "r.json").read_text())["verification"]
    assert v["max_abs_err"] == 0 and v["max_rel_err"] == 0


def test_no_verify_still_writes(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--no-verify", "--report", "r.json", "-q")
    assert rc == 0, err
    assert json.loads((work / "r.json").read_text())["verification"] is None
    assert max_rel_err(onnx.load(work / "m.onnx"), onnx.load(work / "o.onnx")) <= 1e-5


def test_inputs_npz_are_used(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = rand([1, 784], 9)
    np.savez(work / "feeds.npz", input=x)
    args = ["m.onnx", "-o", "o.onnx", "--inputs", "feeds.npz", "--report", "r.json", "-q"]
    rc, _, err = cli(capsys, *args, "--draws", "0")  # the user's inputs alone
    assert rc == 0, err
    v = json.loads((work / "r.json").read_text())["verification"]
    assert v["inputs"] == 1
    expected = run_ort(onnx.load(work / "m.onnx"), {"input": x})[0]
    got = run_ort(onnx.load(work / "o.onnx"), {"input": x})[0]
    err_here = float(np.max(np.abs(expected - got)))
    assert v["max_abs_err"] == pytest.approx(err_here, rel=1e-6, abs=1e-12)
    rc, _, err = cli(capsys, *args)  # by default, the 8 random draws too
    assert rc == 0, err
    assert json.loads((work / "r.json").read_text())["verification"]["inputs"] == 9


@pytest.mark.parametrize(
    "flags",
    [
        ["--sampling", "inter_landscape", "--cob-range", "0.9"],
        ["--sampling", "negative"],
        ["--sampling", "positive"],
        ["--sampling", "centered", "--center", "2"],
    ],
)
def test_samplings_via_cli(
    work: Path, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    rc, _, err = cli(capsys, "m.onnx", "-o", "o.onnx", *flags, "--report", "r.json", "-q")
    assert rc == 0, err
    r = json.loads((work / "r.json").read_text())
    assert r["verification"]["passed"] and r["elements_changed"] >= 0.95 * r["elements_total"]


def test_seed_changes_the_output(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "m.onnx", "-o", "a.onnx", "--seed", "1", "-q")[0] == 0
    assert cli(capsys, "m.onnx", "-o", "b.onnx", "--seed", "1", "-q")[0] == 0
    assert cli(capsys, "m.onnx", "-o", "c.onnx", "--seed", "2", "-q")[0] == 0
    assert sha(work / "a.onnx") == sha(work / "b.onnx")
    assert sha(work / "a.onnx") != sha(work / "c.onnx")


# -- inspect ----------------------------------------------------------------------------------
def test_inspect_prints_free_cofactors_and_pins(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx.save(gemm_mlp([4, 6, 5, 3], ["Relu", "Sigmoid"]), work / "s.onnx")
    before = listing(work)
    rc, out, err = cli(capsys, "inspect", "s.onnx", "--report", "r.json")
    assert rc == 0, err
    assert "free cofactors: 6" in out
    assert re.search(r"^\s+5\s+Sigmoid is not equivariant \(use --mode insert\)", out, re.M)
    assert re.search(r"^\s+3\s+graph output", out, re.M)
    assert listing(work) == before | {"r.json"}
    r = json.loads((work / "r.json").read_text())
    assert r["free_cofactors"] == 6
    assert {p["reason"]: p["cofactors"] for p in r["pinned"]}[
        "Sigmoid is not equivariant (use --mode insert)"
    ] == 5


def test_inspect_bad_input(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "t.onnx").write_text("not a model")
    rc, _, err = cli(capsys, "inspect", "t.onnx")
    assert_one_line_error(rc, err)


# -- entry points -----------------------------------------------------------------------------
def test_python_m_help() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "graphteleport", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "usage: graphteleport" in p.stdout and "--cob-range" in p.stdout


def test_python_m_bad_input_exit_code(tmp_path: Path) -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphteleport",
            str(tmp_path / "no.onnx"),
            "-o",
            str(tmp_path / "o.onnx"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert_one_line_error(p.returncode, p.stderr)


def readme_command() -> list[str]:
    """The README's main command: the ``graphteleport`` call after ``pip install . &&``."""
    text = (REPO_ROOT / "README.md").read_text()
    m = re.search(r"pip install \. && (graphteleport [^\n]+)", text)
    assert m, "README has no 'pip install . && graphteleport ...' command"
    return shlex.split(m.group(1))


def test_readme_main_command_works(tmp_path: Path, fixtures_dir: Path) -> None:
    """Run the README's command (console script) from a directory laid out like the repo."""
    args = readme_command()
    model = args[1]
    target = tmp_path / model
    target.parent.mkdir(parents=True)
    shutil.copy(REPO_ROOT / model, target)
    exe = shutil.which("graphteleport", path=str(Path(sys.executable).parent))
    assert exe, "the graphteleport console script is not installed"
    p = subprocess.run([exe, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "verification: passed" in p.stdout
    out = tmp_path / args[args.index("-o") + 1]
    assert max_rel_err(onnx.load(target), onnx.load(out)) <= 1e-5
    assert fixtures_dir.exists()


def test_closed_stdout_is_not_an_internal_error(tmp_path: Path) -> None:
    """`graphteleport ... | head` closes the pipe early: the work is done, exit 0, no noise."""
    out = tmp_path / "o.onnx"
    cmd = [sys.executable, "-m", "graphteleport", str(REPO_ROOT / "models/onnx/mlp_small.onnx")]
    proc = subprocess.Popen(
        [*cmd, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert err == "" and out.exists()

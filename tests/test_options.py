"""One options object, checked once; typed reports with one JSON form (issue 13).

* :class:`CofactorOptions` refuses each bad value with the line the CLI prints for it;
* it is checked when made and never again: the pass, the pipeline and the draws take a
  prebuilt object as it is, and keyword arguments build the same object;
* :meth:`TeleportReport.to_json` / :meth:`InspectReport.to_json` are exactly what
  ``--report`` writes, with the documented keys in their order.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest

from graphteleport import options as options_mod
from graphteleport.cli import main
from graphteleport.errors import InputError
from graphteleport.io import load_model
from graphteleport.options import CofactorOptions
from graphteleport.passes.teleport import TeleportPass
from graphteleport.pipeline import TeleportOptions, inspect_file, teleport_file
from graphteleport.reports import report_json

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "onnx"

#: A bad value as CLI flags and as the options' fields.
BAD: dict[str, tuple[list[str], dict[str, Any]]] = {
    "mode": (["--mode", "sideways"], {"mode": "sideways"}),
    "sampling": (["--sampling", "sideways"], {"sampling": "sideways"}),
    "cob_range nan": (["--cob-range=nan"], {"cob_range": float("nan")}),
    "cob_range -1": (["--cob-range=-1"], {"cob_range": -1.0}),
    "cob_range too wide": (["--cob-range=1e308"], {"cob_range": 1e308}),
    "center inf": (["--center=inf"], {"center": float("inf")}),
    "centered, too wide": (
        ["--sampling=centered", "--center=1e308", "--cob-range=1e308"],
        {"sampling": "centered", "center": 1e308, "cob_range": 1e308},
    ),
    "positive r=0": (
        ["--sampling=positive", "--cob-range=0"],
        {"sampling": "positive", "cob_range": 0.0},
    ),
    "centered at 0": (
        ["--sampling=centered", "--center=0", "--cob-range=0"],
        {"sampling": "centered", "center": 0.0, "cob_range": 0.0},
    ),
    "seed -1": (["--seed=-1"], {"seed": -1}),
}
#: argparse refuses these itself (choices): the object's line is the pipeline's.
ARGPARSE = {"mode", "sampling"}


def refusal(**fields: Any) -> str:
    with pytest.raises(InputError) as info:
        CofactorOptions(**fields)
    return str(info.value)


@pytest.mark.parametrize("case", sorted(set(BAD) - ARGPARSE))
def test_the_object_refuses_with_the_cli_line(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI's exit-2 line for a bad flag is the object's message, word for word, and
    comes before any file is read (the model does not exist)."""
    flags, fields = BAD[case]
    monkeypatch.chdir(tmp_path)
    assert main(["missing.onnx", "-o", "o.onnx", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"graphteleport: error: {refusal(**fields)}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_surface_refuses_the_same(case: str) -> None:
    """The pass and the pipeline's options build the object: the same one line."""
    fields = BAD[case][1]
    line = refusal(**fields)
    assert "\n" not in line
    for make in (lambda: TeleportPass(**fields), lambda: TeleportOptions(**fields)):
        with pytest.raises(InputError) as info:
            make()
        assert str(info.value) == line


def test_options_are_frozen_and_build_replaces() -> None:
    opts = CofactorOptions(mode="insert", seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 4  # type: ignore[misc]
    assert CofactorOptions.build(opts) is opts
    assert CofactorOptions.build(opts, seed=5) == CofactorOptions(mode="insert", seed=5)
    assert CofactorOptions.build(seed=5) == CofactorOptions(seed=5)
    with pytest.raises(InputError, match="--seed"):
        CofactorOptions.build(opts, seed=-1)


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every call of the option checks, recorded (sampling, seed)."""
    calls: list[str] = []
    sampling, seed = options_mod._check_sampling, options_mod._check_seed

    def count_sampling(*args: Any) -> None:
        calls.append("sampling")
        sampling(*args)

    def count_seed(value: object) -> None:
        calls.append("seed")
        seed(value)

    monkeypatch.setattr(options_mod, "_check_sampling", count_sampling)
    monkeypatch.setattr(options_mod, "_check_seed", count_seed)
    yield calls


def test_a_prebuilt_object_is_checked_once(checks: list[str], tmp_path: Path) -> None:
    """Made once, checked once: the pass and the whole pipeline take it as it is."""
    opts = TeleportOptions(mode="insert", sampling="inter_landscape", cob_range=0.9, seed=1)
    assert checks == ["sampling", "seed"]
    result = TeleportPass(options=opts)(load_model(FIXTURES / "mlp_small.onnx"))
    assert result.options is opts
    report = teleport_file(FIXTURES / "mlp_small.onnx", tmp_path / "o.onnx", opts)
    assert report.options is opts and report.verification is not None
    assert report.verification.passed
    assert checks == ["sampling", "seed"]


def test_keywords_and_the_object_teleport_alike() -> None:
    """``TeleportPass(**fields)`` is ``TeleportPass(options=CofactorOptions(**fields))``."""
    fields: dict[str, Any] = {"mode": "insert", "sampling": "inter_landscape", "seed": 2}
    a = TeleportPass(**fields)(load_model(FIXTURES / "resnet_tiny.onnx"))
    b = TeleportPass(options=CofactorOptions(**fields))(load_model(FIXTURES / "resnet_tiny.onnx"))
    assert a.options == b.options
    np.testing.assert_array_equal(a.tau, b.tau)
    assert a.inserted.nodes_added == b.inserted.nodes_added > 0
    c = TeleportPass(options=CofactorOptions(**fields), seed=7)(
        load_model(FIXTURES / "resnet_tiny.onnx")
    )
    assert c.options == CofactorOptions(**{**fields, "seed": 7})
    assert not np.array_equal(a.tau, c.tau)


def test_the_result_is_typed() -> None:
    """Required fields, no Optional: a caller reads them without casts or asserts."""
    result = TeleportPass(seed=0)(ir.load(FIXTURES / "mlp_small.onnx"))
    assert result.free_cofactors == int(result.analysis.solution.free.sum()) > 0
    fields = {f.name: f for f in dataclasses.fields(result)}
    assert all(f.default is dataclasses.MISSING for f in fields.values())
    assert set(result.seconds) == {"analyze", "rewrite"}


# -- reports ------------------------------------------------------------------------------------
TELEPORT_KEYS = [
    "free_cofactors", "neurons", "cofactor_pairs", "groups", "pinned", "neuron_groups",
    "weights_in_quiver", "model", "output", "mode", "sampling", "cob_range", "seed", "exact",
    "initializers_changed", "initializers_total", "elements_changed", "elements_total",
    "private_copies", "nodes_added", "inserted", "verification", "seconds", "cofactor_range",
    "range_fixes", "input_shapes", "written",
]  # fmt: skip
INSPECT_KEYS = [
    "free_cofactors", "neurons", "cofactor_pairs", "groups", "pinned", "neuron_groups",
    "weights_in_quiver", "model", "mode", "modes", "seconds", "input_shapes",
]  # fmt: skip
PHASES = ["load", "inputs", "analyze", "rewrite", "report", "save", "verify", "total"]


@pytest.mark.parametrize("verify", [True, False])
def test_teleport_report_to_json_is_what_the_report_file_holds(
    tmp_path: Path, verify: bool
) -> None:
    opts = TeleportOptions(mode="insert", sampling="inter_landscape", seed=0, verify=verify)
    src, rep = FIXTURES / "resnet_tiny.onnx", tmp_path / "r.json"
    report = teleport_file(src, tmp_path / "o.onnx", opts, report_path=rep)
    written = json.loads(rep.read_text())
    assert written == json.loads(report_json(report)) == json.loads(json.dumps(report.to_json()))
    assert list(written) == TELEPORT_KEYS
    assert list(report.seconds) == [p for p in PHASES if verify or p != "verify"]
    assert written["seconds"]["total"] >= sum(
        v for k, v in written["seconds"].items() if k != "total"
    )
    assert written["nodes_added"] == report.inserted.nodes_added > 0
    assert written["free_cofactors"] == report.analysis.free_cofactors > 0
    assert (written["verification"] is None) is (not verify)
    if verify:
        assert report.verification is not None
        assert written["verification"]["max_rel_err"] == report.verification.max_rel_err


def test_the_cli_writes_the_same_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI and ``teleport_file`` with the same options write the same report (but
    for paths and times)."""
    monkeypatch.chdir(tmp_path)
    src = str(FIXTURES / "mlp_small.onnx")
    assert main([src, "-o", "a.onnx", "--report", "a.json", "--seed", "4", "-q"]) == 0
    report = teleport_file(src, "b.onnx", TeleportOptions(seed=4)).to_json()
    cli = json.loads(Path("a.json").read_text())
    for r in (cli, report):
        del r["output"], r["written"], r["seconds"], r["verification"]["seconds"]
    assert cli == report


def test_inspect_report_to_json_is_what_the_report_file_holds(tmp_path: Path) -> None:
    rep = tmp_path / "r.json"
    report = inspect_file(FIXTURES / "resnet_tiny.onnx", mode="insert", report_path=rep)
    written = json.loads(rep.read_text())
    assert written == json.loads(report_json(report))
    assert list(written) == INSPECT_KEYS
    assert written["mode"] == report.mode == "insert"
    assert written["modes"]["insert"]["wrap_nodes"] == report.modes["insert"].wrap_nodes

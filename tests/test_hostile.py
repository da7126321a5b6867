"""A generated hostile-input suite for the ``graphteleport`` command (issue 12, "Trust").

Every case builds its files in a fresh working directory, runs the CLI in-process
(``graphteleport.cli.main``; subprocesses only to send signals) and asserts:

* the exit code (0 done, 1 verification failed, 2 bad input, 130/143 interrupted);
* for an error, exactly one line on stderr — file descriptor 2, so onnxruntime's C++
  logging counts too — starting ``graphteleport:``, no traceback, no warning logged
  (in a real run warnings reach stderr as extra lines), and the reason named;
* that nothing in the working directory was created, changed or removed (names and
  SHA-256 of every entry, temporaries included) except the outputs a success (or a
  failed verification's report) is expected to write — so the input bytes are
  unchanged too;
* for a success, an independent check: the input and the output run in onnxruntime
  (graph optimisations off) on fresh random inputs drawn with a seed the CLI never
  uses agree to a relative error of 1e-4, and the output's weights did move.

The classes: outputs aliasing inputs or each other (``..``, symbolic and hard links,
external data, ``--inputs``), reports that cannot be written, non-regular files,
bad option values, malformed models — and the existing protections.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import REPO_ROOT, const_node, gemm_mlp, make_model, rand, signalled_child, weights
from onnx import external_data_helper, helper, numpy_helper
from test_cli import dynamic_model

from graphteleport.cli import main
from graphteleport.errors import InputError
from graphteleport.options import CofactorOptions
from graphteleport.passes.teleport import TeleportPass
from graphteleport.pipeline import TeleportOptions

FIXTURES = REPO_ROOT / "models" / "onnx"
FRESH_SEED = 20261203  # the CLI draws its inputs with seed 0 (or --seed): never this one
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
Setup = Callable[[Path], list[str]]


@dataclass(frozen=True)
class Case:
    """One hostile command line: ``setup(workdir)`` makes its files and returns the args."""

    setup: Setup
    code: int
    expect: str = ""  # a substring of the one stderr line (errors)
    outputs: tuple[str, ...] = ()  # paths the run may create or change (exit 0 / 1)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # for the equality check
    skip: str = ""


CASES: dict[str, Case] = {}


def case(name: str, code: int, expect: str = "", **kw: object) -> Callable[[Setup], Setup]:
    """Register ``setup`` as the hostile case ``name``."""

    def register(setup: Setup) -> Setup:
        CASES[name] = Case(setup, code, expect, **kw)  # type: ignore[arg-type]
        return setup

    return register


# -- building inputs ------------------------------------------------------------------------------
def fixture(d: Path, name: str = "mlp_small", as_: str = "m.onnx") -> str:
    shutil.copy(FIXTURES / f"{name}.onnx", d / as_)
    return as_


def tiny(d: Path, name: str = "t.onnx") -> str:
    """x[2,4] -> Gemm -> Relu -> Gemm -> y[2,3], weights inline."""
    onnx.save(gemm_mlp([4, 6, 3]), d / name)
    return name


def external(d: Path, name: str, location: str, hidden: int = 6) -> str:
    """The tiny MLP with every initializer in the external file ``location``."""
    onnx.save_model(
        gemm_mlp([4, hidden, 3]),
        d / name,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return name


def constants_external(d: Path, name: str, location: str) -> str:
    """MatMul weights as ``Constant`` nodes whose values live in ``location``, and a
    ``Constant`` added to the output, which stays as it is (the output is pinned)."""
    n = helper.make_node
    nodes = [
        const_node("W0", rand([4, 6])),
        n("MatMul", ["x", "W0"], ["h"]),
        n("Relu", ["h"], ["a"]),
        const_node("W1", rand([6, 3], 1)),
        n("MatMul", ["a", "W1"], ["y0"]),
        const_node("C", rand([2, 3], 2)),
        n("Add", ["y0", "C"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]})
    external_data_helper.convert_model_to_external_data(
        proto,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
        convert_attribute=True,
    )
    onnx.save_model(proto, d / name)
    return name


def broken(d: Path, mutate: Callable[[onnx.ModelProto], None]) -> str:
    """The tiny MLP after ``mutate`` (no checker), saved as b.onnx."""
    proto = gemm_mlp([4, 6, 3])
    mutate(proto)
    onnx.save(proto, d / "b.onnx")
    return "b.onnx"


def relocated(d: Path, location: str, model: str = "e2.onnx") -> str:
    """The external-data MLP with every tensor's location rewritten to ``location``."""
    external(d, "e.onnx", "w.bin")
    proto = onnx.load(d / "e.onnx", load_external_data=False)
    for t in proto.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = location
    (d / model).parent.mkdir(exist_ok=True)
    onnx.save(proto, d / model)
    return model


def feeds_npz(d: Path, name: str = "f.npz") -> str:
    np.savez(d / name, input=rand([1, 784], 9))
    return name


def mkdir(d: Path, rel: str) -> str:
    (d / rel).mkdir()
    return rel


def symlink(d: Path, rel: str, target: str) -> str:
    (d / rel).symlink_to(target)
    return rel


def hardlink(d: Path, rel: str, target: str) -> str:
    os.link(d / target, d / rel)
    return rel


def write(d: Path, rel: str, data: bytes) -> str:
    (d / rel).write_bytes(data)
    return rel


# -- 1. outputs never alias inputs or each other --------------------------------------------------
ALIASES: dict[str, Setup] = {
    "-o is the input": lambda d: [fixture(d), "-o", "m.onnx"],
    "-o is the input via ..": lambda d: [fixture(d), "-o", mkdir(d, "s") + "/../m.onnx"],
    "-o is the input, absolute": lambda d: [fixture(d), "-o", str(d / "m.onnx")],
    "-o is a symlink to the input": lambda d: [fixture(d), "-o", symlink(d, "l.onnx", "m.onnx")],
    "-o is a hard link to the input": lambda d: [fixture(d), "-o", hardlink(d, "h.onnx", "m.onnx")],
    "the input is a symlink to -o": lambda d: [symlink(d, "l.onnx", fixture(d)), "-o", "m.onnx"],
    "-o is the input's external data": lambda d: [external(d, "e.onnx", "w.bin"), "-o", "w.bin"],
    "-o is the input's e.onnx.data": lambda d: [
        external(d, "e.onnx", "e.onnx.data"),
        "-o",
        "e.onnx.data",
    ],
    "the input's weights are in OUT.onnx.data": lambda d: [
        external(d, "e.onnx", "o.onnx.data"),
        "-o",
        "o.onnx",
    ],
    "the input's weights are in OUT.onnx.data, --no-verify": lambda d: [
        external(d, "e.onnx", "o.onnx.data"),
        "-o",
        "o.onnx",
        "--no-verify",
    ],
    "the input's Constant values are in OUT.onnx.data": lambda d: [
        _constants_and_initializers_external(d),
        "-o",
        "o.onnx",
    ],
    "--report is the input": lambda d: [fixture(d), "-o", "o.onnx", "--report", "m.onnx"],
    "--report is the input via ..": lambda d: [
        fixture(d),
        "-o",
        "o.onnx",
        "--report",
        mkdir(d, "s") + "/../m.onnx",
    ],
    "--report is a symlink to the input": lambda d: [
        fixture(d),
        "-o",
        "o.onnx",
        "--report",
        symlink(d, "r.json", "m.onnx"),
    ],
    "--report is a hard link to the input": lambda d: [
        fixture(d),
        "-o",
        "o.onnx",
        "--report",
        hardlink(d, "r.json", "m.onnx"),
    ],
    "--report is -o": lambda d: [fixture(d), "-o", "o.onnx", "--report", "o.onnx"],
    "--report is -o via ..": lambda d: [
        fixture(d),
        "-o",
        "o.onnx",
        "--report",
        mkdir(d, "s") + "/../o.onnx",
    ],
    "--report is a symlink to the input's external data": lambda d: [
        external(d, "e.onnx", "w.bin"),
        "-o",
        "o.onnx",
        "--report",
        symlink(d, "r", "w.bin"),
    ],
    "--report is -o's data file": lambda d: [
        external(d, "e.onnx", "w.bin"),
        "-o",
        "o.onnx",
        "--report",
        "o.onnx.data",
    ],
    "--report is the input's external data": lambda d: [
        external(d, "e.onnx", "w.bin"),
        "-o",
        "o.onnx",
        "--report",
        "w.bin",
    ],
    "--report is --inputs": lambda d: [
        fixture(d),
        "-o",
        "o.onnx",
        "--inputs",
        feeds_npz(d),
        "--report",
        "f.npz",
    ],
    "-o is --inputs": lambda d: [fixture(d), "-o", feeds_npz(d), "--inputs", "f.npz"],
    "inspect --report is the input": lambda d: ["inspect", fixture(d), "--report", "m.onnx"],
    "inspect --report is the input's external data": lambda d: [
        "inspect",
        external(d, "e.onnx", "w.bin"),
        "--report",
        "w.bin",
    ],
}


def _constants_and_initializers_external(d: Path) -> str:
    """Initializers in w.bin (so -o o.onnx gets o.onnx.data), the ``Constant``'s value in
    o.onnx.data: only a search of node attributes finds that the input reads it."""
    n = helper.make_node
    nodes = [
        const_node("W0", rand([4, 6])),
        n("MatMul", ["x", "W0"], ["h"]),
        n("Add", ["h", "b"], ["hb"]),
        n("Relu", ["hb"], ["a"]),
        n("MatMul", ["a", "W1"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, {"b": rand([6], 2), "W1": rand([6, 3])})
    external_data_helper.convert_model_to_external_data(
        proto, all_tensors_to_one_file=True, location="w.bin", size_threshold=0
    )
    external_data_helper.set_external_data(proto.graph.node[0].attribute[0].t, "o.onnx.data")
    proto.graph.node[0].attribute[0].t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(proto, d / "e.onnx")  # writes each tensor's bytes to its own file
    assert (d / "o.onnx.data").stat().st_size == 4 * 6 * 4
    return "e.onnx"


for _name, _setup in ALIASES.items():
    _expect = "same file" if _name in ("--report is -o", "--report is -o via ..") else ""
    _expect = _expect or ("same file" if "-o's data" in _name else "refusing to overwrite")
    case(f"alias: {_name}", 2, _expect)(_setup)


# -- 2. a report that cannot be written: refused before anything is written -----------------------
@case("report: missing directory", 2, "output directory does not exist")
def _(d: Path) -> list[str]:
    return [fixture(d), "-o", "o.onnx", "--report", "no/r.json"]


@case("report: a directory", 2, "names a directory")
def _(d: Path) -> list[str]:
    (d / "rd").mkdir()
    return [fixture(d), "-o", "o.onnx", "--report", "rd"]


@case("report: under a file", 2, "output directory does not exist")
def _(d: Path) -> list[str]:
    return [fixture(d), "-o", "o.onnx", "--report", "m.onnx/r.json"]


@case("report: unwritable directory", 2, "permission denied", skip="root writes anywhere" * IS_ROOT)
def _(d: Path) -> list[str]:
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)
    return [fixture(d), "-o", "o.onnx", "--report", "ro/r.json"]


@case("report: inspect, missing directory", 2, "output directory does not exist")
def _(d: Path) -> list[str]:
    return ["inspect", fixture(d), "--report", "no/r.json"]


# -- 3. non-regular files -------------------------------------------------------------------------
def _fifo(d: Path, name: str) -> str:
    os.mkfifo(d / name)
    return name


def _socket(d: Path, name: str) -> str:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / name))
    s.close()  # the socket file stays
    return name


def _null_device(d: Path, name: str) -> str:
    """A private character device (like /dev/null) in the working directory: a regression
    that replaced it would replace this node, never the system's /dev/null."""
    os.mknod(d / name, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return name


NON_REGULAR: dict[str, tuple[Setup, str]] = {
    "a FIFO as the model": (lambda d: [_fifo(d, "f.onnx"), "-o", "o.onnx"], "FIFO"),
    "a FIFO as --inputs": (
        lambda d: [fixture(d), "-o", "o.onnx", "--inputs", _fifo(d, "f.npz")],
        "FIFO",
    ),
    "a FIFO as -o": (lambda d: [fixture(d), "-o", _fifo(d, "o.onnx")], "FIFO"),
    "a FIFO as --report": (
        lambda d: [fixture(d), "-o", "o.onnx", "--report", _fifo(d, "r.json")],
        "FIFO",
    ),
    "a FIFO as inspect's model": (lambda d: ["inspect", _fifo(d, "f.onnx")], "FIFO"),
    "a socket as the model": (lambda d: [_socket(d, "s.onnx"), "-o", "o.onnx"], "socket"),
    "a device as the model": (lambda d: ["/dev/null", "-o", "o.onnx"], "character device"),
    "a device as --inputs": (
        lambda d: [fixture(d), "-o", "o.onnx", "--inputs", "/dev/zero"],
        "character device",
    ),
}
for _name, (_setup, _expect) in NON_REGULAR.items():
    case(f"non-regular: {_name}", 2, _expect)(_setup)
case(
    "non-regular: a device as -o",
    2,
    "character device",
    skip="" if IS_ROOT else "mknod needs root",
)(lambda d: [fixture(d), "-o", _null_device(d, "null")])


# -- 4. signals are at the end; 5. bad option values ----------------------------------------------
def _opts(*flags: str) -> Setup:
    return lambda d: [fixture(d), "-o", "o.onnx", *flags]


BAD_OPTIONS: dict[str, tuple[list[str], str]] = {
    "--cob-range nan": (["--cob-range=nan"], "--cob-range must be a finite number"),
    "--cob-range inf": (["--cob-range=inf"], "--cob-range must be a finite number"),
    "--cob-range -1": (["--cob-range=-1"], "--cob-range must be >= 0"),
    "--cob-range 1e308": (["--cob-range=1e308"], "too wide"),
    "--cob-range x": (["--cob-range=x"], "invalid float value"),
    "--center nan": (["--sampling=centered", "--center=nan"], "--center must be a finite"),
    "--center inf": (["--sampling=centered", "--center=inf"], "--center must be a finite"),
    "--center -inf, default sampling": (["--center=-inf"], "--center must be a finite"),
    "--center 1e308 --cob-range 1e308": (
        ["--sampling=centered", "--center=1e308", "--cob-range=1e308"],
        "too wide",
    ),
    "--seed -1": (["--seed=-1"], "--seed must be a non-negative integer"),
    "--seed 1.5": (["--seed=1.5"], "invalid int value"),
    "--rtol nan": (["--rtol=nan"], "--rtol must be a number between 0 and 1"),
    "--rtol -1": (["--rtol=-1"], "--rtol must be a number between 0 and 1"),
    "--rtol 0": (["--rtol=0"], "--exact"),
    "--rtol inf": (["--rtol=inf"], "--rtol must be a number between 0 and 1"),
    "--rtol 1": (["--rtol=1"], "--rtol must be a number between 0 and 1"),
    "huge --input-shape": (["--input-shape", "input=1,100000000000"], "over the limit of 2**31"),
    "--input-shape 1,x": (["--input-shape", "input=1,x"], "--input-shape expects"),
    "--input-shape without =": (["--input-shape", "input"], "--input-shape expects"),
    "--input-shape without a name": (["--input-shape", "=1,784"], "--input-shape expects"),
    "--input-shape with an empty size": (["--input-shape", "input=1,,784"], "--input-shape"),
    "--input-shape with a zero": (["--input-shape", "input=0,784"], "positive sizes"),
    "--input-shape with a negative size": (["--input-shape", "input=-1,784"], "positive sizes"),
    "--input-shape of an unknown input": (["--input-shape", "nope=1,784"], "nope"),
    "--input-shape of the wrong rank": (["--input-shape", "input=1,784,1"], "input"),
    "--report ''": (["--report", ""], "the --report path is empty"),
    "positive --cob-range 0": (["--sampling=positive", "--cob-range=0"], "every cofactor as 0"),
    "negative --cob-range 0": (["--sampling=negative", "--cob-range=0"], "every cofactor as 0"),
    "centered at 0, --cob-range 0": (
        ["--sampling=centered", "--center=0", "--cob-range=0"],
        "every cofactor as 0",
    ),
    "--draws -1": (["--draws=-1"], "--draws must be between 1 and"),
    "--draws 0 without --inputs": (["--draws=0"], "--draws must be between 1 and"),
    "--draws 10**6": (["--draws=1000000"], "--draws must be between 1 and"),
    "unknown --mode": (["--mode=teleport-harder"], "invalid choice"),
    "unknown --sampling": (["--sampling=sideways"], "invalid choice"),
    "--inputs ''": (["--inputs", ""], "inputs file path is empty"),
    "--inputs missing": (["--inputs", "nope.npz"], "inputs file not found"),
}
for _name, (_flags, _expect) in BAD_OPTIONS.items():
    case(f"option: {_name}", 2, _expect)(_opts(*_flags))
case("option: -o ''", 2, "the -o path is empty")(lambda d: [fixture(d), "-o", ""])
case("option: missing -o", 2, "required")(lambda d: [fixture(d)])
case("option: -o in a missing directory", 2, "output directory does not exist")(
    lambda d: [fixture(d), "-o", "no/o.onnx"]
)
case("option: -o is a directory", 2, "names a directory")(
    lambda d: [fixture(d), "-o", mkdir(d, "od")]
)
case("option: inspect huge --input-shape", 2, "over the limit")(
    lambda d: ["inspect", fixture(d), "--input-shape", "input=100000,100000"]
)
case("option: inspect --report ''", 2, "path is empty")(
    lambda d: ["inspect", fixture(d), "--report", ""]
)


# -- 6. malformed models --------------------------------------------------------------------------
def _set(path: str, value: object) -> Callable[[onnx.ModelProto], None]:
    """A mutation setting the attribute at the dotted ``path`` (indices allowed)."""

    def mutate(proto: onnx.ModelProto) -> None:
        *parents, last = path.split(".")
        obj: object = proto
        for part in parents:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)  # type: ignore[index]
        if last.isdigit():
            obj[int(last)] = value  # type: ignore[index]
        else:
            setattr(obj, last, value)

    return mutate


def _reverse_nodes(proto: onnx.ModelProto) -> None:
    nodes = list(proto.graph.node)[::-1]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _sparse(proto: onnx.ModelProto) -> None:
    w = proto.graph.initializer[0]
    array = numpy_helper.to_array(w)
    idx = np.flatnonzero(array).astype(np.int64)
    values = numpy_helper.from_array(array.ravel()[idx], w.name)
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(idx), list(array.shape))
    del proto.graph.initializer[0]
    proto.graph.sparse_initializer.append(sparse)


def _duplicate_initializer(proto: onnx.ModelProto) -> None:
    proto.graph.initializer.append(proto.graph.initializer[0])


def _string_alpha(proto: onnx.ModelProto) -> None:
    proto.graph.node[0].attribute.append(helper.make_attribute("alpha", "str"))


def _short_raw_data(proto: onnx.ModelProto) -> None:
    w = proto.graph.initializer[0]
    w.raw_data = numpy_helper.to_array(w).tobytes()[:-4]


MUTATIONS: dict[str, tuple[Callable[[onnx.ModelProto], None], str]] = {
    "sparse initializer": (_sparse, "sparse initializer"),
    "dangling node input": (_set("graph.node.1.input.0", "nowhere"), "'nowhere'"),
    "duplicate value names": (_set("graph.node.1.output.0", "h0"), "redeclared"),
    "unknown opset version": (_set("opset_import.0.version", 999), "opset 999"),
    "opset version 0": (_set("opset_import.0.version", 0), "opset 0"),
    "unknown op": (_set("graph.node.1.op_type", "Frobnicate"), "Frobnicate"),
    "unimported domain": (_set("graph.node.1.domain", "com.example"), "com.example"),
    "graph output never produced": (_set("graph.output.0.name", "ghost"), "'ghost'"),
    "cycle": (_set("graph.node.0.input.0", "a0"), "before it is produced"),
    "unsorted nodes": (_reverse_nodes, "not topologically sorted"),
    "ir_version 99": (_set("ir_version", 99), "ir_version 99"),
    "duplicate initializer names": (_duplicate_initializer, "not unique"),
    "attribute of the wrong type": (_string_alpha, "alpha"),
    "initializer bytes short": (_short_raw_data, "holds"),
}
for _name, (_mutate, _expect) in MUTATIONS.items():
    for _extra in ([], ["--no-verify"]):
        _label = f"malformed: {_name}" + (" (--no-verify)" if _extra else "")
        case(_label, 2, _expect)(
            lambda d, m=_mutate, e=_extra: [broken(d, m), "-o", "o.onnx", *e]  # type: ignore[misc]
        )
    case(f"malformed: {_name} (inspect)", 2, _expect)(
        lambda d, m=_mutate: ["inspect", broken(d, m)]  # type: ignore[misc]
    )


def _hardlinked_data(d: Path) -> list[str]:
    model = external(d, "e.onnx", "w.bin")
    hardlink(d, "w2.bin", "w.bin")
    return [model, "-o", "o.onnx", "--no-verify"]


def _truncated_data(d: Path) -> list[str]:
    model = external(d, "e.onnx", "w.bin")
    os.truncate(d / "w.bin", 8)
    return [model, "-o", "o.onnx"]


def _symlinked_out(d: Path) -> str:
    (d / "elsewhere").mkdir()
    external(d / "elsewhere", "e.onnx", "w.bin")
    (d / "sub").mkdir()
    shutil.move(d / "elsewhere" / "e.onnx", d / "sub" / "e.onnx")
    (d / "sub" / "w.bin").symlink_to(d / "elsewhere" / "w.bin")
    return "sub/e.onnx"


FILES: dict[str, tuple[Setup, str]] = {
    "not ONNX": (lambda d: [write(d, "t.onnx", b"hello\n"), "-o", "o.onnx"], "not an ONNX model"),
    "truncated": (
        lambda d: [
            write(d, "c.onnx", (FIXTURES / "mlp_small.onnx").read_bytes()[:5000]),
            "-o",
            "o.onnx",
        ],
        "truncated",
    ),
    "empty": (lambda d: [write(d, "e.onnx", b""), "-o", "o.onnx"], "empty"),
    "missing": (lambda d: ["nope.onnx", "-o", "o.onnx"], "not found"),
    "a directory": (lambda d: [mkdir(d, "md"), "-o", "o.onnx"], "directory"),
    "external data at an absolute path": (
        lambda d: [relocated(d, str(d / "w.bin")), "-o", "o.onnx"],
        "absolute location",
    ),
    "external data in ..": (
        lambda d: [relocated(d, "../w.bin", "sub/e2.onnx"), "-o", "o.onnx"],
        "outside the model's folder",
    ),
    "external data through a symlink out": (
        lambda d: [_symlinked_out(d), "-o", "o.onnx"],
        "symbolic link",
    ),
    "external data hard-linked": (_hardlinked_data, "hard links"),
    "external data file missing": (
        lambda d: [relocated(d, "gone.bin"), "-o", "o.onnx"],
        "external data file not found",
    ),
    "external data file truncated": (_truncated_data, "truncated"),
    "external data file is a FIFO": (
        lambda d: [relocated(d, _fifo(d, "p.bin")), "-o", "o.onnx"],
        "p.bin is a FIFO",
    ),
    "inspect: external data in ..": (
        lambda d: ["inspect", relocated(d, "../w.bin", "sub/e2.onnx")],
        "outside",
    ),
}
for _name, (_setup, _expect) in FILES.items():
    case(f"malformed: {_name}", 2, _expect)(_setup)


# -- exit 1: a failed verification writes its report and no model ---------------------------------
@case("verification fails: the report alone", 1, "verification failed", outputs=("r.json",))
def _(d: Path) -> list[str]:
    return [fixture(d), "-o", "o.onnx", "--rtol", "1e-12", "--report", "r.json"]


@case("verification fails: an existing -o is kept", 1, "verification failed")
def _(d: Path) -> list[str]:
    (d / "o.onnx").write_bytes(b"old")
    return [fixture(d), "-o", "o.onnx", "--rtol", "1e-12"]


# -- exit 0: what must keep working, checked independently ----------------------------------------
@case("ok: mlp_small with a report", 0, outputs=("o.onnx", "r.json"))
def _(d: Path) -> list[str]:
    return [fixture(d), "-o", "o.onnx", "--report", "r.json"]


@case("ok: resnet_tiny, insert, inter_landscape", 0, outputs=("o.onnx",))
def _(d: Path) -> list[str]:
    return [
        fixture(d, "resnet_tiny"),
        "-o",
        "o.onnx",
        "--mode",
        "insert",
        "--sampling",
        "inter_landscape",
        "--cob-range",
        "0.9",
    ]


@case("ok: cnn_tiny_keepbn, exact", 0, outputs=("o.onnx",))
def _(d: Path) -> list[str]:
    return [fixture(d, "cnn_tiny_keepbn"), "-o", "o.onnx", "--exact"]


@case("ok: -o replaces an existing file", 0, outputs=("o.onnx",))
def _(d: Path) -> list[str]:
    (d / "o.onnx").write_bytes(b"old")
    return [fixture(d), "-o", "o.onnx"]


@case("ok: -o and --report through .. and another folder", 0, outputs=("o.onnx", "s/r.json"))
def _(d: Path) -> list[str]:
    (d / "s").mkdir()
    return [fixture(d), "-o", "s/../o.onnx", "--report", "s/r.json"]


@case("ok: a seed beyond 64 bits", 0, outputs=("o.onnx",))
def _(d: Path) -> list[str]:
    return [fixture(d), "-o", "o.onnx", "--seed", str(2**130)]


@case("ok: centered sampling around -1", 0, outputs=("o.onnx",))
def _(d: Path) -> list[str]:
    return [
        fixture(d),
        "-o",
        "o.onnx",
        "--mode",
        "insert",
        "--sampling",
        "centered",
        "--center",
        "-1",
        "--cob-range",
        "0.5",
    ]


@case("ok: external data", 0, outputs=("o.onnx", "o.onnx.data"), shapes={"x": [2, 4]})
def _(d: Path) -> list[str]:
    return [external(d, "e.onnx", "w.bin", hidden=32), "-o", "o.onnx"]  # W0: 512 bytes


@case("ok: Constant values in external data", 0, outputs=("o.onnx",), shapes={"x": [2, 4]})
def _(d: Path) -> list[str]:
    return [constants_external(d, "e.onnx", "w.bin"), "-o", "o.onnx"]


@case(
    "ok: Constant values in external data, -o elsewhere",
    0,
    outputs=("s/o.onnx",),
    shapes={"x": [2, 4]},
)
def _(d: Path) -> list[str]:
    (d / "s").mkdir()
    return [constants_external(d, "e.onnx", "w.bin"), "-o", "s/o.onnx", "--no-verify"]


@case("ok: --no-verify", 0, outputs=("o.onnx", "r.json"))
def _(d: Path) -> list[str]:
    return [fixture(d), "-o", "o.onnx", "--no-verify", "--report", "r.json"]


@case("ok: --inputs", 0, outputs=("o.onnx",))
def _(d: Path) -> list[str]:
    return [fixture(d), "-o", "o.onnx", "--inputs", feeds_npz(d)]


@case("ok: a dynamic dimension with --input-shape", 0, outputs=("o.onnx",), shapes={"x": [1, 5, 4]})
def _(d: Path) -> list[str]:
    dynamic_model(d / "dyn.onnx")  # x[1, T, 4]: T sized by the option
    return ["dyn.onnx", "-o", "o.onnx", "--input-shape", "x=1,3,4"]


@case("ok: inspect with a report", 0, outputs=("r.json",))
def _(d: Path) -> list[str]:
    return ["inspect", fixture(d), "--report", "r.json"]


# -- running a case -------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): a regular file by its SHA-256, a link
    by its target, anything else by its kind — nothing is opened but regular files."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        mode = p.lstat().st_mode
        key = str(p.relative_to(root))
        if stat.S_ISLNK(mode):
            out[key] = "link:" + os.readlink(p)
        elif stat.S_ISREG(mode):
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = f"kind:{stat.S_IFMT(mode):o}"
    return out


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh working directory (the cwd during the case); made writable again after."""
    monkeypatch.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        for p in tmp_path.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)


class _Timeout(BaseException):
    """Raised by SIGALRM: a case that blocks (a FIFO opened) fails instead of hanging."""


def run_cli(args: list[str], seconds: int = 60) -> int:
    """``main(args)`` with a deadline; argparse's SystemExit becomes its code."""

    def expire(_signum: int, _frame: object) -> None:
        raise _Timeout(f"graphteleport {' '.join(args)} ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return main(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile(
    name: str, workdir: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    c = CASES[name]
    if c.skip:
        pytest.skip(c.skip)
    args = c.setup(workdir)
    before = snapshot(workdir)
    caplog.set_level(logging.WARNING)
    rc = run_cli([*args, "-q"])
    _, err = capfd.readouterr()
    after = snapshot(workdir)

    assert rc == c.code, f"exit {rc}, expected {c.code}; stderr: {err}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if c.code == 0:
        assert err == "" and not warnings, f"a successful run printed: {err!r} {warnings}"
    else:
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {lines}"
        assert lines[0].startswith("graphteleport:"), lines[0]
        assert c.expect in lines[0], f"{c.expect!r} not in {lines[0]!r}"
        assert not warnings, f"warnings would reach stderr as extra lines: {warnings}"
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == set(c.outputs), f"changed {sorted(changed)}, expected {sorted(c.outputs)}"
    models = [o for o in c.outputs if o.endswith(".onnx")]
    if c.code == 0 and models:
        source = next(a for a in args if a.endswith(".onnx"))
        assert_same_function(workdir / source, workdir / models[0], c.shapes)


def assert_same_function(src: Path, dst: Path, shapes: dict[str, list[int]]) -> None:
    """``dst`` computes what ``src`` does on fresh random inputs, and its weights moved."""
    a, b = _session(src), _session(dst)
    rng = np.random.default_rng(FRESH_SEED)
    feeds = {}
    for i in a.get_inputs():
        shape = shapes.get(i.name) or [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = (2 * rng.standard_normal(shape)).astype(np.float32)
    for x, y in zip(a.run(None, feeds), b.run(None, feeds), strict=True):
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        scale = max(float(np.max(np.abs(x64))), 1e-30)
        assert float(np.max(np.abs(x64 - y64))) / scale <= 1e-4
    w0, w1 = weights(onnx.load(src)), weights(onnx.load(dst))
    assert any(not np.array_equal(w, w1.get(k, w)) for k, w in w0.items()), "no weight moved"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_the_suite_covers_every_class() -> None:
    """Each class of the issue has cases, and each exit code its share."""
    prefixes = {n.split(":")[0] for n in CASES}
    assert prefixes >= {"alias", "report", "non-regular", "option", "malformed", "ok"}
    codes = [c.code for c in CASES.values()]
    assert codes.count(2) >= 100 and codes.count(0) >= 10 and 1 in codes


# -- signals: SIGTERM cleans up like SIGINT -------------------------------------------------------
CHILD = """
import signal, sys, time
# a child started from a background job inherits SIGINT ignored: give it Python's handler
signal.signal(signal.SIGINT, signal.default_int_handler)
import graphteleport.io as gio
real = gio.StagedSave.commit
def slow_commit(self):  # the model (and report) are staged: the worst moment to stop
    print("staged", flush=True)
    time.sleep(60)
    return real(self)
gio.StagedSave.commit = slow_commit
from graphteleport.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
)
def test_a_signal_during_work_leaves_nothing(
    workdir: Path, sig: signal.Signals, code: int, word: str
) -> None:
    """A child stopped while its outputs are staged exits 130/143 with one line and leaves
    no ``.graphteleport-*`` temporary, no model, no report."""
    args = [fixture(workdir, "resnet_tiny"), "-o", "o.onnx", "--report", "s/r.json", "-q"]
    (workdir / "s").mkdir()  # the report is staged in a second folder
    before = snapshot(workdir)

    def staged() -> None:
        names = [p.name for p in workdir.rglob(".graphteleport-*")]
        assert len(names) == 2, f"expected a temporary beside the model and the report: {names}"

    returncode, err = signalled_child(CHILD, args, workdir, "staged", sig, staged)
    assert returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"graphteleport: {word}"), lines
    assert snapshot(workdir) == before


# -- library users get the same refusals ----------------------------------------------------------
LIBRARY: dict[str, Callable[[], object]] = {
    "TeleportPass positive r=0": lambda: TeleportPass(sampling="positive", cob_range=0.0),
    "TeleportPass cob_range nan": lambda: TeleportPass(cob_range=float("nan")),
    "TeleportPass center inf": lambda: TeleportPass(center=float("inf")),
    "TeleportPass seed -1": lambda: TeleportPass(seed=-1),
    "TeleportPass huge input shape": lambda: TeleportPass(input_shapes={"x": [2**20, 2**20]}),
    "TeleportOptions rtol 0": lambda: TeleportOptions(rtol=0.0),
    "TeleportOptions mode": lambda: TeleportOptions(mode="nope"),  # type: ignore[arg-type]
    "CofactorOptions negative r=0": lambda: CofactorOptions(sampling="negative", cob_range=0.0),
    "CofactorOptions seed -1": lambda: CofactorOptions(seed=-1),
}


@pytest.mark.parametrize("name", list(LIBRARY))
def test_library_refuses_the_same_values(name: str) -> None:
    with pytest.raises(InputError) as info:
        LIBRARY[name]()
    assert "\n" not in str(info.value)


def test_library_accepts_the_edges() -> None:
    """The refusals stop at the edge: r = 0 with intra_landscape (τ = 1), big seeds."""
    TeleportPass(sampling="intra_landscape", cob_range=0.0, seed=2**130)
    TeleportOptions(rtol=0.5, input_shapes={"x": (1, 2**31)})

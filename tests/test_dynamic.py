"""Dynamic input dimensions: the ONNX frontend finds sizes that run the model.

Tiny models built with onnx.helper, each needing a different rule of
:func:`graphteleport.frontends.onnx.resolve_input_shapes`: a strided conv net that
runs only at multiples of 64 (the ladder), a Reshape that needs a multiple of 3 (the
ladder, and a metadata hint), a symbol shared by an integer and a float input, a
user override, and a model no ladder size runs (exit 2, one line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import make_model, max_rel_err, rand
from onnx import TensorProto, helper, numpy_helper

from graphteleport.cli import main
from graphteleport.errors import InputError
from graphteleport.frontends.onnx import (
    LADDER,
    Probe,
    input_specs,
    ort_probe,
    resolve_input_shapes,
)

n = helper.make_node


# -- models -------------------------------------------------------------------------------------
def strided_net(depth: int = 6) -> onnx.ModelProto:
    """x[N,3,H,W] → depth × (Conv 3×3 stride 2, Relu) → Resize ×2^depth → Add(Conv1×1(x))
    → Conv1×1 → y.  Each conv maps h to ceil(h/2), so the Add runs only where H and W
    are multiples of 2^depth (64 for depth 6): the ladder's 32 fails, 64 runs."""
    nodes, inits, prev, cin = [], {}, "x", 3
    for i in range(depth):
        inits[f"W{i}"] = rand([4, cin, 3, 3], i) * 0.5
        inits[f"b{i}"] = rand([4], 10 + i)
        nodes += [
            n("Conv", [prev, f"W{i}", f"b{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]),
            n("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        prev, cin = f"r{i}", 4
    scale = float(2**depth)
    inits["scales"] = np.array([1, 1, scale, scale], dtype=np.float32)
    inits["Ws"], inits["bs"] = rand([4, 3, 1, 1], 30), rand([4], 31)
    inits["Wo"], inits["bo"] = rand([2, 4, 1, 1], 32), rand([2], 33)
    nodes += [
        n("Resize", [prev, "", "scales"], ["up"], mode="nearest"),
        n("Conv", ["x", "Ws", "bs"], ["skip"]),
        n("Add", ["up", "skip"], ["sum"], name="merge"),
        n("Relu", ["sum"], ["rs"]),
        n("Conv", ["rs", "Wo", "bo"], ["y"]),
    ]
    return make_model(nodes, {"x": ["N", 3, "H", "W"]}, {"y": ["N", 2, "H", "W"]}, inits)


def reshape_model(target: Sequence[int] = (1, -1, 3, 6)) -> onnx.ModelProto:
    """x[1,T,4] → MatMul → Relu [1,T,6] → Reshape *target* → MatMul → y.  The default
    target groups three steps: T must be a multiple of 3 (32 and 64 fail, 96 runs)."""
    nodes = [
        n("MatMul", ["x", "W0"], ["h"]),
        n("Relu", ["h"], ["a"]),
        n("Reshape", ["a", "shape"], ["g"], name="group3"),
        n("MatMul", ["g", "W1"], ["y"]),
    ]
    inits = {
        "W0": rand([4, 6], 0),
        "W1": rand([6, 2], 1),
        "shape": np.array(target, dtype=np.int64),
    }
    out = [d if d > 0 else "U" for d in target[:-1]] + [2]
    return make_model(nodes, {"x": [1, "T", 4]}, {"y": out}, inits)


def shared_symbol_model(symbol_of_x: str = "S") -> onnx.ModelProto:
    """x[1,S,4] (float, listed first) + Gather(E, ids[1,S]) → MatMul → Relu → MatMul → y.
    The integer input's sequence (16) sizes the float input's S through the symbol."""
    nodes = [
        n("Gather", ["E", "ids"], ["e"]),
        n("Add", ["x", "e"], ["s"]),
        n("MatMul", ["s", "W0"], ["h"]),
        n("Relu", ["h"], ["a"]),
        n("MatMul", ["a", "W1"], ["y"]),
    ]
    inits = {"E": rand([10, 4], 0), "W0": rand([4, 6], 1), "W1": rand([6, 3], 2)}
    graph = helper.make_graph(
        nodes,
        "shared",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, symbol_of_x, 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "S"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", 3])],
        [numpy_helper.from_array(a, k) for k, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def as_ir(model: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(model)


def with_metadata(model: onnx.ModelProto, **props: str) -> onnx.ModelProto:
    helper.set_model_props(model, props)
    return model


# -- running the CLI ----------------------------------------------------------------------------
@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path``, as the working directory during the test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def teleport(
    capsys: pytest.CaptureFixture[str], model: onnx.ModelProto, *extra: str
) -> tuple[dict, str]:
    """Save *model* as m.onnx, teleport it to o.onnx; the report and the terminal output."""
    onnx.save(model, "m.onnx")
    rc, out, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--report", "r.json", *extra)
    assert rc == 0, err
    return json.loads(Path("r.json").read_text()), out


def counting_probe(
    runs: Mapping[str, Sequence[int]] | None = None,
) -> tuple[list[dict[str, tuple[int, ...]]], Probe]:
    """A probe that records the shapes it is asked about and accepts those in *runs*
    (by input: the allowed sizes of its axis 1); all when *runs* is None."""
    seen: list[dict[str, tuple[int, ...]]] = []

    def probe(feeds: Mapping[str, np.ndarray]) -> None:
        seen.append({k: v.shape for k, v in feeds.items()})
        for name, allowed in (runs or {}).items():
            if feeds[name].shape[1] not in allowed:
                raise RuntimeError(f"{name} of length {feeds[name].shape[1]} does not run")

    return seen, probe


# -- the ladder ---------------------------------------------------------------------------------
def test_strided_net_takes_the_first_ladder_size_that_runs(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """32 fails at the Add (the upsampled map is 64 wide); 64 runs, is analysed, verified,
    and the report says how it was found, with onnxruntime's reason for 32."""
    report, out = teleport(capsys, strided_net())
    entry = report["input_shapes"]["x"]
    assert entry["shape"] == [1, 3, 64, 64]
    assert entry["declared"] == ["N", 3, "H", "W"]
    assert entry["axes"]["0"] == "batch axis: 1"
    assert entry["axes"]["2"].startswith("ladder: 64 (32 failed: Add node 'merge': ")
    assert entry["axes"]["3"] == entry["axes"]["2"]
    assert (
        "input shapes: x [1,3,64,64] (axis 0: batch 1; axes 2,3: ladder 64, after 32 failed)" in out
    )
    assert report["verification"]["passed"] and report["free_cofactors"] > 0
    assert report["elements_changed"] > 0.9 * report["elements_total"]


def test_the_teleport_holds_at_other_sizes(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found at 64×64, the teleport is a property of the weights: at 128×192 with a batch of
    2 the rewritten model computes what the original computes."""
    teleport(capsys, strided_net())
    feeds = {"x": rand([2, 3, 128, 192], 5)}
    assert max_rel_err(onnx.load("m.onnx"), onnx.load("o.onnx"), feeds) <= 1e-5


def test_reshape_needing_a_multiple_of_three(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, _ = teleport(capsys, reshape_model())
    source = report["input_shapes"]["x"]["axes"]["1"]
    assert report["input_shapes"]["x"]["shape"] == [1, 96, 4]
    assert source.startswith("ladder: 96 (32 failed: Reshape node 'group3': ")
    assert "; 64 failed: Reshape node 'group3': " in source
    feeds = {"x": rand([1, 9, 4], 3)}  # any multiple of 3: the model stays dynamic
    assert max_rel_err(onnx.load("m.onnx"), onnx.load("o.onnx"), feeds) <= 1e-5


def test_ladder_order_and_no_probe_after_success() -> None:
    seen, probe = counting_probe({"x": (128,)})
    resolved = resolve_input_shapes(as_ir(reshape_model()), probe=probe)
    assert [s["x"] for s in seen] == [(1, size, 4) for size in (32, 64, 96, 128)]
    assert resolved.shapes == {"x": (1, 128, 4)}
    assert list(LADDER[:4]) == [32, 64, 96, 128]


# -- declared hints -----------------------------------------------------------------------------
def test_metadata_hint_is_taken_when_it_runs(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, out = teleport(capsys, with_metadata(reshape_model(), x_shape="1, 48, 4"))
    assert report["input_shapes"]["x"]["shape"] == [1, 48, 4]
    assert report["input_shapes"]["x"]["axes"]["1"] == "metadata_props['x_shape']: 48"
    assert "input shapes: x [1,48,4] (axis 1: metadata_props['x_shape'] 48)" in out
    assert report["verification"]["passed"]


def test_metadata_hint_that_does_not_run_falls_back_to_the_ladder(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hint giving only the open axis ("50"), which the Reshape refuses: the ladder decides
    and the report says the hint failed."""
    report, _ = teleport(capsys, with_metadata(reshape_model(), input_shape="[50]"))
    source = report["input_shapes"]["x"]["axes"]["1"]
    assert report["input_shapes"]["x"]["shape"] == [1, 96, 4]
    assert source.startswith("ladder: 96 (50 failed: Reshape node 'group3': ")


@pytest.mark.parametrize("text", ["1,48", "0x48", "garbage", "1,48,5"])
def test_metadata_hints_that_do_not_fit_are_ignored(text: str) -> None:
    """Wrong rank, a zero, no numbers, a fixed size contradicted: not a hint at all."""
    seen, probe = counting_probe()
    model = as_ir(with_metadata(reshape_model(), x_shape=text))
    resolved = resolve_input_shapes(model, probe=probe)
    assert resolved.shapes == {"x": (1, 32, 4)} and len(seen) == 1
    assert resolved.sources["x"][1] == "ladder: 32"


# -- shared symbols, overrides ------------------------------------------------------------------
def test_integer_sequence_sizes_a_float_input_with_the_same_symbol(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, _ = teleport(capsys, shared_symbol_model())
    shapes = report["input_shapes"]
    assert shapes["ids"]["shape"] == [1, 16] and shapes["ids"]["axes"]["1"] == "integer input: 16"
    assert shapes["x"]["shape"] == [1, 16, 4]
    assert shapes["x"]["axes"]["1"] == "symbol 'S': 16 (as 'ids' axis 1)"
    assert report["verification"]["passed"]


def test_an_override_sizes_every_axis_of_its_symbol(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, _ = teleport(capsys, shared_symbol_model(), "--input-shape", "ids=1,7")
    shapes = report["input_shapes"]
    assert shapes["ids"]["shape"] == [1, 7] and shapes["ids"]["axes"]["1"] == "--input-shape: 7"
    assert shapes["x"]["shape"] == [1, 7, 4]
    assert shapes["x"]["axes"]["1"] == "symbol 'S': 7 (as --input-shape ids)"


def test_override_is_used_and_nothing_is_probed(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, out = teleport(capsys, strided_net(), "--input-shape", "x=2,3,128,192")
    entry = report["input_shapes"]["x"]
    assert entry["shape"] == [2, 3, 128, 192]
    assert set(entry["axes"].values()) == {
        "--input-shape: 2",
        "--input-shape: 128",
        "--input-shape: 192",
    }
    assert "input shapes: x [2,3,128,192] (axes 0,2,3: --input-shape)" in out
    seen, probe = counting_probe()
    resolve_input_shapes(as_ir(strided_net()), {"x": [1, 3, 64, 64]}, probe=probe)
    assert seen == []


def test_placeholder_symbols_are_not_shared() -> None:
    """Paddle2ONNX writes '?' for every unknown axis: those are independent axes."""
    model = strided_net()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param = dims[3].dim_param = "?"
    seen, probe = counting_probe()
    resolved = resolve_input_shapes(as_ir(model), probe=probe)
    assert resolved.shapes == {"x": (1, 3, 32, 32)}
    resolved = resolve_input_shapes(as_ir(with_metadata(model, x_shape="48x320")), probe=probe)
    assert resolved.shapes == {"x": (1, 3, 48, 320)}  # a symbol shared would force one size
    assert len(seen) == 2  # each found at its first try


# -- no size runs: exit 2 -----------------------------------------------------------------------
def test_unrunnable_model_is_one_line_exit_2_and_writes_nothing(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reshape to a constant [1,5,4]: only T = 5 runs, which no ladder size is."""
    onnx.save(reshape_model((1, 5, 6)), "m.onnx")
    rc, _, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--report", "r.json")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("graphteleport: error: input 'x' [1,T,4]: the model runs at no size")
    assert "dimension x[1] (tried 32, 64," in lines[0]
    assert "at 32: Reshape node 'group3':" in lines[0]
    assert lines[0].endswith("pass --input-shape x=1,D1,4 with concrete sizes")
    assert sorted(os.listdir(work)) == ["m.onnx"]
    rc, _, err = cli(capsys, "m.onnx", "-o", "o.onnx", "--input-shape", "x=1,5,4", "-q")
    assert rc == 0, err


def test_model_onnxruntime_cannot_load_names_the_input(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = [n("Bar", ["x"], ["y"], domain="com.foo")]
    model = make_model(nodes, {"x": [1, "T"]}, {"y": [1, "T"]}, domains={"com.foo": 1})
    onnx.save(model, "m.onnx")
    rc, _, err = cli(capsys, "m.onnx", "-o", "o.onnx")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(
        "graphteleport: error: input 'x' has dynamic dimension 1 and onnxruntime cannot load"
    )
    assert lines[0].endswith("pass --input-shape x=1,D1 with concrete sizes")


def test_without_a_probe_an_open_axis_is_an_error() -> None:
    with pytest.raises(
        InputError, match=r"dynamic dimension 2 \('H'\); pass --input-shape x=1,3,D2,D3"
    ):
        input_specs(as_ir(strided_net()))


# -- other entry points -------------------------------------------------------------------------
def test_inspect_states_the_sizes(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(strided_net(), "m.onnx")
    rc, out, err = cli(capsys, "inspect", "m.onnx", "--report", "r.json")
    assert rc == 0, err
    assert (
        "input shapes: x [1,3,64,64] (axis 0: batch 1; axes 2,3: ladder 64, after 32 failed)" in out
    )
    assert json.loads(Path("r.json").read_text())["input_shapes"]["x"]["shape"] == [1, 3, 64, 64]


def test_npz_feeds_size_the_open_axes_without_probing(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez("feeds.npz", x=rand([1, 12, 4], 4))
    report, _ = teleport(capsys, reshape_model(), "--inputs", "feeds.npz")
    assert report["input_shapes"]["x"] == {
        "shape": [1, 12, 4],
        "declared": [1, "T", 4],
        "axes": {"1": "--inputs"},
        "source": "axis 1: --inputs",
        "brief": "axis 1: --inputs",
    }
    assert report["seconds"]["inputs"] < 1.0


def test_ort_probe_runs_an_in_memory_model() -> None:
    probe = ort_probe(as_ir(reshape_model()))
    probe({"x": rand([1, 6, 4])})
    with pytest.raises(Exception, match="Reshape"):
        probe({"x": rand([1, 7, 4])})

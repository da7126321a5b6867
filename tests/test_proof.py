"""What verification proves, and what it refuses to call proven.

- Outputs are compared on 8 input draws at varied scales, plus the user's ``--inputs``.
- The per-tensor check runs node by node and names the first tensor at fault.
- A Sigmoid's tail is compared with the absolute accuracy onnxruntime has there, so a
  correct teleport never fails in it; an all-zero output reports 0, not 1e300.
- A check that compared no finite element is "not verified" (exit 1), never "passed".
- Tensors are checked in groups under a byte budget (memory bound), with the same verdict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import make_model, rand
from onnx import helper

from graphteleport import tensorcheck, verify
from graphteleport.cli import main
from graphteleport.frontends import onnx as onnx_frontend
from graphteleport.io import load_model
from graphteleport.passes.teleport import TeleportPass

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "onnx"


def gemm(x: str, w: str, b: str, y: str) -> onnx.NodeProto:
    return helper.make_node("Gemm", [x, w, b], [y], transB=1)


def sigmoid_tail_model() -> onnx.ModelProto:
    """Outputs σ(z) with every logit z near −18: probabilities of order 1e-8."""
    nodes = [
        gemm("x", "W1", "b1", "h"),
        helper.make_node("Relu", ["h"], ["r"]),
        gemm("r", "W2", "b2", "z"),
        helper.make_node("Sigmoid", ["z"], ["y"]),
    ]
    weights = {
        "W1": rand([32, 16], 1),
        "b1": rand([32], 2),
        "W2": rand([8, 32], 3) * 0.2,
        "b2": np.full([8], -18, np.float32),
    }
    return make_model(nodes, {"x": [1, 16]}, {"y": [1, 8]}, weights)


def run_cli(tmp_path: Path, model: onnx.ModelProto, *args: str) -> tuple[int, dict]:
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    rc = main([str(src), "-o", str(out), "--report", str(rep), "-q", *args])
    return rc, json.loads(rep.read_text()) if rep.exists() else {}


def test_sigmoid_tail_verifies_with_defaults(tmp_path: Path) -> None:
    rc, r = run_cli(tmp_path, sigmoid_tail_model())
    assert rc == 0
    v = r["verification"]
    assert v["passed"] and v["inputs"] == 8 and v["tensors"]["passed"]
    assert r["elements_changed"] > 0.9 * r["elements_total"]
    y = verify.run(tmp_path / "m.onnx", {"x": rand([1, 16], 5)})[0]
    assert float(np.max(y)) < 1e-5  # the outputs really are in the tail


def test_sigmoid_tail_still_catches_a_wrong_weight(tmp_path: Path) -> None:
    """The floor is the sigmoid's range: a corrupted logit still fails."""
    model = sigmoid_tail_model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    specs = onnx_frontend.input_specs(load_model(src))
    feeds = verify.draw_feed_sets(specs)
    result = TeleportPass(seed=0)(load_model(src))
    bad = result.model
    w = bad.graph.initializers["W2"].const_value.numpy().copy()  # type: ignore[union-attr]
    w[3] *= 1.5
    bad.graph.initializers["W2"].const_value = ir.tensor(w, name="W2")
    ir.save(bad, tmp_path / "bad.onnx")
    check = verify.verify_teleport(src, tmp_path / "bad.onnx", feeds, result.tensor_scales())
    assert not check.passed
    assert check.tensors is not None and check.tensors.failure is not None
    assert check.tensors.failure.tensor == "z"


def test_all_zero_output_reports_zero_error() -> None:
    zero = np.zeros((2, 3), np.float32)
    result = verify.compare([zero], [zero.copy()])
    assert result.passed and result.max_rel_err == 0.0
    off = verify.compare([zero], [zero + np.float32(1e-8)])
    assert not off.passed and off.max_rel_err == np.inf


def test_saturation_floor_passes_through_data_movement() -> None:
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["y"]),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    floors = tensorcheck.saturation_floors(graph)
    assert floors == {"s": 1.0, "y": 1.0}


def nan_model(tmp_path: Path) -> onnx.ModelProto:
    """y = sqrt(-1 - |W x|): NaN wherever it is defined."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Abs", ["h"], ["a"]),
        helper.make_node("Sub", ["m1", "a"], ["n"]),
        helper.make_node("Sqrt", ["n"], ["y"]),
    ]
    inits = {"W": rand([4, 4], 1), "m1": np.array(-1, np.float32)}
    return make_model(nodes, {"x": [1, 4]}, {"y": [1, 4]}, inits)


def test_all_nan_outputs_are_not_verified(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, r = run_cli(tmp_path, nan_model(tmp_path))
    err = capsys.readouterr().err
    assert rc == 1
    assert "not verified" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
    assert r["verification"]["passed"] is False


def test_empty_outputs_are_not_verified(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["y"]),
    ]
    inits = {
        "starts": np.array([0], np.int64),
        "ends": np.array([0], np.int64),
        "axes": np.array([1], np.int64),
    }
    model = make_model(nodes, {"x": [1, 4]}, {"y": [1, 0]}, inits)
    rc, r = run_cli(tmp_path, model)
    assert rc == 1
    assert any("not verified" in f for f in r["verification"]["failures"])


def test_draws_option_and_inputs(tmp_path: Path) -> None:
    model = onnx.load(FIXTURES / "mlp_small.onnx")
    rc, r = run_cli(tmp_path, model, "--draws", "3")
    assert rc == 0 and r["verification"]["inputs"] == 3
    rc, r = run_cli(tmp_path, model, "--outputs-only")
    assert rc == 0 and r["verification"]["tensors"] is None


@pytest.mark.parametrize("bad", ["-1", "0"])
def test_bad_draws_are_usage_errors(tmp_path: Path, bad: str) -> None:
    rc, _ = run_cli(tmp_path, onnx.load(FIXTURES / "mlp_small.onnx"), "--draws", bad)
    assert rc == 2
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("mode", ["absorb", "insert"])
def test_groups_under_a_small_budget_give_the_same_verdict(tmp_path: Path, mode: str) -> None:
    src = FIXTURES / "resnet_tiny.onnx"
    specs = onnx_frontend.input_specs(load_model(src))
    feeds = verify.draw_feed_sets(specs, 1)
    result = TeleportPass(mode=mode, seed=3, sampling="inter_landscape")(load_model(src))
    out = tmp_path / "t.onnx"
    ir.save(result.model, out)
    scales = result.tensor_scales()
    whole = tensorcheck.check_tensors(src, out, feeds[0], scales, verify.open_proto)
    pieces = tensorcheck.check_tensors(
        src, out, feeds[0], scales, verify.open_proto, budget_bytes=4096
    )
    assert whole.passed and pieces.passed
    assert whole.groups == 1 and pieces.groups > 5
    assert pieces.tensors == whole.tensors and pieces.elements == whole.elements


def test_insert_mode_promise_is_checked(tmp_path: Path) -> None:
    """Insert mode: wrapped outputs carry only their group's part of τ, and a wrong inserted
    cofactor fails."""
    src = FIXTURES / "mlp_small.onnx"
    specs = onnx_frontend.input_specs(load_model(src))
    feeds = verify.draw_feed_sets(specs, 2)
    result = TeleportPass(mode="insert", seed=1, sampling="inter_landscape", cob_range=0.9)(
        load_model(src)
    )
    assert result.inserted.wrapped
    out = tmp_path / "t.onnx"
    ir.save(result.model, out)
    assert verify.verify_teleport(src, out, feeds, result.tensor_scales()).passed
    model = result.model
    name = next(n for n in model.graph.initializers if "_cofactor" in n)
    c = model.graph.initializers[name].const_value.numpy().copy()  # type: ignore[union-attr]
    c.reshape(-1)[0] *= 1.5
    model.graph.initializers[name].const_value = ir.tensor(c, name=name)
    ir.save(model, tmp_path / "bad.onnx")
    bad = verify.verify_teleport(src, tmp_path / "bad.onnx", feeds, result.tensor_scales())
    assert not bad.passed and bad.tensors is not None and bad.tensors.failure is not None


def batch_model(baked: bool) -> onnx.ModelProto:
    """A dynamic-batch MLP; ``baked``: a Reshape to [1, 8] that only runs at batch 1."""
    shape = np.array([1, 8] if baked else [-1, 8], np.int64)
    nodes = [
        gemm("x", "W1", "b1", "h"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        gemm("f", "W2", "b2", "y"),
    ]
    inits = {"W1": rand([8, 4], 1), "b1": rand([8], 2), "W2": rand([3, 8], 3), "b2": rand([3], 4)}
    inits["shape"] = shape
    return make_model(nodes, {"x": ["N", 4]}, {"y": ["N", 3]}, inits)


@pytest.mark.parametrize("baked", [False, True])
def test_draws_run_as_one_batch_where_the_model_allows(tmp_path: Path, baked: bool) -> None:
    rc, r = run_cli(tmp_path, batch_model(baked))
    assert rc == 0
    v = r["verification"]
    assert v["inputs"] == 8 and v["batched"] is (not baked) and v["tensors"]["passed"]

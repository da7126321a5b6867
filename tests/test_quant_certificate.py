"""The accuracy certificate's site selection (experiments/quant_certificate.py): on a tiny
Gemm → Relu → Gemm → Sigmoid → Gemm model quantized by onnxruntime, the sites no
rescaling of the mode changes are the ones behind the Sigmoid in absorb mode (none of the
Relu's), fewer in insert mode (the Sigmoid is wrapped); random rescalings written by
graphteleport's rewrite leave every selected site as it was and move the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from experiments.quant_certificate import check_fixed, fixed_sites, orbit_analysis
from experiments.quant_diagnose import read_sites
from experiments.quantization import quantize

B, D, H = 8, 6, 8  # (the harness quantizes in batches of 8)


def sigmoid_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["s"]),
        helper.make_node("Gemm", ["s", "w3", "b3"], ["y"]),
    ]
    inits = [init("w1", D, H), init("b1", H), init("w2", H, H), init("b2", H)]
    inits += [init("w3", H, 3), init("b3", 3)]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, 3])],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, dict]:
    folder = tmp_path_factory.mktemp("cert")
    src, qdq = folder / "m.onnx", folder / "q.onnx"
    onnx.save(sigmoid_mlp(), str(src))
    feeds = {"x": np.random.default_rng(1).standard_normal((32, D)).astype(np.float32)}
    quantize(src, qdq, feeds, per_channel=False)
    sites = read_sites(onnx.load(str(qdq)), onnx.load(str(src)), None)
    return src, sites, feeds


def selected(src: Path, sites: list, mode: str) -> tuple[object, set[str]]:
    model, analysis = orbit_analysis(src, {"x": (B, D)}, mode)
    return model, {f"{s.kind}:{s.name}" for s in fixed_sites(model, analysis, sites)}


def test_absorb_mode_fixes_what_the_sigmoid_pins(quantized: tuple[Path, list, dict]) -> None:
    src, sites, _ = quantized
    names = {f"{s.kind}:{s.name}" for s in sites}
    assert {"weight:w1", "weight:w2", "weight:w3", "bias:b2", "activation:x"} <= names
    _, fixed = selected(src, sites, "absorb")
    assert {"activation:x", "weight:w3", "bias:b3", "activation:s"} <= fixed
    # the Relu's class moves w1's columns, w2's rows and b1; b2's own class is pinned but
    # its INT32 scale is s_a · s_w2, and w2 moves
    assert not fixed & {"weight:w1", "weight:w2", "bias:b1", "bias:b2", "activation:a"}


def test_insert_mode_frees_the_sigmoid(quantized: tuple[Path, list, dict]) -> None:
    src, sites, _ = quantized
    _, absorb = selected(src, sites, "absorb")
    _, insert = selected(src, sites, "insert")
    assert insert < absorb and "weight:w3" not in insert and "activation:x" in insert


@pytest.mark.parametrize("mode", ["absorb", "insert"])
def test_random_rescalings_leave_the_fixed_sites_alone(
    quantized: tuple[Path, list, dict], mode: str, tmp_path: Path
) -> None:
    src, sites, feeds = quantized
    model, analysis = orbit_analysis(src, {"x": (B, D)}, mode)
    fixed = fixed_sites(model, analysis, sites)
    keys = {(s.name, s.kind) for s in fixed}
    others = [s for s in sites if (s.name, s.kind) not in keys]
    check = check_fixed(model, {"x": (B, D)}, fixed, others, feeds, mode, 2, tmp_path)
    assert check["fixed_changed"] == [] and check["fixed_worst_rel_change"] < 1e-5
    assert check["others_changed"] >= 3  # the Relu's side does move

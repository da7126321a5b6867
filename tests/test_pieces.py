"""Verification by pieces (graphteleport.pieces), the whole/pieces choice, and the
dtype- and depth-derived tolerance.

- By pieces, a correct teleport passes (a generated LLaMA-shaped external-data model,
  and the registry's ResNet fixture, whose residual crosses block boundaries) with the
  same tensors checked as whole-model verification; one corrupted tensor fails and the
  failure names the block and the tensor.
- ``--verify-by auto`` picks whole for small models, pieces when memory is short; the
  report and the human output say which ran.
- float16: a correct teleport of a several-layer model passes under the default
  tolerance, one dropped cofactor fails it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphteleport import verify, widen
from graphteleport.cli import main
from graphteleport.frontends import onnx as onnx_frontend
from graphteleport.io import load_model, save_model_atomic
from graphteleport.passes.teleport import TeleportPass, TeleportResult
from graphteleport.pieces import block_weights, plan_blocks, verify_blocks
from graphteleport.tensorcheck import LoadedModel
from models.llama import LlamaShape, make_llama

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "onnx"
VOCAB = 64


def llama(tmp_path: Path, dtype: str = "float32", layers: int = 2) -> Path:
    src = tmp_path / f"llama_{dtype}_{layers}.onnx"
    make_llama(src, LlamaShape(layers=layers, hidden=32, dtype=dtype, vocab=VOCAB, seq=4))
    return src


class Case:
    """A model, its teleport (saved with external data) and the verification inputs."""

    def __init__(self, src: Path, tmp_path: Path, draws: int = 2) -> None:
        self.src = src
        model = load_model(src)
        specs = onnx_frontend.input_specs(model)
        self.feeds = verify.draw_feed_sets(specs, draws, int_high={"ids": VOCAB})
        self.result: TeleportResult = TeleportPass(seed=0)(model)
        self.rtol = verify.default_rtol(self.result.model)
        self.out = tmp_path / "teleported.onnx"
        save_model_atomic(self.result.model, self.out, external_data=True)
        self.scales = self.result.tensor_scales()

    def check(self, path: Path, by: str, block_bytes: int = 4096) -> verify.VerificationResult:
        return verify.verify_teleport(
            self.src, path, self.feeds, self.scales, self.rtol, by=by, block_bytes=block_bytes
        )

    def with_dropped_cofactor(self, path: Path) -> tuple[str, str]:
        """The teleport with one output neuron of one MatMul/Conv missing its cofactor
        (its weights and bias divided by it); returns (node, the output it corrupts)."""
        node, j, s = self._scaled_neuron()
        model = load_model(self.out)
        axis = -1 if node.op_type == "MatMul" else 0  # MatMul [in, out]; Conv [out, in, …]
        for name in node.input[1:]:
            init = model.graph.initializers[name]
            w = init.const_value.numpy()  # type: ignore[union-attr]
            w64 = np.moveaxis(w.astype(np.float64), axis, 0)
            w64[j] /= s
            new = np.moveaxis(w64, 0, axis).astype(w.dtype)
            init.const_value = ir.Tensor(new, name=name)
        save_model_atomic(model, path, external_data=True)
        return node.name, node.output[0]

    def _scaled_neuron(self) -> tuple[onnx.NodeProto, int, float]:
        """The MatMul/Conv with weights, its output neuron and that neuron's cofactor
        with the largest |log s|."""
        graph = onnx.load(self.src, load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        best: tuple[onnx.NodeProto | None, int, float] = (None, 0, 1.0)
        for node in graph.node:
            s = self.scales.scales.get(node.output[0])
            if node.op_type not in ("MatMul", "Conv") or s is None:
                continue
            if not all(x in weights for x in node.input[1:]):
                continue
            flat = s.reshape(-1)
            j = int(np.argmax(np.abs(np.log(np.abs(flat)))))
            if abs(math.log(abs(flat[j]))) > abs(math.log(abs(best[2]))):
                best = (node, j, float(flat[j]))
        assert best[0] is not None, "no scaled neuron to drop"
        return best[0], best[1], best[2]


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    tmp = tmp_path_factory.mktemp("llama")
    return Case(llama(tmp), tmp)


@pytest.fixture(scope="module")
def resnet_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(FIXTURES / "resnet_tiny.onnx", tmp_path_factory.mktemp("resnet"))


@pytest.mark.parametrize("name", ["llama_case", "resnet_case"])
def test_pieces_pass_a_correct_teleport(name: str, request: pytest.FixtureRequest) -> None:
    case: Case = request.getfixturevalue(name)
    whole = case.check(case.out, "whole")
    pieces = case.check(case.out, "pieces")
    assert whole.passed and whole.method == "whole" and whole.blocks == 0
    assert pieces.passed, pieces.failures
    assert pieces.method == "pieces" and pieces.blocks >= 5
    assert pieces.tensors is not None and whole.tensors is not None
    assert pieces.tensors.tensors == whole.tensors.tensors  # every tensor, node by node
    assert pieces.inputs == whole.inputs == 2
    assert pieces.to_dict()["method"] == "pieces"


def test_blocks_cut_across_the_residual(resnet_case: Case) -> None:
    """Some block boundary is crossed by two values (the skip and the branch), and the
    blocks' weights stay within the budget unless one node alone exceeds it."""
    graph = LoadedModel.load(resnet_case.src).proto.graph
    blocks = plan_blocks(graph, 4096)
    assert len(blocks) >= 5
    assert max(len(b.inputs) for b in blocks[1:]) >= 2
    computed = [k for b in blocks for k in b.nodes if graph.node[k].op_type != "Constant"]
    assert len(computed) == len(set(computed))  # no computing node in two blocks
    for b in blocks:
        assert b.weight_bytes <= 4096 or len({graph.node[k].op_type for k in b.nodes}) <= 2


@pytest.mark.parametrize("name", ["llama_case", "resnet_case"])
def test_pieces_name_the_corrupted_tensor(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    case: Case = request.getfixturevalue(name)
    bad = tmp_path / "bad.onnx"
    _, value = case.with_dropped_cofactor(bad)
    result = case.check(bad, "pieces")
    assert not result.passed
    assert "block " in result.failures[0] and f"tensor '{value}'" in result.failures[0]
    assert result.tensors is not None and result.tensors.failure is not None
    assert result.tensors.failure.tensor == value and result.tensors.failure.block


def test_auto_picks_whole_for_small_models(
    llama_case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = LoadedModel.load(llama_case.src)
    need = verify.whole_model_bytes(loaded.proto.graph)
    assert 0 < need < 10 * 2**20
    assert verify.choose_method("auto", loaded) == "whole"
    assert verify.choose_method("pieces", loaded) == "pieces"
    monkeypatch.setattr(verify, "available_memory", lambda: need)  # 80 % of it is short
    assert verify.choose_method("auto", loaded) == "pieces"
    result = verify.verify_teleport(
        llama_case.src, llama_case.out, llama_case.feeds, llama_case.scales, llama_case.rtol
    )
    assert result.passed and result.method == "pieces"


def test_memory_estimate_counts_16_bit_weights_five_times(tmp_path: Path) -> None:
    g32 = LoadedModel.load(llama(tmp_path, "float32")).proto.graph
    g16 = LoadedModel.load(llama(tmp_path, "float16")).proto.graph
    # per float32 byte: 2 (itself, prepacked); per float16 byte 5 (itself, its float32
    # cast, prepacked) — 2.5 per float32 byte of the same weights (a few non-float
    # tensors, counted 2 in both, keep the ratio just under 5/4)
    ratio = verify.whole_model_bytes(g16) / verify.whole_model_bytes(g32)
    assert 1.24 < ratio <= 1.25
    assert verify.available_memory() is None or verify.available_memory() > 0  # type: ignore[operator]


def test_cli_reports_the_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out, rep = FIXTURES / "resnet_tiny.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([str(src), "-o", str(out), "--report", str(rep), "--verify-by", "pieces"]) == 0
    v = json.loads(rep.read_text())["verification"]
    assert v["passed"] and v["method"] == "pieces" and v["blocks"] >= 1
    assert "block by block" in capsys.readouterr().out
    assert main([str(src), "-o", str(tmp_path / "p.onnx"), "--report", str(rep), "-q"]) == 0
    assert json.loads(rep.read_text())["verification"]["method"] == "whole"


def test_cli_rejects_an_unknown_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = FIXTURES / "mlp_small.onnx"
    with pytest.raises(SystemExit) as e:
        main([str(src), "-o", str(tmp_path / "o.onnx"), "--verify-by", "halves"])
    assert e.value.code == 2 and "--verify-by" in capsys.readouterr().err


def test_default_rtol_formula(tmp_path: Path) -> None:
    m16 = load_model(llama(tmp_path, "float16", layers=6))
    depth = verify.accumulation_depth(m16)
    assert depth == 6 * 6 + 1  # q/k/v, QKᵀ, ·V, o, gate/up, down per layer; the head
    assert verify.default_rtol(m16) == max(1e-2, 2 * 2**-10 * math.sqrt(depth))
    assert verify.default_rtol(load_model(llama(tmp_path, "float32"))) == 1e-5
    deep = 2 * 2**-10 * math.sqrt(32 * 6 + 1)  # the 32-layer LLaMA shape
    assert 2.5e-2 < deep < 3e-2


@pytest.mark.parametrize("by", ["whole", "pieces"])
def test_float16_tolerance_passes_correct_and_fails_dropped_cofactor(
    by: str, tmp_path: Path
) -> None:
    """Several float16 layers: the correct teleport passes the default tolerance, the
    same teleport with one cofactor dropped fails it."""
    case = Case(llama(tmp_path, "float16", layers=6), tmp_path, draws=4)
    good = case.check(case.out, by, block_bytes=16384)
    assert good.passed, good.failures
    assert good.max_rel_err < case.rtol
    bad = tmp_path / "bad.onnx"
    case.with_dropped_cofactor(bad)
    assert not case.check(bad, by, block_bytes=16384).passed


def test_pieces_fail_when_a_value_is_missing(resnet_case: Case, tmp_path: Path) -> None:
    """A block output the teleported model does not compute (renamed) is a failed
    verification that names it, not a crash."""
    graph = LoadedModel.load(resnet_case.src).proto.graph
    value = plan_blocks(graph, 4096)[1].outputs[0]
    tele = onnx.load(resnet_case.out)
    for node in tele.graph.node:
        node.output[:] = [y + "_renamed" if y == value else y for y in node.output]
        node.input[:] = [x + "_renamed" if x == value else x for x in node.input]
    bad = tmp_path / "renamed.onnx"
    onnx.save(tele, bad)
    result = resnet_case.check(bad, "pieces")
    assert not result.passed
    assert any(f"computes no value '{value}'" in f for f in result.failures)


def test_each_models_weights_are_widened_once_a_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float16 weights widened for onnxruntime (graphteleport.widen): the per-tensor
    check's run of the original comes right after the original's block run, so each
    model's weights are converted once for each block reading them, though the cache
    holds one model's block at a time (here: blocks of 16 KiB, a cache of 32 KiB)."""
    case = Case(llama(tmp_path, "float16", layers=3), tmp_path, draws=2)
    converted: list[tuple[str, str]] = []
    widen_into = widen._widen_into

    def counted(
        tensor: onnx.TensorProto, folder: str, out: np.ndarray, half: np.ndarray
    ) -> np.ndarray:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        converted.append((location, tensor.name))
        return widen_into(tensor, folder, out, half)

    monkeypatch.setattr(widen, "_widen_into", counted)
    found = verify_blocks(
        str(case.src), str(case.out), case.feeds, case.scales, verify.open_proto,
        rtol=case.rtol, budget_bytes=16384, widen_elements=256,
    )  # fmt: skip
    assert not found.failures and found.tensors is not None and found.tensors.passed
    graph = LoadedModel.load(case.src).proto.graph
    readers: dict[str, int] = {}
    for block in plan_blocks(graph, 16384):
        for name in block_weights(graph, block):
            readers[name] = readers.get(name, 0) + 1
    counts: dict[tuple[str, str], int] = {}
    for key in converted:
        counts[key] = counts.get(key, 0) + 1
    assert {location for location, _ in counts} == {
        case.src.name + ".data",
        case.out.name + ".data",
    }
    assert all(n <= readers[name] for (_, name), n in counts.items()), counts

"""Verification by pieces with the draws as one batch (graphteleport.verify.pieces_sets).

Where every graph input's axis 0 is free, the first draw runs alone (the per-tensor
check's) and the others as one batch: a block runs 2 + 2 times for the draws instead of
2 per draw.  A correct teleport passes with fewer runs, a corrupted one fails, and a
model that declares a free batch but bakes it into a Reshape falls back to one by one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import CountingOpen
from onnx import numpy_helper

from graphteleport import pieces, rows, verify
from graphteleport.frontends import onnx as onnx_frontend
from graphteleport.io import load_model, save_model_atomic
from graphteleport.passes.teleport import TeleportPass
from models.llama import LlamaShape, make_llama

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "onnx"


def _free_batch(src: Path, dst: Path, reshapes: bool = False) -> Path:
    """*src* with axis 0 of its inputs and outputs named (free), shapes inside dropped;
    with *reshapes*, a Reshape to a batch of 1 reshapes to ``-1`` there instead."""
    model = onnx.load(src)
    stored = {t.name for t in model.graph.initializer}
    shapes = {n.input[1] for n in model.graph.node if n.op_type == "Reshape"} if reshapes else ()
    for t in model.graph.initializer:
        if t.name in shapes and t.dims[0] >= 2 and numpy_helper.to_array(t)[0] == 1:
            t.CopyFrom(numpy_helper.from_array(np.r_[-1, numpy_helper.to_array(t)[1:]], t.name))
    for v in [*model.graph.input, *model.graph.output]:
        if v.name not in stored:
            v.type.tensor_type.shape.dim[0].dim_param = "N"
    del model.graph.value_info[:]
    onnx.save(model, dst)
    return dst


class Teleported:
    def __init__(self, src: Path, tmp: Path, draws: int = 5, high: int = 64) -> None:
        self.src = src
        model = load_model(src)
        specs = onnx_frontend.input_specs(model)
        self.feeds = verify.draw_feed_sets(specs, draws, int_high={"ids": high})
        result = TeleportPass(seed=0)(model)
        self.rtol = verify.default_rtol(result.model)
        self.scales = result.tensor_scales()
        self.out = tmp / "t.onnx"
        save_model_atomic(result.model, self.out, external_data=True)

    def check(self, path: Path | None = None) -> verify.VerificationResult:
        return verify.verify_teleport(
            self.src, path or self.out, self.feeds, self.scales, self.rtol,
            by="pieces", block_bytes=4096,
        )  # fmt: skip


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Teleported:
    tmp = tmp_path_factory.mktemp("batch")
    src = _free_batch(FIXTURES / "resnet_tiny.onnx", tmp / "r.onnx", reshapes=True)
    return Teleported(src, tmp)


def test_sets_stack_all_but_the_first(resnet: Teleported) -> None:
    graph = onnx.load(resnet.src).graph
    sets = verify.pieces_sets(graph, resnet.feeds)
    assert len(sets) == 2 and sets[0] is resnet.feeds[0]
    stacked = np.concatenate([f["input"] for f in resnet.feeds[1:]])
    assert np.array_equal(sets[1]["input"], stacked)
    fixed = onnx.load(FIXTURES / "resnet_tiny.onnx").graph
    assert verify.pieces_sets(fixed, resnet.feeds) == list(resnet.feeds)
    assert verify.pieces_sets(graph, resnet.feeds[:2]) == list(resnet.feeds[:2])
    odd = [*resnet.feeds[:3], {"input": resnet.feeds[0]["input"][:, :, :8]}]
    assert verify.pieces_sets(graph, odd) == odd  # shapes differ


def test_batched_pieces_pass_with_fewer_runs(
    resnet: Teleported, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = {}
    for batched in (False, True):
        counting = CountingOpen()
        monkeypatch.setattr(verify, "open_proto", counting)
        monkeypatch.setattr(rows, "stackable", lambda proto, fed: None)  # the batch alone
        if not batched:
            monkeypatch.setattr(verify, "pieces_sets", lambda graph, sets: list(sets))
        result = resnet.check()
        monkeypatch.undo()
        assert result.passed, result.failures
        assert result.batched is batched and result.inputs == 5 and result.method == "pieces"
        found[batched] = (counting.runs, counting.widest, result)
    (one_by_one, w1, r1), (batched_runs, w2, r2) = found[False], found[True]
    assert (w1, w2) == (1, 4)
    # per block 2 × 5 draw runs become 2 × 2; the per-tensor check's runs are the same
    assert one_by_one - batched_runs == 6 * r1.blocks
    assert r2.tensors is not None and r1.tensors is not None
    assert r2.tensors.tensors == r1.tensors.tensors
    assert r2.max_rel_err == pytest.approx(r1.max_rel_err, rel=0.5, abs=1e-6)


def test_a_corrupted_teleport_fails_batched(resnet: Teleported, tmp_path: Path) -> None:
    model = load_model(resnet.out)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    weight = conv.inputs[1]
    assert weight is not None and weight.const_value is not None
    w = weight.const_value.numpy().copy()
    w[-1] *= 1.5  # the last output channel of the first Conv
    import onnx_ir as ir

    weight.const_value = ir.Tensor(w, name=weight.name)
    bad = tmp_path / "bad.onnx"
    save_model_atomic(model, bad, external_data=True)
    result = resnet.check(bad)
    assert result.batched and not result.passed
    assert any("block " in f for f in result.failures)


def test_a_batch_baked_into_the_graph_runs_one_by_one(tmp_path: Path) -> None:
    """The LLaMA generator reshapes to a fixed [1, T, heads, d]: with its input's axis 0
    declared free the batch does not run, and the draws run one by one."""
    src = tmp_path / "llama.onnx"
    make_llama(src, LlamaShape(layers=1, hidden=32, dtype="float32", vocab=64, seq=4))
    case = Teleported(_free_batch(src, tmp_path / "free.onnx"), tmp_path, draws=3)
    assert len(verify.pieces_sets(onnx.load(case.src).graph, case.feeds)) == 2
    result = case.check()
    assert result.passed and not result.batched and result.inputs == 3


def test_whole_and_pieces_agree_on_the_batch(resnet: Teleported) -> None:
    whole = verify.verify_teleport(
        resnet.src, resnet.out, resnet.feeds, resnet.scales, resnet.rtol, by="whole"
    )
    pieces = resnet.check()
    assert whole.passed and pieces.passed
    assert whole.batched and pieces.batched
    assert whole.to_dict()["batched"] and pieces.to_dict()["batched"]
    assert pieces.max_rel_err == pytest.approx(whole.max_rel_err, rel=0.5, abs=1e-6)


def test_the_first_draw_records_for_the_per_tensor_check(
    resnet: Teleported, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per block: 2 × 5 draw runs (one by one here: neither batch nor stacked rows) and
    3 for the per-tensor check — the original's first draw also gives the tensors the
    check records; without that (the check recording them itself, as when it takes
    several groups) 4, and the same findings."""
    found = []
    for merged in (True, False):
        counting = CountingOpen()
        monkeypatch.setattr(verify, "open_proto", counting)
        monkeypatch.setattr(verify, "pieces_sets", lambda graph, sets: list(sets))
        monkeypatch.setattr(rows, "stackable", lambda proto, fed: None)
        if not merged:
            monkeypatch.setattr(pieces, "recording_names", lambda orig, tele: None)
        result = resnet.check()
        monkeypatch.undo()
        assert result.passed and result.tensors is not None
        found.append((counting.runs, result))
    (runs, merged), (runs_alone, alone) = found
    assert runs == merged.blocks * (2 * 5 + 3)
    assert runs_alone == runs + merged.blocks
    assert merged.tensors is not None and alone.tensors is not None
    assert merged.tensors.to_dict() == alone.tensors.to_dict()
    assert merged.max_rel_err == alone.max_rel_err

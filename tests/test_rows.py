"""A block's input sets stacked along axis 0 (graphteleport.rows) and verification by
pieces using it on a fixed-batch model.

- Every block of a batch-1 LLaMA-shaped float16 model is stackable (its ``[1, T, H, D]``
  Reshapes rewritten to copy axis 0) and gives, bit for bit, each set's outputs, the
  tensors inside the block too (the per-tensor check records them from the stacked run).
- Graphs that mix rows are refused: a reduction over axis 0, Shape, a 2-D product of
  two row values, a Transpose moving axis 0, a Reshape whose first entry is not axis 0,
  a product with a constant of higher rank (its axes come first), a normalisation over
  axis 0.
- Pieces on the fixed-batch model: per block one draw run a model instead of one per
  draw, the same findings as one by one, and a corrupted teleport still fails.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import CountingOpen, run_ort
from onnx import TensorProto, helper, numpy_helper

from graphteleport import pieces, rows, verify
from graphteleport.io import load_model, save_model_atomic
from graphteleport.passes.teleport import TeleportPass
from graphteleport.tensorcheck import LoadedModel, sub_model
from models.llama import LlamaShape, make_llama

F32 = TensorProto.FLOAT


@pytest.fixture(scope="module")
def llama16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("rows") / "llama16.onnx"
    make_llama(src, LlamaShape(layers=2, hidden=64, dtype="float16", vocab=96, seq=5))
    return src


def _draws(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    return [{"ids": rng.integers(0, 96, (1, 5), dtype=np.int64)} for _ in range(n)]


def test_every_llama_block_stacks_bit_for_bit(llama16: Path) -> None:
    model = LoadedModel.load(llama16)
    sets = _draws(4)
    rewritten = 0
    for block in pieces.plan_blocks(model.proto.graph, 40_000):
        feeds = [{x: s[x] for x in block.inputs} for s in sets]
        inside = [y for k in block.nodes for y in model.proto.graph.node[k].output]
        outputs = list(dict.fromkeys([*block.outputs, *inside]))
        proto = sub_model(model, block.nodes, feeds[0], outputs, shaped=False, own_inputs=True)
        ready = rows.stackable(proto, feeds[0])
        assert ready is not None, block.describe(model.proto.graph, 0)
        rewritten += len(ready.proto.graph.initializer) - len(proto.graph.initializer)
        one = [verify.open_proto(proto, model.folder)(f) for f in feeds]
        stacked = rows.stack_rows(feeds, list(feeds[0]))
        assert stacked is not None
        ran = verify.open_proto(ready.proto, model.folder)(stacked)
        split = rows.split_rows(ran, outputs, ready.rows, 4)
        assert split is not None
        for alone, cut in zip(one, split, strict=True):
            assert [a.tobytes() for a in alone] == [np.ascontiguousarray(c).tobytes() for c in cut]
        for s, r in zip(sets, one, strict=True):
            s.update(zip(block.outputs, r[: len(block.outputs)], strict=True))
    assert rewritten == 2 * 4  # per layer: the q, k, v head splits and the merge


def test_a_split_refuses_rows_of_the_wrong_size() -> None:
    """A row value whose axis 0 is not the sets' count times its size on one set (or
    does not divide) is not cut; a constant-derived value is every set's."""
    a = np.zeros((6, 2), np.float32)
    assert rows.split_rows([a], ["y"], {"y": 2}, 3) is not None
    assert rows.split_rows([a], ["y"], {"y": 3}, 3) is None
    assert rows.split_rows([a], ["y"], {"y": None}, 4) is None
    (first, *_), *_ = split = rows.split_rows([a, a], ["y", "c"], {"y": None}, 2) or [[]]
    assert first.shape == (3, 2) and all(s[1] is a for s in split)


def _one_node_model(node: onnx.NodeProto, x_shape: list[int], inits: dict[str, np.ndarray]):
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", F32, None)],
        [helper.make_tensor_value_info("y", F32, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {"x": np.ones(x_shape, np.float32)}


@pytest.mark.parametrize(
    ("node", "shape", "inits"),
    [
        (helper.make_node("ReduceMean", ["x", "ax"], ["y"]), [2, 3], {"ax": np.array([0])}),
        (helper.make_node("Shape", ["x"], ["y"]), [2, 3], {}),
        (helper.make_node("MatMul", ["x", "x"], ["y"]), [3, 3], {}),
        (helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2]), [1, 2, 3], {}),
        (helper.make_node("Reshape", ["x", "s"], ["y"]), [1, 4, 3], {"s": np.array([2, 2, 3])}),
        (helper.make_node("Softmax", ["x"], ["y"], axis=0), [2, 3], {}),
        (helper.make_node("Expand", ["x", "s"], ["y"]), [1, 3], {"s": np.array([2, 3])}),
        (helper.make_node("MatMul", ["x", "w"], ["y"]), [4, 3], {"w": np.ones((1, 3, 2))}),
        (helper.make_node("LpNormalization", ["x"], ["y"], axis=0), [4, 3], {}),
        (
            helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1),
            [1, 2, 3],
            {"s": np.array([1, 0, 6])},
        ),
    ],
)
def test_what_mixes_rows_is_refused(
    node: onnx.NodeProto, shape: list[int], inits: dict[str, np.ndarray]
) -> None:
    typed = {k: v.astype(np.float32 if v.dtype.kind == "f" else np.int64) for k, v in inits.items()}
    model, fed = _one_node_model(node, shape, typed)
    assert rows.stackable(model, fed) is None


def test_row_preserving_nodes_are_accepted() -> None:
    w = np.ones((3, 4), np.float32)
    model, fed = _one_node_model(helper.make_node("MatMul", ["x", "w"], ["y"]), [1, 2, 3], {"w": w})
    accepted = rows.stackable(model, fed)
    assert accepted is not None and accepted.proto is model  # nothing to rewrite
    s = np.array([1, 6], np.int64)
    model, fed = _one_node_model(
        helper.make_node("Reshape", ["x", "s"], ["y"]), [1, 2, 3], {"s": s}
    )
    ready = rows.stackable(model, fed)
    assert ready is not None and ready.proto is not model
    new = [numpy_helper.to_array(t) for t in ready.proto.graph.initializer if t.name != "s"]
    assert [a.tolist() for a in new] == [[0, 6]]


@pytest.fixture(scope="module")
def teleported(llama16: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    result = TeleportPass(seed=0)(load_model(llama16))
    out = tmp_path_factory.mktemp("rows_t") / "t.onnx"
    save_model_atomic(result.model, out, external_data=True)
    return out, result


def _check(src: Path, out: Path, result: Any, monkeypatch: pytest.MonkeyPatch, stack: bool):
    counting = CountingOpen()
    monkeypatch.setattr(verify, "open_proto", counting)
    if not stack:
        monkeypatch.setattr(rows, "stackable", lambda proto, fed: None)
    found = verify.verify_teleport(
        src, out, _draws(6), result.tensor_scales(), 1e-2, by="pieces", block_bytes=40_000
    )
    monkeypatch.undo()
    return counting.runs, found


def test_pieces_stack_the_draws_of_a_fixed_batch_model(
    llama16: Path, teleported: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, result = teleported
    (runs, stacked), (runs_alone, alone) = (
        _check(llama16, out, result, monkeypatch, stack) for stack in (True, False)
    )
    assert stacked.passed and alone.passed and not stacked.batched
    # 2 × 6 draw runs -> 2 × 1, and the teleported cut model's two passes -> 1
    assert runs_alone - runs == stacked.blocks * (2 * (6 - 1) + 1)
    assert stacked.max_rel_err == alone.max_rel_err  # the same bits, stacked or not
    assert stacked.tensors is not None and alone.tensors is not None
    assert stacked.tensors.to_dict() == alone.tensors.to_dict()


def test_a_corrupted_teleport_fails_stacked(
    llama16: Path, teleported: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, result = teleported
    model = load_model(teleported[0])
    init = model.graph.initializers["layers.1.mlp.down.weight"]
    w = init.const_value.numpy().copy()  # type: ignore[union-attr]
    w[:, 7] = -w[:, 7]  # one output neuron of the last MLP negated
    import onnx_ir as ir

    init.const_value = ir.Tensor(w, name=init.name)
    bad = tmp_path / "bad.onnx"
    save_model_atomic(model, bad, external_data=True)
    _, found = _check(llama16, bad, result, monkeypatch, stack=True)
    assert not found.passed
    assert any("block " in f for f in found.failures)
    assert found.tensors is not None and not found.tensors.passed  # the stacked cut passes too


def test_a_torch_style_reshape_with_allowzero_is_stacked_bit_for_bit() -> None:
    """torch's exporter writes ``allowzero=1``: a shape without zeros is the same
    reshape either way, so it is rewritten to copy axis 0 (and the attribute cleared);
    the stacked run gives each set's rows."""
    node = helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)
    model, fed = _one_node_model(node, [1, 2, 3], {"s": np.array([1, 6], np.int64)})
    ready = rows.stackable(model, fed)
    assert ready is not None
    (reshape,) = ready.proto.graph.node
    assert not [a for a in reshape.attribute if a.name == "allowzero"]
    rng = np.random.default_rng(0)
    sets = [{"x": rng.standard_normal((1, 2, 3)).astype(np.float32)} for _ in range(3)]
    run = functools.partial(run_ort, ready.proto)
    one = [run(f) for f in sets]
    stacked = rows.stack_rows(sets, ["x"])
    assert stacked is not None
    split = rows.split_rows(run(stacked), ["y"], ready.rows, 3)
    assert split is not None
    for alone, cut in zip(one, split, strict=True):
        assert [a.tobytes() for a in alone] == [np.ascontiguousarray(c).tobytes() for c in cut]

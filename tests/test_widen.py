"""float16 weights widened once for onnxruntime's CPU provider (graphteleport.widen).

- The rewritten proto computes the same bits as the plain one: tiny graphs where a
  widened MatMul/Gemm feeds or is fed by an op with a float16 kernel (onnxruntime's
  isolated-node rule), and every block of a LLaMA-shaped float16 model.
- A weight also read by an op with a float16 kernel (Gather), a small weight, a float32
  model: left as they are.
- External data: read from the file, once per block however many sessions use it, and
  two files' tensors of the same name are told apart.
- Verification by pieces with and without widening gives the same outputs and errors.
- Buffers are reused: a dropped copy's memory serves the next copy of its size, never
  while something else holds it, and spares stay within the budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphteleport import halfcast, verify, widen
from graphteleport.errors import InputError
from graphteleport.io import load_model, save_model_atomic
from graphteleport.passes.teleport import TeleportPass
from graphteleport.pieces import PiecesResult, plan_blocks, verify_blocks
from graphteleport.tensorcheck import LoadedModel, sub_model
from models.llama import LlamaShape, make_llama

F16 = TensorProto.FLOAT16


def _model(
    nodes: list[onnx.NodeProto], inits: list[np.ndarray], names: list[str]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F16, [2, 3, 64])],
        [helper.make_tensor_value_info("y", F16, None)],
        [numpy_helper.from_array(a, n) for a, n in zip(inits, names, strict=True)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _bits(arrays: list[np.ndarray]) -> list[bytes]:
    return [np.ascontiguousarray(a).tobytes() for a in arrays]


def _both(proto: onnx.ModelProto, folder: str, feeds: dict[str, np.ndarray], min_elements: int):
    plain = verify.open_proto(proto, folder)(feeds)
    wide = widen.Widened(min_elements)
    got = wide.opener(verify.open_proto)(proto, folder)(feeds)
    return plain, got, wide


def _rng_half(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float16)


def test_casting_ops_are_those_without_a_float16_kernel() -> None:
    ops = widen.casting_ops()
    assert {"MatMul", "Gemm"} <= ops
    assert not {"Gather", "Transpose", "Cast", "Reshape"} & ops


def test_onnxruntime_reads_the_widened_weight_without_a_cast(tmp_path: Path) -> None:
    """The point of it all: in the graph onnxruntime runs (saved after its transformers),
    no Cast of the weight is left; the plain graph casts it on every run."""
    import onnxruntime as ort

    w = _rng_half(np.random.default_rng(4), 64, 96)
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [w], ["w"])
    ran = []
    for p in (proto, widen.widen_proto(proto, 1)[0]):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(tmp_path / "ran.onnx")
        ort.InferenceSession(p.SerializeToString(), options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(tmp_path / "ran.onnx").graph.node
        ran.append({x for n in nodes if n.op_type == "MatMul" for x in n.input})
    casts_of_w = [n for n in nodes if n.op_type == "Cast" and n.input[0].startswith("w")]
    assert "w" not in ran[0] and "w__gt_wide" in ran[1] and not casts_of_w


def test_widened_chain_is_bit_identical_around_isolated_nodes() -> None:
    """MatMul → Transpose → MatMul → Transpose → Gemm: onnxruntime runs each Transpose
    (which has a float16 kernel) in float32 when both its neighbours need Casts; the
    widened graph must keep that decision, and the float32 accumulations."""
    rng = np.random.default_rng(0)
    w1, w2, w3 = _rng_half(rng, 64, 96), _rng_half(rng, 3, 5), _rng_half(rng, 64, 96)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1]),  # [2, 96, 3]
        helper.make_node("MatMul", ["b", "w2"], ["c"]),  # [2, 96, 5]
        helper.make_node("Transpose", ["c"], ["d"], perm=[0, 2, 1]),  # [2, 5, 96]
        helper.make_node("Reshape", ["d", "shape"], ["e"]),  # [10, 96]
        helper.make_node("Gemm", ["e", "w3"], ["y"], transB=1),  # [10, 64]
    ]
    proto = _model(nodes, [w1, w2, w3, np.array([10, 96], np.int64)], ["w1", "w2", "w3", "shape"])
    feeds = {"x": _rng_half(rng, 2, 3, 64) * np.float16(8)}
    plain, got, wide = _both(proto, ".", feeds, min_elements=15)
    assert wide.widened == 3
    assert _bits(plain) == _bits(got)
    rewritten, chosen = widen.widen_proto(proto, 15)
    assert sorted(t.name for t in chosen) == ["w1", "w2", "w3"]
    assert [n.op_type for n in rewritten.graph.node[:3]] == ["Cast"] * 3
    assert {t.name for t in rewritten.graph.initializer} == {"shape"}


def test_shared_small_and_float32_weights_are_left_alone() -> None:
    rng = np.random.default_rng(1)
    table, small = _rng_half(rng, 64, 64), _rng_half(rng, 64, 2)
    nodes = [
        helper.make_node("MatMul", ["x", "table"], ["a"]),
        helper.make_node("Gather", ["table", "ids"], ["g"], axis=0),  # a float16 kernel
        helper.make_node("Add", ["a", "g"], ["b"]),
        helper.make_node("MatMul", ["b", "small"], ["y"]),
    ]
    proto = _model(nodes, [table, small, np.array([1, 2, 0], np.int64)], ["table", "small", "ids"])
    assert widen.widen_proto(proto, 200) == (proto, [])  # shared; small under the floor
    plain, got, wide = _both(proto, ".", {"x": _rng_half(rng, 2, 3, 64)}, 200)
    assert wide.widened == 0 and _bits(plain) == _bits(got)
    as32 = onnx.ModelProto()
    as32.CopyFrom(proto)
    for t in as32.graph.initializer:
        if t.data_type == F16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    assert widen.widen_proto(as32, 1)[1] == []


def _external_matmuls(tmp_path: Path, rng: np.random.Generator) -> list[onnx.ModelProto]:
    """Two one-MatMul float16 models, each weight in its own external data file, loaded
    without their data (as the pieces' blocks are)."""
    protos = []
    for k in range(2):
        w = _rng_half(rng, 64, 64)
        proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [w], ["w"])
        onnx.save(proto, tmp_path / f"m{k}.onnx", save_as_external_data=True,
                  location=f"m{k}.data", size_threshold=0)  # fmt: skip
        protos.append(onnx.load(tmp_path / f"m{k}.onnx", load_external_data=False))
    return protos


def test_external_weights_are_read_once_per_block_and_told_apart(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    protos = _external_matmuls(tmp_path, rng)
    feeds = {"x": _rng_half(rng, 2, 3, 64)}
    wide = widen.Widened(16)
    open_model = wide.opener(verify.open_proto)
    for proto in protos:
        plain = verify.open_proto(proto, str(tmp_path))(feeds)
        for _ in range(2):  # a second session of the same block reuses the array
            assert _bits(open_model(proto, str(tmp_path))(feeds)) == _bits(plain)
    assert wide.widened == 2
    assert wide.nbytes == 2 * 64 * 64 * 4
    wide.clear()
    assert wide.nbytes == 0


@pytest.fixture(scope="module")
def llama16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("widen") / "llama16.onnx"
    make_llama(src, LlamaShape(layers=2, hidden=64, dtype="float16", vocab=96, seq=5))
    return src


def test_every_block_of_a_float16_llama_is_bit_identical(llama16: Path) -> None:
    model = LoadedModel.load(llama16)
    state = {"ids": np.random.default_rng(3).integers(0, 96, (1, 5), dtype=np.int64)}
    widened = 0
    for block in plan_blocks(model.proto.graph, 40_000):
        fed = {x: state[x] for x in block.inputs}
        proto = sub_model(model, block.nodes, fed, block.outputs, shaped=False, own_inputs=True)
        plain, got, wide = _both(proto, model.folder, fed, min_elements=1024)
        assert _bits(plain) == _bits(got), block.describe(model.proto.graph, 0)
        widened += wide.widened
        state.update(zip(block.outputs, plain, strict=True))
    assert widened == 2 * 7 + 1  # every layer's 7 projections and the head; not the embedding


def test_verification_by_pieces_is_the_same_with_widening(llama16: Path, tmp_path: Path) -> None:
    result = TeleportPass(seed=0)(load_model(llama16))
    out = tmp_path / "t.onnx"
    save_model_atomic(result.model, out, external_data=True)
    feeds = [
        {"ids": np.random.default_rng(k).integers(0, 96, (1, 5), dtype=np.int64)} for k in range(2)
    ]
    scales = result.tensor_scales()

    def check(widen_elements: int | None) -> PiecesResult:
        return verify_blocks(
            str(llama16), str(out), feeds, scales, verify.open_proto,
            rtol=1e-2, budget_bytes=40_000, widen_elements=widen_elements,
        )  # fmt: skip

    plain, wide = check(None), check(1024)
    assert not plain.failures and plain.tensors is not None and plain.tensors.passed
    assert wide.max_rel_err == plain.max_rel_err > 0
    assert wide.tensors is not None and wide.tensors.max_rel_err == plain.tensors.max_rel_err
    for a, b in zip(plain.candidate, wide.candidate, strict=True):
        assert _bits(a) == _bits(b)


def test_a_corrupted_widened_weight_still_fails(llama16: Path, tmp_path: Path) -> None:
    """The widened path reads the teleported file's own bytes: a weight changed there
    is seen (not a cached copy of the original's)."""
    result = TeleportPass(seed=0)(load_model(llama16))
    model = result.model
    init = model.graph.initializers["layers.1.mlp.up.weight"]
    w = init.const_value.numpy().copy()  # type: ignore[union-attr]
    w[3, 5] = np.float16(w[3, 5] * 3 + 1)
    import onnx_ir as ir

    init.const_value = ir.Tensor(w, name=init.name)
    out = tmp_path / "bad.onnx"
    save_model_atomic(model, out, external_data=True)
    feeds = [{"ids": np.arange(5, dtype=np.int64)[None]}]
    found = verify_blocks(str(llama16), str(out), feeds, result.tensor_scales(), verify.open_proto,
                          rtol=1e-2, budget_bytes=40_000, widen_elements=1024)  # fmt: skip
    assert found.failures or (found.tensors is not None and not found.tensors.passed)


def test_every_float16_value_widens_exactly(tmp_path: Path) -> None:
    """Every float16 bit pattern (subnormals, infinities, NaN included) of a weight read
    from its file widens exactly."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    half = np.tile(bits, 17)[: (1 << 20) + 3].view(np.float16).reshape(-1, 1)
    proto = _model([], [half], ["w"])
    onnx.save(proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)  # fmt: skip
    tensor = onnx.load(tmp_path / "m.onnx", load_external_data=False).graph.initializer[0]
    wide = widen.Widened(1).array(tensor, str(tmp_path))
    expected = half.astype(np.float32)
    assert wide.dtype == np.float32 and wide.shape == half.shape
    assert np.array_equal(wide, expected, equal_nan=True)
    assert np.array_equal(np.isnan(wide), np.isnan(expected))


def test_a_budget_keeps_the_copies_within_it(tmp_path: Path) -> None:
    """Two models' weights where one fits the budget: each session's weights are made
    again after the other's (the least recently used dropped), never more held, and the
    outputs are the same bits."""
    rng = np.random.default_rng(6)
    feeds = {"x": _rng_half(rng, 2, 3, 64)}
    protos = _external_matmuls(tmp_path, rng)
    plain = [verify.open_proto(p, str(tmp_path))(feeds) for p in protos]
    wide = widen.Widened(16, budget_bytes=64 * 64 * 4)
    runs = [wide.opener(verify.open_proto)(p, str(tmp_path)) for p in protos]
    for _ in range(2):
        for run, expected in zip(runs, plain, strict=True):
            assert _bits(run(feeds)) == _bits(expected)
            assert wide.nbytes <= 64 * 64 * 4
    assert wide.widened == 4  # each model's weight made twice: the other's dropped it


def test_an_interrupt_inside_the_conversion_is_not_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM raised (by the CLI's handler) inside the Cast run that widens a memory-
    mapped weight reaches the CLI as itself — exit 143, no partial output — not as the
    map's ``BufferError`` (an internal error, exit 3: seen at 1 of 3 delays on a 2-layer
    float16 LLaMA before ``wire.mapped``)."""
    (proto,) = _external_matmuls(tmp_path, np.random.default_rng(7))[:1]

    def interrupted(half: np.ndarray, out: np.ndarray) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(halfcast, "chosen", lambda: halfcast.Casts("interrupted", interrupted))
    with pytest.raises(KeyboardInterrupt):
        widen.Widened(1).array(proto.graph.initializer[0], str(tmp_path))


def _tensors(tmp_path: Path) -> list[onnx.TensorProto]:
    return [p.graph.initializer[0] for p in _external_matmuls(tmp_path, np.random.default_rng(8))]


def test_a_dropped_copy_lends_its_memory_to_the_next_copy(tmp_path: Path) -> None:
    """After :meth:`clear` the next copy is written where the last one was (the pool's
    memory, already written): no fresh memory, the right values."""
    a, b = _tensors(tmp_path)
    wide = widen.Widened(16, budget_bytes=2 * 64 * 64 * 4)
    first = wide.array(a, str(tmp_path))
    pointer = first.ctypes.data
    del first
    wide.clear()
    assert wide.nbytes == 0 and wide.pool_bytes == 2 * 64 * 64 * 4
    second = wide.array(b, str(tmp_path))
    assert second.ctypes.data == pointer  # the same memory
    assert np.array_equal(second, widen.Widened(1).array(b, str(tmp_path)))
    assert (wide.widened, wide.fresh) == (2, 1)


def test_a_buffer_held_elsewhere_is_never_reused(tmp_path: Path) -> None:
    a, b = _tensors(tmp_path)
    for budget in (None, 64 * 64 * 4):  # dropped by clear, or for room
        wide = widen.Widened(16, budget_bytes=budget)
        held = wide.array(a, str(tmp_path))
        before = held.copy()
        if budget is None:
            wide.clear()
        other = wide.array(b, str(tmp_path))
        assert not np.shares_memory(held, other)
        assert np.array_equal(held, before)  # untouched
        assert not np.array_equal(held, other)


def _small(tmp_path: Path, n: int) -> tuple[onnx.TensorProto, np.ndarray]:
    small = np.random.default_rng(n).standard_normal((n, 64)).astype(np.float16)
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [small.T.copy()], ["w"])
    onnx.save(proto, tmp_path / f"s{n}.onnx", save_as_external_data=True,
              location=f"s{n}.data", size_threshold=0)  # fmt: skip
    loaded = onnx.load(tmp_path / f"s{n}.onnx", load_external_data=False)
    return loaded.graph.initializer[0], small.T.astype(np.float32)


def test_copies_of_other_sizes_share_the_pool_without_fresh_memory(tmp_path: Path) -> None:
    """Blocks of different shapes (one large copy, then two of half its size, then the
    large one again) are written into the same pool: one fresh write (its first), the
    right values, and the copies of one block never overlap."""
    big, small = _small(tmp_path, 64), [_small(tmp_path, 32), _small(tmp_path, 31)]
    wide = widen.Widened(16, budget_bytes=64 * 64 * 4)
    for _ in range(2):
        assert np.array_equal(wide.array(big[0], str(tmp_path)), big[1])
        wide.clear()
        got = [wide.array(t, str(tmp_path)) for t, _ in small]
        assert not np.shares_memory(got[0], got[1])
        for g, (_, expected) in zip(got, small, strict=True):
            assert np.array_equal(g, expected)
        del got, g  # nothing holds the copies: their room is free again
        wide.clear()
    assert (wide.widened, wide.fresh, wide.pool_bytes) == (6, 1, 64 * 64 * 4)


def test_the_pool_leaves_which_copies_are_dropped_unchanged(tmp_path: Path) -> None:
    """With or without free room in the pool, the same copies are converted: where the
    pool has no free extent (a copy held elsewhere keeps its own), fresh memory."""
    big, half = _small(tmp_path, 64), _small(tmp_path, 32)
    wide = widen.Widened(16, budget_bytes=64 * 64 * 4)
    held = wide.array(big[0], str(tmp_path))
    got = wide.array(half[0], str(tmp_path))  # drops the big copy (budget), held here
    assert not np.shares_memory(held, got) and np.array_equal(held, big[1])
    assert np.array_equal(got, half[1]) and (wide.widened, wide.fresh) == (2, 2)
    del held
    wide.clear()
    again = wide.array(big[0], str(tmp_path))  # the big copy's extent is free again
    assert np.array_equal(again, big[1]) and (wide.widened, wide.fresh) == (3, 2)


def test_a_weight_holding_nan_payloads_runs_as_onnxruntimes_own_cast() -> None:
    """The widened copy stands for onnxruntime's own ``Cast₃₂(W)``: a weight holding NaNs
    of several payloads (quiet and signalling, both signs) and infinities gives the plain
    session's output bits."""
    rng = np.random.default_rng(9)
    w = _rng_half(rng, 64, 96)
    bits = w.view(np.uint16)
    nans = [0x7C01, 0x7D55, 0x7E00, 0x7FFF, 0xFC01, 0xFE00, 0x7C00, 0xFC00]  # (+-inf last)
    for k, pattern in enumerate(nans):
        bits[k, 3 * k] = pattern
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [w], ["w"])
    feeds = {"x": _rng_half(rng, 2, 3, 64)}
    plain, got, wide = _both(proto, ".", feeds, 1)
    assert wide.widened == 1 and np.isnan(plain[0]).any()
    assert _bits(got) == _bits(plain)


def test_a_data_file_that_ends_early_is_one_line_naming_the_weight(tmp_path: Path) -> None:
    """A weight whose external bytes run past the end of its data file (truncated after
    the model was written) is an :class:`InputError` naming it, not a short copy."""
    (a, _) = _tensors(tmp_path)
    data = tmp_path / "m0.data"
    data.write_bytes(data.read_bytes()[:1000])  # 64 × 64 float16 need 8192 bytes
    with pytest.raises(InputError, match="the data file of weight 'w' ends before its bytes"):
        widen.Widened(1).array(a, str(tmp_path))

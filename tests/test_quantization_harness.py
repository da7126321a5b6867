"""The quantization benchmark's measuring functions (experiments/quantization.py) on toy
arrays and a tiny graph: SQNR (over every element, or at attended positions where the
feeds carry a padding mask), FP32 error, the share of weights moved, Constant weights
presented to the quantizer as initializers, and the CTC decoding of the OCR metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_ort
from onnx import TensorProto, helper, numpy_helper

from experiments.quant_interval import sample_noise
from experiments.quant_models import ctc_decode, mean_cosine
from experiments.quantization import (
    constants_to_initializers,
    every_element_sentences,
    invocation,
    masked,
    max_rel_err,
    merge_files,
    moved_fraction,
    quantize,
    sqnr_db,
    table,
    weight_tensors,
)


def test_sqnr_is_signal_over_noise_in_db_over_all_outputs() -> None:
    ref = [np.array([3.0, 4.0]), np.array([[0.0]])]  # Σ r² = 25
    got = [np.array([3.0, 3.0]), np.array([[2.0]])]  # Σ e² = 1 + 4 = 5
    assert sqnr_db(ref, got) == pytest.approx(10 * math.log10(5.0))
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db([np.ones(4)], [np.full(4, 1.1)]) == pytest.approx(20.0)


def _padded() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Feeds of 2 lines x 3 tokens, the last token of the first line and the last two of
    the second padding, and a hidden state ``[2, 3, 2]`` of ones."""
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    return {"input_ids": np.zeros((2, 3), np.int64), "attention_mask": mask}, np.ones((2, 3, 2))


def test_sqnr_with_a_padding_mask_counts_attended_positions_only() -> None:
    feeds, ref = _padded()
    got = ref.copy()
    got[0, 2] += 5.0  # padding only: every element differs in no attended position
    got[1, 1:] -= 3.0
    assert masked(feeds, [ref])
    assert sqnr_db([ref], [got], feeds) == math.inf
    assert sqnr_db([ref], [got]) == pytest.approx(10 * math.log10(12 / (2 * 25 + 4 * 9)))
    got[0, 0, 1] = 1.5  # one attended element off by 0.5: signal 3 positions x 2 = 6
    assert sqnr_db([ref], [got], feeds) == pytest.approx(10 * math.log10(6 / 0.25))


def test_sqnr_counts_every_element_of_an_output_the_mask_does_not_index() -> None:
    """A pooled output ``[batch, 2]`` (its second axis is no token axis), or feeds without
    an ``attention_mask``: every element counts, as without feeds."""
    feeds, _ = _padded()
    ref, got = np.ones((2, 2)), np.array([[1.0, 1.0], [1.0, 2.0]])
    assert not masked(feeds, [ref])
    assert sqnr_db([ref], [got], feeds) == pytest.approx(10 * math.log10(4.0))
    hidden = np.ones((2, 3, 2))
    plain = {"input_ids": feeds["input_ids"]}
    assert not masked(plain, [hidden])
    assert sqnr_db([hidden], [hidden * 1.1], plain) == pytest.approx(20.0)


def test_interval_sample_noise_leaves_padding_out() -> None:
    feeds, ref = _padded()
    got = ref.copy()
    got[0, 2] += 5.0  # padding
    got[1, 0, 0] += 0.5  # attended
    assert sample_noise([ref], [got], feeds) == pytest.approx([0.0, 0.25])
    assert sample_noise([ref], [got]) == pytest.approx([50.0, 0.25])


def _masked_entry() -> dict:
    """A model entry as the harness writes it for a model with a padding mask: auto ahead
    of per-channel at attended positions, behind it over every element."""

    def row(variant: str, label: str, attended: float, every: float) -> dict:
        r = {"variant": variant, "label": label, "status": "ok", "sqnr_db": attended}
        return r | {"sqnr_all_db": every, "metric": 0.9, "moved": 0.0, "fp32_rel_err": 0.0}

    rows = [row("int8", "as is", 7.0, 5.0), row("int8_pc", "per-channel", 8.3, 6.65)]
    rows.append(row("gt_auto", "auto", 18.5, 5.38))
    rows.append(row("aimet", "a peer", 7.0, 4.97))
    rows.append(row("quark_relu", "a peer changing FP32", 7.0, 9.0) | {"fp32_rel_err": 0.1})
    return {"metric_name": "embedding cosine", "sqnr_counts": "attended positions", "rows": rows}


def test_the_document_shows_the_every_element_sqnr_beside_the_attended_one() -> None:
    text = table({"minilm": _masked_entry()})
    assert "minilm (embedding cosine; SQNR at attended positions) | auto | 18.50 | 5.38 |" in text
    (line,) = every_element_sentences({"minilm": _masked_entry()})
    assert "scores 5.38 dB: ≥ as is: yes (+0.38); ≥ per-channel: **no** (-1.27)" in line
    assert "≥ every peer: yes (+0.41) (a peer, 4.97)" in line  # not the one changing FP32
    plain = _masked_entry() | {"sqnr_counts": "every element", "metric_name": "accuracy"}
    assert "| auto | 18.50 |  | 0.9 |" in table({"cnn": plain})
    assert every_element_sentences({"cnn": plain}) == []


def test_max_rel_err_is_per_output_and_takes_the_worst() -> None:
    ref = [np.array([10.0, -2.0]), np.array([1.0])]
    got = [np.array([10.0, -1.0]), np.array([1.5])]
    assert max_rel_err(ref, got) == pytest.approx(0.5)  # 0.1 on the first, 0.5 on the second


def _conv_conv(constant_weight: bool = False) -> onnx.ModelProto:
    """x → Conv(w1, b1) → Relu → Conv(w2) → MatMul(x2, act) : a weight, a bias, a MatMul of
    two activations (no weight)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 2, 1, 1)).astype(np.float32)
    w1[0] *= 30.0  # one channel far larger: the imbalance per-tensor INT8 suffers from
    b1 = rng.standard_normal(4).astype(np.float32)
    w2 = rng.standard_normal((3, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y0"]),
        helper.make_node("MatMul", ["y0", "y0"], ["y"]),
    ]
    inits = [numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
    if constant_weight:
        nodes.insert(0, helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1)))
    else:
        inits.append(numpy_helper.from_array(w1, "w1"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 3, 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_weight_tensors_skip_biases_and_activation_matmuls() -> None:
    names = [n for n, _ in weight_tensors(_conv_conv())]
    assert names == ["w1", "w2"]


def test_moved_fraction_counts_changed_elements() -> None:
    before = weight_tensors(_conv_conv())
    after = [(n, a.copy()) for n, a in before]
    assert moved_fraction(before, after) == 0.0
    after[0][1][0] *= 2.0  # 2 of the 8 + 12 elements
    assert moved_fraction(before, after) == pytest.approx(2 / 20)
    renamed = [("other", a) for _, a in after[::-1]]  # reordered, renamed: no pairing
    assert moved_fraction(before, renamed) is None
    by_name = list(after[::-1])  # reordered, same names: paired by name
    assert moved_fraction(before, by_name) == pytest.approx(2 / 20)


def test_constant_weights_become_initializers_and_count_as_weights() -> None:
    model = _conv_conv(constant_weight=True)
    assert [n for n, _ in weight_tensors(model)] == ["w2"]  # the quantizer sees one weight
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 2, 3, 3)).astype(np.float32)}
    (before,) = run_ort(model, feeds)
    assert constants_to_initializers(model) == 1
    assert all(n.op_type != "Constant" for n in model.graph.node)
    assert [n for n, _ in weight_tensors(model)] == ["w1", "w2"]
    (after,) = run_ort(model, feeds)
    np.testing.assert_array_equal(before, after)


def test_quantize_static_per_channel_beats_per_tensor_on_an_imbalanced_conv(
    tmp_path: Path,
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_conv_conv(), str(src))
    rng = np.random.default_rng(2)
    calib = {"x": rng.standard_normal((16, 2, 3, 3)).astype(np.float32)}
    held = {"x": rng.standard_normal((16, 2, 3, 3)).astype(np.float32)}
    (ref,) = run_ort(onnx.load(str(src)), held)
    sqnr = {}
    for per_channel in (False, True):
        dst = tmp_path / f"q{per_channel}.onnx"
        quantize(src, dst, calib, per_channel)
        ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        (got,) = run_ort(onnx.load(str(dst)), held)
        sqnr[per_channel] = sqnr_db([ref], [got])
    assert 10.0 < sqnr[False] < sqnr[True] < math.inf


def test_ctc_decode_merges_repeats_and_drops_blanks() -> None:
    chars = ["blank", "a", "b", " "]
    steps = [1, 1, 0, 1, 2, 2, 3, 0]  # a a _ a b b ' ' _  →  "aab "
    probs = np.eye(4)[steps][None]
    assert ctc_decode(probs, chars) == ["aab "]


def test_mean_cosine() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0]])
    assert mean_cosine(a, b) == pytest.approx(0.0)  # (1 + −1) / 2


def test_a_tool_that_exits_1_without_writing_is_not_measured_on_an_old_file(
    tmp_path: Path,
) -> None:
    """An exit 1 counts as "written, the tool's own check failed" only where this run
    wrote the model: a file left by an earlier run is not measured in its place."""
    import sys

    from experiments.quantization import ToolFailed, run_tool

    dst = tmp_path / "m.onnx"
    dst.write_bytes(b"from an earlier run")
    fail = [sys.executable, "-c", "import sys; sys.exit(1)"]
    with pytest.raises(ToolFailed, match="exit 1"):
        run_tool(fail, {}, tmp_path, dst)
    assert not dst.exists()
    write = f"import pathlib, sys; pathlib.Path({str(dst)!r}).write_bytes(b'm'); sys.exit(1)"
    assert run_tool([sys.executable, "-c", write], {}, tmp_path, dst).startswith("exit 1")


def test_merge_files_describes_both_runs(tmp_path: Path) -> None:
    """A run merged in with ``--merge-from``: its rows replace the same variants', its
    time, models and row counts add to the invocation line's."""

    def results(models: list[str], seconds: float, measured: int, cached: int) -> dict:
        rows = [{"variant": "gt_auto", "fp32_rel_err": 0.0, "sqnr_db": seconds}]
        meta = {"date": "d", "seconds": seconds, "rows_measured": measured}
        meta |= {"rows_cached": cached, "models_run": models}
        return {"meta": meta, "models": {m: {"rows": rows} for m in models}}

    into, other = tmp_path / "a.json", tmp_path / "b.json"
    into.write_text(json.dumps(results(["ocr_rec"], 10.0, 1, 13)))
    other.write_text(json.dumps(results(["ocr_cls", "ocr_rec"], 20.0, 40, 16)))
    merge_files(into, other)
    merged = json.loads(into.read_text())
    assert merged["models"]["ocr_rec"]["rows"][0]["sqnr_db"] == 20.0
    line = invocation(merged["meta"])
    assert "models ocr_rec, ocr_cls" in line and "took 30 s (with a run merged" in line
    assert "41 rows measured, 29 from" in line

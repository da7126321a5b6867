"""The per-tensor check's fast paths (issue 15): cut models that read their weights from
the model file, and the peak of ``s ⊙ x`` without the product, give what the slow
paths give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from test_wire import rich_model

from graphteleport import tensorcheck
from graphteleport.tensorcheck import LoadedModel, TensorScales, recording_model, tolerance_scale
from graphteleport.verify import open_proto


def test_cut_models_read_weights_from_the_file(tmp_path: Path) -> None:
    """The per-tensor check's models carry references to the weights' bytes in the model
    file, and onnxruntime computes with them what it computes with the weights inline; a
    model that is a link into another folder keeps them inline (onnxruntime refuses
    data outside the model's folder)."""
    path = tmp_path / "rich.onnx"
    onnx.save(rich_model(), path)
    loaded = LoadedModel.load(path)
    big = loaded.initializers["w_f32"]
    assert big.data_location == TensorProto.EXTERNAL and not big.HasField("raw_data")
    assert loaded.initializers["small"].HasField("raw_data")  # small ones stay inline
    x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    light = recording_model(loaded, ["a", "b"])
    assert light.ByteSize() < 20_000  # kilobytes, not the weights
    got = open_proto(light, loaded.folder)({"x": x})
    inline = onnx.load(path)
    inline.graph.output.extend([onnx.ValueInfoProto(name="a"), onnx.ValueInfoProto(name="b")])
    want = open_proto(inline, str(tmp_path))({"x": x})
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "link.onnx").symlink_to(path)
    linked = LoadedModel.load(other / "link.onnx")
    assert linked.initializers["w_f32"].HasField("raw_data")


def test_scales_peak_is_the_products_peak() -> None:
    """``TensorScales.peak`` (no product formed) gives exactly what the product gives, also
    with NaN/inf in the tensor or in ``s``, complex values, or an ``s`` wider than x."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 8, 5, 5)) * rng.uniform(0.1, 30, (1, 8, 1, 1))).astype(np.float32)
    s = np.exp(rng.uniform(-3, 3, (1, 8, 1, 1)))
    scales = TensorScales({"v": s, "w": s[0, :, 0, 0], "c": s, "wide": s, "v_bad": s})
    cases = {"v": x, "w": x.transpose(0, 2, 3, 1).copy(), "c": x.astype(np.complex64)}
    cases["wide"] = x[:, :1]
    bad = x.copy()
    bad[1, 3, 2, 2] = np.inf
    bad[0, 5, 0, 1] = np.nan
    cases["v_bad"] = bad
    for name, array in cases.items():
        assert scales.peak(name, array) == tolerance_scale(scales.apply(name, array)), name
    s_bad = s.copy()
    s_bad[0, 2, 0, 0] = np.inf
    odd = TensorScales({"v": s_bad})
    assert odd.peak("v", x) == tolerance_scale(odd.apply("v", x))


def test_float16_extremes_are_float16s_own() -> None:
    """The magnitudes of float16 tensors, reduced through float32, are the float16
    reductions' numbers: subnormals, ±0, the largest finite values, one tensor all
    negative, and NaN/inf (masked as before); ``peak`` per channel as the product's."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((4, 8, 6)) * rng.uniform(1e-6, 5e3, (1, 8, 1))).astype(np.float16)
    x.reshape(-1)[:6] = np.array([6.1e-8, -0.0, 0.0, 65504, -65504, 1e-7], dtype=np.float16)
    negative = -np.abs(x) - np.float16(1)
    bad = x.copy()
    bad[1, 2, 3], bad[2, 5, 1] = np.nan, -np.inf
    for a in (x, negative, bad, np.zeros((3, 2), np.float16)):
        finite = a[np.isfinite(a)]
        want = max(float(finite.max()), -float(finite.min())) if finite.size else 0.0
        assert tolerance_scale(a) == want
    s = np.exp(rng.uniform(-3, 3, (1, 8, 1)))
    scales = TensorScales({"v": s})
    for a in (x, negative, bad):
        assert scales.peak("v", a) == tolerance_scale(scales.apply("v", a))


@pytest.mark.parametrize("limit", [7, 64, 1 << 15])
def test_slab_extremes_equal_the_whole_arrays(limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slab-wise comparison (:func:`_scaled_extremes`) gives the very numbers of the
    whole-array path — ``max|s ⊙ ref - got|`` and ``max|s ⊙ ref|`` — for slabs smaller
    than a row, than a channel, and larger than the tensor; leaves NaN/inf, complex
    values, other shapes and non-broadcasting scales to that path; and visits every
    element once."""
    monkeypatch.setattr(tensorcheck, "SLAB_ELEMENTS", limit)
    rng = np.random.default_rng(7)
    s = np.exp(rng.uniform(-3, 3, (1, 8, 1, 1)))
    x = (rng.standard_normal((2, 8, 5, 6)) * rng.uniform(0.1, 30, (1, 8, 1, 1))).astype(np.float32)
    scales = TensorScales({"v": s, "w": s[0, :, 0, 0], "bad": s[0, :3, 0, 0]})
    cases = {
        "v": x,
        "w": x.transpose(0, 2, 3, 1).copy(),  # s on the last axis
        "none": x.astype(np.float16),  # no scale: s = 1
        "long": rng.standard_normal(1000).astype(np.float32),  # one axis, cut in ranges
    }
    for name, ref in cases.items():
        got = (scales.apply(name, ref) * (1 + 1e-6 * rng.standard_normal(ref.shape))).astype(
            ref.dtype
        )
        a = scales.apply(name, ref).astype(np.float64)
        want = (float(np.max(np.abs(a - got))), tolerance_scale(a), ref.size)
        assert tensorcheck._scaled_extremes(scales, name, ref, got) == want, name
    nan = x.copy()
    nan[1, 2, 3, 4] = np.nan
    assert tensorcheck._scaled_extremes(scales, "v", nan, x) is None
    assert tensorcheck._scaled_extremes(scales, "v", x, nan) is None
    assert tensorcheck._scaled_extremes(scales, "v", x.astype(np.complex64), x) is None
    assert tensorcheck._scaled_extremes(scales, "v", x, x[:1]) is None
    assert tensorcheck._scaled_extremes(scales, "bad", x[0, 0], x[0, 0]) is None
    for shape in [(2, 8, 5, 6), (1000,), (3, 1, 40), (), (4, 0, 3)]:
        seen = np.zeros(shape, dtype=int)
        for at in tensorcheck._slabs(shape, limit):
            assert seen[at].size <= max(limit, shape[-1] if shape else 1)
            seen[at] += 1
        assert (seen == 1).all(), shape

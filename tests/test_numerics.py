"""No overflow: no teleport introduces an inf, NaN, 0 or subnormal weight (issue 12).

"Introduced" is judged element by element against the original: a finite non-zero
element must stay finite and non-zero, and a normal one normal; a constant insert mode
adds must be a normal number.  The teleport must also still verify in onnxruntime —
relative error ``max|a − b| / max|a|`` at most 1e-5 in float32 and 1e-2 in float16:
float16's unit roundoff is 2^-11 ≈ 4.9e-4, every weight is rounded once after the
rescaling and every op rounds again, so a correct float16 teleport of these nets
shows errors of a few 1e-4 (an exact one 0), while a wrong cofactor gives O(1); 1e-2 is
also the CLI's default tolerance for float16 outputs.

float16 copies of the fixtures cast every float initializer, Constant and declared type
to float16 (:func:`to_float16`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import FIXTURE_NAMES, gemm_mlp, make_model, run_ort
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphteleport import cofactors
from graphteleport.cofactors import draw, zero_floor
from graphteleport.errors import InputError
from graphteleport.numerics import limits, magnitudes
from graphteleport.options import MODES, SAMPLINGS, CofactorOptions, Sampling, interval
from graphteleport.passes.teleport import TeleportPass, TeleportResult
from graphteleport.pipeline import TeleportOptions, teleport_file

N = helper.make_node
RANGES = (0.0, 1e-300, 0.5, 0.999999, 1e30)
ORDINARY = (0.5, 0.999999)
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-2}
FLOOR = 2.0**-10


# -- models -----------------------------------------------------------------------------------
def to_float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy: every float32 initializer, Constant value and declared type."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                arr = numpy_helper.to_array(a.t).astype(np.float16)
                a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(out)
    return out


@pytest.fixture(scope="module")
def fixtures(fixtures_dir: Path) -> dict[tuple[str, str], onnx.ModelProto]:
    """Every fixture in float32 and float16."""
    out = {}
    for name in FIXTURE_NAMES:
        proto = onnx.load(fixtures_dir / f"{name}.onnx")
        out[name, "float32"] = proto
        out[name, "float16"] = to_float16(proto)
    return out


def typed_model(
    nodes: list[onnx.NodeProto],
    shapes: Mapping[str, list[int]],
    inits: Mapping[str, np.ndarray],
    elem: int,
) -> onnx.ModelProto:
    """x → nodes → y, every value of one element type (``make_model`` is float32 only)."""
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", elem, shapes["x"])],
        [helper.make_tensor_value_info("y", elem, shapes["y"])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(w0: np.ndarray, b0: np.ndarray, w1: np.ndarray, act: str = "Relu") -> onnx.ModelProto:
    """x → Gemm(w0, b0) → act → Gemm(w1) → y, in the weights' dtype."""
    elem = ir.DataType.from_numpy(w0.dtype).value
    nodes = [
        N("Gemm", ["x", "W0", "b0"], ["h"]),
        N(act, ["h"], ["a"]),
        N("Gemm", ["a", "W1"], ["y"]),
    ]
    shapes = {"x": [2, w0.shape[0]], "y": [2, w1.shape[1]]}
    return typed_model(nodes, shapes, {"W0": w0, "b0": b0, "W1": w1}, elem)


# -- checks -----------------------------------------------------------------------------------
FLOATS = {np.dtype(d) for d in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}


def weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every float weight by name (bfloat16 too): initializers and Constant values."""
    graph = ir.from_proto(proto).graph
    out = {n: v.const_value.numpy() for n, v in graph.initializers.items() if v.const_value}
    for node in graph:
        if node.op_type == "Constant" and "value" in node.attributes:
            out[node.outputs[0].name] = node.attributes["value"].as_tensor().numpy()
    return {n: a for n, a in out.items() if a.dtype in FLOATS}


def feeds(proto: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Standard-normal inputs in each input's declared dtype and (static) shape."""
    rng = np.random.default_rng(seed)
    out = {}
    for vi in proto.graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        out[vi.name] = rng.standard_normal(dims).astype(dtype)
    return out


def rel_err(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    """``max |a − b| / max |a|`` over every output, on two input draws."""
    worst = 0.0
    for seed in (1, 2):
        f = feeds(a, seed)
        for x, y in zip(run_ort(a, f), run_ort(b, f), strict=True):
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            assert np.isfinite(y64).all(), "the teleported model computes inf/NaN"
            scale = max(float(np.max(np.abs(x64), initial=0.0)), 1e-30)
            worst = max(worst, float(np.max(np.abs(x64 - y64), initial=0.0)) / scale)
    return worst


def _subnormal(a: np.ndarray) -> np.ndarray:
    tiny = limits(a.dtype).tiny
    return (a != 0) & (np.abs(a.astype(np.float64)) < tiny)


def introduced(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> list[str]:
    """Weights with an element that was finite and non-zero and is now inf, NaN, 0 or —
    from a normal value — subnormal; and inserted constants that are not normal."""
    bad = []
    for name, w in before.items():
        v = after.get(name)
        if v is None or v.shape != w.shape:
            continue
        counts = np.isfinite(w) & (w != 0)
        broken = ~np.isfinite(v) | (v == 0) | (_subnormal(v) & ~_subnormal(w))
        if (counts & broken).any():
            bad.append(f"{name}: {int((counts & broken).sum())} elements")
    for name, v in after.items():
        normal = np.isfinite(v).all() and (v != 0).all() and not _subnormal(v).any()
        if name not in before and "_cofactor" in name and not normal:
            bad.append(f"inserted constant {name}: {v.ravel()[:4]}")
    return bad


def run(proto: onnx.ModelProto, **kwargs: Any) -> tuple[TeleportResult, onnx.ModelProto]:
    model = ir.from_proto(proto)
    result = TeleportPass(**kwargs)(model)
    return result, ir.to_proto(model)


def valid(sampling: Sampling, cob_range: float, center: float = 1.0) -> bool:
    """The options are accepted (``positive``/``negative`` with r = 0 draw only 0: refused)."""
    try:
        CofactorOptions(sampling=sampling, cob_range=cob_range, center=center)
    except InputError:
        return False
    return True


def moved_fraction(result: TeleportResult) -> float:
    assert result.analysis is not None
    free = result.pair_values[result.analysis.solution.free]
    return float(np.mean(np.abs(free) != 1)) if free.size else 1.0


def weight_dtype(proto: onnx.ModelProto) -> np.dtype:
    return next(iter(weights(proto).values())).dtype


# -- draws ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("cob_range", [*RANGES, 1.0, 1.5])
@pytest.mark.parametrize("center", [1.0, 0.0, 1e-9, -2.0])
def test_draws_stay_away_from_zero(sampling: Sampling, cob_range: float, center: float) -> None:
    """No |τ| below the floor ``max(m, 1)·2^-10`` (m: the interval's reach), never below
    2^-10; draws already outside the floor are the unfloored draws of the same seed."""
    low, high = interval(sampling, cob_range, center)
    if not valid(sampling, cob_range, center):
        assert low == high == 0
        return
    opts = CofactorOptions(sampling=sampling, cob_range=cob_range, center=center)
    t = draw(5000, opts, np.random.default_rng(7))
    eps = zero_floor(low, high)
    assert eps == max(abs(low), abs(high), 1.0) * FLOOR
    assert (np.abs(t) >= eps).all() and np.isfinite(t).all()
    raw = np.random.default_rng(7).uniform(low, high, 5000)
    keep = np.abs(raw) >= eps
    np.testing.assert_array_equal(np.abs(t[keep]), np.abs(raw[keep]))
    if low >= 0 and high > 0 and sampling != "inter_landscape":
        assert (t > 0).all()
    if high <= 0 and low < 0 and sampling != "inter_landscape":
        assert (t < 0).all()


def test_positive_tiny_range_draws_the_floor_not_a_subnormal() -> None:
    """The reported case: positive with a tiny r drew τ ≈ 0 (r = 0: τ = 5e-324, a
    reciprocal of inf; r = 0 itself is now refused as bad input)."""
    for r in (1e-300, 1e-5):
        t = draw(100, CofactorOptions(sampling="positive", cob_range=r), np.random.default_rng(0))
        np.testing.assert_array_equal(t, FLOOR)
        t = draw(100, CofactorOptions(sampling="negative", cob_range=r), np.random.default_rng(0))
        np.testing.assert_array_equal(t, -FLOOR)


def test_redraws_stay_uniform_on_what_is_left() -> None:
    """positive r = 1: the floor removes [0, 2^-10); the rest stays uniform on [2^-10, 1]."""
    opts = CofactorOptions(sampling="positive", cob_range=1.0)
    t = draw(200_000, opts, np.random.default_rng(3))
    assert t.min() >= FLOOR
    hist, _ = np.histogram(t, bins=10, range=(FLOOR, 1.0))
    assert hist.min() > 0.95 * hist.mean() and hist.max() < 1.05 * hist.mean()


# -- dtype ranges and magnitudes ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16])
def test_limits_match_finfo(dtype: Any) -> None:
    lim = limits(np.dtype(dtype))
    fi = ml_dtypes.finfo(dtype)
    assert (lim.max, lim.tiny, lim.sub) == (
        float(fi.max),
        float(fi.smallest_normal),
        float(fi.smallest_subnormal),
    )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_magnitudes_match_a_direct_computation(dtype: Any, seed: int) -> None:
    """The bit scan gives max finite |w|, min normal and min subnormal |w|, whatever mix of
    zeros, signed zeros, subnormals, infs and NaNs the weight holds (and > one chunk)."""
    rng = np.random.default_rng(seed)
    lim = limits(np.dtype(dtype))
    w = rng.standard_normal(150_000) * 10.0 ** rng.integers(-3, 3, 150_000)
    w[rng.integers(0, w.size, 50)] = 0.0
    w[rng.integers(0, w.size, 50)] = -0.0
    if seed != 1:
        w[rng.integers(0, w.size, 7)] = lim.tiny * rng.random(7)  # subnormal (or 0)
    if seed == 2:
        w[rng.integers(0, w.size, 3)] = [np.inf, -np.inf, np.nan]
    w = w.astype(dtype).reshape(50, 3000)
    m = magnitudes(w)
    a = np.abs(w.astype(np.float64))
    finite = a[np.isfinite(a)]
    normal, sub = finite[finite >= lim.tiny], finite[(finite > 0) & (finite < lim.tiny)]
    assert m.hi == finite.max()
    assert m.lo_normal == (normal.min() if normal.size else np.inf)
    assert m.lo_sub == (sub.min() if sub.size else np.inf)
    assert magnitudes(np.zeros(5, dtype)).hi == 0.0


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_magnitude_scan_finds_the_smallest_normal_in_any_chunk(dtype: Any) -> None:
    """The scan measures the smallest normal while each chunk is in cache: a chunk of
    zeros, one of subnormals and normals, one whose normals are the smallest but which
    holds no subnormal, added as pieces in any order, give the direct figures; each
    ``add`` says whether its piece holds a zero."""
    from graphteleport.numerics import _CHUNK, MagnitudeScan

    lim = limits(np.dtype(dtype))
    rng = np.random.default_rng(5)
    zeros = np.zeros(_CHUNK, np.float64)
    mixed = rng.uniform(4 * lim.tiny, 1.0, _CHUNK)
    mixed[::97] = lim.tiny * rng.uniform(0.01, 0.99, mixed[::97].size)
    low = rng.uniform(1.5 * lim.tiny, 1.0, _CHUNK + 11)
    pieces = [zeros, mixed, low]
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        w = np.concatenate([pieces[k] for k in order]).astype(dtype)
        scan = MagnitudeScan(w.dtype)
        at = 0
        for k in order:  # (pieces of several chunks and of one)
            piece = w[at : at + pieces[k].size]
            assert scan.add(piece) == bool(np.any(piece == 0)), (order, k)  # (holds a ±0)
            at += pieces[k].size
        assert scan.result(w) == magnitudes(w.astype(np.float64).astype(dtype)), order
        a = np.abs(w.astype(np.float64))
        assert scan.result(w).lo_normal == a[a >= lim.tiny].min()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_magnitude_scan_that_keeps_the_masked_bits_finds_the_same(dtype: Any) -> None:
    """``add`` with ``keep`` (the rewrite's watched blocks) scans the masked bits it
    leaves there — ``|w|``'s bits, not overwritten by the chunks' subtractions — and finds
    what the scan by chunks finds: pieces with zeros, subnormals and signs."""
    from graphteleport.numerics import _CHUNK, MagnitudeScan

    lim = limits(np.dtype(dtype))
    rng = np.random.default_rng(7)
    n = 2 * _CHUNK + 13
    w = (rng.uniform(2 * lim.tiny, 1.0, n) * rng.choice([-1.0, 1.0], n)).astype(dtype)
    w[5 :: _CHUNK + 3] = 0.0
    w[-1] = -0.0
    w[_CHUNK + 7] = np.asarray(lim.tiny * 0.5).astype(dtype)  # (a subnormal)
    plain, kept = MagnitudeScan(w.dtype), MagnitudeScan(w.dtype)
    keep = np.empty(n + 5, dtype=kept.lim.uint)
    for piece in (w[:9], w[9 : _CHUNK + 100], w[_CHUNK + 100 :]):
        assert plain.add(piece) == kept.add(piece, keep) == bool(np.any(piece == 0))
        got = keep[: piece.size].view(w.dtype)
        assert np.array_equal(got.view(kept.lim.uint), np.abs(piece).view(kept.lim.uint))
    assert kept.result(w) == plain.result(w) == magnitudes(w)


# -- the property ----------------------------------------------------------------------------
cases = st.fixed_dictionaries(
    {
        "model": st.sampled_from(FIXTURE_NAMES),
        "precision": st.sampled_from(("float32", "float16")),
        "sampling": st.sampled_from(SAMPLINGS),
        "cob_range": st.sampled_from(RANGES),
        "center": st.sampled_from((1.0, 0.0, -3.0)),
        "exact": st.booleans(),
        "mode": st.sampled_from(MODES),
        "seed": st.integers(0, 2**16),
    }
)


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=cases)
def test_no_weight_leaves_its_range(
    fixtures: dict[tuple[str, str], onnx.ModelProto], case: dict[str, Any]
) -> None:
    """Every sampling × range (0, 1e-300, ordinary, 1e30) × exact × mode, float32 and
    float16 fixtures: nothing introduced, still verified, and at ordinary ranges the
    cofactors still move (float32: none needed fitting; float16: at least half moved)."""
    case = dict(case)
    assume(valid(case["sampling"], case["cob_range"], case["center"]))
    proto = fixtures[case.pop("model"), case.pop("precision")]
    result, after = run(proto, **case)
    assert introduced(weights(proto), weights(after)) == []
    dtype = weight_dtype(proto)
    err = rel_err(proto, after)
    assert err <= TOL[dtype], f"rel err {err:.3g}"
    if case["exact"] and (dtype == np.float32 or case["cob_range"] in ORDINARY):
        assert err == 0.0  # (float16 at 1e30: activations of 2^±k·h may lose bits)
    assert result.analysis is not None
    free = result.pair_values[result.analysis.solution.free]
    assert (np.abs(free) >= FLOOR).all()
    if case["cob_range"] in ORDINARY:
        if dtype == np.float32:
            assert result.range_fixes == []
            assert moved_fraction(result) == 1.0
        else:
            assert moved_fraction(result) >= 0.5
        assert result.stats.elements_changed > 0


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("cob_range", RANGES)
@pytest.mark.parametrize("exact", [False, True])
def test_no_weight_leaves_its_range_every_combination(
    sampling: Sampling, cob_range: float, exact: bool
) -> None:
    """The full product on a small float16 MLP (weights only, both modes): fast, so that
    no combination is left to chance."""
    if not valid(sampling, cob_range):
        return  # (refused as bad input: draws only 0)
    proto = to_float16(gemm_mlp([6, 16, 16, 3], ["Relu", "Tanh"], seed=2))
    for mode in MODES:
        result, after = run(
            proto, mode=mode, sampling=sampling, cob_range=cob_range, exact=exact, seed=5
        )
        assert introduced(weights(proto), weights(after)) == [], (mode, result.range_report())


# -- the reported cases -----------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["float32", "float16"])
@pytest.mark.parametrize("cob_range", [1e-300, 1e-5])
def test_positive_sampling_with_a_tiny_range(
    fixtures: dict[tuple[str, str], onnx.ModelProto], precision: str, cob_range: float
) -> None:
    """``--sampling positive`` with a tiny range drew τ ≈ 0: reciprocals of inf."""
    proto = fixtures["mlp_small", precision]
    result, after = run(proto, sampling="positive", cob_range=cob_range, seed=0)
    assert introduced(weights(proto), weights(after)) == []
    assert rel_err(proto, after) <= TOL[weight_dtype(proto)]
    assert moved_fraction(result) == 1.0


def test_inter_landscape_near_one_on_float16(
    fixtures: dict[tuple[str, str], onnx.ModelProto],
) -> None:
    """``inter_landscape`` r = 0.999999 draws |τ| down to the floor: float16 weights over
    τ_t/τ_s ~ 1000 overflow or flush unless the offending pairs are fitted."""
    proto = fixtures["resnet_tiny", "float16"]
    result, after = run(proto, sampling="inter_landscape", cob_range=0.999999, seed=0)
    assert introduced(weights(proto), weights(after)) == []
    assert rel_err(proto, after) <= 1e-2
    assert result.range_fixes, "this draw needs fitting: the test would prove nothing"
    assert moved_fraction(result) >= 0.9
    opts = CofactorOptions(sampling="inter_landscape", cob_range=0.999999)
    raw = cofactors.draw(1000, opts, np.random.default_rng(0))
    assert np.abs(raw).min() >= zero_floor(1e-6, 1.999999)


def near_max_model() -> onnx.ModelProto:
    """float16 MLP whose hidden neuron 2 has outgoing weights of 60000 (float16's max is
    65504) and incoming ones of 3e-4, so that the original model computes finite values."""
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((4, 8)) * 0.3).astype(np.float16)
    w0[:, 2] = 3e-4
    w1 = (rng.standard_normal((8, 3)) * 0.3).astype(np.float16)
    w1[2, :] = 60000.0
    return mlp(w0, np.zeros(8, np.float16), w1)


NEAR_MAX = {"sampling": "centered", "center": 0.7, "cob_range": 0.1}  # τ in [0.6, 0.8]


def test_float16_weight_near_its_max() -> None:
    """``W1[2, :] / τ_2`` with τ_2 < 0.92 would be inf: neuron 2's pair is fitted (shrunk
    toward 1 until the row fits, not pinned), with the weight named; every other pair
    keeps its draw."""
    proto = near_max_model()
    result, after = run(proto, **NEAR_MAX, seed=0)
    assert introduced(weights(proto), weights(after)) == []
    assert np.isfinite(weights(after)["W1"]).all()
    assert rel_err(proto, after) <= 1e-2
    assert [f.reason for f in result.range_fixes] == ["cofactor would overflow float16 weight 'W1'"]
    assert moved_fraction(result) == 1.0
    sol = result.analysis.solution
    opts = CofactorOptions(sampling="centered", cob_range=0.1, center=0.7, seed=0)
    drawn = cofactors.sample(sol.code, sol.free, opts)
    fixed = result.range_fixes[0].pair
    assert sol.pair[result.tau != drawn[sol.pair]].tolist() == [fixed] * int(
        np.count_nonzero(result.tau != drawn[sol.pair])
    )
    assert drawn[fixed] < result.pair_values[fixed] < 1.0


def test_float16_weight_near_its_min_normal() -> None:
    """Elements of 7e-5 (float16's smallest normal is 6.1e-5) under τ_out < 0.87 would
    turn subnormal: the pairs are fitted with the reason named."""
    rng = np.random.default_rng(1)
    w0 = (rng.standard_normal((4, 8)) * 0.3).astype(np.float16)
    w0[1, 5] = 7e-5
    proto = mlp(w0, np.zeros(8, np.float16), (rng.standard_normal((8, 3))).astype(np.float16))
    result, after = run(proto, sampling="centered", center=0.5, cob_range=0.1, seed=0)
    assert introduced(weights(proto), weights(after)) == []
    assert {f.reason for f in result.range_fixes} == {
        "cofactor would underflow float16 weight 'W0'"
    }
    assert rel_err(proto, after) <= 1e-2


def test_float32_underflow_is_fitted_too() -> None:
    """float32: output weights of 1e-30 over τ ~ 1e29 (positive, r = 1e30) would flush
    to 0; fitted, the model still verifies."""
    rng = np.random.default_rng(2)
    w0 = rng.uniform(-1, 1, (4, 8)).astype(np.float32)
    w1 = (rng.uniform(1, 2, (8, 3)) * rng.choice([-1, 1], (8, 3)) * 1e-30).astype(np.float32)
    proto = mlp(w0, np.zeros(8, np.float32), w1)
    result, after = run(proto, sampling="positive", cob_range=1e30, seed=0)
    assert introduced(weights(proto), weights(after)) == []
    reasons = {f.reason for f in result.range_fixes}
    assert reasons == {"cofactor would underflow float32 weight 'W1'"}
    assert moved_fraction(result) == 1.0
    assert rel_err(proto, after) <= 1e-5


def test_float32_overflow_is_fitted_too() -> None:
    """float32: weights of 1e36 under τ ~ 1e29 would be inf (weights only: activations of
    such a model sit at the range's edge whatever the cofactors)."""
    rng = np.random.default_rng(2)
    w0 = (rng.standard_normal((4, 8)) * 1e36).astype(np.float32)
    proto = mlp(w0, np.zeros(8, np.float32), rng.uniform(1, 2, (8, 3)).astype(np.float32))
    result, after = run(proto, sampling="positive", cob_range=1e30, seed=0)
    assert introduced(weights(proto), weights(after)) == []
    assert {f.reason for f in result.range_fixes} == {"cofactor would overflow float32 weight 'W0'"}


def test_insert_mode_constants_stay_normal() -> None:
    """Insert mode on float16: τ = 1e5 fits every weight (|W0|, |b0| < 0.6, |W1| ≥ 10) but
    not its Mul constants (1/τ = 1e-5 is subnormal, τ > 65504): only the constants are
    behind the fit, and the constants added are normal."""
    rng = np.random.default_rng(3)
    w0 = rng.uniform(-0.5, 0.5, (4, 6)).astype(np.float16)
    b0 = rng.uniform(-0.5, 0.5, 6).astype(np.float16)
    w1 = rng.uniform(10, 20, (6, 2)).astype(np.float16)
    proto = mlp(w0, b0, w1, act="Sigmoid")
    result, after = run(proto, mode="insert", sampling="centered", center=1e5, cob_range=0.0)
    assert introduced(weights(proto), weights(after)) == []
    reasons = {f.reason for f in result.range_fixes}
    assert reasons and all("float16 Mul constant on 'h'" in r for r in reasons), reasons
    assert moved_fraction(result) == 1.0
    assert rel_err(proto, after) <= 1e-2


@pytest.mark.parametrize("dtype", [np.float64, ml_dtypes.bfloat16])
def test_float64_and_bfloat16_weights(dtype: Any) -> None:
    """The other float dtypes: near-max bfloat16 (≈3.4e38) and float64 weights, huge range."""
    rng = np.random.default_rng(4)
    big = 3e38 if dtype == ml_dtypes.bfloat16 else 1e307
    w0 = (rng.standard_normal((4, 8)) * big / 4).astype(dtype)
    w1 = (rng.standard_normal((8, 3))).astype(dtype)
    proto = mlp(w0, np.zeros(8, dtype), w1)
    result, after = run(proto, sampling="positive", cob_range=1e30, seed=1)
    assert introduced(weights(proto), weights(after)) == []
    assert result.range_fixes


def test_float16_rescale_rounds_once() -> None:
    """A float16 weight is multiplied by S in float32 exactly (in float64) and rounded
    once into float16 — not by S rounded to float16 first, which differs."""
    rng = np.random.default_rng(5)
    w0 = (rng.uniform(1, 30, (16, 32)) * rng.choice([-1, 1], (16, 32))).astype(np.float16)
    w1 = (rng.uniform(1, 30, (32, 4)) * rng.choice([-1, 1], (32, 4))).astype(np.float16)
    proto = mlp(w0, np.zeros(32, np.float16), w1)
    tau = 0.0031  # every hidden pair (centered, r = 0)
    _, after = run(proto, sampling="centered", center=tau, cob_range=0.0)
    got = weights(after)
    for name, w, s in (("W0", w0, tau), ("W1", w1, 1 / tau)):
        once = (w.astype(np.float64) * float(np.float32(s))).astype(np.float16)
        np.testing.assert_array_equal(got[name], once)
        assert (got[name] != w * np.float16(s)).any(), "the test cannot tell them apart"


def test_report_lists_the_fits(tmp_path: Path) -> None:
    """The CLI's report carries ``range_fixes`` by reason."""
    src = tmp_path / "m.onnx"
    onnx.save(near_max_model(), src)
    opts = TeleportOptions(**NEAR_MAX)  # type: ignore[arg-type]
    report = teleport_file(src, tmp_path / "out.onnx", opts).to_json()
    assert report["verification"]["passed"]
    assert report["range_fixes"] == [
        {"reason": "cofactor would overflow float16 weight 'W1'", "cofactors": 1, "pinned": 0}
    ]


def test_a_float32_model_needs_no_fit_at_ordinary_ranges() -> None:
    """make_model's float32 nets: the common path never fits (and so stays fast)."""
    proto = make_model(
        [N("Gemm", ["x", "W"], ["h"]), N("Relu", ["h"], ["y"])],
        {"x": [2, 3]},
        {"y": [2, 5]},
        {"W": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)},
    )
    result, _ = run(proto, sampling="inter_landscape", cob_range=0.999999)
    assert result.range_fixes == []

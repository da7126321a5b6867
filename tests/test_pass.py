"""PASS depth: TeleportPass on the shipped fixtures and small graphs — counts, structure and
onnxruntime numerics (graph optimisations off, rel err ≤ 1e-5; exact mode: bit-identical)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import (
    FIXTURE_NAMES,
    RTOL,
    changed_elements,
    changed_names,
    gemm_mlp,
    make_model,
    max_abs_err,
    max_rel_err,
    rand,
    random_feeds,
    teleport,
    weights,
)
from onnx import helper

from graphteleport.analysis import GROUPS, analyze
from graphteleport.cofactors import _positive_draws, draw, restrict, sample
from graphteleport.errors import InputError
from graphteleport.options import SAMPLINGS, CofactorOptions, Sampling
from graphteleport.passes.teleport import TeleportPass, TeleportResult


def load(fixtures_dir: Path, name: str) -> onnx.ModelProto:
    return onnx.load(fixtures_dir / f"{name}.onnx")


def op_types(proto: onnx.ModelProto) -> list[tuple[str, tuple[str, ...]]]:
    return [(n.op_type, tuple(n.input)) for n in proto.graph.node]


@pytest.fixture(params=FIXTURE_NAMES)
def fixture_proto(request: pytest.FixtureRequest, fixtures_dir: Path) -> onnx.ModelProto:
    return load(fixtures_dir, request.param)


def test_restrict_by_codes_matches_restrict_by_names() -> None:
    """Positive pairs take |τ|, sign pairs ±1, pinned pairs 1, whether the groups come as
    names or as codes (the fast path); with ``free``, the pairs that are not free take 1."""
    rng = np.random.default_rng(0)
    t = rng.uniform(-1.5, 1.5, 256)
    codes = rng.integers(0, len(GROUPS), 256)
    by_code, by_name = restrict(t, codes), restrict(t, np.array(GROUPS)[codes])
    np.testing.assert_array_equal(by_code, by_name)
    np.testing.assert_array_equal(by_code[codes == 0], t[codes == 0])
    np.testing.assert_array_equal(by_code[codes == 1], np.abs(t[codes == 1]))
    np.testing.assert_array_equal(by_code[codes == 2], np.sign(t[codes == 2]))
    np.testing.assert_array_equal(by_code[codes == 3], 1.0)
    free = rng.random(256) < 0.5
    np.testing.assert_array_equal(restrict(t, codes, free), np.where(free, by_code, 1.0))
    t = np.abs(t) + 0.25  # all positive: the short path gives the same
    np.testing.assert_array_equal(restrict(t, codes, free, positive=True), restrict(t, codes, free))


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("cob_range", [0.0, 0.5, 1.0, 1.5])
def test_sample_takes_the_positive_path_only_for_positive_draws(
    sampling: Sampling, cob_range: float
) -> None:
    """``sample`` promises ``restrict`` positive draws only where the sampling cannot draw
    τ ≤ 0; either way its values equal the general restriction of the same draws."""
    codes = np.random.default_rng(1).integers(0, len(GROUPS), 4000)
    free = np.random.default_rng(2).random(4000) < 0.8
    if cob_range == 0 and sampling in ("positive", "negative"):  # U[0, 0]: every τ = 0
        with pytest.raises(InputError, match="every cofactor as 0"):
            CofactorOptions(sampling=sampling, cob_range=cob_range, center=0.5)
        return
    opts = CofactorOptions(sampling=sampling, cob_range=cob_range, center=0.5, seed=3)
    t = draw(4000, opts, np.random.default_rng(3))
    if _positive_draws(opts):
        assert (t > 0).all()
    got = sample(codes, free, opts)
    np.testing.assert_array_equal(got, restrict(t, codes, free))


# -- count + structure + numerics on the fixtures ---------------------------------------------
def test_absorb_keeps_the_graph_and_moves_the_weights(fixture_proto: onnx.ModelProto) -> None:
    t = teleport(fixture_proto)
    after = t.after
    assert op_types(after) == op_types(fixture_proto), "absorb mode must not touch nodes"
    assert [i.name for i in after.graph.initializer] == [
        i.name for i in fixture_proto.graph.initializer
    ]
    for name, w in t.w0.items():
        assert t.w1[name].shape == w.shape and t.w1[name].dtype == w.dtype, name
    changed, total = changed_elements(t.w0, t.w1)
    assert changed >= 0.95 * total, f"only {changed}/{total} weight elements moved"
    assert t.rel_err() <= RTOL


def test_stats_match_an_independent_count(fixture_proto: onnx.ModelProto) -> None:
    t = teleport(fixture_proto, seed=4)
    stats = t.result.stats
    changed, total = changed_elements(t.w0, t.w1)
    assert (stats.elements_changed, stats.elements_total) == (changed, total)
    assert stats.weights_changed == len(t.changed)
    assert stats.weights_total == len(t.w0)
    assert stats.copies == []
    assert t.result.modified is True
    assert t.result.free_cofactors == analyze(ir.from_proto(fixture_proto)).free_cofactors > 0


def test_fixture_teleportation_dimensions(fixtures_dir: Path) -> None:
    """mlp_small: 3 hidden ReLU layers of 64 → 192.  resnet_tiny (BN folded): the stem and
    the 3 residual stages of 8/16/32 channels each share one cofactor per channel through
    the Adds, plus the first conv of each block: (8 + 8) + (16 + 16) + (32 + 32) = 112.
    cnn_tiny_keepbn: conv (any) + BN (positive) per stage, 8 + 8 + 16 + 16 = 48."""
    counts = {
        n: analyze(ir.from_proto(load(fixtures_dir, n))).free_cofactors for n in FIXTURE_NAMES
    }
    assert counts == {"mlp_small": 192, "resnet_tiny": 112, "cnn_tiny_keepbn": 48}


def test_same_seed_same_weights(fixture_proto: onnx.ModelProto) -> None:
    a, b = teleport(fixture_proto, seed=7), teleport(fixture_proto, seed=7)
    assert a.after.SerializeToString() == b.after.SerializeToString()
    assert np.array_equal(a.result.tau, b.result.tau)


def test_different_seeds_different_weights(fixture_proto: onnx.ModelProto) -> None:
    a, b = teleport(fixture_proto, seed=1), teleport(fixture_proto, seed=2)
    differ = changed_names(a.w1, b.w1)
    assert len(differ) >= 0.9 * len(a.changed)
    changed, total = changed_elements(a.w1, b.w1)
    assert changed >= 0.95 * total


def test_analysis_is_invariant_under_teleport(fixture_proto: onnx.ModelProto) -> None:
    """A teleported model admits the same cofactors as the original (idempotent analysis)."""
    t = teleport(fixture_proto)
    before = analyze(ir.from_proto(fixture_proto))
    after = analyze(ir.from_proto(t.after))
    assert after.free_cofactors == before.free_cofactors
    assert after.groups() == before.groups()


def test_teleporting_twice_preserves_function(fixture_proto: onnx.ModelProto) -> None:
    once = teleport(fixture_proto, seed=1)
    twice = teleport(once.after, seed=2)
    assert changed_elements(once.w1, twice.w1)[0] >= 0.95 * sum(w.size for w in once.w1.values())
    assert max_rel_err(fixture_proto, twice.after) <= RTOL


def test_zero_cob_range_is_the_identity(fixture_proto: onnx.ModelProto) -> None:
    """intra_landscape with r = 0 draws τ = 1 everywhere: nothing may change."""
    t = teleport(fixture_proto, cob_range=0.0)
    assert t.changed == set()
    assert t.result.modified is False
    assert t.result.stats.elements_changed == 0


# -- sampling and groups ----------------------------------------------------------------------
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_each_sampling_respects_groups(fixture_proto: onnx.ModelProto, sampling: str) -> None:
    """Whatever the sampling draws, a positive (ReLU/MaxPool) class gets τ > 0, a pinned
    one τ = 1, and the function is preserved."""
    t = teleport(fixture_proto, sampling=sampling, cob_range=0.9, center=-1.0, seed=3)
    sol = t.solution
    values = t.result.pair_values
    groups = np.asarray(sol.group)
    assert (values[sol.free & (groups == "positive")] > 0).all()
    assert (values[groups == "pinned"] == 1).all()
    assert (values[~sol.free] == 1).all()
    assert np.count_nonzero(values[sol.free] != 1) == int(sol.free.sum())
    assert t.rel_err() <= RTOL


def test_any_group_takes_negative_values(fixtures_dir: Path) -> None:
    """cnn_tiny_keepbn: the convs before the BNs are linear ('any'): negative sampling flips
    them, while the BN outputs (ReLU follows) stay positive."""
    t = teleport(load(fixtures_dir, "cnn_tiny_keepbn"), sampling="negative", seed=0)
    sol = t.solution
    groups = np.asarray(sol.group)
    values = t.result.pair_values
    assert (values[sol.free & (groups == "any")] < 0).all()
    assert (values[sol.free & (groups == "positive")] > 0).all()
    assert t.rel_err() <= RTOL


@pytest.mark.parametrize(
    ("sampling", "low", "high"),
    [("intra_landscape", 0.5, 1.5), ("positive", 0.0, 0.5), ("centered", 2.5, 3.5)],
)
def test_sampling_ranges(sampling: str, low: float, high: float) -> None:
    proto = gemm_mlp([4, 32, 32, 3], "Relu")
    t = teleport(proto, sampling=sampling, cob_range=0.5, center=3.0)
    free = t.free_values
    assert free.size == 64
    assert (free >= low).all() and (free <= high).all()
    assert free.std() > 0.05, "cofactors should be spread over the interval"


def test_inter_landscape_positive_classes_are_not_all_one_sign_draws() -> None:
    """With fair-coin signs, a ReLU class takes |τ| (not 1): it still moves."""
    t = teleport(gemm_mlp([4, 16, 3], "Relu"), sampling="inter_landscape", cob_range=0.9)
    free = t.free_values
    assert (free > 0).all() and (free != 1).all()
    assert np.unique(free).size == free.size


def test_unknown_sampling_and_mode_are_input_errors() -> None:
    with pytest.raises(InputError, match="sampling"):
        TeleportPass(sampling="sideways")
    with pytest.raises(InputError, match="mode"):
        TeleportPass(mode="teleport-harder")


# -- exact mode -------------------------------------------------------------------------------
def test_exact_mode_is_bit_identical(fixture_proto: onnx.ModelProto) -> None:
    t = teleport(fixture_proto, exact=True, sampling="inter_landscape", cob_range=0.9)
    free = t.free_values
    exponents = np.log2(np.abs(free))
    assert np.array_equal(exponents, np.round(exponents)), "exact τ must be powers of two"
    assert (np.abs(free) != 1).all(), "exact mode must still move every free cofactor"
    # Powers of two often cancel (τ_out/τ_in = 1 when both are 2), so fewer elements move
    # than with continuous τ; still most must.
    changed, total = changed_elements(t.w0, t.w1)
    assert changed >= 0.5 * total
    feeds = random_feeds(fixture_proto, seed=5)
    assert max_abs_err(fixture_proto, t.after, feeds) == 0.0


def test_exact_weights_are_exact_products(fixtures_dir: Path) -> None:
    """mlp_small, exact: every weight ratio W'/W is a power of two."""
    t = teleport(load(fixtures_dir, "mlp_small"), exact=True)
    for name, w in t.w0.items():
        nz = w != 0
        ratio = t.w1[name][nz].astype(np.float64) / w[nz]
        k = np.log2(np.abs(ratio))
        assert np.array_equal(k, np.round(k)), name


# -- the pass contract ------------------------------------------------------------------------
def test_pass_is_in_place_and_returns_a_result(fixtures_dir: Path) -> None:
    model = ir.from_proto(load(fixtures_dir, "mlp_small"))
    result = TeleportPass(seed=0)(model)
    assert isinstance(result, TeleportResult)
    assert result.model is model
    assert result.analysis is not None
    assert result.tau.shape == (result.analysis.solution.n,)
    assert set(result.seconds) >= {"analyze", "rewrite"}


def test_graph_counts_unchanged_on_a_chain_of_every_rule_family() -> None:
    """A model mixing Conv, BN, MaxPool, Flatten, Gemm: same op histogram afterwards."""
    n = helper.make_node
    inits = {
        "W0": rand([6, 3, 3, 3], 0),
        "b0": rand([6], 1),
        "s": rand([6], 2, low=0.5),
        "B": rand([6], 3),
        "m": rand([6], 4),
        "v": rand([6], 5, low=0.5),
        "W1": rand([6 * 2 * 2, 3], 6),
    }
    nodes = [
        n("Conv", ["x", "W0", "b0"], ["c"], pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c", "s", "B", "m", "v"], ["bn"]),
        n("Relu", ["bn"], ["r"]),
        n("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Flatten", ["p"], ["f"]),
        n("Gemm", ["f", "W1"], ["y"]),
    ]
    proto = make_model(nodes, {"x": [1, 3, 4, 4]}, {"y": [1, 3]}, inits)
    t = teleport(proto)
    assert Counter(x.op_type for x in t.after.graph.node) == Counter(
        x.op_type for x in proto.graph.node
    )
    assert t.changed == set(weights(proto)) - {"v"}
    assert t.rel_err() <= RTOL

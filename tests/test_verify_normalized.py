"""Softmax and LogSoftmax outputs are held to the tolerance their logits would be held to.

The normalisation amplifies its logits' float32 rounding in absolute terms (``Δy_i ≈ y_i ·
Δz``, and ``Δz`` grows with ``|z|``), so a correct rescaling of a model with large logits
used to fail on its softmax output though the logits passed
(:func:`graphteleport.verify.normalized_allowance`).  Here: a correct teleport that failed
the old rule passes, every single-neuron corruption still fails, and the allowance is
exactly the derivation's bound (logits within the rule always pass; far outside, fail).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import gemm_mlp, make_model, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from test_mutation import Case, apply, assert_every_mutant_fails, mutants, teleported

from graphteleport import verify
from graphteleport.verify import Normalized, compare, normalized_allowance, normalized_outputs

RTOL = 1e-5


def large_logits_model(op: str = "Softmax", offset: float = 4000.0) -> onnx.ModelProto:
    """An MLP whose logits ``z`` sit near ``offset`` with a spread of a few units, then
    ``op`` over them: float32 rounds ``z`` to steps of ``ulp(offset)`` (2.4e-4 at 4000)."""
    model = gemm_mlp([8, 32, 32, 16], "Relu", batch=32, seed=1)
    for t in model.graph.initializer:
        if t.name == "b2":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + np.float32(offset), "b2"))
    for node in model.graph.node:
        node.output[:] = ["z" if y == "y" else y for y in node.output]
    model.graph.node.append(helper.make_node(op, ["z"], ["y"], axis=-1))
    onnx.checker.check_model(model, full_check=True)
    return model


def saved(tmp_path: Path, model: onnx.ModelProto) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def old_rule_passes(case: Case, floor: float) -> bool:
    """The outputs of the case's correct teleport under the rule before normalized outputs
    (the saturating op's floor only), on every draw."""
    original, rewritten = onnx.load(case.src), onnx.load(case.out)
    return all(
        compare(run_ort(original, f), run_ort(rewritten, f), floors=[floor]).passed
        for f in case.feeds
    )


@pytest.mark.parametrize(("op", "floor"), [("Softmax", 1.0), ("LogSoftmax", 0.0)])
def test_correct_teleport_of_large_logits_failed_before_and_passes(
    tmp_path: Path, op: str, floor: float
) -> None:
    case = teleported(saved(tmp_path, large_logits_model(op)), tmp_path)
    assert not old_rule_passes(case, floor)  # the false failure
    result = case.verify(case.out)
    assert result.passed, result.summary()
    assert result.tensors is not None and result.tensors.passed


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_every_single_neuron_corruption_of_large_logits_fails(tmp_path: Path, op: str) -> None:
    case = teleported(saved(tmp_path, large_logits_model(op)), tmp_path)
    assert_every_mutant_fails(case, tmp_path, minimum=3 * 64)


def test_outputs_alone_still_catch_what_moves_the_logits(tmp_path: Path) -> None:
    """Without the per-tensor check: every corruption whose logits fail the logits' own
    rule fails on the softmax output too (the allowance is never looser than that)."""
    case = teleported(saved(tmp_path, large_logits_model("Softmax", offset=0.0)), tmp_path)
    original = onnx.load(case.src)
    with_logits = onnx.load(case.src)
    with_logits.graph.output.append(helper.make_tensor_value_info("z", 1, None))
    proto = onnx.load(case.out)
    path = tmp_path / "mutant.onnx"
    checked = 0
    for m in mutants(case):
        if not apply(proto, m, path):
            continue
        mutant = onnx.load(path)
        mutant.graph.output.append(helper.make_tensor_value_info("z", 1, None))
        logits_fail = not all(
            compare([run_ort(with_logits, f)[1]], [run_ort(mutant, f)[1]]).passed
            for f in case.feeds
        )
        if logits_fail:
            checked += 1
            outputs = verify.verify_teleport(case.src, path, case.feeds, None)
            assert not outputs.passed, f"{m.kind} weights of neuron {m.neuron} in {m.weight}"
    assert checked >= 64
    assert original.graph.output[0].name == "y"


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    spread=st.floats(0.5, 60.0),
    offset=st.floats(-200.0, 200.0),
    log=st.booleans(),
)
def test_logits_within_the_bound_always_pass(
    seed: int, spread: float, offset: float, log: bool
) -> None:
    """The derivation's bound is exact: any logits error of at most ``m = rtol · R`` (the
    logits' rule with ``max|z|`` at its lower bound ``R / 2``, ``R`` the largest row
    spread) leaves the normalised output within the allowance, whatever the logits'
    common offset (computed in float64, so only the bound is tested).  With an offset
    the logits' own rule, ``rtol · (max|z| + |z_j|)``, allows more: the allowance is
    stricter than checking the logits, never looser."""
    rng = np.random.default_rng(seed)
    z = offset + spread * rng.standard_normal((3, 7))
    spread_of_rows = float(np.max(z.max(axis=1) - z.min(axis=1)))
    dz = RTOL * spread_of_rows * rng.choice([-1.0, 1.0], z.shape)
    how = Normalized(axis=-1, log=log, flatten=False)
    ref, cand = _normalize(z, log), _normalize(z + dz, log)
    assert compare([ref], [cand], normalized=[how]).passed


@pytest.mark.parametrize("log", [False, True])
def test_a_wrong_logit_fails(log: bool) -> None:
    """One logit off by 20x its rule's tolerance: fails, however the rows are laid out."""
    z = np.linspace(-8.0, 8.0, 12).reshape(3, 4)
    bad = z.copy()
    bad[1, 2] += 20 * RTOL * 2 * np.max(np.abs(z))
    how = Normalized(axis=-1, log=log, flatten=False)
    result = compare([_normalize(z, log)], [_normalize(bad, log)], normalized=[how])
    assert not result.passed


def test_allowance_matches_its_formula() -> None:
    z = np.array([[0.0, 1.0, 5.0], [0.0, 0.0, 0.0]])
    y = _normalize(z, False)
    softmax = normalized_allowance(y, Normalized(-1, False, False), RTOL)
    assert np.allclose(softmax, y * np.expm1(2 * RTOL * 5.0))
    log = normalized_allowance(_normalize(z, True), Normalized(-1, True, False), RTOL)
    assert log == pytest.approx(2 * RTOL * 5.0)
    tiny = np.array([[1.0, 0.0, 1e-45]], np.float32)  # underflowed and subnormal: not read
    assert np.all(normalized_allowance(tiny, Normalized(-1, False, False), RTOL) == 0)


def test_rows_follow_the_axis_and_opset() -> None:
    z = np.zeros((2, 3, 4))
    z[0, 0, :] = [0, 0, 0, 9]  # a spread of 9 along the last axis only
    y = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # normalised over axis 1
    last = normalized_allowance(np.log(y), Normalized(-1, True, False), RTOL)
    middle = normalized_allowance(np.log(y), Normalized(1, True, False), RTOL)
    assert middle == pytest.approx(2 * RTOL * 9.0) and last < middle
    flat = np.log(np.exp(z) / np.exp(z).reshape(2, -1).sum(axis=1)[:, None, None])
    assert normalized_allowance(flat, Normalized(1, True, True), RTOL) == pytest.approx(
        2 * RTOL * 9.0
    )


def test_normalized_outputs_of_a_graph() -> None:
    nodes = [
        helper.make_node("Softmax", ["x"], ["s"]),
        helper.make_node("Identity", ["s"], ["y"]),
        helper.make_node("LogSoftmax", ["x"], ["l"], axis=0),
        helper.make_node("Softmax", ["x"], ["hidden"]),
        helper.make_node("Relu", ["hidden"], ["r"]),
    ]
    model = make_model(nodes, {"x": [2, 3]}, {"y": [2, 3], "l": [2, 3], "r": [2, 3]})
    assert normalized_outputs(model) == {
        "y": Normalized(-1, False, False),
        "l": Normalized(0, True, False),
    }
    old = make_model(nodes[:1], {"x": [2, 3]}, {"s": [2, 3]}, opset=11)
    assert normalized_outputs(old) == {"s": Normalized(1, False, True)}


def _normalize(z: np.ndarray, log: bool) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    out: np.ndarray = shifted - lse if log else np.exp(shifted - lse)
    return out

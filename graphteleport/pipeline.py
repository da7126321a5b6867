"""File-to-file jobs: load, analyse or teleport, verify, save atomically, report.

These are what the CLI runs, usable from Python too::

    from graphteleport.pipeline import TeleportOptions, teleport_file
    report = teleport_file("model.onnx", "out.onnx", TeleportOptions(seed=0))
    report["verification"]["max_rel_err"]

Every option value and path is checked before any file is read or written
(:meth:`TeleportOptions.validate`, :func:`check_output_path`): a bad one raises
:class:`InputError` and nothing is written.  With ``report_path`` the JSON report is
staged beside the model and committed with it, model first (a report on disk always
describes a model that was written).  A failed verification raises
:class:`VerificationError` after the report is complete (``err.report``); it writes
the failed report (so the user can see why) and no model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphteleport import cofactors
from graphteleport import verify as verify_mod
from graphteleport.analysis.driver import analyze_model
from graphteleport.analysis.quiver import Quiver
from graphteleport.errors import InputError, VerificationError
from graphteleport.frontends import onnx as onnx_frontend
from graphteleport.io import (
    StagedSave,
    check_paths,
    external_data_files,
    load_model,
    output_data_path,
    staged_save,
    write_file_atomic,
)
from graphteleport.passes.teleport import MODES, TeleportPass, TeleportResult, check_input_shapes
from graphteleport.tensorcheck import TensorScales

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
PathArg = str | os.PathLike[str]
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

    def validate(self) -> None:
        """Raise :class:`InputError` (one line naming the option) for a value that cannot work.

        ``mode`` and ``sampling`` must be known; ``cob_range``/``center``/``seed`` must
        draw non-zero cofactors (:func:`graphteleport.cofactors.check_sampling`,
        :func:`~graphteleport.cofactors.check_seed`); ``rtol`` must lie in (0, 1)
        (0 passes nothing that is not bit-identical — use ``exact`` for that —, 1 or
        more passes anything); input shapes must be small enough to draw
        (:func:`~graphteleport.passes.teleport.check_input_shapes`); ``draws`` lies
        in 1..:data:`MAX_DRAWS` (0 only with ``inputs``).
        :func:`teleport_file` calls it before touching any file.
        """
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        cofactors.check_sampling(self.sampling, self.cob_range, self.center)
        cofactors.check_seed(self.seed)
        if self.rtol is not None and not (
            isinstance(self.rtol, int | float) and math.isfinite(self.rtol) and 0 < self.rtol < 1
        ):
            raise InputError(
                f"--rtol must be a number between 0 and 1 (exclusive), got {self.rtol} "
                "(for bit-identical outputs use --exact)"
            )
        check_input_shapes(self.input_shapes)
        draws = self.draws
        if isinstance(draws, bool) or not isinstance(draws, int):
            raise InputError(f"--draws must be an integer, got {draws!r}")
        if not 0 <= draws <= MAX_DRAWS or (draws == 0 and not self.inputs):
            raise InputError(
                f"--draws must be between 1 and {MAX_DRAWS} (0 only with --inputs), got {draws}"
            )


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
    *,
    report_path: PathArg | None = None,
) -> dict[str, Any]:
    """Analyse a model file only: free cofactors, groups, pins with reasons, per mode.

    ``report["modes"]`` gives, for absorb and insert mode, the free cofactors and the
    nodes insert mode may wrap (a Mul before and after each, where the drawn
    cofactors need it) and the edges it may scale.  With ``report_path`` the report
    is also written there as JSON, atomically; the path is checked before any work
    and may not name the model or its external data.
    """
    t0 = time.perf_counter()
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    check_input_shapes(input_shapes or {})
    reports = [] if report_path is None else [("--report", report_path)]
    check_paths([("model file", path)], reports)
    graph = onnx_frontend.load(path, input_shapes)
    check_paths(_model_inputs(path, None, graph.model), reports)
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
    if report_path is not None:
        write_file_atomic(report_path, report_json(report))
    return report


def report_json(report: Mapping[str, Any]) -> bytes:
    """The report as the JSON bytes ``--report`` writes (values JSON lacks as strings)."""
    return json.dumps(report, indent=2, default=str).encode()


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
    *,
    report_path: PathArg | None = None,
) -> dict[str, Any]:
    """Teleport the model at ``src`` into ``dst``, verified unless ``opts.verify`` is False.

    With ``report_path`` the JSON report is committed together with the model (after
    it); after a failed verification it is written alone.  Options and paths are
    checked first; see the module docstring.
    """
    t0 = time.perf_counter()
    opts.validate()
    check_output_path(src, dst, report=report_path, inputs=opts.inputs)
    model = load_model(src)
    check_output_path(src, dst, report=report_path, inputs=opts.inputs, model=model)
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
    commit = _committer(report, report_path, t0)
    try:
        _save_verified(
            model, src, dst, feeds, report, opts, progress, result.tensor_scales(), commit=commit
        )
    except VerificationError:
        if report_path is not None:  # the failed report says why; no model is written
            report["seconds"]["total"] = time.perf_counter() - t0
            write_file_atomic(report_path, report_json(report))
        raise
    report["seconds"].setdefault("total", time.perf_counter() - t0)
    return report


def check_output_path(
    src: PathArg,
    dst: PathArg,
    *,
    report: PathArg | None = None,
    inputs: PathArg | None = None,
    model: ir.Model | None = None,
) -> None:
    """Refuse, before any work, paths a run cannot use or would destroy.

    Inputs (the model ``src``, the ``inputs`` .npz, and with ``model`` the external
    data files it reads) must be regular files; outputs (``dst``, with ``model`` the
    data file ``dst`` gets when the model keeps external data, and ``report``) must be
    writable regular or new files; no output may be an input or another output, also
    through ``..``, symbolic or hard links (:func:`graphteleport.io.check_paths`).
    Call it without ``model`` before loading and with it after.
    """
    outputs: list[tuple[str, PathArg]] = [("-o", dst)]
    data = output_data_path(model, dst) if model is not None else None
    if data is not None:
        outputs.append(("the data file of -o", data))
    if report is not None:
        outputs.append(("--report", report))
    check_paths(_model_inputs(src, inputs, model), outputs)


def _model_inputs(
    src: PathArg, inputs: PathArg | None, model: ir.Model | None
) -> list[tuple[str, PathArg]]:
    """The files a run reads, with their roles: model, feeds, the model's external data."""
    read: list[tuple[str, PathArg]] = [("model file", src)]
    if inputs is not None:
        read.append(("inputs file", inputs))
    if model is not None:
        read += [("external data file", p) for p in external_data_files(model)]
    return read


def _committer(
    report: dict[str, Any], report_path: PathArg | None, t0: float
) -> Callable[[StagedSave], list[Path]]:
    """The commit of a verified (or unverified) staged model, with its report.

    The report is completed (paths written, total time), staged beside its target
    and renamed into place right after the model, in one :meth:`StagedSave.commit`
    (model first: a report on disk always describes a model that is there).  A
    report that cannot be staged raises :class:`InputError` before anything is
    renamed, so nothing is written.
    """

    def commit(staged: StagedSave) -> list[Path]:
        report["written"] = [str(p) for p in staged.paths]
        report["seconds"]["total"] = time.perf_counter() - t0
        if report_path is not None:
            staged.stage_file(report_path, report_json(report))
        return staged.commit()

    return commit


def _save_verified(
    model: ir.Model,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    feeds: list[dict[str, np.ndarray]],
    report: dict[str, Any],
    opts: TeleportOptions,
    progress: Progress,
    scales: TensorScales | None = None,
    *,
    commit: Callable[[StagedSave], list[Path]] = StagedSave.commit,
) -> None:
    t = time.perf_counter()
    if not opts.verify:
        with staged_save(model, dst, protect=[src]) as staged:
            report["seconds"]["save"] = time.perf_counter() - t
            commit(staged)
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
        commit(staged)


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
    report["range_fixes"] = result.range_report()  # pairs moved toward 1 to stay in range
    return report

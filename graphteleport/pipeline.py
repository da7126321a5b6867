"""File-to-file jobs: load, analyse or teleport, verify, save atomically, report.

These are what the CLI runs, usable from Python too::

    from graphteleport.pipeline import TeleportOptions, teleport_file
    report = teleport_file("model.onnx", "out.onnx", TeleportOptions(seed=0))
    report.verification.max_rel_err, report.seconds["analyze"]
    report.to_json()  # the dict --report writes

Every option value is checked when the options are made (:class:`TeleportOptions`,
:class:`~graphteleport.options.CofactorOptions`) and every path before any file is
read or written (:func:`check_output_path`): a bad one raises :class:`InputError` and
nothing is written.  With ``report_path`` the JSON report is staged beside the model
and committed with it, model first (a report on disk always describes a model that was
written).  A failed verification raises :class:`VerificationError` after the report is
complete (``err.report``, a :class:`~graphteleport.reports.TeleportReport`); it writes
the failed report (so the user can see why) and no model.  Reports record the seconds
of each phase the job ran (:class:`Stopwatch`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

import numpy as np
import onnx_ir as ir

from graphteleport import rewrite as rewrite_mod
from graphteleport import verify as verify_mod
from graphteleport.analysis import Quiver, analyze_model
from graphteleport.errors import InputError, VerificationError
from graphteleport.frontends import onnx as onnx_frontend
from graphteleport.io import (
    StagedSave,
    StreamedSave,
    check_paths,
    external_data_files,
    initializer_nbytes,
    load_model,
    output_data_path,
    staged_save,
    staged_stream,
    write_file_atomic,
)
from graphteleport.options import MODES, CofactorOptions, check_input_shapes, check_mode
from graphteleport.passes.teleport import TeleportPass, TeleportResult
from graphteleport.reports import (
    AnalysisReport,
    InputShapes,
    InspectReport,
    ModeReport,
    TeleportReport,
    report_json,
)
from graphteleport.tensorcheck import LoadedModel, TensorScales

if TYPE_CHECKING:  # the canonical and equalize passes are imported by their jobs only
    from graphteleport.fused import FusedSink
    from graphteleport.passes.canonical import CanonicalizePass, CanonicalResult
    from graphteleport.passes.equalize import EqualizePass, EqualizeResult, Method

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
PathArg = str | os.PathLike[str]
MAX_DRAWS = 1024


@dataclass(frozen=True)
class TeleportOptions(CofactorOptions):
    """Everything ``graphteleport MODEL -o OUT`` takes (see the CLI's --help): the
    cofactor options (seed 0 by default, as the CLI's) and how to verify.

    Checked on creation, as :class:`CofactorOptions` are, and also: ``rtol`` lies in
    (0, 1) (0 passes nothing that is not bit-identical — use ``exact`` for that —, 1 or
    more passes anything); input shapes are small enough to draw
    (:func:`~graphteleport.options.check_input_shapes`); ``draws`` lies in
    1..:data:`MAX_DRAWS` (0 only with ``inputs``).  A bad value raises
    :class:`InputError`, one line naming the CLI option.
    """

    seed: int | None = 0
    verify: bool = True
    rtol: float | None = None
    inputs: str | None = None  # an .npz of feeds
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    draws: int = verify_mod.DEFAULT_DRAWS  # random input draws verification compares
    verify_by: str = "auto"  # whole, pieces or auto (whole where it fits in memory)
    tensor_check: bool = True  # also the per-tensor (node-by-node) check

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rtol is not None and not (
            isinstance(self.rtol, int | float) and math.isfinite(self.rtol) and 0 < self.rtol < 1
        ):
            raise InputError(
                f"--rtol must be a number between 0 and 1 (exclusive), got {self.rtol} "
                "(for bit-identical outputs use --exact)"
            )
        check_input_shapes(self.input_shapes)
        if self.verify_by not in verify_mod.VERIFY_BY:
            choices = ", ".join(verify_mod.VERIFY_BY)
            raise InputError(f"--verify-by must be one of {choices}, got {self.verify_by!r}")
        draws = self.draws
        if isinstance(draws, bool) or not isinstance(draws, int):
            raise InputError(f"--draws must be an integer, got {draws!r}")
        if not 0 <= draws <= MAX_DRAWS or (draws == 0 and not self.inputs):
            raise InputError(
                f"--draws must be between 1 and {MAX_DRAWS} (0 only with --inputs), got {draws}"
            )


class Stopwatch:
    """Wall time per phase of a job (``seconds``, in the order they ran) and in all.

    ``with clock.phase("load"): ...`` adds the block's time to ``seconds["load"]``
    (also when it raises); :meth:`stop` sets ``seconds["total"]``, the time since the
    stopwatch was made.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def stop(self) -> None:
        self.seconds["total"] = time.perf_counter() - self.start


def _quiet(_: str) -> None:
    return None


def _feeds(
    model: ir.Model, opts: TeleportOptions, src: str | os.PathLike[str]
) -> tuple[list[dict[str, np.ndarray]], dict[str, tuple[int, ...]], onnx_frontend.ResolvedInputs]:
    """Verification inputs (the user's, then random draws; one set when the job is not
    verified, for its shapes), the concrete input shapes the analysis uses (those of the
    first set), and how the frontend sized the dynamic axes (probing ``src`` in
    onnxruntime where needed)."""
    resolved = onnx_frontend.resolve_input_shapes(
        model,
        opts.input_shapes,
        allow_dynamic=bool(opts.inputs),
        probe=onnx_frontend.ort_probe(src),
    )
    sets = verify_mod.draw_feed_sets(
        resolved.specs,
        opts.draws if opts.verify else min(opts.draws, 1),  # unverified: the shapes only
        _seed(opts),
        npz=opts.inputs,
        int_high=onnx_frontend.index_ranges(model),
    )
    return sets, {k: tuple(v.shape) for k, v in sets[0].items()}, resolved


def _seed(opts: TeleportOptions) -> int:
    """The seed of the verification's draws (the teleport's, 0 for None)."""
    return 0 if opts.seed is None else opts.seed


def _rtol(model: ir.Model, opts: TeleportOptions) -> float:
    if opts.rtol is not None:
        return opts.rtol
    return verify_mod.default_rtol(model)  # from the dtype and the depth


def inspect_file(
    path: str | os.PathLike[str],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    mode: str = "absorb",
    *,
    report_path: PathArg | None = None,
) -> InspectReport:
    """Analyse a model file only: free cofactors, groups, pins with reasons, per mode.

    ``report.modes`` gives, for absorb and insert mode, the free cofactors and the
    nodes insert mode may wrap (a Mul before and after each, where the drawn
    cofactors need it) and the edges it may scale.  With ``report_path`` the report
    is also written there as JSON (:meth:`InspectReport.to_json`), atomically; the
    path is checked before any work and may not name the model or its external data.
    """
    clock = Stopwatch()
    chosen = check_mode(mode)
    check_input_shapes(input_shapes or {})
    reports = [] if report_path is None else [("--report", report_path)]
    check_paths([("model file", path)], reports)
    graph = onnx_frontend.load(path, input_shapes)
    check_paths(_model_inputs(path, None, graph.model), reports)
    model, shapes = graph.model, graph.input_shapes
    per_mode: dict[str, ModeReport] = {}
    quivers: dict[str, Quiver] = {}
    for m in MODES:
        analysis = analyze_model(model, shapes, m)
        quivers[m] = quiver = Quiver.from_analysis(analysis)
        per_mode[m] = ModeReport(
            free_cofactors=quiver.free_cofactors,
            wrap_nodes=[w.node.name or "" for w in analysis.wraps],
            edge_scales=[f"{e.node.name or ''}:{e.index}" for e in analysis.edges],
        )
    figures = AnalysisReport.of(quivers[chosen])
    clock.stop()
    inputs = graph.inputs.to_report() if graph.inputs is not None else None
    report = InspectReport(figures, str(path), chosen, per_mode, clock.seconds, inputs)
    if report_path is not None:
        write_file_atomic(report_path, report_json(report))
    return report


def teleport_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    opts: TeleportOptions,
    progress: Progress = _quiet,
    *,
    report_path: PathArg | None = None,
    bars: bool = False,
) -> TeleportReport:
    """Teleport the model at ``src`` into ``dst``, verified unless ``opts.verify`` is False.

    Returns the report (:meth:`TeleportReport.to_json` gives the dict ``--report``
    writes), with the seconds of every phase: ``load``, ``inputs`` (input shapes and
    verification inputs), ``analyze`` and ``rewrite`` (the pass), ``report``, ``save``,
    ``verify``, ``total``.  With ``report_path`` the JSON report is committed together
    with the model (after it); after a failed verification it is written alone.  Paths
    are checked first; see the module docstring.

    A model with external data is streamed: its weights are rewritten one at a time
    straight into the staged ``<dst>.data`` (:func:`graphteleport.rewrite.streamed`),
    the unchanged ones copied by the kernel, so memory holds one weight, not the model
    (:func:`graphteleport.io.staged_stream`).  Where such a model is verified by pieces
    (``--verify-by pieces``, or ``auto`` when the whole models do not fit in memory),
    each block is checked as soon as its weights are written, on a second thread, while
    they are in the page cache (:mod:`graphteleport.fused`; the written model is
    verified again afterwards where it is not what the blocks ran).  ``bars`` shows a
    progress bar on stderr while the weights are written, once that takes over 2 s.
    """
    return _pass_file(
        src, dst, opts, progress, report_path,
        lambda shapes: TeleportPass(options=opts, input_shapes=shapes), bars=bars,
    )  # fmt: skip


def canonicalize_file(
    src: PathArg, dst: PathArg, opts: TeleportOptions,
    progress: Progress = _quiet, *, report_path: PathArg | None = None, bars: bool = False,
) -> TeleportReport:  # fmt: skip
    """Write the canonical form of the model at ``src`` (least sum of squared weights on
    its orbit, :class:`~graphteleport.passes.canonical.CanonicalizePass`) into ``dst``,
    verified like :func:`teleport_file` (``opts.mode`` and the verification options are
    used; the sampling options are not).  The report's ``canonical`` holds ``F`` before
    and after, the Newton iterations and the final gradient; its seconds add ``solve``;
    ``report_path`` and ``bars`` as for :func:`teleport_file`."""
    from graphteleport.passes.canonical import CanonicalizePass

    return _pass_file(
        src, dst, opts, progress, report_path,
        lambda shapes: CanonicalizePass(mode=opts.mode, input_shapes=shapes), bars=bars,
    )  # fmt: skip


def equalize_file(
    src: PathArg,
    dst: PathArg,
    opts: TeleportOptions,
    progress: Progress = _quiet,
    *,
    report_path: PathArg | None = None,
    method: Method = "cle",
    p: float | None = None,
    alpha: float = 0.5,
    calibration: PathArg | None = None,
    int8_ops: Sequence[str] | None = None,
    candidates: Sequence[str] | None = None,
) -> TeleportReport:
    """Equalize the model at ``src`` for per-tensor INT8 quantization
    (:class:`~graphteleport.passes.equalize.EqualizePass`: ``method`` cle with the balance's
    ``p`` (None: the pass's ``DEFAULT_P``), or smooth with ``alpha`` and the ``calibration``
    .npz) into ``dst``, verified like
    :func:`teleport_file` (``opts.mode``, ``opts.exact``, ``opts.rescale_clip`` and the
    verification options are used; the sampling options are not).  The report's
    ``equalize`` holds the per-tensor and per-class ranges before and after, the predicted
    INT8 steps and the fraction of weight elements moved; its seconds add ``solve`` and
    ``figures``; ``report_path`` as for :func:`teleport_file`; ``int8_ops``: auto's
    simulated quantizer's op types, ``candidates``: the auto candidates it computes
    (:class:`~graphteleport.passes.equalize.EqualizePass`)."""
    from graphteleport.activations import load_calibration
    from graphteleport.passes.equalize import DEFAULT_P, EqualizePass

    p = DEFAULT_P if p is None else p
    feeds: list[dict[str, np.ndarray]] = []
    if calibration is not None:
        check_paths([("calibration file", calibration)], [])
        feeds = load_calibration(calibration)
    settings = EqualizePass(
        method=method,
        mode=opts.mode,
        p=p,
        alpha=alpha,
        exact=opts.exact,
        calibration=feeds,
        int8_ops=int8_ops,
        candidates=candidates,
    ).settings  # every value checked before any file is written
    return _pass_file(
        src, dst, opts, progress, report_path,
        lambda shapes: EqualizePass(
            method=settings.method, mode=opts.mode, p=settings.p, alpha=settings.alpha,
            exact=settings.exact, rescale_clip=opts.rescale_clip, calibration=feeds,
            input_shapes=shapes, int8_ops=settings.int8_ops, candidates=settings.candidates,
        ),
        extra_inputs=[] if calibration is None else [("calibration file", calibration)],
    )  # fmt: skip


def _pass_file(
    src: PathArg,
    dst: PathArg,
    opts: TeleportOptions,
    progress: Progress,
    report_path: PathArg | None,
    make_pass: Callable[
        [dict[str, tuple[int, ...]]], TeleportPass | CanonicalizePass | EqualizePass
    ],
    extra_inputs: Sequence[tuple[str, PathArg]] = (),
    bars: bool = False,
) -> TeleportReport:
    """Load, run the pass ``make_pass(input_shapes)`` gives, report, verify, save
    (streamed for a model with external data: see :func:`teleport_file`)."""
    clock = Stopwatch()
    check_output_path(src, dst, report=report_path, inputs=opts.inputs, extra=extra_inputs)
    with clock.phase("load"):
        model = load_model(src)
    check_output_path(
        src, dst, report=report_path, inputs=opts.inputs, model=model, extra=extra_inputs
    )
    with clock.phase("inputs"):
        feeds, shapes, resolved = _feeds(model, opts, src)
    progress("analysing and rewriting")  # every check on the user's input has passed
    try:
        with contextlib.ExitStack() as stack:
            stream = _open_stream(stack, model, src, dst, bars, direct=not opts.verify)
            early = stack.enter_context(_early_draws(model, src, feeds, opts, stream))
            fused = _fused(stack, model, src, feeds, opts, stream)
            with _streamed(stream, fused):
                result = make_pass(shapes)(model)
            clock.seconds.update(result.seconds)
            with clock.phase("report"):
                inputs = resolved.to_report(shapes)
                report = _teleport_report(result, src, dst, inputs, clock.seconds)
            _save_verified(
                model, src, feeds, report, opts, progress, result.tensor_scales(),
                clock=clock, commit=_committer(report, report_path, clock), stream=stream,
                early=early, fused=fused,
            )  # fmt: skip
    except VerificationError:
        if report_path is not None:  # the failed report says why; no model is written
            clock.stop()
            write_file_atomic(report_path, report_json(report))
        raise
    return report


def _fused(
    stack: contextlib.ExitStack,
    model: ir.Model,
    src: PathArg,
    feeds: list[dict[str, np.ndarray]],
    opts: TeleportOptions,
    stream: StreamedSave | None,
) -> FusedSink | None:
    """The sink that verifies each block as the streamed rewrite writes it
    (:mod:`graphteleport.fused`), where the model is streamed and verified by pieces
    (:func:`graphteleport.verify.choose_method`); None otherwise.  ``stack`` stops its
    thread when the job ends."""
    if stream is None or not opts.verify:
        return None
    original = LoadedModel.load(src)
    if verify_mod.choose_method(opts.verify_by, original) != "pieces":
        return None
    from graphteleport.fused import FusedSink, FusedVerification
    from graphteleport.passes.teleport import promised_scales

    verification = FusedVerification(
        original, feeds, promised_scales if opts.tensor_check else None,
        str(stream.data.path.parent), rtol=_rtol(model, opts), seed=_seed(opts),
    )  # fmt: skip
    stack.callback(verification.close)
    return FusedSink(stream.data, model, verification)


def _streamed(
    stream: StreamedSave | None, fused: FusedSink | None
) -> contextlib.AbstractContextManager[None]:
    """The pass's weights streamed into ``stream`` (through ``fused`` where given)."""
    if stream is None:
        return contextlib.nullcontext()
    return rewrite_mod.streamed(fused if fused is not None else stream.data)


def _early_draws(
    model: ir.Model,
    src: PathArg,
    feeds: list[dict[str, np.ndarray]],
    opts: TeleportOptions,
    stream: StreamedSave | None,
) -> contextlib.AbstractContextManager[verify_mod.EarlyDraws | None]:
    """The original's verification draws, started in a second thread before the pass
    runs (:func:`graphteleport.verify.early_draws`: whole-model verification with two
    CPUs and the memory for it; not for a streamed model), closed with the job."""
    if not opts.verify or stream is not None:
        return contextlib.nullcontext()
    early = verify_mod.early_draws(src, model, feeds, opts.verify_by)
    return early if early is not None else contextlib.nullcontext()


def _open_stream(
    stack: contextlib.ExitStack,
    model: ir.Model,
    src: PathArg,
    dst: PathArg,
    bars: bool,
    direct: bool = False,
) -> StreamedSave | None:
    """Stage ``dst`` for a streamed rewrite when it gets external data (None otherwise),
    with a progress bar over the weights' bytes when ``bars``; ``stack`` removes the
    staged files (and the bar) when the job ends.  ``direct`` (unverified runs: nothing
    reads the data file back) writes it past the page cache (:class:`graphteleport.io.DataFile`)."""
    if output_data_path(model, dst) is None:
        return None
    from tqdm import tqdm  # the CLI's progress bar; imported only for big models

    bar = stack.enter_context(
        tqdm(
            total=initializer_nbytes(model), desc="writing weights", unit="B", unit_scale=True,
            unit_divisor=1024, delay=2.0, leave=False, disable=not bars, file=sys.stderr,
        )
    )  # fmt: skip
    staged = staged_stream(model, dst, protect=[src], on_bytes=bar.update, direct=direct)
    return stack.enter_context(staged)


def check_output_path(
    src: PathArg,
    dst: PathArg,
    *,
    report: PathArg | None = None,
    inputs: PathArg | None = None,
    model: ir.Model | None = None,
    extra: Sequence[tuple[str, PathArg]] = (),
) -> None:
    """Refuse, before any work, paths a run cannot use or would destroy.

    Inputs (the model ``src``, the ``inputs`` .npz, and with ``model`` the external
    data files it reads) must be regular files; outputs (``dst``, with ``model`` the
    data file ``dst`` gets when the model keeps external data, and ``report``) must be
    writable regular or new files; no output may be an input or another output, also
    through ``..``, symbolic or hard links (:func:`graphteleport.io.check_paths`).
    Call it without ``model`` before loading and with it after.  ``extra``: more
    ``(role, path)`` the run reads (an equalize's calibration file).
    """
    outputs: list[tuple[str, PathArg]] = [("-o", dst)]
    data = output_data_path(model, dst) if model is not None else None
    if data is not None:
        outputs.append(("the data file of -o", data))
    if report is not None:
        outputs.append(("--report", report))
    check_paths([*_model_inputs(src, inputs, model), *extra], outputs)


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
    report: TeleportReport, report_path: PathArg | None, clock: Stopwatch
) -> Callable[[StagedSave], list[Path]]:
    """The commit of a verified (or unverified) staged model, with its report.

    The report is completed (paths written, total time), staged beside its target
    and renamed into place right after the model, in one :meth:`StagedSave.commit`
    (model first: a report on disk always describes a model that is there).  A
    report that cannot be staged raises :class:`InputError` before anything is
    renamed, so nothing is written.
    """

    def commit(staged: StagedSave) -> list[Path]:
        report.written = [str(p) for p in staged.paths]
        clock.stop()
        if report_path is not None:
            staged.stage_file(report_path, report_json(report))
        return staged.commit()

    return commit


def _save_verified(
    model: ir.Model,
    src: str | os.PathLike[str],
    feeds: list[dict[str, np.ndarray]],
    report: TeleportReport,
    opts: TeleportOptions,
    progress: Progress,
    scales: TensorScales,
    *,
    clock: Stopwatch,
    commit: Callable[[StagedSave], list[Path]],
    stream: StreamedSave | None = None,
    early: verify_mod.EarlyDraws | None = None,
    fused: FusedSink | None = None,
) -> None:
    """Stage the model beside ``report.output`` (or finish the ``stream`` it was
    rewritten into), verify it there (unless ``opts.verify`` is False; with the
    original's ``early`` draws where they were started; by the blocks ``fused`` checked
    while the weights were written, where that check stands for the written files) and
    ``commit`` it; a failed verification raises VerificationError (with ``err.report``)
    and the staged files are removed."""
    with contextlib.ExitStack() as stack:
        with clock.phase("save"):
            staged: StagedSave
            if stream is None:
                staged = stack.enter_context(staged_save(model, report.output, protect=[src]))
            else:
                stream.finish(model)
                staged = stream
        if opts.verify:
            progress("verifying with onnxruntime")
            promise = scales if opts.tensor_check else None
            with clock.phase("verify"):
                done = None if fused is None else fused.verification.result(
                    str(staged.model_path), promise, _rtol(model, opts)
                )  # fmt: skip
                result = done or verify_mod.verify_teleport(
                    src, staged.model_path, feeds, promise,
                    rtol=_rtol(model, opts), seed=_seed(opts), by=opts.verify_by, early=early,
                )  # fmt: skip
            report.verification = result
            if not result.passed:
                err = VerificationError(result.summary() + "; nothing was written")
                err.report = report  # type: ignore[attr-defined]
                raise err
        commit(staged)


def _teleport_report(
    result: TeleportResult,
    src: PathArg,
    dst: PathArg,
    inputs: InputShapes,
    seconds: dict[str, float],
) -> TeleportReport:
    """The report of a teleport (its verification and written files come later)."""
    free = result.pair_values[result.analysis.solution.free]
    return TeleportReport(
        analysis=AnalysisReport.of(Quiver.from_analysis(result.analysis)),
        model=str(src),
        output=str(dst),
        options=result.options,
        stats=result.stats,
        inserted=result.inserted,
        cofactor_range=(float(free.min()), float(free.max())) if free.size else None,
        range_fixes=result.range_report(),  # pairs moved toward 1 to stay in range
        input_shapes=inputs,
        seconds=seconds,
        canonical=_canonical_figures(result),
        equalize=result.figures.to_json() if _is_equalize(result) and result.figures else None,
        clips_split=len(result.clips.clips),
    )


def _canonical_figures(result: TeleportResult) -> dict[str, float] | None:
    """A canonical form's optimisation figures for the report (None for a teleport)."""
    if not _is_canonical(result) or result.minimum is None:
        return None
    m = result.minimum
    return {
        "objective_before": m.objective_before,
        "objective_after": m.objective_after,
        "constant": m.constant,
        "iterations": m.iterations,
        "cg_steps": m.cg_steps,
        "gradient": m.gradient,
        "signs_flipped": result.flipped,
        "signs_undecided": result.sign_undecided,
    }


def _is_canonical(result: TeleportResult) -> TypeGuard[CanonicalResult]:
    """Whether ``result`` is a canonical form's, without importing that pass (an instance
    exists only once its module is loaded)."""
    module = sys.modules.get("graphteleport.passes.canonical")
    return module is not None and isinstance(result, module.CanonicalResult)


def _is_equalize(result: TeleportResult) -> TypeGuard[EqualizeResult]:
    """Whether ``result`` is an equalization's, without importing that pass."""
    module = sys.modules.get("graphteleport.passes.equalize")
    return module is not None and isinstance(result, module.EqualizeResult)

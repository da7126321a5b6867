"""TeleportPass: rescale a model's neurons without changing its function.

Analyse the model (:func:`graphteleport.analysis.analyze_model`), draw one
cofactor per free cofactor pair (:mod:`graphteleport.cofactors`), and rewrite the
weights (:mod:`graphteleport.rewrite`): for a weight between neurons s → t,
``W' = τ_t · W / τ_s``.  In absorb mode the graph's nodes are unchanged; only
weight values change (plus a private copy of a uniform weight an exporter shared
by accident, where its uses now differ).  Insert mode also adds ``Mul`` nodes
around activations that are not equivariant for the drawn cofactors
(:mod:`graphteleport.insertion`).

Before anything is written the draws are fitted to the weights' dtypes
(:mod:`graphteleport.ranges`): a pair whose weights or inserted constants would
overflow, underflow to 0 or become subnormal is moved toward 1, or pinned, and
listed in :attr:`TeleportResult.range_fixes`.  The common case costs one scan of
each weight's bits, made while its new value is computed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import onnx_ir as ir

from graphteleport import cofactors, ranges
from graphteleport.algebra import group_part
from graphteleport.analysis import AnalysisResult, analyze_model
from graphteleport.clips import ClipSplit, split_clips
from graphteleport.insertion import InsertStats, insert_nodes
from graphteleport.options import CofactorOptions, check_input_shapes
from graphteleport.rewrite import RewriteStats, commit, copy_ahead, narrow, prepare, trim_heap
from graphteleport.tensorcheck import TensorScales

if TYPE_CHECKING:
    from typing import Unpack

    from graphteleport.options import OptionFields

log = logging.getLogger(__name__)


@dataclass
class TeleportResult(ir.passes.PassResult):
    """What the teleport did: the model (changed in place), cofactors and counts.

    Attributes:
        analysis: the analysis the cofactors were drawn for.
        options: the options of the teleport.
        pair_values: one value per cofactor pair (1 where pinned), after range fits.
        tau: one cofactor per neuron, ``pair_values[pair]`` with the pair's sign.
        stats: what the weight rewrite changed.
        inserted: what insert mode added (all zero in absorb mode).
        range_fixes: pairs moved toward 1 to keep weights in range.
        seconds: wall time of the pass's phases, ``analyze`` and ``rewrite``.
        clips: the Clips rewritten into rescalable form first (``rescale_clip``).
    """

    analysis: AnalysisResult
    options: CofactorOptions
    pair_values: np.ndarray
    tau: np.ndarray
    stats: RewriteStats
    inserted: InsertStats
    range_fixes: list[ranges.RangeFix]
    seconds: dict[str, float]
    clips: ClipSplit = field(default_factory=ClipSplit)

    @property
    def free_cofactors(self) -> int:
        return self.analysis.free_cofactors

    def tensor_scales(self) -> TensorScales:
        """The promise the per-tensor check verifies: value ``v`` of the teleported model is
        ``s_v ⊙`` the original's, ``s_v = τ[ids(v)]`` — for a wrapped activation's output
        in insert mode only the part of τ its group commutes with (``|τ|``, ``sign τ`` or
        1; :mod:`graphteleport.insertion`): its ``Mul`` of the rest comes after it."""
        return promised_scales(self.analysis, self.tau, self.inserted.wrapped)

    def range_report(self) -> list[RangeFixCount]:
        """The pairs moved toward 1 to keep weights in range, by reason, in the order
        the reasons first occur."""
        out: dict[str, RangeFixCount] = {}
        for fix in self.range_fixes:
            row = out.setdefault(fix.reason, RangeFixCount(fix.reason))
            row.cofactors += 1
            row.pinned += fix.pinned
        return list(out.values())


def promised_scales(
    analysis: AnalysisResult, tau: np.ndarray, wrapped: Mapping[str, str] | None = None
) -> TensorScales:
    """:meth:`TeleportResult.tensor_scales` of ``analysis`` for per-neuron ``tau``
    (``wrapped``: insert mode's wrapped activations, :attr:`InsertStats.wrapped`)."""
    wrapped = wrapped or {}
    scales: dict[str, np.ndarray] = {}
    tracked: set[str] = set()
    for name, ids in analysis.neurons.items():
        tracked.add(name)
        s = tau[ids]
        if name in wrapped:
            s = group_part(s, wrapped[name])
        if s.size and np.any(s != 1.0):
            scales[name] = s
    return TensorScales(scales, frozenset(tracked))


@dataclass
class RangeFixCount:
    """How many pairs were moved toward 1 for one reason, and how many of them ended
    pinned (``τ = ±1``)."""

    reason: str
    cofactors: int = 0
    pinned: int = 0


class TeleportPass(ir.passes.InPlacePass):
    """Teleport a model in place.

    Example::

        import onnx_ir as ir
        from graphteleport.passes.teleport import TeleportPass

        model = ir.load("model.onnx")
        result = TeleportPass(seed=0)(model)
        print(result.free_cofactors, result.stats.weights_changed)
        ir.save(result.model, "teleported.onnx")
    """

    def __init__(
        self,
        *,
        options: CofactorOptions | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        **fields: Unpack[OptionFields],
    ) -> None:
        """``options``, or keyword arguments naming its fields (``mode``, ``sampling``,
        ``cob_range``, ``center``, ``seed``, ``exact``, ``rescale_residual``,
        ``rescale_clip``; with
        ``options`` too they replace its values): :meth:`CofactorOptions.build`, which
        checks them.  ``input_shapes`` sizes the inputs' dynamic axes for the analysis."""
        super().__init__()
        self.options = CofactorOptions.build(options, **fields)
        check_input_shapes(input_shapes or {})
        self.input_shapes = dict(input_shapes or {})

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> TeleportResult:
        """Teleport the model in place (onnx_ir's pass protocol, with the result typed)."""
        result = super().__call__(model_or_result)
        assert isinstance(result, TeleportResult)
        return result

    def call(self, model: ir.Model) -> TeleportResult:
        opts = self.options
        t0 = time.perf_counter()
        clips = split_clips(model) if opts.rescale_clip else ClipSplit()
        analysis = analyze_model(model, self.input_shapes, opts.mode, opts.rescale_residual)
        t1 = time.perf_counter()
        sol = analysis.solution
        values = cofactors.sample(sol.code, sol.free, opts)
        applied = apply_values(
            model, analysis, values, insert=opts.mode == "insert", exact=opts.exact
        )
        t2 = time.perf_counter()
        stats = applied[1]
        log.info(
            "teleported: %d free cofactors, %d/%d weights changed",
            int(sol.free.sum()),
            stats.weights_changed,
            stats.weights_total,
        )
        seconds = {"analyze": t1 - t0, "rewrite": t2 - t1}
        result = result_of(
            TeleportResult, model, analysis, opts, values, applied, seconds, clips=clips
        )
        result.modified = result.modified or bool(clips.clips)
        return result


Applied = tuple[np.ndarray, RewriteStats, InsertStats, list[ranges.RangeFix]]
Result = TypeVar("Result", bound=TeleportResult)


def result_of(
    cls: type[Result],
    model: ir.Model,
    analysis: AnalysisResult,
    options: CofactorOptions,
    values: np.ndarray,
    applied: Applied,
    seconds: dict[str, float],
    **extra: Any,
) -> Result:
    """The pass result ``cls`` (a :class:`TeleportResult`) of rewriting ``model`` for
    ``values`` (``applied``: what :func:`apply_values` returned), with ``extra`` fields."""
    tau, stats, inserted, fixes = applied
    return cls(
        model=model,
        modified=bool(stats.changed) or inserted.nodes_added > 0,
        analysis=analysis,
        options=options,
        pair_values=values,
        tau=tau,
        stats=stats,
        inserted=inserted,
        range_fixes=fixes,
        seconds=seconds,
        **extra,
    )


def apply_values(
    model: ir.Model,
    analysis: AnalysisResult,
    values: np.ndarray,
    *,
    insert: bool = False,
    exact: bool = False,
    arrays: Mapping[str, np.ndarray] | None = None,
    consume: bool = False,
) -> Applied:
    """Rewrite ``model`` in place for one value per cofactor pair: fit ``values`` (in
    place) to the weights' ranges, store the new weights and, with ``insert``, add insert
    mode's nodes.  Returns per-neuron τ, the rewrite's and insertion's counts and the
    range fixes.

    Every ``W · S`` is computed first (each weight read once, its magnitudes measured in
    the same pass); only when a weight's quick check failed, or in insert mode (its
    constants), are the values fitted — and, if any moved, the products recomputed.
    A model with float16 weights (:func:`~graphteleport.rewrite.narrow`: its fit nearly
    always moves values) is surveyed and fitted first instead
    (:func:`~graphteleport.ranges.survey`: each weight read once for its magnitudes and
    the first round's cells), so its products are computed once; the fit's last round
    checked the final values against the magnitudes :func:`prepare` returns — the
    survey's for a finite weight (not measured again: :meth:`~graphteleport.ranges.
    Survey.known`), measured again for any other — so they are fitted again only if
    those differ (the safety net; never in practice).  The
    same magnitudes give the same fit: the values, and so the outputs, are those of
    fitting after the products.  ``arrays``:
    the stored tensors the caller already read (:func:`~graphteleport.orbit.stored_arrays`),
    read from there instead of again (:func:`~graphteleport.rewrite.prepare`);
    ``consume``: they are the caller's own copies, which the products may overwrite
    (``prepare``'s ``consume``: a second ``prepare`` then reads the model's tensors).
    """
    sol = analysis.solution
    surveyed = ranges.survey(analysis, values, arrays) if narrow(analysis) else None
    early = surveyed.magnitudes if surveyed is not None else None
    fixes: list[ranges.RangeFix] = []
    if early is not None:
        # (streamed: the untouched tensors copied on the core the fit leaves idle)
        copy_ahead(model, analysis, sol.cofactors(values))
        fixes = ranges.fit(analysis, values, early, insert=insert, exact=exact, primed=surveyed)
    known = surveyed.known() if surveyed is not None else None
    del surveyed  # (its cells — the elements at risk of every weight — not during the products)
    if early is not None:
        trim_heap()
    tau = sol.cofactors(values)
    prepared = prepare(analysis, tau, arrays, known, consume=consume)
    stale = early is not None and early != prepared.magnitudes  # (the safety net)
    if stale or (early is None and (prepared.out_of_range or insert)):
        more = ranges.fit(analysis, values, prepared.magnitudes, insert=insert, exact=exact)
        if more:
            fixes = _merged(fixes, more)
            tau = sol.cofactors(values)
            prepared = prepare(analysis, tau, None if consume else arrays)
    stats = commit(model, prepared)
    inserted = insert_nodes(model, analysis, tau) if insert else InsertStats()
    return tau, stats, inserted, fixes


def _merged(first: list[ranges.RangeFix], then: list[ranges.RangeFix]) -> list[ranges.RangeFix]:
    """Two fits' fixes as one: each pair once, with its first reason and last value."""
    out = {f.pair: f for f in first}
    for f in then:
        reason = out[f.pair].reason if f.pair in out else f.reason
        out[f.pair] = ranges.RangeFix(f.pair, f.value, reason)
    return [out[p] for p in sorted(out)]

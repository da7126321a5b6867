"""TeleportPass: rescale a model's neurons without changing its function.

Analyse the model (:func:`graphteleport.analysis.driver_model`), draw one
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
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphteleport import cofactors, ranges
from graphteleport.analysis.driver import Analysis, analyze_model
from graphteleport.errors import InputError
from graphteleport.insertion import InsertStats, insert_nodes
from graphteleport.rewrite import RewriteStats, commit, prepare
from graphteleport.tensorcheck import TensorScales

log = logging.getLogger(__name__)
MODES = ("absorb", "insert")
#: The most elements an input shape may have (a float32 input of this size is 8 GiB).
MAX_INPUT_ELEMENTS = 2**31


def check_input_shapes(shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise InputError unless every shape is a tuple of non-negative integers whose
    product is at most :data:`MAX_INPUT_ELEMENTS` (larger inputs cannot be drawn or run)."""
    for name, shape in shapes.items():
        dims = list(shape)
        if any(isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0 for d in dims):
            raise InputError(f"input shape {name}: sizes must be non-negative integers, got {dims}")
        elements = math.prod(int(d) for d in dims)
        if elements > MAX_INPUT_ELEMENTS:
            raise InputError(
                f"input shape {name}={','.join(map(str, dims))} has {elements:.3g} elements, "
                f"over the limit of 2**31 per input; choose smaller sizes"
            )


@dataclass
class TeleportResult(ir.passes.PassResult):
    """What the teleport did: the model (changed in place), cofactors and counts."""

    analysis: Analysis | None = None
    pair_values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tau: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stats: RewriteStats = field(default_factory=RewriteStats)
    inserted: InsertStats = field(default_factory=InsertStats)
    seconds: dict[str, float] = field(default_factory=dict)
    exact: bool = False
    range_fixes: list[ranges.RangeFix] = field(default_factory=list)

    @property
    def free_cofactors(self) -> int:
        return int(self.analysis.solution.free.sum()) if self.analysis else 0

    def tensor_scales(self) -> TensorScales:
        """The promise the per-tensor check verifies: value ``v`` of the teleported model is
        ``s_v ⊙`` the original's, ``s_v = τ[ids(v)]`` (1 for a wrapped activation's output
        in insert mode: its ``Mul(τ)`` comes after it)."""
        if self.analysis is None:
            return TensorScales({})
        ctx, unscaled = self.analysis.ctx, set(self.inserted.unscaled)
        scales: dict[str, np.ndarray] = {}
        tracked: set[str] = set()
        for key, ids in ctx.values.items():
            name = ctx.outputs[key].name
            if not name:
                continue
            tracked.add(name)
            s = self.tau[ids]
            if name not in unscaled and s.size and np.any(s != 1.0):
                scales[name] = s
        return TensorScales(scales, frozenset(tracked))

    def range_report(self) -> list[dict[str, object]]:
        """The pairs moved toward 1 to keep weights in range, by reason: how many, and
        how many of them ended pinned (``τ = ±1``)."""
        out: dict[str, dict[str, object]] = {}
        for fix in self.range_fixes:
            row = out.setdefault(fix.reason, {"reason": fix.reason, "cofactors": 0, "pinned": 0})
            row["cofactors"] = int(row["cofactors"]) + 1  # type: ignore[call-overload]
            row["pinned"] = int(row["pinned"]) + fix.pinned  # type: ignore[call-overload]
        return list(out.values())


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
        mode: str = "absorb",
        sampling: str = "intra_landscape",
        cob_range: float = 0.5,
        center: float = 1.0,
        seed: int | None = None,
        exact: bool = False,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        rescale_residual: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        cofactors.check_sampling(sampling, cob_range, center)
        cofactors.check_seed(seed)
        check_input_shapes(input_shapes or {})
        self.mode = mode
        self.sampling = sampling
        self.cob_range = cob_range
        self.center = center
        self.seed = seed
        self.exact = exact
        self.input_shapes = dict(input_shapes or {})
        self.rescale_residual = rescale_residual

    def call(self, model: ir.Model) -> TeleportResult:
        t0 = time.perf_counter()
        analysis = analyze_model(model, self.input_shapes, self.mode, self.rescale_residual)
        t1 = time.perf_counter()
        sol = analysis.solution
        values = cofactors.sample(
            sol.code,
            sol.free,
            self.sampling,
            self.cob_range,
            center=self.center,
            seed=self.seed,
            exact=self.exact,
        )
        tau, stats, fixes = self._rewrite(model, analysis, values)
        inserted = insert_nodes(model, analysis, tau) if self.mode == "insert" else InsertStats()
        t2 = time.perf_counter()
        log.info(
            "teleported: %d free cofactors, %d/%d weights changed",
            int(sol.free.sum()),
            stats.weights_changed,
            stats.weights_total,
        )
        return TeleportResult(
            model=model,
            modified=bool(stats.changed) or inserted.nodes_added > 0,
            inserted=inserted,
            analysis=analysis,
            pair_values=values,
            tau=tau,
            stats=stats,
            seconds={"analyze": t1 - t0, "rewrite": t2 - t1},
            exact=self.exact,
            range_fixes=fixes,
        )

    def _rewrite(
        self, model: ir.Model, analysis: Analysis, values: np.ndarray
    ) -> tuple[np.ndarray, RewriteStats, list[ranges.RangeFix]]:
        """Fit ``values`` (in place) to the weights' ranges and store the new weights.

        Every ``W · S`` is computed first (each weight read once, its magnitudes measured
        in the same pass); only when a weight's quick check failed, or in insert mode (its
        constants), are the values fitted — and, if any moved, the products recomputed.
        """
        sol = analysis.solution
        tau = sol.cofactors(values)
        prepared = prepare(analysis, tau)
        fixes: list[ranges.RangeFix] = []
        insert = self.mode == "insert"
        if prepared.out_of_range or insert:
            fixes = ranges.fit(
                analysis, values, prepared.magnitudes, insert=insert, exact=self.exact
            )
        if fixes:
            tau = sol.cofactors(values)
            prepared = prepare(analysis, tau)
        return tau, commit(model, prepared), fixes

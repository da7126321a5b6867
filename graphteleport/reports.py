"""What the file-to-file jobs report, typed, each with one JSON form.

:class:`TeleportReport` is what ``graphteleport MODEL -o OUT`` reports
(:func:`graphteleport.pipeline.teleport_file` returns it), :class:`InspectReport` what
``graphteleport inspect`` reports; both carry the analysis figures
(:class:`AnalysisReport`).  ``to_json()`` gives the dict ``--report`` writes (the keys
the README's CLI section lists, in a fixed order; values JSON lacks, such as a
non-finite error, as ``None``), and :func:`report_json` its bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from graphteleport.analysis import PinGroup, Quiver
from graphteleport.insertion import InsertStats
from graphteleport.options import CofactorOptions, Mode
from graphteleport.passes.teleport import RangeFixCount
from graphteleport.rewrite import RewriteStats
from graphteleport.verify import VerificationResult

#: ``{input: {"shape", "declared", "axes", "source", "brief"}}``
#: (:meth:`graphteleport.frontends.onnx.ResolvedInputs.to_report`).
InputShapes = dict[str, dict[str, Any]]


def report_json(report: TeleportReport | InspectReport) -> bytes:
    """The report as the JSON bytes ``--report`` writes (values JSON lacks as strings)."""
    return json.dumps(report.to_json(), indent=2, default=str).encode()


@dataclass
class AnalysisReport:
    """The analysis figures: free cofactors (the teleportation dimension), neurons,
    cofactor pairs, free cofactors per group, pins by reason, the quiver's size."""

    free_cofactors: int
    neurons: int
    cofactor_pairs: int
    groups: dict[str, int]
    pinned: list[PinGroup]
    neuron_groups: int
    weights_in_quiver: int

    @classmethod
    def of(cls, quiver: Quiver) -> AnalysisReport:
        return cls(
            free_cofactors=quiver.free_cofactors,
            neurons=quiver.neurons,
            cofactor_pairs=int(quiver.analysis.solution.touched.sum()),
            groups=quiver.groups(),
            pinned=quiver.pinned(),
            neuron_groups=quiver.vertex_count,
            weights_in_quiver=quiver.arrow_count,
        )

    @property
    def pinned_cofactors(self) -> int:
        return sum(p.cofactors for p in self.pinned)

    def to_json(self) -> dict[str, Any]:
        return {
            "free_cofactors": self.free_cofactors,
            "neurons": self.neurons,
            "cofactor_pairs": self.cofactor_pairs,
            "groups": dict(self.groups),
            "pinned": [p.to_dict() for p in self.pinned],
            "neuron_groups": self.neuron_groups,
            "weights_in_quiver": self.weights_in_quiver,
        }


@dataclass
class TeleportReport:
    """A teleport of a file: where from and to, with which options, what changed, how
    the inputs were sized, the verification (None until it ran, or with ``--no-verify``),
    the files written (None until committed) and the seconds of each phase.

    ``seconds``: ``load``, ``inputs`` (input shapes and verification inputs),
    ``analyze``, ``rewrite``, ``report``, ``save``, ``verify``, ``total``.
    """

    analysis: AnalysisReport
    model: str
    output: str
    options: CofactorOptions
    stats: RewriteStats
    inserted: InsertStats
    cofactor_range: tuple[float, float] | None
    range_fixes: list[RangeFixCount]
    input_shapes: InputShapes
    seconds: dict[str, float]
    verification: VerificationResult | None = None
    written: list[str] | None = None
    canonical: dict[str, float] | None = None  # canonicalize: F before/after, iterations
    equalize: dict[str, Any] | None = None  # equalize: ranges, steps, fraction moved
    clips_split: int = 0  # Clips rewritten as Min(Relu(x), c) first (rescale_clip)

    def to_json(self) -> dict[str, Any]:
        o, s, i = self.options, self.stats, self.inserted
        v = self.verification
        out = self.analysis.to_json()
        out.update(
            model=self.model,
            output=self.output,
            mode=o.mode,
            sampling=o.sampling,
            cob_range=o.cob_range,
            seed=o.seed,
            exact=o.exact,
            initializers_changed=s.weights_changed,
            initializers_total=s.weights_total,
            elements_changed=s.elements_changed,
            elements_total=s.elements_total,
            private_copies=list(s.copies),
            nodes_added=i.nodes_added,
            inserted={"wraps": i.wraps, "edge_scales": i.edge_scales, "merged": i.merged},
            verification=v.to_dict() if v is not None else None,
            seconds=dict(self.seconds),
            cofactor_range=list(self.cofactor_range) if self.cofactor_range else None,
            range_fixes=[asdict(f) for f in self.range_fixes],
            input_shapes=self.input_shapes,
        )
        if o.rescale_clip:  # Clips rewritten as Min(Relu(x), c) first
            out.update(rescale_clip=True, clips_split=self.clips_split)
        if self.canonical is not None:  # nothing was drawn: no sampling to report
            for key in ("sampling", "cob_range", "seed"):
                del out[key]
            out["canonical"] = dict(self.canonical)
        if self.equalize is not None:  # chosen, not drawn: no sampling to report
            for key in ("sampling", "cob_range", "seed"):
                del out[key]
            out["equalize"] = dict(self.equalize)
        if self.written is not None:
            out["written"] = list(self.written)
        return out


@dataclass
class ModeReport:
    """What one mode allows: free cofactors, the nodes insert mode may wrap and the
    edges it may scale (``node:input``)."""

    free_cofactors: int
    wrap_nodes: list[str] = field(default_factory=list)
    edge_scales: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    """An analysis of a file: its figures in the chosen mode, each mode's summary, how
    the inputs were sized and the seconds it took (``total``)."""

    analysis: AnalysisReport
    model: str
    mode: Mode
    modes: dict[str, ModeReport]
    seconds: dict[str, float]
    input_shapes: InputShapes | None = None

    def to_json(self) -> dict[str, Any]:
        out = self.analysis.to_json()
        out.update(
            model=self.model,
            mode=self.mode,
            modes={m: _mode_json(r) for m, r in self.modes.items()},
            seconds=dict(self.seconds),
        )
        if self.input_shapes is not None:
            out["input_shapes"] = self.input_shapes
        return out


def _mode_json(r: ModeReport) -> Mapping[str, Any]:
    return {
        "free_cofactors": r.free_cofactors,
        "wrap_nodes": list(r.wrap_nodes),
        "edge_scales": list(r.edge_scales),
    }

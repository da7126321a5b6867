"""Symmetry analysis: the op rule table, the constraint solve and the quiver.

``analyze(model)`` returns the :class:`Quiver` of an onnx_ir model: every free
cofactor, the group each ranges over, and every pin with its reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx_ir as ir

from graphteleport.analysis.driver import Analysis, analyze_model
from graphteleport.analysis.quiver import PinGroup, Quiver
from graphteleport.analysis.rules import RULES


def analyze(
    model: ir.Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    mode: str = "absorb",
) -> Quiver:
    """The quiver of ``model`` (concrete ``input_shapes`` for dynamic dimensions)."""
    return Quiver.from_analysis(analyze_model(model, input_shapes, mode))


__all__ = ["RULES", "Analysis", "PinGroup", "Quiver", "analyze", "analyze_model"]

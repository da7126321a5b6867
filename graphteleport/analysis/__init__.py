"""Symmetry analysis: the op rule table, the constraint solve and the quiver.

The package's public face is this module; nothing outside the package imports its
submodules.  :func:`analyze_model` returns an :class:`AnalysisResult` (``result.py``): the
cofactor classes (:class:`Solution`), the neurons of each value, how every stored tensor
scales (:class:`Weight`, its uses as :class:`Absorb` with :class:`Factor` s), and insert
mode's :class:`Wrap` s and :class:`EdgeScale` s.  The analysis' working state — the rules'
context, the constraint store, the graph's index — stays inside.  ``analyze(model)`` gives
the :class:`Quiver` instead: every free cofactor, the group each ranges over, and every pin
with its reason.  :func:`index_graph` indexes a graph once for several analyses
(:class:`GraphIndex`, which also evaluates constants for a frontend).

Inside: ``driver.py`` runs the rules (``rules.py``, the op table) over the graph
(``graphinfo.py``: shapes, constants, provenance) through the rules' context
(``context.py``) into the constraint store (``constraints.py``), makes shared weights
consistent (``uses.py``: every read of a stored tensor), and solves (``solve.py``, with
:mod:`graphteleport.unionfind`); ``quiver.py`` draws the result as a graph.  How a weight
scales with the cofactors, ``S = Π τ^e``, is computed by :mod:`graphteleport.algebra`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx_ir as ir

from graphteleport.algebra import Factor
from graphteleport.analysis.constraints import Absorb, Block, ConstRef, EdgeScale, Wrap
from graphteleport.analysis.driver import (
    GraphIndex,
    analyze_model,
    complete_input_shapes,
    index_graph,
)
from graphteleport.analysis.graphinfo import FLOAT_TYPES
from graphteleport.analysis.quiver import PinGroup, Quiver
from graphteleport.analysis.result import AnalysisResult, Weight
from graphteleport.analysis.rules import RULES
from graphteleport.analysis.solve import GROUPS, Solution


def analyze(
    model: ir.Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    mode: str = "absorb",
) -> Quiver:
    """The quiver of ``model`` (concrete ``input_shapes`` for dynamic dimensions)."""
    return Quiver.from_analysis(analyze_model(model, input_shapes, mode))


__all__ = [
    "FLOAT_TYPES",
    "GROUPS",
    "RULES",
    "Absorb",
    "AnalysisResult",
    "Block",
    "ConstRef",
    "EdgeScale",
    "Factor",
    "GraphIndex",
    "PinGroup",
    "Quiver",
    "Solution",
    "Weight",
    "Wrap",
    "analyze",
    "analyze_model",
    "complete_input_shapes",
    "index_graph",
]

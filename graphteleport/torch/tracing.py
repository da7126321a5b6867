"""A module's trace and its analysis: what every teleport of an ``nn.Module`` starts from.

:func:`traced` takes the module's graph form from :func:`graphteleport.frontends.torch.trace`
(``torch.fx`` where it translates exactly, else the exporter; the translators themselves are
frontends) and analyses it with :func:`analyze`: only the module's own parameters and
buffers may absorb a scaling, and BatchNorm is analysed in its training form.  The cofactor
buffers an earlier insert-mode teleport hung on activation modules (:data:`IN`, :data:`OUT`)
are constants to the analysis, not tensors it may rewrite.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from graphteleport.analysis import AnalysisResult, analyze_model
from graphteleport.frontends.torch import TorchGraph, trace

IN, OUT = "graphteleport_in", "graphteleport_out"  # a hooked module's buffers (call k: ``_k``)
_COFACTOR_BUFFER = re.compile(rf"(.*\.)?({IN}|{OUT})(_\d+)?")


def traced(model: nn.Module, example_inputs: Any, mode: str) -> tuple[TorchGraph, AnalysisResult]:
    """``model`` traced on ``example_inputs`` and analysed in ``mode``."""
    graph = trace(model, example_inputs)
    return graph, analyze(graph, mode)


def analyze(graph: TorchGraph, mode: str = "absorb") -> AnalysisResult:
    """The analysis of a traced module: only its own tensors may absorb a scaling.

    Cofactor buffers of an earlier insert-mode teleport are left to the hooks: the
    analysis sees them as fixed constants, and the hooks of a later teleport compose with
    them (:mod:`graphteleport.torch.insert`).
    """
    names = {n for n in graph.tensors if not _is_cofactor_buffer(n)}
    return analyze_model(
        graph.model,
        graph.input_shapes,
        mode,
        writable=names.__contains__,
        training=True,
        index=graph.index,
    )


def _is_cofactor_buffer(name: str) -> bool:
    return "graphteleport_" in name and _COFACTOR_BUFFER.fullmatch(name) is not None

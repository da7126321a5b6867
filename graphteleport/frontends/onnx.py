"""ONNX frontend: a file from any exporter to the graph form the analysis reads.

The graph form is an onnx_ir model (weights memory-mapped when they live in external
data) plus concrete shapes for its inputs: dynamic batch axes become 1, dynamic axes
of integer inputs (token ids, masks) a short sequence, and any other dynamic axis
needs the user's ``--input-shape`` (see :func:`graphteleport.verify.input_specs`).
Weights may be initializers or ``Constant`` nodes; opsets 11 and newer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from graphteleport.io import load_model
from graphteleport.verify import input_specs


@dataclass
class OnnxGraph:
    """A loaded model and the concrete input shapes to analyse it at."""

    model: ir.Model
    input_shapes: dict[str, tuple[int, ...]]


def load(
    path: str | os.PathLike[str],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> OnnxGraph:
    """Load ``path`` (InputError with one clear line if it cannot be used)."""
    model = load_model(path)
    specs = input_specs(model, input_shapes or {})
    return OnnxGraph(model, {s.name: s.shape for s in specs})

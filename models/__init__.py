"""Reference architectures, their ONNX export, and small shipped ONNX fixtures.

Importing this package does not import torch, so ONNX-only code can find the fixtures:
``models.FIXTURES_DIR / "mlp_small.onnx"``.  The torch parts live in
:mod:`models.architectures` (constructors and the ``ARCHITECTURES`` registry),
:mod:`models.export` (``export`` and its CLI), :mod:`models.check` (export-and-compare every
registry entry) and :mod:`models.make_fixtures` (regenerates ``models/onnx/``).
"""

from __future__ import annotations

from pathlib import Path

FIXTURES_DIR = Path(__file__).resolve().parent / "onnx"
"""Directory of the shipped ONNX fixtures (weights embedded, no external data)."""

__all__ = ["FIXTURES_DIR"]

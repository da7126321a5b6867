"""Passes over onnx_ir models, one per module, in onnx_ir's pass shape."""

from __future__ import annotations

from graphteleport.passes.canonical import CanonicalizePass, CanonicalResult
from graphteleport.passes.equalize import EqualizePass, EqualizeResult
from graphteleport.passes.teleport import TeleportPass, TeleportResult

__all__ = [
    "CanonicalResult",
    "CanonicalizePass",
    "EqualizePass",
    "EqualizeResult",
    "TeleportPass",
    "TeleportResult",
]

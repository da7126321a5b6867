"""Passes over onnx_ir models, one per module, in onnx_ir's pass shape.

The passes are imported when first used (``graphteleport.passes.TeleportPass``, or
their modules directly), so a teleport does not import the canonical form's solver or
the equalizer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphteleport.passes.canonical import CanonicalizePass, CanonicalResult
    from graphteleport.passes.equalize import EqualizePass, EqualizeResult
    from graphteleport.passes.teleport import TeleportPass, TeleportResult

_MODULE_OF = {
    "CanonicalResult": "canonical",
    "CanonicalizePass": "canonical",
    "EqualizePass": "equalize",
    "EqualizeResult": "equalize",
    "TeleportPass": "teleport",
    "TeleportResult": "teleport",
}


def __getattr__(name: str) -> object:
    """The pass classes, each imported with its module on first access."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_MODULE_OF[name]}")
    return getattr(module, name)


__all__ = [
    "CanonicalResult",
    "CanonicalizePass",
    "EqualizePass",
    "EqualizeResult",
    "TeleportPass",
    "TeleportResult",
]

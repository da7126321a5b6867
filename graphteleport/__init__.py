"""graphteleport: neural teleportation for any ONNX or PyTorch model, as a compiler pass."""

from __future__ import annotations

from graphteleport.errors import AnalysisError, GraphTeleportError, InputError, VerificationError

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """Lazy access to the main entry points (keeps ``import graphteleport`` light)."""
    if name in ("analyze", "Quiver"):
        from graphteleport import analysis

        return getattr(analysis, name)
    if name in ("TeleportPass", "TeleportResult"):
        from graphteleport import passes

        return getattr(passes, name)
    if name == "CofactorOptions":
        from graphteleport import options

        return options.CofactorOptions
    if name in ("teleport_file", "inspect_file", "TeleportOptions"):
        from graphteleport import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = [
    "AnalysisError",
    "CofactorOptions",
    "GraphTeleportError",
    "InputError",
    "Quiver",
    "TeleportOptions",
    "TeleportPass",
    "TeleportResult",
    "VerificationError",
    "__version__",
    "analyze",
    "inspect_file",
    "teleport_file",
]

"""graphteleport: neural teleportation for any ONNX or PyTorch model, as a compiler pass."""

from __future__ import annotations

from graphteleport.errors import AnalysisError, GraphTeleportError, InputError, VerificationError

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "GraphTeleportError",
    "InputError",
    "VerificationError",
    "__version__",
]

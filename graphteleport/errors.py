"""One exception tree for the whole package.

Every error a user can cause derives from :class:`GraphTeleportError`; the CLI maps
:class:`InputError` (bad file, bad option) to exit 2 and :class:`VerificationError`
to exit 1, printing the message as one line.  Messages name the file, node or op
and say what the user can do.
"""

from __future__ import annotations


class GraphTeleportError(Exception):
    """Base class of every error graphteleport raises on purpose."""


class InputError(GraphTeleportError):
    """The model, an option or an input file cannot be used (CLI exit 2)."""


class AnalysisError(GraphTeleportError):
    """The symmetry analysis could not make sense of the graph (CLI exit 2)."""


class VerificationError(GraphTeleportError):
    """The teleported model's outputs differ from the original's (CLI exit 1)."""

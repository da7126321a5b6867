"""Start-up cost of the command: sympy imported when onnx_ir first needs it, not before.

onnx_ir imports sympy at module level (``onnx_ir._core`` and ``onnx_ir._symbolic_shapes``,
for symbolic dimensions' arithmetic), about 0.25 s of a ~1.3 s command (the whole of
``python -X importtime``'s gap between onnx and onnx_ir), and graphteleport never does
arithmetic on symbolic dimensions on the way of a teleport.  :func:`import_onnx_ir`
imports onnx_ir with a stand-in module for each of the two (:class:`Deferred`): the
import statement finds the stand-in in ``sys.modules`` and binds it; the stand-ins leave
``sys.modules`` as soon as onnx_ir is imported, and the first attribute read through one
(``sympy.Expr``, ``_symbolic_shapes.parse_symbolic_expression``) imports the real module
and reads it there.  So onnx_ir behaves as it would, sympy's import moved to where it is
first used, if ever; any other importer of sympy gets the real module.

(A :class:`importlib.util.LazyLoader` module would not do: Python 3.11's import statement
reads a module's ``__spec__`` when it finds it in ``sys.modules``, which loads a lazy
module at once.  The stand-in has a ``__spec__`` of its own, None.)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["DEFERRED", "Deferred", "import_onnx_ir"]

#: The modules onnx_ir imports at module level without needing them to load.
DEFERRED = ("sympy", "onnx_ir._symbolic_shapes")


class Deferred(types.ModuleType):
    """A stand-in for module ``name``: the first attribute it lacks imports the real
    module (taking the stand-in out of ``sys.modules`` first, if still there) and every
    attribute is read from that."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        return getattr(importlib.import_module(name), attr)


def import_onnx_ir() -> None:
    """Import onnx_ir with the modules of :data:`DEFERRED` deferred (see the module's
    docstring).  Nothing is done where onnx_ir or any of them is imported already."""
    if any(name in sys.modules for name in ("onnx_ir", *DEFERRED)):
        return
    stand_ins = {name: Deferred(name) for name in DEFERRED}
    sys.modules.update(stand_ins)
    try:
        importlib.import_module("onnx_ir")
    finally:
        for name, stand_in in stand_ins.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]

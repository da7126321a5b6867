"""Teleport an ``nn.Module`` in place: :func:`teleport` once, a :class:`Teleporter` often.

A teleport traces and analyses the module (:mod:`graphteleport.torch.tracing`), draws
cofactors (:mod:`graphteleport.cofactors`), plans insert mode's Muls
(:mod:`graphteleport.torch.insert`), rewrites the parameters and buffers in place
(:mod:`graphteleport.torch.absorb`) and then places the Muls; every check that can refuse
runs before the first tensor changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from graphteleport import cofactors
from graphteleport.errors import InputError
from graphteleport.options import CofactorOptions, check_mode
from graphteleport.torch.absorb import absorb
from graphteleport.torch.insert import Insertion
from graphteleport.torch.result import TorchTeleport
from graphteleport.torch.tracing import traced

if TYPE_CHECKING:
    from typing import Unpack

    from graphteleport.options import OptionFields


def teleport(
    model: nn.Module,
    example_inputs: Any,
    *,
    options: CofactorOptions | None = None,
    values: np.ndarray | None = None,
    **fields: Unpack[OptionFields],
) -> TorchTeleport:
    """Teleport ``model`` in place; ``values`` gives the cofactor of each pair directly.

    ``options``, or keyword arguments naming its fields (``mode``, ``sampling``,
    ``cob_range``, ``center``, ``seed``, ``exact``): :meth:`CofactorOptions.build`.
    Tracing and analysis happen on every call; to teleport one module many times (a
    training loop, micro-teleportations), build a :class:`Teleporter` once.
    """
    opts = CofactorOptions.build(options, **fields)
    return Teleporter(model, example_inputs, mode=opts.mode).teleport(options=opts, values=values)


class Teleporter:
    """A module traced and analysed once, teleported as often as needed.

    The analysis depends only on the module's structure, so it stays valid after a
    teleport (insert mode's hooks compose with later ones); each :meth:`teleport` only
    draws cofactors and rescales tensors in place.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, *, mode: str = "absorb") -> None:
        self.model = model
        self.mode = check_mode(mode)
        self.graph, self.analysis = traced(model, example_inputs, self.mode)
        self.insertion = Insertion(model, self.graph)  # insert mode's hooks or GraphModule

    def teleport(
        self,
        *,
        options: CofactorOptions | None = None,
        values: np.ndarray | None = None,
        **fields: Unpack[OptionFields],
    ) -> TorchTeleport:
        """Draw cofactors (or take ``values``) and rescale the module in place; options
        as :func:`teleport`'s, in this Teleporter's mode."""
        opts = self._options(options, fields)
        values = self._values(opts, values)
        tau = self.analysis.solution.cofactors(values)
        graph, analysis = self.graph, self.analysis
        result = TorchTeleport(self.model, analysis, np.asarray(values), tau, self.mode)
        result.tracer = graph.tracer
        # hooks where they suffice, else a GraphModule; nothing changes before every check
        plan = self.insertion.plan(analysis, tau) if self.mode == "insert" else None
        done = absorb(graph, analysis, tau, opts.exact)
        result.factors, result.offsets = done.factors, done.offsets
        result.bn_input, result.bn_var = done.bn_input, graph.bn_var
        if plan is not None:
            self.insertion.apply(plan, result)
        return result

    def _options(self, options: CofactorOptions | None, fields: OptionFields) -> CofactorOptions:
        """The options, in this Teleporter's mode (``InputError`` where they say another)."""
        if options is None:
            fields.setdefault("mode", self.mode)
        opts = CofactorOptions.build(options, **fields)
        if opts.mode != self.mode or opts.rescale_residual:
            raise InputError(
                f"this Teleporter was analysed in {self.mode} mode: options must say "
                f"mode={self.mode!r} (got {opts.mode!r}) and no rescale_residual"
            )
        if opts.rescale_clip:
            raise InputError("rescale_clip rewrites an ONNX graph; a module cannot take it")
        return opts

    def _values(self, opts: CofactorOptions, values: np.ndarray | None) -> np.ndarray:
        """The pair values: drawn as ``opts`` say, or ``values`` checked and restricted."""
        sol = self.analysis.solution
        if values is None:
            return cofactors.sample(sol.code, sol.free, opts)
        return _given_values(values, sol.num_pairs, sol.code, sol.free)


def _given_values(
    values: np.ndarray, count: int, groups: np.ndarray, free: np.ndarray
) -> np.ndarray:
    """Explicit pair values, restricted like drawn ones (pinned pairs stay at 1)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size != count:
        raise InputError(f"values has {v.size} entries; this model has {count} cofactor pairs")
    if np.any(v == 0) or not np.all(np.isfinite(v)):
        raise InputError("cofactor values must be finite and non-zero")
    return cofactors.restrict(v, groups, free)

"""What a teleport of an ``nn.Module`` did: :class:`TorchTeleport`, which can undo it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import nn

from graphteleport.analysis import AnalysisResult, Quiver
from graphteleport.torch.absorb import Factors, multiply_out, restore


@dataclass
class TorchTeleport:
    """The outcome of :func:`graphteleport.torch.teleport`: what changed and by how much.

    ``factors[name]`` holds each changed tensor's ``S`` as broadcastable factors (a conv
    weight's ``[O, 1, 1, 1]`` and ``[1, C, 1, 1]``); :attr:`scales` multiplies them out.
    """

    model: nn.Module
    analysis: AnalysisResult
    pair_values: np.ndarray
    tau: np.ndarray
    mode: str
    factors: dict[str, Factors] = field(default_factory=dict)
    hooked: list[str] = field(default_factory=list)
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)  # W' = W·S + O (BN var)
    bn_input: dict[str, np.ndarray] = field(default_factory=dict)  # BN input variance factor
    bn_var: dict[str, np.ndarray] = field(default_factory=dict)  # the trace's, kept current
    tracer: str = "export"  # "fx" or "export": how the module was traced (frontends.torch.trace)
    inserted: list[str] = field(default_factory=list)  # insert mode's GraphModule buffers

    @property
    def free_cofactors(self) -> int:
        return self.analysis.free_cofactors

    @property
    def changed(self) -> list[str]:
        return sorted(self.factors)

    @cached_property
    def scales(self) -> dict[str, torch.Tensor]:
        """``S`` per changed tensor (``W' = W·S + O``), in its dtype and device,
        broadcastable to the tensor (a conv weight's is ``[O, C, 1, 1]``); made on first
        use."""
        return {name: multiply_out(fs) for name, fs in self.factors.items()}

    @property
    def quiver(self) -> Quiver:
        return Quiver.from_analysis(self.analysis)

    def undo(self) -> None:
        """Put the parameters and buffers back (``W = (W' − O) / S``; bit-exact in exact
        mode), cofactor buffers of hooked modules and of a GraphModule too."""
        restore(self.model, self.factors, self.offsets)
        for path, t2 in self.bn_input.items():
            if path in self.bn_var:
                self.bn_var[path] = self.bn_var[path] / t2

"""Equalize an ``nn.Module`` in place for per-tensor INT8 quantization.

:func:`equalize` traces and analyses the module as a teleport does
(:class:`~graphteleport.torch.teleporter.Teleporter`), chooses the cofactors that balance
the quantized weights' ranges (:func:`graphteleport.passes.equalize.cle_values`, the ONNX
pass's objective, on the module's own tensors) and rescales the module with them.  BatchNorm
is analysed in its training form, whose input scale it normalises away: a conv's output
channels before a BatchNorm are therefore left as they are
(:func:`~graphteleport.passes.equalize.one_sided_pairs`); fold BatchNorm into the conv before
equalizing to balance those too (quantization flows fold it anyway).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from graphteleport.errors import InputError
from graphteleport.passes.equalize import (
    DEFAULT_P,
    EqualizeSettings,
    Method,
    cle_values,
    power_of_two,
)
from graphteleport.torch.result import TorchTeleport
from graphteleport.torch.teleporter import Teleporter


def equalize(
    model: nn.Module,
    example_inputs: Any,
    *,
    method: Method = "cle",
    mode: str = "absorb",
    p: float = DEFAULT_P,
    exact: bool = False,
) -> TorchTeleport:
    """Equalize ``model`` in place (``cle``: the least ``B_p``, see
    :mod:`graphteleport.passes.equalize`) and return the teleport applied (``undo()``
    reverts it).  ``mode`` as for :func:`~graphteleport.torch.teleport`; ``exact`` rounds
    the cofactors to powers of two.  ``method="smooth"`` needs calibration data and is
    offered for ONNX files only (``graphteleport equalize --method smooth``)."""
    EqualizeSettings(method=method, p=p, exact=exact, calibration=[{}])  # checks the values
    if method != "cle":
        raise InputError("graphteleport.torch.equalize supports method='cle' only")
    teleporter = Teleporter(model, example_inputs, mode=mode)
    tensors = teleporter.graph.tensors
    arrays = {
        w.name: tensors[w.name].detach().cpu().double().numpy() for w in teleporter.analysis.weights
    }
    values, _ = cle_values(teleporter.analysis, p, arrays)
    if exact:
        values = power_of_two(values)
    return teleporter.teleport(values=np.asarray(values), exact=exact, mode=teleporter.mode)

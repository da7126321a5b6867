"""Moving along a module's orbit: :func:`compose` two teleports, :func:`orbit_tangent` for
micro-teleportation (the derivative of the weights along the orbit at ``τ = 1``).

The tangent is the derivative of ``W(τ) = W · Π τ[ids]^e``
(:func:`graphteleport.algebra.log_derivative`) with BatchNorm's ``ε`` correction
(:func:`graphteleport.algebra.batchnorm_eps_tangent`), for the same layers
:mod:`graphteleport.torch.absorb` corrects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from graphteleport.algebra import batchnorm_eps_tangent, log_derivative
from graphteleport.analysis import Absorb
from graphteleport.torch.absorb import batchnorms
from graphteleport.torch.tracing import traced


def compose(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pair values of one teleport equal to teleporting by ``first`` then ``second``.

    Both must come from the same analysis (same pairs); cofactors multiply.
    """
    out: np.ndarray = np.asarray(first) * np.asarray(second)
    return out


def orbit_tangent(
    model: nn.Module, example_inputs: Any, direction: np.ndarray | None = None, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The micro-teleportation direction at τ = 1: ``dW/dε`` for ``τ = 1 + ε·v``.

    ``W(τ) = W · Π τ[ids]^e`` gives ``dW/dε = W · Σ e · v[ids]``
    (:func:`graphteleport.algebra.log_derivative`), plus BatchNorm's eps terms
    (:func:`graphteleport.algebra.batchnorm_eps_tangent`: ``dc = −ε/(σ² + ε) · v_in`` on
    ``γ``, and ``d rv = (rv + ε)(2v_in + 2dc)``).  ``direction`` is
    ``v`` per cofactor pair (default: standard normal on the free pairs).  The model
    is not changed.  The loss is constant along the orbit, so its gradient is
    orthogonal to this tangent.
    """
    graph, analysis = traced(model, example_inputs, "absorb")
    sol = analysis.solution
    if direction is None:
        direction = np.random.default_rng(seed).standard_normal(sol.num_pairs)
    dtau = sol.tangent(np.where(sol.free, direction, 0.0))  # dτ/dε per neuron
    logd: dict[str, np.ndarray] = {}  # d log W / dε per tensor
    for weight in analysis.weights:
        d = np.zeros(tuple(graph.tensors[weight.name].shape))
        for ab in weight.uses:
            d = _scatter(d, ab, log_derivative(ab, dtau))
        logd[weight.name] = d
    out = {name: _times(graph.tensors[name].detach(), d) for name, d in logd.items()}
    for bn in batchnorms(graph, analysis):  # the eps terms of absorb's correction
        dt2 = logd[bn.var]  # d(τ²)/dε at τ = 1
        measured = bn.sigma2 is not None and bn.sigma2.shape == dt2.reshape(-1).shape
        sigma2 = bn.sigma2.reshape(dt2.shape) if bn.sigma2 is not None and measured else None
        dc, ds = batchnorm_eps_tangent(dt2, sigma2, bn.eps)
        if sigma2 is not None:
            gamma = graph.tensors[bn.gamma].detach()
            out[bn.gamma] = _times(gamma, logd.get(bn.gamma, 0.0) + dc.reshape(gamma.shape))
        out[bn.var] = _times(graph.tensors[bn.var].detach() + bn.eps, ds)
    return out


def _times(t: torch.Tensor, d: np.ndarray | float) -> torch.Tensor:
    return t * torch.as_tensor(d, dtype=t.dtype, device=t.device)


def _scatter(d: np.ndarray, ab: Absorb, part: np.ndarray) -> np.ndarray:
    if ab.index is None:
        return np.broadcast_to(part, d.shape).copy()
    flat = d.reshape(-1).copy()
    flat[ab.index.reshape(-1)] = part.reshape(-1)
    return flat.reshape(d.shape)

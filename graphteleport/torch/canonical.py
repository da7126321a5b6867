"""The canonical form of an ``nn.Module``, in place: :func:`canonicalize`.

The form of :class:`graphteleport.passes.canonical.CanonicalizePass` for ONNX files, on
the torch analysis (the module's own parameters and buffers, BatchNorm in its training
form): with ``u = log t`` on the movable pairs, minimise

    ``F(u) = Σ_W Σ |W · S(u)|²``      (:class:`~graphteleport.orbit.OrbitTerms`)

over every tensor the analysis rescales (weights, biases, normalisation parameters) by
:func:`graphteleport.passes.canonical.minimize`, give the sign-flippable pairs their signs
by the pass's rule (:func:`graphteleport.passes.canonical.sign_values`), and teleport the
module by ``t = ±exp(u)`` (:meth:`graphteleport.torch.Teleporter.teleport`: train and
eval mode stay exact, as for any teleport).

**BatchNorm.**  In its training form a BatchNorm's input class (the conv channel before
it) moves the conv's weights and bias, the running mean (``τ_in``) and the running
variance (``τ_in²``) and nothing grows against them: batch statistics normalise ``τ_in``
away, so ``Σ W²`` falls without bound as ``τ_in → 0``.  What does grow is the layer's
eval-mode scale ``g = γ/√(rv + ε)``, which every teleport moves by exactly
``τ_out/τ_in`` — BatchNorm's ε correction included (``γ' = γ·τ_out·c``,
``rv' + ε = c²τ_in²(rv + ε)``: ``c`` cancels).  So a training-form BatchNorm is counted
through ``g`` (factors ``τ_out``, ``τ_in⁻¹``) in place of ``γ`` and its running variance;
its running mean and ``β`` count as themselves.  This is the inference-form BatchNorm of
the ONNX pass (``scale · τ_out/τ_in``, variance fixed) with ``γ`` read as
``γ/√(rv + ε)``: ``F`` stays a sum of exponentials of linear functions, the minimum is
unique as a model, and ``F`` of a teleported module is ``F`` of the original shifted by
the teleport's ``log t`` exactly — so ``canonicalize(teleport(M))`` is
``canonicalize(M)`` up to rounding, without data (the measured variances only enter the
rewrite's ε correction).  A BatchNorm without ``γ`` has no ``g`` to count: its input class
has no minimum and the solver reports :class:`~graphteleport.passes.canonical.NotConverged`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import nn

from graphteleport.algebra import Factor
from graphteleport.analysis import AnalysisResult
from graphteleport.frontends.torch import TorchGraph
from graphteleport.orbit import OrbitTerms
from graphteleport.passes.canonical import (
    MAX_ITERATIONS,
    TOL,
    Minimum,
    minimize,
    sign_values,
)
from graphteleport.torch.absorb import batchnorms
from graphteleport.torch.result import TorchTeleport
from graphteleport.torch.teleporter import Teleporter


@dataclass
class TorchCanonical:
    """What :func:`canonicalize` did: the teleport it applied (``teleport``: ``undo()``,
    ``pair_values`` ``t = ±exp(u)``), the solver's :class:`Minimum` (``F`` before and
    after, iterations), the pairs the sign rule flipped and the flippable pairs it could
    not decide (their signs kept)."""

    teleport: TorchTeleport
    minimum: Minimum
    pair_values: np.ndarray
    flipped: int = 0
    sign_undecided: int = 0

    @property
    def objective_before(self) -> float:
        return self.minimum.objective_before

    @property
    def objective_after(self) -> float:
        return self.minimum.objective_after

    def undo(self) -> None:
        """Put the module's tensors back."""
        self.teleport.undo()


def canonicalize(
    model: nn.Module,
    example_inputs: Any,
    *,
    tol: float = TOL,
    max_iterations: int = MAX_ITERATIONS,
) -> TorchCanonical:
    """Rewrite ``model`` in place into its canonical form (module docstring); ``tol`` and
    ``max_iterations`` are the Newton solver's
    (:class:`~graphteleport.passes.canonical.NotConverged` past them)."""
    teleporter = Teleporter(model, example_inputs, mode="absorb")
    graph, analysis = teleporter.graph, teleporter.analysis
    arrays = {n: t.detach().cpu().double().numpy() for n, t in graph.tensors.items()}
    counted, counted_arrays = batchnorm_scales(graph, analysis, arrays)
    found = minimize(
        OrbitTerms.build(counted, arrays=counted_arrays), tol=tol, max_iterations=max_iterations
    )
    signs, undecided = sign_values(analysis, arrays)
    values = np.exp(found.u) * signs
    done = teleporter.teleport(values=values)
    return TorchCanonical(done, found, values, int((signs < 0).sum()), undecided)


def batchnorm_scales(
    graph: TorchGraph, analysis: AnalysisResult, arrays: dict[str, np.ndarray]
) -> tuple[AnalysisResult, dict[str, np.ndarray]]:
    """The analysis and arrays the objective counts (module docstring): each training-form
    BatchNorm's ``γ`` replaced by ``g = γ/√(rv + ε)`` with factors ``τ_out`` and ``τ_in⁻¹``,
    its running variance left out.  A BatchNorm whose ``γ`` is read otherwise (tied, mapped,
    several factors) is counted as it is."""
    weights = {w.name: w for w in analysis.weights}
    out = dict(arrays)
    for bn in batchnorms(graph, analysis):
        gamma = weights.get(bn.gamma)
        if gamma is None or len(gamma.uses) != 1 or len(bn.absorb.factors) != 1:
            continue
        use = gamma.uses[0]
        if use.index is not None or use.expand or len(use.factors) != 1:
            continue
        tin = bn.absorb.factors[0]
        weights[bn.gamma] = replace(
            gamma, uses=(replace(use, factors=[*use.factors, Factor(tin.ids, -1)]),)
        )
        var = arrays[bn.var].reshape(arrays[bn.gamma].shape)
        out[bn.gamma] = arrays[bn.gamma] / np.sqrt(var + bn.eps)
        del weights[bn.var]
    return replace(analysis, weights=tuple(weights.values())), out

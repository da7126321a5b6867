"""A module's orbit as a differentiable map ``u ↦ W(u)``, for objectives over the orbit.

``u`` holds ``log t`` of the *movable* cofactor pairs (free, of group any or positive:
:func:`graphteleport.orbit.movable_pairs`); every other pair keeps ``t = 1``.  With
``t = exp(u) > 0`` a neuron of pair q gets ``τ = exp(±u_q)`` (``−`` for the pair's inverse
member: :func:`graphteleport.algebra.neuron_cofactors`'s ``1/t``), and every stored tensor
the analysis rescales becomes what :func:`graphteleport.torch.absorb.absorb` would write:

    ``W(u) = W · S(u)``,   ``S = Π_f τ[f.ids]^f.exp``

with the factors' powers taken by :meth:`graphteleport.algebra.FactorTable.values` (the
one gather :mod:`~graphteleport.torch.absorb` uses, here on a torch tensor, so ``S`` is
differentiable in ``u``), multiplied out per tensor as the rewrite does; a tensor some
use of which maps elements gets each use's ``S`` scattered into its elements.

**BatchNorm's ε** is part of the map, exactly as the rewrite corrects it
(:func:`graphteleport.algebra.batchnorm_eps_squared`, ``batchnorm_eps_variance``): with
``τ²`` the running variance's factor and ``σ²`` the input variance measured on the example
inputs, ``c = sqrt((τ²σ² + ε)/(τ²(σ² + ε)))``, ``γ(u) = γ · S_γ · c`` and
``rv(u) = rv · c²τ² + ε(c²τ² − 1)`` — so ``W(u)`` at any ``u`` is the model the teleport
by ``t = exp(u)`` produces (eval mode exact; train mode exact on batches like the
example inputs), up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphteleport.algebra import batchnorm_eps_squared, batchnorm_eps_variance
from graphteleport.analysis import Absorb, AnalysisResult, Weight
from graphteleport.frontends.torch import TorchGraph
from graphteleport.orbit import movable_pairs
from graphteleport.torch.absorb import BatchNorm, batchnorms


@dataclass(frozen=True, eq=False)
class _Recipe:
    """How one stored tensor moves: its name, its value at ``u = 0`` (the live tensor,
    detached) and, per use the rewrite reads, the use and its first factor's index in
    the factor table (one entry: the uses are tied, no element map)."""

    name: str
    base: torch.Tensor
    uses: tuple[tuple[Absorb, int], ...]
    mapped: bool


class OrbitMap:
    """``u ↦ W(u)`` for one traced module (module docstring).

    ``columns`` are the movable pairs, one entry of ``u`` each; :meth:`pair_values` turns
    ``u`` into the pair values a teleport takes (``exp(u)`` there, 1 elsewhere), and
    calling the map gives ``W(u)`` of every tensor the analysis rescales, by name.  The
    map reads the module's tensors as they are when it is called: build it afresh after
    the module changes.
    """

    def __init__(self, graph: TorchGraph, analysis: AnalysisResult) -> None:
        sol = analysis.solution
        self.analysis = analysis
        self.columns = np.flatnonzero(movable_pairs(analysis))
        self.num_pairs = sol.num_pairs
        self._pair = torch.from_numpy(np.asarray(sol.pair, dtype=np.int64))
        self._sign = torch.from_numpy(np.where(np.asarray(sol.inverse, bool), -1.0, 1.0))
        self._cols = torch.from_numpy(self.columns.astype(np.int64))
        table = analysis.factor_table
        self._recipes = [_recipe(w, graph, table.first) for w in analysis.weights]
        self._bns = batchnorms(graph, analysis)
        named = {r.name for r in self._recipes}
        for bn in self._bns:  # a γ that moves only by BatchNorm's c
            if bn.sigma2 is not None and bn.gamma not in named:
                self._recipes.append(_Recipe(bn.gamma, graph.tensors[bn.gamma].detach(), (), False))
                named.add(bn.gamma)
        self._base = {r.name: r.base for r in self._recipes}
        self._bn_first = [table.first[id(bn.absorb)] for bn in self._bns]

    @property
    def size(self) -> int:
        """The number of movable pairs: the length of ``u``."""
        return int(self.columns.size)

    def pair_values(self, u: np.ndarray) -> np.ndarray:
        """One value per pair: ``exp(u)`` on the movable pairs, 1 elsewhere."""
        values = np.ones(self.num_pairs)
        values[self.columns] = np.exp(np.asarray(u, dtype=np.float64))
        return values

    def neuron_cofactors(self, u: torch.Tensor) -> torch.Tensor:
        """Per neuron ``τ = exp(±u[pair])`` (float64; ``−`` for an inverse member, 0 off
        the movable pairs: ``τ = 1``)."""
        full = torch.zeros(self.num_pairs, dtype=torch.float64, device=u.device)
        full = full.index_put((self._cols.to(u.device),), u.to(torch.float64))
        log_tau = self._sign.to(u.device) * full[self._pair.to(u.device)]
        return torch.exp(log_tau)

    def __call__(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """``W(u)`` of every rescaled tensor, by name (differentiable in ``u``)."""
        table = self.analysis.factor_table
        tau = self.neuron_cofactors(u)
        views = torch.split(table.values(tau), table.sizes)
        factors = [v.reshape(shape) for v, shape in zip(views, table.shapes)]
        scales = {r.name: _scale(r, factors, tau.device) for r in self._recipes}
        offsets = self._batchnorm_eps(factors, scales)
        out: dict[str, torch.Tensor] = {}
        for r in self._recipes:
            s = scales[r.name].to(dtype=r.base.dtype, device=r.base.device)
            w = (r.base * s).reshape(r.base.shape)
            out[r.name] = w + offsets[r.name] if r.name in offsets else w
        return out

    def _batchnorm_eps(
        self, factors: list[torch.Tensor], scales: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """BatchNorm's ε correction (module docstring), into ``scales`` (the running
        variance's ``S = c²τ²``, ``γ``'s ``c``); returns the running variances' offsets."""
        offsets: dict[str, torch.Tensor] = {}
        for bn, j in zip(self._bns, self._bn_first):
            t2 = factors[j].reshape(-1)
            c = _eps_factor(bn, t2)
            s, offset = batchnorm_eps_variance(c, t2, bn.eps)
            var = self._base[bn.var]
            scales[bn.var] = s.reshape(var.shape)
            offsets[bn.var] = offset.reshape(var.shape).to(dtype=var.dtype, device=var.device)
            if bn.sigma2 is not None:
                gamma = scales.get(bn.gamma)
                scales[bn.gamma] = c if gamma is None else (gamma.reshape(-1) * c)
        return offsets


def _eps_factor(bn: BatchNorm, t2: torch.Tensor) -> torch.Tensor:
    """BatchNorm's ``c`` per channel (1 where no input variance was measured)."""
    if bn.sigma2 is None:
        return torch.ones_like(t2)
    sigma2 = torch.from_numpy(np.asarray(bn.sigma2, dtype=np.float64).reshape(-1)).to(t2.device)
    return torch.sqrt(batchnorm_eps_squared(t2, sigma2, bn.eps))


def _recipe(weight: Weight, graph: TorchGraph, first: dict[int, int]) -> _Recipe:
    base = graph.tensors[weight.name].detach()
    mapped = not all(ab.index is None and not ab.expand for ab in weight.uses)
    uses = weight.uses if mapped else weight.uses[:1]
    return _Recipe(weight.name, base, tuple((ab, first[id(ab)]) for ab in uses), mapped)


def _scale(recipe: _Recipe, factors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``S`` of one tensor: its use's factors multiplied out (broadcastable to the tensor),
    or, where a use maps elements, each use's ``S`` written into the elements it reads
    (as :func:`graphteleport.algebra.source_scale`); float64, on ``device`` (``u``'s)."""
    if not recipe.uses:
        return torch.ones(1, dtype=torch.float64, device=device)
    if not recipe.mapped:
        ab, j = recipe.uses[0]
        return _product(factors[j : j + len(ab.factors)], len(ab.shape), device)
    s = torch.ones(recipe.base.numel(), dtype=torch.float64, device=device)
    for ab, j in recipe.uses:
        part = _product(factors[j : j + len(ab.factors)], len(ab.shape), device)
        part = part.expand(ab.shape).reshape(-1)
        if ab.index is not None:
            at = torch.from_numpy(np.asarray(ab.index, dtype=np.int64).reshape(-1))
            s = s.index_put((at.to(device),), part)
        elif not ab.expand:
            s = part
    return s.reshape(recipe.base.shape)


def _product(fs: list[torch.Tensor], rank: int, device: torch.device) -> torch.Tensor:
    """The broadcast product of a use's factor values (each already ``τ[ids]^e``), with at
    least ``rank`` axes."""
    out = torch.ones((1,) * rank, dtype=torch.float64, device=device)
    for f in fs:
        out = out * f
    return out

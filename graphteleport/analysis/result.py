"""What the analysis hands on: the cofactor classes and how every weight scales with them.

:func:`~graphteleport.analysis.analyze_model` returns an :class:`AnalysisResult`, frozen
and narrow: every pass (the ONNX rewrite, insert mode, the range fit, the torch rewrite,
the quiver, reports) reads it, and none needs the analysis' working state (the rules'
context, the constraint store, the graph's index), which stays inside the package.

* ``solution``: the cofactor pairs (:class:`~graphteleport.analysis.solve.Solution`): per
  neuron its pair and whether it is the pair's inverse member; per pair its group (any,
  positive, sign, pinned), whether it is free, and why it is pinned.  ``cofactors(values)``
  turns one value per pair into per-neuron τ.
* ``neurons``: per value name, the neuron ids of the value in their compact layout (one
  axis of the value's rank each, size 1 where one cofactor spans the axis):
  ``τ[neurons[name]]`` is how that value scales, ``v' = τ ⊙ v``.
* ``weights``: per stored tensor (:class:`Weight`), its uses — each an
  :class:`~graphteleport.analysis.constraints.Absorb` with its factors ``(ids, exp)``,
  ``S = Π τ[ids]^exp`` (:mod:`graphteleport.algebra`), and its element map — and whether
  each use gets a private copy; ``absorbs`` lists every use in rule order and
  ``factor_table`` lays all their factors end to end
  (:class:`~graphteleport.algebra.FactorTable`).
* ``wraps`` and ``edges``: insert mode's cofactor nodes (``τ·f(x/τ)`` around an
  activation, ``Π τ^e`` on one input of a node), each with the dtype its ``Mul`` takes.
* ``blocks``: runs of neurons created together (a layer's outputs): the quiver's vertices
  before merging; ``nothing_to_rescale``: why no weight depends on any neuron ("" when
  some does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from graphteleport.algebra import FactorTable
from graphteleport.analysis.constraints import Absorb, Block, ConstRef, EdgeScale, Wrap
from graphteleport.analysis.solve import Solution

IntArray = np.ndarray


@dataclass(frozen=True, slots=True, eq=False)
class Weight:
    """A stored tensor and how it scales: its ``uses`` (one :class:`Absorb` per node input
    that reads it, first use first) and whether it is ``private`` (shared by several uses
    only by an exporter's accident — all elements equal — so each use whose ``S`` differs
    gets its own copy)."""

    source: ConstRef
    uses: tuple[Absorb, ...]
    private: bool

    @property
    def name(self) -> str:
        return self.source.name


@dataclass(frozen=True, eq=False)
class AnalysisResult:
    """The analysis of one model (see the module docstring)."""

    solution: Solution
    neurons: Mapping[str, IntArray]
    weights: tuple[Weight, ...]
    absorbs: tuple[Absorb, ...]
    factor_table: FactorTable
    wraps: tuple[Wrap, ...]
    edges: tuple[EdgeScale, ...]
    blocks: tuple[Block, ...]
    nothing_to_rescale: str = ""

    @cached_property
    def _by_name(self) -> dict[str, Weight]:
        return {w.name: w for w in self.weights}

    def weight_named(self, name: str) -> Weight | None:
        """The stored tensor called ``name`` (initializer names are unique), or None when
        it absorbs nothing."""
        return self._by_name.get(name)

    @property
    def free_cofactors(self) -> int:
        """The teleportation dimension: cofactor pairs that are free and move some weight."""
        return int(self.solution.free.sum())

"""The constraint store the op rules write into.

Neurons are integers ``0 .. n-1``.  An activation tensor carries a *compact id
array*: the same rank as the tensor, each axis either full size (a feature axis:
neurons differ along it) or size 1 (a broadcast axis: one cofactor along it).
Rules emit:

* ``tie(a, b)``: τ_a = τ_b elementwise (after broadcasting);
* ``relate(a, b)``: τ_a = 1/τ_b;
* ``restrict(ids, flag, reason)``: the neurons' cofactors lie in a group;
* ``monomial([(ids, e), ...])``: Π τ^e = 1 elementwise, resolved after a first
  solve (products of activations, weights shared by several uses);
* ``absorb(...)``: how a constant tensor scales, ``W' = W · Π τ[ids]^e``.

Emissions made while a rule runs can be rolled back if the rule turns out not to
apply (it raises :class:`Unsupported`); the node is then pinned instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntFlag

import numpy as np
import onnx_ir as ir

from graphteleport.algebra import Factor as Factor  # (re-exported: the rules' factors)

IntArray = np.ndarray


class Flag(IntFlag):
    """Group restrictions as bits; the group of a class is the meet of its members'."""

    NONE = 0
    POSITIVE = 1  # τ > 0: ReLU family, MaxPool
    SIGN = 2  # τ = ±1: odd activations, self-inverse classes
    PIN = 4  # τ = 1


class Unsupported(Exception):
    """Raised by a rule whose preconditions fail; the node's neurons are pinned."""


class Pinned(Unsupported):
    """Raised by a rule for a node that is pinned by nature (a quantized op): the message
    is the whole reason, not prefixed with the op."""


@dataclass(frozen=True, slots=True, eq=False)
class ConstRef:
    """Where a stored tensor lives: an initializer ``value``, or a Constant node."""

    name: str
    value: ir.Value | ir.Node  # the initializer, or the Constant node (``is_node``)
    is_node: bool = False

    @property
    def stored(self) -> ir.Value:
        """The value the tensor is read through (a Constant node's output)."""
        return self.value.outputs[0] if isinstance(self.value, ir.Node) else self.value

    def array(self) -> np.ndarray:
        """The stored tensor, as numpy."""
        if isinstance(self.value, ir.Node):
            return np.asarray(self.value.attributes["value"].as_tensor().numpy())
        tensor = self.value.const_value
        assert tensor is not None
        return np.asarray(tensor.numpy())


@dataclass(frozen=True, slots=True, eq=False)
class Absorb:
    """A stored tensor read by ``node`` (at input ``input_index``) absorbs
    ``S = Π τ[f.ids]^f.exp`` (:func:`graphteleport.algebra.scale`).

    ``shape`` is the shape S is computed in (the used tensor's shape, possibly a
    broadcast-expanded one, ``expand``); ``index`` maps each element of that used tensor
    to a flat element of the source (None: the used tensor *is* the source).
    """

    source: ConstRef
    shape: tuple[int, ...]
    factors: list[Factor]
    node: ir.Node
    input_index: int
    index: IntArray | None = None
    expand: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Wrap:
    """Insert mode: ``node`` (one activation input, same layout out) becomes τ·f(x/τ).

    ``group`` is the group the op already commutes with (any: never, positive:
    τ > 0, sign: τ = ±1); the nodes are only inserted where some τ falls outside it
    (:func:`graphteleport.algebra.wrap_needed`).  ``input_dtype`` and ``output_dtype``
    are the types of the node's input 0 and output 0, which its ``Mul(1/τ)`` and
    ``Mul(τ)`` take (FLOAT where unknown; set when the analysis finishes).
    """

    node: ir.Node
    ids: IntArray
    group: str
    input_dtype: ir.DataType = ir.DataType.FLOAT
    output_dtype: ir.DataType = ir.DataType.FLOAT


@dataclass(frozen=True, slots=True, eq=False)
class EdgeScale:
    """Insert mode: multiply input ``index`` of ``node`` by ``Π τ[ids]^e`` on its edge;
    ``dtype`` is that input's type, which the ``Mul`` takes (FLOAT where unknown; set when
    the analysis finishes)."""

    node: ir.Node
    index: int
    factors: list[Factor]
    dtype: ir.DataType = ir.DataType.FLOAT


@dataclass(frozen=True, slots=True)
class Block:
    """A run of neurons created together (a layer's outputs): a vertex of the quiver."""

    start: int
    size: int
    name: str
    op: str


_DEDUP_ABOVE = 4096


@dataclass(slots=True)
class Constraints:
    """Everything the rules said, in flat lists of numpy arrays."""

    n: int = 0
    ties: list[tuple[IntArray, IntArray]] = field(default_factory=list)
    relations: list[tuple[IntArray, IntArray]] = field(default_factory=list)
    flags: list[tuple[IntArray, int, str]] = field(default_factory=list)
    monomials: list[list[Factor]] = field(default_factory=list)
    absorbs: list[Absorb] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    wraps: list[Wrap] = field(default_factory=list)
    edges: list[EdgeScale] = field(default_factory=list)
    # neurons pinned because a node's rule did not apply (unknown op, computed weight,
    # quantized op): counted in the report with their reason although no weight moves
    held: list[IntArray] = field(default_factory=list)

    def new(self, shape: tuple[int, ...], name: str, op: str) -> IntArray:
        """Allocate ``prod(shape)`` fresh neurons laid out in ``shape``."""
        size = math.prod(shape)
        ids = np.arange(self.n, self.n + size, dtype=np.int64)
        if len(shape) != 1:
            ids = ids.reshape(shape)
        self.blocks.append(Block(self.n, size, name, op))
        self.n += size
        return ids

    def tie(self, a: IntArray, b: IntArray) -> None:
        if a.shape != b.shape:
            a, b = np.broadcast_arrays(a, b)
        if a.size:
            self.ties.append((a.ravel().copy(), b.ravel().copy()))

    def relate(self, a: IntArray, b: IntArray) -> None:
        if a.shape != b.shape:
            a, b = np.broadcast_arrays(a, b)
        if a.size:
            self.relations.append((a.ravel().copy(), b.ravel().copy()))

    def restrict(self, ids: IntArray, flag: int, reason: str) -> None:
        """Flag ``ids`` (repeats are harmless; large broadcast arrays are deduplicated)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size > _DEDUP_ABOVE:
            ids = np.unique(ids)
        if ids.size:
            self.flags.append((ids, int(flag), reason))

    def rollback_last_block(self) -> None:
        """Forget the most recent allocation (it turned out not to be needed)."""
        block = self.blocks.pop()
        assert block.start + block.size == self.n
        self.n = block.start

    def mark(self) -> tuple[int, ...]:
        """A snapshot to roll back to if a rule does not apply."""
        return (
            self.n,
            len(self.ties),
            len(self.relations),
            len(self.flags),
            len(self.monomials),
            len(self.absorbs),
            len(self.blocks),
            len(self.wraps),
            len(self.edges),
            len(self.held),
        )

    def rollback(self, mark: tuple[int, ...]) -> None:
        self.n = mark[0]
        del self.ties[mark[1] :]
        del self.relations[mark[2] :]
        del self.flags[mark[3] :]
        del self.monomials[mark[4] :]
        del self.absorbs[mark[5] :]
        del self.blocks[mark[6] :]
        del self.wraps[mark[7] :]
        del self.edges[mark[8] :]
        del self.held[mark[9] :]

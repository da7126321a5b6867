"""What a rule sees: the node's values as compact id arrays, and the constraint store.

A rule is ``rule(ctx, node) -> None``.  It reads input ids with ``ctx.ids``,
writes output ids with ``ctx.set``, and states constraints with ``ctx.tie``,
``ctx.relate``, ``ctx.restrict``/``ctx.pin``, ``ctx.monomial`` and
``ctx.absorb``.  When a precondition fails it raises :class:`Unsupported` with a
human reason; the runner then undoes what the rule emitted and pins the node.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphteleport.analysis.constraints import (
    Absorb,
    Constraints,
    ConstRef,
    EdgeScale,
    Factor,
    Flag,
    Unsupported,
    Wrap,
)
from graphteleport.analysis.graphinfo import GraphInfo

IntArray = np.ndarray
MAX_TRACKED_ELEMENTS = 64_000_000


def align(ids: IntArray, rank: int) -> IntArray:
    """Prepend size-1 axes so ``ids`` has ``rank`` axes (numpy broadcasting rules)."""
    if ids.ndim > rank:
        if any(s != 1 for s in ids.shape[: ids.ndim - rank]):
            raise Unsupported("broadcast to a lower rank")
        return ids.reshape(ids.shape[ids.ndim - rank :])
    return ids.reshape((1,) * (rank - ids.ndim) + ids.shape)


def broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``shapes`` broadcast to (numpy's rules); ValueError if they do not."""
    return tuple(int(d) for d in np.broadcast_shapes(*shapes))


def _int_ids(ids: IntArray) -> IntArray:
    return np.asarray(ids, dtype=np.int64)


def _fits(part: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """``part`` has ``shape``'s rank and broadcasts to it."""
    return len(part) == len(shape) and all(p in (1, s) for p, s in zip(part, shape))


def _fit_rank(ids: IntArray, rank: int) -> IntArray:
    """Drop leading size-1 axes beyond ``rank`` (a ``[C]`` bias stays ``[C]``)."""
    extra = ids.ndim - rank
    if extra > 0 and all(s == 1 for s in ids.shape[:extra]):
        return ids.reshape(ids.shape[extra:])
    return ids


def _consistent_repeats(index: IntArray, factors: list[IntArray], shape: tuple[int, ...]) -> bool:
    """A source element used at several places (a row gathered for every position)
    can absorb only if every place asks for the same scaling: the same ids per factor."""
    flat = index.reshape(-1)
    order = np.argsort(flat, kind="stable")
    repeat = flat[order][1:] == flat[order][:-1]
    if not repeat.any():
        return True
    for f in factors:
        ids = np.broadcast_to(f, shape).reshape(-1)[order]
        if np.any(ids[1:][repeat] != ids[:-1][repeat]):
            return False
    return True


def compress(full: IntArray) -> IntArray:
    """Shrink every axis along which the ids do not change to size 1."""
    for ax in range(full.ndim):
        if full.shape[ax] > 1:
            first = full.take([0], axis=ax)
            if np.array_equal(full, np.broadcast_to(first, full.shape)):
                full = first
    return np.ascontiguousarray(full)


class Context:
    """The state of one analysis: id arrays per value, and the constraints so far."""

    def __init__(
        self,
        info: GraphInfo,
        mode: str = "absorb",
        rescale_residual: bool = False,
        training: bool = False,
    ) -> None:
        self.info = info
        self.mode = mode
        # torch frontend: BatchNorm must stay right in training mode too, and stored
        # tensors keep their shapes (a parameter cannot be broadcast-expanded).
        self.training = training
        self.rescale_residual = rescale_residual and mode == "insert"
        self.c = Constraints()
        self.values: dict[int, IntArray] = {}
        self.outputs: dict[int, ir.Value] = {}  # the value behind each key of ``values``
        self._pending: dict[int, tuple[ir.Value, IntArray]] = {}
        self.node: ir.Node | None = None
        self.refusal = ""  # why the last absorb that returned False could not absorb

    # -- values -------------------------------------------------------------------------
    def act(self, v: ir.Value | None) -> bool:
        """True when ``v`` carries neurons (a float tensor that is not a constant)."""
        return v is not None and (id(v) in self.values or id(v) in self._pending)

    def const(self, v: ir.Value | None) -> bool:
        return self.info.is_const(v)

    def shape(self, v: ir.Value) -> tuple[int, ...]:
        shape = self.info.shape(v)
        if shape is None:
            raise Unsupported(f"shape of {v.name!r} is unknown")
        return shape

    def ids(self, v: ir.Value) -> IntArray:
        key = id(v)
        if key in self._pending:
            return self._pending[key][1]
        if key not in self.values:
            raise Unsupported(f"{v.name!r} carries no neurons")
        return self.values[key]

    def full(self, v: ir.Value) -> IntArray:
        """The ids of ``v`` broadcast to its whole shape."""
        shape = self.shape(v)
        if int(np.prod(shape, dtype=np.int64)) > MAX_TRACKED_ELEMENTS:
            raise Unsupported(f"{v.name!r} is too large to track element by element")
        return np.broadcast_to(align(self.ids(v), len(shape)), shape)

    def set(self, v: ir.Value | None, ids: IntArray) -> None:
        """Give output ``v`` the id array ``ids`` (committed when the rule succeeds)."""
        info = self.info
        if v is None or id(v) in info.constant or not info.is_float(v):
            return
        shape = info.shape(v)
        if shape is not None:
            ids = _int_ids(ids)
            if ids.ndim != len(shape):
                ids = align(ids, len(shape))
            if ids.shape != shape and not _fits(ids.shape, shape):
                raise Unsupported(f"id layout {ids.shape} does not fit {v.name!r} {shape}")
        self._pending[id(v)] = (v, ids)

    def new(self, shape: Sequence[int], name: str = "") -> IntArray:
        return self._new(tuple(map(int, shape)), name)

    def _new(self, shape: tuple[int, ...], name: str) -> IntArray:
        node = self.node
        label = name or (node.name if node is not None else "") or ""
        return self.c.new(shape, label, node.op_type if node else "")

    def new_for(self, v: ir.Value, feature_axes: Sequence[int]) -> IntArray:
        """Fresh neurons for ``v``, one per position along ``feature_axes``."""
        shape = self.shape(v)
        axes = {a % len(shape) for a in feature_axes}
        layout = tuple(int(d) if k in axes else 1 for k, d in enumerate(shape))
        return self._new(layout, v.name or "")

    # -- constraints --------------------------------------------------------------------
    def tie(self, a: IntArray, b: IntArray) -> None:
        self.c.tie(a, b)

    def relate(self, a: IntArray, b: IntArray) -> None:
        self.c.relate(a, b)

    def restrict(self, ids: IntArray, flag: int, reason: str) -> None:
        self.c.restrict(ids, flag, reason)

    def pin(self, ids: IntArray, reason: str) -> None:
        self.c.restrict(ids, Flag.PIN, reason)

    @property
    def insert(self) -> bool:
        """Insert mode: non-equivariant ops get cofactor nodes instead of pins."""
        return self.mode == "insert"

    def wrap(self, ids: IntArray, group: str = "any") -> None:
        """Insert mode: the current node becomes τ·f(x/τ) (its output keeps ``ids``)."""
        assert self.node is not None
        self.c.wraps.append(Wrap(self.node, ids, group))

    def wrapped_output(self, v: ir.Value) -> bool:
        """``v`` is the only-used output of a wrapped node (its post-Mul can cancel)."""
        node = v.producer()
        return len(v.uses()) == 1 and any(w.node is node for w in self.c.wraps)

    def unscale(self, k: int, factors: list[tuple[IntArray, int]] | None = None) -> None:
        """Insert mode: the current node sees input ``k`` times ``Π τ^e`` (default ``1/τ``)."""
        node = self.node
        assert node is not None
        v = node.inputs[k]
        assert v is not None
        rank = len(self.shape(v))
        fs = factors if factors is not None else [(self.ids(v), -1)]
        self.c.edges.append(
            EdgeScale(node, k, [Factor(align(np.asarray(f), rank), e) for f, e in fs])
        )

    def monomial(self, factors: list[tuple[IntArray, int]]) -> None:
        """Π τ[ids]^e = 1 elementwise; resolved once pins are known."""
        arrays = np.broadcast_arrays(*[f for f, _ in factors])
        self.c.monomials.append([Factor(a.copy(), e) for a, (_, e) in zip(arrays, factors)])

    def collapse(self, ids: IntArray, axes: Sequence[int]) -> IntArray:
        """Tie the neurons along ``axes`` together; return the ids with those axes at size 1."""
        if ids.ndim == 0:  # one neuron for the whole tensor (its shape is unknown)
            return ids
        shape = ids.shape
        axes = sorted({a % ids.ndim for a in axes if shape[a % ids.ndim] > 1})
        if not axes:
            return ids
        rep = ids[tuple(slice(0, 1) if k in axes else slice(None) for k in range(ids.ndim))]
        self.tie(ids, rep)
        return rep

    def absorb(
        self, v: ir.Value, factors: list[tuple[IntArray, int]], *, expand: bool = False
    ) -> bool:
        """Constant ``v`` (input of the current node) takes ``W' = W · Π τ[ids]^e``.

        The factors broadcast to ``v``'s shape, or, with ``expand``, to a larger
        shape the constant may be broadcast-expanded to.  Returns False when the
        constant cannot be rewritten (it is computed, not stored).
        """
        node = self.node
        assert node is not None
        src = self.info.source(v)
        if src is None:
            if self._is_zero(v):
                return True
            return self._refuse(self.info.not_stored(v))
        ref, index = src
        shape = self.shape(v)  # from the stored tensor's header: no weight bytes read
        rank = len(shape)
        fitted = [Factor(_fit_rank(_int_ids(f), rank), e) for f, e in factors]
        target = shape  # the usual case: factors laid out in the weight's axes
        if not all(_fits(f.ids.shape, shape) for f in fitted):
            target = broadcast_shape(shape, *[f.ids.shape for f in fitted])
            if target != shape and (
                not expand or index is not None or self.training or self._shared(ref)
            ):
                # the rule then leaves the constant as it is, if it can
                return self._refuse(f"constant {v.name!r} {shape} cannot expand to {target}")
            fitted = [Factor(align(f.ids, len(target)), f.exp) for f in fitted]
        if index is not None and not _consistent_repeats(index, [f.ids for f in fitted], target):
            return self._refuse(f"constant {v.name!r} repeats elements that scale differently")
        self.c.absorbs.append(
            Absorb(
                source=ref,
                shape=target,
                factors=fitted,
                node=node,
                input_index=self._input_index(node, v),
                index=index,
                expand=target != shape,
            )
        )
        return True

    def _refuse(self, why: str) -> bool:
        self.refusal = why
        return False

    def refused(self, what: str) -> str:
        """Why the last :meth:`absorb` returned False (``what`` names the constant's role)."""
        return self.refusal or f"{what} cannot absorb the scaling"

    def _input_index(self, node: ir.Node, v: ir.Value) -> int:
        """The input slot of ``v`` that this absorb is for: the first one not absorbed yet
        when the node reads ``v`` at several slots (a BatchNorm whose bias and mean are
        one tensor of zeros)."""
        inputs = node.inputs
        k = inputs.index(v)
        if inputs.count(v) == 1:
            return k
        taken = set()
        for ab in reversed(self.c.absorbs):  # the current node's absorbs come last
            if ab.node is not node:
                break
            taken.add(ab.input_index)
        free = [j for j, x in enumerate(inputs) if x is v and j not in taken]
        return free[0] if free else k

    def _shared(self, ref: ConstRef) -> bool:
        """A stored tensor several nodes read (not an exporter's merge of equal values)."""
        value = ref.stored
        if len(value.uses()) < 2:
            return False
        array = self.info.value(value)
        return bool(array.size) and not bool(np.all(array == array.reshape(-1)[0]))

    def _is_zero(self, v: ir.Value) -> bool:
        """A computed constant of zeros absorbs any scaling unchanged (0 · S = 0)."""
        try:
            return not np.any(self.info.value(v))
        except Exception:
            return False

    # -- node bookkeeping ---------------------------------------------------------------
    def begin_value(self) -> None:
        """Start work outside any node (seeding graph inputs)."""
        self.node = None
        self._pending = {}

    def begin(self, node: ir.Node) -> tuple[int, ...]:
        self.node = node
        self._pending = {}
        return self.c.mark()

    def commit(self) -> None:
        for key, (v, ids) in self._pending.items():
            self.values[key] = ids
            self.outputs[key] = v
        self._pending = {}

    def abort(self, mark: tuple[int, ...]) -> None:
        self.c.rollback(mark)
        self._pending = {}

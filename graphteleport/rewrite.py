"""Rewrite the stored weights for chosen cofactors (absorb mode).

For every constant the analysis said can absorb a scaling,
``W' = W · S`` with ``S = Π τ[ids]^e`` over the factors its rule gave
(``W'[o, i] = W[o, i] · τ_out[o] / τ_in[i]`` for a linear layer, ``b' = b · τ_out``
for a bias, …).  A weight used by several nodes gets one ``S`` (the analysis tied
its uses), except a uniform weight shared only by an exporter's accident, which
gets a private copy for each use whose ``S`` differs.  Each weight is read and
written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphteleport.analysis.constraints import Absorb, ConstRef
from graphteleport.analysis.driver import Analysis
from graphteleport.analysis.graphinfo import FLOAT_TYPES


@dataclass
class RewriteStats:
    """What the rewrite changed."""

    changed: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    weights_total: int = 0
    elements_changed: int = 0
    elements_total: int = 0

    @property
    def weights_changed(self) -> int:
        return len(self.changed)


def scale(ab: Absorb, tau: np.ndarray) -> np.ndarray:
    """``S = Π τ[f.ids]^f.exp`` (float64), broadcastable to the absorb's shape.

    The factors are kept in their compact layout (a conv's ``S`` is ``[O, C, 1, 1]``
    for an ``[O, C, k, k]`` weight), so this is cheap next to the weight itself.
    """
    s: np.ndarray = np.ones((1,) * len(ab.shape), dtype=np.float64)
    for f in ab.factors:
        t = tau[f.ids]
        s = s * (t if f.exp == 1 else t**f.exp)
    return s


def read(ref: ConstRef) -> np.ndarray:
    if ref.is_node:
        return np.asarray(ref.value.attributes["value"].as_tensor().numpy())  # type: ignore[attr-defined]
    return np.asarray(ref.value.const_value.numpy())  # type: ignore[attr-defined]


def write(ref: ConstRef, array: np.ndarray) -> None:
    """Store ``array`` where ``ref`` lives, keeping its name and dtype."""
    tensor = ir.tensor(array, name=ref.name)
    if ref.is_node:
        node = ref.value
        node.attributes["value"] = ir.AttrTensor("value", tensor)  # type: ignore[attr-defined]
        if node.outputs[0].type is not None:  # type: ignore[attr-defined]
            node.outputs[0].shape = ir.Shape(array.shape)  # type: ignore[attr-defined]
    else:
        ref.value.const_value = tensor  # type: ignore[attr-defined]
        ref.value.shape = ir.Shape(array.shape)  # type: ignore[attr-defined]


def _apply(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``W · S`` in W's dtype (S rounded to it first: exact for powers of two).

    A constant is broadcast-expanded only along the axes where ``S`` really varies
    (a scalar becoming per-channel); along the others — a sequence axis whose
    neurons the analysis tied — W keeps its size, so the model still accepts any
    length there.
    """
    s = _shrink(s, w.shape)
    flat = s.reshape(-1)
    if flat.size and np.all(flat == flat[0]):
        return w * w.dtype.type(flat[0])
    target = np.broadcast_shapes(w.shape, s.shape)
    return np.broadcast_to(w, target) * s.astype(w.dtype)


def _shrink(s: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reduce ``S`` to size 1 along axes where W has size 1 and S does not vary."""
    ranked = (1,) * (s.ndim - len(shape)) + tuple(shape)
    for ax in range(s.ndim):
        if ranked[ax] == 1 and s.shape[ax] > 1:
            first = s.take([0], axis=ax)
            if np.array_equal(s, np.broadcast_to(first, s.shape)):
                s = first
    extra = s.ndim - len(shape)
    if extra > 0 and all(d == 1 for d in s.shape[:extra]):
        s = s.reshape(s.shape[extra:])
    return s


def source_scale(shape: tuple[int, ...], uses: list[Absorb], tau: np.ndarray) -> np.ndarray:
    """The one ``S`` that every use of a weight agrees on: broadcastable to the source's
    ``shape`` when no use maps elements, else in that shape."""
    size = int(np.prod(shape, dtype=np.int64))
    if all(ab.index is None and not ab.expand for ab in uses):  # one use, or tied uses agree
        return scale(uses[0], tau)  # broadcastable to ``shape``
    s = np.ones(size, dtype=np.float64)
    for ab in uses:
        part = np.broadcast_to(scale(ab, tau), ab.shape).reshape(-1)
        if ab.index is None:
            if ab.expand:
                continue  # pinned by the analysis: a shared weight cannot expand
            s = part.copy()
        else:
            s[ab.index.reshape(-1)] = part
    return s.reshape(shape)


def _combined(w: np.ndarray, uses: list[Absorb], tau: np.ndarray) -> np.ndarray:
    """One scaled copy of a weight all of whose uses agree (ties made them agree)."""
    if len(uses) == 1 and uses[0].index is None:
        return _apply(w, scale(uses[0], tau))
    return _apply(w, source_scale(w.shape, uses, tau))


class _Writer:
    def __init__(self, model: ir.Model, stats: RewriteStats) -> None:
        self.graph = model.graph
        self.stats = stats
        self.names = {v.name for v in self.graph.initializers.values()} | {
            o.name for n in self.graph for o in n.outputs
        }

    def store(self, ref: ConstRef, old: np.ndarray, new: np.ndarray) -> None:
        changed = int(np.count_nonzero(new != old)) if new.shape == old.shape else new.size
        if not changed:
            return
        write(ref, new)
        self.stats.elements_total += new.size - old.size  # a broadcast-expanded constant
        self.stats.changed.append(ref.name)
        self.stats.elements_changed += changed

    def private_copy(self, ab: Absorb, new: np.ndarray) -> None:
        """Give one use of a shared weight its own initializer."""
        base = ab.source.name or "w"
        k = 1
        while f"{base}__gt{k}" in self.names:
            k += 1
        name = f"{base}__gt{k}"
        self.names.add(name)
        value = ir.Value(
            name=name,
            shape=ir.Shape(new.shape),
            type=ir.TensorType(ir.DataType.from_numpy(new.dtype)),
            const_value=ir.tensor(new, name=name),
        )
        self.graph.register_initializer(value)
        ab.node.replace_input_with(ab.input_index, value)  # type: ignore[attr-defined]
        self.stats.copies.append(name)
        self.stats.changed.append(name)
        self.stats.elements_changed += new.size
        self.stats.elements_total += new.size
        self.stats.weights_total += 1


def _rewrite_private(writer: _Writer, uses: list[Absorb], tau: np.ndarray) -> None:
    w = read(uses[0].source)
    news = [_apply(w, scale(ab, tau)) for ab in uses]
    same = all(n.shape == news[0].shape and np.array_equal(n, news[0]) for n in news)
    writer.store(uses[0].source, w, news[0])
    if same:
        return
    for ab, new in zip(uses[1:], news[1:]):
        if not (new.shape == w.shape and np.array_equal(new, w)):
            writer.private_copy(ab, new)


def count_weights(model: ir.Model) -> tuple[int, int]:
    """(number, elements) of float weights: initializers and Constant-node tensors."""
    count = elements = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None and v.const_value.dtype in FLOAT_TYPES:
            count += 1
            elements += v.const_value.size
    for node in model.graph:
        attr = node.attributes.get("value") if node.op_type == "Constant" else None
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            t = attr.as_tensor()
            if t.dtype in FLOAT_TYPES:
                count += 1
                elements += t.size
    return count, elements


def rewrite(model: ir.Model, analysis: Analysis, tau: np.ndarray) -> RewriteStats:
    """Scale every absorbing weight of ``model`` in place by per-neuron cofactors ``tau``."""
    stats = RewriteStats()
    stats.weights_total, stats.elements_total = count_weights(model)
    writer = _Writer(model, stats)
    for key, uses in analysis.by_source.items():
        if key in analysis.private and all(ab.index is None for ab in uses):
            _rewrite_private(writer, uses, tau)
        else:
            w = read(uses[0].source)
            writer.store(uses[0].source, w, _combined(w, uses, tau))
    return stats

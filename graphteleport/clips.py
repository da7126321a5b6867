"""Clip with constant bounds as a rescalable form: ``Clip(x, a, b) → Min(Max(x, A), B)``.

A Clip (ReLU6 is ``Clip(x, 0, 6)``) does not commute with a cofactor: ``clip(τx, a, b) ≠
τ clip(x, a, b)``.  Its bounds are scalars, so the analysis pins its neurons (absorb mode) or
wraps it in ``Mul(τ)·Clip(Mul(1/τ)·x)`` (insert mode).  But for τ > 0, per channel,

    τ · min(max(x, a), b) = min(max(τx, a·τ), b·τ),

so once the bounds are per-channel constants they carry the cofactor the way a bias does.
:func:`split_clips` rewrites every such Clip of the main graph into that form — ``Relu``
for a lower bound of 0 (ReLU6 becomes ``Min(Relu(x), 6)``), ``Max(x, A)`` for another lower
bound, ``Min(·, B)`` for an upper one — each bound a fresh scalar initializer of the input's
dtype.  The function is unchanged bit for bit (the same comparisons in the same order).

The rule table then does the rest: ``Max``/``Min`` with a constant operand tie the output to
the input, restrict the class to τ > 0 and let the constant absorb ``c' = c·τ_out``, which
broadcast-expands the scalar to one bound per channel (``[1, C, 1, 1]``) wherever τ varies.
So in absorb mode the Clip's classes are free and positive instead of pinned, and in insert
mode they need no ``Mul`` pair (a negative τ is no longer offered for them: the form holds
for τ > 0 only).

This changes the graph (one Clip becomes two nodes, and the last keeps the Clip's output
name, so the per-tensor check of :mod:`graphteleport.tensorcheck` still lines the models
up).  It is therefore an option of a teleport (``CofactorOptions.rescale_clip``, off by
default: absorb mode otherwise promises an unchanged graph, and ``compare`` needs one) and
the default of equalize, whose purpose — ranges a quantizer handles — needs these classes
free.  The torch frontend never uses it: it rescales a module's parameters in place and
cannot restructure its forward.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphteleport.insertion import FreshNames, add_initializer

__all__ = ["ClipSplit", "clip_bounds", "join_clips", "split_clips"]

_FLOATS = frozenset(
    {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
)


@dataclass
class ClipSplit:
    """What :func:`split_clips` did: the Clip nodes it rewrote (by name), the nodes it
    added (two per Clip with both bounds, else one) and the bound initializers it removed
    once no node read them."""

    clips: list[str] = field(default_factory=list)
    nodes_added: int = 0
    removed: list[str] = field(default_factory=list)
    #: per rewritten Clip (in ``clips``' order): its output's name, which the last new node
    #: keeps, and its bounds (:func:`join_clips` reads them)
    outputs: list[str] = field(default_factory=list)
    bounds: list[tuple[float | None, float | None]] = field(default_factory=list)


def clip_bounds(node: ir.Node, opset: int) -> tuple[float | None, float | None] | None:
    """``(a, b)`` of a Clip whose bounds are constant scalars (None for a missing or
    infinite bound: ``±FLT_MAX``, opset 6's defaults, count as missing), or None when a
    bound is computed at run time."""
    found = _bounds(node, opset)
    return None if found is None else found[0]


def _bounds(
    node: ir.Node, opset: int
) -> tuple[tuple[float | None, float | None], ir.DataType | None] | None:
    """:func:`clip_bounds`, and the bounds' dtype (which is the input's; None for opset
    6's attributes)."""
    if opset < 11:
        raw = [node.attributes.get_float("min"), node.attributes.get_float("max")]
        return (_finite_or_none(raw[0]), _finite_or_none(raw[1])), None
    values: list[float | None] = []
    dtype = None
    for k in (1, 2):
        v = node.inputs[k] if len(node.inputs) > k else None
        if v is None:
            values.append(None)
            continue
        tensor = ir.convenience.get_const_tensor(v)
        if tensor is None or tensor.size != 1:
            return None
        dtype = tensor.dtype
        values.append(_finite_or_none(float(tensor.numpy().reshape(-1)[0])))
    return (values[0], values[1]), dtype


def _finite_or_none(x: float | None) -> float | None:
    if x is None or not np.isfinite(x) or abs(x) >= float(np.finfo(np.float32).max):
        return None
    return x


Bounds = tuple[float | None, float | None, ir.DataType]


def _splittable(node: ir.Node, opset: int) -> Bounds | None:
    """The bounds and dtype of a Clip :func:`split_clips` rewrites: a float input that is
    not a constant (its dtype declared, or the bounds'), constant bounds, and not already
    a form the rules handle (no bounds: the identity; only a lower bound of 0: ReLU)."""
    if node.op_type != "Clip" or node.domain not in ("", "ai.onnx"):
        return None
    x = node.inputs[0] if node.inputs else None
    found = _bounds(node, opset)
    if x is None or found is None or ir.convenience.get_const_tensor(x) is not None:
        return None
    (lo, hi), dtype = found
    dtype = x.dtype or dtype
    if dtype not in _FLOATS or (hi is None and (lo is None or lo == 0.0)):
        return None
    return lo, hi, dtype


def _scalar(
    graph: ir.Graph, names: FreshNames, base: str, x: float, dtype: ir.DataType
) -> ir.Value:
    """A fresh scalar initializer holding ``x`` in ``dtype``."""
    return add_initializer(graph, names(base), np.asarray(x, dtype=dtype.numpy()))


def _replacement(
    graph: ir.Graph, node: ir.Node, bounds: Bounds, names: FreshNames
) -> list[ir.Node]:
    """The nodes computing ``Clip(x, lo, hi)``: ``Relu``/``Max(x, A)`` then ``Min(·, B)``."""
    lo, hi, dtype = bounds
    x = node.inputs[0]
    assert x is not None
    base = node.name or x.name or "clip"
    nodes: list[ir.Node] = []
    cur = x
    if lo is not None:
        if lo == 0.0:
            inputs = [cur]
            op = "Relu"
        else:
            inputs = [cur, _scalar(graph, names, f"{base}_low", lo, dtype)]
            op = "Max"
        out = ir.Value(name=names(f"{base}_{op.lower()}"), type=x.type, shape=x.shape)
        nodes.append(ir.Node("", op, inputs, outputs=[out], name=names(f"{base}_{op.lower()}")))
        cur = out
    if hi is not None:
        high = _scalar(graph, names, f"{base}_high", hi, dtype)
        out = ir.Value(name=names(f"{base}_min"), type=x.type, shape=x.shape)
        nodes.append(ir.Node("", "Min", [cur, high], outputs=[out], name=names(f"{base}_min")))
    return nodes


def split_clips(model: ir.Model) -> ClipSplit:
    """Rewrite, in place, every Clip of ``model``'s main graph whose bounds are constant
    into ``Min(Max(x, A), B)`` (``Relu`` for a lower bound of 0; see the module
    docstring).  The last new node's output takes the Clip's output name; bound
    initializers no node reads any more (and no graph input or output names) are
    removed."""
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    names = FreshNames(graph)
    done = ClipSplit()
    bound_values: list[ir.Value] = []
    for node in list(graph):
        bounds = _splittable(node, opset)
        if bounds is None:
            continue
        new = _replacement(graph, node, bounds, names)
        bound_values.extend(v for v in node.inputs[1:] if v is not None)
        old = node.outputs[0]
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], new, [old], [new[-1].outputs[0]]
        )
        done.clips.append(node.name or old.name or "")
        done.nodes_added += len(new)
        done.outputs.append(new[-1].outputs[0].name or "")
        done.bounds.append(bounds[:2])
    done.removed = _drop_unused(graph, bound_values)
    return done


def _drop_unused(graph: ir.Graph, values: list[ir.Value]) -> list[str]:
    """Remove the initializers (and Constant nodes) among ``values`` that nothing reads
    any more."""
    interface = {id(v) for v in [*graph.inputs, *graph.outputs]}
    removed: list[str] = []
    for v in {id(v): v for v in values}.values():
        name = v.name or ""
        if v.uses() or id(v) in interface:
            continue
        producer = v.producer()
        if producer is not None and producer.op_type == "Constant" and producer.graph is graph:
            graph.remove(producer, safe=True)
        elif graph.initializers.get(name) is v:
            graph.initializers.pop(name)
        else:
            continue
        removed.append(name)
    return removed


def join_clips(model: ir.Model, split: ClipSplit, outputs: Collection[str]) -> ClipSplit:
    """Undo, in place, :func:`split_clips` for the Clips whose output is named in
    ``outputs``: their ``Relu``/``Max(x, A)`` and ``Min(·, B)`` become one ``Clip(x, a, b)``
    again with the original scalar bounds (opset 11 and later: bound inputs; before,
    attributes), keeping the output name; the same function bit for bit.  Only a form
    still as :func:`split_clips` wrote it is joined (each node's bound a scalar equal to
    the original, the intermediate value read once).  Returns ``split`` without the
    joined Clips (their nodes no longer counted, the bounds they no longer read removed)."""
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    names = FreshNames(graph)
    values = {n.outputs[0].name: n.outputs[0] for n in graph if n.outputs}
    kept = ClipSplit(removed=list(split.removed))
    dropped: list[ir.Value] = []
    for clip, out, bounds in zip(split.clips, split.outputs, split.bounds, strict=True):
        chain = _split_chain(values.get(out), bounds) if out in outputs else None
        if chain is None:
            kept.clips.append(clip)
            kept.outputs.append(out)
            kept.bounds.append(bounds)
            kept.nodes_added += 1 + (bounds[0] is not None and bounds[1] is not None)
            continue
        x = chain[0].inputs[0]
        assert x is not None
        dtype = x.dtype or ir.DataType.FLOAT
        node = _clip_node(graph, names, clip, x, bounds, dtype, opset)
        dropped.extend(v for n in chain for v in n.inputs[1:] if v is not None)
        old = chain[-1].outputs[0]
        ir.convenience.replace_nodes_and_values(
            graph, chain[0], chain, [node], [old], [node.outputs[0]]
        )
        node.outputs[0].name = out
    kept.removed += _drop_unused(graph, dropped)
    return kept


def _split_chain(
    value: ir.Value | None, bounds: tuple[float | None, float | None]
) -> list[ir.Node] | None:
    """The nodes :func:`split_clips` wrote for a Clip with ``bounds`` whose output is
    ``value``, first to last, if they are still that form; else None."""
    lo, hi = bounds
    chain: list[ir.Node] = []
    cur = value
    for op, bound in (("Min", hi), ("Relu" if lo == 0.0 else "Max", lo)):
        if bound is None:
            continue
        node = cur.producer() if cur is not None else None
        if node is None or node.op_type != op:
            return None
        if op != "Relu" and _scalar_value(node.inputs[1]) != bound:
            return None
        if chain and len(node.outputs[0].uses()) != 1:
            return None
        chain.insert(0, node)
        cur = node.inputs[0]
    return chain or None


def _scalar_value(v: ir.Value | None) -> float | None:
    tensor = None if v is None else ir.convenience.get_const_tensor(v)
    return None if tensor is None or tensor.size != 1 else float(tensor.numpy().reshape(-1)[0])


def _clip_node(
    graph: ir.Graph,
    names: FreshNames,
    name: str,
    x: ir.Value,
    bounds: tuple[float | None, float | None],
    dtype: ir.DataType,
    opset: int,
) -> ir.Node:
    """``Clip(x, lo, hi)`` with scalar bounds: fresh initializers (opset 11 and later) or
    the ``min``/``max`` attributes (opset 6-10); its output a fresh value."""
    out = ir.Value(name=names(f"{name}_joined"), type=x.type, shape=x.shape)
    if opset < 11:
        attrs = [
            ir.AttrFloat32(k, float(b))
            for k, b in zip(("min", "max"), bounds, strict=True)
            if b is not None
        ]
        return ir.Node("", "Clip", [x], attributes=attrs, outputs=[out], name=name)
    inputs: list[ir.Value | None] = [x]
    for key, b in zip(("low", "high"), bounds, strict=True):
        inputs.append(None if b is None else _scalar(graph, names, f"{name}_{key}", b, dtype))
    while inputs[-1] is None:
        inputs.pop()
    return ir.Node("", "Clip", inputs, outputs=[out], name=name)

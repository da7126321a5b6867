"""The op rule table: the one place that says how each op constrains cofactors.

Notation (DESIGN.md §1): τ_s, τ_t are the cofactors of the source and target
neurons of a weight; a rewritten weight is ``W' = τ_t · W / τ_s``.  Every rule
takes ``(ctx, node)``; see :mod:`graphteleport.analysis.context` for the calls.
Ops missing from :data:`RULES` are pinned with the op named in the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from graphteleport.analysis.constraints import Flag, Pinned, Unsupported
from graphteleport.analysis.context import Context, align, broadcast_shape, compress
from graphteleport.analysis.graphinfo import evaluate

Rule = Callable[[Context, ir.Node], None]
IntArray = np.ndarray


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _x(node: ir.Node, k: int = 0) -> ir.Value:
    inputs = node.inputs
    v = inputs[k] if len(inputs) > k else None
    if v is None:
        raise Unsupported(f"input {k} is missing")
    return v


def _require_act(ctx: Context, v: ir.Value, what: str) -> IntArray:
    if not ctx.act(v):
        raise Unsupported(f"{what} is not an activation")
    return ctx.ids(v)


def _require_const(ctx: Context, v: ir.Value | None, what: str) -> np.ndarray:
    if v is None or not ctx.const(v):
        raise Unsupported(f"{what} is not a constant")
    return ctx.info.value(v)


# -- elementwise ----------------------------------------------------------------------------
def _alias(ctx: Context, node: ir.Node) -> None:
    """Identity-like: ``f(τx) = τ f(x)`` for any τ; the output is the same neurons."""
    ctx.set(node.outputs[0], _require_act(ctx, _x(node), "input"))


def _activation(group: str, flag: int, reason: Callable[[ir.Node], str]) -> Rule:
    """A per-neuron activation that commutes with τ only in ``group`` (positive: the ReLU
    family, ``f(τx) = τ f(x)`` for τ > 0; sign: odd functions, τ = ±1; any: nothing but
    τ = 1).  Absorb mode restricts its neurons to that group, with the reason; insert mode
    wraps it, ``f' = τ·f(x/τ)``, where a cofactor falls outside the group."""

    def rule(ctx: Context, node: ir.Node) -> None:
        ids = _require_act(ctx, _x(node), "input")
        if ctx.insert:
            ctx.wrap(ids, group)
        else:
            ctx.restrict(ids, flag, reason(node))
        ctx.set(node.outputs[0], ids)

    return rule


def _positive(reason: str) -> Rule:
    return _activation("positive", Flag.POSITIVE, lambda _node: reason)


_odd = _activation("sign", Flag.SIGN, lambda n: f"{n.op_type} is odd, not homogeneous: τ = ±1 only")
_not_equivariant = _activation(
    "any", Flag.PIN, lambda n: f"{n.op_type} is not equivariant (use --mode insert)"
)
# Softmax/LogSoftmax/Hardmax mix a whole axis, yet τ ⊙ softmax(x'/τ) is still right in
# insert mode: both Muls act per neuron.
_softmax = _activation("any", Flag.PIN, lambda n: f"{n.op_type} axis")


def _abs(ctx: Context, node: ir.Node) -> None:
    """``|τx| = τ|x|`` for τ > 0."""
    _positive("Abs: |τx| = τ|x| for τ > 0 only")(ctx, node)


def _reciprocal(ctx: Context, node: ir.Node) -> None:
    """``1/(τx) = τ^{-1} (1/x)``: the output relates to the input with exponent −1."""
    ids = _require_act(ctx, _x(node), "input")
    out = ctx.new(ids.shape)
    ctx.relate(out, ids)
    ctx.set(node.outputs[0], out)


def _clip(ctx: Context, node: ir.Node) -> None:
    """Clip(x, 0, ∞) is ReLU; Clip with no bounds is the identity; other bounds pin."""
    lo, hi = _clip_bounds(ctx, node)
    if lo is None and hi is None:
        return _alias(ctx, node)
    if hi is None and lo is not None and float(lo) == 0.0:
        return _positive("Clip(x, 0): ReLU, τ > 0")(ctx, node)
    return _not_equivariant(ctx, node)


def _clip_bounds(ctx: Context, node: ir.Node) -> tuple[Any, Any]:
    if ctx.info.opset < 11:
        return _attr(node, "min"), _attr(node, "max")
    bounds: list[Any] = []
    for k in (1, 2):
        v = node.inputs[k] if len(node.inputs) > k else None
        bounds.append(None if v is None else _require_const(ctx, v, "Clip bound"))
    return bounds[0], bounds[1]


def _cast(ctx: Context, node: ir.Node) -> None:
    """A float-to-float Cast commutes with scaling (up to rounding); to integers it pins.
    From the integers a quantized op computed, the output is pinned with that op named."""
    x = _x(node)
    if not ctx.act(x) and not ctx.const(x) and not ctx.info.is_float(x):
        origin = quantized_origin(x)
        if origin is not None:
            raise Pinned(origin)
    if ctx.info.is_float(node.outputs[0]):
        return _alias(ctx, node)
    ctx.pin(_require_act(ctx, _x(node), "input"), "Cast to a non-float type")
    return None


def _dropout(ctx: Context, node: ir.Node) -> None:
    """Dropout at inference is the identity (its mask output carries no neurons)."""
    _alias(ctx, node)


# -- broadcasting n-ary ops -------------------------------------------------------------
def _out_rank(ctx: Context, node: ir.Node) -> int:
    return len(ctx.shape(node.outputs[0]))


def _same_cofactor(ctx: Context, node: ir.Node, inputs: list[ir.Value], flag: int = 0) -> None:
    """``f(τa, τb, …) = τ f(a, b, …)``: all activation inputs and the output share τ.

    A constant operand ``c`` absorbs the output cofactor, ``c' = τ_out · c`` (a bias);
    one that cannot be rewritten pins the output.
    """
    rank = _out_rank(ctx, node)
    acts = [align(ctx.ids(v), rank) for v in inputs if ctx.act(v)]
    if not acts:
        raise Unsupported("no activation input")
    shape = broadcast_shape(*[a.shape for a in acts])
    out = acts[0].copy() if acts[0].shape == shape else np.broadcast_to(acts[0], shape).copy()
    if ctx.rescale_residual and not flag and len(acts) > 1:
        # The output keeps the first branch's cofactors; every other branch is rescaled
        # on its edge by τ_out/τ_branch (one Mul), so its cofactors become free.
        first = next(k for k, v in enumerate(node.inputs) if v is not None and ctx.act(v))
        for k, v in enumerate(node.inputs):
            if k > first and v is not None and ctx.act(v) and (node.op_type != "Where" or k > 0):
                ctx.unscale(k, [(out, 1), (ctx.ids(v), -1)])
        acts = acts[:1]
    for a in acts[1:]:
        ctx.tie(a, out)
    for v in inputs:
        if not ctx.act(v) and not ctx.absorb(v, [(out, 1)], expand=True):
            ctx.pin(out, f"{node.op_type} constant operand: {ctx.refused('constant')}")
    if flag:
        ctx.restrict(out, flag, f"{node.op_type} commutes with τ > 0 only")
    ctx.set(node.outputs[0], out)


def _add(ctx: Context, node: ir.Node) -> None:
    """Add/Sub/Sum/Mean/Where branches: ``τa ± τb = τ(a ± b)``; constants act as biases."""
    data = list(node.inputs[1:]) if node.op_type == "Where" else list(node.inputs)
    _same_cofactor(ctx, node, [v for v in data if v is not None])


def _max(ctx: Context, node: ir.Node) -> None:
    """Max/Min: ``max(τa, τb) = τ max(a, b)`` for τ > 0."""
    _same_cofactor(ctx, node, [v for v in node.inputs if v is not None], Flag.POSITIVE)


def _mul(ctx: Context, node: ir.Node) -> None:
    """Mul/Div.

    * activation · per-channel constant: a diagonal linear map, ``c' = c · τ_out / τ_x``
      (``c' = c · τ_out · τ_x`` for ``c / x``), or ``τ_out = τ_x`` if ``c`` is computed;
    * activation · scalar: ``τ_out = τ_x``, c unchanged — except in insert mode right
      before an activation that would be wrapped: there c absorbs ``τ_x`` (it becomes
      per-channel) and the activation sees unscaled values, so no node is inserted;
    * activation · activation: ``τ_out = τ_a · τ_b^{±1}``, a monomial resolved once
      the pins are known (one side is usually pinned, e.g. a gate).
    """
    a, b = _x(node, 0), _x(node, 1)
    rank = _out_rank(ctx, node)
    div = node.op_type == "Div"
    if ctx.act(a) and ctx.act(b) and ctx.insert:
        return _mul_insert(ctx, node, rank)
    if ctx.act(a) and ctx.act(b):
        ia, ib = align(ctx.ids(a), rank), align(ctx.ids(b), rank)
        out = ctx.new(np.broadcast_shapes(ia.shape, ib.shape))
        ctx.monomial([(out, 1), (ia, -1), (ib, 1 if div else -1)])
        ctx.set(node.outputs[0], out)
        return
    x, c = (a, b) if ctx.act(a) else (b, a)
    ix = align(_require_act(ctx, x, "input"), rank)
    reciprocal = div and c is a  # c / x
    scalar = int(np.prod(ctx.shape(c))) == 1
    fold = scalar and ctx.insert and _feeds_wrap(node)
    if scalar and not fold and not reciprocal:
        ctx.set(node.outputs[0], ix)
        return
    out = ctx.new(ix.shape)
    # x·c and x/c: c' = c · (τ_out/τ_x)^{±1};  c/x: c' = c · τ_out · τ_x
    factors = (
        [(out, 1), (ix, 1)] if reciprocal else [(out, -1 if div else 1), (ix, 1 if div else -1)]
    )
    if ctx.absorb(c, factors, expand=True):
        if fold:
            ctx.pin(out, f"cofactor folded into {node.op_type} (no node inserted)")
        ctx.set(node.outputs[0], out)
        return
    ctx.c.rollback_last_block()
    if reciprocal:
        out = ctx.new(ix.shape)
        ctx.relate(out, ix)
        ctx.set(node.outputs[0], out)
    else:
        ctx.set(node.outputs[0], ix)


def _feeds_wrap(node: ir.Node) -> bool:
    """The output's only consumer is an activation insert mode would wrap."""
    uses = list(node.outputs[0].uses())
    return len(uses) == 1 and uses[0].node.op_type in WRAPPED_OPS


def _mul_insert(ctx: Context, node: ir.Node, rank: int) -> None:
    """Insert mode, activation × activation: one operand is seen unscaled (a Mul by
    ``1/τ`` on its edge), the output carries the other's cofactors.  The unscaled
    operand is preferably a wrapped activation's output (SiLU = x·σ(x)), where the
    inserted Muls cancel."""
    keep, drop = (1, 0) if ctx.wrapped_output(_x(node, 0)) and node.op_type == "Mul" else (0, 1)
    ik = align(ctx.ids(_x(node, keep)), rank)
    idr = align(ctx.ids(_x(node, drop)), rank)
    ctx.unscale(drop)
    ctx.set(node.outputs[0], np.broadcast_to(ik, np.broadcast_shapes(ik.shape, idr.shape)))


def _pow(ctx: Context, node: ir.Node) -> None:
    """``(τx)^p = τ^p x^p``: p = 1 is the identity; otherwise pinned."""
    p = _require_const(ctx, node.inputs[1], "exponent")
    if p.size == 1 and float(p.ravel()[0]) == 1.0:
        return _alias(ctx, node)
    return _not_equivariant(ctx, node)


# -- linear layers --------------------------------------------------------------------------
def _matmul(ctx: Context, node: ir.Node) -> None:
    """``Y[..., n] = Σ_k X[..., k] W[k, n]``: ``W'[k, n] = W[k, n] · τ_out[n] / τ_in[k]``.

    The input's cofactor may not vary along its rows (they share W), so those axes
    collapse.  Activation × activation products are handled by :func:`_matmul_acts`.
    """
    a, b = _x(node, 0), _x(node, 1)
    if ctx.act(a) and ctx.act(b):
        return _matmul_acts(ctx, node, a, b)
    if ctx.act(a) and len(ctx.shape(b)) >= 2:
        ia = ctx.ids(a)
        tin = ctx.collapse(ia, range(ia.ndim - 1)).reshape(-1)
        tin = np.broadcast_to(tin, (ctx.shape(a)[-1],))
        out = ctx.new_for(node.outputs[0], [-1])
        if not ctx.absorb(b, [(out.reshape(1, -1), 1), (tin.reshape(-1, 1), -1)]):
            raise Unsupported(ctx.refused("MatMul weight"))
        ctx.set(node.outputs[0], out)
        return None
    if ctx.act(b) and len(ctx.shape(a)) >= 2 and len(ctx.shape(b)) >= 2:
        ib = ctx.ids(b)
        tin = ctx.collapse(ib, [k for k in range(ib.ndim) if k != ib.ndim - 2]).reshape(-1)
        tin = np.broadcast_to(tin, (ctx.shape(b)[-2],))
        out = ctx.new_for(node.outputs[0], [-2])
        if not ctx.absorb(a, [(out.reshape(-1, 1), 1), (tin.reshape(1, -1), -1)]):
            raise Unsupported(ctx.refused("MatMul weight"))
        ctx.set(node.outputs[0], out)
        return None
    raise Unsupported("MatMul with a vector operand")


def _matmul_acts(ctx: Context, node: ir.Node, a: ir.Value, b: ir.Value) -> None:
    """Activation × activation: ``Y = A B`` with ``A[..., m, k]``, ``B[..., k, n]``.

    * one operand uniform over its matrix axes (e.g. softmax probabilities): it is
      pinned and the output carries the other operand's cofactors (P·V);
    * otherwise the contracted sides cancel: ``τ_A[k] · τ_B[k] = 1`` (Q·Kᵀ), with
      rows of A and columns of B collapsed, and the output pinned.
    """
    ia, ib = ctx.ids(a), ctx.ids(b)
    if ia.ndim < 2 or ib.ndim < 2:
        raise Unsupported("MatMul of activation vectors")
    rank = _out_rank(ctx, node)
    if ia.shape[-2:] == (1, 1):
        ctx.pin(ia, "left operand of an activation MatMul carries no cofactor")
        out = ctx.collapse(ib, [ib.ndim - 2])
        ctx.set(node.outputs[0], _batch_join(ctx, align(ia, rank), align(out, rank)))
        return
    if ib.shape[-2:] == (1, 1):
        ctx.pin(ib, "right operand of an activation MatMul carries no cofactor")
        out = ctx.collapse(ia, [ia.ndim - 1])
        ctx.set(node.outputs[0], _batch_join(ctx, align(ib, rank), align(out, rank)))
        return
    ka = ctx.collapse(ia, [ia.ndim - 2])
    kb = ctx.collapse(ib, [ib.ndim - 1])
    ka = np.swapaxes(align(ka, rank), -1, -2)
    ctx.relate(ka, align(kb, rank))
    out = ctx.new([1] * rank)
    ctx.pin(out, "product of activations whose cofactors cancel (Q·Kᵀ)")
    ctx.set(node.outputs[0], out)


def _batch_join(ctx: Context, pinned: IntArray, carried: IntArray) -> IntArray:
    """The carried operand's ids, with the batch axes tied to the pinned operand's."""
    shape = np.broadcast_shapes(pinned.shape[:-2], carried.shape[:-2]) + carried.shape[-2:]
    return np.broadcast_to(carried, shape)


def _heads(ctx: Context, v: ir.Value, heads: int | None) -> IntArray:
    """Per-(head, head-dim) ids of an attention operand, uniform over batch and sequence:
    ``[B, H, T, D]`` directly, ``[B, T, H·D]`` split with the op's head count."""
    ids = ctx.ids(v)
    if ids.ndim == 4:
        full = np.broadcast_to(ctx.collapse(ids, [0, 2]), (1, ctx.shape(v)[1], 1, ctx.shape(v)[3]))
        return full.reshape(full.shape[1], full.shape[3])
    if ids.ndim == 3 and heads:
        width = ctx.shape(v)[2]
        full = np.broadcast_to(ctx.collapse(ids, [0, 1]), (1, 1, width))
        return full.reshape(heads, width // heads)
    raise Unsupported("attention operands must be [B, H, T, D], or [B, T, H·D] with head counts")


def _attention(ctx: Context, node: ir.Node) -> None:
    """ONNX ``Attention`` (opset 23): ``softmax(Q·Kᵀ·s + mask)·V`` per head.

    Q's head dimension d of head h and K's d of its key/value head ``g(h) = h // (Hq/Hkv)``
    take inverse cofactors (the scores do not change); the output carries V's cofactors
    per head dimension, repeated over the query heads of each group.  Cached keys and
    values share K's and V's cofactors; a float mask is pinned.
    """
    q, k, v = _x(node, 0), _x(node, 1), _x(node, 2)
    for x in (q, k, v):
        _require_act(ctx, x, "Attention Q/K/V")
    hq, hkv = _attr(node, "q_num_heads"), _attr(node, "kv_num_heads")
    iq, ik, iv = _heads(ctx, q, hq), _heads(ctx, k, hkv), _heads(ctx, v, hkv)
    group = iq.shape[0] // ik.shape[0]
    ctx.relate(iq, np.repeat(ik, group, axis=0))
    y = np.repeat(iv, group, axis=0)
    rank = len(ctx.shape(node.outputs[0]))
    ctx.set(node.outputs[0], y[None, :, None, :] if rank == 4 else y.reshape(1, 1, -1))
    _attention_extras(ctx, node, ik, iv)


def _attention_extras(ctx: Context, node: ir.Node, ik: IntArray, iv: IntArray) -> None:
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    if mask is not None and ctx.act(mask):
        ctx.pin(ctx.ids(mask), "Attention mask is added to the scores")
    for k_in, k_out, ids in ((4, 1, ik), (5, 2, iv)):  # past -> present key / value
        cached = ids[None, :, None, :]
        past = node.inputs[k_in] if len(node.inputs) > k_in else None
        if past is not None and ctx.act(past):
            ctx.tie(ctx.collapse(ctx.ids(past), [0, 2]), cached)
        if len(node.outputs) > k_out:
            ctx.set(node.outputs[k_out], cached)
    if len(node.outputs) > 3 and ctx.info.is_float(node.outputs[3]):
        scores = ctx.new([1] * len(ctx.shape(node.outputs[3])))
        ctx.pin(scores, "attention scores (Q·Kᵀ cofactors cancel)")
        ctx.set(node.outputs[3], scores)


def _gemm(ctx: Context, node: ir.Node) -> None:
    """``Y = α A' B' + β C``: ``B'[k, n] · τ_out[n] / τ_in[k]``, ``C' = C · τ_out``."""
    a, b = _x(node, 0), _x(node, 1)
    ta, tb = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
    if not ctx.act(a) or ctx.act(b):
        raise Unsupported("Gemm whose A is not an activation or B is not a constant")
    tin = ctx.collapse(ctx.ids(a), [1 if ta else 0]).reshape(-1)
    tin = np.broadcast_to(tin, (ctx.shape(a)[0 if ta else 1],))
    out = ctx.new_for(node.outputs[0], [1])
    fo, fi = out.reshape(-1), tin
    factors = (
        [(fo.reshape(-1, 1), 1), (fi.reshape(1, -1), -1)]
        if tb
        else [(fo.reshape(1, -1), 1), (fi.reshape(-1, 1), -1)]
    )
    if not ctx.absorb(b, factors):
        raise Unsupported(ctx.refused("Gemm weight"))
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is not None:
        _bias(ctx, node, c, out)
    ctx.set(node.outputs[0], out)


def _bias(ctx: Context, node: ir.Node, c: ir.Value, out: IntArray) -> None:
    if ctx.act(c):
        ctx.tie(align(ctx.ids(c), out.ndim), out)
        return
    rank = len(ctx.shape(c))
    ids = out.reshape(out.shape[out.ndim - rank :]) if rank < out.ndim else out
    if not ctx.absorb(c, [(ids, 1)], expand=True):
        raise Unsupported(ctx.refused("bias"))


def _conv_in(ctx: Context, x: ir.Value) -> IntArray:
    """Input channel cofactors of a conv: constant over batch and spatial axes."""
    ix = ctx.ids(x)
    if ix.ndim > 1 and ix.size == ix.shape[1]:  # already one id per channel, [1, C, 1, …]
        tin = ix.reshape(-1)
    else:
        tin = ctx.collapse(ix, [0, *range(2, ix.ndim)]).reshape(-1)
    channels = ctx.shape(x)[1]
    return tin if tin.shape == (channels,) else np.broadcast_to(tin, (channels,))


def _conv(ctx: Context, node: ir.Node) -> None:
    """``W'[o, j, …] = W[o, j, …] · τ_out[o] / τ_in[g(o)·C/G + j]``, ``B' = B · τ_out``.

    ``g(o) = o // (O/G)`` is the group of output channel o (G = ``group``), so
    grouped and depthwise convolutions pair each output with its own inputs.
    """
    _conv_like(ctx, node, transposed=False)


def _conv_transpose(ctx: Context, node: ir.Node) -> None:
    """``W[c, j, …]`` maps input c to output ``g(c)·O/G + j``: ``W' = W · τ_out / τ_in[c]``."""
    _conv_like(ctx, node, transposed=True)


def _conv_like(ctx: Context, node: ir.Node, transposed: bool) -> None:
    """Conv (``W[o, j, …]``: output o, input ``g(o)·C/G + j``) and ConvTranspose
    (``W[c, j, …]``: input c, output ``g(c)·O/G + j``) alike: the weight's first axis
    holds one side's channels, its second the other side's channels of the same group."""
    what = "ConvTranspose" if transposed else "Conv"
    x, w = _x(node, 0), _x(node, 1)
    _require_act(ctx, x, f"{what} input")
    wshape = ctx.shape(w)
    groups = int(_attr(node, "group", 1))
    tin = _conv_in(ctx, x)
    out = ctx.new_for(node.outputs[0], [1])
    first, second = (tin, out.reshape(-1)) if transposed else (out.reshape(-1), tin)
    rows, per = wshape[0], wshape[1]
    spatial = (1,) * (len(wshape) - 2)
    f_first = first.reshape((rows, 1, *spatial))
    if groups == 1:  # keep the factor broadcastable: every row sees every column
        f_second = second.reshape((1, per, *spatial))
    else:
        r = np.arange(rows)[:, None]
        j = np.arange(per)[None, :]
        f_second = second[(r // (rows // groups)) * per + j].reshape((rows, per, *spatial))
    fo, fi = (f_second, f_first) if transposed else (f_first, f_second)
    if not ctx.absorb(w, [(fo, 1), (fi, -1)]):
        raise Unsupported(ctx.refused(f"{what} weight"))
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        _bias(ctx, node, node.inputs[2], out.reshape(-1))
    ctx.set(node.outputs[0], out)


def _batchnorm(ctx: Context, node: ir.Node) -> None:
    """Inference BatchNorm is a per-channel affine map, so input and output are free:

    ``scale' = scale · τ_out / τ_in``, ``mean' = mean · τ_in``, ``B' = B · τ_out``,
    ``var`` unchanged — exact, since ``(τ_in x − τ_in μ) · scale/τ_in = (x − μ) · scale``.
    """
    if int(_attr(node, "training_mode", 0)):
        raise Unsupported("BatchNormalization in training mode")
    x = _x(node)
    _require_act(ctx, x, "BatchNormalization input")
    tin = _conv_in(ctx, x)
    out = ctx.new_for(node.outputs[0], [1])
    fo = out.reshape(-1)
    scale, bias, mean, var = _x(node, 1), _x(node, 2), _x(node, 3), _x(node, 4)
    if ctx.training:
        return _batchnorm_training(ctx, node, tin, out, [scale, bias, mean, var])
    ok = (
        ctx.absorb(scale, [(fo, 1), (tin, -1)])
        and ctx.absorb(bias, [(fo, 1)])
        and ctx.absorb(mean, [(tin, 1)])
    )
    if not ok:
        raise Unsupported(ctx.refused("BatchNormalization parameters"))
    ctx.set(node.outputs[0], out)


def _batchnorm_training(
    ctx: Context, node: ir.Node, tin: IntArray, out: IntArray, params: list[ir.Value]
) -> None:
    """BatchNorm that must stay right in training mode (torch frontend).

    Batch statistics normalise a positive input cofactor away, so ``τ_in > 0`` and
    ``scale' = scale · τ_out``, ``B' = B · τ_out``; the running statistics follow the
    input, ``mean' = mean · τ_in``, ``var' = var · τ_in²``, so eval mode stays right
    (exact up to BatchNorm's eps).
    """
    scale, bias, mean, var = params
    fo = out.reshape(-1)
    ctx.restrict(tin, Flag.POSITIVE, "BatchNorm input: batch statistics need τ > 0")
    ok = (
        ctx.absorb(scale, [(fo, 1)])
        and ctx.absorb(bias, [(fo, 1)])
        and ctx.absorb(mean, [(tin, 1)])
        and ctx.absorb(var, [(tin, 2)])
    )
    if not ok:
        raise Unsupported(ctx.refused("BatchNormalization parameters"))
    ctx.set(node.outputs[0], out)


def _norm(ctx: Context, node: ir.Node, axes: list[int], feature: list[int]) -> None:
    """Normalization ``y = γ · (x − μ)/σ + β`` over ``axes``.

    The input's scale only cancels up to ``eps``, so its neurons are pinned; the
    output is a per-feature affine map: ``γ' = γ · τ_out``, ``β' = β · τ_out``.
    """
    x = _x(node)
    ids = _require_act(ctx, x, "input")
    if ctx.insert:
        ctx.unscale(0)
    else:
        ctx.pin(ids, f"{node.op_type} input (normalized: scale cancels only up to eps)")
    out = ctx.new_for(node.outputs[0], feature)
    rank = out.ndim
    for k in (1, 2):
        v = node.inputs[k] if len(node.inputs) > k else None
        if v is None:
            continue
        prank = len(ctx.shape(v))
        ids_k = out if node.op_type != "InstanceNormalization" else out.reshape(-1)
        ids_k = ids_k.reshape(ids_k.shape[ids_k.ndim - prank :]) if prank < ids_k.ndim else ids_k
        if not ctx.absorb(v, [(ids_k, 1)], expand=True):
            raise Unsupported(ctx.refused("normalization parameters"))
    del rank
    ctx.set(node.outputs[0], out)
    for extra in node.outputs[1:]:
        if ctx.info.is_float(extra) and not ctx.const(extra):
            pinned = ctx.new([1] * len(ctx.shape(extra)))
            ctx.pin(pinned, f"{node.op_type} statistics output")
            ctx.set(extra, pinned)


def _layernorm(ctx: Context, node: ir.Node) -> None:
    """LayerNormalization over axes ``axis..``: features are the normalized axes."""
    rank = len(ctx.shape(_x(node)))
    axis = int(_attr(node, "axis", -1)) % rank
    axes = list(range(axis, rank))
    _norm(ctx, node, axes, axes)


def _instancenorm(ctx: Context, node: ir.Node) -> None:
    """InstanceNormalization normalizes each channel over space: features are channels."""
    rank = len(ctx.shape(_x(node)))
    _norm(ctx, node, list(range(2, rank)), [1])


def _groupnorm(ctx: Context, node: ir.Node) -> None:
    """GroupNormalization: the input is normalized per group (pinned, or unscaled in
    insert mode); the output is an affine map per channel (``scale``/``bias`` of size C,
    opset 21) or per group (size G, opset 18), so its cofactors are per channel or
    per group: ``γ' = γ · τ_out``, ``β' = β · τ_out``."""
    x = _x(node)
    ids = _require_act(ctx, x, "input")
    if ctx.insert:
        ctx.unscale(0)
    else:
        ctx.pin(ids, "GroupNormalization input (normalized: scale cancels only up to eps)")
    channels = ctx.shape(x)[1]
    size = ctx.shape(_x(node, 1))[0]
    own = ctx.new([size])
    per_channel = own[np.arange(channels) // (channels // size)]
    for k in (1, 2):
        if not ctx.absorb(_x(node, k), [(own, 1)]):
            raise Unsupported(ctx.refused("GroupNormalization parameters"))
    rank = len(ctx.shape(x))  # the output has the input's shape
    ctx.set(node.outputs[0], per_channel.reshape((1, channels) + (1,) * (rank - 2)))


def _gather(ctx: Context, node: ir.Node) -> None:
    """Embedding lookup (constant table, integer indices): ``T'[v, c] = T[v, c] · τ_out[c]``.

    Gather of an activation with constant indices is an index map.
    """
    data, idx = _x(node, 0), _x(node, 1)
    if ctx.act(data):
        return _index_map(ctx, node)
    if not ctx.const(data) or ctx.const(idx):
        raise Unsupported("Gather of a computed table")
    dshape = ctx.shape(data)
    axis = int(_attr(node, "axis", 0)) % len(dshape)
    table = ctx.new([1 if k == axis else s for k, s in enumerate(dshape)], data.name or "")
    if not ctx.absorb(data, [(table, 1)]):
        raise Unsupported(ctx.refused("embedding table"))
    ishape = ctx.shape(idx)
    out = table.reshape(dshape[:axis] + (1,) * len(ishape) + dshape[axis + 1 :])
    ctx.set(node.outputs[0], np.ascontiguousarray(out))
    return None


# -- pooling and reductions -------------------------------------------------------------
def _pool(flag: int = 0, reason: str = "") -> Rule:
    def rule(ctx: Context, node: ir.Node) -> None:
        """Pooling over spatial axes: one cofactor per channel, ``pool(τx) = τ pool(x)``."""
        ids = _require_act(ctx, _x(node), "input")
        out = ctx.collapse(ids, range(2, ids.ndim))
        if flag and ctx.insert:
            ctx.wrap(out, "positive")
        elif flag:
            ctx.restrict(out, flag, reason)
        ctx.set(node.outputs[0], out)

    return rule


def _reduce_axes(ctx: Context, node: ir.Node, rank: int) -> list[int]:
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = _require_const(ctx, node.inputs[1], "reduce axes").tolist()
    if axes is None or len(axes) == 0:
        if int(_attr(node, "noop_with_empty_axes", 0)):
            return []
        return list(range(rank))
    return sorted(int(a) % rank for a in axes)


def _reduce(flag: int = 0) -> Rule:
    def rule(ctx: Context, node: ir.Node) -> None:
        """Reduce over axes: neurons along them tie (``Σ τ_k x_k = τ Σ x_k`` needs equal τ_k)."""
        ids = _require_act(ctx, _x(node), "input")
        axes = _reduce_axes(ctx, node, ids.ndim)
        out = ctx.collapse(ids, axes)
        if flag:
            ctx.restrict(out, flag, f"{node.op_type} commutes with τ > 0 only")
        if not int(_attr(node, "keepdims", 1)):
            out = out.reshape([s for k, s in enumerate(out.shape) if k not in axes])
        ctx.set(node.outputs[0], out)

    return rule


def _resize(ctx: Context, node: ir.Node) -> None:
    """Resize/Upsample interpolate within a channel: channels keep their cofactor."""
    x = _x(node)
    ids = _require_act(ctx, x, "input")
    ishape, oshape = ctx.shape(x), ctx.shape(node.outputs[0])
    if ishape[:2] != oshape[:2]:
        raise Unsupported("Resize changes the batch or channel axis")
    ctx.set(node.outputs[0], ctx.collapse(ids, range(2, ids.ndim)))


def _prelu(ctx: Context, node: ir.Node) -> None:
    """``PRelu(τx) = τ PRelu(x)`` for τ > 0; the slope stays as it is."""
    if not ctx.const(_x(node, 1)):
        raise Unsupported("PRelu slope is not a constant")
    _positive("PRelu commutes with τ > 0 only")(ctx, node)


# -- data movement ----------------------------------------------------------------------
def _transpose(ctx: Context, node: ir.Node) -> None:
    """Transpose permutes the id array's axes."""
    ids = _require_act(ctx, _x(node), "input")
    perm = _attr(node, "perm") or list(reversed(range(ids.ndim)))
    ctx.set(node.outputs[0], np.transpose(ids, perm))


def _reshape(ctx: Context, node: ir.Node) -> None:
    """Reshape/Flatten/Squeeze/Unsqueeze: reshape the full id array, then compress it
    (an op that only adds or drops size-1 axes moves the compact ids' axes along)."""
    x = _x(node)
    ids = _require_act(ctx, x, "input")
    shape = ctx.shape(node.outputs[0])
    if ids.size == 1:  # one neuron: nothing to move
        ctx.set(node.outputs[0], ids.reshape([1] * len(shape)))
        return
    moved = squeeze_ids(ids, ctx.shape(x), shape)
    ctx.set(node.outputs[0], moved if moved is not None else compress(ctx.full(x).reshape(shape)))


def squeeze_ids(
    ids: IntArray, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> IntArray | None:
    """The compact ids of a reshape that only adds or drops size-1 axes (the other axes
    keep their order): the ids' own axes, moved along; None for any other reshape."""
    if [d for d in in_shape if d != 1] != [d for d in out_shape if d != 1]:
        return None
    axes = iter([n for n, d in zip(align(ids, len(in_shape)).shape, in_shape) if d != 1])
    return ids.reshape([1 if d == 1 else next(axes) for d in out_shape])


def _index_map(ctx: Context, node: ir.Node) -> None:
    """Any data-movement op: run it on the neuron ids (``onnx.reference``) to learn
    where each neuron goes.  Constant data inputs (a class token, a pad value) get
    fresh neurons that absorb their cofactor, like a bias.
    """
    ins: list[np.ndarray | None] = []
    for k, v in enumerate(node.inputs):
        ins.append(_index_input(ctx, node, k, v))
    outs = evaluate(node, ins, ctx.info.opset)
    pad_fill = _pad_fill(ctx, node, outs[0])
    for v, arr in zip(node.outputs, outs):
        if ctx.info.is_float(v):
            ctx.set(
                v,
                compress(np.where(arr == 0, pad_fill, arr) - 1)
                if pad_fill is not None
                else compress(arr - 1),
            )


def _concat(ctx: Context, node: ir.Node) -> None:
    """Concat along a feature axis is an index map; along an axis no input varies on
    (a sequence axis: a class token joined to patch embeddings) the inputs share
    their cofactors, so the output keeps one cofactor along it and the model stays
    valid for any length there.  Constant inputs absorb the output's cofactors.
    """
    rank = _out_rank(ctx, node)
    axis = int(_attr(node, "axis", 0)) % rank
    acts = [align(ctx.ids(v), rank) for v in node.inputs if v is not None and ctx.act(v)]
    if not acts or any(a.shape[axis] != 1 for a in acts):
        return _index_map(ctx, node)
    shape = np.broadcast_shapes(*[a.shape for a in acts])
    out = np.broadcast_to(acts[0], shape).copy()
    for a in acts[1:]:
        ctx.tie(a, out)
    for v in node.inputs:
        if v is not None and not ctx.act(v) and not ctx.absorb(v, [(out, 1)]):
            ctx.pin(out, f"Concat joins a constant: {ctx.refused('constant')}")
    ctx.set(node.outputs[0], out)
    return None


_DATA_INPUTS = {
    "Concat": None,
    "Pad": (0,),
    "Tile": (0,),
    "Expand": (0,),
    "Slice": (0,),
    "Gather": (0,),
    "Split": (0,),
    "DepthToSpace": (0,),
    "SpaceToDepth": (0,),
}


def _index_input(ctx: Context, node: ir.Node, k: int, v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    data = _DATA_INPUTS.get(node.op_type)
    is_data = data is None or k in data
    if not is_data:
        return _require_const(ctx, v, f"{node.op_type} input {k}")
    if ctx.act(v):
        return np.asarray(ctx.full(v)) + 1
    shape = ctx.shape(v)
    fresh = ctx.new(shape, v.name or "")
    if not ctx.absorb(v, [(fresh, 1)]):
        ctx.pin(fresh, f"{node.op_type} joins a constant: {ctx.refused('constant')}")
    return fresh + 1


def _pad_fill(ctx: Context, node: ir.Node, out: np.ndarray) -> np.ndarray | None:
    """Padded positions (id 0) become fresh neurons: free for a zero pad, else pinned."""
    if node.op_type != "Pad" or not (out == 0).any():
        return None
    fresh = ctx.new(out.shape) + 1
    mode = _attr(node, "mode", "constant")
    value = node.inputs[2] if len(node.inputs) > 2 else None
    nonzero = value is not None and np.any(_require_const(ctx, value, "pad value") != 0)
    if mode in ("constant", b"constant") and (nonzero or _attr(node, "value", 0.0)):
        ctx.pin(fresh[out == 0] - 1, "Pad with a non-zero constant")
    return fresh


# -- quantized ops ----------------------------------------------------------------------
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
    }
)
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
_INTEGER_HOPS = 16  # producers followed back from an integer tensor to a quantized op


def _quantized(ctx: Context, node: ir.Node) -> None:
    """A quantized op computes on an integer grid fixed by its scales and zero points, so
    no cofactor passes through it: its float inputs and outputs are pinned, the reason
    naming the op (``quantized op QLinearConv``), or for the QDQ pair
    ``quantized tensor (QDQ)`` — a ``DequantizeLinear`` names the quantized op that
    computed its integers instead, when there is one."""
    if node.op_type == "DequantizeLinear":
        raise Pinned(quantized_origin(_x(node)) or "quantized tensor (QDQ)")
    raise Pinned(_quantized_reason(node))


def _quantized_reason(node: ir.Node) -> str:
    return "quantized tensor (QDQ)" if node.op_type in _QDQ else f"quantized op {node.op_type}"


def quantized_origin(v: ir.Value) -> str | None:
    """The quantized op an integer tensor was computed by (following integer-only ops
    such as Reshape back to it), as a pin reason; None if there is none."""
    for _ in range(_INTEGER_HOPS):
        node = v.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in QUANTIZED_OPS:
            return _quantized_reason(node)
        if not node.inputs or node.inputs[0] is None:
            return None
        v = node.inputs[0]
    return None


# -- the table --------------------------------------------------------------------------
_POS = "commutes with τ > 0 only"
ODD = ("Tanh", "Softsign", "Asinh", "Atan", "Sin", "Sinh", "Tan", "Asin", "Atanh", "Erf", "Sign")
NOT_EQUIVARIANT = (
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Elu",
    "Selu",
    "Celu",
    "Gelu",
    "Softplus",
    "Exp",
    "Log",
    "Sqrt",
    "Mish",
    "Cos",
    "Cosh",
    "Acos",
    "Acosh",
    "ThresholdedRelu",
    "Round",
    "Floor",
    "Ceil",
    "Shrink",
    "Swish",
)

WRAPPED_OPS = frozenset(
    {*ODD, *NOT_EQUIVARIANT, "Relu", "LeakyRelu", "PRelu", "Clip", "Softmax", "LogSoftmax"}
)

RULES: dict[str, Rule] = {
    # identity-like
    "Identity": _alias,
    "Dropout": _dropout,
    "Neg": _alias,
    "Cast": _cast,
    "CastLike": _cast,
    # activations
    "Relu": _positive(f"Relu {_POS}"),
    "LeakyRelu": _positive(f"LeakyRelu {_POS}"),
    "PRelu": _prelu,
    "Abs": _abs,
    "Clip": _clip,
    "Reciprocal": _reciprocal,
    **dict.fromkeys(ODD, _odd),
    **dict.fromkeys(NOT_EQUIVARIANT, _not_equivariant),
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Hardmax": _softmax,
    # arithmetic
    "Add": _add,
    "Sub": _add,
    "Sum": _add,
    "Mean": _add,
    "Where": _add,
    "Max": _max,
    "Min": _max,
    "Mul": _mul,
    "Div": _mul,
    "Pow": _pow,
    # linear layers
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batchnorm,
    "Gather": _gather,
    "LayerNormalization": _layernorm,
    "RMSNormalization": _layernorm,
    "GroupNormalization": _groupnorm,
    "Attention": _attention,
    "InstanceNormalization": _instancenorm,
    # pooling and reductions
    "MaxPool": _pool(Flag.POSITIVE, f"MaxPool {_POS}"),
    "AveragePool": _pool(),
    "GlobalAveragePool": _pool(),
    "GlobalMaxPool": _pool(Flag.POSITIVE, f"MaxPool {_POS}"),
    "LpPool": _pool(Flag.POSITIVE, f"LpPool {_POS}"),
    "GlobalLpPool": _pool(Flag.POSITIVE, f"LpPool {_POS}"),
    "ReduceMean": _reduce(),
    "ReduceSum": _reduce(),
    "ReduceMax": _reduce(Flag.POSITIVE),
    "ReduceMin": _reduce(Flag.POSITIVE),
    "ReduceL1": _reduce(Flag.POSITIVE),
    "ReduceL2": _reduce(Flag.POSITIVE),
    "Resize": _resize,
    "Upsample": _resize,
    # data movement
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Flatten": _reshape,
    "Squeeze": _reshape,
    "Unsqueeze": _reshape,
    "Concat": _concat,
    "Split": _index_map,
    "Slice": _index_map,
    "Pad": _index_map,
    "Tile": _index_map,
    "Expand": _index_map,
    "DepthToSpace": _index_map,
    "SpaceToDepth": _index_map,
    # quantized ops: pinned, with the reason
    **dict.fromkeys(QUANTIZED_OPS, _quantized),
}

# Ops that read only their input's shape, never its values: no constraint at all.
SHAPE_ONLY = frozenset({"Shape", "Size", "IsNaN", "IsInf"})

"""The in-place rewrite of a module's parameters and buffers: ``W ← W·S + O``, and back.

:func:`absorb` multiplies every tensor that absorbs a scaling by its ``S = Π τ^e``, taken
from the analysis' factor table (:meth:`graphteleport.algebra.FactorTable.values`, one
gather for all factors) and kept as broadcastable factors (a conv weight's ``[O, 1, 1, 1]``
and ``[1, C, 1, 1]``) until the tensor is multiplied; :func:`restore` divides them out
again (``undo``).  BatchNorm is rewritten in its training form (``γ' = γ·τ_out``,
``β' = β·τ_out``, running mean ``· τ_in``, running var ``· τ_in²``) and corrected for its
``ε``, which no cofactor can scale (:func:`_batchnorm_eps`, from
:func:`graphteleport.algebra.batchnorm_eps`): eval mode exact, train mode exact on batches
like the example inputs.  :func:`batchnorms` lists the layers the correction concerns
(also read by :func:`graphteleport.torch.orbit.orbit_tangent`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from graphteleport.algebra import FactorTable, batchnorm_eps, source_scale
from graphteleport.analysis import Absorb, AnalysisResult, Weight
from graphteleport.frontends.torch import TorchGraph

Factors = tuple[torch.Tensor, ...]  # S as a product of broadcastable factors


def absorb(graph: TorchGraph, analysis: AnalysisResult, tau: np.ndarray, exact: bool) -> Rewrite:
    """Multiply every absorbing parameter/buffer in place by its ``S`` (with BatchNorm's
    eps corrections of :func:`_batchnorm_eps`, except in exact mode, whose tensors stay
    power-of-two multiples); return what was applied."""
    values = analysis.factor_table.values(tau)  # every factor's τ[ids]^e, in one gather
    corrected = None if exact else _batchnorm_eps(graph, analysis, values)  # into values
    done = Rewrite(factors=_scales(graph, analysis, tau, values))
    if corrected is not None:
        _batchnorm_offsets(graph, corrected, done)
    _apply(graph.tensors, done.factors, done.offsets)
    for path, s in done.bn_input.items():
        graph.bn_var[path] = graph.bn_var[path] * s
    return done


def _apply(
    tensors: dict[str, torch.Tensor],
    factors: dict[str, Factors],
    offsets: dict[str, torch.Tensor],
) -> None:
    """``W ← W·S + O`` in place, every factor already in its tensor's dtype and device.

    ``S`` is broadcastable (``[O, C, 1, 1]`` for a conv: no full copy), multiplied out from
    its factors just before it is used and freed right after (all of a ResNet's at once
    would be megabytes of fresh pages); the many small tensors whose ``S`` has their own
    shape (BatchNorm's, biases) are done by one ``torch._foreach_mul_`` per device (the
    optimizers' batched op; mixed dtypes take its per-tensor path), with the products it
    needs as long as they are small (a linear layer's ``S`` is a full ``[O, I]`` product:
    used at once)."""
    small: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    with torch.no_grad():
        for name, fs in factors.items():
            t = tensors[name]
            st = fs[0] if len(fs) == 1 else multiply_out(fs)
            if st.shape == t.shape and (len(fs) == 1 or st.numel() <= _FRESH_BATCHED):
                ts, ss = small.setdefault(t.device, ([], []))
                ts.append(t)
                ss.append(st)
            else:
                t.mul_(st)
        for ts, ss in small.values():
            torch._foreach_mul_(ts, ss)
        if offsets:
            torch._foreach_add_([tensors[n] for n in offsets], list(offsets.values()))


_FRESH_BATCHED = 1 << 16  # elements of a multiplied-out S that may wait for the batched op


def multiply_out(fs: Factors) -> torch.Tensor:
    """``S`` from its factors: their broadcast product."""
    st = fs[0]
    for f in fs[1:]:
        st = st * f
    return st


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by its full name (tied ones under each name)."""
    return dict(
        [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    )


def restore(
    model: nn.Module, factors: dict[str, Factors], offsets: dict[str, torch.Tensor]
) -> None:
    """Undo :func:`absorb` in place: ``W = (W' − O) / S`` for every tensor in ``factors``
    (bit-exact where ``S`` is a power of two: exact mode)."""
    tensors = _named_tensors(model)
    with torch.no_grad():
        for name, fs in factors.items():
            if name in offsets:
                tensors[name].sub_(offsets[name])
            tensors[name].div_(multiply_out(fs))


@dataclass
class Rewrite:
    """``W' = W·S (+ O)`` per tensor name (``S`` as factors), and each BatchNorm input's
    variance factor."""

    factors: dict[str, Factors] = field(default_factory=dict)
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)
    bn_input: dict[str, np.ndarray] = field(default_factory=dict)


def _batchnorm_eps(
    graph: TorchGraph, analysis: AnalysisResult, values: np.ndarray
) -> _Corrected | None:
    """Keep BatchNorm right although its ``ε`` cannot be scaled
    (:func:`graphteleport.algebra.batchnorm_eps`).

    The training form scales a channel's input by ``τ`` (> 0), hence its variance by ``τ²``,
    but BatchNorm divides by ``sqrt(var + ε)``.  With ``σ²`` the channel's input variance
    measured on the example inputs (:func:`~graphteleport.frontends.torch.batchnorm_input_variance`)
    and ``c = sqrt((τ²σ² + ε) / (τ²(σ² + ε)))``:

    * ``γ' = γ · τ_out · c`` makes train mode exact for a batch of variance ``σ²``; for
      another batch of variance ``s²`` the error is ``ε(1 − 1/τ²)(1/s² − 1/σ²)/2``, second
      order instead of ``ε(1 − 1/τ²)/(2s²)``;
    * ``rv' = c²τ²(rv + ε) − ε = S·rv + ε(S − 1)`` with ``S = c²τ²`` makes eval mode exact:
      ``sqrt(rv' + ε) = c·τ·sqrt(rv + ε)``.

    Without a measured variance (a functional batch_norm) ``c = 1``: eval stays exact.
    All layers are computed together, in float64, and written into ``values``
    (:meth:`~graphteleport.algebra.FactorTable.values`) in place: ``S`` over the
    running variance's ``τ_in²`` and ``c`` into ``γ``'s ``τ_out``, so both reach the
    tensors with every other factor; the offsets ``ε(S − 1)`` are returned for
    :func:`_batchnorm_offsets`.
    """
    bns = batchnorms(graph, analysis)
    if not bns:
        return None
    table = analysis.factor_table
    spans = [table.span(bn.absorb) for bn in bns]  # the running variance's one factor, τ_in²
    t2 = np.concatenate([values[lo:hi] for lo, hi in spans])
    sizes = [hi - lo for lo, hi in spans]
    eps = np.asarray([bn.eps for bn in bns]).repeat(sizes)
    sigma2 = np.concatenate([_measured(bn, n) for bn, n in zip(bns, sizes)])
    c, s, offsets = batchnorm_eps(t2, sigma2, eps)
    at = 0
    out = _Corrected(bns, offsets, sizes)
    for bn, (lo, hi), n in zip(bns, spans, sizes):
        values[lo:hi] = s[at : at + n]
        if bn.sigma2 is not None:
            out.bn_input[bn.path] = t2[at : at + n]
            if not _fold_gamma(table, values, bn.gamma_uses, c[at : at + n]):
                out.gamma[bn.gamma] = c[at : at + n]
        at += n
    return out


@dataclass
class _Corrected:
    """What :func:`_batchnorm_eps` leaves to do: the running variances' offsets (end to
    end, ``sizes`` per layer), the input variance factors, and ``c`` of each ``γ`` that
    could not be folded into ``values`` (none, for BatchNorm modules)."""

    bns: list[BatchNorm]
    offsets: np.ndarray
    sizes: list[int]
    bn_input: dict[str, np.ndarray] = field(default_factory=dict)
    gamma: dict[str, np.ndarray] = field(default_factory=dict)


def _fold_gamma(
    table: FactorTable, values: np.ndarray, uses: Sequence[Absorb], c: np.ndarray
) -> bool:
    """Multiply ``c`` into ``γ``'s factor in ``values`` where ``γ`` is read as stored by one
    factor of its own size, ``τ_out`` (the training form's: :func:`_scales` then reads
    exactly that span); False where it is not."""
    if not uses or not all(map(_unmapped, uses)) or len(uses[0].factors) != 1:
        return False
    lo, hi = table.span(uses[0])
    if hi - lo != c.size:
        return False
    values[lo:hi] *= c
    return True


def _batchnorm_offsets(graph: TorchGraph, corrected: _Corrected, done: Rewrite) -> None:
    """Record each moved running variance's offset ``ε(S − 1)`` (one conversion), the
    input variance factors, and the ``c`` of any ``γ`` :func:`_fold_gamma` left over as
    an extra factor."""
    bns = corrected.bns
    like = graph.tensors[bns[0].var]
    if all(_alike(graph.tensors[bn.var], like) for bn in bns):
        parts = torch.split(_to_torch(corrected.offsets, like), corrected.sizes)
    else:
        ends = list(itertools.accumulate(corrected.sizes))
        parts = tuple(
            _to_torch(corrected.offsets[hi - n : hi], graph.tensors[bn.var])
            for bn, hi, n in zip(bns, ends, corrected.sizes)
        )
    for bn, part in zip(bns, parts):
        if bn.var in done.factors:  # S ≠ 1 somewhere (else the offset is 0 too)
            done.offsets[bn.var] = _as_shape(part, graph.tensors[bn.var])
            if bn.path in corrected.bn_input:
                done.bn_input[bn.path] = corrected.bn_input[bn.path]
    for name, c in corrected.gamma.items():
        g = graph.tensors[name]
        done.factors[name] = (*done.factors.get(name, ()), _as_shape(_to_torch(c, g), g))


def _as_shape(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return part if part.shape == like.shape else part.reshape(like.shape)


def _measured(bn: BatchNorm, size: int) -> np.ndarray:
    """The layer's measured input variance, or NaN (no correction) where there is none."""
    if bn.sigma2 is None:
        return np.full(size, np.nan)
    return np.asarray(bn.sigma2, dtype=np.float64).reshape(-1)  # sized by batchnorms


def _alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.device == b.device


@dataclass
class BatchNorm:
    """A training-form BatchNorm of the trace: its running variance's absorb, tensor names,
    eps and measured input variance (None: not measured, or no ``γ`` to correct)."""

    absorb: Absorb
    var: str
    gamma: str
    path: str
    eps: float
    sigma2: np.ndarray | None
    gamma_uses: Sequence[Absorb]  # how the rewrite reads γ (empty: γ is not a stored tensor)


def batchnorms(graph: TorchGraph, analysis: AnalysisResult) -> list[BatchNorm]:
    """The training-form BatchNorms, one per running variance (a module called twice is
    corrected once, at the use the rewrite reads: the first)."""
    out = []
    for weight in analysis.weights:
        ab = weight.uses[0]
        node = ab.node
        if ab.input_index != 4 or node.op_type != "BatchNormalization":
            continue
        if not all(map(_unmapped, weight.uses)):
            continue  # (a module's running variance is read as stored)
        path = weight.name.rpartition(".")[0]
        gamma = _input_name(node, 1)
        sigma2 = graph.bn_var.get(path) if gamma in graph.tensors else None
        if sigma2 is not None and sigma2.size != _channels(ab):
            sigma2 = None  # not this node's channels (a module traced in another layout)
        eps = node.attributes.get_float("epsilon", 1e-5)
        gamma_weight = analysis.weight_named(gamma) if gamma else None
        gamma_uses = gamma_weight.uses if gamma_weight is not None else ()
        out.append(BatchNorm(ab, weight.name, gamma, path, eps, sigma2, gamma_uses))
    return out


def _channels(ab: Absorb) -> int:
    return math.prod(ab.shape)


def _input_name(node: ir.Node, k: int) -> str:
    v = node.inputs[k] if len(node.inputs) > k else None
    return (v.name or "") if v is not None else ""


def _scales(
    graph: TorchGraph, analysis: AnalysisResult, tau: np.ndarray, values: np.ndarray
) -> dict[str, Factors]:
    """``S`` per tensor as factors (all-ones scales are left out), in its dtype and device.

    Tensors with one use (or tied uses) and no element map — all of them, in most models —
    take ``S = Π τ[f.ids]^e`` as a product of small per-axis factors: views, in the
    factors' layouts, of ``values`` (every factor's ``τ[f.ids]^e``, end to end:
    :meth:`~graphteleport.algebra.FactorTable.values`) converted to torch once per
    dtype and device; the rest go through :func:`_mapped_scale`.
    """
    table = analysis.factor_table
    by_kind: dict[tuple[torch.dtype, torch.device], list[tuple[str, int, int]]] = {}
    out: dict[str, Factors] = {}
    for weight in analysis.weights:
        first = weight.uses[0]
        name = weight.name
        t = graph.tensors[name]
        if all(map(_unmapped, weight.uses)):
            j = table.first[id(first)]  # (name, factor range) per dtype and device
            by_kind.setdefault((t.dtype, t.device), []).append((name, j, j + len(first.factors)))
        elif (st := _mapped_scale(weight, tau, t)) is not None:
            out[name] = (st,)
    moved = table.moved(values)
    for group in by_kind.values():
        views = torch.split(_to_torch(values, graph.tensors[group[0][0]]), table.sizes)
        out.update(_factor_views(group, views, table.shapes, moved))
    return out


def _factor_views(
    group: list[tuple[str, int, int]],
    views: Sequence[torch.Tensor],
    shapes: list[tuple[int, ...]],
    moved: list[bool],
) -> dict[str, Factors]:
    """Each tensor's factors (``views[j:k]``, in their ``shapes``), leaving out tensors
    whose factors are all ones."""
    out: dict[str, Factors] = {}
    for name, j, k in group:
        if k == j + 1:  # one factor (most tensors)
            if moved[j]:
                out[name] = (_in_layout(views[j], shapes[j]),)
        elif any(moved[j:k]):
            out[name] = tuple(_in_layout(views[i], shapes[i]) for i in range(j, k))
    return out


def _in_layout(view: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return view if len(shape) == 1 else view.view(shape)


def _unmapped(ab: Absorb) -> bool:
    """The use reads the stored tensor itself: no element map, no broadcast-expansion."""
    return ab.index is None and not ab.expand


def _mapped_scale(weight: Weight, tau: np.ndarray, t: torch.Tensor) -> torch.Tensor | None:
    """``S`` of a tensor some use of which maps elements (or is broadcast-expanded), in ``t``'s
    dtype and device (:func:`~graphteleport.algebra.source_scale`); None when all ones."""
    s = source_scale(tuple(t.shape), weight.uses, tau)
    return _to_torch(s, t) if (s != 1).any() else None


def _to_torch(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Float64 ``a`` in ``like``'s dtype and device (numpy converts: cheaper for small arrays)."""
    out = torch.from_numpy(np.ascontiguousarray(a, dtype=_NUMPY_DTYPES.get(like.dtype, np.float32)))
    return out.to(device=like.device, dtype=like.dtype)


_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32}

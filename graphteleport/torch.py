"""Teleport an ``nn.Module`` in place, for training-time use (the paper's headline).

``teleport(model, example_inputs)`` traces the module (:mod:`graphteleport.frontends.torch`),
runs the same symmetry analysis as for ONNX files, draws cofactors and rescales the
module's own parameters and buffers in place (``W' = τ_t · W / τ_s``), so an
optimizer created before the teleport keeps updating the teleported tensors.
BatchNorm is analysed in its training form: its input cofactors are positive,
``γ' = γ·τ_out``, ``β' = β·τ_out``, running mean ``· τ_in`` and running var ``· τ_in²``,
so both train and eval mode stay right; BatchNorm's ``ε``, which no cofactor can scale, is
corrected for (:func:`_batchnorm_eps`: eval mode exact, train mode exact on batches like
the example inputs).  Every ``S`` and correction is computed by :mod:`graphteleport.algebra`,
from the analysis' result (:class:`~graphteleport.analysis.AnalysisResult`).

``mode="insert"`` also makes non-equivariant activations compute ``τ_out · f(x / τ_in)``.
Where every such activation is a parameter-free leaf *module*, each gets two buffers,
``graphteleport_in`` (``1/τ_in``) and ``graphteleport_out`` (``τ_out``), applied by
forward hooks — so ``state_dict()`` carries them and a freshly teleported module that
loads it computes exactly the same function.  A module called at several places in
``forward`` (one ``nn.ReLU`` for a whole block) gets a pair per call
(``graphteleport_in_1``, …), applied in call order; the calls are told apart by the traced
data flow and checked against a counted forward of the example inputs.  Where hooks cannot
do it (activations called functionally, ``torch.sigmoid(x)`` in ``forward``; a LayerNorm's
input; GPT-2's attention), :mod:`graphteleport.torch_insert` puts the
``Mul``s in a ``torch.fx.GraphModule``, returned as ``result.model``.

Example::

    from graphteleport.torch import teleport
    result = teleport(model, torch.randn(8, 784), mode="insert",
                      sampling="inter_landscape", cob_range=0.9, seed=0)
    result.free_cofactors, result.changed[:3]
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from graphteleport import cofactors, torch_insert
from graphteleport.algebra import (
    FactorTable,
    batchnorm_eps,
    batchnorm_eps_tangent,
    log_derivative,
    power,
    product,
    source_scale,
    wrap_needed,
)
from graphteleport.analysis import Absorb, AnalysisResult, Quiver, Weight, analyze_model
from graphteleport.errors import InputError
from graphteleport.frontends.torch import TorchGraph, trace
from graphteleport.options import CofactorOptions, check_mode
from graphteleport.unionfind import components

if TYPE_CHECKING:
    from typing import Unpack

    from graphteleport.options import OptionFields

IN, OUT = "graphteleport_in", "graphteleport_out"
_COFACTOR_BUFFER = re.compile(rf"(.*\.)?({IN}|{OUT})(_\d+)?")  # a hooked module's buffers


Factors = tuple[torch.Tensor, ...]  # S as a product of broadcastable factors


@dataclass
class TorchTeleport:
    """The outcome of :func:`teleport`: what changed and by how much.

    ``factors[name]`` holds each changed tensor's ``S`` as broadcastable factors (a conv
    weight's ``[O, 1, 1, 1]`` and ``[1, C, 1, 1]``); :attr:`scales` multiplies them out.
    """

    model: nn.Module
    analysis: AnalysisResult
    pair_values: np.ndarray
    tau: np.ndarray
    mode: str
    factors: dict[str, Factors] = field(default_factory=dict)
    hooked: list[str] = field(default_factory=list)
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)  # W' = W·S + O (BN var)
    bn_input: dict[str, np.ndarray] = field(default_factory=dict)  # BN input variance factor
    bn_var: dict[str, np.ndarray] = field(default_factory=dict)  # the trace's, kept current
    tracer: str = "export"  # "fx" or "export": how the module was traced (frontends.torch.trace)
    inserted: list[str] = field(default_factory=list)  # insert mode's GraphModule buffers

    @property
    def free_cofactors(self) -> int:
        return self.analysis.free_cofactors

    @property
    def changed(self) -> list[str]:
        return sorted(self.factors)

    @cached_property
    def scales(self) -> dict[str, torch.Tensor]:
        """``S`` per changed tensor (``W' = W·S + O``), in its dtype and device,
        broadcastable to the tensor (a conv weight's is ``[O, C, 1, 1]``); made on first
        use."""
        return {name: _multiply_out(fs) for name, fs in self.factors.items()}

    @property
    def quiver(self) -> Quiver:
        return Quiver.from_analysis(self.analysis)

    def undo(self) -> None:
        """Put the parameters and buffers back (``W = (W' − O) / S``; bit-exact in exact mode)."""
        tensors = dict(_named_tensors(self.model))
        with torch.no_grad():
            for name, fs in self.factors.items():  # cofactor buffers of hooked modules too
                if name in self.offsets:
                    tensors[name].sub_(self.offsets[name])
                tensors[name].div_(_multiply_out(fs))
        for path, t2 in self.bn_input.items():
            if path in self.bn_var:
                self.bn_var[path] = self.bn_var[path] / t2


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]


def teleport(
    model: nn.Module,
    example_inputs: Any,
    *,
    options: CofactorOptions | None = None,
    values: np.ndarray | None = None,
    **fields: Unpack[OptionFields],
) -> TorchTeleport:
    """Teleport ``model`` in place; ``values`` gives the cofactor of each pair directly.

    ``options``, or keyword arguments naming its fields (``mode``, ``sampling``,
    ``cob_range``, ``center``, ``seed``, ``exact``): :meth:`CofactorOptions.build`.
    Tracing and analysis happen on every call; to teleport one module many times (a
    training loop, micro-teleportations), build a :class:`Teleporter` once.
    """
    opts = CofactorOptions.build(options, **fields)
    return Teleporter(model, example_inputs, mode=opts.mode).teleport(options=opts, values=values)


class Teleporter:
    """A module traced and analysed once, teleported as often as needed.

    The analysis depends only on the module's structure, so it stays valid after a
    teleport (insert mode's hooks compose with later ones); each :meth:`teleport` only
    draws cofactors and rescales tensors in place.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, *, mode: str = "absorb") -> None:
        self.model = model
        self.mode = check_mode(mode)
        self.graph = trace(model, example_inputs)
        self.analysis = analyze(self.graph, self.mode)
        self.insertion = torch_insert.Insertion(model, self.graph)  # insert mode's GraphModule

    def teleport(
        self,
        *,
        options: CofactorOptions | None = None,
        values: np.ndarray | None = None,
        **fields: Unpack[OptionFields],
    ) -> TorchTeleport:
        """Draw cofactors (or take ``values``) and rescale the module in place; options
        as :func:`teleport`'s, in this Teleporter's mode."""
        if options is None:
            fields.setdefault("mode", self.mode)
        opts = CofactorOptions.build(options, **fields)
        if opts.mode != self.mode or opts.rescale_residual:
            raise InputError(
                f"this Teleporter was analysed in {self.mode} mode: options must say "
                f"mode={self.mode!r} (got {opts.mode!r}) and no rescale_residual"
            )
        sol = self.analysis.solution
        if values is None:
            values = cofactors.sample(sol.code, sol.free, opts)
        else:
            values = _given_values(values, sol.num_pairs, sol.code, sol.free)
        tau = sol.cofactors(values)
        model, graph, analysis = self.model, self.graph, self.analysis
        result = TorchTeleport(model, analysis, np.asarray(values), tau, self.mode)
        result.tracer = graph.tracer
        hooks: list[tuple[str, list[np.ndarray], list[np.ndarray]]] = []
        placed: list[torch_insert.Placement] = []
        if self.mode == "insert":  # hooks where they suffice, else a GraphModule (torch_insert)
            plan_hooks = lambda t: _plan_hooks(model, graph, analysis, t)  # noqa: E731
            hooks, placed = self.insertion.plan(analysis, tau, plan_hooks)
        done = _absorb(graph, analysis, tau, opts.exact)  # nothing changes before every check
        result.factors, result.offsets = done.factors, done.offsets
        result.bn_input, result.bn_var = done.bn_input, graph.bn_var
        for path, s_in, s_out in hooks:
            _hook(model.get_submodule(path), path, s_in, s_out, result)
        self.insertion.apply(placed, result)
        return result


def _given_values(
    values: np.ndarray, count: int, groups: np.ndarray, free: np.ndarray
) -> np.ndarray:
    """Explicit pair values, restricted like drawn ones (pinned pairs stay at 1)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size != count:
        raise InputError(f"values has {v.size} entries; this model has {count} cofactor pairs")
    if np.any(v == 0) or not np.all(np.isfinite(v)):
        raise InputError("cofactor values must be finite and non-zero")
    return cofactors.restrict(v, groups, free)


def analyze(graph: TorchGraph, mode: str = "absorb") -> AnalysisResult:
    """The analysis of a traced module: only its own tensors may absorb a scaling.

    Cofactor buffers of an earlier insert-mode teleport are left to the hooks: the
    analysis sees them as fixed constants, and :func:`_hook` composes with them.
    """
    names = {n for n in graph.tensors if not _is_cofactor_buffer(n)}
    return analyze_model(
        graph.model,
        graph.input_shapes,
        mode,
        writable=names.__contains__,
        training=True,
        index=graph.index,
    )


def _is_cofactor_buffer(name: str) -> bool:
    return "graphteleport_" in name and _COFACTOR_BUFFER.fullmatch(name) is not None


def _absorb(graph: TorchGraph, analysis: AnalysisResult, tau: np.ndarray, exact: bool) -> _Rewrite:
    """Multiply every absorbing parameter/buffer in place by its ``S`` (with BatchNorm's
    eps corrections of :func:`_batchnorm_eps`, except in exact mode, whose tensors stay
    power-of-two multiples); return what was applied."""
    values = analysis.factor_table.values(tau)  # every factor's τ[ids]^e, in one gather
    corrected = None if exact else _batchnorm_eps(graph, analysis, values)  # into values
    done = _Rewrite(factors=_scales(graph, analysis, tau, values))
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
            st = fs[0] if len(fs) == 1 else _multiply_out(fs)
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


def _multiply_out(fs: Factors) -> torch.Tensor:
    st = fs[0]
    for f in fs[1:]:
        st = st * f
    return st


@dataclass
class _Rewrite:
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
    bns = _batchnorms(graph, analysis)
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

    bns: list[_BatchNorm]
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


def _batchnorm_offsets(graph: TorchGraph, corrected: _Corrected, done: _Rewrite) -> None:
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


def _measured(bn: _BatchNorm, size: int) -> np.ndarray:
    """The layer's measured input variance, or NaN (no correction) where there is none."""
    if bn.sigma2 is None:
        return np.full(size, np.nan)
    return np.asarray(bn.sigma2, dtype=np.float64).reshape(-1)  # sized by _batchnorms


def _alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.device == b.device


@dataclass
class _BatchNorm:
    """A training-form BatchNorm of the trace: its running variance's absorb, tensor names,
    eps and measured input variance (None: not measured, or no ``γ`` to correct)."""

    absorb: Absorb
    var: str
    gamma: str
    path: str
    eps: float
    sigma2: np.ndarray | None
    gamma_uses: Sequence[Absorb]  # how the rewrite reads γ (empty: γ is not a stored tensor)


def _batchnorms(graph: TorchGraph, analysis: AnalysisResult) -> list[_BatchNorm]:
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
        out.append(_BatchNorm(ab, weight.name, gamma, path, eps, sigma2, gamma_uses))
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


# -- insert mode: forward hooks on activation modules ------------------------------------------
def _scope(node: ir.Node) -> str | None:
    """The module path a node was traced in (``pkg.torch.onnx.name_scopes``)."""
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    scopes = [s.strip(" '\"") for s in raw.strip("[]").split(",")]
    return scopes[-2] if len(scopes) >= 2 else ""


def _plan_hooks(
    model: nn.Module, graph: TorchGraph, analysis: AnalysisResult, tau: np.ndarray
) -> list[tuple[str, list[np.ndarray], list[np.ndarray]]]:
    """The activation modules to wrap, ``τ_out · f(x / τ_in)``, with their cofactors: one
    ``(1/τ_in, τ_out)`` pair per call of the module (a module called at several places in
    ``forward`` gets one pair per call, in call order)."""
    needed: dict[str, list[ir.Node]] = defaultdict(list)
    for w in analysis.wraps:
        if wrap_needed(tau[w.ids], w.group):
            needed[_module_of(model, w.node)].append(w.node)
    for e in analysis.edges:
        if np.any(product(e.factors, tau) != 1):
            needed[_module_of(model, e.node)].append(e.node)
    members = _members(graph)
    neurons = analysis.neurons
    plan = []
    for path in needed:
        bounds = [_boundary(path, nodes, neurons) for nodes in _calls(members[path])]
        s_in = [power(tau[neurons[x]], -1) for x, _ in bounds]
        s_out = [tau[neurons[y]] for _, y in bounds]
        plan.append((path, s_in, s_out))
    _check_calls(model, graph, plan)
    return plan


def _calls(nodes: Sequence[ir.Node]) -> list[list[ir.Node]]:
    """A module's nodes split into its calls: the connected pieces of its data flow, in
    graph (execution) order."""
    inside = {id(n): k for k, n in enumerate(nodes)}
    pairs = [
        (k, inside[id(producer)])
        for k, node in enumerate(nodes)
        for v in node.inputs
        if v is not None and (producer := v.producer()) is not None and id(producer) in inside
    ]
    edges = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    label = components(len(nodes), edges[:, 0], edges[:, 1])
    pieces: dict[int, list[ir.Node]] = {}
    for k, node in enumerate(nodes):  # labels are each piece's first node: pieces in order
        pieces.setdefault(int(label[k]), []).append(node)
    return list(pieces.values())


def _check_calls(
    model: nn.Module, graph: TorchGraph, plan: list[tuple[str, list[np.ndarray], list[np.ndarray]]]
) -> None:
    """Each hooked module must be called once per piece of its data flow (or, for one piece
    whose output keeps its input's cofactors, any number of times in a chain), since its
    hooks take the pieces' cofactors in call order."""
    ambiguous = [path for path, s_in, s_out in plan if len(s_in) > 1 or not _keeps(s_in, s_out)]
    if not ambiguous:
        return
    counts = _count_calls(model, graph, ambiguous)
    for path, s_in, _ in plan:
        if path in counts and counts[path] != len(s_in):
            raise InputError(
                f"insert mode: module {path!r} is called {counts[path]} times but its traced "
                f"calls form {len(s_in)} separate pieces (calls chained into each other?); give "
                "each call its own module, or use mode='absorb'"
            )


def _keeps(s_in: list[np.ndarray], s_out: list[np.ndarray]) -> bool:
    """Every call's output keeps its input's cofactors (``τ_out = τ_in``)."""
    return all(np.allclose(a * b, 1.0, rtol=1e-12, atol=0.0) for a, b in zip(s_in, s_out))


def _count_calls(model: nn.Module, graph: TorchGraph, paths: list[str]) -> dict[str, int]:
    """How often one eval-mode forward of the example inputs calls each module."""
    counts = dict.fromkeys(paths, 0)

    def counter(path: str) -> Any:
        def hook(_module: nn.Module, _args: tuple[Any, ...]) -> None:
            counts[path] += 1

        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(counter(p)) for p in paths]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            model(*graph.args, **graph.kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts


def _module_of(model: nn.Module, node: ir.Node) -> str:
    path = _scope(node)
    what = f"{node.op_type} ({node.name})"
    if path is None or path == "":
        raise InputError(
            f"insert mode: {what} is not inside an activation module "
            "(a functional call in forward?); use mode='absorb' or an nn.Module"
        )
    module = model.get_submodule(path)
    if list(module.children()) or any(True for _ in module.parameters(recurse=False)):
        raise InputError(
            f"insert mode: {what} is inside module {path!r}, which is not a "
            "parameter-free leaf module; use mode='absorb'"
        )
    return path


def _members(graph: TorchGraph) -> dict[str, list[ir.Node]]:
    out: dict[str, list[ir.Node]] = defaultdict(list)
    for node in graph.model.graph:
        path = _scope(node)
        if path:
            out[path].append(node)
    return out


def _boundary(
    path: str, nodes: Sequence[ir.Node], neurons: Mapping[str, np.ndarray]
) -> tuple[str, str]:
    """The names of the one activation a module reads and the one it returns."""
    inside = {id(n) for n in nodes}
    ins = {
        v.name or ""
        for n in nodes
        for v in n.inputs
        if v is not None
        and (v.name or "") in neurons
        and (v.producer() is None or id(v.producer()) not in inside)
    }
    outs = {
        o.name or ""
        for n in nodes
        for o in n.outputs
        if (o.name or "") in neurons
        and (o.is_graph_output() or any(id(u.node) not in inside for u in o.uses()))
    }
    if len(ins) != 1 or len(outs) != 1:
        raise InputError(
            f"insert mode: module {path!r} does not read and return one tensor per call; "
            "use mode='absorb'"
        )
    return next(iter(ins)), next(iter(outs))


def _hook(
    module: nn.Module,
    path: str,
    s_in: list[np.ndarray],
    s_out: list[np.ndarray],
    result: TorchTeleport,
) -> None:
    """Give ``module`` its cofactor buffers (call 0: ``graphteleport_in``/``_out``, call k > 0:
    ``graphteleport_in_k``/``_out_k``) and, the first time, the hooks that apply them."""
    ref = next(iter(result.model.parameters()), None)
    kw: dict[str, Any] = {
        "dtype": ref.dtype if ref is not None else torch.float32,
        "device": ref.device if ref is not None else None,
    }
    calls = len(s_in)
    fresh = not hasattr(module, IN)
    for k, (a, b) in enumerate(zip(s_in, s_out)):
        names = _buffer_names(k)
        for name, arr in zip(names, (a, b)):
            t = torch.as_tensor(np.ascontiguousarray(arr), **kw)
            if fresh:
                module.register_buffer(name, t)
            else:  # teleported before: compose with the cofactors it has
                with torch.no_grad():
                    getattr(module, name).mul_(t)
            result.factors[f"{path}.{name}"] = (t,)
    if fresh:
        module._graphteleport_calls = calls  # type: ignore[assignment]
        module._graphteleport_next = 0  # type: ignore[assignment]
        module.register_forward_pre_hook(_scale_input)
        module.register_forward_hook(_scale_output)
        if calls > 1:
            _reset_on_forward(result.model, module)
    result.hooked.append(path)


def _buffer_names(call: int) -> tuple[str, str]:
    return (IN, OUT) if call == 0 else (f"{IN}_{call}", f"{OUT}_{call}")


def _reset_on_forward(root: nn.Module, module: nn.Module) -> None:
    """Start ``module``'s call count over at every forward of ``root`` (one hook for all)."""
    reset: list[nn.Module] | None = getattr(root, "_graphteleport_reset", None)
    if reset is None:
        reset = []
        root._graphteleport_reset = reset  # type: ignore[assignment]

        def start_over(*_: Any) -> None:
            for m in reset:
                m._graphteleport_next = 0  # type: ignore[assignment]

        root.register_forward_pre_hook(start_over)
    reset.append(module)


def _scale_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    name = _buffer_names(getattr(module, "_graphteleport_next", 0))[0]
    return (args[0] * getattr(module, name), *args[1:])


def _scale_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    call = getattr(module, "_graphteleport_next", 0)
    calls = getattr(module, "_graphteleport_calls", 1)
    module._graphteleport_next = (call + 1) % calls  # type: ignore[assignment]
    return output * getattr(module, _buffer_names(call)[1])


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
    graph = trace(model, example_inputs)
    analysis = analyze(graph, "absorb")
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
    for bn in _batchnorms(graph, analysis):  # the eps terms of _batchnorm_eps
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

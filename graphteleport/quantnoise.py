"""Cofactors chosen to minimise the *predicted* per-tensor INT8 noise of every quantized site.

``cle`` (:mod:`graphteleport.passes.equalize`) balances the weights' ranges and ignores
the activations; ``smooth`` balances one consumer's activation against its weight.  A
per-tensor INT8 quantizer adds noise at every *site* it creates — a weight (INT8
symmetric, ``step = max|W| / 127``), an activation (UINT8 over ``[min(x, 0), max(x, 0)]``
in 255 steps), a constant input of a quantized op (an inserted ``Mul``'s per-channel
factor, quantized like an activation) — and a rescaling moves range between all of them.
This module prices them all at once.

**The model.**  A site ``s`` is a tensor whose *cells* ``k`` (compact rows of a stored
tensor's scale, :func:`graphteleport.orbit.compact_shape`; an activation's neurons) scale
by ``exp(z_k)`` with ``z = A·u`` linear in the pair values ``u = log t`` (as in
:mod:`graphteleport.orbit`).  With per-cell magnitudes ``h_k = max(x_k, 0)`` and
``l_k = max(−x_k, 0)`` measured once (at ``u = 0``), the rescaled site's step is

    ``Δ_s(u) = (max_k h_k e^{z_k} + max_k l_k e^{z_k}) / L_s``       (``L_s`` = 127 or 255)

(a symmetric weight: ``h = max|W|``, ``l = 0``).  Rounding adds noise of variance
``Δ²/12`` per element of the *rescaled* tensor; mapped back to the original units (the
rescaling commutes with everything between the quantizers) an element of cell ``k``
carries ``Δ² e^{−2 z_k} / 12``.  Relative to the site's signal ``E_s = Σ x²`` (original
units, fixed) the site's noise-to-signal ratio is

    ``R_s(u) = Δ_s(u)² · Σ_k n_k e^{−2 z_k} / (12 E_s)``,

``n_k`` the elements of cell ``k``.  The objective is ``F(u) = Σ_s g_s · R_s(u)``, each
site weighted by ``g_s`` (1 by default: every site's relative noise counts alike; a
sensitivity, how much of a site's relative noise reaches the output, may be given).
``R_s`` is invariant to scaling site ``s`` as a whole.  The max is smoothed by a power
mean, ``max_k a_k ≈ (Σ_k a_k^p)^{1/p}`` with a large ``p`` (:data:`SMOOTH_P`).

**Convexity.**  ``log Σ_k a_k^p e^{p z_k}`` and ``log Σ_k n_k e^{−2z_k}`` are log-sum-exps
of linear functions of ``u``, hence convex; so each smoothed max, their sum, its square
and the product with the noise sum are *log-convex*, and so is a sum of log-convex
functions: ``F`` is log-convex, hence convex, in ``u`` — under this model (ranges
measured once and scaling linearly, each site's noise independent).  What it does not
model: a quantizer's clipping, the range of an activation that a non-linearity between
two sites reshapes (a rescaling moves the ranges of the values it scales and nothing
else, which is exactly what the analysis' classes guarantee), and how each site's noise
propagates to the output (``g_s``).  It is solved by L-BFGS with a small proximal term
``λ‖u‖²/2`` (:data:`PROXIMAL`): ``F`` is flat along directions that scale a whole site,
and the term keeps those at the start.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphteleport.activations import quantized_operands, quantized_uses, runnable
from graphteleport.algebra import with_rank
from graphteleport.analysis import Absorb, AnalysisResult
from graphteleport.orbit import compact_shape, movable_pairs, used_values

log = logging.getLogger(__name__)

FloatArray = np.ndarray
Feeds = Mapping[str, np.ndarray]

#: The power mean's exponent standing in for a site's max (module docstring).
SMOOTH_P = 16.0
#: The proximal weight ``λ`` of ``λ‖u‖²/2`` relative to ``F`` at the start.
PROXIMAL = 1e-4
#: Symmetric INT8 weights and asymmetric UINT8 activations/constants.
WEIGHT_LEVELS, ACTIVATION_LEVELS = 127, 255


@dataclass
class Site:
    """One quantized tensor: per cell ``hi``, ``lo`` magnitudes, ``count`` elements; its
    ``signal`` ``Σ x²``; ``levels``; and how its cells scale: cell ``rows[j]`` gets
    ``coef[j] · u[cols[j]]``.  ``gain``: its weight in ``F``."""

    name: str
    kind: str
    levels: int
    hi: FloatArray
    lo: FloatArray
    count: FloatArray
    signal: float
    rows: np.ndarray
    cols: np.ndarray
    coef: FloatArray
    gain: float = 1.0

    @property
    def cells(self) -> int:
        return int(self.hi.size)


def _neuron_terms(
    analysis: AnalysisResult, ids: np.ndarray, movable: np.ndarray
) -> tuple[np.ndarray, np.ndarray, FloatArray]:
    """``(rows, cols, coef)`` of ``z = log τ`` for neurons ``ids`` (flat order), movable
    pairs only."""
    sol = analysis.solution
    flat = np.asarray(ids).reshape(-1)
    pairs = np.asarray(sol.pair)[flat]
    sign = np.where(np.asarray(sol.inverse, dtype=bool)[flat], -1.0, 1.0)
    keep = movable[pairs]
    rows = np.flatnonzero(keep)
    return rows, pairs[keep].astype(np.intp), sign[keep]


def _use_terms(
    analysis: AnalysisResult, use: Absorb, movable: np.ndarray
) -> tuple[np.ndarray, np.ndarray, FloatArray]:
    """``(rows, cols, coef)`` of ``z = log S`` over ``use``'s compact cells:
    ``Σ_f f.exp · log τ[f.ids]`` broadcast (:mod:`graphteleport.orbit`)."""
    cshape = compact_shape(use)
    size = int(np.prod(cshape))
    sol = analysis.solution
    parts: list[tuple[np.ndarray, np.ndarray, FloatArray]] = []
    for f in use.factors:
        ids = np.broadcast_to(with_rank(np.asarray(f.ids), len(cshape)), cshape).reshape(-1)
        pairs = np.asarray(sol.pair)[ids]
        sign = np.where(np.asarray(sol.inverse, dtype=bool)[ids], -1.0, 1.0)
        keep = movable[pairs]
        parts.append((np.flatnonzero(keep), pairs[keep].astype(np.intp), f.exp * sign[keep]))
    if not parts:
        return np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0)
    rows, cols, coef = (np.concatenate(x) for x in zip(*parts, strict=True))
    assert rows.size == 0 or rows.max() < size
    return rows, cols, coef


def _reduce_cells(values: np.ndarray, cshape: tuple[int, ...]) -> tuple[FloatArray, ...]:
    """Per cell of ``cshape`` (``values`` broadcast over it, leading axes extra): ``max(x,
    0)``, ``max(−x, 0)``, element count and ``Σ x²``."""
    x = np.asarray(values, dtype=np.float64)
    x = np.where(np.isfinite(x), x, 0.0)
    extra = x.ndim - len(cshape)
    axes = tuple(range(extra)) + tuple(
        extra + k for k, d in enumerate(cshape) if d == 1 and x.shape[extra + k] != 1
    )
    hi = np.max(np.maximum(x, 0.0), axis=axes, keepdims=True).reshape(cshape)
    lo = np.max(np.maximum(-x, 0.0), axis=axes, keepdims=True).reshape(cshape)
    sq = np.sum(x * x, axis=axes, keepdims=True).reshape(cshape)
    count = np.full(cshape, x.size / max(int(np.prod(cshape)), 1))
    return hi.reshape(-1), lo.reshape(-1), count.reshape(-1), sq.reshape(-1)


#: Ops whose stored input multiplies (or divides) the other: its rounding is a gain error.
MULTIPLIERS = frozenset({"Mul", "Div"})


def stored_sites(
    model: ir.Model, analysis: AnalysisResult, op_types: Collection[str] | None
) -> list[Site]:
    """The stored tensors a per-tensor quantizer quantizes and some movable pair scales:
    the weights of :func:`graphteleport.activations.quantized_operands` (INT8 symmetric)
    and the stored inputs of the other quantized ops (UINT8 asymmetric, e.g. an inserted
    ``Mul``'s factor).  A tensor with several uses is priced through its first.

    A factor ``c`` of a ``Mul`` (``Div``) scales a whole channel of the other input, so its
    rounding error ``δ`` is a *gain* error of that channel, relative ``δ/c`` on every one of
    its elements, not noise beside ``c``'s own small signal: such a site counts its cells'
    relative errors, ``n_k = 1/(N c_k²)`` with ``E = 1`` (``N`` cells; a zero factor,
    exact on the grid, counts 0) — on the recogniser's inserted factors the additive
    model under-predicted the measured noise 7-68 fold (experiments/quant_noise.py)."""
    movable = movable_pairs(analysis)
    weights, _ = quantized_operands(model, op_types)
    constants: dict[str, bool] = {}
    for node, i, name, v in quantized_uses(model, op_types):
        if name not in weights and v.const_value is not None:
            gain = node.op_type in MULTIPLIERS and i == 1
            constants[name] = constants.get(name, True) and gain
    out: list[Site] = []
    for name, levels in [(n, WEIGHT_LEVELS) for n in weights] + [
        (n, ACTIVATION_LEVELS) for n in constants
    ]:
        w = analysis.weight_named(name)
        if w is None:
            continue
        use = w.uses[0]
        rows, cols, coef = _use_terms(analysis, use, movable)
        if not rows.size:
            continue
        values = used_values(use, use.source.array())
        cshape = compact_shape(use)
        hi, lo, count, sq = _reduce_cells(values, cshape)
        signal = float(sq.sum())
        if levels == WEIGHT_LEVELS:
            hi, lo = np.maximum(hi, lo), np.zeros_like(lo)
        elif constants[name]:
            count, signal = _gain_cells(values, cshape), 1.0
        kind = "weight" if levels == WEIGHT_LEVELS else "constant"
        out.append(Site(name, kind, levels, hi, lo, count, signal, rows, cols, coef))
    return out


def _gain_cells(values: np.ndarray, cshape: tuple[int, ...]) -> FloatArray:
    """Per cell of ``cshape``: the mean over the site's elements of ``1/c²`` (0 where
    ``c = 0``), summed over the cell's elements."""
    c = np.asarray(values, dtype=np.float64)
    inv = np.where(np.isfinite(c) & (c != 0), 1.0 / np.where(c == 0, 1.0, c) ** 2, 0.0)
    extra = inv.ndim - len(cshape)
    axes = tuple(range(extra)) + tuple(
        extra + k for k, d in enumerate(cshape) if d == 1 and inv.shape[extra + k] != 1
    )
    out: FloatArray = np.sum(inv, axis=axes, keepdims=True).reshape(-1) / max(inv.size, 1)
    return out


def activation_sites(
    model: ir.Model,
    analysis: AnalysisResult,
    feeds: Sequence[Feeds],
    op_types: Collection[str] | None,
) -> list[Site]:
    """The computed activations a per-tensor quantizer quantizes
    (:func:`graphteleport.activations.quantized_operands`) that some movable pair scales,
    with their per-neuron statistics over ``feeds`` (one onnxruntime run per feed)."""
    movable = movable_pairs(analysis)
    _, names = quantized_operands(model, op_types)
    wanted = {}
    for name in names:
        ids = analysis.neurons.get(name)
        if ids is None:
            continue
        terms = _neuron_terms(analysis, ids, movable)
        if terms[0].size:
            wanted[name] = (np.asarray(ids).shape, terms)
    stats: dict[str, list[FloatArray]] = {}
    inputs = {v.name for v in model.graph.inputs}
    with runnable(model, [n for n in wanted if n not in inputs]) as (output_names, run):
        for feed in feeds:
            values = dict(zip(output_names, run(feed), strict=True))
            values.update({n: np.asarray(feed[n]) for n in wanted if n in inputs and n in feed})
            for name, (shape, _) in wanted.items():
                if name not in values or np.asarray(values[name]).dtype.kind != "f":
                    continue
                hi, lo, count, sq = _reduce_cells(values[name], shape)
                if name in stats:
                    old = stats[name]
                    stats[name] = [np.maximum(old[0], hi), np.maximum(old[1], lo),
                                   old[2] + count, old[3] + sq]  # fmt: skip
                else:
                    stats[name] = [hi, lo, count, sq]
    out = []
    for name, (hi, lo, count, sq) in stats.items():
        rows, cols, coef = wanted[name][1]
        out.append(Site(name, "activation", ACTIVATION_LEVELS, hi, lo, count, float(sq.sum()),
                        rows, cols, coef))  # fmt: skip
    return out


@dataclass
class NoiseObjective:
    """``F(u) = Σ_s g_s R_s(u)`` over ``sites`` (module docstring), in pairs ``num_pairs``."""

    sites: Sequence[Site]
    num_pairs: int
    p: float = SMOOTH_P
    _flat: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        offsets = np.cumsum([0] + [s.cells for s in self.sites])
        site_of = np.repeat(np.arange(len(self.sites)), [s.cells for s in self.sites])
        self._flat = {
            "offsets": offsets,
            "site": site_of,
            "rows": np.concatenate([s.rows + o for s, o in zip(self.sites, offsets, strict=False)]),
            "cols": np.concatenate([s.cols for s in self.sites]),
            "coef": np.concatenate([s.coef for s in self.sites]),
            "log_hi": np.log(np.concatenate([s.hi for s in self.sites]) + 1e-300),
            "log_lo": np.log(np.concatenate([s.lo for s in self.sites]) + 1e-300),
            "log_count": np.log(np.concatenate([s.count for s in self.sites]) + 1e-300),
        }
        self.weight = np.array(
            [s.gain / (12.0 * s.levels**2 * max(s.signal, 1e-300)) for s in self.sites]
        )

    def z(self, u: FloatArray) -> FloatArray:
        f = self._flat
        return np.bincount(
            f["rows"], weights=f["coef"] * u[f["cols"]], minlength=int(f["offsets"][-1])
        )

    def _segment_lse(self, a: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Per site ``log Σ_k e^{a_k}`` and the per-cell softmax weights (the sites' cells
        are contiguous: segment reductions)."""
        site, starts = self._flat["site"], self._flat["offsets"][:-1]
        peak = np.maximum.reduceat(a, starts)
        peak = np.where(np.isfinite(peak), peak, 0.0)
        e = np.exp(a - peak[site])
        total = np.maximum(np.add.reduceat(e, starts), 1e-300)
        return np.log(total) + peak, e / total[site]

    def value_and_gradient(self, u: FloatArray) -> tuple[float, FloatArray]:
        """``F(u)`` and ``∂F/∂u``."""
        f, p = self._flat, self.p
        z = self.z(u)
        lhi, whi = self._segment_lse(p * (f["log_hi"] + z))
        llo, wlo = self._segment_lse(p * (f["log_lo"] + z))
        hi, lo = np.exp(lhi / p), np.exp(llo / p)
        lo = np.where(lo > 1e-200, lo, 0.0)
        rng = hi + lo
        lnoise, wnoise = self._segment_lse(f["log_count"] - 2.0 * z)
        noise = np.exp(lnoise)
        per_site = self.weight * rng**2 * noise
        site = f["site"]
        # d log R_s / d z_k = 2 (hi_s whi_k + lo_s wlo_k) / rng_s − 2 wnoise_k
        dz = per_site[site] * (
            2.0 * (hi[site] * whi + lo[site] * wlo) / np.maximum(rng[site], 1e-300) - 2.0 * wnoise
        )
        grad = np.bincount(f["cols"], weights=f["coef"] * dz[f["rows"]], minlength=self.num_pairs)
        return float(per_site.sum()), grad

    def per_site(self, u: FloatArray) -> FloatArray:
        """Each site's ``g_s R_s(u)`` (smoothed max)."""
        f, p = self._flat, self.p
        z = self.z(u)
        hi = np.exp(self._segment_lse(p * (f["log_hi"] + z))[0] / p)
        lo = np.exp(self._segment_lse(p * (f["log_lo"] + z))[0] / p)
        lo = np.where(lo > 1e-200, lo, 0.0)
        noise = np.exp(self._segment_lse(f["log_count"] - 2.0 * z)[0])
        out: FloatArray = self.weight * (hi + lo) ** 2 * noise
        return out


def lbfgs(
    fun: Callable[[FloatArray], tuple[float, FloatArray]],
    x0: FloatArray,
    *,
    max_iterations: int = 500,
    memory: int = 10,
    gtol: float = 1e-9,
) -> tuple[FloatArray, int]:
    """Minimise ``fun`` (value, gradient) from ``x0`` by L-BFGS with an Armijo backtracking
    line search; stops when ``max|∇| ≤ gtol · (1 + |f|)`` or after ``max_iterations``.
    Returns the point and the iterations taken."""
    x = np.asarray(x0, dtype=np.float64).copy()
    fx, g = fun(x)
    s_hist: list[FloatArray] = []
    y_hist: list[FloatArray] = []
    it = 0
    for it in range(1, max_iterations + 1):
        if np.max(np.abs(g), initial=0.0) <= gtol * (1.0 + abs(fx)):
            break
        q = g.copy()
        alphas = []
        for s, y in zip(reversed(s_hist), reversed(y_hist), strict=True):
            a = float(s @ q) / float(y @ s)
            alphas.append(a)
            q -= a * y
        if y_hist:
            q *= float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1])
        else:
            q /= max(float(np.max(np.abs(g))), 1e-300)
        for (s, y), a in zip(zip(s_hist, y_hist, strict=True), reversed(alphas), strict=True):
            b = float(y @ q) / float(y @ s)
            q += (a - b) * s
        d = -q
        slope = float(g @ d)
        if slope >= 0:
            d, slope, s_hist, y_hist = -g, -float(g @ g), [], []
        step = 1.0
        while True:
            xn = x + step * d
            fn, gn = fun(xn)
            if math.isfinite(fn) and fn <= fx + 1e-4 * step * slope:
                break
            step *= 0.5
            if step < 1e-12:
                return x, it
        s, y = xn - x, gn - g
        if float(s @ y) > 1e-12 * float(np.sqrt((s @ s) * (y @ y))):
            s_hist.append(s)
            y_hist.append(y)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        x, fx, g = xn, fn, gn
    return x, it


def noise_values(
    model: ir.Model,
    analysis: AnalysisResult,
    feeds: Sequence[Feeds],
    op_types: Collection[str] | None = ("all",),
    *,
    gains: Mapping[str, float] | None = None,
    p: float = SMOOTH_P,
    max_iterations: int = 1000,
) -> tuple[FloatArray, dict[str, float]]:
    """The pair values ``t = exp(u)`` minimising ``F(u) + λ‖u‖²/2`` (module docstring)
    for the sites of ``model`` (analysed as ``analysis``, absorb mode), and figures:
    ``F`` before and after, the iterations."""
    sites = stored_sites(model, analysis, op_types) + activation_sites(
        model, analysis, feeds, op_types
    )
    if not sites:  # no movable pair reaches a quantized site
        return np.ones(analysis.solution.num_pairs), {"sites": 0.0}
    for s in sites:
        s.gain = (gains or {}).get(s.name, 1.0)
    objective = NoiseObjective(sites, analysis.solution.num_pairs, p)
    u0 = np.zeros(analysis.solution.num_pairs)
    f0, _ = objective.value_and_gradient(u0)
    lam = PROXIMAL * f0

    def fun(u: FloatArray) -> tuple[float, FloatArray]:
        fu, gu = objective.value_and_gradient(u)
        return fu + 0.5 * lam * float(u @ u), gu + lam * u

    u, iterations = lbfgs(fun, u0, max_iterations=max_iterations)
    f1, _ = objective.value_and_gradient(u)
    log.info("noise objective %.4g -> %.4g in %d iterations (%d sites)", f0, f1, iterations,
             len(sites))  # fmt: skip
    return np.exp(u), {
        "objective_before": f0,
        "objective_after": f1,
        "iterations": float(iterations),
        "sites": float(len(sites)),
    }

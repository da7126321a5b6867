"""The algebra of a teleport: how each weight, activation and BatchNorm scales with τ.

Everything that computes with cofactors calls this module: the ONNX rewrite
(:mod:`graphteleport.rewrite`), insert mode (:mod:`graphteleport.insertion`), the
range fit (:mod:`graphteleport.ranges`), and the torch package's rewrite, insert mode and
``orbit_tangent`` (:mod:`graphteleport.torch.absorb`, ``.insert``, ``.graphmodule``,
``.orbit``).  It depends on numpy only.

**Cofactors.**  The analysis (:func:`graphteleport.analysis.analyze_model`) puts every
neuron in a cofactor pair ``p`` and says whether it is the pair's *inverse* member.  One
value ``t_p`` per pair gives neuron n the cofactor

    ``τ_n = t_p``  or, for an inverse member,  ``τ_n = 1/t_p``      (:func:`neuron_cofactors`)

and along ``t = 1 + ε·v`` its derivative at ``ε = 0`` is ``v_p`` or ``−v_p``
(:func:`neuron_tangent`).

**Powers: the reciprocal convention.**  A factor ``τ[ids]^e`` (:class:`Factor`) has
``e = 1`` (a weight's target side), ``−1`` (its source side), ``2`` (BatchNorm's running
variance) or, rarely, another integer.  :func:`power` computes ``τ^1 = τ``,
``τ^−1 = 1/τ`` (one correctly rounded division) and ``τ² = τ·τ``, so a power of two
gives exact results, and ``S`` comes out bit for bit the same whether it is taken for
one weight (:func:`product`) or for all of them at once (:class:`FactorTable`).

**The scale of a weight.**  A stored weight ``W`` read by a node absorbs

    ``W' = W · S``,   ``S = Π_f τ[f.ids]^f.exp``                     (:func:`product`)

with each factor's ids broadcast to W's shape in a compact layout (a conv weight's ``S``
is ``[O, C, 1, 1]``; ``W'[o, i] = W[o, i] · τ_out[o] / τ_in[i]``).  :func:`product` is the
one place the product is taken.  A weight read by several nodes (*uses*) gets one ``S``
that its uses agree on (:func:`source_scale`; the analysis tied them), or, when it was
shared only by an exporter's accident, one per use (:func:`scales_of`).
:func:`scale_bounds` bounds ``|S|`` of every weight from its factors' extremes.

**Activations.**  Insert mode makes an activation f compute ``τ · f(x/τ)``; that equals
``f(x)`` where τ lies in the group f commutes with (positive: τ > 0 for the ReLU family;
sign: τ = ±1 for odd f; any: τ = 1 only) — :func:`wrap_needed` says where it does not.
Only the part of τ outside that group needs the wrap: with ``τ = g·r``, ``g`` the group's
part (:func:`group_part`: ``|τ|``, ``sign τ`` or 1) and ``r = τ/g`` the rest,
``r · f(x'/r) = r · f(g·x) = r·g · f(x) = τ · f(x)`` for ``x' = τx`` — so a ReLU wrap
stores ``sign τ`` (±1), an odd activation's ``|τ|``, and f's own output is ``g ⊙ f(x)``.

**The log-derivative.**  Along ``τ = 1 + ε·v`` (v per neuron, :func:`neuron_tangent`),
``d log S / dε = Σ_f f.exp · v[f.ids]`` at ``ε = 0`` (:func:`log_derivative`): the
micro-teleportation direction of a weight is ``dW/dε = W · Σ_f e·v[ids]``.

**BatchNorm's ε.**  A training-form BatchNorm scales its input by τ (> 0) and so its
variance by ``τ²``, but divides by ``sqrt(var + ε)``, and no cofactor scales ε.  With ``σ²``
a channel's input variance measured on example inputs (:func:`batchnorm_eps`):

    ``c = sqrt((τ²σ² + ε) / (τ²(σ² + ε)))``,   ``S = c²τ²``,   offset ``ε(S − 1)``

``γ' = γ·τ_out·c`` keeps train mode exact on batches of variance ``σ²``, and the running
variance ``rv' = S·rv + ε(S − 1)`` keeps eval mode exact: ``sqrt(rv' + ε) = c·τ·sqrt(rv + ε)``.
At τ = 1 (:func:`batchnorm_eps_tangent`): ``dc = −ε/(σ² + ε) · d(τ²)/2`` and
``dS = d(τ²) + 2·dc``, so ``d rv' = (rv + ε)·dS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

IntArray = np.ndarray
FloatArray = np.ndarray
Real = Any  # a float array: numpy's, or a (differentiable) torch tensor


@dataclass(frozen=True, slots=True, eq=False)
class Factor:
    """One factor ``τ[ids]^exp`` of a scale; ``ids`` broadcasts to the scaled tensor's shape."""

    ids: IntArray
    exp: int


class Scaling(Protocol):
    """A use of a stored tensor that absorbs ``S`` (an :class:`~graphteleport.analysis.Absorb`):
    ``S`` is computed in ``shape`` from ``factors``; ``index`` maps each element of that
    shape to a flat element of the stored tensor (None: the shape is the tensor's own), and
    ``expand`` says the shape is a broadcast expansion of the stored tensor."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def factors(self) -> Sequence[Factor]: ...

    @property
    def index(self) -> IntArray | None: ...

    @property
    def expand(self) -> bool: ...


Use = TypeVar("Use", bound=Scaling)


# -- cofactors ---------------------------------------------------------------------------------
def neuron_cofactors(values: FloatArray, signed_pair: IntArray) -> FloatArray:
    """Per-neuron τ from one value per pair: ``t_p``, or ``1/t_p`` for an inverse member.

    ``signed_pair`` holds each neuron's pair, plus the number of pairs for an inverse
    member: one gather from ``t`` and ``1/t`` laid end to end.
    """
    v = np.asarray(values, dtype=np.float64)
    out: FloatArray = np.concatenate((v, power(v, -1)))[signed_pair]
    return out


def neuron_tangent(direction: FloatArray, signed_pair: IntArray) -> FloatArray:
    """Per-neuron ``dτ/dε`` at ``t = 1`` along ``t = 1 + ε·v`` (``v``: one value per pair):
    ``v_p``, or ``−v_p`` for an inverse member (``d(1/t)/dε = −v`` at ``t = 1``)."""
    v = np.asarray(direction, dtype=np.float64)
    out: FloatArray = np.concatenate((v, -v))[signed_pair]
    return out


def power(t: FloatArray, exp: int) -> FloatArray:
    """``τ^exp`` elementwise, float64, by the reciprocal convention (module docstring)."""
    out: FloatArray
    if exp == 1:
        out = t
    elif exp == -1:
        out = 1.0 / t
    elif exp == 2:
        out = t * t
    else:
        out = t**exp
    return out


# -- S -----------------------------------------------------------------------------------------
def product(factors: Sequence[Factor], tau: FloatArray, rank: int = 0) -> FloatArray:
    """``S = Π τ[f.ids]^f.exp`` (float64), in the factors' compact layout broadcast
    together, with at least ``rank`` axes.  The one place the product is taken."""
    s: FloatArray = np.ones((1,) * rank, dtype=np.float64)
    for f in factors:
        s = s * power(tau[f.ids], f.exp)
    return s


def product_at(
    factors: Sequence[Factor], tau: FloatArray, at: tuple[np.ndarray, ...]
) -> FloatArray:
    """:func:`product` at some elements only: ``at`` holds one index array per axis of the
    layout (the use's shape, rank ``len(at)``).  The same factors multiply in the same
    order, so each value equals the whole product's there, bit for bit."""
    s: FloatArray = np.ones(at[0].shape if at else (), dtype=np.float64)
    for f, ids in zip(factors, gather_at(factors, at), strict=True):
        s = s * power(tau[ids], f.exp)
    return s


def gather_at(factors: Sequence[Factor], at: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    """Per factor, its neuron ids at the elements ``at`` (:func:`product_at`'s gather,
    which a caller checking the same elements again may keep: ``τ`` is then indexed
    directly)."""
    rank = len(at)
    out: list[np.ndarray] = []
    for f in factors:
        ids = with_rank(f.ids, rank)
        out.append(ids[tuple(i if n > 1 else 0 for i, n in zip(at, ids.shape, strict=True))])
    return out


@dataclass(frozen=True, slots=True, eq=False)
class RowScale:
    """``S`` of one use, formed a block of rows (axis 0) at a time instead of whole
    (:func:`row_scale`): ``rows(i, j)`` equals ``product(factors, tau, rank)[i:j]`` bit for
    bit (the same factors multiply in the same order), so a weight-sized ``S`` is never
    made.  ``shape`` is the layout's (each axis the weight's size or 1)."""

    factors: Sequence[Factor]
    tau: FloatArray
    shape: tuple[int, ...]

    def rows(self, start: int, stop: int) -> FloatArray:
        """Rows ``start:stop`` of ``S`` (a factor constant along axis 0 is not sliced)."""
        rank = len(self.shape)
        s: FloatArray = np.ones((1,) * rank, dtype=np.float64)
        for f in self.factors:
            ids = with_rank(f.ids, rank)
            if ids.shape[0] > 1:
                ids = ids[start:stop]
            s = s * power(self.tau[ids], f.exp)
        return s

    def rows_into(self, start: int, stop: int, out: FloatArray) -> None:
        """Write :meth:`rows` ``start:stop``, broadcast to ``out`` (the leading axes of
        the layout: the ones after ``out.ndim`` must be 1), into ``out``: the same factors
        multiply in the same order in float64 (the leading 1 of :func:`product` multiplies
        exactly), so the values are :meth:`rows`' bit for bit where ``out`` is float64,
        and those values rounded once where it is float32: the products taken in a float64
        block, then rounded as they are copied (:func:`_outer` for the usual two factors, a
        column and a row)."""
        rank, lead = len(self.shape), out.ndim
        parts = []
        for f in self.factors:
            ids = with_rank(f.ids, rank)
            if ids.shape[0] > 1:
                ids = ids[start:stop]
            parts.append(power(self.tau[ids.reshape(ids.shape[:lead])], f.exp))
        if not parts:
            out[...] = 1.0
            return
        if len(parts) == 1:
            np.copyto(out, parts[0], casting="same_kind")
            return
        acc = out if out.dtype == np.float64 else np.empty(out.shape, np.float64)
        if not (len(parts) == 2 and _outer(parts[0], parts[1], acc)):
            np.multiply(parts[0], parts[1], out=acc)
            for part in parts[2:]:
                np.multiply(acc, part, out=acc)
        if acc is not out:
            np.copyto(out, acc, casting="same_kind")


#: Rows (last axis) from which numpy's broadcast multiply of a column by a row is faster
#: than ``einsum``'s outer product (:func:`_outer`).
OUTER_ROW = 4096


def _outer(a: FloatArray, b: FloatArray, out: FloatArray) -> bool:
    """``out = a · b`` (float64) where one of ``a``, ``b`` is a column ``[n, 1]`` and the
    other a row ``[1, C]`` of ``out``'s shape with ``C <`` :data:`OUTER_ROW`, by
    ``einsum``'s outer product (each element one float64 product, as ``multiply``'s);
    False, untouched, otherwise.  numpy 2.4's broadcast multiply of a column by a row
    takes 0.50 ns an element for rows of 256 to 2048, ``einsum`` 0.33 (0.19 against 0.35
    from rows of 4096 on); a 1×1 conv's grid, float32, with the rounding copy: 0.47
    against 0.66 ns."""
    if out.ndim != 2 or out.shape[1] >= OUTER_ROW:
        return False
    column, row = (a, b) if a.shape == (out.shape[0], 1) else (b, a)
    if column.shape != (out.shape[0], 1) or row.shape != (1, out.shape[1]):
        return False
    np.einsum("i,j->ij", column[:, 0], row[0], out=out)
    return True


def row_scale(
    shape: tuple[int, ...], uses: Sequence[Scaling], private: bool, tau: FloatArray
) -> RowScale | None:
    """The one ``S`` a stored tensor of ``shape`` is written with, as a :class:`RowScale`,
    where :func:`scales_of` would give a single :func:`scale` of ``uses[0]`` whose factors
    lay out in ``shape``'s rank without growing it (a plain weight); None otherwise (the
    caller takes :func:`scales_of`)."""
    if not shape or any(ab.index is not None for ab in uses):
        return None
    if len(uses) > 1 and (private or any(ab.expand for ab in uses)):
        return None
    rank = len(shape)
    layouts = [with_rank(f.ids, rank).shape for f in uses[0].factors]
    if len(uses[0].shape) != rank or any(len(sh) != rank for sh in layouts):
        return None
    try:
        layout = np.broadcast_shapes((1,) * rank, *layouts)
    except ValueError:
        return None
    if any(n not in (1, m) for n, m in zip(layout, shape, strict=True)):
        return None
    return RowScale(uses[0].factors, tau, tuple(layout))


def scale(use: Scaling, tau: FloatArray) -> FloatArray:
    """``S`` of one use, broadcastable to its shape (a conv weight's is ``[O, C, 1, 1]``:
    cheap next to the weight itself)."""
    return product(use.factors, tau, len(use.shape))


def source_scale(shape: tuple[int, ...], uses: Sequence[Scaling], tau: FloatArray) -> FloatArray:
    """The one ``S`` every use of a stored tensor of ``shape`` agrees on: broadcastable to
    ``shape`` when no use maps elements, else in that shape (each use writes the elements
    its index reads; a broadcast-expanded use was pinned by the analysis)."""
    if all(ab.index is None and not ab.expand for ab in uses):  # one use, or tied uses agree
        return scale(uses[0], tau)
    s = np.ones(int(np.prod(shape, dtype=np.int64)), dtype=np.float64)
    for ab in uses:
        part = np.broadcast_to(scale(ab, tau), ab.shape).reshape(-1)
        if ab.index is None:
            if ab.expand:
                continue
            s = part.copy()
        else:
            s[ab.index.reshape(-1)] = part
    return s.reshape(shape)


def scales_of(
    shape: tuple[int, ...], uses: Sequence[Use], private: bool, tau: FloatArray
) -> list[tuple[list[Use], FloatArray]]:
    """The scales a stored tensor of ``shape`` is written with, each with the uses it serves:
    one per use for a *private* tensor (an exporter's accidental sharing, written once per
    differing use), else one that all its uses agree on."""
    if private and all(ab.index is None for ab in uses):
        return [([ab], scale(ab, tau)) for ab in uses]
    if len(uses) == 1 and uses[0].index is None:
        return [(list(uses), scale(uses[0], tau))]
    return [(list(uses), source_scale(shape, uses, tau))]


def wrap_needed(t: FloatArray, group: str) -> bool:
    """An activation with cofactors ``t`` needs its ``Mul`` pair, ``τ·f(x/τ)``: some τ lies
    outside the group it commutes with (positive: τ < 0; sign: |τ| ≠ 1; any other: τ ≠ 1)."""
    if group == "positive":
        return bool(np.any(t < 0))
    if group == "sign":
        return bool(np.any(np.abs(t) != 1))
    return bool(np.any(t != 1))


def group_part(t: FloatArray, group: str) -> FloatArray:
    """The part of cofactors ``t`` an activation of ``group`` commutes with (module
    docstring, *Activations*): ``|t|`` (positive), ``sign t`` (sign), 1 (any).  The wrap
    stores the rest, ``t / group_part(t)``."""
    part: FloatArray
    if group == "positive":
        part = np.abs(t)
    elif group == "sign":
        part = np.sign(t)
    else:
        part = np.ones_like(t)
    return part


def with_rank(a: np.ndarray, rank: int) -> np.ndarray:
    """``a`` with leading size-1 axes added (or dropped) to have ``rank`` axes where it can:
    numpy's broadcasting alignment of a compact layout to a tensor's rank."""
    if a.ndim < rank:
        return a.reshape((1,) * (rank - a.ndim) + a.shape)
    extra = a.ndim - rank
    if extra > 0 and all(d == 1 for d in a.shape[:extra]):
        return a.reshape(a.shape[extra:])
    return a


# -- every S at once ---------------------------------------------------------------------------
class FactorTable:
    """The factors of every use laid end to end, so that ``τ[ids]^e`` of all of them takes
    one gather of ``τ`` (:meth:`values`).

    ``ids`` holds every factor's ids (flat, in use order); per factor ``starts`` and
    ``sizes`` locate it, ``shapes`` give its layout and ``exps`` its exponent;
    ``first[id(use)]`` is the index of a use's first factor, ``order[id(use)]`` its position.
    """

    __slots__ = (
        "_counts",
        "_empty",
        "_firsts",
        "_powers",
        "_trailing_empty",
        "exps",
        "first",
        "ids",
        "order",
        "shapes",
        "sizes",
        "starts",
    )

    def __init__(self, uses: Sequence[Scaling]) -> None:
        arrays: list[IntArray] = []
        self.exps: list[int] = []
        self.first: dict[int, int] = {}
        self.order: dict[int, int] = {}
        for k, ab in enumerate(uses):
            self.first[id(ab)] = len(arrays)
            self.order[id(ab)] = k
            for f in ab.factors:
                arrays.append(f.ids)
                self.exps.append(f.exp)
        self._firsts = np.fromiter(self.first.values(), np.int64, len(uses))
        self._counts = np.fromiter((len(ab.factors) for ab in uses), np.int64, len(uses))
        self.shapes = [a.shape for a in arrays]
        self.sizes = [a.size for a in arrays]
        self.starts = np.asarray([0, *self.sizes[:-1]], dtype=np.int64).cumsum()
        self._empty = [k for k, n in enumerate(self.sizes) if n == 0]
        self._trailing_empty = bool(self.sizes) and self.sizes[-1] == 0
        empty = np.zeros(0, dtype=np.int64)
        self.ids = np.concatenate(arrays, axis=None) if arrays else empty  # flattened
        exps = np.asarray(self.exps, dtype=np.int64).repeat(self.sizes)
        self._powers = [(e, (exps == e).nonzero()[0]) for e in sorted(set(self.exps) - {1})]

    def values(self, tau: Real) -> Real:
        """``τ[ids]^e`` of every element, float64 (split by ``sizes`` per factor), by
        :func:`power`: almost every exponent is ±1, the rest mostly 2.  ``tau`` may be a
        torch tensor too (indexing and :func:`power` are all it takes): the result is
        then differentiable in ``tau`` (:class:`graphteleport.torch.orbitmap.OrbitMap`)."""
        out = tau[self.ids]
        for exp, at in self._powers:
            out[at] = power(out[at], exp)
        return out

    def span(self, use: Scaling) -> tuple[int, int]:
        """Where a use's first factor lies in ``ids`` (and in :meth:`values`)."""
        j = self.first[id(use)]
        lo = int(self.starts[j])
        return lo, lo + self.sizes[j]

    def moved(self, values: FloatArray) -> list[bool]:
        """Per factor: some element of ``values`` (:meth:`values`) differs from 1."""
        if not self.ids.size:
            return [False] * len(self.sizes)
        differ = values != 1.0
        if self._trailing_empty:  # a sentinel keeps their start (the end) in range
            differ = np.append(differ, False)
        peaks = np.logical_or.reduceat(differ, self.starts)
        if self._empty:
            peaks[self._empty] = False  # (reduceat gives an empty span another's element)
        out: list[bool] = peaks.tolist()
        return out

    def bounds(self, tau: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Per use (in table order): ``min |S|`` and ``max |S|`` over its elements, bounded
        by the products of its factors' extreme ``|τ^e|`` (one gather, two ``reduceat``)."""
        fmin, fmax = np.ones(len(self.sizes)), np.ones(len(self.sizes))
        if self.ids.size:
            v = np.abs(self.values(tau))
            nonempty = np.flatnonzero(np.asarray(self.sizes) > 0)
            fmin[nonempty] = np.minimum.reduceat(v, self.starts[nonempty])
            fmax[nonempty] = np.maximum.reduceat(v, self.starts[nonempty])
        amin, amax = np.ones(self._counts.size), np.ones(self._counts.size)
        has = np.flatnonzero(self._counts)
        if has.size:
            with np.errstate(over="ignore", under="ignore"):
                amin[has] = np.multiply.reduceat(fmin, self._firsts[has])
                amax[has] = np.multiply.reduceat(fmax, self._firsts[has])
        return amin, amax


def scale_bounds(
    table: FactorTable, tensors: Sequence[Sequence[Scaling]], tau: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Per stored tensor (its uses, each in ``table``): ``smin ≤ |S| ≤ smax`` over all its
    uses (:meth:`FactorTable.bounds`, then the extremes over each tensor's uses).  Never
    looks at a weight, and costs about as much as the factors' ids."""
    amin, amax = table.bounds(tau)
    owner = np.empty(amin.size, np.int64)
    for j, uses in enumerate(tensors):
        for ab in uses:
            owner[table.order[id(ab)]] = j
    smin, smax = np.full(len(tensors), np.inf), np.zeros(len(tensors))
    np.minimum.at(smin, owner, amin)
    np.maximum.at(smax, owner, amax)
    return smin, smax


# -- derivatives -------------------------------------------------------------------------------
def log_derivative(use: Scaling, dtau: FloatArray) -> FloatArray:
    """``d log S / dε = Σ_f f.exp · dτ[f.ids]`` at ``τ = 1`` (``dtau``: per-neuron ``dτ/dε``,
    :func:`neuron_tangent`), in the use's shape."""
    out = np.zeros(use.shape)
    for f in use.factors:
        out = out + f.exp * dtau[f.ids]
    return out


# -- BatchNorm's eps -----------------------------------------------------------------------------
def batchnorm_eps(
    t2: FloatArray, sigma2: FloatArray, eps: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``(c, S, offset)`` per channel for input cofactors squared ``t2 = τ²``, measured input
    variances ``sigma2`` (NaN: none measured, ``c = 1``) and ``eps`` (module docstring):
    ``c = sqrt((τ²σ² + ε)/(τ²(σ² + ε)))``, ``S = c²τ²``, ``offset = ε(S − 1)``."""
    c = np.sqrt(batchnorm_eps_squared(t2, sigma2, eps))
    c = np.where(np.isnan(sigma2), 1.0, c)
    s, offset = batchnorm_eps_variance(c, t2, eps)
    return c, s, offset


def batchnorm_eps_squared(t2: Real, sigma2: Real, eps: Real | float) -> Real:
    """``c² = (τ²σ² + ε)/(τ²(σ² + ε))`` (:func:`batchnorm_eps`), by arithmetic only: numpy
    arrays and torch tensors alike (:class:`graphteleport.torch.orbitmap.OrbitMap`
    differentiates it)."""
    return (t2 * sigma2 + eps) / (t2 * (sigma2 + eps))


def batchnorm_eps_variance(c: Real, t2: Real, eps: Real | float) -> tuple[Real, Real]:
    """The running variance's ``S = c²τ²`` and offset ``ε(S − 1)`` (:func:`batchnorm_eps`),
    by arithmetic only, like :func:`batchnorm_eps_squared`."""
    s = c * c * t2
    return s, eps * (s - 1)


def batchnorm_eps_tangent(
    dt2: FloatArray, sigma2: FloatArray | None, eps: float
) -> tuple[FloatArray, FloatArray]:
    """``(dc, dS)``: the derivatives of :func:`batchnorm_eps`'s ``c`` and ``S`` at ``τ = 1``
    along a direction with ``d(τ²)/dε = dt2``: ``dc = −ε/(σ² + ε) · dt2/2`` (0 without a
    measured ``sigma2``) and ``dS = dt2 + 2·dc`` (so ``d rv' = (rv + ε)·dS``)."""
    dc = np.zeros_like(dt2) if sigma2 is None else -eps / (sigma2 + eps) * dt2 / 2
    return dc, dt2 + 2 * dc

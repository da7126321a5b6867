"""Draw one cofactor per free cofactor pair, as in the paper's code (DESIGN.md §4).

Everything a draw depends on comes in one checked
:class:`~graphteleport.options.CofactorOptions`; samplings (``r`` = ``cob_range``,
``c`` = ``center``):

==================  ==========================================
``intra_landscape``  τ ~ U[1 − r, 1 + r]          (default, r = 0.5)
``inter_landscape``  τ = ±U[1 − r, 1 + r], fair-coin sign
``positive``         τ ~ U[0, r]
``negative``         τ ~ U[−r, 0]
``centered``         τ ~ U[c − r, c + r]
==================  ==========================================

Each draw is then restricted to its pair's group: a *positive* pair (ReLU, max
pooling in absorb mode) takes ``|τ|`` — the drawn sign is resampled to +, never
refused; a *sign* pair (odd activations) takes ``sign(τ)``; a *pinned* pair takes
1.

Draws stay away from 0: with ``m`` the largest magnitude the sampling's interval
reaches (``1 + r`` for the landscapes, ``r`` for positive/negative, ``|c| + r``
centered), a draw with ``|τ| < ε = max(m, 1) · 2^-10`` is redrawn uniformly from the
rest of the interval (``[low, high]`` without ``(−ε, ε)``), or, where nothing is left
(``positive`` with ``r < ε``), set to ``±ε`` on the interval's side.  So
``|τ| ≥ 2^-10`` always (``1/τ ≤ 1024``), and for ``m > 1`` the draws span at most a
factor 1024 of the interval's reach (:mod:`graphteleport.ranges` then keeps every
rescaled weight inside its dtype).  Only draws within ``ε`` of 0 change — the others,
and inter_landscape's signs, are those of the same seed without the floor — and the
redraws keep the distribution uniform on what remains.

With ``exact=True`` every |τ| is rounded to a power of two in log2
(``2^round(log2 |τ|)``) so the rewritten weights are exact products; a draw that
rounds to 1 is pushed to 2 or ½ (by the side it lies on) so an exact teleport
still moves every free cofactor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from graphteleport.analysis import GROUPS

if TYPE_CHECKING:
    from graphteleport.options import CofactorOptions


def draw(count: int, options: CofactorOptions, rng: np.random.Generator) -> np.ndarray:
    """``count`` raw draws from the options' sampling (before group restriction).

    Uniform on ``options.interval`` (:func:`graphteleport.options.interval`), kept at
    least ``ε`` from 0 (:func:`zero_floor`), then for ``inter_landscape`` a fair-coin
    sign per draw.  The options were checked when they were made.
    """
    low, high = options.interval
    t = rng.uniform(low, high, count)
    signs = rng.choice([-1.0, 1.0], count) if options.sampling == "inter_landscape" else None
    eps = zero_floor(low, high)
    if low < eps and high > -eps:  # the interval meets (−ε, ε)
        t = _away_from_zero(t, low, high, rng)
    return t if signs is None else t * signs


def zero_floor(low: float, high: float) -> float:
    """``ε = max(m, 1) · 2^-10`` with ``m = max(|low|, |high|)``: no draw has ``|τ| < ε``."""
    return max(abs(low), abs(high), 1.0) * 2.0**-10


def _away_from_zero(t: np.ndarray, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """Redraw every ``|τ| < ε`` uniformly from ``[low, high] \\ (−ε, ε)``; where that is
    empty, take ``±ε`` on the interval's side (the sign of its midpoint; the interval
    [0, 0] is refused by :class:`~graphteleport.options.CofactorOptions`)."""
    eps = zero_floor(low, high)
    near = np.abs(t) < eps
    if not near.any():
        return t
    below = max(min(high, -eps) - low, 0.0)  # length of [low, −ε]
    above = max(high - max(low, eps), 0.0)  # length of [ε, high]
    k = int(near.sum())
    if below + above > 0:
        u = rng.uniform(0.0, below + above, k)
        t[near] = np.where(u < below, low + u, max(low, eps) + (u - below))
    else:
        t[near] = np.copysign(eps, low + high)
    return t


def to_power_of_two(t: np.ndarray) -> np.ndarray:
    """``sign(τ) · 2^round(log2|τ|)``, never 1 in magnitude (1 moves to 2 or ½)."""
    log = np.log2(np.abs(t))
    k = np.round(log)
    k = np.where(k == 0, np.where(log >= 0, 1.0, -1.0), k)
    out: np.ndarray = np.sign(t) * np.exp2(k)
    return out


def restrict(
    t: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    free: np.ndarray | None = None,
    *,
    positive: bool = False,
) -> np.ndarray:
    """Restrict each draw to its pair's group (positive → |τ|, sign → ±1, pinned → 1);
    with ``free``, pairs that are not free take 1 too; ``positive`` promises every
    ``τ > 0`` (one pass less: no magnitudes or signs to take).

    ``groups``: names, or integer codes indexing :data:`~graphteleport.analysis.GROUPS`.
    A value is ``copysign(m, s)``: ``m = |τ|`` where the group keeps the magnitude (any,
    positive) else 1, ``s = τ`` where it keeps the sign (any, sign) else 1 — a few
    vectorised passes (``np.choose`` over four arrays is several times slower).
    """
    g = np.asarray(groups)
    if g.dtype.kind not in "iu":  # names -> codes (an unknown name is "any")
        g = np.select([g == name for name in GROUPS[1:]], range(1, len(GROUPS)), 0)
    keep_mag = _KEEPS_MAG[g]
    if positive:  # every τ > 0: |τ| = τ, and a sign pair's ±1 is 1
        if free is not None:
            keep_mag &= free
        return np.where(keep_mag, t, 1.0)
    keep_sign = _KEEPS_SIGN[g]
    if free is not None:
        keep_mag &= free
        keep_sign &= free
    return np.copysign(np.where(keep_mag, np.abs(t), 1.0), np.where(keep_sign, t, 1.0))


# per group code (GROUPS' order): whether τ keeps its magnitude / its sign
_KEEPS_MAG = np.array([g in ("any", "positive") for g in GROUPS])
_KEEPS_SIGN = np.array([g in ("any", "sign") for g in GROUPS])


def sample(
    groups: Sequence[str] | np.ndarray, free: np.ndarray, options: CofactorOptions
) -> np.ndarray:
    """One cofactor per pair: drawn for free pairs (seeded by ``options.seed``), 1 for
    the others; powers of two with ``options.exact``."""
    rng = np.random.default_rng(options.seed)
    t = draw(len(groups), options, rng)
    if options.exact:
        t = to_power_of_two(t)  # (keeps signs)
    return restrict(t, groups, free, positive=_positive_draws(options))


def _positive_draws(options: CofactorOptions) -> bool:
    """Every draw is > 0 (the interval lies above 0 and no sign is drawn)."""
    return options.sampling != "inter_landscape" and options.interval[0] > 0

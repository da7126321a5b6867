"""Draw one cofactor per free cofactor pair, as in the paper's code (DESIGN.md §4).

Samplings (``r`` = ``cob_range``, ``c`` = ``center``):

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

import math
from collections.abc import Sequence

import numpy as np

from graphteleport.analysis.solve import GROUPS
from graphteleport.errors import InputError

SAMPLINGS = ("intra_landscape", "inter_landscape", "positive", "negative", "centered")


def draw(
    count: int,
    sampling: str = "intra_landscape",
    cob_range: float = 0.5,
    *,
    center: float = 1.0,
    rng: np.random.Generator,
) -> np.ndarray:
    """``count`` raw draws from the named sampling (before group restriction)."""
    check_sampling(sampling, cob_range, center)
    r = float(cob_range)
    bounds = _BOUNDS.get(sampling)
    if bounds is None:
        raise InputError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    low, high = bounds(r, center)
    t = rng.uniform(low, high, count)
    signs = rng.choice([-1.0, 1.0], count) if sampling == "inter_landscape" else None
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
    [0, 0] is refused by :func:`check_sampling`)."""
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


def check_sampling(sampling: str, cob_range: float, center: float = 1.0) -> None:
    """Raise InputError (one line) unless the sampling can draw non-zero cofactors.

    ``r`` must be a finite number >= 0 and ``c`` a finite number; the draw range
    ``[low, high]`` (the table above) must have finite ends and a finite width
    (numpy cannot draw from a wider one), and must not be the single point 0
    (``positive``/``negative`` with ``r = 0``, ``centered`` with ``c = r = 0``):
    τ = 0 is no rescaling, ``W / τ`` would divide by zero.
    """
    if sampling not in _BOUNDS:
        raise InputError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    r, c = _finite(cob_range, "--cob-range"), _finite(center, "--center")
    if r < 0:
        raise InputError(f"--cob-range must be >= 0, got {cob_range}")
    low, high = _BOUNDS[sampling](r, c)
    if not (math.isfinite(low) and math.isfinite(high) and math.isfinite(high - low)):
        raise InputError(
            f"--sampling {sampling} with --cob-range {r:g} and --center {c:g} draws from "
            f"[{low:g}, {high:g}], too wide to sample; choose a smaller range"
        )
    if low == high == 0:
        raise InputError(
            f"--sampling {sampling} with --cob-range {r:g}"
            + (f" and --center {c:g}" if sampling == "centered" else "")
            + " would draw every cofactor as 0; cofactors must be non-zero (use --cob-range > 0)"
        )


def check_seed(seed: object) -> None:
    """Raise InputError unless *seed* is None or a non-negative integer (numpy's rule)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed!r}")


def _finite(x: object, option: str) -> float:
    """*x* as a finite float, or InputError naming the option."""
    try:
        value = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{option} must be a number, got {x!r}") from None
    if not math.isfinite(value):
        raise InputError(f"{option} must be a finite number, got {x}")
    return value


_BOUNDS = {  # sampling -> (r, c) -> the uniform draw's range (inter_landscape: then ± at random)
    "intra_landscape": lambda r, c: (1 - r, 1 + r),
    "inter_landscape": lambda r, c: (1 - r, 1 + r),
    "positive": lambda r, c: (0.0, r),
    "negative": lambda r, c: (-r, 0.0),
    "centered": lambda r, c: (c - r, c + r),
}


def to_power_of_two(t: np.ndarray) -> np.ndarray:
    """``sign(τ) · 2^round(log2|τ|)``, never 1 in magnitude (1 moves to 2 or ½)."""
    log = np.log2(np.abs(t))
    k = np.round(log)
    k = np.where(k == 0, np.where(log >= 0, 1.0, -1.0), k)
    return np.sign(t) * np.exp2(k)


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

    ``groups``: names, or integer codes indexing :data:`~graphteleport.analysis.solve.GROUPS`.
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
    groups: Sequence[str] | np.ndarray,
    free: np.ndarray,
    sampling: str = "intra_landscape",
    cob_range: float = 0.5,
    *,
    center: float = 1.0,
    seed: int | None = None,
    exact: bool = False,
) -> np.ndarray:
    """One cofactor per pair: drawn for free pairs, 1 for the others."""
    check_seed(seed)
    rng = np.random.default_rng(seed)
    t = draw(len(groups), sampling, cob_range, center=center, rng=rng)
    if exact:
        t = to_power_of_two(t)  # (keeps signs)
    return restrict(t, groups, free, positive=_positive_draws(sampling, cob_range, center))


def _positive_draws(sampling: str, cob_range: float, center: float) -> bool:
    """Every draw of ``sampling`` is > 0 (its range lies above 0 and no sign is drawn)."""
    low = _BOUNDS[sampling](float(cob_range), center)[0]
    return sampling != "inter_landscape" and low > 0

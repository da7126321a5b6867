"""The options of a teleport: one frozen object, validated once (DESIGN.md §4).

:class:`CofactorOptions` holds what decides the cofactors a teleport draws and how the
graph may change: ``mode`` (:data:`Mode`), ``sampling`` (:data:`Sampling`),
``cob_range`` (``r``), ``center`` (``c``), ``seed``, ``exact``,
``rescale_residual`` and ``rescale_clip``.  Its constructor checks every value and raises
:class:`~graphteleport.errors.InputError` with one line naming the CLI option, which the
CLI prints as it is; everything downstream (:func:`graphteleport.pipeline.teleport_file`,
:class:`graphteleport.passes.TeleportPass`, :func:`graphteleport.cofactors.sample`,
:mod:`graphteleport.torch`) takes the object and checks nothing again.  Keyword
arguments (``TeleportPass(seed=0, mode="insert")``) build one through
:meth:`CofactorOptions.build`.

Each sampling draws τ uniformly from an interval (:func:`interval`); ``inter_landscape``
then gives it a fair-coin sign:

==================  ====================
``intra_landscape``  ``[1 − r, 1 + r]``
``inter_landscape``  ``±[1 − r, 1 + r]``
``positive``         ``[0, r]``
``negative``         ``[−r, 0]``
``centered``         ``[c − r, c + r]``
==================  ====================

A sampling is accepted when ``r ≥ 0`` and ``c`` are finite, the interval has finite ends
and width (numpy cannot draw from a wider one) and is not the single point 0 (τ = 0 is
no rescaling: ``W / τ`` would divide by zero).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, TypedDict, get_args

import numpy as np

from graphteleport.errors import InputError

if TYPE_CHECKING:
    from typing import Unpack

#: absorb: only weights change; insert: ``Mul`` nodes may wrap activations (README, Modes).
Mode = Literal["absorb", "insert"]
MODES: tuple[Mode, ...] = get_args(Mode)

#: How cofactors are drawn (the module docstring's table).
Sampling = Literal["intra_landscape", "inter_landscape", "positive", "negative", "centered"]
SAMPLINGS: tuple[Sampling, ...] = get_args(Sampling)

#: The most elements an input shape may have (a float32 input of this size is 8 GiB).
MAX_INPUT_ELEMENTS = 2**31


def interval(sampling: str, cob_range: float, center: float = 1.0) -> tuple[float, float]:
    """``[low, high]``, the interval ``sampling`` draws ``|τ|`` (inter_landscape) or τ from."""
    r, c = float(cob_range), float(center)
    if sampling in ("intra_landscape", "inter_landscape"):
        return 1 - r, 1 + r
    if sampling == "positive":
        return 0.0, r
    if sampling == "negative":
        return -r, 0.0
    if sampling == "centered":
        return c - r, c + r
    raise InputError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")


def check_mode(mode: object) -> Mode:
    """``mode`` as a :data:`Mode`, or InputError naming the choices."""
    for known in MODES:
        if mode == known:
            return known
    raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def check_input_shapes(shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise InputError unless every shape is a tuple of non-negative integers whose
    product is at most :data:`MAX_INPUT_ELEMENTS` (larger inputs cannot be drawn or run)."""
    for name, shape in shapes.items():
        dims = list(shape)
        if any(isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0 for d in dims):
            raise InputError(f"input shape {name}: sizes must be non-negative integers, got {dims}")
        elements = math.prod(int(d) for d in dims)
        if elements > MAX_INPUT_ELEMENTS:
            raise InputError(
                f"input shape {name}={','.join(map(str, dims))} has {elements:.3g} elements, "
                f"over the limit of 2**31 per input; choose smaller sizes"
            )


class OptionFields(TypedDict, total=False):
    """The fields of :class:`CofactorOptions` as keyword arguments (all optional)."""

    mode: Mode
    sampling: Sampling
    cob_range: float
    center: float
    seed: int | None
    exact: bool
    rescale_residual: bool
    rescale_clip: bool


@dataclasses.dataclass(frozen=True)
class CofactorOptions:
    """How a teleport draws its cofactors and may change the graph (validated on creation).

    Attributes:
        mode: ``"absorb"`` (weights only) or ``"insert"`` (also ``Mul`` nodes).
        sampling: the interval τ is drawn from (module docstring), ``r = cob_range``,
            ``c = center``.
        seed: numpy's seed (None: fresh entropy); a non-negative integer.
        exact: round every τ to a power of two (bit-identical outputs).
        rescale_residual: insert mode: a residual Add may rescale one branch.
        rescale_clip: rewrite Clips with constant bounds (ReLU6) as ``Min(Relu(x), 6)``
            first, so their neurons take τ > 0 with the bounds absorbing τ
            (:mod:`graphteleport.clips`; ONNX models only).
    """

    mode: Mode = "absorb"
    sampling: Sampling = "intra_landscape"
    cob_range: float = 0.5
    center: float = 1.0
    seed: int | None = None
    exact: bool = False
    rescale_residual: bool = False
    rescale_clip: bool = False

    def __post_init__(self) -> None:
        """Raise InputError (one line, naming the option) for a value that cannot work."""
        check_mode(self.mode)
        _check_sampling(self.sampling, self.cob_range, self.center)
        _check_seed(self.seed)

    @classmethod
    def build(
        cls, options: CofactorOptions | None = None, **fields: Unpack[OptionFields]
    ) -> CofactorOptions:
        """``options`` with ``fields`` replaced (checked again), or new options from
        ``fields``: how keyword arguments such as ``TeleportPass(seed=0)`` become options."""
        if options is None:
            return cls(**fields)
        return dataclasses.replace(options, **fields) if fields else options

    @property
    def interval(self) -> tuple[float, float]:
        """``[low, high]`` of the sampling (:func:`interval`)."""
        return interval(self.sampling, self.cob_range, self.center)


def _check_sampling(sampling: str, cob_range: float, center: float) -> None:
    """Raise InputError unless the sampling can draw non-zero cofactors (module docstring)."""
    if sampling not in SAMPLINGS:
        raise InputError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    r, c = _finite(cob_range, "--cob-range"), _finite(center, "--center")
    if r < 0:
        raise InputError(f"--cob-range must be >= 0, got {cob_range}")
    low, high = interval(sampling, r, c)
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


def _check_seed(seed: object) -> None:
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

"""float16 / bfloat16 ↔ float32 conversions into caller-given buffers, for the rewrite's
products of half-precision weights (:func:`graphteleport.rewrite._product_rows`).

Two backends give the same bits (both round to nearest, ties to even; widening is exact):

* ``numpy`` — ``np.copyto``; always available, but numpy converts float16 element by
  element (here about 1.0 ns an element to float32 and 1.7 ns back) and bfloat16 through
  ml_dtypes' scalar loops;
* ``torch`` — ``Tensor.copy_`` on zero-copy views of the same memory (a bfloat16 array is
  viewed as uint16, then as ``torch.bfloat16``): vectorised, about 0.14 ns an element each
  way.  torch is an optional extra, used only where the process has already imported it
  (:func:`chosen`: the torch API, a user's training script).  graphteleport never imports
  it for this: the import costs ~1.4 s and its libraries ~0.2-0.4 GB of resident memory,
  which put the verified 7B-shaped run over its 2 GB budget (2.29 GB with torch, 1.92 GB
  without; the rewrite took 57 s with torch, 75 s and then 56 s in two runs without, on
  13.5 GB of fp16: the machine's noise is as large as torch's gain there).

A conversion runs in pieces of at most :data:`PIECE` elements: below torch's parallel
grain (32768) each ``copy_`` runs on the calling thread, so the rewrite's own row-range
workers (:mod:`graphteleport.parallel`) are not oversubscribed by torch's intra-op pool.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

log = logging.getLogger(__name__)

#: Elements per conversion call (torch's ``GRAIN_SIZE``: a ``copy_`` of this many runs serially).
PIECE = 1 << 15
HALVES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
Cast = Callable[[np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class Casts:
    """A backend: ``copy(src, dst)`` writes ``src`` converted to ``dst``'s dtype into
    ``dst`` (both flat, C-contiguous, the same size; one of them float32, the other
    float16 or bfloat16)."""

    name: str
    copy: Cast


def _numpy_copy(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[:] = src`` by numpy (round to nearest even)."""
    np.copyto(dst, src, casting="same_kind")


def numpy_casts() -> Casts:
    """The numpy backend."""
    return Casts("numpy", _numpy_copy)


def torch_casts() -> Casts | None:
    """The torch backend, or None where torch is not importable."""
    try:
        import torch
    except ImportError:
        return None
    kinds = {
        np.dtype(np.float32): (np.float32, torch.float32),
        np.dtype(np.float16): (np.float16, torch.float16),
        np.dtype(ml_dtypes.bfloat16): (np.uint16, torch.bfloat16),
    }

    def view(a: np.ndarray) -> torch.Tensor:
        raw, kind = kinds[a.dtype]
        return torch.from_numpy(a.view(raw)).view(kind)

    def copy(src: np.ndarray, dst: np.ndarray) -> None:
        for i in range(0, src.size, PIECE):
            view(dst[i : i + PIECE]).copy_(view(src[i : i + PIECE]))

    ro = np.zeros(1, dtype=np.float16)
    ro.flags.writeable = False
    with warnings.catch_warnings():  # (torch warns once per process of a read-only array;
        warnings.simplefilter("ignore")  # the source weights are read-only maps, never written)
        torch.from_numpy(ro)
    return Casts("torch", copy)


_CHOSEN: list[Casts] = []


def chosen() -> Casts:
    """The backend of this process, chosen on first call: torch where the process has
    imported it already, else numpy (logged at debug level)."""
    if not _CHOSEN:
        loaded = sys.modules.get("torch") is not None
        _CHOSEN.append((torch_casts() if loaded else None) or numpy_casts())
        log.debug("float16/bfloat16 conversions by %s", _CHOSEN[0].name)
    return _CHOSEN[0]


def use(casts: Casts | None) -> None:
    """Make ``casts`` this process's backend (None: choose again on the next
    :func:`chosen`)."""
    _CHOSEN.clear()
    if casts is not None:
        _CHOSEN.append(casts)

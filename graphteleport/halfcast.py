"""float16 / bfloat16 ↔ float32 conversions into caller-given buffers, for the rewrite's
products of half-precision weights (:func:`graphteleport.rewrite._product_rows`).

Three backends give the same bits (all round to nearest, ties to even; widening is exact):

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
  13.5 GB of fp16: the machine's noise is as large as torch's gain there);
* ``onnxruntime`` — float16 only: a one-node ``Cast`` session (one intra-op thread, no
  graph optimisation) run on the caller's buffers through an ``IOBinding`` (no copy, no
  allocation), :data:`ORT_PIECE` elements a run; MLAS's vectorised conversions, about
  0.09 ns an element each way at 2^20 elements a run, 0.4 ns at 2^15 (the run's fixed
  cost).  onnxruntime is a dependency, so this is the default where torch is not loaded.
  Before it is used, it converts every float16 pattern and a set of float32 values
  (ties, subnormal results, the overflow boundary, ±0, ±inf) and is dropped for numpy if
  any bit differs from numpy's; a piece holding a NaN is converted again by numpy (NaN
  payloads: onnxruntime's conversions may quiet them, numpy's keep them).  bfloat16
  goes through numpy's (ml_dtypes').

A conversion runs in pieces of at most :data:`PIECE` elements: below torch's parallel
grain (32768) each ``copy_`` runs on the calling thread, so the rewrite's own row-range
workers (:mod:`graphteleport.parallel`) are not oversubscribed by torch's intra-op pool.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from graphteleport.interrupts import import_held

log = logging.getLogger(__name__)

#: Elements per conversion call (torch's ``GRAIN_SIZE``: a ``copy_`` of this many runs serially).
PIECE = 1 << 15
#: Elements per onnxruntime run (its fixed cost, ~8 µs, spread over them).
ORT_PIECE = 1 << 20
HALVES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
Cast = Callable[[np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class Casts:
    """A backend: ``copy(src, dst)`` writes ``src`` converted to ``dst``'s dtype into
    ``dst`` (both flat, C-contiguous, the same size; one of them float32, the other
    float16 or bfloat16)."""

    name: str
    copy: Cast

    def copy_finite(self, src: np.ndarray, dst: np.ndarray) -> None:
        """:attr:`copy` of a ``src`` known to hold no NaN (a finite weight widened, or
        its product with a finite ``S``: finite or ±inf), skipping the backend's NaN
        check where it has one (onnxruntime's)."""
        fast = getattr(self.copy, "finite", None)
        (fast if fast is not None else self.copy)(src, dst)


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


def ort_casts() -> Casts | None:
    """The onnxruntime backend (float16; bfloat16 by numpy), or None where onnxruntime
    is not importable or its conversions differ from numpy's on :func:`_probe`."""
    try:
        import_held("onnxruntime")  # (a signal mid-import: handled after it)
        import onnxruntime
    except ImportError:  # pragma: no cover - a dependency
        return None
    casts = Casts("onnxruntime", _OrtCopy(onnxruntime))
    if not _agrees(casts):
        log.debug("onnxruntime's float16 conversions differ from numpy's: not used")
        return None
    return casts


_F16, _F32 = np.dtype(np.float16), np.dtype(np.float32)


class _OrtCopy:
    """:attr:`Casts.copy` by onnxruntime ``Cast`` sessions (made on first use, one per
    direction, shared by the threads: ``run_with_iobinding`` is thread-safe)."""

    def __init__(self, ort: Any) -> None:
        self.ort = ort
        self.sessions: dict[tuple[np.dtype, np.dtype], Any] = {}
        self.lock = threading.Lock()

    def __call__(self, src: np.ndarray, dst: np.ndarray) -> None:
        self._run(src, dst, True)

    def finite(self, src: np.ndarray, dst: np.ndarray) -> None:
        """:meth:`__call__` of a ``src`` without NaN: no check for NaN payloads."""
        self._run(src, dst, False)

    def _run(self, src: np.ndarray, dst: np.ndarray, nan_check: bool) -> None:
        if (src.dtype, dst.dtype) not in ((_F16, _F32), (_F32, _F16)):
            _numpy_copy(src, dst)
            return
        session = self._session(src.dtype, dst.dtype)
        for i in range(0, src.size, ORT_PIECE):
            a, b = src[i : i + ORT_PIECE], dst[i : i + ORT_PIECE]
            binding = session.io_binding()
            binding.bind_input("x", "cpu", 0, a.dtype, a.shape, a.ctypes.data)
            binding.bind_output("y", "cpu", 0, b.dtype, b.shape, b.ctypes.data)
            session.run_with_iobinding(binding)
            if nan_check and np.isnan(np.max(a if a.dtype == _F32 else b)):  # (NaN propagates)
                _numpy_copy(a, b)  # numpy's NaN payloads

    def _session(self, src: np.dtype, dst: np.dtype) -> Any:
        key = (src, dst)
        with self.lock:
            if key not in self.sessions:
                self.sessions[key] = _cast_session(self.ort, src, dst)
            return self.sessions[key]


def _cast_session(ort: Any, src: np.dtype, dst: np.dtype) -> Any:
    """A session running ``y = Cast(x)`` from ``src`` to ``dst`` (1-D) on one thread."""
    from onnx import TensorProto, helper

    kinds = {_F16: TensorProto.FLOAT16, _F32: TensorProto.FLOAT}
    x = helper.make_tensor_value_info("x", kinds[src], ["n"])
    y = helper.make_tensor_value_info("y", kinds[dst], ["n"])
    node = helper.make_node("Cast", ["x"], ["y"], to=kinds[dst])
    graph = helper.make_graph([node], "cast", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _probe() -> tuple[np.ndarray, np.ndarray]:
    """Values both directions must convert as numpy does: every float16 pattern but NaNs,
    and float32 values around every float16 exponent — each float16 value, the ties
    halfway between neighbours and their float32 neighbours (rounding up, down, to
    even), subnormal and zero results, the overflow boundary (65520), ±inf — with both
    signs."""
    half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    half = half[~np.isnan(half)]
    wide = half.astype(np.float32)
    finite = np.sort(wide[np.isfinite(wide) & (wide >= 0)])
    ties = (finite[:-1].astype(np.float64) + finite[1:]) / 2  # (exact in float32)
    ties32 = ties.astype(np.float32)
    near = [np.nextafter(ties32, np.float32(np.inf)), np.nextafter(ties32, np.float32(0))]
    edge = np.array([65504, 65519.99, 65520, 65536, 1e6, 2.0**-25, 2.0**-26, 1e-30, 0, np.inf])
    pos = np.concatenate([wide, ties32, *near, edge.astype(np.float32)])
    return half, np.concatenate([pos, -pos]).astype(np.float32)


def _agrees(casts: Casts) -> bool:
    """Whether ``casts`` converts :func:`_probe`'s values to numpy's bits, both ways."""
    half, single = _probe()
    got, want = np.empty(half.size, _F32), half.astype(_F32)
    casts.copy(half, got)
    with np.errstate(over="ignore"):
        narrow_want = single.astype(_F16)
    narrow_got = np.empty(single.size, _F16)
    casts.copy(single, narrow_got)
    return bool(
        np.array_equal(got.view(np.uint32), want.view(np.uint32))
        and np.array_equal(narrow_got.view(np.uint16), narrow_want.view(np.uint16))
    )


_CHOSEN: list[Casts] = []


def chosen() -> Casts:
    """The backend of this process, chosen on first call: torch where the process has
    imported it already, else onnxruntime's where it agrees with numpy, else numpy
    (logged at debug level)."""
    if not _CHOSEN:
        loaded = sys.modules.get("torch") is not None
        _CHOSEN.append((torch_casts() if loaded else None) or ort_casts() or numpy_casts())
        log.debug("float16/bfloat16 conversions by %s", _CHOSEN[0].name)
    return _CHOSEN[0]


def use(casts: Casts | None) -> None:
    """Make ``casts`` this process's backend (None: choose again on the next
    :func:`chosen`)."""
    _CHOSEN.clear()
    if casts is not None:
        _CHOSEN.append(casts)

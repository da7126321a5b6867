"""Both cores on one large weight: its rows cut into ranges worked on by a small shared
thread pool (numpy releases the GIL inside its loops, so the threads run at once).

:func:`row_parts` cuts ``n`` rows into one range per worker (a small weight is one range:
threads would cost more than they save); :func:`map_parts` runs a function on each range
and returns the results in order.  The pool has :func:`workers` threads — the CPUs this
process may use, at most :data:`MAX_WORKERS` — and is made on first use.

:func:`each` runs a function on every item of a list, both workers taking the largest
item left until none is (many small tensors or blocks, none cut).

:func:`one_blas_thread` runs a block with the BLAS library's own threads limited to one
(the orbit solve's matrix-vector products: they are memory-bound, and OpenBLAS's threads
spin for cores other processes hold).
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

MAX_WORKERS = 2
#: Elements below which a weight is worked on as one range.
PARALLEL_ELEMENTS = 1 << 20
_POOL: list[ThreadPoolExecutor] = []


def workers() -> int:
    """Threads a large weight is cut over: the CPUs this process may use, at most
    :data:`MAX_WORKERS`."""
    affinity = getattr(os, "sched_getaffinity", None)  # (Linux; elsewhere every CPU)
    cpus = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cpus))


def row_parts(n_rows: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges covering ``n_rows`` rows of a tensor of ``size``
    elements: one per worker when it is large, else one."""
    k = workers() if size >= PARALLEL_ELEMENTS else 1
    k = max(1, min(k, n_rows))
    cuts = [n_rows * q // k for q in range(k + 1)]
    return list(itertools.pairwise(cuts))


def shares(sizes: Sequence[int], total: int) -> list[list[int]]:
    """The indices of ``sizes`` cut into one share per worker thread
    (:func:`workers`; one share when ``total`` is under
    :data:`PARALLEL_ELEMENTS`) of about equal sums: largest
    first, each to the lightest share so far; empty shares left out.

    Every CPU this process may use, whatever the load: the shares are plain numpy work
    (no thread spins waiting for a core, as OpenBLAS's do), so a share that finds its
    core busy waits its turn, and the CPU time is about the same either way.  Measured
    on ResNet-50 on a 2-CPU machine that other processes kept at load 5–6 (interleaved
    in one process, 9 rounds each, two runs): canonicalize 476 → 386 and 600 → 569 ms
    wall (CPU 292 → 292, 392 → 364 ms), cle 607 → 581 and 844 → 851 ms (CPU 433 → 448,
    511 → 533 ms), against a second share only when the 1-minute load average left a
    CPU spare (before; that average also counted this process's own recent threads)."""
    k = workers() if total >= PARALLEL_ELEMENTS else 1
    out: list[list[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = loads.index(min(loads))
        out[j].append(i)
        loads[j] += sizes[i]
    return [share for share in out if share]


def map_parts(fn: Callable[..., T], args: Sequence[tuple[Any, ...]]) -> list[T]:
    """``[fn(*a) for a in args]``: when there is more than one, the first on the calling
    thread while the shared pool works on the others (one thread handed work, not all:
    the caller would only wait), every one finished before it returns or raises."""
    if len(args) <= 1:
        return [fn(*a) for a in args]
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="gt-rows"))
    rest = [_POOL[0].submit(fn, *a) for a in args[1:]]
    try:
        first = fn(*args[0])
    finally:
        wait(rest)
    return [first, *(f.result() for f in rest)]


def each(fn: Callable[[int], object], sizes: Sequence[int]) -> None:
    """``fn(i)`` for every index ``i`` of ``sizes`` (the items' work, about), on the
    workers when the total is large (as :func:`shares`): each thread takes the largest
    item not yet taken, until none is left, so a thread that gets its core late, or
    items that take longer than their size says, leave the other thread the rest rather
    than keeping it waiting; the items must write disjoint outputs (the results are then
    the same whichever thread takes an item).  A failing item stops the handing out; the
    first exception is raised once both threads are done."""
    k = workers() if sum(sizes) >= PARALLEL_ELEMENTS else 1
    if k == 1 or len(sizes) <= 1:
        for i in range(len(sizes)):
            fn(i)
        return
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    lock = threading.Lock()
    left = iter(order)
    failed: list[bool] = []

    def take() -> None:
        while not failed:
            with lock:
                i = next(left, None)
            if i is None:
                return
            try:
                fn(i)
            except BaseException:
                failed.append(True)
                raise

    map_parts(take, [()] * min(k, len(sizes)))


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Within the block, the BLAS libraries numpy loaded (OpenBLAS, MKL, …) use one thread
    per call (``threadpoolctl``; restored after).  The orbit solve's products are gemv —
    memory-bound, and cut over :func:`workers` threads already — which OpenBLAS would
    otherwise run on its own threads: on a machine whose cores other processes hold,
    those spin for cores they do not get.  ResNet-50's cle on 2 CPUs at load 3.3, in one
    run each: 1.409 s wall with OpenBLAS's default threads, 0.523 s with
    ``OPENBLAS_NUM_THREADS=1`` (the rank-one start 840 → 33 ms CPU, Newton 473 → 111).
    Without ``threadpoolctl`` the block runs as it is."""
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's controller, made once (None: threadpoolctl is not there)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # (a dependency; an environment without it runs unlimited)
        return None
    return ThreadpoolController()

"""Both cores on one large weight: its rows cut into ranges worked on by a small shared
thread pool (numpy releases the GIL inside its loops, so the threads run at once).

:func:`row_parts` cuts ``n`` rows into one range per worker (a small weight is one range:
threads would cost more than they save); :func:`map_parts` runs a function on each range
and returns the results in order.  The pool has :func:`workers` threads — the CPUs this
process may use, at most :data:`MAX_WORKERS` — and is made on first use.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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


def spare_workers() -> int:
    """The threads worth starting now: :func:`workers`, less the
    CPUs other processes keep busy — the 1-minute load average, of which this process
    is about 1 — rounded, at least 1.  (The work is memory-bound: a second thread on a
    core another process holds gains nothing and costs CPU — ResNet-50's kernel copies
    23 → 38–56 ms at load 3.9 on 2 CPUs.)"""
    cpus = workers()
    if cpus < 2 or not hasattr(os, "getloadavg"):
        return cpus
    busy = max(os.getloadavg()[0] - 1.0, 0.0)
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def shares(sizes: Sequence[int], total: int) -> list[list[int]]:
    """The indices of ``sizes`` cut into one share per worker thread
    (:func:`spare_workers`; one share when ``total`` is under
    :data:`PARALLEL_ELEMENTS`) of about equal sums: largest
    first, each to the lightest share so far; empty shares left out."""
    k = spare_workers() if total >= PARALLEL_ELEMENTS else 1
    out: list[list[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = loads.index(min(loads))
        out[j].append(i)
        loads[j] += sizes[i]
    return [share for share in out if share]


def map_parts(fn: Callable[..., T], args: Sequence[tuple[Any, ...]]) -> list[T]:
    """``[fn(*a) for a in args]``, on the shared pool when there is more than one."""
    if len(args) <= 1:
        return [fn(*a) for a in args]
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="gt-rows"))
    return list(_POOL[0].map(lambda a: fn(*a), args))

#!/usr/bin/env python
"""Where canonicalize's two threads lose: per phase the wall clock, each thread's CPU, the
system time, the minor page faults and the waits of :func:`graphteleport.parallel.map_parts`
(the main thread's own item, its wait for the pool's, the calls), with 1 and 2 workers
interleaved in one process.

Usage::

    python bench/profile_threads.py -n 9
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import graphteleport.orbit as orbit  # noqa: E402
import graphteleport.orbit_kernel as orbit_kernel  # noqa: E402
import graphteleport.passes.canonical as canonical  # noqa: E402
import graphteleport.rewrite as rewrite  # noqa: E402
from graphteleport import parallel  # noqa: E402
from graphteleport.analysis import analyze_model  # noqa: E402
from graphteleport.passes.teleport import apply_values  # noqa: E402

WAITS: dict[str, float] = defaultdict(float)
ORIGINAL_MAP_PARTS = parallel.map_parts


def timed_map_parts(fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
    """:func:`parallel.map_parts` with the caller's own share and its wait recorded."""
    if len(args) <= 1:
        return ORIGINAL_MAP_PARTS(fn, args)
    WAITS["calls"] += 1
    if not parallel._POOL:
        parallel._POOL.append(
            parallel.ThreadPoolExecutor(
                max_workers=parallel.workers(), thread_name_prefix="gt-rows"
            )
        )
    t0 = time.perf_counter()
    rest = [parallel._POOL[0].submit(fn, *a) for a in args[1:]]
    t1 = time.perf_counter()
    try:
        first = fn(*args[0])
    finally:
        t2 = time.perf_counter()
        wait(rest)
        t3 = time.perf_counter()
    WAITS["submit"] += t1 - t0
    WAITS["own"] += t2 - t1
    WAITS["join"] += t3 - t2
    return [first, *(f.result() for f in rest)]


parallel.map_parts = timed_map_parts
rewrite.map_parts = timed_map_parts


def thread_faults(t: threading.Thread) -> float:
    """Minor faults of one thread (/proc/self/task/TID/stat, field 10)."""
    try:
        with open(f"/proc/self/task/{t.native_id}/stat") as f:
            return float(f.read().rsplit(")", 1)[1].split()[7])
    except OSError:
        return 0.0


def thread_switches(t: threading.Thread) -> float:
    """Voluntary context switches of one thread (/proc/self/task/TID/status)."""
    try:
        with open(f"/proc/self/task/{t.native_id}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def thread_clocks() -> dict[str, float]:
    """CPU seconds of the main thread and of each pool thread, and their minor faults."""
    out = {}
    for t in threading.enumerate():
        if t is threading.main_thread() or t.name.startswith("gt-rows"):
            assert t.ident is not None
            try:
                clock = time.pthread_getcpuclockid(t.ident)
                name = "main" if t is threading.main_thread() else "pool"
                out[name] = time.clock_gettime(clock)
                out[name + "flt"] = thread_faults(t)
                out[name + "cs"] = thread_switches(t)
            except OSError:
                pass
    return out


class Probe:
    """Per phase: wall, each thread's CPU, user/system time, minor faults, map_parts waits."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, dict[str, float]]] = []

    def start(self) -> None:
        self.rounds.append({})

    def run(self, name: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        WAITS.clear()
        r0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF), thread_clocks(), time.perf_counter()
        out = call(*args, **kwargs)
        w1, c1, r1 = time.perf_counter(), thread_clocks(), resource.getrusage(resource.RUSAGE_SELF)
        rec = {
            "wall": w1 - w0,
            "user": r1.ru_utime - r0.ru_utime,
            "sys": r1.ru_stime - r0.ru_stime,
            "flt": float(r1.ru_minflt - r0.ru_minflt),
            "main": c1.get("main", 0.0) - c0.get("main", 0.0),
            "pool": c1.get("pool", 0.0) - c0.get("pool", c1.get("pool", 0.0)),
            "mflt": c1.get("mainflt", 0.0) - c0.get("mainflt", 0.0),
            "pflt": c1.get("poolflt", 0.0) - c0.get("poolflt", c1.get("poolflt", 0.0)),
            "mcs": c1.get("maincs", 0.0) - c0.get("maincs", 0.0),
            "pcs": c1.get("poolcs", 0.0) - c0.get("poolcs", c1.get("poolcs", 0.0)),
            **WAITS,
        }
        self.rounds[-1][name] = rec
        return out

    def table(self) -> str:
        names = list(self.rounds[-1])
        keys = [
            "wall",
            "user",
            "sys",
            "flt",
            "mflt",
            "pflt",
            "mcs",
            "pcs",
            "main",
            "pool",
            "own",
            "join",
            "calls",
        ]
        lines = [f"{'phase':16}" + "".join(f"{k:>8}" for k in keys)]
        tot = dict.fromkeys(keys, 0.0)
        for n in names:
            med = {k: statistics.median(r[n].get(k, 0.0) for r in self.rounds) for k in keys}
            for k in keys:
                tot[k] += med[k]
            lines.append(f"{n:16}" + "".join(fmt(k, med[k]) for k in keys))
        lines.append(f"{'sum':16}" + "".join(fmt(k, tot[k]) for k in keys))
        return "\n".join(lines)


def fmt(k: str, v: float) -> str:
    if k in ("flt", "mflt", "pflt", "mcs", "pcs", "calls"):
        return f"{v:8.0f}"
    return f"{1000 * v:8.1f}"


def one(probe: Probe, path: Path) -> None:
    model = ir.serde.deserialize_model(onnx.load(path))
    probe.start()
    analysis = probe.run("analyze", analyze_model, model, {})
    arrays = probe.run("read", orbit.stored_arrays, analysis, True)
    terms = probe.run("Q", orbit.OrbitTerms.build, analysis, arrays=arrays, single=True)
    with parallel.one_blas_thread():
        kernel = probe.run("kernel", orbit_kernel.OrbitKernel.of, terms)
        u = np.zeros(kernel.num_pairs)
        at = probe.run("point0", kernel.point, u)
        active = at.diagonal > 0
        group = functools.partial(np.where, active, kernel.group, -1)
        at, _ = probe.run("start", canonical._rank_one_start, kernel, at, active, group, 1)
        m = probe.run(
            "newton",
            canonical._iterate,
            kernel,
            at,
            active,
            group,
            canonical.TOL,
            canonical.MAX_ITERATIONS,
            canonical.STEP_TOL,
        )
    signs, _ = probe.run("signs", canonical.sign_values, analysis, arrays)
    values = np.exp(m.u) * signs
    probe.run("rewrite", apply_values, model, analysis, values, arrays=arrays, consume=True)
    del model, analysis, arrays, terms


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--arms", nargs="*", default=[])
    args = ap.parse_args()
    from bench_teleport import DEFAULT_CACHE, ensure_resnet50

    path = ensure_resnet50(DEFAULT_CACHE, external_data=False, seed=0)
    arms = [(k, a) for k in args.threads for a in ["", *args.arms]]
    probes = {arm: Probe() for arm in arms}

    def setup(arm: tuple[int, str]) -> None:
        parallel.MAX_WORKERS = arm[0]
        for flag in args.arms:
            mod, name = flag.rsplit(".", 1)
            setattr(sys.modules[mod], name, flag == arm[1])

    for arm in arms:  # warm-up (the pool made)
        setup(arm)
        one(Probe(), path)
    for _ in range(args.n):
        for arm in arms:
            setup(arm)
            one(probes[arm], path)
    for arm in arms:
        print(f"--- {arm[0]} thread(s) {arm[1]}, medians of {args.n} (ms; flt: minor faults)")
        print(probes[arm].table())
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

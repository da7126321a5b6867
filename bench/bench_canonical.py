#!/usr/bin/env python
"""Time canonicalize (no I/O) against ``onnx.load`` of the same model, in one process.

Per round, interleaved so both share the machine's noise: ``onnx.load(model)`` (the
baseline), then :class:`~graphteleport.passes.canonical.CanonicalizePass` on a fresh
in-memory copy of the loaded model (analysis, orbit terms, Newton-CG solve, rewrite; no
file read or written).  Medians and their ratio are printed, with the pass's own phases
(``result.seconds``) and the solver's counts.  The default model is the cached ResNet-50
of ``bench_teleport.py``.

``--solve-p`` also times the solve alone for the given exponents (the p-norm balance
``Σ |W'|^p`` an equalization minimises): ``OrbitTerms.build`` (the statistics ``Q``)
and :func:`~graphteleport.passes.canonical.minimize` (kernel and Newton-CG), each round
after the same ``onnx.load``.  The BLAS thread count matters on a shared machine:
OpenBLAS's threads spin for cores other processes hold, and its gemv slows down many
times over; the line ``blas`` prints ``OPENBLAS_NUM_THREADS`` as the run saw it.

Usage (from the repository root, in the project's venv)::

    python bench/bench_canonical.py               # ResNet-50, 3 rounds
    python bench/bench_canonical.py --model m.onnx -n 5
    OPENBLAS_NUM_THREADS=1 python bench/bench_canonical.py --solve-p 2 4
    OPENBLAS_NUM_THREADS=1 python bench/bench_canonical.py --profile   # CPU per phase
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnx_ir as ir

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from graphteleport import parallel  # noqa: E402
from graphteleport.analysis import analyze_model  # noqa: E402
from graphteleport.orbit import OrbitTerms, stored_arrays  # noqa: E402
from graphteleport.passes.canonical import CanonicalizePass, minimize, sign_values  # noqa: E402
from graphteleport.passes.teleport import apply_values  # noqa: E402


def one_round(path: Path) -> tuple[float, float, dict[str, float], str, float, float]:
    """One ``onnx.load`` and one canonicalize of its result: both times, the pass's
    phases, a line on the solve, and both CPU times (``process_time``: on a shared
    machine the wall clock also counts the time other processes held the cores)."""
    t0, c0 = time.perf_counter(), time.process_time()
    proto = onnx.load(path)
    load, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    model = ir.serde.deserialize_model(proto)
    t1, c1 = time.perf_counter(), time.process_time()
    result = CanonicalizePass()(model)
    canon, canon_cpu = time.perf_counter() - t1, time.process_time() - c1
    m = result.minimum
    solve = (
        f"{m.iterations} Newton / {m.cg_steps} CG steps, F {m.objective_before:.6g} -> "
        f"{m.objective_after:.6g}"
        if m
        else "nothing to solve"
    )
    return load, canon, dict(result.seconds), solve, load_cpu, canon_cpu


def solve_round(path: Path, p: float) -> tuple[float, float, float, str]:
    """One ``onnx.load``, then the solve alone at exponent ``p``: the seconds of
    ``OrbitTerms.build`` and of ``minimize`` (wall), the CPU seconds of both, and a line
    on the solve."""
    model = ir.serde.deserialize_model(onnx.load(path))
    analysis = analyze_model(model, {})
    t0, c0 = time.perf_counter(), time.process_time()
    terms = OrbitTerms.build(analysis, p=p, single=True)
    t1 = time.perf_counter()
    m = minimize(terms)
    t2, c2 = time.perf_counter(), time.process_time()
    line = f"{m.iterations} Newton / {m.cg_steps} CG steps, max|g|/F {m.gradient:.1e}"
    return t1 - t0, t2 - t1, c2 - c0, line


class Phases:
    """CPU seconds (``process_time``) per named phase, over rounds: :meth:`run` times one
    call; :meth:`add` records a figure measured elsewhere; :meth:`line` prints medians."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []

    def start(self) -> None:
        self.rounds.append({})

    def run(self, name: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        c = time.process_time()
        out = call(*args, **kwargs)
        self.add(name, time.process_time() - c)
        return out

    def add(self, name: str, seconds: float) -> None:
        self.rounds[-1][name] = self.rounds[-1].get(name, 0.0) + seconds

    def line(self) -> str:
        names = list(self.rounds[0])
        med = {k: statistics.median(r.get(k, 0.0) for r in self.rounds) for k in names}
        parts = ", ".join(f"{k} {1000 * v:.0f}" for k, v in med.items())
        return (
            f"{parts}; sum {1000 * sum(med.values()):.0f} ms (CPU, medians of {len(self.rounds)})"
        )


def solved(phases: Phases, terms: OrbitTerms) -> np.ndarray:
    """:func:`minimize` of ``terms``, its kernel, rank-one start and Newton steps recorded
    as phases (:attr:`Minimum.cpu`); the pair values ``t = exp(u)``."""
    m = minimize(terms)
    for name, seconds in zip(("kernel", "rank-one start", "newton"), m.cpu, strict=True):
        phases.add(name, seconds)
    return np.asarray(np.exp(m.u))


def profile_canonicalize(path: Path, rounds: int) -> str:
    """Canonicalize's phases, each timed alone in the pass's order on a fresh copy of the
    loaded model: the analysis, reading the tensors, ``Q``, the solve's kernel, rank-one
    start and Newton steps, the sign rule, and the rewrite."""
    phases = Phases()
    for _ in range(rounds):
        model = ir.serde.deserialize_model(onnx.load(path))
        phases.start()
        analysis = phases.run("analyze", analyze_model, model, {})
        arrays = phases.run("read tensors", stored_arrays, analysis, True)  # (consumed)
        terms = phases.run("Q", OrbitTerms.build, analysis, arrays=arrays, single=True)
        values = solved(phases, terms)
        signs, _ = phases.run("signs", sign_values, analysis, arrays)
        phases.run(
            "rewrite", apply_values, model, analysis, values * signs, arrays=arrays, consume=True
        )
        del model, analysis, arrays, terms  # freed before the next round, as after a pass
    return phases.line()


def default_model() -> Path:
    """The ResNet-50 of ``bench_teleport.py``, exported into its cache on first use."""
    from bench_teleport import DEFAULT_CACHE, ensure_resnet50

    return ensure_resnet50(DEFAULT_CACHE, external_data=False, seed=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an ONNX file (default: cached ResNet-50)")
    parser.add_argument("-n", "--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--solve-p", type=float, nargs="*", default=[], help="also time the solve alone at these p"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also time each phase alone (CPU, medians)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="graphteleport.parallel's threads (default: the CPUs, at most 2)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        parallel.MAX_WORKERS = max(1, args.threads)
    path: Path = args.model or default_model()
    loads: list[float] = []
    canons: list[float] = []
    cpus: list[tuple[float, float]] = []
    for _ in range(max(args.rounds, 1)):
        load, canon, phases, solve, load_cpu, canon_cpu = one_round(path)
        loads.append(load)
        canons.append(canon)
        cpus.append((load_cpu, canon_cpu))
    load_s, canon_s = statistics.median(loads), statistics.median(canons)
    load_c = statistics.median(c[0] for c in cpus)
    canon_c = statistics.median(c[1] for c in cpus)
    print(f"model          {path}")
    print(f"onnx.load      {load_s:.3f} s (median of {len(loads)})")
    print(f"canonicalize   {canon_s:.3f} s (no I/O; last round's phases: ", end="")
    print(", ".join(f"{k} {v:.2f} s" for k, v in phases.items()) + ")")
    print(f"solve          {solve}")
    print(f"ratio          {canon_s / load_s:.1f}x onnx.load")
    print(f"cpu            onnx.load {load_c:.3f} s, canonicalize {canon_c:.3f} s: ", end="")
    print(f"{canon_c / load_c:.1f}x (process_time medians)")
    print(f"load average   {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"blas           OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(
        f"threads        {parallel.workers()} (graphteleport.parallel.workers; --threads sets them)"
    )
    if args.profile:
        print(f"phases         {profile_canonicalize(path, max(args.rounds, 1))}")
    for p in args.solve_p:
        rounds = [solve_round(path, p) for _ in range(max(args.rounds, 1))]
        build = statistics.median(r[0] for r in rounds)
        solve = statistics.median(r[1] for r in rounds)
        cpu = statistics.median(r[2] for r in rounds)
        print(f"solve p={p:g}    build {build:.3f} s + minimize {solve:.3f} s ", end="")
        print(f"({(build + solve) / load_s:.1f}x onnx.load; CPU {cpu:.3f} s, ", end="")
        print(f"{cpu / load_c:.1f}x) {rounds[-1][3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

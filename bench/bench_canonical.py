#!/usr/bin/env python
"""Time canonicalize (no I/O) against ``onnx.load`` of the same model, in one process.

Per round, interleaved so both share the machine's noise: ``onnx.load(model)`` (the
baseline), then :class:`~graphteleport.passes.canonical.CanonicalizePass` on a fresh
in-memory copy of the loaded model (analysis, orbit terms, Newton-CG solve, rewrite; no
file read or written).  Medians and their ratio are printed, with the pass's own phases
(``result.seconds``) and the solver's counts.  The default model is the cached ResNet-50
of ``bench_teleport.py``.

Usage (from the repository root, in the project's venv)::

    python bench/bench_canonical.py               # ResNet-50, 3 rounds
    python bench/bench_canonical.py --model m.onnx -n 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import onnx
import onnx_ir as ir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from graphteleport.passes.canonical import CanonicalizePass  # noqa: E402


def one_round(path: Path) -> tuple[float, float, dict[str, float], str]:
    """One ``onnx.load`` and one canonicalize of its result: both times, the pass's
    phases and a line on the solve."""
    t0 = time.perf_counter()
    proto = onnx.load(path)
    load = time.perf_counter() - t0
    model = ir.serde.deserialize_model(proto)
    t1 = time.perf_counter()
    result = CanonicalizePass()(model)
    canon = time.perf_counter() - t1
    m = result.minimum
    solve = (
        f"{m.iterations} Newton / {m.cg_steps} CG steps, F {m.objective_before:.6g} -> "
        f"{m.objective_after:.6g}"
        if m
        else "nothing to solve"
    )
    return load, canon, dict(result.seconds), solve


def default_model() -> Path:
    """The ResNet-50 of ``bench_teleport.py``, exported into its cache on first use."""
    from bench_teleport import DEFAULT_CACHE, ensure_resnet50

    return ensure_resnet50(DEFAULT_CACHE, external_data=False, seed=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an ONNX file (default: cached ResNet-50)")
    parser.add_argument("-n", "--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args(argv)
    path: Path = args.model or default_model()
    loads: list[float] = []
    canons: list[float] = []
    for _ in range(max(args.rounds, 1)):
        load, canon, phases, solve = one_round(path)
        loads.append(load)
        canons.append(canon)
    load_s, canon_s = statistics.median(loads), statistics.median(canons)
    print(f"model          {path}")
    print(f"onnx.load      {load_s:.3f} s (median of {len(loads)})")
    print(f"canonicalize   {canon_s:.3f} s (no I/O; last round's phases: ", end="")
    print(", ".join(f"{k} {v:.2f} s" for k, v in phases.items()) + ")")
    print(f"solve          {solve}")
    print(f"ratio          {canon_s / load_s:.1f}x onnx.load")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Time ``graphteleport.torch.teleport`` on a ResNet-18 ``nn.Module``, tracing excluded, against
a plain loop that multiplies every parameter by a random per-channel vector.

Both are measured in the same process, interleaved round by round (so they share the
machine's noise), with ``gc.collect()`` between measurements; the medians are compared:

* **teleport**: ``graphteleport.torch.teleport(model, x, seed=k)`` with the module's trace
  (``graphteleport.frontends.torch.trace``, run once up front and reused) standing in for the
  call's own tracing.  Tracing is ``torch.onnx.export`` plus what the frontend does with the
  exported graph once: evaluate the constant glue, drop the computed zero bias of a
  bias-free conv, index the declared shapes and types, and measure BatchNorm input
  variances with one forward of the example inputs.  What is timed is everything
  ``teleport`` does after tracing: the symmetry analysis (``graphteleport.torch.analyze``),
  cofactor sampling, the in-place rewrite of parameters and BatchNorm buffers, and the
  result.  Each round is undone (untimed) before the next;
* **plain loop**: ``for p in model.parameters(): p.mul_(v)`` with ``v`` a fresh random
  vector of ``p.shape[0]`` entries broadcast over the other axes — the least any per-channel
  rescaling of the module can cost;
* **analyze**: ``graphteleport.torch.analyze(graph)`` alone, to split the teleport's time
  into analysis and the rest.

The model is the CIFAR ResNet-18 of ``models.architectures`` at full width (64 stem
channels, 11.2 M parameters, BatchNorm statistics re-randomised), input 1x3x32x32.  The
target is a ratio of medians of at most 3; the median of the per-round ratios (each round's
teleport over the same round's plain loop) is printed beside it.  One extra teleport is
profiled with cProfile and its hotspots printed.

Usage (repository root, project venv)::

    python bench/bench_torch.py              # 31 rounds: the figures in the README
    python bench/bench_torch.py -n 11 --width 16 --max-ratio 3

Exit status: 0 done; 1 the teleport changed the module's function; 3 ``--max-ratio``
exceeded.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import graphteleport.torch as gtorch  # noqa: E402
from graphteleport.frontends.torch import trace  # noqa: E402
from models.architectures import build, parameter_count, resnet18  # noqa: E402


def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plain_loop(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Multiply every parameter by a random per-channel (first-axis) vector, in place."""
    with torch.no_grad():
        for p in model.parameters():
            v = torch.rand(p.shape[0], generator=gen, dtype=p.dtype) + 0.5
            p.mul_(v.view(-1, *([1] * (p.dim() - 1))))


def check_function(model: torch.nn.Module, x: torch.Tensor, graph: Any) -> float:
    """One teleport from the cached trace must keep the output (eval mode)."""
    with torch.no_grad():
        before = model(x)
    with mock.patch.object(gtorch, "trace", lambda *_: graph):
        result = gtorch.teleport(model, x, seed=123)
    with torch.no_grad():
        err = ((model(x) - before).abs().max() / before.abs().max()).item()
    result.undo()
    assert result.changed, "the teleport changed nothing"
    return err


def hotspots(fn: Callable[[], Any], top: int = 15) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--repeat", type=int, default=31, help="timed rounds (default 31)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 stem width (default 64)")
    p.add_argument("--max-ratio", type=float, default=None, help="exit 3 above this ratio")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile hotspots")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    warnings.simplefilter("ignore")
    model, shape = build(resnet18, 0, width=args.width)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    graph = trace(model, x)
    t_trace = time.perf_counter() - t0
    err = check_function(model, x, graph)
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {"teleport": [], "plain": [], "analyze": [], "prepared": []}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    free = 0
    with mock.patch.object(gtorch, "trace", lambda *_: graph):
        prepared = gtorch.Teleporter(model, x)  # trace (cached) + analysis, once
        for k in range(args.warmup + args.repeat):
            box: dict[str, Any] = {}
            t_tel = timed(
                lambda k=k, box=box: box.setdefault("r", gtorch.teleport(model, x, seed=k))
            )
            free = box["r"].free_cofactors
            model.load_state_dict(state)  # untimed reset (undo is exact only in exact mode)
            t_plain = timed(lambda: plain_loop(model, gen))
            model.load_state_dict(state)
            t_analyze = timed(lambda: gtorch.analyze(graph, "absorb"))
            t_prep = timed(lambda k=k: prepared.teleport(seed=k))
            model.load_state_dict(state)
            if k >= args.warmup:
                times["teleport"].append(t_tel)
                times["plain"].append(t_plain)
                times["analyze"].append(t_analyze)
                times["prepared"].append(t_prep)
        profile = "" if args.no_profile else hotspots(lambda: gtorch.teleport(model, x, seed=99))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["teleport"] / med["plain"]
    print(f"ResNet-18 (width {args.width}): {parameter_count(model) / 1e6:.1f} M parameters, "
          f"{free} free cofactors; torch {torch.__version__}, {os.cpu_count()} CPUs "
          f"({platform.machine()}), {torch.get_num_threads()} threads")  # fmt: skip
    print(f"trace (once, excluded):  {t_trace * 1e3:8.1f} ms")
    for k in ("teleport", "plain", "analyze", "prepared"):
        samples = ", ".join(f"{t * 1e3:.1f}" for t in times[k])
        print(f"{k + ':':24s} {med[k] * 1e3:8.1f} ms median of {args.repeat} ({samples})")
    print(f"ratio teleport / plain:  {ratio:8.2f}x (target <= 3)")
    paired = sorted(t / p for t, p in zip(times["teleport"], times["plain"]))
    print(f"  per round (same round): median {statistics.median(paired):.2f}x, "
          f"range {paired[0]:.2f}-{paired[-1]:.2f}x")  # fmt: skip
    print(f"ratio prepared / plain:  {med['prepared'] / med['plain']:8.2f}x "
          "(Teleporter.teleport: the analysis done once per module, like the trace)")  # fmt: skip
    rest = med["teleport"] - med["analyze"]
    print(f"of the teleport: analysis {med['analyze'] * 1e3:.1f} ms "
          f"(graphteleport.torch.analyze alone), the rest {rest * 1e3:.1f} ms "
          "(sampling, rewrite, result)")  # fmt: skip
    print(f"function check: max rel output change {err:.1e} (eval mode)")
    if profile:
        print("\nhotspots of one teleport (cProfile, cumulative):\n" + profile)
    if err > 1e-3:
        return 1
    if args.max_ratio is not None and ratio > args.max_ratio:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

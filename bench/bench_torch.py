#!/usr/bin/env python
"""Time ``graphteleport.torch.teleport`` on a ResNet-18 ``nn.Module``: the whole call (trace
included) against one forward pass, and the call without its trace against a plain loop that
multiplies every parameter by a random per-channel vector.

All are measured in the same process, interleaved round by round (so they share the
machine's noise), with ``gc.collect()`` between measurements; the medians are compared:

* **whole**: ``graphteleport.torch.teleport(model, x, seed=k)`` as a user calls it: the
  trace (``graphteleport.frontends.torch.trace``: ``torch.fx.symbolic_trace``, one recorded
  forward of the example input checked against the module's own, the translation to the
  graph form), the symmetry analysis, cofactor sampling, the in-place rewrite and the result.
  The target is a median of at most 0.2 s (the paper's code builds its graph in 0.6 s);
* **forward**: one eval-mode forward of the example input under ``torch.no_grad()`` — what
  the whole call is compared against;
* **trace**: ``trace(model, x)`` alone;
* **teleport**: the same call with the module's trace (run once up front and reused)
  standing in for the call's own tracing: the analysis (``graphteleport.torch.analyze``),
  sampling, the rewrite and the result.  Each round is undone (untimed) before the next;
* **plain loop**: ``for p in model.parameters(): p.mul_(v)`` with ``v`` a fresh random
  vector of ``p.shape[0]`` entries broadcast over the other axes — the least any per-channel
  rescaling of the module can cost; the target is a ratio teleport / plain of at most 3;
* **analyze**: ``graphteleport.torch.analyze(graph)`` alone, to split the teleport's time
  into analysis and the rest; **prepared**: a ``Teleporter``'s ``teleport`` (trace and
  analysis done once).

The exporter's trace (``tracer="export"``, the fallback for modules FX cannot translate) and
the very first whole call of the process (cold caches) are timed once and printed beside.

The model is the CIFAR ResNet-18 of ``models.architectures`` at full width (64 stem
channels, 11.2 M parameters, BatchNorm statistics re-randomised), input 1x3x32x32.  The
median of the per-round ratios (each round's teleport over the same round's plain loop) is
printed beside the ratio of medians.  One extra teleport is profiled with cProfile and its
hotspots printed.

Usage (repository root, project venv)::

    python bench/bench_torch.py              # 31 rounds: the figures in the README
    python bench/bench_torch.py -n 11 --width 16 --max-ratio 3 --max-seconds 0.2

Exit status: 0 done; 1 the teleport changed the module's function; 3 ``--max-ratio`` or
``--max-seconds`` (the whole call's median) exceeded.
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
import graphteleport.torch.tracing as gtracing  # noqa: E402
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
    with mock.patch.object(gtracing, "trace", lambda *_: graph):
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
    p.add_argument("--max-seconds", type=float, default=None,
                   help="exit 3 when the whole call's median is above this")  # fmt: skip
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile hotspots")
    return p.parse_args(argv)


ROWS = ("whole", "forward", "trace", "teleport", "plain", "analyze", "prepared")


def one_round(
    model: torch.nn.Module, x: torch.Tensor, graph: Any, k: int, gen: torch.Generator
) -> dict[str, float]:
    """Every row's time for round ``k``; the module's state is reset (untimed) after each
    teleport (``undo`` is exact only in exact mode)."""
    state = {name: v.clone() for name, v in model.state_dict().items()}
    out = {"whole": timed(lambda: gtorch.teleport(model, x, seed=k))}
    model.load_state_dict(state)
    with torch.no_grad():
        out["forward"] = timed(lambda: model(x))
    out["trace"] = timed(lambda: trace(model, x))
    with mock.patch.object(gtracing, "trace", lambda *_: graph):
        out["teleport"] = timed(lambda: gtorch.teleport(model, x, seed=k))
        model.load_state_dict(state)
        prepared = gtorch.Teleporter(model, x)  # trace (cached) + analysis, untimed
    out["plain"] = timed(lambda: plain_loop(model, gen))
    model.load_state_dict(state)
    out["analyze"] = timed(lambda: gtorch.analyze(graph, "absorb"))
    out["prepared"] = timed(lambda: prepared.teleport(seed=k))
    model.load_state_dict(state)
    return out


def print_report(
    args: argparse.Namespace,
    model: torch.nn.Module,
    once: dict[str, float],
    times: dict[str, list[float]],
    err: float,
) -> dict[str, float]:
    med = {k: statistics.median(v) for k, v in times.items()}
    free = gtorch.analyze(trace(model, torch.randn(1, 3, 32, 32)), "absorb").solution.free.sum()
    print(f"ResNet-18 (width {args.width}): {parameter_count(model) / 1e6:.1f} M parameters, "
          f"{free} free cofactors; torch {torch.__version__}, {os.cpu_count()} CPUs "
          f"({platform.machine()}), {torch.get_num_threads()} threads")  # fmt: skip
    print(f"first whole call (cold): {once['first'] * 1e3:8.1f} ms; exporter's trace "
          f"(tracer='export', once): {once['export'] * 1e3:.1f} ms")  # fmt: skip
    for k in ROWS:
        samples = ", ".join(f"{t * 1e3:.1f}" for t in times[k])
        print(f"{k + ':':24s} {med[k] * 1e3:8.1f} ms median of {args.repeat} ({samples})")
    print(f"whole teleport() call:   {med['whole'] * 1e3:8.1f} ms (target <= 200 ms), "
          f"{med['whole'] / med['forward']:.1f}x one forward")  # fmt: skip
    ratio = med["teleport"] / med["plain"]
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
    return med


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    warnings.simplefilter("ignore")
    model, shape = build(resnet18, 0, width=args.width)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    once = {"first": timed(lambda: gtorch.teleport(model, x, seed=0))}
    model.load_state_dict(state)
    once["export"] = timed(lambda: trace(model, x, tracer="export"))
    graph = trace(model, x)
    err = check_function(model, x, graph)
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {k: [] for k in ROWS}
    for k in range(args.warmup + args.repeat):
        row = one_round(model, x, graph, k, gen)
        for name, t in row.items():
            if k >= args.warmup:
                times[name].append(t)
    med = print_report(args, model, once, times, err)
    if not args.no_profile:
        with mock.patch.object(gtracing, "trace", lambda *_: graph):
            profile = hotspots(lambda: gtorch.teleport(model, x, seed=99))
        print("\nhotspots of one teleport (cProfile, cumulative):\n" + profile)
    if err > 1e-3:
        return 1
    too_slow = args.max_seconds is not None and med["whole"] > args.max_seconds
    if too_slow or (args.max_ratio is not None and med["teleport"] / med["plain"] > args.max_ratio):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""What the proof costs: the CLI's verification on ResNet-50, by its parts.

One teleport of the model is written once; then, interleaved round by round in this
process (so every variant shares the machine's noise), verification is timed as

* **one input, outputs** — what verification was before the per-tensor check: both
  models on one random input, every output compared (the baseline);
* **default** — what ``graphteleport MODEL -o OUT`` runs now: outputs on 8 input draws
  at varied scales, and the per-tensor check node by node (recorded and perturbed);
* **--draws 1** — the per-tensor check with outputs on one draw;
* **--outputs-only** — outputs on 8 draws, no per-tensor check;
* **--draws 1 --outputs-only** — the old check through today's code.

Each is the whole library call the CLI makes (sessions created, runs, comparisons);
the table gives medians and their ratios to the baseline.

Usage (repository root, project venv)::

    python bench/bench_verify.py                  # ResNet-50 (cached export, ~100 MB)
    python bench/bench_verify.py --model m.onnx   # any static-shape model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from graphteleport import verify  # noqa: E402
from graphteleport.frontends import onnx as onnx_frontend  # noqa: E402
from graphteleport.io import load_model  # noqa: E402
from graphteleport.passes.teleport import TeleportPass  # noqa: E402


def variants(src: Path, dst: Path, scales: object) -> dict[str, Callable[[], object]]:
    model = load_model(src)
    specs = onnx_frontend.input_specs(model)
    eight = verify.draw_feed_sets(specs, 8)
    one = eight[:1]
    return {
        "one input, outputs (before)": lambda: verify.verify(src, dst, one[0]),
        "default (8 draws + tensors)": lambda: verify.verify_teleport(src, dst, eight, scales),  # type: ignore[arg-type]
        "--draws 1": lambda: verify.verify_teleport(src, dst, one, scales),  # type: ignore[arg-type]
        "--outputs-only": lambda: verify.verify_teleport(src, dst, eight, None),
        "--draws 1 --outputs-only": lambda: verify.verify_teleport(src, dst, one, None),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="an ONNX model (default: the cached ResNet-50)")
    p.add_argument("-n", "--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if args.model is None:
        from bench_teleport import DEFAULT_CACHE, ensure_resnet50

        args.model = ensure_resnet50(DEFAULT_CACHE, external_data=False, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "t.onnx"
        result = TeleportPass(seed=0)(load_model(args.model))
        ir.save(result.model, dst)
        runs = variants(args.model, dst, result.tensor_scales())
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                t = time.perf_counter()
                outcome = fn()
                times[name].append(time.perf_counter() - t)
                assert getattr(outcome, "passed", False), f"{name}: verification failed"
    base = statistics.median(times["one input, outputs (before)"])
    print(f"model: {args.model} ({args.rounds} rounds, medians)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:30s} {med:7.2f} s   {med / base:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

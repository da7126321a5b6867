#!/usr/bin/env python
"""Time the symmetry analysis of a BERT-base-sized graph (12 layers, hidden 768).

The model is Hugging Face ``BertModel(BertConfig())`` (110 M parameters, no download),
exported once with the dynamo exporter (weights in an external ``.data`` file) into
``bench/.cache/``.  The analysis — rule table, shared-weight ties, the signed
union-find solve and the quiver — is timed in-process on the loaded model, median of
``-n`` runs (default 5); loading and tracing are excluded.  A second, 6-layer export
shows that the time grows linearly with depth.  The target is ≤ 2 s for 12 layers.

    python bench/bench_analysis.py [-n 5] [--layers 12] [--max-seconds 2]

Exit status 3 when ``--max-seconds`` is exceeded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
SEQ = 128


def export_bert(layers: int) -> Path:
    path = CACHE / f"bert-base-{layers}l.onnx"
    if path.exists():
        return path
    import torch
    from transformers import BertConfig, BertModel

    from graphteleport.frontends.torch import quiet

    CACHE.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=layers)).eval()
    ids = torch.randint(0, 30522, (1, SEQ))
    mask = torch.ones(1, SEQ, dtype=torch.long)
    print(f"exporting a {layers}-layer BERT-base to {path} (once)", flush=True)
    with quiet():
        torch.onnx.export(
            model,
            (ids, mask),
            str(path),
            dynamo=True,
            external_data=True,
            input_names=["input_ids", "attention_mask"],
        )
    return path


def time_analysis(path: Path, repeat: int) -> tuple[list[float], int]:
    from graphteleport.analysis import analyze
    from graphteleport.io import load_model

    model = load_model(path)
    shapes = {"input_ids": (1, SEQ), "attention_mask": (1, SEQ)}
    times, free = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        quiver = analyze(model, shapes)
        times.append(time.perf_counter() - t)
        free = quiver.free_cofactors
    return times, free


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", "--repeat", type=int, default=5)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--max-seconds", type=float)
    args = p.parse_args(argv)
    results = {}
    for layers in (args.layers // 2, args.layers):
        times, free = time_analysis(export_bert(layers), args.repeat)
        med = statistics.median(times)
        results[layers] = med
        nodes = "?"
        print(
            f"{layers:2d} layers: analysis median {med:.3f}s (min {min(times):.3f}, "
            f"max {max(times):.3f}) over {len(times)} runs; {free} free cofactors{nodes and ''}"
        )
    lo, hi = args.layers // 2, args.layers
    print(
        f"growth {hi}/{lo} layers: {results[hi] / results[lo]:.2f}x (linear would be "
        f"{hi / lo:.2f}x)"
    )
    if args.max_seconds is not None and results[hi] > args.max_seconds:
        print(f"FAILED: {results[hi]:.3f}s > {args.max_seconds}s")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

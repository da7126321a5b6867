"""How firm a Done-when 2 margin is: the paired bootstrap interval, over the held-back
samples, of the SQNR difference between the ``equalize auto`` row and each row it is
compared with (issue 14).

The harness (``experiments.quantization``; run it first) leaves every row's INT8 model and
the FP32 reference outputs in its cache.  This runs the INT8 models of ``auto``, the
per-channel row and the best peer that kept the FP32 function on the held-back inputs
again, takes each sample's noise ``Σ (r − q)²`` (over every output, the sample's slice of
the batch axis; for a model whose feeds carry a padding mask, MiniLM, at its attended
positions only, as the harness's SQNR counts them: ``quantization.counted``), and
resamples the samples 1000 times (seeded): the difference of the pooled SQNRs
``10·log10(Σ n_other / Σ n_auto)`` per resampling, its 5th and 95th percentiles (a 90 %
interval) and the largest share of either row's noise one sample holds.

Run::

    python -m experiments.quant_interval            # experiments/results/quant_interval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.quantization import (
    FP32_RTOL,
    JSON_OUT,
    PEERS,
    RESULTS,
    ROOT,
    Feeds,
    counted,
    quantize,
    read_results,
    run_batches,
    write_results,
)

OUT = RESULTS / "quant_interval.json"
RESAMPLES = 1000
log = logging.getLogger("experiments.quant_interval")


def sample_noise(
    ref: Sequence[np.ndarray], got: Sequence[np.ndarray], feeds: Feeds | None = None
) -> np.ndarray:
    """Per sample (the batch axis of every output): ``Σ (r − q)²`` in float64, over the
    elements the harness's SQNR counts for *feeds* (:func:`counted`; every element
    without feeds)."""
    n = len(ref[0])
    out = np.zeros(n)
    for r, q, keep in zip(ref, got, counted(feeds, ref), strict=True):
        d2 = (np.asarray(r, np.float64) - np.asarray(q, np.float64)) ** 2
        if keep is not None:
            d2 = np.where(keep, d2, 0.0)
        out += d2.reshape(n, -1).sum(axis=1)
    return out


def interval(mine: np.ndarray, other: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The paired bootstrap of ``10·log10(Σ other / Σ mine)`` (dB that ``mine`` is ahead)."""
    picks = np.random.default_rng(seed).integers(0, mine.size, size=(RESAMPLES, mine.size))
    diff = 10.0 * np.log10(other[picks].sum(axis=1) / mine[picks].sum(axis=1))
    return {
        "difference_db": float(10.0 * np.log10(other.sum() / mine.sum())),
        "low_db": float(np.percentile(diff, 5)),
        "high_db": float(np.percentile(diff, 95)),
        "largest_share_mine": float(mine.max() / mine.sum()),
        "largest_share_other": float(other.max() / other.sum()),
    }


def rivals(entry: dict[str, Any]) -> list[str]:
    """The rows ``auto`` is compared with: per-channel and the best peer that ran and kept
    the FP32 function."""
    rows = {r["variant"]: r for r in entry["rows"] if r["sqnr_db"] is not None}
    peers = [r for k, r in rows.items() if k in PEERS and (r["fp32_rel_err"] or 0) <= FP32_RTOL]
    out = ["int8_pc"]
    if peers:
        out.append(max(peers, key=lambda r: r["sqnr_db"])["variant"])
    return out


def int8_model(task: Any, work: Path, key: str) -> Path:
    """Row ``key``'s INT8 model in the harness's cache, quantized again with the harness's
    settings where the harness reused another row's measurement and wrote none."""
    path = work / f"{key}.int8.onnx"
    if not path.is_file():
        path = work / f"{key}.interval.int8.onnx"
        per_channel = key == "int8_pc"
        quantize(work / f"{key}.fp32.onnx", path, task.calibration, per_channel, task.quantize_ops)
    return path


def run_model(name: str, entry: dict[str, Any], cache: Path) -> dict[str, Any]:
    from experiments.quant_models import tasks

    (task,) = tasks(cache, [name], 32, 128)
    work = cache / name
    with np.load(work / "ref.npz") as z:
        ref = [z[f"out{i}"] for i in range(len(z.files))]
    noise = {}
    for key in ["gt_auto", *rivals(entry)]:
        got = run_batches(int8_model(task, work, key), task.held_back)
        noise[key] = sample_noise(ref, got, task.held_back)
    out = {key: interval(noise["gt_auto"], noise[key]) for key in noise if key != "gt_auto"}
    log.info("%s: %s", name, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("models", nargs="*")
    p.add_argument("--cache", default=str(ROOT / "experiments" / ".cache" / "quantization"))
    args = p.parse_args(argv)
    models = json.loads(JSON_OUT.read_text())["models"]
    results = read_results(OUT)
    for name in args.models or list(models):
        results[name] = run_model(name, models[name], Path(args.cache))
        write_results(OUT, results, default=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

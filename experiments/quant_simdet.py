"""How stable is ``equalize --method auto``'s simulated INT8 score?  The candidates' scores
under imperceptible changes of their cofactors.

Run (after ``python -m experiments.quantization --models MODEL`` has prepared the model and
its calibration feeds)::

    python -m experiments.quant_simdet ocr_cls [--p 3 2] [--draws 10] [--int8-ops all]
    python -m experiments.quant_simdet ocr_cls --candidates [--draws 20]

For each ``cle`` exponent p, the model's cofactors as ``auto`` computes them (Clips split,
the pinned ones joined back, absorb mode, analysed at the first calibration feed's shape)
are multiplied by ``exp(N(0, sigma))`` per pair — sigma 1e-6 is a few float32 ulps — and
:class:`graphteleport.activations.Int8Simulation` scores each draw on the calibration
feeds, as ``auto`` does.  Printed per sigma: the pooled SQNR's range over the draws, the
share of the noise on the feed that carries the most, and the SQNR without that feed.  A
spread wider than the gaps between the candidates means the calibration score cannot rank
them (docs/quantization.md, "How auto chose").  ``--candidates``: instead, every absorb-mode
candidate of ``auto`` (:func:`graphteleport.passes.equalize.auto_candidates`) scored by its
noise averaged over the draws at sigma 1e-6 (a score that takes the expectation over the
rounding lottery), with the range of the draws.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = (0.0, 1e-6, 1e-4, 1e-2)


def main(argv: Sequence[str] | None = None) -> int:
    from graphteleport.activations import Int8Simulation, load_calibration
    from graphteleport.analysis import analyze_model
    from graphteleport.clips import join_clips, split_clips
    from graphteleport.passes.equalize import (
        EqualizeSettings,
        auto_candidates,
        cle_values,
        feed_shapes,
        pinned_clips,
    )

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("model")
    p.add_argument("--p", type=float, nargs="*", default=[3.0, 2.0])
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--int8-ops", default="all", help="as equalize's (the harness: all)")
    p.add_argument("--cache", default=str(ROOT / "experiments" / ".cache" / "quantization"))
    p.add_argument("--candidates", action="store_true", help="dithered means of auto's candidates")
    args = p.parse_args(argv)
    work = Path(args.cache) / args.model
    feeds = load_calibration(work / "calibration.npz")
    model = ir.load(work / "prepared.onnx")
    shapes = feed_shapes(model, {}, feeds)
    clips = split_clips(model)
    analysis = analyze_model(model, shapes, "absorb")
    join_clips(model, clips, pinned_clips(analysis, clips))
    analysis = analyze_model(model, shapes, "absorb")
    ops = None if args.int8_ops == "none" else tuple(args.int8_ops.split(","))
    sim = Int8Simulation.calibrate(model, analysis, feeds, ops)
    rng = np.random.default_rng(0)
    if args.candidates:
        settings = EqualizeSettings("auto", calibration=feeds, int8_ops=ops)
        for name, values, *_ in auto_candidates(model, analysis, settings):
            if values is None:
                continue
            draws = [
                sim.sample_noise(
                    analysis.solution.cofactors(values * np.exp(rng.normal(0, 1e-6, values.shape)))
                )
                for _ in range(args.draws)
            ]
            signal = draws[0][0].sum()
            mean = np.mean([noise for _, noise in draws], axis=0)
            dbs = [10 * np.log10(signal / noise.sum()) for _, noise in draws]
            print(
                f"{name}: mean noise {10 * np.log10(signal / mean.sum()):.2f} dB (draws "
                f"{min(dbs):.2f} .. {max(dbs):.2f}); largest feed's share of the mean "
                f"{mean.max() / mean.sum():.2f}",
                flush=True,
            )
        return 0
    for exponent in args.p:
        values, _ = cle_values(analysis, exponent)
        for sigma in SIGMAS:
            dbs, shares, rests = [], [], []
            for _ in range(args.draws if sigma else 1):
                drawn = values * np.exp(rng.normal(0.0, sigma, values.shape))
                signal, noise = sim.sample_noise(analysis.solution.cofactors(drawn))
                top = int(np.argmax(noise))
                dbs.append(10 * np.log10(signal.sum() / noise.sum()))
                shares.append(noise[top] / noise.sum())
                rests.append(
                    10 * np.log10(np.delete(signal, top).sum() / np.delete(noise, top).sum())
                )
            print(
                f"cle p={exponent:g} sigma {sigma:g} ({len(dbs)} draws): SQNR {min(dbs):.2f} .. "
                f"{max(dbs):.2f} dB (median {np.median(dbs):.2f}); largest feed's share "
                f"{min(shares):.2f} .. {max(shares):.2f}; without it {min(rests):.2f} .. "
                f"{max(rests):.2f} dB",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

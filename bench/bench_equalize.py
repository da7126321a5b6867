#!/usr/bin/env python
"""Time equalize (cle, no I/O) against ``onnx.load`` of the same model, in one process, and
measure the fraction of weight elements it moves (issue 14, Done-when 3 and 5).

Per round, interleaved so both share the machine's noise: ``onnx.load(model)`` (the
baseline), then :class:`~graphteleport.passes.equalize.EqualizePass` on a fresh in-memory
copy of the loaded model (clip split, analysis, the balance's Newton-CG solve, rewrite, the
report's figures; no file read or written).  Medians and their ratio are printed, with the
pass's own phases.  The default model is the cached ResNet-50 of ``bench_teleport.py``.

``--fractions`` instead prints, for ResNet-50 and torchvision's MobileNetV2 (built from
``models.architectures.mobilenetv2``, randomised, exported by dynamo with BN folded, its
ReLU6s as ``Clip(0, 6)``), the fraction of the quantized weights' elements cle moves, in
absorb and insert mode, with the Clips rewritten (the default) and kept (``--keep-clips``).

Usage (from the repository root, in the project's venv)::

    python bench/bench_equalize.py               # ResNet-50, 3 rounds
    python bench/bench_equalize.py --model m.onnx -n 5 --p 4
    python bench/bench_equalize.py --fractions
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

from graphteleport.passes.equalize import DEFAULT_P, EqualizePass, EqualizeResult  # noqa: E402


def equalize(proto: onnx.ModelProto, **kwargs: object) -> tuple[float, EqualizeResult]:
    """One equalize of a fresh in-memory copy of ``proto``: its time and result."""
    model = ir.serde.deserialize_model(proto)
    t = time.perf_counter()
    result = EqualizePass(**kwargs)(model)  # type: ignore[arg-type]
    return time.perf_counter() - t, result


def one_round(path: Path, p: float) -> tuple[float, float, EqualizeResult]:
    """One ``onnx.load`` and one equalize of its result: both times and the result."""
    t0 = time.perf_counter()
    proto = onnx.load(path)
    load = time.perf_counter() - t0
    seconds, result = equalize(proto, p=p)
    return load, seconds, result


def resnet50() -> Path:
    """The ResNet-50 of ``bench_teleport.py``, exported into its cache on first use."""
    from bench_teleport import DEFAULT_CACHE, ensure_resnet50

    return ensure_resnet50(DEFAULT_CACHE, external_data=False, seed=0)


def mobilenetv2() -> Path:
    """torchvision's MobileNetV2 (random weights, BN statistics randomised), exported by
    dynamo with BN folded into the cache of ``bench_teleport.py`` on first use."""
    from bench_teleport import DEFAULT_CACHE

    path = DEFAULT_CACHE / "mobilenetv2-seed0.onnx"
    if not path.exists():
        from models.architectures import build
        from models.architectures import mobilenetv2 as make
        from models.export import export

        DEFAULT_CACHE.mkdir(parents=True, exist_ok=True)
        model, shape = build(make)
        staging = path.with_suffix(".tmp.onnx")
        export(model, shape, staging, exporter="dynamo", fold_bn=True)
        staging.replace(path)
    return path


def fractions(p: float) -> int:
    """Print the fraction of quantized weight elements cle moves on both models."""
    for name, path in (("MobileNetV2", mobilenetv2()), ("ResNet-50", resnet50())):
        proto = onnx.load(path)
        has_clips = any(n.op_type == "Clip" for n in proto.graph.node)
        for mode in ("absorb", "insert"):
            for clips in (True, False) if has_clips else (True,):
                seconds, result = equalize(proto, p=p, mode=mode, rescale_clip=clips)
                f = result.figures
                assert f is not None
                print(
                    f"{name:12} {mode:6} {'clips split' if clips else 'clips kept ':11} "
                    f"moved {f.moved}/{f.elements} = {f.fraction_moved:.4f}  "
                    f"(all stored: {result.stats.elements_changed}/{result.stats.elements_total}"
                    f"; {len(result.clips.clips)} clips split, "
                    f"{result.inserted.nodes_added} nodes added; {seconds:.1f} s)",
                    flush=True,
                )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an ONNX file (default: cached ResNet-50)")
    parser.add_argument("-n", "--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--p", type=float, default=DEFAULT_P, help="the balance's p")
    parser.add_argument("--fractions", action="store_true", help="Done-when 3's fractions")
    args = parser.parse_args(argv)
    if args.fractions:
        return fractions(args.p)
    path: Path = args.model or resnet50()
    loads: list[float] = []
    runs: list[float] = []
    for _ in range(max(args.rounds, 1)):
        load, seconds, result = one_round(path, args.p)
        loads.append(load)
        runs.append(seconds)
    load_s, run_s = statistics.median(loads), statistics.median(runs)
    f, m = result.figures, result.minimum
    assert f is not None
    print(f"model          {path}")
    print(f"onnx.load      {load_s:.3f} s (median of {len(loads)})")
    print(f"equalize cle   {run_s:.3f} s (no I/O; p={args.p:g}; last round's phases: ", end="")
    print(", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items()) + ")")
    if m is not None:
        print(f"solve          {m.iterations} Newton / {m.cg_steps} CG steps")
    print(
        f"moved          {f.moved}/{f.elements} quantized weight elements ({f.fraction_moved:.4f})"
    )
    print(f"ratio          {run_s / load_s:.1f}x onnx.load")
    return 0


if __name__ == "__main__":
    sys.exit(main())

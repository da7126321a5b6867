#!/usr/bin/env python
"""Time compare (no I/O) against ``onnx.load`` of the same model, in one process.

A random teleport of the model (``TeleportPass``, seed 0) is made once in memory.  Per
round, interleaved so all share the machine's noise: ``onnx.load(model)`` (the baseline),
then :func:`~graphteleport.compare.compare_models` of the loaded model against the
teleport with the fit's normal products by the orbit kernel (``products="kernel"``, the
default: gemv per conv/Gemm weight, two-level preconditioner) and row by row
(``products="rows"``: Jacobi, the solver before the kernel).  Medians of wall and CPU
time (``process_time``) and their ratios to ``onnx.load`` are printed, with each
solver's verdict, CG iterations, phases, and the largest relative difference between the
recovered cofactors and the drawn ones.  The default model is the cached ResNet-50 of
``bench_teleport.py``.

Usage (from the repository root, in the project's venv)::

    OPENBLAS_NUM_THREADS=1 python bench/bench_compare.py          # ResNet-50, 3 rounds
    python bench/bench_compare.py --model m.onnx -n 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from graphteleport.compare import PRODUCTS, Comparison, compare_models  # noqa: E402
from graphteleport.passes.teleport import TeleportPass  # noqa: E402


def default_model() -> Path:
    """The ResNet-50 of ``bench_teleport.py``, exported into its cache on first use."""
    from bench_teleport import DEFAULT_CACHE, ensure_resnet50

    return ensure_resnet50(DEFAULT_CACHE, external_data=False, seed=0)


def timed(f: object, *args: object, **kwargs: object) -> tuple[object, float, float]:
    """``f(*args, **kwargs)``, its wall and CPU seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = f(*args, **kwargs)  # type: ignore[operator]
    return out, time.perf_counter() - t0, time.process_time() - c0


def describe(c: Comparison, drawn: np.ndarray, free: np.ndarray) -> str:
    """A line on one comparison: verdict, residual, iterations, phases, cofactor error."""
    rel = float(np.max(np.abs(c.pair_values[free] / drawn[free] - 1.0), initial=0.0))
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in c.seconds.items())
    return (
        f"{c.verdict}, max residual {c.max_residual:.2e}, {c.iterations} CG iterations, "
        f"max rel cofactor error {rel:.1e} ({phases})"
    )


#: The float32 initializers (in order) :func:`perturb` moves by the full noise.
TUNED = (10, 50, 100)


def perturb(model: ir.Model, rel: float, seed: int = 1) -> None:
    """A fine-tune's stand-in, in place (seeded): every float32 initializer of ``model``
    multiplied by ``1 + rel/20·N(0, 1)`` elementwise, those at :data:`TUNED` by
    ``1 + rel·N(0, 1)`` — a few layers that moved, so that compare's fit is reweighted."""
    rng = np.random.default_rng(seed)
    floats = [
        v
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
    ]
    for k, value in enumerate(floats):
        assert value.const_value is not None
        x = value.const_value.numpy()
        scale = rel if k in TUNED else rel / 20
        noisy = x * (1.0 + scale * rng.standard_normal(x.shape))
        value.const_value = ir.Tensor(noisy.astype(np.float32), name=value.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an ONNX file (default: cached ResNet-50)")
    parser.add_argument("-n", "--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="relative noise on three weights of the teleported copy, a 20th of it on every "
        "other (a fine-tune's stand-in: the verdict 'different', the fit reweighted; default 0)",
    )
    args = parser.parse_args(argv)
    path: Path = args.model or default_model()
    teleported = ir.from_proto(onnx.load(path))
    drawn_result = TeleportPass(seed=0)(teleported)
    if args.noise:
        perturb(teleported, args.noise)
    drawn = drawn_result.pair_values
    free = drawn_result.analysis.solution.free
    wall: dict[str, list[float]] = {k: [] for k in ("load", *PRODUCTS)}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    lines: dict[str, str] = {}
    for _ in range(max(args.rounds, 1)):
        proto, w, c = timed(onnx.load, path)
        wall["load"].append(w)
        cpu["load"].append(c)
        for products in PRODUCTS:
            a = ir.serde.deserialize_model(proto)  # type: ignore[arg-type]
            out, w, c = timed(compare_models, a, teleported, products=products)
            wall[products].append(w)
            cpu[products].append(c)
            assert isinstance(out, Comparison)
            lines[products] = describe(out, drawn, free)
    med = {k: statistics.median(v) for k, v in wall.items()}
    medc = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"model          {path}")
    print(f"onnx.load      {med['load']:.3f} s wall, {medc['load']:.3f} s CPU (medians)")
    for products in PRODUCTS:
        w, c = med[products], medc[products]
        print(f"compare {products:6} {w:.3f} s wall ({w / med['load']:.1f}x), ", end="")
        print(f"{c:.3f} s CPU ({c / medc['load']:.1f}x onnx.load)")
        print(f"  {lines[products]}")
    print(f"kernel/rows    {medc['kernel'] / medc['rows']:.2f} (CPU), ", end="")
    print(f"{med['kernel'] / med['rows']:.2f} (wall); rounds {len(wall['load'])}")
    print(f"blas           OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

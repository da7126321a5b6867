"""Export every registry architecture in every exporter mode and check it against torch.

``python -m models.check [--modes dynamo,dynamo-keepbn,legacy,legacy-keepbn] [NAME ...]``
prints one row per (architecture, mode): parameter count, export seconds, file size,
BatchNormalization nodes left in the graph, op count, and the max relative error of
onnxruntime (graph optimisations disabled) against torch.  Exit status 1 if any export
fails or any error exceeds ``--rtol``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from models.architectures import ARCHITECTURES, parameter_count
from models.export import example_input, export

MODES: dict[str, tuple[str, bool]] = {
    "dynamo": ("dynamo", True),
    "dynamo-keepbn": ("dynamo", False),
    "legacy": ("legacy", True),
    "legacy-keepbn": ("legacy", False),
}
"""Mode name -> (exporter, fold_bn)."""


@dataclass
class Row:
    """One (architecture, mode) result; ``error`` is set when the export or run failed."""

    name: str
    mode: str
    params: int
    seconds: float = float("nan")
    kib: float = float("nan")
    bn_nodes: int = -1
    nodes: int = -1
    rel_err: float = float("nan")
    error: str = ""


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """Run the single-input, single-output model at ``path`` in onnxruntime (CPU, graph
    optimisations disabled, so the runtime neither hides nor repeats a rewrite)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|actual - expected| / max|expected|`` (scale-relative, robust to zeros)."""
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(actual - expected).max()) / scale


def check_one(name: str, mode: str, model: nn.Module, shape: tuple[int, ...], out: Path) -> Row:
    """Export ``model`` in ``mode`` under ``out``, check the file, compare with torch."""
    exporter, fold_bn = MODES[mode]
    row = Row(name, mode, parameter_count(model))
    path = out / f"{name}.{mode}.onnx"
    start = time.perf_counter()
    try:
        export(model, shape, path, exporter=exporter, fold_bn=fold_bn)  # type: ignore[arg-type]
    except Exception as err:
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return row
    row.seconds = time.perf_counter() - start
    row.kib = path.stat().st_size / 1024
    try:
        _validate(row, model, shape, path)
    except Exception as err:
        row.error = f"invalid export: {type(err).__name__}: {str(err)[-200:]}"
    return row


def _validate(row: Row, model: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    """Check the exported file, count its nodes, and fill ``row.rel_err`` from a fresh input."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    row.nodes = len(proto.graph.node)
    row.bn_nodes = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    x = example_input(shape, seed=1)
    with torch.no_grad():
        expected = model(x).numpy()
    row.rel_err = relative_error(run_onnx(path, x.numpy()), expected)


def format_row(row: Row) -> str:
    """One table line for ``row``."""
    head = f"{row.name:16} {row.mode:14} {row.params:>9,}"
    if row.error:
        return f"{head}  FAILED  {row.error[:160]}"
    return (
        f"{head} {row.seconds:6.2f}s {row.kib:8.0f} KiB  bn={row.bn_nodes:<3d}"
        f" nodes={row.nodes:<4d} rel_err={row.rel_err:.1e}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Check the requested architectures in the requested modes; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m models.check", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help="registry entries (default all)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--rtol", type=float, default=1e-4, help="max relative error allowed")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES] + [n for n in args.names if n not in ARCHITECTURES]
    if bad:
        parser.error(f"unknown mode(s)/architecture(s): {', '.join(bad)}")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names or list(ARCHITECTURES):
            model, shape = ARCHITECTURES[name]()
            for mode in modes:
                row = check_one(name, mode, model, shape, Path(tmp))
                print(format_row(row), flush=True)
                failed |= bool(row.error) or not row.rel_err <= args.rtol
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the small ONNX fixtures shipped in ``models/onnx/``.

``python -m models.make_fixtures [--out DIR]`` builds each fixture's model with a fixed seed
(:func:`models.architectures.build`), exports it with the dynamo exporter (weights embedded),
checks the file with ``onnx.checker`` and compares onnxruntime with torch on a random input.

==========================  ===============================================================
``mlp_small.onnx``          MLP 784 -> 3x64 -> 10, ReLU (Gemm/Relu only)
``resnet_tiny.onnx``        CIFAR ResNet, one BasicBlock per stage (8/16/32 channels),
                            16x16 input, BatchNorm folded into the Convs (``optimize=True``)
``cnn_tiny_keepbn.onnx``    Conv(+bias)-BN-ReLU-MaxPool, Conv(+bias)-BN-ReLU-AvgPool, Linear
                            on 16x16 input, every BatchNorm kept (``optimize=False``)
==========================  ===============================================================
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import FIXTURES_DIR
from models.architectures import Built, build, cnn_2d, mlp, resnet
from models.check import relative_error, run_onnx
from models.export import example_input, export


@dataclass(frozen=True)
class Fixture:
    """How to build and export one fixture."""

    factory: Callable[..., Built]
    kwargs: dict[str, Any] = field(default_factory=dict)
    fold_bn: bool = True
    seed: int = 0


FIXTURES: dict[str, Fixture] = {
    "mlp_small": Fixture(mlp, {"depth": 3, "width": 64}),
    "resnet_tiny": Fixture(resnet, {"blocks": (1, 1, 1), "width": 8, "image_size": 16}),
    "cnn_tiny_keepbn": Fixture(cnn_2d, {"size": 16, "width": 8}, fold_bn=False),
}
"""Fixture name (file stem) -> recipe."""


def build_fixture(name: str) -> Built:
    """The torch model (eval mode, seeded and randomised) and input shape of fixture ``name``,
    so tests can compare the shipped ONNX file with its source."""
    spec = FIXTURES[name]
    return build(spec.factory, spec.seed, **spec.kwargs)


def make(name: str, out: Path) -> Path:
    """Export fixture ``name`` to ``out/NAME.onnx``, validate it, and return the path."""
    model, shape = build_fixture(name)
    path = export(model, shape, out / f"{name}.onnx", fold_bn=FIXTURES[name].fold_bn)
    verify(path, model, shape)
    return path


def verify(path: Path, model: torch.nn.Module, shape: tuple[int, ...], rtol: float = 1e-5) -> float:
    """Run ``onnx.checker`` on ``path`` and compare onnxruntime with torch; returns the max
    relative error and raises ``AssertionError`` if it exceeds ``rtol``."""
    import onnx

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = example_input(shape, seed=1)
    with torch.no_grad():
        expected = model(x).numpy()
    err = relative_error(run_onnx(path, x.numpy()), expected)
    if not err <= rtol:
        raise AssertionError(f"{path.name}: onnxruntime differs from torch (rel err {err:.2e})")
    return err


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the requested fixtures (default all) into ``--out`` (default models/onnx)."""
    parser = argparse.ArgumentParser(prog="python -m models.make_fixtures", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(FIXTURES))
    parser.add_argument("--out", type=Path, default=FIXTURES_DIR)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in FIXTURES]
    if unknown:
        parser.error(f"unknown fixture(s): {', '.join(unknown)}")
    for name in args.names or list(FIXTURES):
        path = make(name, args.out)
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export reference models to ONNX, quietly, with either torch exporter.

Behaviour measured on torch 2.13 / onnxscript 0.7 (see also DESIGN.md §9):

* ``exporter="dynamo"`` (``torch.onnx.export(..., dynamo=True)``), opset 18+ (torch's default,
  currently 20).

  - ``fold_bn=True`` passes ``optimize=True``: onnxscript's optimizer folds every BatchNorm that
    directly follows a Conv into it and constant-folds shape arithmetic.  The folded tensors
    keep the torch names (``0.0.weight``, ``0.0.bias``) although their values differ from the
    torch parameters; a bias-free Conv gains a bias initializer named ``<weight name>_bias``.
    BatchNorms that follow anything else (DenseNet's pre-activation BN after a Concat or a
    ReLU) stay.
  - ``fold_bn=False`` passes ``optimize=False``: every BatchNorm stays, and the graph is left
    unoptimised, e.g. a bias-free Conv receives a zero bias built at run time from
    ``Shape``/``Expand``/``CastLike`` nodes, and ``Flatten`` is a ``Concat``+``Reshape``.
    For a bias-free Conv3d that zero bias has the wrong shape ``[C_out, 2]`` in onnxscript 0.7
    (microsoft/onnxscript#2931) and onnxruntime rejects the model; the optimised export is
    fine.

* ``exporter="legacy"`` (TorchScript, ``dynamo=False``; deprecated), opset 17 by default.
  The model is exported in eval mode (``training=TrainingMode.EVAL``).

  - ``fold_bn=True`` passes ``do_constant_folding=True``: a BatchNorm right after a Conv is
    folded into it and the folded tensors are named ``onnx::Conv_N``; other BatchNorms stay.
  - ``fold_bn=False`` passes ``do_constant_folding=False``: every BatchNorm stays.  The legacy
    exporter still de-duplicates initializers with equal values, feeding the copies through
    ``Identity`` nodes (only visible when BN parameters are left at their constant init).

Both exporters embed the weights unless ``external_data=True`` (dynamo's own default would
write ``NAME.onnx.data`` even for tiny models).  Inputs are named ``input``, outputs
``output``; shapes are static.

CLI: ``python -m models.export --out DIR [--exporter dynamo|legacy] [--keep-bn] [NAME ...]``
exports registry entries (all of them by default) to ``DIR/NAME.onnx``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from graphteleport.frontends.torch import quiet

Exporter = Literal["dynamo", "legacy"]
LEGACY_DEFAULT_OPSET = 17


def example_input(input_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A standard-normal float32 tensor of ``input_shape``, deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(input_shape), generator=gen)


def _export_dynamo(
    model: nn.Module,
    x: torch.Tensor,
    path: Path,
    fold_bn: bool,
    opset: int | None,
    external_data: bool,
) -> None:
    """``torch.onnx.export(dynamo=True)``: ``optimize=fold_bn``."""
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=True,
        optimize=fold_bn,
        external_data=external_data,
        opset_version=opset,
        input_names=["input"],
        output_names=["output"],
        verbose=False,
    )


def _export_legacy(
    model: nn.Module,
    x: torch.Tensor,
    path: Path,
    fold_bn: bool,
    opset: int | None,
    external_data: bool,
) -> None:
    """``torch.onnx.export(dynamo=False)``: ``do_constant_folding=fold_bn``, eval mode."""
    if external_data:
        raise ValueError("external_data=True is only supported with the dynamo exporter")
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        do_constant_folding=fold_bn,
        opset_version=opset or LEGACY_DEFAULT_OPSET,
        training=torch.onnx.TrainingMode.EVAL,
        input_names=["input"],
        output_names=["output"],
        verbose=False,
    )


def export(
    model: nn.Module,
    input_shape: Sequence[int],
    path: str | Path,
    *,
    exporter: Exporter = "dynamo",
    fold_bn: bool = True,
    opset: int | None = None,
    external_data: bool = False,
) -> Path:
    """Export ``model`` (put in eval mode) on a random input of ``input_shape`` to ``path``
    and return the path.  ``fold_bn`` selects the exporter's optimising mode (see the module
    docstring for what each mode keeps); ``opset`` defaults to torch's choice for dynamo and
    17 for legacy.  Exporter output is suppressed; on failure it is attached to the error."""
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"exporter must be 'dynamo' or 'legacy', not {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    run = _export_dynamo if exporter == "dynamo" else _export_legacy
    model.eval()
    with quiet() as log:
        try:
            run(model, example_input(input_shape), path, fold_bn, opset, external_data)
        except Exception as err:
            if hasattr(err, "add_note") and log.getvalue().strip():
                err.add_note("exporter output:\n" + log.getvalue()[-4000:])
            raise
    return path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments of ``python -m models.export``."""
    from models.architectures import ARCHITECTURES

    parser = argparse.ArgumentParser(
        prog="python -m models.export", description="Export registry architectures to ONNX."
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"registry entries (default: all): {', '.join(ARCHITECTURES)}",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo")
    parser.add_argument(
        "--keep-bn",
        action="store_true",
        help="do not fold BatchNorm (dynamo: optimize=False; legacy: do_constant_folding=False)",
    )
    parser.add_argument("--opset", type=int, default=None)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architecture(s): {', '.join(unknown)}")
    return args


def export_each(names: Sequence[str], out: Path, export_one: Callable[[str, Path], object]) -> int:
    """Export each name to ``out/NAME.onnx`` with ``export_one``, one line per model;
    1 if any export failed, else 0."""
    failures = 0
    for name in names:
        start = time.perf_counter()
        target = out / f"{name}.onnx"
        try:
            export_one(name, target)
        except Exception as err:
            failures += 1
            print(f"FAIL {name}: {type(err).__name__}: {str(err).splitlines()[0]}", file=sys.stderr)
            continue
        kib = target.stat().st_size / 1024
        print(f"{target}  {kib:.0f} KiB  {time.perf_counter() - start:.2f}s")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Export the requested registry entries, one line per model; exit status 1 if any
    export failed, else 0."""
    from models.architectures import ARCHITECTURES

    args = _parse_args(argv)

    def one(name: str, target: Path) -> Path:
        model, shape = ARCHITECTURES[name]()
        return export(model, shape, target, exporter=args.exporter,
                      fold_bn=not args.keep_bn, opset=args.opset)  # fmt: skip

    return export_each(args.names or list(ARCHITECTURES), args.out, one)


if __name__ == "__main__":
    sys.exit(main())

"""Experiment 1: a teleported network computes the same function.

Every registry architecture (``models.architectures.ARCHITECTURES``) is teleported along two
paths — the ONNX file path (``graphteleport.pipeline.teleport_file``, verified with
onnxruntime) and the torch path (``graphteleport.torch.teleport`` on the ``nn.Module``,
compared in eval and train mode against a deep copy) — for each sampling of DESIGN.md §4 and
each mode (absorb / insert).  The tables give the maximum relative output error
``max |y − y'| / max |y|``.

Run: ``python -m experiments.function_preservation``
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.common import (
    Timer,
    deepcopy,
    fmt_err,
    md_table,
    quiet,
    registry_model,
    rel_err,
    savefig,
    setup,
    write_section,
)

NAME = "function_preservation"
SAMPLINGS: dict[str, dict[str, Any]] = {
    "intra r=0.5": {"sampling": "intra_landscape", "cob_range": 0.5},
    "inter r=0.9": {"sampling": "inter_landscape", "cob_range": 0.9},
    "positive r=0.9": {"sampling": "positive", "cob_range": 0.9},
    "negative r=0.9": {"sampling": "negative", "cob_range": 0.9},
    "centered c=2 r=0.5": {"sampling": "centered", "cob_range": 0.5, "center": 2.0},
}
MODES = ("absorb", "insert")
BATCH = 4


@dataclass
class Cell:
    """One (architecture, path, mode, sampling) outcome."""

    err: float | None = None  # max relative output error (eval mode for torch)
    err_train: float | None = None  # torch only: train mode on the example batch
    err_fresh: float | None = None  # torch only: train mode on another batch
    free: int | None = None
    failure: str = ""  # exception type and first words, if it raised


@dataclass
class Results:
    archs: list[str]
    cells: dict[tuple[str, str, str, str], Cell] = field(default_factory=dict)
    seconds: float = 0.0


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:90]}"


def onnx_cell(src: Path, mode: str, opts: dict[str, Any], tmp: Path) -> Cell:
    from graphteleport.errors import VerificationError
    from graphteleport.pipeline import TeleportOptions, teleport_file

    try:
        options = TeleportOptions(mode=mode, seed=0, **opts)
        report = teleport_file(src, tmp / "out.onnx", options).to_json()
    except VerificationError as e:
        report = e.report.to_json()  # type: ignore[attr-defined]
        return Cell(report["verification"]["max_rel_err"], free=report["free_cofactors"],
                    failure="verification failed")  # fmt: skip
    except Exception as e:
        return Cell(failure=_short(e))
    return Cell(report["verification"]["max_rel_err"], free=report["free_cofactors"])


def torch_cell(arch: str, mode: str, opts: dict[str, Any]) -> Cell:
    from graphteleport.torch import teleport

    model, shape = registry_model(arch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((BATCH, *shape[1:]), generator=gen)
    fresh = torch.randn((BATCH, *shape[1:]), generator=gen)
    reference = deepcopy(model)
    try:
        with quiet():
            result = teleport(model, x, mode=mode, seed=0, **opts)
    except Exception as e:
        return Cell(failure=_short(e))
    errs = []
    for inputs, train in ((x, False), (x, True), (fresh, True)):
        reference.train(train)
        model.train(train)
        with torch.no_grad():
            errs.append(rel_err(reference(inputs), model(inputs)))
    return Cell(errs[0], errs[1], errs[2], result.free_cofactors)


def run(archs: Sequence[str] | None = None) -> Results:
    from models.architectures import ARCHITECTURES
    from models.export import export

    timer = Timer()
    res = Results(list(archs or ARCHITECTURES))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for arch in res.archs:
            model, shape = registry_model(arch)
            src = export(model, shape, tmp / f"{arch}.onnx")
            for mode in MODES:
                for label, opts in SAMPLINGS.items():
                    res.cells[arch, "onnx", mode, label] = onnx_cell(src, mode, opts, tmp)
                    res.cells[arch, "torch", mode, label] = torch_cell(arch, mode, opts)
            print(f"  {arch}: {timer.seconds:.0f}s", flush=True)
    res.seconds = timer.seconds
    return res


# -- report --------------------------------------------------------------------------------------
def _err(c: Cell, which: str) -> float | None:
    return {"eval": c.err, "train": c.err_train, "fresh": c.err_fresh}[which]


def _cell_text(c: Cell, which: str = "eval") -> str:
    if c.failure and c.err is None:
        return "raises"
    text = fmt_err(_err(c, which))
    return f"**{text}** ✗" if c.failure else text


def table(res: Results, path: str, which: str = "eval") -> str:
    header = ["architecture"] + [f"{m[:3]} · {s}" for m in MODES for s in SAMPLINGS]
    rows = [
        [a] + [_cell_text(res.cells[a, path, m, s], which) for m in MODES for s in SAMPLINGS]
        for a in res.archs
    ]
    return md_table(header, rows)


def free_table(res: Results) -> str:
    s = next(iter(SAMPLINGS))
    rows = []
    for a in res.archs:
        row = [a]
        for path in ("onnx", "torch"):
            for m in MODES:
                c = res.cells[a, path, m, s]
                row.append("raises" if c.free is None else str(c.free))
        rows.append(row)
    return md_table(["architecture", "ONNX absorb", "ONNX insert", "torch absorb",
                     "torch insert"], rows)  # fmt: skip


def failures(res: Results) -> list[str]:
    seen: dict[str, list[str]] = {}
    for (a, path, m, s), c in res.cells.items():
        if c.failure:
            seen.setdefault(f"{path} {m}: {c.failure}", []).append(f"{a} ({s})")
    return [f"- {k} — {', '.join(sorted(set(v)))}" for k, v in sorted(seen.items())]


def plot(res: Results) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = {("onnx", "eval"): "o", ("torch", "eval"): "^", ("torch", "train"): "x",
               ("torch", "fresh"): "+"}  # fmt: skip
    xs = np.arange(len(res.archs))
    for ax, mode in zip(axes, MODES):
        for k, label in enumerate(SAMPLINGS):
            for (path, which), marker in markers.items():
                ys = []
                for a in res.archs:
                    e = _err(res.cells[a, path, mode, label], which)
                    ys.append(np.nan if e is None else max(e, 1e-9))
                off = (k - 2) * 0.12
                name = f"{path} {which}" if k == 0 else None
                ax.scatter(xs + off, ys, marker=marker, color=colors[k], s=22, label=name)
        ax.axhline(1e-5, color="gray", lw=0.8, ls="--")
        ax.axhline(1e-4, color="gray", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_ylabel("max relative error")
        ax.set_title(f"{mode} mode (0 plotted at 1e-9; colours: {', '.join(SAMPLINGS)})",
                     fontsize=9)  # fmt: skip
        ax.legend(fontsize=8, loc="upper left")
    axes[-1].set_xticks(xs, res.archs, rotation=30, ha="right")
    return savefig(fig, NAME)


def section(res: Results) -> str:
    img = plot(res)
    fails = failures(res)
    onnx_max = max((c.err or 0.0) for (_, p, _, _), c in res.cells.items() if p == "onnx")
    bn = {a: _has_bn(a) for a in res.archs}
    torch_cells = [(a, s, c) for (a, p, _, s), c in res.cells.items() if p == "torch"]
    nobn = [e for a, _, c in torch_cells if not bn[a] for e in (c.err, c.err_train, c.err_fresh)]
    bn_same = [e for a, _, c in torch_cells if bn[a] for e in (c.err, c.err_train)]
    bn_fresh = {
        s: [c.err_fresh for a, s2, c in torch_cells if bn[a] and s2 == s] for s in SAMPLINGS
    }

    def worst(errs: Sequence[float | None]) -> str:
        return fmt_err(max((e for e in errs if e is not None), default=None))

    fresh_by_sampling = "; ".join(f"{s}: {worst(v)}" for s, v in bn_fresh.items())
    return f"""## 1. Function preservation across architectures, paths, samplings and modes

`python -m experiments.function_preservation` ({res.seconds:.0f} s)

Every registry architecture (`models/architectures.py`, test-sized, BatchNorm statistics
re-randomised) is teleported (seed 0) along both paths: the **ONNX path** exports it with the
dynamo exporter (BatchNorms after a Conv are folded by the exporter) and runs
`graphteleport.pipeline.teleport_file`, which verifies with onnxruntime (graph optimisations
off, rtol 1e-5); the **torch path** runs `graphteleport.torch.teleport` on the module and
compares against a deep copy on a batch of {BATCH} in eval and in train mode.  Cells give
`max |y − y'| / max |y|`; "raises" means the teleport refused the model (reasons below);
**bold ✗** means a failed verification.  Samplings as in DESIGN.md §4 (in absorb mode a
ReLU-family class takes |τ|, so "negative" there is positive).

![errors]({img})

Free cofactors (intra sampling; the count does not depend on the sampling):

{free_table(res)}

**ONNX path** (onnxruntime; max over the table {fmt_err(onnx_max)}):

{table(res, "onnx")}

**torch path, eval mode**:

{table(res, "torch")}

**torch path, train mode** (BatchNorm uses batch statistics), on the example batch:

{table(res, "torch", "train")}

**torch path, train mode on another batch** (same shape, other values):

{table(res, "torch", "fresh")}

Refusals and failures:

{chr(10).join(fails) if fails else "- none"}

Reading the tables: the ONNX path and, for models without BatchNorm, the torch path stay at
float32 rounding (torch max {worst(nobn)}).  The torch path keeps BatchNorm in its *training*
form (its input cofactors positive, γ and β take τ_out).  BatchNorm divides by
`sqrt(var + eps)` and a teleport cannot scale `eps`, so it corrects for it
(`graphteleport.torch.absorb`): the running variance takes `τ²(rv + eps) − eps`
(eval mode exact) and γ a factor computed from the input variances measured on the example
inputs (train mode exact on a batch with those variances).  BatchNorm models on the torch
path: eval mode and train mode on the example batch within {worst(bn_same)}.  On another
batch the remaining error is `eps (1 − 1/τ²)(1/s² − 1/σ²)/2` per layer (`s²` that batch's
variance, `σ²` the measured one): small for cofactors near 1, large where a sampling allows
small |τ| (positive/negative U[0, 0.9], inter r = 0.9: |τ| down to 0.1, 1/τ² up to 100) and
the batch variance of a deep layer is small.  Worst over the BatchNorm models, by sampling:
{fresh_by_sampling}.  So on the torch path, teleport BatchNorm models in training with
cofactors near 1; the ONNX path folds BatchNorm into its inference form
(`scale' = scale·τ_out/τ_in`, mean·τ_in, var unchanged), which is exact.
"""


def _has_bn(arch: str) -> bool:
    model, _ = registry_model(arch)
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help="registry names (default: all)")
    args = parser.parse_args(argv)
    setup()
    res = run(args.archs or None)
    text = section(res)
    print(f"wrote {write_section(NAME, text)} ({res.seconds:.0f}s)")
    return text


if __name__ == "__main__":
    main()

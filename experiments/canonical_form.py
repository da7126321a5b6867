"""Experiment 6: the canonical form removes the orbit — distances and scale-dependent measures.

A random positive teleport ``W' = S ⊙ W`` is the same function as ``W`` but, as a point in
parameter space, far from it: the relative L2 distance ``‖W' − W‖ / ‖W‖`` and every
scale-dependent measure (the total squared weight ``Σ W²``, the gradient norm, the Hessian's
trace — "sharpness", Dinh et al. 2017) move along the orbit.  The canonical form ``C(W)``
(:class:`graphteleport.passes.canonical.CanonicalizePass`: the point of the orbit with the
least ``Σ W²``, unique as a model) maps every point of an orbit to the same weights, so
after canonicalizing both, ``‖C(W') − C(W)‖ / ‖C(W)‖`` is float rounding and the measures are
orbit invariants.

Part 1, the ONNX path on every registry architecture (``models/architectures.py``, test-sized,
exported with the dynamo exporter, BatchNorm after a Conv folded): for each CoB sampling and
seed, ``TeleportPass`` (absorb mode) then ``CanonicalizePass`` on the original and on the
teleport; all float initializers (and Constant values) concatenated into one vector.

Part 2, scale-dependent measures of trained networks (the 5x500 ReLU MLP and the small CNN of
the other experiments, trained a few epochs): teleported and canonicalized on the ONNX path,
the weights read back into the torch module by name, then on 1000 training digits the loss,
``Σ W²``, ``‖∇L‖`` and a Hutchinson estimate of ``tr ∇²L`` (fixed Rademacher probes).

Run: ``python -m experiments.canonical_form``
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from experiments.common import (
    MODELS,
    RESULTS,
    Timer,
    deepcopy,
    inputs_for,
    md_table,
    mnist,
    quiet,
    registry_model,
    savefig,
    setup,
    write_section,
)

NAME = "canonical_form"
SAMPLINGS: dict[str, dict[str, Any]] = {
    "intra r=0.1": {"sampling": "intra_landscape", "cob_range": 0.1},
    "intra r=0.5": {"sampling": "intra_landscape", "cob_range": 0.5},
    "intra r=0.9": {"sampling": "intra_landscape", "cob_range": 0.9},
    "centered c=5 r=4": {"sampling": "centered", "center": 5.0, "cob_range": 4.0},
    "inter r=0.9": {"sampling": "inter_landscape", "cob_range": 0.9},
}
"""The CoB samplings (absorb mode): τ ~ U[1 − r, 1 + r], τ ~ U[1, 9] for a far teleport, and
random signs with |τ| ~ U[0.1, 1.9] (a ReLU-family class takes |τ|; a class that allows
negative cofactors, such as a linear path, keeps the sign)."""
SHARP_SAMPLINGS = ("intra r=0.9", "centered c=5 r=4")
"""The samplings of part 2 (the Hessian-vector products make it the slow part)."""
N_LOSS = 512
PROBES = 10
MEASURES = ("loss", "sum_sq", "grad_norm", "hessian_trace")


# -- weights as one vector -------------------------------------------------------------------------
def float_weights(model: Any) -> dict[str, np.ndarray]:
    """Every float initializer and Constant-node value of an ``onnx_ir`` model, by name."""
    import onnx_ir as ir

    out: dict[str, np.ndarray] = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is not None:
            out[name] = value.const_value.numpy()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and "value" in node.attributes:
            out[node.outputs[0].name or ""] = node.attributes["value"].as_tensor().numpy()
    return {k: np.asarray(v, np.float64) for k, v in out.items() if v.dtype.kind == "f"}


def rel_l2(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """``‖b − a‖ / ‖a‖`` over all tensors of ``a`` concatenated (float64)."""
    diff = sum(float(((b[k] - a[k]) ** 2).sum()) for k in a)
    norm = sum(float((a[k] ** 2).sum()) for k in a)
    return float(np.sqrt(diff / norm))


def sum_sq(w: dict[str, np.ndarray]) -> float:
    return sum(float((v**2).sum()) for v in w.values())


def teleported(src: Path, seed: int, opts: dict[str, Any]) -> Any:
    """The model at ``src`` teleported in memory (absorb mode)."""
    import onnx_ir as ir

    from graphteleport.passes.teleport import TeleportPass

    model = ir.load(src)
    TeleportPass(seed=seed, **opts)(model)
    return model


def canonicalized(model: Any) -> Any:
    """``model`` replaced in place by its canonical form (absorb mode); returned."""
    from graphteleport.passes.canonical import CanonicalizePass

    CanonicalizePass()(model)
    return model


# -- part 1: registry distances -------------------------------------------------------------------
@dataclass
class Distances:
    """Per (architecture, sampling): over seeds, ``‖W' − W‖/‖W‖`` and ``Σ W'²/Σ W²`` before
    canonicalizing, and the same for ``C(W')`` against ``C(W)`` after."""

    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    norm_before: list[float] = field(default_factory=list)
    norm_after: list[float] = field(default_factory=list)


def registry_distances(arch: str, src: Path, seeds: int) -> dict[str, Distances]:
    import onnx_ir as ir

    w = float_weights(ir.load(src))
    cw = float_weights(canonicalized(ir.load(src)))
    out: dict[str, Distances] = {}
    for label, opts in SAMPLINGS.items():
        d = out[label] = Distances()
        for seed in range(seeds):
            moved = teleported(src, seed, opts)
            wt = float_weights(moved)
            cwt = float_weights(canonicalized(moved))
            d.before.append(rel_l2(w, wt))
            d.after.append(rel_l2(cw, cwt))
            d.norm_before.append(sum_sq(wt) / sum_sq(w))
            d.norm_after.append(sum_sq(cwt) / sum_sq(cw))
    return out


# -- part 2: scale-dependent measures of trained networks ---------------------------------------
def measures(model: torch.nn.Module, name: str) -> dict[str, float]:
    """Loss, ``Σ W²``, ``‖∇L‖`` and Hutchinson's ``tr ∇²L`` (``PROBES`` Rademacher probes,
    seed 0) of the cross-entropy on the first ``N_LOSS`` training digits, in float64 sums."""
    data = mnist()
    x, y = inputs_for(name, data.x_train[:N_LOSS]), data.y_train[:N_LOSS]
    model.eval()
    params = [p for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    trace = 0.0
    for i in range(PROBES):
        vs = [torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, vs, retain_graph=i < PROBES - 1)
        trace += sum(float((h.double() * v.double()).sum()) for h, v in zip(hv, vs))
    return {
        "loss": loss.item(),
        "sum_sq": sum(float((p.detach().double() ** 2).sum()) for p in params),
        "grad_norm": float(np.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))),
        "hessian_trace": trace / PROBES,
    }


def with_weights(model: torch.nn.Module, onnx_model: Any) -> torch.nn.Module:
    """A copy of ``model`` holding the ONNX model's initializers of the same names (the
    dynamo exporter keeps parameter names for these BatchNorm-free models)."""
    out = deepcopy(model)
    weights = float_weights(onnx_model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.copy_(torch.from_numpy(weights[n]).to(p.dtype))
    return out


@dataclass
class Sharpness:
    """Per model: the original's measures, and per sampling and seed those of the teleport
    (``before``) and of its canonical form (``after``), with the canonical form of the
    original (``canonical``)."""

    original: dict[str, float] = field(default_factory=dict)
    canonical: dict[str, float] = field(default_factory=dict)
    before: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    after: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def sharpness(name: str, tmp: Path, seeds: int) -> Sharpness:
    import onnx_ir as ir

    from experiments.level_curves import trained
    from models.export import export

    model = trained(name)
    shape = (1, 784) if name == "mlp" else (1, 1, 28, 28)
    src = export(model, shape, tmp / f"trained_{name}.onnx")
    res = Sharpness(measures(model, name))
    res.canonical = measures(with_weights(model, canonicalized(ir.load(src))), name)
    for label in SHARP_SAMPLINGS:
        opts = SAMPLINGS[label]
        res.before[label], res.after[label] = [], []
        for seed in range(seeds):
            moved = teleported(src, seed, opts)
            res.before[label].append(measures(with_weights(model, moved), name))
            res.after[label].append(measures(with_weights(model, canonicalized(moved)), name))
    return res


# -- run, save, load ------------------------------------------------------------------------------
@dataclass
class Results:
    seeds: int
    distances: dict[str, dict[str, Distances]] = field(default_factory=dict)
    sharpness: dict[str, Sharpness] = field(default_factory=dict)
    seconds: float = 0.0


def run(seeds: int = 10, archs: Sequence[str] | None = None, sharp_seeds: int = 3) -> Results:
    from models.architectures import ARCHITECTURES
    from models.export import export

    timer = Timer()
    res = Results(seeds)
    with tempfile.TemporaryDirectory() as d, quiet():
        tmp = Path(d)
        for arch in archs or list(ARCHITECTURES):
            model, shape = registry_model(arch)
            src = export(model, shape, tmp / f"{arch}.onnx")
            res.distances[arch] = registry_distances(arch, src, seeds)
            print(f"  {arch}: {timer.seconds:.0f}s", flush=True)
        for name in MODELS:
            res.sharpness[name] = sharpness(name, tmp, sharp_seeds)
            print(f"  trained {name}: {timer.seconds:.0f}s", flush=True)
    res.seconds = timer.seconds
    return res


def _json_path() -> Path:
    return RESULTS / f"{NAME}.json"


def save(res: Results) -> None:
    raw = {
        "seeds": res.seeds, "seconds": res.seconds,
        "distances": {a: {s: asdict(d) for s, d in ds.items()} for a, ds in res.distances.items()},
        "sharpness": {n: asdict(s) for n, s in res.sharpness.items()},
    }  # fmt: skip
    _json_path().parent.mkdir(parents=True, exist_ok=True)
    _json_path().write_text(json.dumps(raw, indent=0))


def load() -> Results:
    raw = json.loads(_json_path().read_text())
    res = Results(raw["seeds"], seconds=raw["seconds"])
    res.distances = {
        a: {s: Distances(**d) for s, d in ds.items()} for a, ds in raw["distances"].items()
    }
    res.sharpness = {n: Sharpness(**s) for n, s in raw["sharpness"].items()}
    return res


# -- report ---------------------------------------------------------------------------------------
def _range(values: Sequence[float]) -> str:
    """``min – max`` of relative values, 2 significant digits."""
    return f"{min(values):.2g} – {max(values):.2g}"


def distance_rows(res: Results) -> list[list[str]]:
    rows = []
    for arch, ds in res.distances.items():
        row = [arch]
        for label in SAMPLINGS:
            d = ds[label]
            row.append(f"{np.mean(d.before):.2g} → {max(d.after):.0e}")
        allb = [x for d in ds.values() for x in d.norm_before]
        alla = [x for d in ds.values() for x in d.norm_after]
        row += [_range(allb), f"{max(abs(x - 1) for x in alla):.0e}"]
        rows.append(row)
    return rows


def _spread(values: Sequence[float]) -> float:
    """``(max − min) / |mean|``: the relative spread of a measure over a set of points."""
    a = np.asarray(values)
    return float((a.max() - a.min()) / abs(a.mean()))


def sharpness_rows(res: Results) -> list[list[str]]:
    rows = []
    for name, s in res.sharpness.items():
        for m in MEASURES:
            row = [name, m, f"{s.original[m]:.4g}", f"{s.canonical[m]:.4g}"]
            for label in SHARP_SAMPLINGS:
                before = [x[m] / s.original[m] for x in s.before[label]]
                after = [x[m] for x in s.after[label]]
                row.append(f"{_range(before)} → spread {_spread([s.canonical[m], *after]):.0e}")
            rows.append(row)
    return rows


def plot(res: Results) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    archs = list(res.distances)
    xs = np.arange(len(archs))
    for k, label in enumerate(SAMPLINGS):
        off = (k - (len(SAMPLINGS) - 1) / 2) * 0.18
        before = [np.mean(res.distances[a][label].before) for a in archs]
        after = [max(res.distances[a][label].after) for a in archs]
        ax.scatter(xs + off, before, color=f"C{k}", marker="o", s=18, label=f"before, {label}")
        ax.scatter(xs + off, after, color=f"C{k}", marker="x", s=18, label=f"after, {label}")
    ax.set_yscale("log")
    ax.set_xticks(xs, archs, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("‖W' − W‖ / ‖W‖")
    ax.set_title("teleport vs original: before (mean) and after canonicalizing (max)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1]
    label = "intra r=0.9"
    for k, m in enumerate(("sum_sq", "grad_norm", "hessian_trace")):
        for j, name in enumerate(res.sharpness):
            s = res.sharpness[name]
            before = [x[m] / s.original[m] for x in s.before[label]]
            after = [x[m] / s.original[m] for x in s.after[label]]
            pos = k * 2.5 + j
            ax.scatter([pos] * len(before), before, color="C0", s=14,
                       label="teleports" if k == j == 0 else None)  # fmt: skip
            ax.scatter([pos + 0.3] * len(after), after, color="C3", marker="x", s=14,
                       label="their canonical forms" if k == j == 0 else None)  # fmt: skip
    ax.set_xticks([k * 2.5 + j + 0.15 for k in range(3) for j in range(2)],
                  [f"{m}\n{n}" for m in ("Σ W²", "‖∇L‖", "tr ∇²L") for n in res.sharpness],
                  fontsize=7)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("value / value at the trained W")
    ax.set_title(f"trained nets, {label}: scale-dependent measures", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return savefig(fig, NAME)


def section(res: Results) -> str:
    img = plot(res)
    header = ["architecture", *(f"{s}: before → after" for s in SAMPLINGS),
              "Σ W'²/Σ W² before", "max abs(ΣC(W')²/ΣC(W)² − 1)"]  # fmt: skip
    sharp_header = ["model", "measure", "at W", "at C(W)",
                    *(f"{s}: teleports / W → canonical" for s in SHARP_SAMPLINGS)]  # fmt: skip
    worst_after = max(
        max(d.after) for ds in res.distances.values() for s, d in ds.items() if s != "inter r=0.9"
    )
    least_before = min(min(d.before) for ds in res.distances.values() for d in ds.values())
    far = [np.mean(ds["intra r=0.9"].before) for ds in res.distances.values()]
    sign_after = max(max(ds["inter r=0.9"].after) for ds in res.distances.values())
    signed = [
        a
        for a, ds in res.distances.items()
        if abs(np.mean(ds["inter r=0.9"].before) - np.mean(ds["intra r=0.9"].before)) > 1e-9
    ]
    sign_text = (
        "the sign rule makes the form canonical under sign flips too"
        if sign_after < 1e-6
        else "the form is canonical only modulo sign on some of these models"
    ) + (
        f" (in absorb mode a ReLU-family class takes |τ|, so random signs reach only the "
        f"classes that allow negative cofactors, here in {', '.join(signed) or 'none'}; "
        f"elsewhere the column equals intra r=0.9)"
    )
    sharp = {
        m: max(
            _spread([s.canonical[m], *(x[m] for xs in s.after.values() for x in xs)])
            for s in res.sharpness.values()
        )
        for m in MEASURES
    }
    moved = {
        m: max(
            max(x[m] for xs in s.before.values() for x in xs) / s.original[m]
            for s in res.sharpness.values()
        )
        for m in ("grad_norm", "hessian_trace")
    }
    n_arch = len(res.distances)

    def ratio(m: str) -> str:
        return " and ".join(
            f"{s.canonical[m] / s.original[m]:.2f}x ({n})" for n, s in res.sharpness.items()
        )

    return f"""## 6. The canonical form: one point per orbit

`python -m experiments.canonical_form` ({res.seconds:.0f} s)

A random teleport `W' = S ⊙ W` computes the same function as `W` but lies far from it in
parameter space, and every *scale-dependent* quantity — the weight norm, the gradient norm,
sharpness measured by the Hessian — changes along the orbit (Dinh et al., 2017: sharp minima
can be made flat by rescaling).  `CanonicalizePass` / `graphteleport canonicalize` maps a model
to the point of its orbit with the least `Σ W²` (weights and biases; unique as a model), so
comparing or measuring *canonical forms* removes the orbit.

**Distances.**  Every registry architecture ({n_arch}; test-sized, dynamo export, BatchNorm
after a Conv folded), teleported on the ONNX path (`TeleportPass`, absorb mode, {res.seeds}
seeds per sampling), then the original and each teleport canonicalized; all float
initializers as one vector.  Cells: mean `‖W' − W‖/‖W‖` of the teleports → max
`‖C(W') − C(W)‖/‖C(W)‖`.

{md_table(header, distance_rows(res))}

**Scale-dependent measures.**  The 5x500 ReLU MLP and the small CNN, trained 5 epochs (SGD lr
1e-2, momentum 0.9; section 5's networks), teleported and canonicalized on the ONNX path, the
weights read back into the torch module by name; on {N_LOSS} training digits: the loss,
`Σ W²`, `‖∇L‖` and Hutchinson's estimate of the Hessian trace `tr ∇²L` ({PROBES} fixed
Rademacher probes).  Cells: the teleports' range relative to `W` → the relative spread
`(max − min)/mean` over `C(W)` and the teleports' canonical forms.

{md_table(sharp_header, sharpness_rows(res))}

![canonical form]({img})

Before canonicalizing, a teleport with τ ~ U[0.1, 1.9] moves the weights by
{min(far):.0%} – {max(far):.0%} of their norm on average (the closest single teleport,
r = 0.1, is {least_before:.1e} away); after canonicalizing both, the largest distance over
all {n_arch} architectures, positive samplings and seeds is **{worst_after:.1e}** — float32
rounding: the canonical form is one point per orbit, also for BatchNorm, residual, DenseNet
concatenation, U-Net skip and depthwise classes; with random signs (inter r=0.9) the largest
distance after is {sign_after:.1e} — {sign_text}.  On the trained networks the loss does not
move (spread {sharp["loss"]:.0e}), while the gradient norm reaches {moved["grad_norm"]:.1f}x
and the Hessian trace {moved["hessian_trace"]:.1f}x their values at `W` over these teleports;
measured on the canonical forms, their spreads are {sharp["grad_norm"]:.0e} and
{sharp["hessian_trace"]:.0e} (`Σ W²` {sharp["sum_sq"]:.0e}): *canonicalize, then measure*
makes a scale-dependent sharpness measure a function of the network, not of its
parametrization.  The canonical point is a reference, not the flattest point of the orbit: at
`C(W)` the gradient norm is {ratio("grad_norm")} and the Hessian trace
{ratio("hessian_trace")} their values at the trained `W` (least `Σ W²` is not least
curvature).  What this does not settle: whether the canonical form's sharpness predicts
generalization better than the raw one (that needs many trained networks).
"""


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--archs", nargs="*", default=None, help="registry names (default all)")
    parser.add_argument("--render", action="store_true", help="rewrite the section from "
                        "results/canonical_form.json without recomputing")  # fmt: skip
    args = parser.parse_args(argv)
    setup()
    torch.set_num_threads(1)
    if args.render:
        res = load()
    else:
        res = run(args.seeds, args.archs, sharp_seeds=min(args.seeds, 3))
        save(res)
    text = section(res)
    print(f"wrote {write_section(NAME, text)} ({res.seconds:.0f}s)")
    return text


if __name__ == "__main__":
    main()

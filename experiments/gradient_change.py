"""Experiment 3: teleportation changes the gradient, more with a larger CoB range.

For the paper's 5x500 ReLU MLP and a small CNN at initialisation, on 1000 MNIST training
digits, the relative gradient magnitude of each weight tensor (Linear/Conv weights) before and
after a teleport is compared, as in the paper's Fig. 5:

    Δ = | ‖∇W‖ / ‖W‖ − ‖∇TW‖ / ‖TW‖ |

averaged over the layers (and, separately, for all weights as one vector), over a range of
``cob_range`` values r, for intra-landscape teleportations (absorb mode, τ ~ U[1−r, 1+r]),
mean ± std over seeds.  Inter-landscape teleports (insert mode, τ = ±U[1−r, 1+r] with the
same magnitudes) are run once per model as a check: a per-neuron sign flips the signs of
weights and gradients alike, so every norm above is unchanged.

Run: ``python -m experiments.gradient_change``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from experiments.common import (
    MODELS,
    Timer,
    inputs_for,
    loss_gradient,
    make_model,
    md_table,
    mnist,
    quiet,
    savefig,
    setup,
    write_section,
)

NAME = "gradient_change"
RANGES = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
SAMPLINGS = {"intra (absorb)": ("absorb", "intra_landscape")}
SIGN_CHECK = ("insert", "inter_landscape")


@dataclass
class Results:
    # (model, sampling label) -> array [len(RANGES), seeds] of the layer-averaged Δ
    layer_mean: dict[tuple[str, str], np.ndarray]
    # the same for all weights as one vector
    whole: dict[tuple[str, str], np.ndarray]
    # (model, sampling) -> relative change |ratio − 1| of ‖∇W‖/‖W‖, layer-averaged, same shape
    ratio: dict[tuple[str, str], np.ndarray]
    # model -> (Δ intra, Δ inter) at r = 0.9, seed 0
    sign_check: dict[str, tuple[float, float]]
    seeds: int
    seconds: float


def _relative(grad: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> np.ndarray:
    return np.array([(grad[n].norm() / params[n].norm()).item() for n in params])


def _whole(grad: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> float:
    g = torch.sqrt(sum((grad[n] ** 2).sum() for n in params))
    w = torch.sqrt(sum((params[n] ** 2).sum() for n in params))
    return (g / w).item()


def measure(model_name: str, mode: str, sampling: str, r: float, seed: int) -> tuple[float, ...]:
    from graphteleport.torch import teleport

    data = mnist()
    x, y = inputs_for(model_name, data.x_train[:1000]), data.y_train[:1000]
    model = make_model(model_name, seed)
    weights = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    g0 = loss_gradient(model, x, y)
    w0 = {n: p.detach().clone() for n, p in weights.items()}
    before, whole0 = _relative(g0, w0), _whole(g0, w0)
    with quiet():
        teleport(model, x[:8], mode=mode, sampling=sampling, cob_range=r, seed=seed)
    g1 = loss_gradient(model, x, y)
    w1 = {n: p.detach() for n, p in weights.items()}
    after, whole1 = _relative(g1, w1), _whole(g1, w1)
    return (float(np.abs(before - after).mean()), abs(whole0 - whole1),
            float(np.abs(after / before - 1).mean()))  # fmt: skip


def run(seeds: int = 5, ranges: Sequence[float] = RANGES) -> Results:
    timer = Timer()
    shape = (len(ranges), seeds)
    res = Results({}, {}, {}, {}, seeds, 0.0)
    for model_name in MODELS:
        for label, (mode, sampling) in SAMPLINGS.items():
            key = (model_name, label)
            res.layer_mean[key], res.whole[key], res.ratio[key] = (
                np.zeros(shape), np.zeros(shape), np.zeros(shape),
            )  # fmt: skip
            for i, r in enumerate(ranges):
                for s in range(seeds):
                    lm, wh, ra = measure(model_name, mode, sampling, r, s)
                    res.layer_mean[key][i, s], res.whole[key][i, s] = lm, wh
                    res.ratio[key][i, s] = ra
            print(f"  {model_name} {label}: {timer.seconds:.0f}s", flush=True)
        res.sign_check[model_name] = (
            res.layer_mean[model_name, next(iter(SAMPLINGS))][-1, 0],
            measure(model_name, *SIGN_CHECK, ranges[-1], 0)[0],
        )
    res.seconds = timer.seconds
    return res


def plot(res: Results, ranges: Sequence[float]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, model_name in zip(axes, MODELS):
        for k, label in enumerate(SAMPLINGS):  # one sampling; the sign check is in the text
            a = res.layer_mean[model_name, label]
            m, s = a.mean(1), a.std(1)
            ax.plot(ranges, m, marker="o", color=f"C{k}", label=f"{label}, layer mean")
            ax.fill_between(ranges, m - s, m + s, color=f"C{k}", alpha=0.2)
            w = res.whole[model_name, label].mean(1)
            ax.plot(ranges, w, ls="--", color=f"C{k}", label=f"{label}, all weights")
        ax.set_yscale("log")
        ax.set_xlabel("CoB range r")
        ax.set_ylabel("| ‖∇W‖/‖W‖ − ‖∇TW‖/‖TW‖ |")
        ax.set_title({"mlp": "5x500 ReLU MLP", "cnn": "small CNN"}[model_name], fontsize=10)
        ax.legend(fontsize=7)
    return savefig(fig, NAME)


def section(res: Results, ranges: Sequence[float] = RANGES) -> str:
    img = plot(res, ranges)
    header = ["model", "sampling"] + [f"r={r:g}" for r in ranges]
    rows = [
        [m, label] + [f"{a.mean(1)[i]:.2e}" for i in range(len(ranges))]
        for (m, label), a in res.layer_mean.items()
    ]
    ratio_rows = [
        [m, label] + [f"{100 * a.mean(1)[i]:.1f}%" for i in range(len(ranges))]
        for (m, label), a in res.ratio.items()
    ]
    first = next(iter(res.layer_mean))
    grow = {m: res.ratio[m, first[1]].mean(1) for m in MODELS}
    small = min(range(len(ranges)), key=lambda i: abs(ranges[i] - 0.1))
    lm = {m: res.layer_mean[m, first[1]].mean(1) for m in MODELS}
    monotone = all(bool(np.all(np.diff(v) > 0)) for v in lm.values())
    checks = "; ".join(f"{m}: {a:.6e} vs {b:.6e}" for m, (a, b) in res.sign_check.items())
    return f"""## 3. Gradient change versus CoB range

`python -m experiments.gradient_change` ({res.seconds:.0f} s)

Relative gradient magnitude of each weight tensor (Linear and Conv weights, biases left out)
before and after one intra-landscape teleport (absorb mode) at initialisation, on 1000 MNIST
training digits, as in the paper's Fig. 5: `Δ = | ‖∇W‖/‖W‖ − ‖∇TW‖/‖TW‖ |`, averaged over
the layers (solid, ± std over {res.seeds} seeds shaded) and for all weights as one vector
(dashed).

![gradient change]({img})

Layer-averaged Δ (mean over seeds):

{md_table(header, rows)}

The same change relative to the value before, `|(‖∇TW‖/‖TW‖) / (‖∇W‖/‖W‖) − 1|`,
layer-averaged (mean over seeds):

{md_table(header, ratio_rows)}

Δ {"grows monotonically" if monotone else "does not grow monotonically"} with the CoB range,
as in the paper.  At r = {ranges[-1]:g} each layer's relative gradient magnitude ‖∇W‖/‖W‖ is
changed by {100 * grow["mlp"][-1]:.0f}% on average per layer for the MLP and
{100 * grow["cnn"][-1]:.0f}% for the CNN (up or down: the layers' changes have both signs), at
r = {ranges[small]:g} by {100 * grow["mlp"][small]:.1f}% and {100 * grow["cnn"][small]:.1f}%.

**Signs do not matter here.**  An inter-landscape teleport (random signs, insert mode) with
the same |τ| gives the same Δ at r = {ranges[-1]:g} (intra vs inter, seed 0 — {checks}): a
per-neuron sign flips the signs of the affected weights and of their gradients together, an
isometry.  The same argument goes further: a
teleport is a fixed diagonal reparametrisation `W' = S ⊙ W`, so one SGD step on `W'` maps
back to `W ← W − lr · S⁻² ⊙ ∇L(W)` — a diagonal preconditioner that depends on τ² only.
"""


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    setup()
    res = run(args.seeds)
    text = section(res)
    print(f"wrote {write_section(NAME, text)} ({res.seconds:.0f}s)")
    return text


if __name__ == "__main__":
    main()

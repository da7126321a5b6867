"""Experiment 5: teleportation moves along a level curve of the loss; a straight line does not.

A network ``W`` and its teleport ``TW = S ⊙ W`` (absorb mode, positive cofactors τ) have the
same loss.  Along the straight line ``W(t) = (1 − t) W + t TW`` the loss changes in between;
along the teleportation path ``τ(t) = τ^t`` — weights ``W ⊙ S^t``, since every entry of ``S``
is a product of powers of τ — it stays constant for every t ∈ [0, 1] (the paper's Fig. 3).

The path's weights are computed from the ``S`` of one teleport and checked at t = ½ against a
real ``teleport(values=τ^½)``.  Models: the paper's 5x500 ReLU MLP and a small CNN, briefly
trained (``TRAIN_EPOCHS`` epochs) so the loss is that of a useful network; loss on the first
1000 training digits.

Run: ``python -m experiments.level_curves``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from experiments.common import (
    MODELS,
    Timer,
    deepcopy,
    inputs_for,
    loss_and_accuracy,
    make_model,
    md_table,
    mnist,
    quiet,
    savefig,
    setup,
    train_epochs,
    write_section,
)

NAME = "level_curves"
RANGES = (0.5, 0.9)  # intra-landscape CoB ranges: τ ~ U[1 − r, 1 + r]
TS = np.linspace(0.0, 1.0, 41)
TRAIN_EPOCHS = 5
N_LOSS = 1000


@dataclass
class Results:
    # (model, r) -> (straight-line losses, teleport-path losses) over TS
    curves: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    path_check: float = 0.0  # max relative difference of W ⊙ S^½ vs teleport(values=τ^½)
    seconds: float = 0.0


def _loss_at(model: torch.nn.Module, name: str, weights: dict[str, torch.Tensor]) -> float:
    data = mnist()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    x, y = inputs_for(name, data.x_train[:N_LOSS]), data.y_train[:N_LOSS]
    return loss_and_accuracy(model, x, y)[0]


def trained(name: str, seed: int = 0) -> torch.nn.Module:
    model = make_model(name, seed)
    train_epochs(model, name, mnist(), epochs=TRAIN_EPOCHS, lr=1e-2, momentum=0.9, batch=64,
                 seed=seed)  # fmt: skip
    return model


def curves_for(
    model: torch.nn.Module, name: str, r: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    from graphteleport.torch import teleport

    data = mnist()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    example = inputs_for(name, data.x_train[:8])
    with quiet():
        result = teleport(deepcopy(model), example, sampling="intra_landscape", cob_range=r,
                          seed=seed)  # fmt: skip
    s = {n: result.scales.get(n, torch.ones_like(w)) for n, w in w0.items()}
    w1 = {n: w * s[n] for n, w in w0.items()}
    probe = deepcopy(model)
    line = np.array([_loss_at(probe, name, {n: (1 - t) * w0[n] + t * w1[n] for n in w0})
                     for t in TS])  # fmt: skip
    path = np.array([_loss_at(probe, name, {n: w0[n] * s[n] ** t for n in w0}) for t in TS])
    half = deepcopy(model)
    with quiet():
        teleport(half, example, values=np.asarray(result.pair_values) ** 0.5)
    got = dict(half.named_parameters())
    check = max(
        ((got[n].detach() - w0[n] * s[n] ** 0.5).abs().max() / w0[n].abs().max()).item() for n in w0
    )
    return line, path, check


def run(ranges: Sequence[float] = RANGES) -> Results:
    timer = Timer()
    res = Results()
    for name in MODELS:
        model = trained(name)
        for r in ranges:
            line, path, check = curves_for(model, name, r)
            res.curves[name, r] = (line, path)
            res.path_check = max(res.path_check, check)
    res.seconds = timer.seconds
    return res


def plot(res: Results) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(11, 3.8))
    for ax, name in zip(axes, MODELS):
        for k, r in enumerate(sorted({r for _, r in res.curves})):
            line, path = res.curves[name, r]
            ax.plot(TS, line, color=f"C{k}", label=f"straight line, r={r:g}")
            ax.plot(TS, path, color=f"C{k}", ls="--", label=f"teleport path τ^t, r={r:g}")
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_ylabel("training loss")
        ax.set_title({"mlp": "5x500 ReLU MLP", "cnn": "small CNN"}[name], fontsize=10)
        ax.legend(fontsize=7)
    return savefig(fig, NAME)


def section(res: Results) -> str:
    img = plot(res)
    rows = []
    for (name, r), (line, path) in res.curves.items():
        ends = 0.5 * (line[0] + line[-1])
        rows.append([
            name, f"{r:g}", f"{line[0]:.4f}", f"{line[-1]:.4f}",
            f"{line.min():.4f} ({line.min() / ends:.2f}x)",
            f"{line.max():.4f} ({line.max() / ends:.2f}x)",
            f"{(np.abs(path - path[0]) / path[0]).max():.1e}",
        ])  # fmt: skip
    header = ["model", "r", "loss at W", "loss at TW", "min on straight line",
              "max on straight line", "max rel. change on τ^t path"]  # fmt: skip
    moved = max(
        max(abs(line.max() - line[0]), abs(line.min() - line[0])) / line[0]
        for line, _ in res.curves.values()
    )
    return f"""## 5. Level curves: the straight line versus the teleportation path

`python -m experiments.level_curves` ({res.seconds:.0f} s)

A briefly trained network `W` ({TRAIN_EPOCHS} epochs, SGD lr 1e-2, momentum 0.9) and its
intra-landscape teleport `TW = S ⊙ W` (absorb mode, τ ~ U[1 − r, 1 + r]) have the same
training loss.  The straight line `(1 − t) W + t TW` leaves the level set; the teleportation
path `τ(t) = τ^t`, i.e. weights `W ⊙ S^t`, stays on it for all t (cross-entropy on {N_LOSS}
training digits, {len(TS)} values of t).  The path's weights were checked against a real
`teleport(values=τ^½)` at t = ½: max relative difference {res.path_check:.1e}.

{md_table(header, rows)}

![level curves]({img})

The loss along the teleportation path is constant to float32 rounding; along the straight line
between the same two points it moves by up to {100 * moved:.0f}% of its value.  The line need
not rise: for one hidden ReLU layer, `(1 − t + tτ)(1 − t + t/τ) ≥ 1`, so every neuron's
contribution to the output is *amplified* along the line (by up to 3x at t = ½ for τ = 0.1),
which for a partly trained classifier can lower the cross-entropy before it raises it — the
two equal-loss points are joined by a curved level set, not by the chord.  (The path needs
τ > 0: `τ^t` of a negative cofactor is not real, so inter-landscape teleports have no such
path.)
"""


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    setup()
    res = run()
    text = section(res)
    print(f"wrote {write_section(NAME, text)} ({res.seconds:.0f}s)")
    return text


if __name__ == "__main__":
    main()

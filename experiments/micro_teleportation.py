"""Experiment 2: micro-teleportations are orthogonal to the loss gradient.

The loss is constant on a teleportation orbit, so its gradient is orthogonal to the orbit's
tangent space.  For the paper's 5x500 ReLU MLP at initialisation, on 4000 real MNIST digits,
the angle between ``∇_W L`` and

* the exact orbit tangent ``dW/dε`` at τ = 1 (``graphteleport.torch.orbit_tangent``, a
  random standard-normal direction per cofactor),
* the actual displacement ``W' − W`` of a teleport with ``cob_range = 1e-3`` (intra-landscape,
  τ ~ U[0.999, 1.001]; second-order terms included),
* a random standard-normal direction in parameter space (the control),

is measured for ``--directions`` draws each (the paper's Fig. 4).

Run: ``python -m experiments.micro_teleportation``
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from experiments.common import (
    Timer,
    angle_deg,
    loss_gradient,
    make_model,
    md_table,
    mnist,
    quiet,
    savefig,
    setup,
    write_section,
)

NAME = "micro_teleportation"
COB_RANGE = 1e-3


@dataclass
class Results:
    angles: dict[str, np.ndarray]
    dim: int
    free: int
    directions: int
    seconds: float


def run(directions: int = 40, model_name: str = "mlp") -> Results:
    from graphteleport.torch import orbit_tangent, teleport

    timer = Timer()
    data = mnist()
    model = make_model(model_name, 0)
    x, y = data.x_train, data.y_train
    example = x[:8]
    grad = loss_gradient(model, x, y)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    with quiet():
        probe = teleport(model, example, seed=0, cob_range=COB_RANGE)
        probe.undo()
    pairs, free = probe.pair_values.size, probe.free_cofactors
    angles: dict[str, list[float]] = {"orbit tangent": [], "teleport W'−W": [], "random": []}
    params = dict(model.named_parameters())
    for k in range(directions):
        with quiet():
            tangent = orbit_tangent(model, example, rng.standard_normal(pairs))
        angles["orbit tangent"].append(angle_deg(grad, _on_params(tangent, grad)))
        before = {n: p.detach().clone() for n, p in params.items()}
        with quiet():
            result = teleport(model, example, seed=1000 + k, cob_range=COB_RANGE)
        moved = {n: params[n].detach() - before[n] for n in grad}
        result.undo()
        for n, p in params.items():  # exact restore: undo is exact only in exact mode
            p.data.copy_(before[n])
        angles["teleport W'−W"].append(angle_deg(grad, moved))
        rand = {n: torch.randn(g.shape, generator=gen) for n, g in grad.items()}
        angles["random"].append(angle_deg(grad, rand))
    dim = sum(p.numel() for p in params.values())
    arrays = {k: np.array(v) for k, v in angles.items()}
    return Results(arrays, dim, free, directions, timer.seconds)


def _on_params(
    d: dict[str, torch.Tensor], like: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A direction on every parameter (zero where the teleport does not move it)."""
    return {n: d[n] if n in d else torch.zeros_like(g) for n, g in like.items()}


def plot(res: Results) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (label, a) in zip(axes, res.angles.items()):
        dev = a - 90.0
        ax.hist(dev, bins=25, color="C0" if label != "random" else "C3")
        ax.set_title(f"{label}\nmean {a.mean():.6f}°, std {a.std():.2e}°", fontsize=9)
        ax.set_xlabel("angle − 90°  (degrees)")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    axes[0].set_ylabel("count")
    fig.suptitle(
        f"Angle between ∇L and a direction, {res.directions} draws each "
        f"(5x500 ReLU MLP, MNIST, {res.dim:,} parameters)", fontsize=10, y=1.08,
    )  # fmt: skip
    first = savefig(fig, NAME)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    lo = min(a.min() for a in res.angles.values())
    hi = max(a.max() for a in res.angles.values())
    bins = np.linspace(lo, hi, 60)
    for k, (label, a) in enumerate(res.angles.items()):
        ax.hist(a, bins=bins, alpha=0.6, label=label, color=f"C{[0, 2, 3][k]}")
    ax.set_xlabel("angle (degrees)")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    ax.set_title("same data, one axis (the paper's Fig. 4 view)", fontsize=10)
    savefig(fig, NAME + "_overlay")
    return first


def section(res: Results) -> str:
    img = plot(res)
    rows = [
        [label, f"{a.mean():.6f}", f"{a.std():.2e}", f"{np.abs(a - 90).max():.2e}"]
        for label, a in res.angles.items()
    ]
    expected = math.degrees(1 / math.sqrt(res.dim))
    return f"""## 2. Micro-teleportation: the gradient is orthogonal to the orbit

`python -m experiments.micro_teleportation` ({res.seconds:.0f} s)

The paper's 5x500 ReLU MLP at initialisation ({res.dim:,} parameters, {res.free:,} free
cofactors), gradient of the cross-entropy on the 4000 training digits.  {res.directions}
directions of each kind: the exact orbit tangent `orbit_tangent` (random normal direction
per cofactor), the actual displacement `W' − W` of a teleport with `cob_range = {COB_RANGE}`
(τ ~ U[0.999, 1.001], second-order terms included), and a random normal direction in
parameter space.

{md_table(["direction", "mean angle (°)", "std (°)", "max abs(angle − 90°)"], rows)}

![micro-teleportation angles]({img})

![overlay](img/{NAME}_overlay.png)

The orbit tangent is orthogonal to the gradient to float precision.  The actual
micro-teleport displacement deviates from 90° only by its second-order term (of relative
size ~ r).  Random directions are *also* nearly orthogonal in {res.dim:,} dimensions — the
angle's spread is about `57.3° / sqrt(dim)` = {expected:.3f}° — but they are spread by that
much on both sides of 90°, orders of magnitude more than the micro-teleportations: the
orthogonality of micro-teleportations is structural, not an effect of high dimension.
"""


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directions", type=int, default=40)
    args = parser.parse_args(argv)
    setup()
    res = run(args.directions)
    text = section(res)
    for label, a in res.angles.items():
        print(f"  {label}: mean {a.mean():.6f}°, std {a.std():.2e}°")
    print(f"wrote {write_section(NAME, text)} ({res.seconds:.0f}s)")
    return text


if __name__ == "__main__":
    main()

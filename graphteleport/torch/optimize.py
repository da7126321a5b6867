"""Teleports that optimize: gradient ascent (or descent) of an objective over the orbit.

:func:`optimize` moves a module along its orbit to where an objective of the weights is
larger (Zhao et al., NeurIPS 2022: teleport to a larger gradient norm, then train), on any
graph the torch analysis handles, through the *exact* orbit map — data-free: the map
``u ↦ W(u)`` (:class:`~graphteleport.torch.orbitmap.OrbitMap`, BatchNorm's ε correction
included) does not depend on the batch; only the objective does.

**The variables.**  ``u = log t`` of the movable cofactor pairs (free, group any or
positive), starting at ``u = 0`` (the module as it is); every other pair keeps ``t = 1``,
so the function is kept at every ``u``.

**The objectives** (``L(W) = loss_fn(model_W(inputs), target)`` on the one ``batch``):

* ``"grad_norm"``: ``‖∇_W L(W(u))‖²``, summed over the parameters that require grad
  (double backward through :func:`torch.func.functional_call`);
* ``"sharpness"``: the Hutchinson estimate of the Hessian's trace,
  ``(1/K) Σ_k v_kᵀ ∇²_W L(W(u)) v_k`` over ``K = probes`` Rademacher vectors ``v_k`` drawn
  once from ``seed`` (the same vectors at every ``u``, so the objective is a deterministic
  function of ``u``; its expectation over ``v`` is ``tr ∇²_W L``);
* a callable ``objective(params, model, batch) -> scalar tensor``, ``params`` every
  parameter and buffer by name at ``W(u)`` (for :func:`torch.func.functional_call`).

Every evaluation runs under a fixed RNG seed (dropout draws the same masks each time).
BatchNorm's running statistics move with ``u`` and ``torch.batch_norm`` gives them no
gradient, so while the objective is evaluated an eval-mode BatchNorm module computes
``(x − rm)/√(rv + ε)·γ + β`` by plain ops (its own ``forward`` is restored after); a
train-mode one reads batch statistics and writes its running statistics into copies.

**The steps.**  Each step goes along the gradient ``g = ∂objective/∂u`` scaled to
``max |g| = 1``, so ``lr`` is the largest change of any ``log t`` in one step; ``u`` is
clamped to ``|u| ≤ max_log`` (weights stay finite).  A step is taken only if it raises
the objective (lowers it, with ``maximize=False``); otherwise ``lr`` is halved and the step
tried again (at most :data:`HALVINGS` times: then the ascent stops, at a point no step
improves); after a step is taken ``lr`` doubles again, up to the ``lr`` given.  So the
recorded objective is strictly monotone.

At the end the module is teleported in place by ``t = exp(u)``
(:meth:`graphteleport.torch.Teleporter.teleport`, the same rewrite as
:func:`graphteleport.torch.teleport`): an optimizer created before keeps updating the
tensors, and :meth:`Optimized.undo` puts them back.  Only ``mode="absorb"`` is offered:
insert mode's activation Muls are not part of the map.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from graphteleport.errors import InputError
from graphteleport.frontends.torch import as_args
from graphteleport.torch.orbitmap import OrbitMap
from graphteleport.torch.result import TorchTeleport
from graphteleport.torch.teleporter import Teleporter

Params = Mapping[str, torch.Tensor]
ObjectiveFn = Callable[[Params, nn.Module, Any], torch.Tensor]
OBJECTIVES = ("grad_norm", "sharpness")
HALVINGS = 30  # step halvings before the ascent stops


@dataclass
class Optimized:
    """What :func:`optimize` did: the teleport it applied (``teleport``, a
    :class:`~graphteleport.torch.TorchTeleport`: ``undo()``, ``pair_values`` for
    :func:`~graphteleport.torch.compose`) and the ascent: ``objective`` at ``u = 0`` and
    after each step taken, ``u`` (``log t`` per pair, 0 off the movable pairs), the steps
    taken and the trial steps refused, the last ``lr``, whether it stopped early (no step
    of ``lr / 2^HALVINGS`` improved, the gradient vanished, or no pair is movable) and
    the objective's ``name``."""

    teleport: TorchTeleport
    objective: list[float]
    u: np.ndarray
    taken: int
    refused: int
    lr: float
    stopped: bool = False
    name: str = "grad_norm"

    @property
    def pair_values(self) -> np.ndarray:
        """``t`` per cofactor pair (``exp(u)``; 1 off the movable pairs)."""
        return self.teleport.pair_values

    @property
    def tau(self) -> np.ndarray:
        """``τ`` per neuron."""
        return self.teleport.tau

    @property
    def gain(self) -> float:
        """The objective at the end over the objective at the start."""
        return self.objective[-1] / self.objective[0] if self.objective[0] else math.inf

    def undo(self) -> None:
        """Put the module's tensors back (:meth:`TorchTeleport.undo`)."""
        self.teleport.undo()


def optimize(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: tuple[Any, Any],
    *,
    objective: str | ObjectiveFn = "grad_norm",
    steps: int = 10,
    lr: float = 0.1,
    maximize: bool = True,
    mode: str = "absorb",
    max_log: float = 5.0,
    probes: int = 4,
    seed: int = 0,
) -> Optimized:
    """Teleport ``model`` in place to a point of its orbit where ``objective`` is larger
    (``maximize=False``: smaller), by at most ``steps`` gradient steps over ``u = log t``
    of the movable cofactor pairs (module docstring).

    ``batch`` is ``(inputs, target)``: ``inputs`` a tensor, a tuple of positional or a
    dict of keyword inputs (also the example inputs the module is traced on), and the
    loss ``loss_fn(model(inputs), target)``.  ``objective``: ``"grad_norm"``,
    ``"sharpness"`` (Hutchinson, ``probes`` Rademacher vectors from ``seed``) or a callable
    ``(params, model, batch) -> scalar``.  ``lr``: the largest change of any ``log t`` in
    one step; ``max_log``: the bound on ``|log t|``.
    """
    inputs = _check(batch, objective, steps, lr, mode, max_log, probes)
    teleporter = Teleporter(model, inputs, mode="absorb")
    orbit = OrbitMap(teleporter.graph, teleporter.analysis)
    evaluate = _Evaluator(model, orbit, loss_fn, batch, objective, probes, seed)
    sign = 1.0 if maximize else -1.0
    ascent = _ascend(evaluate, sign, orbit.size, steps, lr, max_log)
    values = orbit.pair_values(ascent.u)
    done = teleporter.teleport(values=values)
    u_pairs = np.zeros(orbit.num_pairs)
    u_pairs[orbit.columns] = ascent.u
    name = objective if isinstance(objective, str) else getattr(objective, "__name__", "custom")
    return Optimized(
        done, ascent.history, u_pairs, ascent.taken, ascent.refused, ascent.lr, ascent.stopped, name
    )


def _check(
    batch: Any, objective: Any, steps: int, lr: float, mode: str, max_log: float, probes: int
) -> Any:
    """The inputs of ``batch``, after every argument is checked (``InputError``)."""
    if isinstance(objective, str) and objective not in OBJECTIVES:
        raise InputError(
            f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)} or a callable"
        )
    if not isinstance(objective, str) and not callable(objective):
        raise InputError(f"objective must be a name or a callable, not {type(objective).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps must be an integer ≥ 0 (got {steps!r})")
    for label, value in (("lr", lr), ("max_log", max_log)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise InputError(f"{label} must be a finite number > 0 (got {value!r})")
    if mode != "absorb":
        raise InputError(f"optimize supports mode='absorb' only (got {mode!r})")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise InputError(f"probes must be an integer ≥ 1 (got {probes!r})")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise InputError("batch must be a pair (inputs, target)")
    return batch[0]


@dataclass
class _Ascent:
    u: np.ndarray
    history: list[float]
    taken: int = 0
    refused: int = 0
    lr: float = 0.0
    stopped: bool = False


def _ascend(
    evaluate: _Evaluator, sign: float, size: int, steps: int, lr: float, max_log: float
) -> _Ascent:
    """Backtracking ascent of ``sign · objective`` over ``u`` (module docstring)."""
    u = np.zeros(size)
    value, grad = evaluate(u, need_grad=steps > 0 and size > 0)
    out = _Ascent(u, [value], lr=lr)
    if size == 0:
        out.stopped = steps > 0
        return out
    step = lr
    for _ in range(steps):
        g = sign * grad
        top = float(np.abs(g).max())
        if not (math.isfinite(top) and top > 0):
            out.stopped = True
            break
        found = _backtrack(evaluate, sign, u, value, g / top, step, max_log, out)
        if found is None:
            out.stopped = True
            break
        u, value, step = found
        out.u, out.lr = u, step
        out.history.append(value)
        out.taken += 1
        step = min(2 * step, lr)
        if out.taken < steps:
            _, grad = evaluate(u, need_grad=True)  # (the value compared stays the trial's)
    return out


def _backtrack(
    evaluate: _Evaluator,
    sign: float,
    u: np.ndarray,
    value: float,
    direction: np.ndarray,
    step: float,
    max_log: float,
    out: _Ascent,
) -> tuple[np.ndarray, float, float] | None:
    """The first of ``step, step/2, …`` (``HALVINGS`` halvings) whose clamped step strictly
    improves ``sign · objective``: the new ``u``, its objective and the step; None if none
    does."""
    for _ in range(HALVINGS + 1):
        trial = np.clip(u + step * direction, -max_log, max_log)
        if not np.array_equal(trial, u):
            new, _ = evaluate(trial, need_grad=False)
            if math.isfinite(new) and sign * new > sign * value:
                return trial, new, step
        out.refused += 1
        step /= 2
    return None


class _Evaluator:
    """The objective at ``u`` and, on request, its gradient in ``u`` (float64)."""

    def __init__(
        self,
        model: nn.Module,
        orbit: OrbitMap,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        batch: tuple[Any, Any],
        objective: str | ObjectiveFn,
        probes: int,
        seed: int,
    ) -> None:
        self.model, self.orbit, self.loss_fn, self.batch = model, orbit, loss_fn, batch
        self.objective, self.probes, self.seed = objective, probes, seed
        self.args, self.kwargs = as_args(batch[0])
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if isinstance(objective, str) and not self.trainable:
            raise InputError(f"objective {objective!r} needs parameters that require grad")
        self.devices = sorted({t.device.index for t in model.parameters() if t.is_cuda})
        self.probe_vectors: list[dict[str, torch.Tensor]] | None = None
        self.frozen = _train_mode_statistics(model)  # read by nothing, written by forwards

    def __call__(self, u: np.ndarray, *, need_grad: bool) -> tuple[float, np.ndarray]:
        uu = torch.from_numpy(np.asarray(u, dtype=np.float64)).requires_grad_(need_grad)
        with torch.random.fork_rng(devices=self.devices), _differentiable_batchnorm(self.model):
            torch.manual_seed(self.seed)
            with torch.enable_grad():
                value = self._objective(self.params(uu), create_graph=need_grad)
        if not need_grad:
            return float(value.detach()), np.zeros(0)
        (grad,) = torch.autograd.grad(value, uu, allow_unused=True)
        g = np.zeros(uu.numel()) if grad is None else grad.detach().cpu().numpy()
        return float(value.detach()), g

    def params(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every parameter and buffer (each tensor once) at ``W(u)``: the moved ones from
        the orbit map, the rest as leaves that require grad (parameters) or as they are;
        BatchNorm statistics a train-mode forward writes are copies."""
        moved = self.orbit(u)
        out: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            t = moved.get(name, p)
            if not t.requires_grad or t is p:  # a leaf of its own (u without grad: all)
                t = t.detach().requires_grad_(p.requires_grad)
            out[name] = t
        for name, b in self.model.named_buffers():
            t = moved.get(name, b)
            out[name] = t.detach().clone() if name in self.frozen else t
        return out

    def _objective(self, params: dict[str, torch.Tensor], create_graph: bool) -> torch.Tensor:
        if callable(self.objective):
            value = self.objective(params, self.model, self.batch)
            return value if isinstance(value, torch.Tensor) else torch.as_tensor(float(value))
        loss = self.loss_fn(
            functional_call(self.model, params, self.args, self.kwargs), self.batch[1]
        )
        wrt = [params[n] for n in self.trainable]
        second = create_graph or self.objective == "sharpness"  # H·v differentiates again
        found = torch.autograd.grad(loss, wrt, create_graph=second, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, found)]
        if self.objective == "grad_norm":
            return sum((g.pow(2).sum() for g in grads), torch.zeros((), dtype=grads[0].dtype))
        return self._hutchinson(wrt, grads, create_graph)

    def _hutchinson(
        self, wrt: list[torch.Tensor], grads: list[torch.Tensor], create_graph: bool
    ) -> torch.Tensor:
        """``(1/K) Σ_k v_kᵀ H v_k`` with the fixed Rademacher ``v_k`` (module docstring)."""
        if self.probe_vectors is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.probe_vectors = [
                {n: _rademacher(w, gen) for n, w in zip(self.trainable, wrt)}
                for _ in range(self.probes)
            ]
        total = torch.zeros((), dtype=grads[0].dtype)
        for k, v in enumerate(self.probe_vectors):
            gv = torch.stack([(g * v[n]).sum() for n, g in zip(self.trainable, grads)]).sum()
            last = k == len(self.probe_vectors) - 1
            hv = torch.autograd.grad(
                gv, wrt, create_graph=create_graph, retain_graph=not last or create_graph,
                allow_unused=True,
            )  # fmt: skip
            total = total + sum(
                (h * v[n]).sum() for n, h in zip(self.trainable, hv) if h is not None
            )
        return total / len(self.probe_vectors)


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, tuple(like.shape), generator=gen).to(like.dtype) * 2 - 1
    return signs.to(like.device)


def _train_mode_statistics(model: nn.Module) -> set[str]:
    """The running statistics of BatchNorm layers in train mode (a forward updates them in
    place; the output does not read them), by buffer name."""
    out: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            prefix = f"{path}." if path else ""
            out.update(prefix + n for n, _ in module.named_buffers(recurse=False))
    return out


@contextlib.contextmanager
def _differentiable_batchnorm(model: nn.Module) -> Iterator[None]:
    """Eval-mode BatchNorm modules computed as ``(x − rm)/sqrt(rv + ε)·γ + β`` by plain ops
    while the context lasts (``torch.batch_norm`` refuses gradients for the running
    statistics, which move with ``u``); their own ``forward`` is restored after."""
    patched = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not m.training
        and m.running_mean is not None
        and m.running_var is not None
    ]
    for m in patched:
        m.forward = _eval_batch_norm.__get__(m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _eval_batch_norm(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm over channel axis 1, differentiable in every tensor."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    assert self.running_mean is not None and self.running_var is not None
    y = (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)
    if self.weight is not None:
        y = y * self.weight.view(shape)
    if self.bias is not None:
        y = y + self.bias.view(shape)
    return y

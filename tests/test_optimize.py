"""``graphteleport.torch.optimize``: teleports that raise (or lower) an objective.

What is checked: the recorded objective rises strictly at every step taken and ends higher
(an MLP and a small CNN with BatchNorm, gradient norm and Hutchinson sharpness, and a user
callable); the objective recomputed on the teleported module equals the last one recorded
(the orbit map is the rewrite); the function is kept (outputs on fresh random inputs agree
to 1e-5 relative, eval mode, and train mode on the batch for BatchNorm); the weights did
move; ``undo`` puts them back; ``maximize=False`` lowers the objective; bad arguments raise
:class:`InputError`.  :class:`OrbitMap` at a random ``u`` equals the teleport by
``exp(u)`` on several registry models (BatchNorm's ε correction included).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from graphteleport.errors import InputError  # noqa: E402
from graphteleport.torch import Optimized, OrbitMap, Teleporter, optimize  # noqa: E402
from models.architectures import ARCHITECTURES, build, mlp  # noqa: E402

pytestmark = pytest.mark.torch

RTOL = 1e-5
BATCH = 8


def _setup(name: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[int, ...]]:
    model, shape = ARCHITECTURES[name]()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *shape[1:], generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    return model, (x, y), shape


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def _assert_rises(result: Optimized, sign: float = 1.0) -> None:
    history = np.asarray(result.objective)
    assert result.taken == len(history) - 1 >= 1
    assert np.all(sign * np.diff(history) > 0), history
    assert sign * (history[-1] - history[0]) > 0


@pytest.mark.parametrize(
    ("name", "objective", "steps"),
    [("mlp", "grad_norm", 6), ("cnn2d", "grad_norm", 4), ("mlp", "sharpness", 3)],
)
def test_objective_rises_and_function_is_kept(name: str, objective: str, steps: int) -> None:
    model, batch, shape = _setup(name)
    reference = copy.deepcopy(model)
    result = optimize(model, F.cross_entropy, batch, objective=objective, steps=steps, lr=0.5)
    _assert_rises(result)
    assert result.gain > 1.5  # a real rise, not rounding
    # the objective recomputed on the teleported module is the last one recorded
    again = optimize(model, F.cross_entropy, batch, objective=objective, steps=0)
    assert again.objective[0] == pytest.approx(result.objective[-1], rel=1e-3)
    assert np.all(again.pair_values == 1.0)
    # the weights moved, the function did not
    moved = max(_rel(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert moved > 0.1
    x = torch.randn(16, *shape[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _rel(model(x), reference(x)) < RTOL
        model.train(), reference.train()
        assert _rel(model(batch[0]), reference(batch[0])) < RTOL  # BatchNorm: train form
    result.undo()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert _rel(p.detach(), q.detach()) < 1e-6


def test_minimize_lowers_the_objective() -> None:
    model, batch, _ = _setup("mlp")
    result = optimize(model, F.cross_entropy, batch, steps=4, lr=0.5, maximize=False)
    _assert_rises(result, sign=-1.0)


def test_callable_objective() -> None:
    """A user objective of the parameters: the squared norm of the first layer's weight."""
    model, batch, _ = _setup("mlp")

    def first_layer(params: Mapping[str, torch.Tensor], _m: nn.Module, _b: object) -> torch.Tensor:
        return params["0.weight"].pow(2).sum()

    before = float(model[0].weight.detach().pow(2).sum())
    result = optimize(model, F.cross_entropy, batch, objective=first_layer, steps=3, lr=0.3)
    _assert_rises(result)
    assert result.objective[0] == pytest.approx(before, rel=1e-6)
    assert float(model[0].weight.detach().pow(2).sum()) == pytest.approx(
        result.objective[-1], rel=1e-5
    )
    assert result.name == "first_layer"


def test_clamp_bounds_log_cofactors() -> None:
    model, batch, _ = _setup("mlp")
    result = optimize(model, F.cross_entropy, batch, steps=8, lr=1.0, max_log=0.25)
    assert np.abs(result.u).max() <= 0.25 + 1e-12
    assert np.all(np.abs(np.log(result.pair_values)) <= 0.25 + 1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objective": "curvature"}, "unknown objective"),
        ({"objective": 3}, "objective must be"),
        ({"steps": -1}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"max_log": -1.0}, "max_log"),
        ({"mode": "insert"}, "absorb"),
        ({"probes": 0}, "probes"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    model, batch, _ = _setup("mlp")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=match):
        optimize(model, F.cross_entropy, batch, **kwargs)  # type: ignore[arg-type]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])  # nothing changed


def test_batch_must_be_a_pair() -> None:
    model, batch, _ = _setup("mlp")
    with pytest.raises(InputError, match="pair"):
        optimize(model, F.cross_entropy, batch[0])


@pytest.mark.parametrize("name", ["mlp", "cnn2d", "residual_mlp", "resnet18"])
def test_orbit_map_is_the_teleport(name: str) -> None:
    """``W(u)`` of the map equals the module after the teleport by ``t = exp(u)``."""
    model, batch, _ = _setup(name)
    teleporter = Teleporter(model, batch[0])
    orbit = OrbitMap(teleporter.graph, teleporter.analysis)
    u = np.random.default_rng(0).normal(scale=0.5, size=orbit.size)
    with torch.no_grad():
        mapped = orbit(torch.from_numpy(u))
    before = copy.deepcopy(model.state_dict())
    assert max(_rel(w, before[k]) for k, w in mapped.items()) > 0.1  # the map moves them
    teleporter.teleport(values=orbit.pair_values(u))
    state = model.state_dict()
    for key, w in mapped.items():
        assert _rel(w, state[key]) < 1e-6, key


def test_train_mode_batchnorm_statistics_untouched() -> None:
    """Evaluating the objective in train mode runs forwards, which update BatchNorm's
    running statistics; optimize leaves them to the teleport alone: the module ends as a
    copy teleported by the same pair values."""
    model, batch, _ = _setup("cnn2d")
    model.train()
    twin = copy.deepcopy(model)
    result = optimize(model, F.cross_entropy, batch, steps=2, lr=0.5)
    _assert_rises(result)
    Teleporter(twin, batch[0]).teleport(values=result.pair_values)
    expected = twin.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_orbit_map_with_element_maps() -> None:
    """BERT's attention reads weights through element maps (``Absorb.index``): the map
    scatters each use's ``S`` as the rewrite does."""
    pytest.importorskip("transformers")
    from models.hf import HF_MODELS

    model, inputs = HF_MODELS["bert"].build(0)
    teleporter = Teleporter(model, inputs)
    assert any(ab.index is not None for w in teleporter.analysis.weights for ab in w.uses)
    orbit = OrbitMap(teleporter.graph, teleporter.analysis)
    u = np.random.default_rng(0).normal(scale=0.3, size=orbit.size)
    with torch.no_grad():
        mapped = orbit(torch.from_numpy(u))
    teleporter.teleport(values=orbit.pair_values(u))
    state = model.state_dict()
    for key, w in mapped.items():
        assert _rel(w, state[key]) < 1e-6, key


def test_nothing_movable() -> None:
    """An MLP with odd activations only has sign pairs: no ``log t`` to move, the module
    is left as it is and the result says the ascent stopped."""
    model, _ = build(mlp, depth=2, width=8, activation="tanh", in_features=6)
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(4, 6), torch.randint(0, 10, (4,))
    result = optimize(model, F.cross_entropy, (x, y), steps=3)
    assert result.stopped and result.taken == 0 and len(result.objective) == 1
    assert np.all(result.pair_values == 1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n != "mlp_5x500"])
def test_registry_models_rise(name: str) -> None:
    """One step on every registry model (but the 2500-neuron MLP): the gradient norm rises
    and the function is kept (classifiers: cross-entropy; the U-Net: mean squared error)."""
    model, shape = ARCHITECTURES[name]()
    x = torch.randn(4, *shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    if out.dim() == 2:
        loss, y = F.cross_entropy, torch.randint(0, out.shape[1], (4,))
    else:
        loss, y = F.mse_loss, torch.randn_like(out)
    reference = copy.deepcopy(model)
    result = optimize(model, loss, (x, y), steps=1, lr=0.5)
    _assert_rises(result)
    with torch.no_grad():
        assert _rel(model(x), reference(x)) < RTOL

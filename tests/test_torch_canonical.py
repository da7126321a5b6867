"""``graphteleport.torch.canonicalize`` and the sign rule of the canonical form.

What is checked: the canonical form of a module and of its random teleports coincide
(every float tensor to 1e-5 of its largest element, 3 seeds, an MLP, a CNN with
BatchNorm, a residual MLP and a ResNet-18), the function is kept (eval mode, and train
mode on the example batch), canonicalizing is idempotent and lowers ``Σ W²``, ``undo``
restores the module.  The sign rule: teleports with negative cofactors (odd activations:
``sign`` pairs; no activation: ``any`` pairs; with and without biases, so that some pairs
are decided only in later rounds) share the canonical form, for modules and for ONNX
models (:class:`CanonicalizePass`); without the rule they do not (the tests can fail).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import gemm_mlp, max_rel_err, weights

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import graphteleport.passes.canonical as canonical_pass  # noqa: E402
import graphteleport.torch.canonical as torch_canonical  # noqa: E402
from graphteleport.cli import main  # noqa: E402
from graphteleport.passes.canonical import CanonicalizePass  # noqa: E402
from graphteleport.passes.teleport import TeleportPass  # noqa: E402
from graphteleport.torch import canonicalize, teleport  # noqa: E402
from models.architectures import ARCHITECTURES, build, mlp  # noqa: E402

pytestmark = pytest.mark.torch

REL = 1e-5
SEEDS = (0, 1, 2)


def _tensors(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        k: v.detach().double().numpy()
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }


def _same(a: nn.Module, b: nn.Module, rel: float) -> None:
    """Every float tensor of ``a`` equals ``b``'s to ``rel`` of its largest element."""
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name, x in ta.items():
        scale = float(np.max(np.abs(tb[name]), initial=0.0))
        err = float(np.max(np.abs(x - tb[name]), initial=0.0))
        assert err <= rel * scale, f"{name}: {err:.3g} > {rel:g} * {scale:.3g}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name == "mlp_tanh":  # odd activations: sign pairs
        model, shape = build(mlp, depth=3, width=16, activation="tanh", in_features=12)
    elif name == "mlp_linear":  # no activation: pairs of group any
        model, shape = build(mlp, depth=2, width=16, activation="identity", in_features=12)
    else:
        model, shape = ARCHITECTURES[name]()
    x = torch.randn(4, *shape[1:], generator=torch.Generator().manual_seed(1))
    return model, x


def _check_shared_form(name: str, sampling: str) -> None:
    model, x = _model(name)
    reference = copy.deepcopy(model)
    canonicalize(reference, x)
    for seed in SEEDS:
        moved = copy.deepcopy(model)
        teleport(moved, x, seed=seed, cob_range=0.9, sampling=sampling)  # type: ignore[arg-type]
        with pytest.raises(AssertionError):  # the teleport did move the weights
            _same(moved, model, REL)
        canonicalize(moved, x)
        _same(moved, reference, REL)
        with torch.no_grad():
            assert _rel(moved(x), model(x)) < REL
            fresh = torch.randn_like(x)
            assert _rel(moved(fresh), model(fresh)) < REL


@pytest.mark.parametrize("name", ["mlp", "cnn2d", "residual_mlp", "resnet18"])
def test_teleports_share_the_canonical_form(name: str) -> None:
    _check_shared_form(name, "intra_landscape")


@pytest.mark.parametrize("name", ["mlp_tanh", "mlp_linear"])
def test_negative_cofactors_share_the_canonical_form(name: str) -> None:
    _check_shared_form(name, "inter_landscape")


def test_without_the_sign_rule_the_forms_differ() -> None:
    """The sign test can fail: with every sign kept, a sign-flipped teleport's canonical
    form differs from the module's."""
    ones = lambda analysis, arrays=None: (np.ones(analysis.solution.num_pairs), 0)  # noqa: E731
    with mock.patch.object(torch_canonical, "sign_values", ones), pytest.raises(AssertionError):
        _check_shared_form("mlp_tanh", "inter_landscape")


def test_batchnorm_train_mode_is_kept_and_undo() -> None:
    model, x = _model("cnn2d")
    before = copy.deepcopy(model)
    result = canonicalize(model, x)
    assert result.objective_after < result.objective_before
    assert result.minimum.gradient <= 1e-8  # (a last step ≤ STEP_TOL taken unread)
    with torch.no_grad():
        model.train(), before.train()
        assert _rel(model(x), before(x)) < REL  # batch statistics: the training form
    model.eval()
    result.undo()
    _same(model, before, 1e-6)


def test_idempotent() -> None:
    model, x = _model("resnet18")
    first = canonicalize(model, x)
    once = copy.deepcopy(model)
    second = canonicalize(model, x)
    assert np.abs(np.log(np.abs(second.pair_values))).max() < 1e-5
    assert second.flipped == 0
    assert second.objective_after == pytest.approx(first.objective_after, rel=1e-6)
    _same(model, once, 1e-6)


# -- the sign rule in the ONNX pass ------------------------------------------------------------
@pytest.mark.parametrize(
    ("activation", "bias"), [("Tanh", True), ("Tanh", False), ("", True), ("", False)]
)
def test_onnx_negative_cofactors_share_the_canonical_form(activation: str, bias: bool) -> None:
    proto = gemm_mlp([5, 7, 6, 4, 3], activation, bias=bias)
    reference = ir.from_proto(proto)
    result = CanonicalizePass()(reference)
    assert result.sign_undecided == 0
    flips = 0
    for seed in SEEDS:
        moved = ir.from_proto(proto)
        done = TeleportPass(seed=seed, cob_range=0.9, sampling="inter_landscape")(moved)
        flips += int((done.pair_values < 0).sum())
        canon = CanonicalizePass()(moved)
        assert max_rel_err(proto, moved) < 1e-4
        wa, wb = weights(reference), weights(moved)
        for name, a in wa.items():
            scale = float(np.abs(a).max())
            assert float(np.abs(a - wb[name]).max()) <= REL * scale, name
        assert canon.flipped > 0 or not (done.pair_values < 0).any()
    assert flips > 0  # the teleports did flip signs


def test_onnx_sign_rule_can_fail() -> None:
    proto = gemm_mlp([5, 7, 6, 3], "Tanh")
    ones = lambda analysis, arrays=None: (np.ones(analysis.solution.num_pairs), 0)  # noqa: E731
    with mock.patch.object(canonical_pass, "sign_values", ones):
        reference = ir.from_proto(proto)
        CanonicalizePass()(reference)
        moved = ir.from_proto(proto)
        TeleportPass(seed=0, cob_range=0.9, sampling="inter_landscape")(moved)
        CanonicalizePass()(moved)
    wa, wb = weights(reference), weights(moved)
    assert any(not np.allclose(wa[n], wb[n], rtol=REL, atol=0) for n in wa)


def test_cli_report_counts_the_signs(tmp_path: Path) -> None:
    """``graphteleport canonicalize --report``: the signs the rule flipped and left."""
    src, dst, report = tmp_path / "m.onnx", tmp_path / "c.onnx", tmp_path / "r.json"
    moved = ir.from_proto(gemm_mlp([5, 7, 6, 3], "Tanh"))
    done = TeleportPass(seed=0, cob_range=0.9, sampling="inter_landscape")(moved)
    assert (done.pair_values < 0).any()
    onnx.save(ir.to_proto(moved), src)
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["canonicalize", str(src), "-o", str(dst), "--report", str(report)])
    assert code == 0
    figures = json.loads(report.read_text())["canonical"]
    assert figures["signs_flipped"] > 0 and figures["signs_undecided"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n != "mlp_5x500"])
def test_registry_models_share_the_canonical_form(name: str) -> None:
    """Every registry model (but the 2500-neuron MLP), against a teleport with negative
    cofactors where its groups allow them."""
    model, x = _model(name)
    reference = copy.deepcopy(model)
    canonicalize(reference, x)
    moved = copy.deepcopy(model)
    teleport(moved, x, seed=3, cob_range=0.9, sampling="inter_landscape")
    canonicalize(moved, x)
    _same(moved, reference, REL)
    with torch.no_grad():
        assert _rel(moved(x), model(x)) < REL

"""Smoke tests of two experiments' pieces at minimal sizes (seconds; the experiments themselves
run with ``python -m experiments.<name>``, never in the suite): the canonical form's distances
on one registry model, the effective learning-rate factor, and one pass of the
optimizing-teleports harness on random data."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from experiments import canonical_form, optimizing_teleports  # noqa: E402
from experiments.common import Data  # noqa: E402

pytestmark = pytest.mark.torch


def test_canonical_form_distances(tmp_path: Path) -> None:
    """A teleport moves the weights; after canonicalizing both they agree to rounding."""
    from experiments.common import registry_model
    from models.export import export

    model, shape = registry_model("mlp")
    src = export(model, shape, tmp_path / "mlp.onnx")
    found = canonical_form.registry_distances("mlp", src, seeds=2)
    assert set(found) == set(canonical_form.SAMPLINGS)
    for d in found.values():
        assert len(d.before) == len(d.after) == 2
        assert min(d.before) > 1e-2
        assert max(d.after) < 1e-6
        assert max(abs(x - 1) for x in d.norm_after) < 1e-6
        assert max(abs(x - 1) for x in d.norm_before) > 1e-3


def test_lr_factor_is_mean_inverse_square_scale() -> None:
    """``k = mean (W/W')²`` over all parameter elements."""
    before = torch.nn.Linear(3, 2)
    after = optimizing_teleports.deepcopy(before)
    with torch.no_grad():
        after.weight.mul_(2.0)  # 6 elements with S⁻² = 1/4, 2 bias elements with 1
    assert optimizing_teleports.lr_factor(before, after) == pytest.approx((6 / 4 + 2) / 8)


def _random_data(n_train: int = 128, n_val: int = 64) -> Data:
    gen = torch.Generator().manual_seed(0)
    return Data(
        torch.randn(n_train, 784, generator=gen),
        torch.randint(0, 10, (n_train,), generator=gen),
        torch.randn(n_val, 784, generator=gen),
        torch.randint(0, 10, (n_val,), generator=gen),
    )


def test_optimizing_teleports_harness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every arm trains for one epoch; the grad-norm teleports raise ‖∇L‖² and keep the
    function; the section renders (plot stubbed: no file is written)."""
    data = _random_data()
    monkeypatch.setattr(optimizing_teleports, "mnist", lambda: data)
    monkeypatch.setattr(optimizing_teleports, "plot", lambda _res: "img/x.png")
    monkeypatch.setattr(optimizing_teleports, "OPT_STEPS", 2)
    monkeypatch.setattr(optimizing_teleports, "EVERY", 1)
    mlp = optimizing_teleports.FACTORIES["mlp"]
    monkeypatch.setattr(optimizing_teleports, "FACTORIES", {"mlp": mlp})
    res = optimizing_teleports.run({"mlp": 2}, seeds=1, with_optimize=True)
    assert set(res.arms) == set(optimizing_teleports.ARMS)
    for (_name, _arm), acc in res.val_acc.items():
        assert acc.shape[0] == 1
    assert res.init_err < 1e-5
    init = res.teleports["mlp", "init"]
    assert init.after[0] > init.before[0]
    assert len(res.teleports["mlp", "repeat"].before) == 1  # before epoch 1 of 2
    assert all(k > 0 for ks in res.k.values() for k in ks)
    text = optimizing_teleports.section(res, optimizing_teleports.verdict_text(res))
    assert "pending" not in text and "Verdict" in text

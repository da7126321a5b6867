"""The algebra of a teleport (``graphteleport.algebra``) and the one union-find
(``graphteleport.unionfind``), against the formulas their docstrings state."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from graphteleport.algebra import (
    Factor,
    FactorTable,
    batchnorm_eps,
    batchnorm_eps_tangent,
    log_derivative,
    neuron_cofactors,
    neuron_tangent,
    power,
    product,
    scale,
    scale_bounds,
    source_scale,
)
from graphteleport.unionfind import components, signed_pairs


@dataclass(frozen=True)
class Use:
    """A minimal :class:`~graphteleport.algebra.Scaling`."""

    shape: tuple[int, ...]
    factors: list[Factor]
    index: np.ndarray | None = None
    expand: bool = False


def uses(rng: np.random.Generator, n: int) -> list[Use]:
    """Conv-like uses ``[O, C, 1, 1]`` with factors of every exponent the rules emit."""
    out = []
    for exps in ([1, -1], [2], [1], [-1, 1, 3], [1, -1]):
        o, c = rng.integers(1, 5, size=2)
        factors = [
            Factor(rng.integers(0, n, size=(o, 1, 1, 1) if k % 2 == 0 else (1, c, 1, 1)), e)
            for k, e in enumerate(exps)
        ]
        out.append(Use((int(o), int(c), 1, 1), factors))
    return out


def test_one_use_and_all_uses_at_once_agree_bit_for_bit() -> None:
    """``S`` of a use (:func:`scale`) equals the product of its factors' values in the
    table, to the last bit: one reciprocal convention (:func:`power`) for both."""
    rng = np.random.default_rng(0)
    tau = rng.uniform(-3, 3, size=40)
    all_uses = uses(rng, tau.size)
    table = FactorTable(all_uses)
    values = table.values(tau)
    for ab in all_uses:
        s = np.ones((1,) * len(ab.shape))
        for k in range(table.first[id(ab)], table.first[id(ab)] + len(ab.factors)):
            lo = int(table.starts[k])
            s = s * values[lo : lo + table.sizes[k]].reshape(table.shapes[k])
        assert np.array_equal(s, scale(ab, tau))
    assert np.array_equal(power(tau, -1), 1.0 / tau)
    assert np.array_equal(power(tau, 2), tau * tau)
    assert np.allclose(power(tau, 3), tau * tau * tau, rtol=1e-15)


def test_powers_of_two_give_exact_scales() -> None:
    """``τ = 2^k`` gives ``S = 2^(Σ e·k)`` exactly (the exact mode's promise)."""
    rng = np.random.default_rng(1)
    k = rng.integers(-6, 7, size=30)
    tau = np.exp2(k.astype(np.float64))
    for ab in uses(rng, tau.size):
        want = np.zeros((1,) * len(ab.shape), dtype=np.int64)
        for f in ab.factors:
            want = want + f.exp * k[f.ids]
        assert np.array_equal(scale(ab, tau), np.exp2(want.astype(np.float64)))


def test_bounds_hold_every_scale() -> None:
    """:func:`scale_bounds` brackets ``|S|`` of every element of every tensor's uses."""
    rng = np.random.default_rng(2)
    tau = rng.uniform(-4, 4, size=25)
    all_uses = uses(rng, tau.size)
    tensors = [all_uses[:2], all_uses[2:3], all_uses[3:]]
    smin, smax = scale_bounds(FactorTable(all_uses), tensors, tau)
    for j, group in enumerate(tensors):
        s = np.concatenate([np.abs(scale(ab, tau)).reshape(-1) for ab in group])
        assert smin[j] <= s.min() * (1 + 1e-12) and s.max() <= smax[j] * (1 + 1e-12)


def test_source_scale_writes_each_use_where_its_index_reads() -> None:
    """Uses that map elements of one stored tensor write their ``S`` at the elements
    their index reads (an LM head reading an embedding through a Transpose)."""
    tau = np.array([2.0, 4.0, 0.5])
    rows = Use((3, 2), [Factor(np.array([[0], [1], [2]]), 1)])
    cols = Use((2, 3), [Factor(np.array([[0, 1, 2]]), 1)], index=np.arange(6).reshape(3, 2).T)
    s = source_scale((3, 2), [rows, cols], tau)
    assert np.array_equal(s, np.array([[2.0, 2.0], [4.0, 4.0], [0.5, 0.5]]))


def test_cofactors_and_their_tangent_from_pair_values() -> None:
    """``τ = t`` or ``1/t`` per neuron; its derivative at ``t = 1`` is ``±v``."""
    pair = np.array([0, 1, 1, 2])
    inverse = np.array([False, False, True, True])
    signed = pair + 3 * inverse
    t = np.array([2.0, -4.0, 0.5])
    assert np.array_equal(neuron_cofactors(t, signed), [2.0, -4.0, -0.25, 2.0])
    v, eps = np.array([0.3, -1.2, 2.0]), 1e-6
    fd = (neuron_cofactors(1 + eps * v, signed) - neuron_cofactors(1 - eps * v, signed)) / (2 * eps)
    np.testing.assert_allclose(neuron_tangent(v, signed), fd, rtol=1e-8)


def test_log_derivative_is_the_derivative_of_log_s() -> None:
    """``d log S/dε = Σ e·v[ids]`` at τ = 1 along ``τ = 1 + ε·v``."""
    rng = np.random.default_rng(3)
    v, eps = rng.standard_normal(30), 1e-6
    for ab in uses(rng, v.size):
        fd = (np.log(np.abs(scale(ab, 1 + eps * v))) - np.log(np.abs(scale(ab, 1 - eps * v)))) / (
            2 * eps
        )
        np.testing.assert_allclose(
            log_derivative(ab, v), np.broadcast_to(fd, ab.shape), rtol=1e-6, atol=1e-9
        )


def test_batchnorm_eps_keeps_eval_and_train_exact() -> None:
    """``rv' = S·rv + ε(S − 1)`` gives ``sqrt(rv' + ε) = c·τ·sqrt(rv + ε)`` (eval), and
    ``c·τ / sqrt(τ²σ² + ε) = 1 / sqrt(σ² + ε)`` (train, on a batch of variance σ²);
    without a measured σ² (NaN), ``c = 1``."""
    rng = np.random.default_rng(4)
    tau = rng.uniform(0.1, 10, size=8)
    sigma2, rv = rng.uniform(1e-6, 2, size=8), rng.uniform(1e-6, 2, size=8)
    eps = np.full(8, 1e-3)
    c, s, offset = batchnorm_eps(tau**2, sigma2, eps)
    np.testing.assert_allclose(np.sqrt(s * rv + offset + eps), c * tau * np.sqrt(rv + eps))
    np.testing.assert_allclose(c * tau / np.sqrt(tau**2 * sigma2 + eps), 1 / np.sqrt(sigma2 + eps))
    c, s, offset = batchnorm_eps(tau**2, np.full(8, np.nan), eps)
    assert np.array_equal(c, np.ones(8)) and np.array_equal(s, tau**2)


@pytest.mark.parametrize("measured", [True, False])
def test_batchnorm_eps_tangent_is_its_derivative(measured: bool) -> None:
    """``(dc, dS)`` at τ = 1 are the derivatives of :func:`batchnorm_eps`'s ``c`` and ``S``."""
    rng = np.random.default_rng(5)
    v, eps, h = rng.standard_normal(6), 1e-2, 1e-6
    sigma2 = rng.uniform(1e-3, 1, size=6) if measured else None
    given = sigma2 if sigma2 is not None else np.full(6, np.nan)

    def at(step: float) -> tuple[np.ndarray, ...]:
        return batchnorm_eps((1 + step * v) ** 2, given, np.full(6, eps))

    (c1, s1, _), (c0, s0, _) = at(h), at(-h)
    dc, ds = batchnorm_eps_tangent(2 * v, sigma2, eps)
    np.testing.assert_allclose(dc, (c1 - c0) / (2 * h), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(ds, (s1 - s0) / (2 * h), rtol=1e-6, atol=1e-10)


def test_union_find_labels_and_signed_pairs() -> None:
    """Classes are labelled by their smallest member; a relation ``τ_a = 1/τ_b`` puts
    ``a`` with ``b``'s mirror, and a class holding a node and its mirror is self-inverse."""
    label = components(6, np.array([5, 3, 4]), np.array([3, 1, 0]))
    assert label.tolist() == [0, 1, 2, 1, 0, 1]
    n = 3
    a, b = signed_pairs((np.array([0]), np.array([1])), (np.array([1]), np.array([2])), n)
    roots = components(2 * n, a, b)
    assert roots[0] == roots[1] == roots[2 + n]  # τ0 = τ1 = 1/τ2
    assert roots[0 + n] == roots[1 + n] == roots[2]
    a, b = signed_pairs((np.zeros(0, np.int64),) * 2, (np.array([0]), np.array([0])), n)
    roots = components(2 * n, a, b)
    assert roots[0] == roots[n]  # τ0 = 1/τ0: the sign group
    assert product([], np.ones(3), rank=2).shape == (1, 1)

"""Staleness weightings and FedAsync's mixing, against hand computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmqtt.strategies import ClientUpdate, constant, fedasync, hinge, polynomial
from fedmqtt.strategies.fedasync import mixing_rate


@pytest.mark.parametrize(("s", "expected"), [(0, 1.0), (3, 0.5), (8, 1 / 3), (99, 0.1)])
def test_polynomial_half(s: int, expected: float) -> None:
    # (s + 1) ** -0.5 by hand: 1, 1/2, 1/3, 1/10
    assert float(polynomial(0.5)(s)) == pytest.approx(expected, rel=1e-6)


def test_polynomial_other_exponent() -> None:
    assert float(polynomial(1.0)(4)) == pytest.approx(0.2)  # 1 / 5
    assert float(polynomial(2.0)(1)) == pytest.approx(0.25)  # 1 / 4


@pytest.mark.parametrize(("s", "expected"), [(0, 1.0), (4, 1.0), (5, 1 / 11), (6, 1 / 21), (14, 1 / 101)])
def test_hinge_paper_defaults(s: int, expected: float) -> None:
    # a = 10, b = 4: 1 while s <= 4, then 1 / (10 (s - 4) + 1)
    assert float(hinge(10.0, 4)(s)) == pytest.approx(expected, rel=1e-6)


def test_constant_is_one_for_any_staleness() -> None:
    assert np.asarray(constant()(jnp.array([0, 1, 1000]))).tolist() == [1.0, 1.0, 1.0]


def test_weightings_reject_negative_parameters() -> None:
    with pytest.raises(ValueError, match="exponent"):
        polynomial(-1.0)
    with pytest.raises(ValueError, match="hinge"):
        hinge(-1.0, 2)


def test_fedasync_matches_hand_computation() -> None:
    # alpha 0.6, s = 3 -> alpha_t = 0.6 * 4 ** -0.5 = 0.3; x = 0.7 * x + 0.3 * x_new
    s = fedasync(alpha=0.6, weighting=polynomial(0.5))
    x = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([10.0])}
    new = {"w": jnp.array([3.0, 2.0]), "b": jnp.array([0.0])}
    out, state, stepped = s.apply(x, ClientUpdate(new, jnp.int32(3), jnp.float32(5)), s.init(x))
    assert bool(stepped)
    np.testing.assert_allclose(out["w"], [0.7 * 1 + 0.3 * 3, 0.7 * -2 + 0.3 * 2], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [7.0], rtol=1e-6)
    assert mixing_rate(0.6, polynomial(0.5), 3) == pytest.approx(0.3)


def test_fedasync_hinge_drops_very_stale_updates_almost_entirely() -> None:
    s = fedasync(alpha=0.5, weighting=hinge(10.0, 4))
    x = {"w": jnp.zeros(1)}
    fresh, _, _ = s.apply(x, ClientUpdate({"w": jnp.ones(1)}, 2, 1), s.init(x))
    stale, _, _ = s.apply(x, ClientUpdate({"w": jnp.ones(1)}, 14, 1), s.init(x))
    assert float(fresh["w"][0]) == pytest.approx(0.5)
    assert float(stale["w"][0]) == pytest.approx(0.5 / 101, rel=1e-5)


def test_fedasync_keeps_tree_structure_dtype_and_finiteness() -> None:
    s = fedasync()  # alpha 0.6, s = 0
    x = {"a": {"k": jnp.ones((2, 2), jnp.bfloat16), "i": jnp.zeros((), jnp.float16)}, "b": jnp.zeros(3, jnp.float32)}
    # every leaf of the update has another dtype than the model's
    new = {"a": {"k": jnp.zeros((2, 2), jnp.float32), "i": jnp.ones((), jnp.float32)},
           "b": jnp.ones(3, jnp.float16)}
    out, _, _ = s.apply(x, ClientUpdate(new, 0, 1), s.init(x))
    assert jax.tree.structure(out) == jax.tree.structure(x)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(x), strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
        assert bool(jnp.isfinite(got).all())
    np.testing.assert_allclose(np.asarray(out["a"]["k"], np.float32), 0.4, rtol=1e-2)  # bfloat16
    np.testing.assert_allclose(np.asarray(out["a"]["i"], np.float32), 0.6, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(out["b"]), 0.6, rtol=1e-6)


def test_fedasync_rejects_bad_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        fedasync(alpha=0.0)

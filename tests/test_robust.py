"""Robust FedBuff (``fedbuff(K, combine=...)``): contract (finite, same tree, hand computations), reduction of
every rule to FedBuff's mean when there is nothing to defend against, and resistance of median, trimmed mean,
norm bounding, Multi-Krum and the outlier filter to sign-flipped, scaled updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmqtt.strategies import Combine, constant, fedbuff, median, multi_krum, norm_bound, outlier, trimmed
from fedmqtt.strategies.base import ClientUpdate, Strategy
from fedmqtt.strategies.registry import NAMES, make, options

PARAMS = {"dense/kernel": jnp.zeros((3, 2)), "dense/bias": jnp.zeros(2)}
RULES: dict[str, Combine] = {"median": median(), "trimmed": trimmed(0.2), "norm": norm_bound(),
                             "norm-fixed": norm_bound(1.0), "krum": multi_krum(0.2), "outlier": outlier()}


def run(strategy: Strategy, deltas: list[Any], staleness: int = 0, params: Any = None
        ) -> tuple[Any, Any, list[bool]]:
    p = PARAMS if params is None else params
    st = strategy.init(p)
    stepped = []
    for d in deltas:
        p, st, s = strategy.apply(p, ClientUpdate(d, staleness, 1), st)
        stepped.append(bool(s))
    return p, st, stepped


def like(value: float) -> dict[str, jax.Array]:
    return jax.tree.map(lambda x: jnp.full_like(x, value), PARAMS)


def random_deltas(seed: int, n: int) -> list[dict[str, jax.Array]]:
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), PARAMS)
            for _ in range(n)]


def fn(rule: Combine) -> Callable[[Any, jax.Array], Any]:
    """A robust rule's combine function (the mean alone has none: FedBuff keeps it as a running sum)."""
    assert rule.fn is not None, rule.name
    return rule.fn


def assert_trees_close(a: Any, b: Any, **tol: float) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.mark.parametrize("rule", RULES)
def test_contract_finite_same_tree_steps_every_k(rule: str) -> None:
    s = fedbuff(buffer_size=4, combine=RULES[rule])
    assert (s.wants, s.mode, s.one_update_per_step, s.report) == ("delta", "async", False, None)
    p, st, stepped = run(s, random_deltas(0, 8))
    assert stepped == [False, False, False, True] * 2
    assert jax.tree.structure(p) == jax.tree.structure(PARAMS)
    for k, x in p.items():
        assert x.shape == PARAMS[k].shape and x.dtype == PARAMS[k].dtype
        assert bool(jnp.isfinite(x).all())
        assert not np.allclose(np.asarray(x), 0.0)  # two steps were taken
    assert int(st.n) == 0  # the buffer starts afresh after each step
    assert all(leaf.shape[0] == 4 for leaf in jax.tree.leaves(st.buffer))  # K slots, one per delta


def test_hand_computations() -> None:
    d = {"w": jnp.array([[1.0, -4.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])}
    ones = jnp.ones(5)
    mean, _, _ = run(fedbuff(5, weighting=constant()), [{"w": row} for row in d["w"]], params={"w": jnp.zeros(2)})
    np.testing.assert_allclose(mean["w"], [22.0, 0.4], rtol=1e-6)
    np.testing.assert_allclose(fn(median())(d, ones)["w"], [3.0, 1.0])
    np.testing.assert_allclose(fn(trimmed(0.2))(d, ones)["w"], [3.0, 1.0])  # drops 1 at each end
    # weights apply before the median: w·Δ = [[0.5, -2], [2, 0], [3, 1], [4, 2], [100, 3]]
    np.testing.assert_allclose(fn(median())(d, jnp.array([0.5, 1, 1, 1, 1]))["w"], [3.0, 1.0])
    np.testing.assert_allclose(fn(median())(d, jnp.array([1, 1, 1, 1, 0.01]))["w"], [2.0, 0.03])
    # norms ≈ 4.12, 2, 3.16, 4.47, 100.04; median 4.12 bounds rows 4 and 5
    norms = np.linalg.norm(np.asarray(d["w"]), axis=1)
    scale = np.minimum(1.0, np.median(norms) / norms)
    expected = (np.asarray(d["w"]) * scale[:, None]).mean(0)
    np.testing.assert_allclose(fn(norm_bound())(d, ones)["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(fn(norm_bound(1.0))(d, ones)["w"],
                               (np.asarray(d["w"]) / np.maximum(norms, 1.0)[:, None]).mean(0), rtol=1e-6)


def test_multi_krum_and_outlier_filter_by_hand() -> None:
    d = {"w": jnp.array([[1.0], [2.0], [3.0], [4.0], [100.0]])}
    ones = jnp.ones(5)
    krum, filt = fn(multi_krum(0.2)), fn(outlier())
    # Krum, f = 1: score = sum of squared distances to the K - f - 2 = 2 nearest: 5, 2, 2, 5, 9216 + 9409;
    # the K - f = 4 lowest are averaged
    np.testing.assert_allclose(krum(d, ones)["w"], [2.5])
    # outlier filter: median 3, distances 2, 1, 0, 1, 97, median distance 1: keep those within 3 x 1
    np.testing.assert_allclose(filt(d, ones)["w"], [2.5])
    # staleness weights apply to the kept deltas; the mean is over the kept count, as FedBuff's is over K
    w = jnp.array([0.5, 1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(filt(d, w)["w"], [(0.5 + 2 + 3 + 4) / 4])
    np.testing.assert_allclose(fn(outlier(100.0))(d, ones)["w"], [22.0])  # no outlier


def test_krum_and_outlier_choose_on_the_deltas_as_sent() -> None:
    # A very stale attacker: weight 0.01 shrinks its 100 to 1, which would look honest after weighting; the
    # choice is made on the raw deltas, so it is still dropped (the weighted mean of all five would be 2.2).
    d = {"w": jnp.array([[1.0], [2.0], [3.0], [4.0], [100.0]])}
    w = jnp.array([1.0, 1.0, 1.0, 1.0, 0.01])
    for rule in (multi_krum(0.2), outlier()):
        np.testing.assert_allclose(fn(rule)(d, w)["w"], [2.5], err_msg=rule.name)


@pytest.mark.parametrize("rule", [trimmed(0.0), norm_bound(1e9), multi_krum(0.0), outlier(1e6)],
                         ids=lambda r: r.name)
def test_with_nothing_to_defend_against_every_rule_is_fedbuff(rule: Combine) -> None:
    deltas = random_deltas(1, 6)
    a, _, sa = run(fedbuff(3, combine=rule), deltas, staleness=2)
    b, _, sb = run(fedbuff(3), deltas, staleness=2)
    assert sa == sb == [False, False, True] * 2
    assert_trees_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("rule", "tolerance"), [("median", 0.3), ("trimmed", 0.3), ("norm", 0.7), ("krum", 0.2),
                                                 ("outlier", 0.2)])
def test_sign_flipped_scaled_attackers_are_contained(rule: str, tolerance: float) -> None:
    rng = np.random.default_rng(2)
    honest = [like(1.0 + 0.1 * rng.standard_normal()) for _ in range(8)]
    attackers = [like(-10.0), like(-10.0)]  # 20 %: sign flipped and scaled by 10
    order = honest[:4] + attackers[:1] + honest[4:] + attackers[1:]
    undefended, _, _ = run(fedbuff(10), order)
    defended, _, stepped = run(fedbuff(10, combine=RULES[rule]), order)
    assert stepped == [False] * 9 + [True]
    assert float(undefended["dense/bias"][0]) < -1.0  # the mean is dragged the wrong way
    for leaf in jax.tree.leaves(defended):
        assert np.all(np.abs(np.asarray(leaf) - 1.0) < tolerance)


def test_state_is_pure() -> None:
    s = fedbuff(2, combine=median())
    st = s.init(PARAMS)
    u = ClientUpdate(like(1.0), 0, 1)
    a = s.apply(PARAMS, u, st)
    b = s.apply(PARAMS, u, st)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, a[1].buffer, b[1].buffer))
    assert int(a[1].n) == int(b[1].n) == 1
    assert int(st.n) == 0  # the input state is untouched
    assert_trees_close(st.buffer, s.init(PARAMS).buffer, rtol=0, atol=0)


def test_staleness_weights_each_delta() -> None:
    p, _, _ = run(fedbuff(1, combine=median()), [like(2.0)], staleness=3)  # w(3) = 1/2
    np.testing.assert_allclose(p["dense/bias"], [1.0, 1.0])
    p, _, _ = run(fedbuff(1, combine=median(), weighting=constant()), [like(2.0)], staleness=3)
    np.testing.assert_allclose(p["dense/bias"], [2.0, 2.0])


def test_robust_rules_take_no_partial_step() -> None:
    deltas = [like(1.0), like(3.0)]
    for rule in RULES.values():
        s = fedbuff(4, combine=rule)
        p, st, _ = run(s, deltas)
        out, st2, stepped = s.flush(p, st)
        assert not bool(stepped), rule.name
        assert int(st2.n) == 2  # still buffered, for the full step
        assert_trees_close(out, PARAMS, rtol=0, atol=0)
    # the mean takes one: Σ wΔ / n over the n = 2 held
    s = fedbuff(4)
    p, st, _ = run(s, deltas)
    out, st, stepped = s.flush(p, st)
    assert bool(stepped) and int(st.n) == 0
    np.testing.assert_allclose(out["dense/bias"], [2.0, 2.0])


def test_bad_settings_refused() -> None:
    with pytest.raises(ValueError, match="trim"):
        fedbuff(4, combine=trimmed(0.5))
    with pytest.raises(ValueError, match="Krum"):
        fedbuff(10, combine=multi_krum(0.4))
    with pytest.raises(ValueError, match="Krum"):
        fedbuff(2, combine=multi_krum(0.0))  # K >= 2f + 3 = 3
    with pytest.raises(ValueError, match="spread"):
        outlier(0.5)
    with pytest.raises(ValueError, match="weight_by_samples"):
        fedbuff(4, combine=median(), weight_by_samples=True)
    with pytest.raises(ValueError, match="unknown strategy"):
        make("fedbuff-mode")


REGISTERED = {"fedbuff-median": (median, {}), "fedbuff-trimmed": (trimmed, {"trim": 0.4}),
              "fedbuff-norm": (norm_bound, {"max_norm": 1.0}), "fedbuff-krum": (multi_krum, {"trim": 0.3}),
              "fedbuff-outlier": (outlier, {"spread": 1.0})}


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_rule_is_built_with_its_options(name: str) -> None:
    factory, opts = REGISTERED[name]
    assert name in NAMES
    assert set(opts) <= set(options(name))
    s = make(name, buffer_size=7, staleness_a=0.0, **opts)
    assert (s.name, s.wants, s.mode) == (name, "delta", "async")
    deltas = [like(v) for v in (1.0, 2.0, 3.0, 10.0, 20.0, 50.0, -100.0)]
    got, _, stepped = run(s, deltas)
    assert stepped == [False] * 6 + [True]
    want, _, _ = run(fedbuff(7, weighting=constant(), combine=factory(*opts.values())), deltas)
    assert_trees_close(got, want, rtol=1e-6)
    if opts:  # the option was used: the default gives another answer on these deltas
        default, _, _ = run(fedbuff(7, weighting=constant(), combine=factory()), deltas)
        assert not np.allclose(np.asarray(got["dense/bias"]), np.asarray(default["dense/bias"]))

"""Robust FedBuff: contract (finite, same tree, hand computations), equivalence of the mean rule with FedBuff,
and resistance of median, trimmed mean, norm bounding, Multi-Krum and the outlier filter to sign-flipped,
scaled updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmqtt.strategies.base import ClientUpdate
from fedmqtt.strategies.fedbuff import fedbuff
from fedmqtt.strategies.registry import NAMES, make
from fedmqtt.strategies.robust import RULES, combine, robust_fedbuff

PARAMS = {"dense/kernel": jnp.zeros((3, 2)), "dense/bias": jnp.zeros(2)}


def run(strategy, deltas, staleness=0):  # type: ignore[no-untyped-def]
    p, st = PARAMS, strategy.init(PARAMS)
    stepped = []
    for d in deltas:
        p, st, s = strategy.apply(p, ClientUpdate(d, staleness, 1), st)
        stepped.append(bool(s))
    return p, st, stepped


def like(value: float) -> dict[str, jax.Array]:
    return jax.tree.map(lambda x: jnp.full_like(x, value), PARAMS)


@pytest.mark.parametrize("rule", RULES)
def test_contract_finite_same_tree_steps_every_k(rule: str) -> None:
    s = robust_fedbuff(buffer_size=4, rule=rule)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    deltas = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), PARAMS)
              for _ in range(8)]
    p, st, stepped = run(s, deltas)
    assert stepped == [False, False, False, True] * 2
    assert jax.tree.structure(p) == jax.tree.structure(PARAMS)
    assert all(bool(jnp.isfinite(x).all()) and x.dtype == PARAMS[k].dtype for k, x in p.items())
    assert int(st.filled) == 0


def test_hand_computations() -> None:
    d = {"w": jnp.array([[1.0, -4.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])}
    np.testing.assert_allclose(combine(d, "mean")["w"], [22.0, 0.4])
    np.testing.assert_allclose(combine(d, "median")["w"], [3.0, 1.0])
    np.testing.assert_allclose(combine(d, "trimmed", trim=0.2)["w"], [3.0, 1.0])  # drops 1 at each end
    # norms ≈ 4.12, 2, 3.16, 4.47, 100.04; median 4.12 bounds rows 4 and 5
    norms = np.linalg.norm(np.asarray(d["w"]), axis=1)
    scale = np.minimum(1.0, np.median(norms) / norms)
    expected = (np.asarray(d["w"]) * scale[:, None]).mean(0)
    np.testing.assert_allclose(combine(d, "norm")["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(combine(d, "norm", max_norm=1.0)["w"],
                               (np.asarray(d["w"]) / np.maximum(norms, 1.0)[:, None]).mean(0), rtol=1e-6)


def test_multi_krum_and_outlier_filter_by_hand() -> None:
    d = {"w": jnp.array([[1.0], [2.0], [3.0], [4.0], [100.0]])}
    # Krum, f = 1: score = sum of squared distances to the K - f - 2 = 2 nearest: 5, 2, 2, 5, 9216 + 9409;
    # the K - f = 4 lowest are averaged
    np.testing.assert_allclose(combine(d, "krum", trim=0.2)["w"], [2.5])
    # outlier filter: median 3, distances 2, 1, 0, 1, 97, median distance 1: keep those within 3 x 1
    np.testing.assert_allclose(combine(d, "outlier")["w"], [2.5])
    # staleness weights apply to the kept deltas; the mean is over the kept count, as FedBuff's is over K
    w = jnp.array([0.5, 1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(combine(d, "outlier", weights=w)["w"], [(0.5 + 2 + 3 + 4) / 4])
    np.testing.assert_allclose(combine(d, "outlier", spread=100.0)["w"], [22.0])  # nothing is an outlier


def test_mean_rule_equals_fedbuff() -> None:
    rng = np.random.default_rng(1)
    deltas = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), PARAMS)
              for _ in range(6)]
    a, _, _ = run(robust_fedbuff(3, "mean"), deltas, staleness=2)
    b, _, _ = run(fedbuff(3), deltas, staleness=2)
    for k in PARAMS:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("rule", "tolerance"), [("median", 0.3), ("trimmed", 0.3), ("norm", 0.7), ("krum", 0.2),
                                                 ("outlier", 0.2)])
def test_sign_flipped_scaled_attackers_are_contained(rule: str, tolerance: float) -> None:
    rng = np.random.default_rng(2)
    honest = [like(1.0 + 0.1 * rng.standard_normal()) for _ in range(8)]
    attackers = [like(-10.0), like(-10.0)]  # 20 %: sign flipped and scaled by 10
    order = honest[:4] + attackers[:1] + honest[4:] + attackers[1:]
    undefended, _, _ = run(robust_fedbuff(10, "mean"), order)
    defended, _, _ = run(robust_fedbuff(10, rule), order)  # type: ignore[arg-type]
    assert float(undefended["dense/bias"][0]) < -1.0  # the mean is dragged the wrong way
    assert abs(float(defended["dense/bias"][0]) - 1.0) < tolerance


def test_state_is_pure() -> None:
    s = robust_fedbuff(2, "median")
    st = s.init(PARAMS)
    u = ClientUpdate(like(1.0), 0, 1)
    a = s.apply(PARAMS, u, st)
    b = s.apply(PARAMS, u, st)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, a[1].deltas, b[1].deltas))


def test_staleness_weights_each_delta() -> None:
    p, _, _ = run(robust_fedbuff(1, "median"), [like(2.0)], staleness=3)  # w(3) = 1/2
    np.testing.assert_allclose(p["dense/bias"], [1.0, 1.0])


def test_bad_settings_refused() -> None:
    with pytest.raises(ValueError, match="rule"):
        robust_fedbuff(4, "mode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trim"):
        robust_fedbuff(4, "trimmed", trim=0.5)
    with pytest.raises(ValueError, match="Krum"):
        robust_fedbuff(10, "krum", trim=0.4)
    with pytest.raises(ValueError, match="spread"):
        robust_fedbuff(10, "outlier", spread=0.5)


@pytest.mark.parametrize("name", ["fedbuff-median", "fedbuff-trimmed", "fedbuff-norm", "fedbuff-krum",
                                  "fedbuff-outlier"])
def test_registered(name: str) -> None:
    assert name in NAMES
    s = make(name, buffer_size=5, trim=0.2)
    assert s.name == name
    assert s.wants == "delta"

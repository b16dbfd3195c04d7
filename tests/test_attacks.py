"""The attacks of fedmqtt.attacks and the staleness-aware guard (FedBuff and FedAsync): what each attack sends,
the guard's bounds by hand, and a learning check in the simulation (the aggregator's own core)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from fedmqtt import attacks
from fedmqtt.attacks import Collusion
from fedmqtt.simulation import simulate
from fedmqtt.strategies import combine, fedasync_guard, fedbuff
from fedmqtt.strategies.base import ClientUpdate
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import get_task


def stacked(*rows: list[float]) -> dict[str, Any]:
    return {"w": jnp.array(rows, jnp.float32)}


# ---- the attacks ----------------------------------------------------------------------------------------
def test_colluders_pool_their_honest_deltas_and_send_alie_and_ipm() -> None:
    c = Collusion()
    honest = [np.array([1.0, -2.0], np.float32), np.array([3.0, -4.0], np.float32)]
    alie = attacks.alie(1.0)
    sent = [alie.attacker(i, c)({"w": d})["w"] for i, d in enumerate(honest)]
    # after both: μ = (2, -3), σ = (1, 1): μ - z·σ·sign(μ) = (1, -2), against the honest direction
    np.testing.assert_allclose(sent[1], [1.0, -2.0])
    assert sent[1].dtype == np.float32
    # attacker 1 sends again: its own delta replaced in the pool, μ = (2, -3) still; IPM sends -ε·μ
    np.testing.assert_allclose(attacks.ipm(0.5).attacker(1, c)({"w": honest[1]})["w"], [-1.0, 1.5])
    np.testing.assert_allclose(attacks.sign_flip(5.0).attacker(2, c)({"w": honest[0]})["w"], [-5.0, 10.0])
    assert set(c.honest) == {0, 1, 2}  # every attacker's honest delta is recorded, whatever it sends


def test_alie_z_follows_the_paper() -> None:
    # n = 50, m = 24 (Baruch et al. Table): s = 26 - 24 = 2, z = Φ⁻¹(48/50) ≈ 1.75
    assert attacks.alie_z(50, 24) == pytest.approx(1.751, abs=1e-3)
    assert attacks.alie_z(30, 6) < attacks.alie_z(30, 12)  # more attackers, more room


def test_label_flip_and_backdoor_poison_only_the_attackers_data() -> None:
    x = np.zeros((200, 64), np.float32)
    y = np.arange(200, dtype=np.int32) % 10
    fx, fy = attacks.label_flip(10).examples(x, y)
    np.testing.assert_array_equal(fy, 9 - y)
    bd = attacks.backdoor("digits", target=3, fraction=0.5)
    bx, by = bd.examples(x, y)
    stamped = (bx[:, [54, 55, 62, 63]] == 1.0).all(axis=1)
    assert 60 < stamped.sum() < 140 and (by[stamped] == 3).all()
    np.testing.assert_array_equal(by[~stamped], y[~stamped])  # the rest stay clean
    assert not bx[~stamped].any() and not x.any()  # the input is not modified in place
    assert bd.attacker(0, Collusion())({"w": np.ones(2, np.float32)})["w"].tolist() == [1.0, 1.0]


def test_the_adaptive_attacker_scales_up_against_the_mean_and_stays_in_range_against_the_guard() -> None:
    rng = np.random.default_rng(0)
    c = Collusion()
    for i in range(6):
        c.record(i, {"w": (np.ones(20) + 0.3 * rng.standard_normal(20)).astype(np.float32)})
    scale = lambda d: float(np.linalg.norm(d["w"] - 1.0))  # noqa: E731
    against_mean = attacks.adaptive(None, 10, 2).poison
    against_guard = attacks.adaptive(combine.guard(3.0).fn, 10, 2).poison
    assert against_mean is not None and against_guard is not None
    big, small = against_mean({}, c), against_guard({}, c)
    assert scale(big) > 10 * scale(small)  # the mean has no bound: the largest scale tried
    assert float(np.mean(big["w"])) < 0 < float(np.mean(small["w"]))


def test_attack_success_counts_triggered_examples_put_in_the_target_class() -> None:
    task = get_task("digits", num_clients=2, seed=0)
    trainer = task.trainer(0)
    bd = attacks.backdoor("digits", target=0)
    rate = attacks.attack_success(trainer, trainer.initial, task.test_data, bd)
    assert rate is not None and 0.0 <= rate <= 1.0
    assert attacks.attack_success(trainer, trainer.initial, task.test_data, attacks.ipm()) is None


# ---- the guard, FedBuff ----------------------------------------------------------------------------------
def test_the_guard_drops_a_far_delta_and_bounds_the_rest() -> None:
    rows = np.array([[1.0, 1.0], [1.2, 0.8], [0.9, 1.1], [1.1, 1.0], [40.0, -40.0]], np.float32)
    out = combine.guard(3.0).fn(stacked(*rows.tolist()), jnp.ones(5))  # type: ignore[misc]
    norms = np.linalg.norm(rows, axis=1)
    bound = np.median(norms)  # equal weights: r = 1, every delta clipped to the median norm
    kept = rows[:4] * np.minimum(1.0, bound / norms[:4])[:, None]  # the far one is dropped
    np.testing.assert_allclose(out["w"], kept.mean(axis=0), rtol=1e-5)
    assert norms[3] > bound  # one kept delta was clipped


def test_the_guard_gives_no_staleness_a_larger_pull() -> None:
    # Two deltas in the same far direction, one claimed fresh, one claimed stale; both kept (spread 100).
    # The most an accepted delta can pull is w̃·ñ whatever staleness it claims.
    honest = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]]
    pulls = []
    for weight in (1.0, 0.25):
        w = jnp.array([0.5, 0.5, 0.5, 0.5, weight])
        out = combine.guard(100.0).fn(stacked(*honest, [30.0, 30.0]), w)  # type: ignore[misc]
        alone = combine.guard(100.0).fn(stacked(*honest, [0.0, 0.0]), w)  # type: ignore[misc]
        pulls.append(float(jnp.linalg.norm((out["w"] - alone["w"]) * 5)))
    median_norm = float(np.median([np.linalg.norm(h) for h in [*honest, [30.0, 30.0]]]))
    for pull in pulls:
        assert pull <= 0.5 * median_norm + 1e-4
    assert pulls[0] == pytest.approx(pulls[1], rel=1e-4)


def test_the_guard_holds_each_coordinate_near_the_honest_spread() -> None:
    # A backdoor-like delta: ordinary length, but on a coordinate every honest delta leaves at 0.
    honest = [[1.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0], [1.5, 0.0, 0.5]]
    backdoor = [1.0, 0.8, 1.0]
    out = combine.guard(3.0).fn(stacked(*honest, backdoor), jnp.ones(5))  # type: ignore[misc]
    assert float(out["w"][1]) == 0.0
    outlier = combine.outlier(3.0).fn(stacked(*honest, backdoor), jnp.ones(5))  # type: ignore[misc]
    assert float(outlier["w"][1]) == pytest.approx(0.8 / 5)  # the L2 filter alone lets it through


# ---- the guard, FedAsync ---------------------------------------------------------------------------------
def test_fedasync_guard_refuses_a_far_delta_and_keeps_it_out_of_its_window() -> None:
    s = fedasync_guard(alpha=0.5, window=8)
    params = {"w": jnp.zeros(2)}
    state = s.init(params)
    rng = np.random.default_rng(1)
    for _ in range(6):
        params, state, stepped = s.apply(params, ClientUpdate({"w": jnp.asarray(1.0 + 0.1 * rng.standard_normal(2))},
                                                              0, 1), state)
        assert bool(stepped)
    before, window = params, state.window
    params, state, stepped = s.apply(params, ClientUpdate({"w": jnp.array([-50.0, -50.0])}, 0, 1), state)
    assert not bool(stepped) and int(state.refused) == 1
    np.testing.assert_array_equal(params["w"], before["w"])
    np.testing.assert_array_equal(state.window["w"], window["w"])
    params, state, stepped = s.apply(params, ClientUpdate({"w": jnp.array([1.0, 1.0])}, 0, 1), state)
    assert bool(stepped) and float(params["w"][0]) > float(before["w"][0])


def test_fedasync_guard_on_a_fresh_update_is_fedasyncs_mix() -> None:
    s = fedasync_guard(alpha=0.6)
    params = {"w": jnp.array([1.0, 2.0])}
    out, _, _ = s.apply(params, ClientUpdate({"w": jnp.array([0.5, -1.0])}, 0, 1), s.init(params))
    np.testing.assert_allclose(out["w"], [1.0 + 0.6 * 0.5, 2.0 - 0.6])  # x + α(x_new - x), x_new = x + Δ


def test_guards_are_in_the_registry() -> None:
    assert make("fedbuff-guard", buffer_size=10, spread=2.0).name == "fedbuff-guard"
    assert make("fedasync-guard", window=10).wants == "delta"
    with pytest.raises(ValueError, match="spread"):
        fedbuff(10, combine=combine.guard(0.5))


# ---- learning under attack, through the aggregator's core ------------------------------------------------
@pytest.mark.parametrize("attack_name", ["label-flip", "backdoor"])
def test_the_guard_contains_data_poisoning_on_digits(attack_name: str) -> None:
    task = get_task("digits", num_clients=10, seed=0)
    attack = attacks.label_flip(10) if attack_name == "label-flip" else attacks.backdoor("digits")
    attackers = frozenset({0, 5})
    runs = {name: simulate(task, make(name, buffer_size=10), updates=300, seed=0, attackers=attackers,
                           attack=attack) for name in ("fedbuff", "fedbuff-guard")}
    if attack_name == "backdoor":
        mean_asr, guard_asr = runs["fedbuff"].attack_success, runs["fedbuff-guard"].attack_success
        assert mean_asr is not None and guard_asr is not None
        assert mean_asr > 0.5 > 0.2 > guard_asr  # the backdoor works without the guard, not with it
    else:
        assert runs["fedbuff-guard"].accuracy > runs["fedbuff"].accuracy + 0.05
    assert runs["fedbuff-guard"].accuracy > 0.85

"""Differential privacy: the clipping bound and the noise scale, checked empirically, on the agent and in
FedBuff; the accountant's ε; client DP end to end through an in-memory broker."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmqtt import codec, core, snapshot
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator
from fedmqtt.core import Limits
from fedmqtt.errors import ConfigError
from fedmqtt.memory_broker import MemoryBroker
from fedmqtt.privacy import (
    CentralDP,
    ClientDP,
    ClientPrivacy,
    clip_by_l2,
    epsilon,
    gaussian_noise,
    l2_norm,
    noise_for_epsilon,
    privatize,
)
from fedmqtt.strategies import constant, fedbuff
from fedmqtt.strategies.base import ClientUpdate
from fedmqtt.tasks import get_task

pytest.importorskip("dp_accounting")


def tree(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {"a/kernel": (scale * rng.standard_normal((64, 32))).astype(np.float32),
            "a/bias": (scale * rng.standard_normal(32)).astype(np.float32),
            "b": (scale * rng.standard_normal((3, 3, 4))).astype(np.float32)}


def flat(t: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float64).ravel() for _, v in sorted(t.items())])


# ---- clipping ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-4, 0.01, 1.0, 30.0, 1e4])
@pytest.mark.parametrize("clip", [0.1, 1.0, 5.0])
def test_clip_bounds_norm_and_keeps_small_updates(scale: float, clip: float) -> None:
    t = tree(np.random.default_rng(int(scale * 7 + clip)), scale)
    before = np.linalg.norm(flat(t))
    out = jax.tree.map(np.asarray, clip_by_l2(t, clip))
    after = np.linalg.norm(flat(out))
    assert after <= clip * (1 + 1e-5)
    if before <= clip:
        np.testing.assert_allclose(flat(out), flat(t), rtol=1e-6)
    else:
        assert after == pytest.approx(clip, rel=1e-5)
        np.testing.assert_allclose(flat(out) / after, flat(t) / before, atol=1e-6)  # direction kept
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in t.items()}


def test_l2_norm_matches_numpy() -> None:
    t = tree(np.random.default_rng(0), 3.0)
    assert float(l2_norm(t)) == pytest.approx(np.linalg.norm(flat(t)), rel=1e-5)


# ---- noise scale ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("clip", "sigma"), [(1.0, 1.0), (0.5, 4.0), (3.0, 0.3)])
def test_gaussian_mechanism_noise_scale(clip: float, sigma: float) -> None:
    zeros = {"w": jnp.zeros((400, 500), jnp.float32), "b": jnp.zeros(1000, jnp.float32)}
    out = privatize(zeros, jax.random.PRNGKey(1), clip, sigma)
    x = flat(jax.tree.map(np.asarray, out))
    assert x.std() == pytest.approx(sigma * clip, rel=0.01)  # 201,000 draws: 1 % is > 6 standard errors
    assert abs(x.mean()) < 5 * sigma * clip / np.sqrt(x.size)


def test_noise_is_independent_across_leaves_and_keys() -> None:
    z = {"a": jnp.zeros(10_000), "b": jnp.zeros(10_000)}
    n1 = gaussian_noise(z, jax.random.PRNGKey(0), 1.0)
    n2 = gaussian_noise(z, jax.random.PRNGKey(1), 1.0)
    assert abs(np.corrcoef(n1["a"], n1["b"])[0, 1]) < 0.05
    assert abs(np.corrcoef(n1["a"], n2["a"])[0, 1]) < 0.05


def test_client_privacy_clips_then_adds_fresh_noise() -> None:
    rng = np.random.default_rng(3)
    big = tree(rng, 100.0)
    dp = ClientPrivacy(ClientDP(clip_norm=2.0, noise_multiplier=0.0, seed=5), "a1")
    assert np.linalg.norm(flat(dp(big))) == pytest.approx(2.0, rel=1e-5)
    noisy = ClientPrivacy(ClientDP(clip_norm=2.0, noise_multiplier=1.5, seed=5), "a1")
    clipped = flat(jax.tree.map(np.asarray, clip_by_l2(big, 2.0)))
    residuals = np.concatenate([flat(noisy(big)) - clipped for _ in range(20)])
    assert residuals.std() == pytest.approx(3.0, rel=0.02)
    assert noisy.releases == 20
    one, two = flat(noisy(big)), flat(noisy(big))
    assert not np.allclose(one, two)  # fresh noise for every release
    other = ClientPrivacy(ClientDP(clip_norm=2.0, noise_multiplier=1.5, seed=5), "a2")
    again = ClientPrivacy(ClientDP(clip_norm=2.0, noise_multiplier=1.5, seed=5), "a1")
    assert not np.allclose(flat(other(big)), flat(again(big)))  # agents draw different noise
    unseeded = [ClientPrivacy(ClientDP(2.0, 1.5), "a1") for _ in range(2)]
    assert not np.allclose(flat(unseeded[0](big)), flat(unseeded[1](big)))  # OS entropy by default


# ---- central DP in FedBuff ------------------------------------------------------------------------------
def test_fedbuff_clips_each_delta_before_buffering() -> None:
    s = fedbuff(buffer_size=3, dp=CentralDP(clip=1.0, noise=0.0), weighting=constant())
    p = {"w": jnp.zeros(4)}
    st = s.init(p)
    for d in ([100.0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, -30.0, 0]):
        p, st, stepped = s.apply(p, ClientUpdate({"w": jnp.array(d)}, 0, 1), st)
    assert bool(stepped)
    np.testing.assert_allclose(p["w"], [1 / 3, 0.5 / 3, -1 / 3, 0], rtol=1e-6)
    assert int(st.dp_steps) == 1


def test_fedbuff_noise_on_the_sum_has_std_sigma_c() -> None:
    k, clip, sigma = 5, 0.5, 2.0
    s = fedbuff(buffer_size=k, dp=CentralDP(clip, sigma, seed=11))
    p0 = {"w": jnp.zeros((300, 400)), "b": jnp.zeros(500)}
    p, st = p0, s.init(p0)
    steps = 0
    zero = ClientUpdate(jax.tree.map(jnp.zeros_like, p0), 0, 1)
    for _ in range(k):  # zero deltas: all that moves the model is the noise, divided by K (sgd lr 1)
        p, st, stepped = s.apply(p, zero, st)
        steps += int(bool(stepped))
    x = flat(jax.tree.map(np.asarray, p))
    assert steps == 1
    assert x.std() == pytest.approx(sigma * clip / k, rel=0.01)
    assert not np.array_equal(np.asarray(st.key), np.asarray(s.init(p0).key))  # next step: new noise


def test_fedbuff_dp_is_pure() -> None:
    s = fedbuff(buffer_size=1, dp=CentralDP(1.0, 1.0, seed=2))
    p = {"w": jnp.zeros(8)}
    u = ClientUpdate({"w": jnp.ones(8)}, 1, 10)
    st = s.init(p)
    a, sa, _ = s.apply(p, u, st)
    b, _, _ = s.apply(p, u, st)
    np.testing.assert_array_equal(a["w"], b["w"])
    c, _, _ = s.apply(a, u, sa)
    assert not np.allclose(np.asarray(c["w"]) - np.asarray(a["w"]), np.asarray(a["w"]))  # new key, new noise


def test_fedbuff_dp_refuses_sample_weighting() -> None:
    with pytest.raises(ValueError, match="weight_by_samples"):
        fedbuff(dp=CentralDP(1.0, 1.0), weight_by_samples=True)


def test_fedbuff_without_dp_keeps_no_key() -> None:
    st = fedbuff().init({"w": jnp.zeros(2)})
    assert st.key is None
    assert st.dp_steps is None


# ---- accounting -----------------------------------------------------------------------------------------
def test_epsilon_behaves() -> None:
    assert epsilon(1.0, 0) == 0.0
    assert epsilon(0.0, 3) == float("inf")
    assert epsilon(2.0, 10) < epsilon(1.0, 10)  # more noise, less ε
    assert epsilon(1.0, 10) < epsilon(1.0, 100)  # more releases, more ε
    assert epsilon(1.0, 100, sampling_rate=0.1) < epsilon(1.0, 100)  # amplification when assumed
    assert epsilon(1.0, 10, delta=1e-3) < epsilon(1.0, 10, delta=1e-6)


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_noise_for_epsilon_inverts_the_accountant(target: float) -> None:
    sigma = noise_for_epsilon(target, 50)
    assert epsilon(sigma, 50) <= target
    assert epsilon(sigma * 0.99, 50) > target * 0.98


def test_single_gaussian_release_matches_analytic_bound() -> None:
    # One Gaussian mechanism: sigma = sqrt(2 ln(1.25/δ)) / ε gives (ε, δ)-DP for ε < 1 (Dwork & Roth A.1);
    # the RDP accountant must not report a worse ε than that classical bound.
    eps, delta = 0.5, 1e-5
    sigma = np.sqrt(2 * np.log(1.25 / delta)) / eps
    assert epsilon(float(sigma), 1, delta) <= eps


def test_client_privacy_reports_local_epsilon() -> None:
    dp = ClientPrivacy(ClientDP(1.0, 2.0, seed=0))
    assert dp.epsilon() == 0.0
    for _ in range(5):
        dp({"w": np.ones(3, np.float32)})
    assert dp.epsilon() == pytest.approx(epsilon(1.0, 5))  # replace-one adjacency: sensitivity 2C


# ---- client DP end to end ---------------------------------------------------------------------------------
async def test_agent_with_dp_publishes_only_clipped_noisy_deltas(monkeypatch: pytest.MonkeyPatch) -> None:
    clip, sigma = 0.25, 0.5
    task = get_task("digits", num_clients=2, seed=0)
    trainer = task.trainer(0)
    rounds: list[dict[str, np.ndarray]] = []  # the raw delta of each local round, before DP
    train = trainer.train

    def recording_train(flat, batches):  # type: ignore[no-untyped-def]
        new, loss = train(flat, batches)
        rounds.append({k: np.subtract(new[k], flat[k], dtype=flat[k].dtype) for k in new})
        return new, loss

    monkeypatch.setattr(trainer, "train", recording_train)
    broker = MemoryBroker()
    agg = Aggregator(broker.connect, trainer.initial, fedbuff(buffer_size=2))
    cfg = AgentConfig(dp=ClientDP(clip_norm=clip, noise_multiplier=sigma, seed=0))
    async with agg:
        await agg.wait_connected()
        async with EdgeAgent(broker.connect, "dp-agent", trainer, task.data_for(0), cfg) as agent:
            await agent.wait_updates(4, timeout=60)
    published: dict[str, dict[str, np.ndarray]] = {}  # by update id, in order (a re-send counts once)
    for m in broker.published:
        if m.topic == agg.topics.update("dp-agent"):
            d = codec.decode(m.payload)
            published.setdefault(d.metadata["fedmqtt.update_id"], d.tensors)
    assert len(published) >= 4
    assert agent.privacy is not None and agent.privacy.releases >= len(published)
    assert agent.acks["rejected"] == 0  # noisy, but within the aggregator's bounds
    residuals = []
    for sent, raw in zip(published.values(), rounds, strict=False):  # local round i made update i
        assert sent.keys() == raw.keys()
        assert all(sent[k].dtype == raw[k].dtype for k in raw)
        raw_flat = flat(raw)
        norm = np.linalg.norm(raw_flat)
        assert norm > clip + 8 * sigma * clip  # the clipping matters in this test
        clipped = flat(jax.tree.map(np.asarray, clip_by_l2(raw, clip)))
        # clipped, then noised: along the raw direction, C plus one N(0, (sigma C)²) draw (the raw delta's
        # norm, were it not clipped, would be more than 8 sigma C away)
        assert abs(float(flat(sent) @ raw_flat) / norm - clip) < 4 * sigma * clip
        r = flat(sent) - clipped
        assert r.std() == pytest.approx(sigma * clip, rel=0.05)  # 8970 draws per update
        residuals.append(r)
    noise = np.concatenate(residuals)
    assert noise.std() == pytest.approx(sigma * clip, rel=0.02)
    assert abs(noise.mean()) < 5 * sigma * clip / np.sqrt(noise.size)
    assert abs(np.corrcoef(residuals[0], residuals[1])[0, 1]) < 0.05  # fresh noise for every release


def test_agent_dp_needs_delta_encoding() -> None:
    task = get_task("digits", num_clients=2, seed=0)
    with pytest.raises(ConfigError, match="delta"):
        EdgeAgent(MemoryBroker().connect, "x", task.trainer(0), task.data_for(0),
                  AgentConfig(encoding="weights", dp=ClientDP()))



# ---- ε in the aggregator's metrics; nothing per-sample in them ---------------------------------------------
def _update(initial: dict[str, np.ndarray], agent: str, update_id: str, base: int) -> bytes:
    delta = {k: np.full_like(v, 0.01) for k, v in initial.items()}
    return codec.encode_update(delta, agent=agent, update_id=update_id, base_version=base, num_samples=10,
                               encoding="delta", model_fingerprint=codec.fingerprint(initial))


def test_central_dp_holds_an_agents_second_update_in_a_step_and_reports_epsilon() -> None:
    params = {"w": np.zeros(16, np.float32)}
    strategy = fedbuff(buffer_size=2, dp=CentralDP(clip=1.0, noise=1.5))
    r = core.rules(strategy, params, Limits())
    assert r.gated  # the strategy asks for it; no setting needed
    state = core.init(r, params, epoch="t")
    state, fx = core.receive(state, "a1", _update(params, "a1", "u1", 0), r)
    assert [(x.update_id, x.accepted) for x in fx.replies] == [("u1", True)]
    state, fx = core.receive(state, "a1", _update(params, "a1", "u2", 0), r)
    assert fx == core.Effects()  # held: no reply, no record, until the next step
    assert [h.key for h in state.gate.held] == ["a1/u2"] and state.counters.accepted == 1
    assert strategy.report is not None and strategy.report(state.strategy)["dp_steps"] == 0
    state, fx = core.receive(state, "a2", _update(params, "a2", "v1", 0), r)  # step 1: u1 and v1
    assert fx.stepped and state.version == 1
    assert [(x.agent, x.update_id, x.accepted) for x in fx.replies] == [("a2", "v1", True), ("a1", "u2", True)]
    assert [e.agent for e in fx.records] == ["a2", "a1"]
    assert state.gate.held == () and state.counters.accepted == 3
    report = strategy.report(state.strategy)
    assert report["dp_steps"] == 1
    # replace-one adjacency: a step's sum moves by up to 2C, so the accountant's multiplier is 1.5 / 2
    assert report["dp_epsilon"] == pytest.approx(epsilon(0.75, 1, 1e-5))


def test_aggregator_metrics_report_epsilon() -> None:
    task = get_task("digits", num_clients=2, seed=0)
    initial = task.trainer(0).initial
    agg = Aggregator(MemoryBroker().connect, initial, fedbuff(buffer_size=2, dp=CentralDP(clip=1.0, noise=1.5)))
    for i in range(6):  # two agents take turns: one update each per step
        agg.handle(f"a{i % 2}", _update(initial, f"a{i % 2}", f"u{i}", agg.version))
    assert (agg.state.counters.accepted, agg.version) == (6, 3)
    agg.handle("a0", _update(initial, "a0", "again", agg.version))
    agg.handle("a0", _update(initial, "a0", "held", agg.version))  # a0's second update in step 4: held
    m = agg.metrics().model_dump()
    assert (m["accepted"], m["held"], m["rejected"]) == (7, 1, 0)
    assert m["dp_steps"] == 3 and m["dp_participations"] == 3  # both agents are in every step
    assert m["dp_epsilon"] == pytest.approx(epsilon(0.75, 3, 1e-5))
    assert m["dp_epsilon"] > epsilon(0.75, 2, 1e-5) > 0
    assert m["dp_delta"] == 1e-5
    assert m["dp_noise_multiplier"] == 0.75 and m["dp_adjacency"] == "replace"
    # Aggregates only: no field holds an array, a list of samples or an update's values.
    assert all(not isinstance(v, list | tuple) for v in m.values())
    assert len(json.dumps(m)) < 2000


def test_epsilon_charges_the_steps_of_the_most_charged_device_not_every_step() -> None:
    task = get_task("digits", num_clients=2, seed=0)
    initial = task.trainer(0).initial
    agg = Aggregator(MemoryBroker().connect, initial, fedbuff(buffer_size=2, dp=CentralDP(clip=1.0, noise=1.5)))
    for i in range(8):  # four agents in turn: each is in one step of four... and then a0 again
        agg.handle(f"a{i % 4}", _update(initial, f"a{i % 4}", f"u{i}", agg.version))
    m = agg.metrics().model_dump()
    assert (m["dp_steps"], m["dp_participations"]) == (4, 2)
    assert m["dp_epsilon"] == pytest.approx(epsilon(0.75, 2, 1e-5)) and m["dp_epsilon"] < epsilon(0.75, 4, 1e-5)


def test_the_participation_counts_survive_a_snapshot(tmp_path: Path) -> None:
    params = {"w": np.zeros(4, np.float32)}
    strategy = fedbuff(buffer_size=2, dp=CentralDP(clip=1.0, noise=1.5))
    r = core.rules(strategy, params, Limits())
    state = core.init(r, params, epoch="t")
    for i, agent in enumerate(["a", "b", "a", "c", "a", "b"]):
        state, _ = core.receive(state, agent, _update(params, agent, f"u{i}", state.version), r)
    assert dict(state.gate.taken) == {"a": 3, "b": 2, "c": 1} and state.gate.most_taken() == 3
    snapshot.write(tmp_path, state, r, seq=1)
    restored = snapshot.read(tmp_path, r, "t")
    assert restored is not None and dict(restored[1].gate.taken) == {"a": 3, "b": 2, "c": 1}


def test_zero_out_adjacency_and_adaptive_clipping_change_the_multiplier() -> None:
    assert CentralDP(1.0, 3.0, adjacency="zero-out").multiplier() == 3.0
    assert CentralDP(1.0, 3.0).multiplier() == 1.5
    both = CentralDP(1.0, 3.0, quantile=0.5, count_noise=2.0).multiplier()
    assert both == pytest.approx((1.5 ** -2 + 2.0 ** -2) ** -0.5) and both < 1.5  # the count costs privacy too
    for bad in (CentralDP(1.0, 1.0, adjacency="add-remove"), CentralDP(1.0, 1.0, quantile=0.5),
                CentralDP(1.0, 1.0, quantile=1.5, count_noise=1.0)):
        with pytest.raises(ValueError, match=r"adjacency|adaptive clipping"):
            bad.check()


@pytest.mark.parametrize("start", [0.05, 20.0])
def test_adaptive_clipping_moves_the_clip_to_the_quantile_of_the_norms(start: float) -> None:
    rng = np.random.default_rng(0)
    norms = rng.uniform(1.0, 3.0, 4000)  # median 2.0
    dp = CentralDP(clip=start, noise=0.0, quantile=0.5, clip_lr=0.2, count_noise=0.5)
    s = fedbuff(buffer_size=20, dp=dp)
    params = {"w": jnp.zeros(3)}
    state = s.init(params)
    for n in norms:
        d = rng.normal(size=3)
        params, state, _ = s.apply(params, ClientUpdate({"w": jnp.asarray(d / np.linalg.norm(d) * n)}, 0, 1), state)
    assert float(state.clip) == pytest.approx(2.0, rel=0.15)
    assert s.report is not None and s.report(state)["dp_clip"] == pytest.approx(float(state.clip))


def test_metrics_without_dp_carry_no_epsilon() -> None:
    params = {"w": np.zeros(4, np.float32)}
    m = Aggregator(MemoryBroker().connect, params, fedbuff(buffer_size=2)).metrics().model_dump()
    assert not any(k.startswith("dp_") for k in m)


def test_a_device_past_its_step_budget_is_refused_and_epsilon_stays_bounded() -> None:
    params = {"w": np.zeros(4, np.float32)}
    strategy = fedbuff(buffer_size=2, dp=CentralDP(clip=1.0, noise=1.5))
    r = core.rules(strategy, params, Limits(max_participations=2))
    state = core.init(r, params, epoch="t")
    refused = []
    for i in range(12):  # "a" is fast: it sends between every update of the others
        agent = "a" if i % 2 == 0 else f"b{i}"
        state, fx = core.receive(state, agent, _update(params, agent, f"u{i}", state.version), r)
        refused += [(x.agent, x.reason) for x in fx.replies if not x.accepted]
    assert refused and set(refused) == {("a", "privacy_budget")}
    assert state.gate.taken["a"] == 2 and state.gate.most_taken() == 2
    assert strategy.report is not None
    report = strategy.report(state.strategy, state.gate.most_taken())
    assert report["dp_steps"] > 2 and report["dp_participations"] == 2
    assert report["dp_epsilon"] == pytest.approx(epsilon(0.75, 2, 1e-5))
    with pytest.raises(ConfigError, match="budget"):  # without DP (no gate) a budget would count nothing
        core.rules(fedbuff(buffer_size=2), params, Limits(max_participations=2))

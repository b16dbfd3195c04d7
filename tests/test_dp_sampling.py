"""Central DP with participation sampling: steps on the server's clock with a fixed denominator, each arriving
update taken with probability q by a keyed coin, and the accountant charging the Poisson-subsampled Gaussian."""

from __future__ import annotations

import asyncio
import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedmqtt import core
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.core import Limits, Timing
from fedmqtt.errors import ConfigError
from fedmqtt.outbox import paced
from fedmqtt.privacy import CentralDP
from fedmqtt.schemas import Ack
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, mqtt_connector
from test_gate import PARAMS, update  # a 4-parameter model and a delta update on it


def sampled_rules(q: float, k: int = 4, noise: float = 0.0, key: bytes = b"test key") -> core.Rules:
    strategy = make("fedbuff", buffer_size=k, dp_clip=10.0, dp_noise=noise, dp_sampling=q, staleness_a=0.0)
    return core.rules(strategy, PARAMS, Limits(), sampling_key=key)


def test_steps_come_from_the_clock_and_divide_by_k_whatever_they_hold() -> None:
    r = sampled_rules(1.0, k=4)
    s = core.init(r, PARAMS, epoch="e")
    for i in range(6):  # more than K: a clocked buffer never closes on a count
        s, fx = core.receive(s, f"a{i}", update(f"a{i}", "u1", 0.5), r)
        assert fx.replies[0].accepted and not fx.stepped
    assert s.version == 0
    s, fx = core.flush(s, r)
    assert fx.stepped and s.version == 1
    np.testing.assert_allclose(np.asarray(s.params["w"]), 6 * 0.5 / 4)  # the sum over K, not over 6
    s, fx = core.flush(s, r)  # nothing arrived: still a step (no noise here, so the model stays)
    assert fx.stepped and s.version == 2
    np.testing.assert_allclose(np.asarray(s.params["w"]), 0.75)


def test_an_empty_step_still_releases_noise() -> None:
    r = sampled_rules(1.0, k=4, noise=1.0)
    s, fx = core.flush(core.init(r, PARAMS, epoch="e"), r)
    assert fx.stepped and s.version == 1
    assert float(np.abs(np.asarray(s.params["w"])).sum()) > 0  # N(0, (σC)²)/K on each coordinate


def test_the_coin_takes_about_q_of_the_devices_and_the_same_device_once_per_step() -> None:
    q, n = 0.3, 2000
    r = sampled_rules(q)
    s = core.init(r, PARAMS, epoch="e")
    first: dict[str, bool] = {}
    for i in range(n):
        s, fx = core.receive(s, f"d{i}", update(f"d{i}", "u1", 0.1), r)
        (reply,) = fx.replies
        first[f"d{i}"] = reply.accepted
        assert reply.accepted or reply.reason == "not_sampled"
    taken = sum(first.values())
    assert abs(taken - q * n) < 5 * math.sqrt(n * q * (1 - q)), taken  # binomial, five standard deviations
    assert s.counters.rejected == {"not_sampled": n - taken}
    left_out = [a for a, ok in first.items() if not ok][:200]
    for a in left_out:  # another update in the same step: the same coin, so no second chance
        s, fx = core.receive(s, a, update(a, "u2", 0.1), r)
        assert fx.replies[0].reason == "not_sampled"
    s, _ = core.flush(s, r)  # the next step draws new coins
    again = 0
    for a in left_out:
        s, fx = core.receive(s, a, update(a, "u3", 0.1, base=1), r)
        again += fx.replies[0].accepted
    assert 0 < again < len(left_out)
    other = sampled_rules(q, key=b"another key")  # a key nobody else holds decides; not the ids alone
    s2 = core.init(other, PARAMS, epoch="e")
    differs = 0
    for i in range(200):
        s2, fx = core.receive(s2, f"d{i}", update(f"d{i}", "u1", 0.1), other)
        differs += fx.replies[0].accepted != first[f"d{i}"]
    assert differs > 20


def test_the_accountant_charges_every_step_as_a_poisson_subsampled_gaussian() -> None:
    dp = CentralDP(1.0, 1.5, adjacency="add-remove", sampling=0.2).check()
    strategy = make("fedbuff", buffer_size=10, dp_clip=1.0, dp_noise=1.5, dp_sampling=0.2)
    assert strategy.report is not None and strategy.sampling == 0.2
    state = strategy.init(PARAMS)._replace(dp_steps=np.asarray(40, np.int32))
    report = strategy.report(state, 3)  # participations do not lower the charge: every step is charged
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.5)), 40))
    assert report["dp_participations"] == 40 and report["dp_sampling"] == 0.2
    assert report["dp_adjacency"] == "add-remove" and dp.multiplier() == 1.5  # sensitivity C
    assert report["dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    unsampled = make("fedbuff", buffer_size=10, dp_clip=1.0, dp_noise=1.5, dp_sampling=1.0)
    assert unsampled.report is not None
    assert unsampled.report(state, 3)["dp_epsilon"] > 3 * report["dp_epsilon"]  # what sampling buys here


@pytest.mark.parametrize(("options", "message"), [
    ({"dp_sampling": 0.5, "dp_adjacency": "replace"}, "add-remove or zero-out"),
    ({"dp_adjacency": "add-remove"}, "steps on a clock"),
    ({"dp_sampling": 0.0}, "(0, 1]"),
    ({"dp_sampling": 1.5}, "(0, 1]"),
])
def test_settings_that_would_make_epsilon_wrong_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        make("fedbuff", buffer_size=10, dp_clip=1.0, dp_noise=1.0, **options)  # type: ignore[arg-type]


def test_a_clocked_step_is_due_on_time_alone() -> None:
    r = sampled_rules(0.5)
    s = core.init(r, PARAMS, epoch="e")
    timing = Timing(step_every=2.0, step_deadline=None)
    assert not core.flush_due(s, r, timing, online=0, waited=1.9)
    assert core.flush_due(s, r, timing, online=0, waited=2.0)  # nothing held, nobody online: due all the same


def test_a_left_out_update_paces_the_device_like_an_accepted_one() -> None:
    for pause in (0.0, 0.5):
        left_out = Ack(update_id="u", status="rejected", version=0, reason="not_sampled")
        accepted = Ack(update_id="u", status="accepted", version=1)
        assert paced(pause, left_out) == paced(pause, accepted)


def test_sampling_is_refused_where_it_does_not_apply() -> None:
    from typer.testing import CliRunner

    from fedmqtt.cli import app

    out = CliRunner().invoke(app, ["aggregator", "--strategy", "fedasync", "--dp-clip", "1", "--dp-sampling", "0.5",
                                   "--print-config"])
    assert out.exit_code != 0 and "--dp-sampling" in out.output
    with pytest.raises(ConfigError, match="every step is charged"):
        core.rules(make("fedbuff", dp_clip=1.0, dp_noise=1.0, dp_sampling=0.5), PARAMS, Limits(max_participations=3))


# ---- over Mosquitto ---------------------------------------------------------------------------------------
@pytest.mark.broker
async def test_sampled_federation_over_mosquitto_steps_on_the_clock(broker: BrokerConfig, federation: str) -> None:
    task = get_task("digits", num_clients=6, seed=0)
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    names = [f"ps-{i}" for i in range(6)]
    agg = Aggregator(connect, task.trainer(0).initial,
                     make("fedbuff", buffer_size=3, dp_clip=1.0, dp_noise=0.5, dp_sampling=0.5),
                     AggregatorConfig(topics=topics, timing=Timing(step_every=0.5)))
    acks = Inbox()
    async with agg, connect(ConnectOptions(f"{federation}-acks", on_message=acks)) as watcher:
        for name in names:
            await watcher.subscribe(topics.acks(name))
        await agg.wait_connected()
        agents = [EdgeAgent(connect, name, task.trainer(0), task.data_for(i),
                            AgentConfig(topics=topics, round_seconds=0.1)) for i, name in enumerate(names)]
        for a in agents:
            await a.__aenter__()
        try:
            await agg.wait_version(8, timeout=60)
        finally:
            for a in agents:
                await a.__aexit__(None, None, None)
        inbox = Inbox()
        async with connect(ConnectOptions(f"{federation}-reader", on_message=inbox)) as reader:
            await reader.subscribe(topics.metrics)
            async with asyncio.timeout(10):
                while (metrics := json.loads((await inbox.get()).payload))["version"] < 8:
                    pass
    seen: dict[str, list[str]] = {n: [] for n in names}
    while not acks.queue.empty():
        msg = acks.queue.get_nowait()
        ack = Ack.model_validate_json(msg.payload)
        seen[msg.topic.split("/")[-2]].append(ack.status if ack.status == "accepted" else str(ack.reason))
    outcomes = [o for per in seen.values() for o in per]
    assert set(outcomes) <= {"accepted", "not_sampled"}, outcomes  # nothing else refused, nothing lost
    assert outcomes.count("accepted") > 0 and outcomes.count("not_sampled") > 0
    # a device left out of one step goes on and is taken in a later one
    assert any("not_sampled" in per and "accepted" in per[per.index("not_sampled"):] for per in seen.values())
    assert metrics["dp_sampling"] == 0.5 and metrics["dp_adjacency"] == "add-remove"
    assert metrics["dp_steps"] == metrics["version"] and metrics["dp_participations"] == metrics["dp_steps"]
    expected = rdp.RdpAccountant()
    expected.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(0.5)), metrics["dp_steps"]))
    assert metrics["dp_epsilon"] == pytest.approx(expected.get_epsilon(1e-5), rel=1e-6)


def test_epsilon_and_refused_statuses_reach_the_prometheus_endpoint() -> None:
    from fedmqtt.prometheus import Exporter
    from fedmqtt.schemas import Metrics

    exporter = Exporter()
    exporter.update(Metrics(version=3, accepted=5, rejected=0, rejected_by_reason={}, statuses_refused=2,
                            dp_epsilon=1.5, dp_delta=1e-5, dp_sampling=0.5))
    values = {f.name: f.samples[0].value for f in exporter.collect() if f.samples}
    assert values["fedmqtt_dp_epsilon"] == 1.5 and values["fedmqtt_dp_delta"] == 1e-5
    assert values["fedmqtt_statuses_refused"] == 2
    exporter.update(Metrics(version=3, accepted=5, rejected=0, rejected_by_reason={}))
    assert not any(f.name.startswith("fedmqtt_dp") for f in exporter.collect())  # no DP, no ε series


def test_adaptive_clipping_on_clocked_steps_counts_over_k_not_over_who_came() -> None:
    # 2 of K = 4 expected deltas came, both within the clip: over K the fraction within is 0.5, the quantile,
    # so the clip stays; over the 2 that came it would be 1.0 and the clip would shrink, and how far would
    # tell how many came (which add/remove neighbours differ in)
    strategy = make("fedbuff", buffer_size=4, dp_clip=1.0, dp_noise=0.0, dp_quantile=0.5, dp_count_noise=1e-6,
                    dp_sampling=1.0, staleness_a=0.0)
    r = core.rules(strategy, PARAMS, Limits(), sampling_key=b"k")
    s = core.init(r, PARAMS, epoch="e")
    for a in ("a", "b"):
        s, _ = core.receive(s, a, update(a, "u", 0.1), r)
    s, fx = core.flush(s, r)
    assert fx.stepped
    assert float(s.strategy.clip) == pytest.approx(1.0, abs=1e-4)

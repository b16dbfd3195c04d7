"""Aggregator and agents as asyncio services on a real Mosquitto: learning, late joiners, acks, presence."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from fedmqtt import codec
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.compression import Compression
from fedmqtt.schemas import Ack, Status
from fedmqtt.strategies import fedasync
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, mqtt_connector

pytestmark = pytest.mark.broker


def services(broker: BrokerConfig, federation: str, agents: int = 4):  # type: ignore[no-untyped-def]
    task = get_task("digits", num_clients=agents)
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    trainer = task.trainer(0)
    agg = Aggregator(connect, trainer.initial, fedasync(),
                     AggregatorConfig(topics=topics, client_id=f"agg-{federation}", eval_interval=0.2),
                     evaluate=task.evaluate_fn(trainer))
    return task, topics, connect, agg


async def test_multi_agent_federation_learns(broker: BrokerConfig, federation: str) -> None:
    task, topics, connect, agg = services(broker, federation)
    async with agg:
        await agg.wait_connected()
        agents = [EdgeAgent(connect, f"edge-{i}", task.trainer(0), task.data_for(i),
                            AgentConfig(topics=topics, round_seconds=0.05 * (i + 1))) for i in range(4)]
        for a in agents:
            await a.__aenter__()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (agg.eval.get("accuracy", 0.0) < 0.9 or agg.version < 40):
                await asyncio.sleep(0.2)
        finally:
            for a in agents:
                await a.__aexit__(None, None, None)
        final = task.evaluate_fn(task.trainer(0))(agg.numpy_params())
        assert final["accuracy"] >= 0.9
        counters = agg.state.counters
        assert counters.accepted >= 40
        assert sum(counters.rejected.values()) == 0
        # Every agent contributed, and the slowest agent's updates arrived stale but were used.
        assert all(a.acks["accepted"] > 0 for a in agents)
        assert max(counters.staleness) > 0


async def test_pull_delivery_takes_one_model_per_round_where_push_takes_every_version(
        broker: BrokerConfig, federation: str) -> None:
    task, topics, connect, agg = services(broker, federation, agents=5)
    async with agg:
        await agg.wait_connected()
        fast = [EdgeAgent(connect, f"fast-{i}", task.trainer(0), task.data_for(i),  # 10x the slow ones' pace
                          AgentConfig(topics=topics, round_seconds=0.05)) for i in range(3)]
        pull, push = (EdgeAgent(connect, f"slow-{mode}", task.trainer(0), task.data_for(3 + k),
                                AgentConfig(topics=topics, round_seconds=0.5, model_delivery=mode))  # type: ignore[arg-type]
                      for k, mode in enumerate(("pull", "push")))
        for a in [*fast, pull, push]:
            await a.__aenter__()
        try:
            await pull.wait_updates(6, timeout=60)
            await push.wait_updates(6, timeout=60)
        finally:
            for a in [*fast, pull, push]:
                await a.__aexit__(None, None, None)
    rounds = len(pull.trained_versions)
    assert agg.version > 10 * rounds  # the fast agents made many versions meanwhile
    assert rounds <= pull.models_received <= rounds + 2  # a model per round (the next round's, in flight)
    assert push.models_received > 5 * len(push.trained_versions)
    assert pull.acks["accepted"] >= 6 and pull.acks["rejected"] == 0


@pytest.mark.parametrize("forms", [("int8",), ()])
async def test_a_compressed_model_download_is_used_when_published_and_the_full_one_otherwise(
        broker: BrokerConfig, federation: str, forms: tuple[str, ...]) -> None:
    task = get_task("digits", num_clients=2)
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    trainer = task.trainer(0)
    agg = Aggregator(connect, trainer.initial, fedasync(),
                     AggregatorConfig(topics=topics, client_id=f"agg-{federation}", model_forms=forms))
    async with agg:
        await agg.wait_connected()
        agent = EdgeAgent(connect, "slim-0", task.trainer(0), task.data_for(0),
                          AgentConfig(topics=topics, model_download="int8", compression=Compression("topk", 0.1)))
        seen: list[str] = []
        inner = agent._on_message
        agent._on_message = lambda m: (seen.append(m.topic), inner(m))[1]  # type: ignore[method-assign]
        async with agent:
            await agent.wait_updates(5, timeout=60)
            held = agent.model
        assert agent.acks["accepted"] >= 5 and agent.acks["rejected"] == 0
        assert held is not None
        models = [t for t in seen if t.startswith(topics.model)]
        if forms:  # the full model at most once: before the aggregator's first int8 copy was retained
            assert models.count(topics.model) <= 1 and models[-1] == topics.model_form("int8")
            assert models.count(topics.model_form("int8")) >= len(agent.trained_versions) - 1
        else:
            assert set(models) == {topics.model} and len(models) >= len(agent.trained_versions)
        assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in held.params.values())


async def test_late_joiner_gets_newest_retained_model(broker: BrokerConfig, federation: str) -> None:
    task, topics, connect, agg = services(broker, federation, agents=2)
    async with agg:
        await agg.wait_connected()
        early = EdgeAgent(connect, "early-0", task.trainer(0), task.data_for(0), AgentConfig(topics=topics))
        async with early:
            await early.wait_updates(5, timeout=30)
        version_before_join = -1
        while agg.version != version_before_join:  # let updates still in flight land
            version_before_join = agg.version
            await asyncio.sleep(0.5)
        await agg.wait_version(version_before_join, timeout=10)  # the newest version is on the retained topic
        assert version_before_join >= 5
        late = EdgeAgent(connect, "late-1", task.trainer(0), task.data_for(1),
                         AgentConfig(topics=topics, round_seconds=5.0))  # slow: cannot move the model itself
        async with late:
            model = await late.wait_model(timeout=10)
        assert model.info.version == version_before_join
        for name, value in agg.numpy_params().items():
            np.testing.assert_array_equal(model.params[name], value)


async def test_rejection_is_reported_to_its_sender(broker: BrokerConfig, federation: str) -> None:
    task, topics, connect, agg = services(broker, federation, agents=1)
    async with agg:
        await agg.wait_connected()
        inbox = Inbox()
        async with connect(ConnectOptions(f"raw-{uuid.uuid4().hex[:6]}", on_message=inbox)) as t:
            await t.subscribe(topics.acks("intruder"), qos=1)
            bad = {k: np.full_like(v, np.nan) for k, v in agg.numpy_params().items()}
            payload = codec.encode_update(bad, agent="intruder", update_id="nan-1", base_version=0, num_samples=1)
            await t.publish(topics.update("intruder"), payload, qos=1)
            spoof = codec.encode_update(bad, agent="someone-else", update_id="sp-1", base_version=0, num_samples=1)
            await t.publish(topics.update("intruder"), spoof, qos=1)
            acks = []
            async with asyncio.timeout(10):
                async for msg in inbox:
                    acks.append(Ack.model_validate_json(msg.payload))
                    if len(acks) == 2:
                        break
        assert [(a.update_id, a.status, a.reason) for a in acks] == [
            ("nan-1", "rejected", "non_finite"), ("sp-1", "rejected", "agent_mismatch")]
        assert agg.metrics().rejected_by_reason == {"non_finite": 1, "agent_mismatch": 1}
        assert agg.version == 0
        assert all(np.isfinite(v).all() for v in agg.numpy_params().values())


async def test_last_will_marks_a_killed_agent_offline(broker: BrokerConfig, federation: str) -> None:
    topics = Topics(federation=federation)
    proc = subprocess.Popen([sys.executable, "-m", "fedmqtt", "edge", "--broker", broker.url, "--federation",
                             federation, "--agent-id", "doomed-1"], stdout=subprocess.DEVNULL)
    seen: list[str] = []
    try:
        inbox = Inbox()
        async with mqtt_connector(broker)(ConnectOptions(f"w-{uuid.uuid4().hex[:6]}", on_message=inbox)) as t:
            await t.subscribe(topics.status("doomed-1"), qos=1)
            async with asyncio.timeout(60):
                async for msg in inbox:
                    seen.append(Status.model_validate_json(msg.payload).state)
                    if seen[-1] == "online" and proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)  # no goodbye: only the will can say offline
                    elif seen[-1] == "offline":
                        break
    finally:
        proc.kill()
        proc.wait()
    assert seen[0] == "online" and seen[-1] == "offline"


async def test_metrics_are_retained_json_with_required_keys(broker: BrokerConfig, federation: str) -> None:
    task, topics, connect, agg = services(broker, federation, agents=1)
    async with agg:
        await agg.wait_connected()
        agg.handle("x", b"junk")
    inbox = Inbox()  # after the aggregator has gone: its last metrics stay retained
    async with connect(ConnectOptions(f"m-{uuid.uuid4().hex[:6]}", on_message=inbox)) as t:
        await t.subscribe(topics.metrics, qos=1)
        msg = await inbox.get(timeout=10)
    body = json.loads(msg.payload)
    assert msg.retain
    assert {"version", "accepted", "rejected", "rejected_by_reason"} <= body.keys()
    assert body["rejected_by_reason"] == {"malformed": 1}


async def test_the_aggregator_comes_back_after_its_session_is_taken_over(broker: BrokerConfig,
                                                                        federation: str) -> None:
    """On an open broker anyone may connect with the aggregator's client id (the secure profile binds ids to
    usernames, tests/test_security.py); the aggregator cannot prevent it there, but it reconnects and serves."""
    _, topics, connect, agg = services(broker, federation, agents=1)
    async with agg:
        await agg.wait_connected()
        async with connect(ConnectOptions(f"agg-{federation}")):  # the aggregator's own client id
            await agg.wait_until(lambda: agg.connects >= 2, 30, lambda: "the aggregator did not come back")
        zero = {k: np.zeros_like(v) for k, v in agg.numpy_params().items()}
        async with connect(ConnectOptions(f"late-{federation}"[:60])) as t:  # and it serves again
            await t.publish(topics.update("late"), codec.encode_update(
                zero, agent="late", update_id="after-takeover", base_version=agg.version, num_samples=1))
            await agg.wait_until(lambda: agg.state.counters.accepted == 1, 30, lambda: "the update was not applied")

"""One update per agent per server step (central DP's sensitivity): the StepGate alone and in the aggregator."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

from fedmqtt import codec
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.errors import ConfigError
from fedmqtt.gate import Held, StepGate
from fedmqtt.privacy import central_accountant, epsilon
from fedmqtt.schemas import Ack
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, MemoryBroker, Message, mqtt_connector

PARAMS = {"w": np.zeros(4, np.float32)}
FP = codec.fingerprint(PARAMS)
TOPICS = Topics()


def update(agent: str, update_id: str, value: float, base: int = 0) -> Message:
    payload = codec.encode_update({"w": np.full(4, value, np.float32)}, agent=agent, update_id=update_id,
                                  base_version=base, num_samples=10, encoding="delta", model_fingerprint=FP)
    return Message(TOPICS.update(agent), payload)


def make_agg(gate: bool, state_dir: Path | None = None, max_staleness: int = 64) -> Aggregator:
    strategy = make("fedbuff", buffer_size=2, dp_clip=10.0, dp_noise=0.0, staleness_a=0.0)
    cfg = AggregatorConfig(one_update_per_step=gate, state_dir=state_dir, max_staleness=max_staleness)
    return Aggregator(MemoryBroker().connect, PARAMS, strategy, cfg)


def acks(agg: Aggregator) -> list[tuple[str, Ack]]:
    out = []
    while not agg._acks.empty():
        out.append(agg._acks.get_nowait())
    return out


def test_gate_holds_resends_once_and_releases_one_per_agent_in_arrival_order() -> None:
    g = StepGate(capacity=3)
    g.admit("a")
    assert not g.admits("a") and g.admits("b")
    assert g.hold("a/1", "a", b"1", 0) and g.hold("a/1", "a", b"1", 0)  # a re-send is held once
    assert g.hold("a/2", "a", b"2", 0) and g.hold("c/1", "c", b"3", 1)
    assert not g.hold("d/1", "d", b"4", 1) and g.dropped == 1  # capacity 3
    assert list(g.ready()) == [Held("c", b"3", 1)]  # "a" is still in this step
    g.advance()
    assert [h.payload for h in g.ready()] == [b"1"]  # one per agent per call, oldest first
    assert len(g) == 1


def test_one_agent_cannot_crowd_out_the_others() -> None:
    g = StepGate(capacity=100, per_agent=2, max_bytes=10)
    assert g.hold("a/1", "a", b"xx", 0) and g.hold("a/2", "a", b"xx", 0)
    assert not g.hold("a/3", "a", b"xx", 0)  # per agent
    assert g.hold("b/1", "b", b"xxxx", 0)
    assert not g.hold("c/1", "c", b"xxx", 0)  # 8 + 3 bytes > 10
    assert g.dropped == 2 and len(g) == 3
    assert [h.agent for h in g.ready()] == ["a", "b"]
    assert g.hold("c/1", "c", b"xxx", 0)  # released bytes and slots are free again


def test_second_update_from_an_agent_waits_for_the_next_step() -> None:
    agg = make_agg(gate=True)
    agg._on_message(update("a", "u1", 0.1))
    agg._on_message(update("a", "u2", 0.5))  # same step: held, not acknowledged
    agg._on_message(update("a", "u2", 0.5))  # the agent's re-send: still held once
    assert [(a, k.update_id, k.status) for a, k in acks(agg)] == [("a", "u1", "accepted")]
    assert agg.metrics().held == 1 and agg.version == 0
    agg._on_message(update("b", "v1", 0.3))  # fills the buffer: step 1 = mean of u1 and v1
    assert agg.version == 1
    np.testing.assert_allclose(np.asarray(agg.params["w"]), 0.2, rtol=1e-6)
    got = [(a, k.update_id, k.status, k.version) for a, k in acks(agg)]
    assert got == [("b", "v1", "accepted", 1), ("a", "u2", "accepted", 1)]  # u2 applied after the step
    assert agg.metrics().held == 0 and agg.accepted == 3
    agg._on_message(update("b", "v2", 0.1, base=1))  # step 2 = mean of u2 and v2
    np.testing.assert_allclose(np.asarray(agg.params["w"]), 0.2 + 0.3, rtol=1e-6)


def test_a_held_update_is_judged_stale_as_of_its_arrival() -> None:
    agg = make_agg(gate=True, max_staleness=1)
    for uid in ("u1", "u2", "u3"):  # all on base 0; u2 and u3 wait one and two steps
        agg._on_message(update("a", uid, 0.1))
    agg._on_message(update("b", "v1", 0.1))  # step 1; then u2 goes in (staleness 1)
    agg._on_message(update("b", "v2", 0.1, base=1))  # step 2; then u3 goes in: staleness 2 > 1, but it
    got = {k.update_id: k.status for _, k in acks(agg)}  # arrived when it was fresh enough
    assert got == {"u1": "accepted", "v1": "accepted", "u2": "accepted", "v2": "accepted", "u3": "accepted"}
    agg._on_message(update("c", "late", 0.1, base=0))  # a new arrival as stale is still refused
    assert [(k.update_id, k.reason) for _, k in acks(agg)] == [("late", "stale")]


def test_the_gate_is_for_asynchronous_strategies() -> None:
    with pytest.raises(ConfigError, match="asynchronous"):
        Aggregator(MemoryBroker().connect, PARAMS, make("fedavg"), AggregatorConfig(one_update_per_step=True))


async def test_fewer_agents_than_k_still_make_progress_with_partial_steps() -> None:
    task = get_task("digits", num_clients=2, seed=0)
    broker = MemoryBroker()
    cfg = AggregatorConfig(one_update_per_step=True, step_deadline=0.3, privacy=central_accountant(1.0))
    agg = Aggregator(broker.connect, task.trainer(0).initial,
                     make("fedbuff", buffer_size=5, dp_clip=1.0, dp_noise=1.0), cfg)
    async with agg:
        await agg.wait_connected()
        agents = [EdgeAgent(broker.connect, f"few-{i}", task.trainer(0), task.data_for(i)) for i in range(2)]
        for a in agents:
            await a.__aenter__()
        try:
            deadline = time.monotonic() + 30
            while agg.version < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            for a in agents:
                await a.__aexit__(None, None, None)
    assert agg.version >= 3  # K = 5 can never fill with 2 agents; partial steps keep it going
    assert agg.metrics().model_dump()["dp_steps"] == agg.version
    assert sum(a.acks["rejected"] for a in agents) == 0


def test_without_the_gate_both_updates_of_one_agent_share_a_step() -> None:
    agg = make_agg(gate=False)
    agg._on_message(update("a", "u1", 0.1))
    agg._on_message(update("a", "u2", 0.5))
    assert agg.version == 1
    np.testing.assert_allclose(np.asarray(agg.params["w"]), 0.3, rtol=1e-6)


@pytest.mark.parametrize("snapshot", [True, False], ids=["from-snapshot", "from-journal"])
def test_the_current_step_survives_a_restart(tmp_path: Path, snapshot: bool) -> None:
    first = make_agg(gate=True, state_dir=tmp_path)
    first.recover()
    first._on_message(update("a", "u1", 0.1))
    d = first.durability
    assert d is not None and d.journal is not None
    d.journal.sync()
    if snapshot:
        asyncio.run(first.snapshot())
    d.journal.close()
    second = make_agg(gate=True, state_dir=tmp_path)
    second.recover()
    assert second.gate is not None and second.gate.in_step == {"a"}
    second._on_message(update("a", "u2", 0.2))
    assert second.metrics().held == 1 and second.version == 0


# ---- over Mosquitto, with real agents of different speeds -------------------------------------------------
@pytest.mark.broker
async def test_central_dp_federation_over_mosquitto_keeps_one_update_per_agent_per_step(
        broker: BrokerConfig, federation: str) -> None:
    task = get_task("digits", num_clients=4, seed=0)
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    cfg = AggregatorConfig(topics=topics, privacy=central_accountant(1.0), one_update_per_step=True)
    agg = Aggregator(connect, task.trainer(0).initial, make("fedbuff", buffer_size=3, dp_clip=1.0, dp_noise=1.0),
                     cfg)
    steps: dict[int, list[str]] = {}
    apply = agg._apply

    def spy(checked, params, state, stepped):  # type: ignore[no-untyped-def]
        steps.setdefault(agg.version, []).append(checked.info.agent)  # the step this update goes into
        apply(checked, params, state, stepped)

    agg._apply = spy  # type: ignore[method-assign]
    held_seen = 0
    async with agg:
        await agg.wait_connected()
        agents = [EdgeAgent(connect, f"dp-{i}", task.trainer(0), task.data_for(i),
                            AgentConfig(topics=topics, round_seconds=0.05 * 3**i)) for i in range(4)]  # 1:27
        for a in agents:
            await a.__aenter__()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and agg.version < 8:
                held_seen = max(held_seen, agg.metrics().held)
                await asyncio.sleep(0.02)
        finally:
            for a in agents:
                await a.__aexit__(None, None, None)
        await agg.wait_version(agg.committed_version, timeout=10)
        async with connect(ConnectOptions("dp-reader")) as reader:
            await reader.subscribe(topics.metrics)
            async for m in reader.messages():
                metrics = json.loads(m.payload)
                break
    assert agg.version >= 8 and held_seen > 0  # fast agents did send twice within a step, and waited
    full = [agents_in for v, agents_in in steps.items() if v < agg.version]
    assert all(len(s) == 3 and len(set(s)) == 3 for s in full), full  # K distinct agents in every step
    assert sum(a.acks["rejected"] for a in agents) == 0
    assert metrics["dp_steps"] == metrics["version"] and metrics["dp_delta"] == 1e-5
    assert metrics["dp_epsilon"] == pytest.approx(epsilon(1.0, metrics["dp_steps"]))

"""One update per agent per server step (central DP's sensitivity): the functional gate alone, in the core,
and in the aggregator service."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedmqtt import codec, core, gate
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.core import Entry, Limits, Reply, ServerState, Timing
from fedmqtt.durability import Durability
from fedmqtt.errors import ConfigError
from fedmqtt.gate import Gate, GateLimits, Held
from fedmqtt.memory_broker import MemoryBroker
from fedmqtt.privacy import epsilon
from fedmqtt.schemas import Ack
from fedmqtt.strategies.base import Strategy
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, mqtt_connector

PARAMS = {"w": np.zeros(4, np.float32)}
FP = codec.fingerprint(PARAMS)


def update(agent: str, update_id: str, value: float, base: int = 0) -> bytes:
    return codec.encode_update({"w": np.full(4, value, np.float32)}, agent=agent, update_id=update_id,
                               base_version=base, num_samples=10, encoding="delta", model_fingerprint=FP)


def dp_fedbuff() -> Strategy:
    """K = 2, clip 10 (never reached here), no noise, no staleness discount: each step is the plain mean."""
    return make("fedbuff", buffer_size=2, dp_clip=10.0, dp_noise=0.0, staleness_a=0.0)


def gated_rules(**limits: object) -> core.Rules:
    r = core.rules(dp_fedbuff(), PARAMS, Limits(**limits))  # type: ignore[arg-type]
    assert r.gated  # central DP turns the gate on by itself
    return r


class Server:
    """The core driven by hand: the state, and every reply and record it produced, in order."""

    def __init__(self, r: core.Rules) -> None:
        self.rules = r
        self.state: ServerState = core.init(r, PARAMS, epoch="e")
        self.replies: list[Reply] = []
        self.records: list[Entry] = []

    def receive(self, agent: str, payload: bytes) -> core.Effects:
        self.state, fx = core.receive(self.state, agent, payload, self.rules)
        self.replies += fx.replies
        self.records += fx.records
        return fx

    def take_replies(self) -> list[tuple[str, str, bool, int, str | None]]:
        out = [(x.agent, x.update_id, x.accepted, x.version, x.reason) for x in self.replies]
        self.replies.clear()
        return out


# ---- the gate alone ---------------------------------------------------------------------------------------
def test_gate_holds_resends_once_and_releases_one_per_agent_in_arrival_order() -> None:
    limits = GateLimits(max_held=3)
    empty = Gate()
    g = gate.admit(empty, "a")
    assert not gate.admits(g, "a") and gate.admits(g, "b")
    assert gate.admits(empty, "a")  # a value: admitting built a new gate
    g = gate.hold(g, Held("a/1", "a", b"1", 0), limits)
    assert gate.hold(g, Held("a/1", "a", b"1", 0), limits) == g  # a re-send is held once, and is no drop
    g = gate.hold(g, Held("a/2", "a", b"2", 0), limits)
    g = gate.hold(g, Held("c/1", "c", b"3", 1), limits)
    assert [h.key for h in g.held] == ["a/1", "a/2", "c/1"] and g.dropped == 0
    full = gate.hold(g, Held("d/1", "d", b"4", 1), limits)  # capacity 3
    assert full.held == g.held and full.dropped == 1
    g, ready = gate.take_ready(full)
    assert ready == (Held("c/1", "c", b"3", 1),)  # "a" is still in this step
    assert g.in_step == {"a"}  # taking out is not admitting: the caller admits each as it applies it
    g, ready = gate.take_ready(gate.advance(g))
    assert g.in_step == frozenset()
    assert [h.payload for h in ready] == [b"1"]  # one per agent per call, oldest first
    assert [h.key for h in g.held] == ["a/2"] and g.dropped == 1
    g, ready = gate.take_ready(g)  # "a" not admitted in between: its next one comes out on the next call
    assert [h.key for h in ready] == ["a/2"] and g.held == ()


def test_one_agent_cannot_crowd_out_the_others() -> None:
    limits = GateLimits(max_held=100, max_held_per_agent=2, max_held_bytes=10)
    g = Gate()
    for held in (Held("a/1", "a", b"xx", 0), Held("a/2", "a", b"xx", 0), Held("a/3", "a", b"xx", 0),  # 3rd: per agent
                 Held("b/1", "b", b"xxxx", 0), Held("c/1", "c", b"xxx", 0)):  # 8 + 3 bytes > 10
        g = gate.hold(g, held, limits)
    assert g.dropped == 2 and [h.key for h in g.held] == ["a/1", "a/2", "b/1"]
    at_the_bound = gate.hold(g, Held("c/1", "c", b"xx", 0), limits)  # 8 + 2 = 10 bytes: still fits
    assert [h.key for h in at_the_bound.held][-1] == "c/1" and at_the_bound.dropped == 2
    g, ready = gate.take_ready(g)
    assert [h.agent for h in ready] == ["a", "b"]
    g = gate.hold(g, Held("c/1", "c", b"xxx", 0), limits)  # released bytes and slots are free again
    g = gate.hold(g, Held("a/3", "a", b"xx", 0), limits)
    assert [h.key for h in g.held] == ["a/2", "c/1", "a/3"] and g.dropped == 2


# ---- in the core ----------------------------------------------------------------------------------------
def test_second_update_from_an_agent_waits_for_the_next_step() -> None:
    s = Server(gated_rules())
    u1, u2, v1 = update("a", "u1", 0.1), update("a", "u2", 0.5), update("b", "v1", 0.3)
    s.receive("a", u1)
    assert s.receive("a", u2) == core.Effects()  # same step: held, not acknowledged, not journaled
    assert s.receive("a", u2) == core.Effects()  # the agent's re-send: still held once
    assert s.take_replies() == [("a", "u1", True, 0, None)]
    assert len(s.state.gate.held) == 1 and s.state.gate.dropped == 0 and s.state.version == 0
    fx = s.receive("b", v1)  # fills the buffer: step 1 = mean of u1 and v1
    assert fx.stepped and s.state.version == 1
    np.testing.assert_allclose(np.asarray(s.state.params["w"]), 0.2, rtol=1e-6)
    # u2 goes in first thing after the step; its record follows the step's, and only then is it acknowledged
    assert [(e.agent, e.payload) for e in fx.records] == [("b", v1), ("a", u2)]
    assert s.take_replies() == [("b", "v1", True, 1, None), ("a", "u2", True, 1, None)]
    assert s.state.gate.held == () and s.state.gate.in_step == {"a"} and s.state.counters.accepted == 3
    s.receive("b", update("b", "v2", 0.1, base=1))  # step 2 = mean of u2 and v2
    assert s.state.version == 2
    np.testing.assert_allclose(np.asarray(s.state.params["w"]), 0.2 + 0.3, rtol=1e-6)
    assert [e.agent for e in s.records] == ["a", "b", "a", "b"]


def test_a_held_update_is_judged_stale_as_of_its_arrival() -> None:
    s = Server(gated_rules(max_staleness=1))
    for uid in ("u1", "u2", "u3"):  # all on base 0; u2 and u3 wait one and two steps
        s.receive("a", update("a", uid, 0.1))
    s.receive("b", update("b", "v1", 0.1))  # step 1; then u2 goes in (staleness 1)
    s.receive("b", update("b", "v2", 0.1, base=1))  # step 2; then u3 goes in: staleness 2 > 1, but it
    assert s.state.version == 2  # arrived when it was fresh enough
    assert s.take_replies() == [("a", "u1", True, 0, None), ("b", "v1", True, 1, None), ("a", "u2", True, 1, None),
                                ("b", "v2", True, 2, None), ("a", "u3", True, 2, None)]
    assert dict(s.state.counters.staleness) == {0: 3, 1: 1, 2: 1}
    s.receive("c", update("c", "late", 0.1, base=0))  # a new arrival as stale is still refused
    assert s.take_replies() == [("c", "late", False, 2, "stale")]
    assert s.state.counters.rejected == {"stale": 1} and s.state.counters.accepted == 5


def test_the_gate_is_for_asynchronous_strategies() -> None:
    with pytest.raises(ConfigError, match="asynchronous"):
        core.rules(make("fedavg"), PARAMS, Limits(one_update_per_step=True))
    with pytest.raises(ConfigError, match="asynchronous"):  # the service builds its rules the same way
        Aggregator(MemoryBroker().connect, PARAMS, make("fedavg"),
                   AggregatorConfig(limits=Limits(one_update_per_step=True)))
    assert core.rules(make("fedasync"), PARAMS, Limits(one_update_per_step=True)).gated  # asked for, not by DP


def test_without_the_gate_both_updates_of_one_agent_share_a_step() -> None:
    r = core.rules(make("fedbuff", buffer_size=2, staleness_a=0.0), PARAMS)  # no central DP: no gate
    assert not r.gated
    s = Server(r)
    s.receive("a", update("a", "u1", 0.1))
    s.receive("a", update("a", "u2", 0.5))
    assert s.state.version == 1
    np.testing.assert_allclose(np.asarray(s.state.params["w"]), 0.3, rtol=1e-6)
    assert s.take_replies() == [("a", "u1", True, 0, None), ("a", "u2", True, 1, None)]


# ---- in the service -------------------------------------------------------------------------------------
@pytest.mark.parametrize("snapshot", [True, False], ids=["from-snapshot", "from-journal"])
async def test_the_current_step_survives_a_restart(tmp_path: Path, snapshot: bool) -> None:
    def service(state_dir: Path) -> Aggregator:
        return Aggregator(MemoryBroker().connect, PARAMS, dp_fedbuff(), AggregatorConfig(state_dir=state_dir))

    first = service(tmp_path / "state")
    first.recover()
    first.handle("a", update("a", "u1", 0.1))
    assert first.state.gate.in_step == {"a"} and first.state.counters.accepted == 1
    store = first.store
    assert isinstance(store, Durability)
    if snapshot:
        await store.snapshot(lambda: first.state)
    # a crash: the directory as it is on disk now (a copy: the live service keeps the directory's lock)
    second = service(Path(shutil.copytree(tmp_path / "state", tmp_path / "crashed")))
    assert second.recover() == (0 if snapshot else 1)  # all from the snapshot, or the record replayed
    assert second.state.gate.in_step == {"a"}
    second.handle("a", update("a", "u2", 0.2))
    assert second.metrics().held == 1 and second.version == 0 and second.state.counters.accepted == 1
    second.handle("b", update("b", "v1", 0.3))  # the step fills with b; then u2 goes in
    assert second.version == 1 and second.metrics().held == 0 and second.state.counters.accepted == 3


async def test_fewer_agents_than_k_still_make_progress_with_partial_steps() -> None:
    task = get_task("digits", num_clients=2, seed=0)
    broker = MemoryBroker()
    agg = Aggregator(broker.connect, task.trainer(0).initial, make("fedbuff", buffer_size=5, dp_clip=1.0,
                                                                     dp_noise=1.0), AggregatorConfig(timing=Timing(step_deadline=0.3)))
    async with agg:
        await agg.wait_connected()
        agents = [EdgeAgent(broker.connect, f"few-{i}", task.trainer(0), task.data_for(i)) for i in range(2)]
        for a in agents:
            await a.__aenter__()
        try:
            await agg.wait_version(3, timeout=30)  # K = 5 can never fill with 2 agents; partial steps do
        finally:
            for a in agents:
                await a.__aexit__(None, None, None)
        metrics, state = agg.metrics().model_dump(), agg.state
    assert metrics["dp_steps"] == metrics["version"] == state.version >= 3
    assert state.counters.accepted <= 2 * (state.version + 1)  # at most one update per agent in each step
    assert sum(a.acks["rejected"] for a in agents) == 0


# ---- over Mosquitto, with real agents of different speeds -------------------------------------------------
class HeldCounting(Aggregator):
    """Records the most updates ever held, after every update received (through the public ``handle``)."""

    most_held = 0

    def handle(self, agent: str, payload: bytes) -> None:
        super().handle(agent, payload)
        self.most_held = max(self.most_held, len(self.state.gate.held))


@pytest.mark.broker
async def test_central_dp_federation_over_mosquitto_keeps_one_update_per_agent_per_step(
        broker: BrokerConfig, federation: str) -> None:
    k, steps = 3, 8
    task = get_task("digits", num_clients=4, seed=0)
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    names = [f"dp-{i}" for i in range(4)]
    # no partial steps (step_deadline=None): every step takes exactly K updates
    agg = HeldCounting(connect, task.trainer(0).initial, make("fedbuff", buffer_size=k, dp_clip=1.0, dp_noise=1.0),
                       AggregatorConfig(topics=topics, timing=Timing(step_deadline=None)))
    acks = Inbox()  # every agent's acks, in the order the aggregator sent them
    async with agg, connect(ConnectOptions(f"{federation}-acks", on_message=acks)) as watcher:
        for name in names:
            await watcher.subscribe(topics.acks(name))
        await agg.wait_connected()
        agents = [EdgeAgent(connect, name, task.trainer(0), task.data_for(i),
                            AgentConfig(topics=topics, round_seconds=0.05 * 3**i)) for i, name in enumerate(names)]
        for a in agents:  # one round takes 0.05 s to 1.35 s: the fast ones send several times per step
            await a.__aenter__()
        try:
            await agg.wait_version(steps, timeout=60)
        finally:
            for a in agents:
                await a.__aexit__(None, None, None)
        accepted: list[tuple[str, int]] = []  # (agent, version in its ack), in application order
        async with asyncio.timeout(20):
            while len(accepted) < k * steps:
                msg = await acks.get()
                ack = Ack.model_validate_json(msg.payload)
                if ack.status == "accepted":
                    accepted.append((msg.topic.split("/")[-2], ack.version))
        inbox = Inbox()
        async with connect(ConnectOptions(f"{federation}-reader", on_message=inbox)) as reader:
            await reader.subscribe(topics.metrics)
            async with asyncio.timeout(10):  # the retained metrics, then each newer publish: at most 0.5 s apart
                while (metrics := json.loads((await inbox.get()).payload))["version"] < steps:
                    pass
    assert agg.most_held > 0  # fast agents did send twice within a step, and waited
    # An ack carries the version after its update was applied: step n (version n-1 -> n) is K updates in a
    # row whose acks say n-1, ..., n-1 and, for the one that closed it, n. This also checks that the acks
    # arrived in application order, so the grouping below is the real one.
    groups = [accepted[i : i + k] for i in range(0, k * steps, k)]
    assert [[v for _, v in g] for g in groups] == [[n] * (k - 1) + [n + 1] for n in range(steps)], groups
    assert all(len({a for a, _ in g}) == k for g in groups), groups  # K distinct agents in every step
    assert sum(a.acks["rejected"] for a in agents) == 0
    assert metrics["dp_steps"] == metrics["version"] >= steps and metrics["dp_delta"] == 1e-5
    # charged: the steps of the agent in most steps (a fast one), at noise 1.0 over sensitivity 2C
    most = max(sum(name in {a for a, _ in g} for g in groups) for name in names)
    assert metrics["dp_participations"] >= most  # at least the steps seen here (more may have closed since)
    assert metrics["dp_epsilon"] == pytest.approx(epsilon(0.5, metrics["dp_participations"]))

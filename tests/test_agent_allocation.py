"""Agents that follow a coordinator (protocol 1.1), on a real Mosquitto: two federations learn at once on one
broker, a live agent whose power source changes gets new local steps and uses them, an agent assigned to
another federation moves there, and an agent without capabilities configured behaves as a 1.0 agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from fedmqtt.agent import AgentConfig, AllocationConfig, EdgeAgent
from fedmqtt.agent_allocation import AgentAllocation, moved_config
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.allocation import PolicyConfig, make
from fedmqtt.capabilities import Power
from fedmqtt.coordinator import Coordinator, CoordinatorConfig
from fedmqtt.data import ArrayData
from fedmqtt.fleet import Fleet, FleetConfig, speed_factors
from fedmqtt.schemas import Status
from fedmqtt.strategies import fedasync
from fedmqtt.tasks import Task, digits_task
from fedmqtt.topics import CoordinatorTopics, Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Connector, Inbox, Message, Transport, mqtt_connector

FEDS = {"fed-a": "digits-a", "fed-b": "digits-b"}


def assignment(agent: str, sequence: int, **over: Any) -> bytes:
    body = {"schema": 1, "agent": agent, "federation": "fed-a", "task": "digits-a", "local_steps": 5,
            "participation": 1.0, "sequence": sequence, "issued_at": 1.0, "policy": "p"} | over
    return json.dumps(body).encode()


# ---- without a broker ---------------------------------------------------------------------------------------
def test_an_assignment_elsewhere_marks_the_agent_as_moving_and_its_next_config_goes_there() -> None:
    cfg = AgentConfig(topics=Topics("p", "fed-a"), local_steps=20,
                      allocation=AllocationConfig("digits-a", ("digits-b",), tags={"site": "x"}))
    alloc = AgentAllocation("e-1", cfg, examples=100, batch_size=32)
    assert alloc.topic == "p/coordinator/agents/e-1/assignment"
    assert alloc.offer(assignment("e-1", 1)) and alloc.reassigned is None  # same federation: new settings only
    assert alloc.settings.local_steps == 5
    assert not alloc.offer(assignment("e-1", 2, task="vision"))  # no data for it: refused, nothing changes
    assert alloc.offer(assignment("e-1", 3, federation="fed-b", task="digits-b"))
    assert alloc.reassigned is not None and alloc.reassigned.federation == "fed-b"
    moved = moved_config(cfg, alloc.reassigned)
    assert moved.topics == Topics("p", "fed-b") and moved.local_steps == 20
    assert moved.allocation is not None and moved.allocation.held == ("digits-b", "digits-a")
    assert moved.allocation.tags == {"site": "x"}


@pytest.mark.parametrize(("alloc", "says"), [({"task": "my task"}, "task 'my task'"),
                                             ({"task": "d", "tags": {"bad key": "v"}}, "tag key 'bad key'"),
                                             ({"task": "d", "tags": {"hw": "a\nb"}}, "printable")])
def test_allocation_settings_a_coordinator_would_refuse_are_refused_at_once(alloc: dict[str, Any],
                                                                            says: str) -> None:
    """Else the agent would stop at its first connect, when its status with capabilities fails the check."""
    from fedmqtt.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        AllocationConfig(**alloc)


def test_capabilities_are_checked_and_a_padded_round_counts_at_its_padded_length() -> None:
    task = digits_task(num_clients=2)
    cfg = AgentConfig(local_steps=10, round_seconds=2.0,
                      allocation=AllocationConfig("digits", tags={"hw": "sim"}, read_power=lambda: Power("battery", 50.0)))
    alloc = AgentAllocation("e-1", cfg, examples=5, batch_size=32)
    asyncio.run(alloc.probe(task.trainer(0), task.data_for(0), 10, cfg.round_seconds))
    caps = alloc.capabilities(loss=0.5)
    assert caps["compute"]["steps_per_s"] == pytest.approx(5.0)  # 10 steps in 2 s, whatever the host's speed
    assert caps["power"] == {"source": "battery", "battery_percent": 50.0} and caps["tags"] == {"hw": "sim"}
    assert caps["tasks"] == ["digits"] and caps["loss"] == 0.5 and caps["examples"] == 5
    alloc.round_done(10, 1.0, 32)  # an EWMA of real rounds follows
    assert 5.0 < alloc.capabilities(None)["compute"]["steps_per_s"] < 10.0


# ---- helpers for the broker tests ---------------------------------------------------------------------------
class Counting(ArrayData):
    """ArrayData that records how many steps each local round asks for."""

    def __init__(self, data: ArrayData) -> None:
        super().__init__(data.x, data.y, data.batch_size)
        self.steps: list[int] = []

    async def take(self, steps: int) -> dict[str, Any]:
        self.steps.append(steps)
        return await super().take(steps)


class Recording:
    """A connector whose transports record what they subscribe to."""

    def __init__(self, connect: Connector) -> None:
        self.connect = connect
        self.subscribed: list[str] = []

    def __call__(self, opts: ConnectOptions) -> Transport:
        t = self.connect(opts)
        original = t.subscribe

        async def subscribe(topic: str, qos: int = 1) -> None:
            self.subscribed.append(topic)
            await original(topic, qos)

        t.subscribe = subscribe  # type: ignore[method-assign]
        return t


def aggregator(connect: Connector, prefix: str, federation: str, task: Task) -> Aggregator:
    trainer = task.trainer(0)
    return Aggregator(connect, trainer.initial, fedasync(),
                      AggregatorConfig(topics=Topics(prefix, federation), client_id=f"agg-{prefix}-{federation}",
                                       eval_interval=0.2), evaluate=task.evaluate_fn(trainer))


@contextlib.asynccontextmanager
async def spy(broker: BrokerConfig, topic: str, name: str) -> AsyncIterator[list[Message]]:
    """Every message on ``topic`` while the block runs."""
    seen: list[Message] = []
    async with mqtt_connector(broker)(ConnectOptions(f"spy-{name}", on_message=seen.append)) as t:
        await t.subscribe(topic, qos=1)
        yield seen


async def until(what: str | Callable[[], str], done: Any, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        if loop.time() > deadline:
            raise TimeoutError(f"{what() if callable(what) else what} after {timeout}s")
        await asyncio.sleep(0.1)


async def tidy(broker: BrokerConfig, prefix: str, agents: Iterator[str] | list[str]) -> None:
    """Clear the retained assignments this test left on the shared broker."""
    topics = CoordinatorTopics(prefix)
    async with mqtt_connector(broker)(ConnectOptions(f"tidy-{prefix}")) as t:
        for a in agents:
            await t.publish(topics.assignment(a), b"", qos=1, retain=True)


def two_tasks() -> dict[str, Task]:
    return {"digits-a": digits_task(num_clients=3, seed=1), "digits-b": digits_task(num_clients=3, seed=2)}


# ---- on a real broker ---------------------------------------------------------------------------------------
@pytest.mark.broker
async def test_two_federations_learn_at_once_with_one_coordinator(broker: BrokerConfig, federation: str) -> None:
    prefix, connect, tasks = federation, mqtt_connector(broker), two_tasks()
    aggs = {f: aggregator(connect, prefix, f, tasks[t]) for f, t in FEDS.items()}
    start = {f: tasks[t].evaluate_fn(tasks[t].trainer(0))(tasks[t].trainer(0).initial)["accuracy"]
             for f, t in FEDS.items()}
    assert all(acc < 0.5 for acc in start.values())  # the threshold below is learnt, not where they began
    policy = CoordinatorConfig(PolicyConfig(FEDS, reference_steps=10), prefix=prefix, debounce=0.2,
                               client_id=f"coord-{prefix}")
    fleet_cfg = FleetConfig(agents=6, base_seconds=0.2, sigma=0.75, seed=4, federations=FEDS,
                            holdings=(("digits-a",), ("digits-b",)), tags=({"site": "a"}, {"site": "b"}),
                            agent=AgentConfig(topics=Topics(prefix, "fed-a"),
                                              allocation=AllocationConfig("digits-a", refresh=0.5)))
    own = {f"edge-{i}": "fed-a" if i % 2 == 0 else "fed-b" for i in range(6)}
    async with spy(broker, f"{prefix}/+/updates/+", prefix) as updates, aggs["fed-a"], aggs["fed-b"], \
            Coordinator(connect, make("speed-aware"), policy) as coord, Fleet(connect, tasks, fleet_cfg) as fleet:
        await until("both federations at 0.85", lambda: all(a.eval.get("accuracy", 0.0) >= 0.85
                                                            for a in aggs.values()), timeout=180)
        issued = {a: coord.assignment(a) for a in own}
        views = coord.book.views()
    for f, t in FEDS.items():  # each aggregator's own model, on its own task's test set
        final = tasks[t].evaluate_fn(tasks[t].trainer(0))(aggs[f].numpy_params())["accuracy"]
        assert final >= 0.8 > start[f]  # learnt (0.85 was reached; the updates applied since may dip it)
        # nothing refused but, at most, by the admission policy: in a federation of three devices of different
        # speeds the fastest can briefly hold three quarters of the recent updates (share_exceeded)
        assert aggs[f].state.counters.accepted > 0
        assert set(aggs[f].state.counters.rejected) <= {"share_exceeded"}, aggs[f].state.counters.rejected
    # Every agent was assigned to the federation of the task it holds, and sent only there.
    assert {a: x.plan.federation for a, x in issued.items() if x is not None} == own
    senders = {(m.topic.split("/")[1], m.topic.rsplit("/", 1)[1]) for m in updates}
    assert senders == {(f, a) for a, f in own.items()}
    assert fleet.moves == 0
    # A simulated device advertises its emulated speed: the slowest of fed-a is assigned fewer steps than its
    # fastest (speed-aware policy), and advertises fewer steps per second.
    factors = speed_factors(6, 0.75, 4)
    slow, fast = (f"edge-{i}" for i in (max((0, 2, 4), key=lambda i: factors[i]),
                                         min((0, 2, 4), key=lambda i: factors[i])))
    speed = {a: v.capabilities.compute.steps_per_s for a, v in views.items() if v.capabilities.compute}
    assert speed[slow] < speed[fast]
    assert issued[slow].plan.local_steps < issued[fast].plan.local_steps  # type: ignore[union-attr,operator]
    assert views["edge-1"].capabilities.tags == {"site": "b"}
    await tidy(broker, prefix, list(own))


@pytest.mark.broker
async def test_an_agent_that_goes_on_battery_gets_fewer_steps_and_uses_them(broker: BrokerConfig,
                                                                           federation: str) -> None:
    prefix, connect, task = federation, mqtt_connector(broker), digits_task(num_clients=2)
    agg = aggregator(connect, prefix, "fed", task)
    power = [Power("mains")]
    cfg = AgentConfig(topics=Topics(prefix, "fed"), local_steps=20, round_seconds=0.05,
                      allocation=AllocationConfig("digits", refresh=0.2, read_power=lambda: power[0]))
    data = Counting(task.data_for(0))
    coord_cfg = CoordinatorConfig(PolicyConfig({"fed": "digits"}, reference_steps=16), prefix=prefix,
                                  debounce=0.2, client_id=f"coord-{prefix}")

    async def next_rounds_use(steps: int) -> None:
        assert agent.alloc is not None
        await agent.wait_until(lambda: agent.alloc.settings.local_steps == steps, 60,  # type: ignore[union-attr]
                               lambda: f"assignment {agent.alloc.settings}")  # type: ignore[union-attr]
        n = len(data.steps)  # a round already under way may still use the old steps
        await until(f"3 more rounds after the assignment of {steps}", lambda: len(data.steps) >= n + 3, 60)
        assert data.steps[n + 1:] == [steps] * len(data.steps[n + 1:])

    async with agg, Coordinator(connect, make("speed-aware"), coord_cfg) as coord, \
            EdgeAgent(connect, "phone-1", task.trainer(0), data, cfg) as agent:
        await next_rounds_use(16)  # the reference E for the only device of its federation (its own is 20)
        first = coord.assignment("phone-1")
        power[0] = Power("battery", 80.0)  # unplugged: the agent says so, the coordinator halves its work
        await next_rounds_use(8)
        after = coord.assignment("phone-1")
        assert first is not None and after is not None and after.sequence > first.sequence
        assert coord.book.views()["phone-1"].capabilities.power.source == "battery"
        await agent.wait_updates(3, timeout=60)
        assert agent.acks["accepted"] >= 3 and agent.reassigned is None
    await tidy(broker, prefix, ["phone-1"])


@pytest.mark.broker
async def test_an_agent_assigned_to_another_federation_moves_there(broker: BrokerConfig, federation: str) -> None:
    prefix, connect, tasks = federation, mqtt_connector(broker), two_tasks()
    aggs = {f: aggregator(connect, prefix, f, tasks[t]) for f, t in FEDS.items()}
    coord_cfg = CoordinatorConfig(PolicyConfig(FEDS), prefix=prefix, debounce=0.2, client_id=f"coord-{prefix}")
    # edge-0 and edge-1 hold only digits-a; edge-2 holds both and starts in fed-a. The coordinator starts once
    # all three are online, so that its first plan sees them all and places edge-2 where there are fewer
    # agents: fed-b.
    fleet_cfg = FleetConfig(agents=3, base_seconds=0.05, sigma=0.0, federations=FEDS,
                            holdings=(("digits-a",), ("digits-a",), ("digits-a", "digits-b")),
                            agent=AgentConfig(topics=Topics(prefix, "fed-a"),
                                              allocation=AllocationConfig("digits-a", refresh=0.5, settle=5.0)))
    async with spy(broker, f"{prefix}/+/updates/+", prefix) as updates, aggs["fed-a"], aggs["fed-b"], \
            Fleet(connect, tasks, fleet_cfg) as fleet:
        await until("the agents online", lambda: all(a.connected.is_set() for a in fleet.agents), timeout=30)
        async with Coordinator(connect, make("uniform"), coord_cfg) as coord:
            await until(lambda: f"edge-2 working in fed-b ({coord.assignment('edge-2')}, {fleet.moves} moves)",
                        lambda: fleet.agents[2].topics.federation == "fed-b"
                        and fleet.agents[2].acks["accepted"] >= 3, timeout=90)
            assert [a.topics.federation for a in fleet.agents] == ["fed-a", "fed-a", "fed-b"]
            assert fleet.moves == 1
            assert coord.assignment("edge-2").plan.federation == "fed-b"  # type: ignore[union-attr]
            await until("fed-b's aggregator applies edge-2's updates", lambda: aggs["fed-b"].version >= 3, 30)
            # It left fed-a cleanly: its retained status there says offline; in fed-b, online.
            async with mqtt_connector(broker)(ConnectOptions(f"reader-{prefix}", on_message=(box := Inbox()))) as t:
                statuses = {}
                for f in FEDS:
                    await t.subscribe(Topics(prefix, f).status("edge-2"), qos=1)
                    msg = await box.get(timeout=30)
                    statuses[msg.topic.split("/")[1]] = Status.model_validate_json(msg.payload).state
            assert statuses == {"fed-a": "offline", "fed-b": "online"}
    senders = {(m.topic.split("/")[1], m.topic.rsplit("/", 1)[1]) for m in updates}
    assert ("fed-b", "edge-2") in senders
    assert {a for f, a in senders if f == "fed-b"} == {"edge-2"}  # the others never left fed-a
    await tidy(broker, prefix, ["edge-0", "edge-1", "edge-2"])


@pytest.mark.broker
async def test_an_agent_without_allocation_advertises_nothing_and_reads_no_assignment(broker: BrokerConfig,
                                                                                      federation: str) -> None:
    task = digits_task(num_clients=2)
    connect = Recording(mqtt_connector(broker))
    topics = Topics(federation=federation)
    agg = aggregator(mqtt_connector(broker), topics.prefix, federation, task)
    async with spy(broker, topics.status_wildcard, federation) as statuses, agg, \
            EdgeAgent(connect, "plain-1", task.trainer(0), task.data_for(0),
                      AgentConfig(topics=topics, round_seconds=0.05)) as agent:
        await agent.wait_updates(3, timeout=60)
        assert agent.alloc is None and agent.reassigned is None
    assert connect.subscribed and not any("coordinator" in t or "assignment" in t for t in connect.subscribed)
    bodies = [json.loads(m.payload) for m in statuses if m.payload]
    assert bodies and all(b.get("capabilities") is None for b in bodies)
    assert {b["state"] for b in bodies} >= {"online", "offline"}

"""Secure aggregation on a real Mosquitto: members and the aggregator's secure service speak the protocol
through the broker; the aggregator applies the unmasked mean, and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from fedmqtt import codec
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.privacy import CentralDP, epsilon
from fedmqtt.schemas import Ack
from fedmqtt.secagg import Cohort, Server
from fedmqtt.secagg import messages as m
from fedmqtt.secure import SecureAggregation, SecureConfig
from fedmqtt.secure_member import SecureMember
from fedmqtt.strategies import constant, fedbuff
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, Message, mqtt_connector

pytestmark = pytest.mark.broker
SHAPES = {"b": (7,), "w": (30, 10)}
DIM = 307


class Member(SecureMember):
    """A protocol-level member with known updates; ``vanish_at`` makes it go silent at that message type."""

    def __init__(self, agent: str, topics: Topics, vanish_at: str | None = None) -> None:
        self.payloads: dict[str, bytes] = {}
        super().__init__(agent, topics, self.payloads.get)
        self.vanish_at = vanish_at
        self.acks: list[Ack] = []
        self.ended: list[m.End] = []

    async def _handle(self, t, msg):  # type: ignore[no-untyped-def]
        if isinstance(msg, m.End):
            self.ended.append(msg)
        if msg.type == self.vanish_at:
            return
        await super()._handle(t, msg)


@contextlib.asynccontextmanager
async def members(broker: BrokerConfig, topics: Topics, ms: list[Member]) -> AsyncIterator[list]:  # type: ignore[type-arg]
    connect = mqtt_connector(broker)
    async with contextlib.AsyncExitStack() as stack:
        ts = []
        for mem in ms:
            def route(msg: Message, mem: Member = mem) -> None:
                if msg.topic == mem.topic:
                    mem.receive(msg.payload)
                else:
                    mem.acks.append(Ack.model_validate_json(msg.payload))
            t = await stack.enter_async_context(connect(ConnectOptions(f"{topics.federation}-{mem.agent_id}"[:60],
                                                                       on_message=route)))
            await t.subscribe(mem.topic, qos=1)
            await t.subscribe(topics.acks(mem.agent_id), qos=1)
            ts.append(t)
        tasks = [asyncio.create_task(mem.serve(lambda t=t: t)) for mem, t in zip(ms, ts, strict=True)]
        try:
            yield ts
        finally:
            for task in tasks:
                task.cancel()


async def until(what: str, done, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``done()`` (state outside any service) every 20 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        if loop.time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


def update(agent: str, uid: str, delta: np.ndarray) -> bytes:
    tensors = {"b": delta[:7], "w": delta[7:].reshape(30, 10)}
    return codec.encode_update(tensors, agent=agent, update_id=uid, base_version=0, num_samples=10,
                               model_fingerprint=codec.fingerprint(ZERO))


ZERO = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}


def flat(params: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(params[k]) for k in sorted(params)])


async def offer_all(ms: list[Member], ts: list, deltas: dict[str, np.ndarray]) -> None:  # type: ignore[type-arg]
    for mem, t in zip(ms, ts, strict=True):
        uid = f"u-{mem.agent_id}"
        mem.payloads[uid] = update(mem.agent_id, uid, deltas[mem.agent_id])
        await mem.offer(t, uid, mem.payloads[uid])


def secure_aggregator(broker: BrokerConfig, topics: Topics) -> Aggregator:
    return Aggregator(mqtt_connector(broker), ZERO, fedbuff(1, weighting=constant()),
                      AggregatorConfig(topics=topics, client_id=f"agg-{topics.federation}"))


@pytest.mark.parametrize("vanish", [0, 2])
async def test_the_aggregator_applies_the_plain_mean_within_the_quantisation_bound(
        broker: BrokerConfig, federation: str, vanish: int) -> None:
    """Six members; with ``vanish`` = 2 a third of them go silent after sending their masked inputs."""
    topics = Topics(federation=federation)
    ms = [Member(f"m{i}", topics, vanish_at="unmask" if i < vanish else None) for i in range(6)]
    rng = np.random.default_rng(1)
    deltas = {mem.agent_id: rng.normal(0, 0.2, DIM).astype(np.float32) for mem in ms}
    agg = secure_aggregator(broker, topics)
    cfg = SecureConfig(cohort_size=6, min_cohort=6, phase_timeout=2.0, client_id=f"sa-{federation}")
    wire = Inbox()  # what the broker carried from m0 to the aggregator
    async with agg, SecureAggregation(mqtt_connector(broker), agg, cfg) as sa, members(broker, topics, ms) as ts, \
            mqtt_connector(broker)(ConnectOptions(f"wire-{federation}"[:60], on_message=wire)) as spy:
        await spy.subscribe(f"{topics.base}/secagg/m0/masked", qos=1)
        await sa.wait_connected()
        await agg.wait_connected()
        await offer_all(ms, ts, deltas)
        await agg.wait_version(1, 30)
        await until("not every member got its end", lambda: all(mem.ended for mem in ms))
        await until("not every member was acked", lambda: all(mem.acks for mem in ms))
        # A member whose ack was lost offers the same update again: the same ack, not a second sum.
        await ms[-1].offer(ts[-1], "u-m5", ms[-1].payloads["u-m5"])
        await until("no second ack", lambda: len(ms[-1].acks) == 2)
        _, masked = m.decode_masked((await wire.get(timeout=5)).payload, DIM)
    # m0's masked input as it crossed the broker: its top 4 bits are uniform (chi-square, 15 degrees of
    # freedom, 99.99th percentile 44.3), while its encoding alone is below 2^16: top bits all zero
    counts = np.bincount((masked >> 28).astype(np.int64), minlength=16)
    assert float(((counts - DIM / 16) ** 2 / (DIM / 16)).sum()) < 44.3
    want = np.mean([np.clip(d, -1, 1) for d in deltas.values()], axis=0)  # all six inputs were sent
    got = flat(agg.numpy_params())
    assert np.abs(got - want).max() <= 2 / 65535  # each input off by < 1 step; the mean by < 1 step
    assert np.abs(got - want).max() > 0  # it went through the fixed-point field, not around it
    assert [mem.acks[0].status for mem in ms] == ["accepted"] * 6
    assert {mem.acks[0].version for mem in ms} == {1}
    assert sa.steps == 1 and sa.last_step["survivors"] == 6
    assert agg.state.counters.accepted == 1  # one update reached the aggregator: the mean
    assert ms[-1].acks[1] == ms[-1].acks[0] and sa.steps == 1


async def test_with_central_dp_the_unmasked_sum_gets_the_calibrated_noise_and_epsilon_is_counted(
        broker: BrokerConfig, federation: str) -> None:
    topics = Topics(federation=federation)
    ms = [Member(f"m{i}", topics) for i in range(4)]
    deltas = {mem.agent_id: np.full(DIM, 0.01, np.float32) for mem in ms}  # norm 0.175: under the clip
    agg = secure_aggregator(broker, topics)
    dp = CentralDP(clip=0.5, noise=2.0, seed=7)
    cfg = SecureConfig(cohort_size=4, min_cohort=4, phase_timeout=2.0, dp=dp, client_id=f"sa-{federation}")
    async with agg, SecureAggregation(mqtt_connector(broker), agg, cfg) as sa, members(broker, topics, ms) as ts:
        await sa.wait_connected()
        await offer_all(ms, ts, deltas)
        await agg.wait_version(1, 30)
    noise = flat(agg.numpy_params()) - 0.01  # the mean of four identical inputs, plus noise / 4
    assert abs(float(noise.std()) - dp.noise * dp.clip / 4) < 0.1 * dp.noise * dp.clip / 4
    assert abs(float(noise.mean())) < 4 * dp.noise * dp.clip / 4 / np.sqrt(DIM)
    report = sa.privacy()
    assert report["dp_steps"] == 1 and report["dp_epsilon"] == epsilon(1.0, 1, dp.delta)  # sensitivity 2C


async def test_an_update_with_nan_is_settled_on_the_device_not_offered(broker: BrokerConfig, federation: str) -> None:
    topics = Topics(federation=federation)
    refused: list[tuple[str, str]] = []
    mem = SecureMember("m0", topics, {}.get, settle=lambda ack: refused.append((ack.update_id, ack.reason)))
    offers = Inbox()
    async with mqtt_connector(broker)(ConnectOptions(f"nan-{federation}"[:60], on_message=offers)) as t:
        await t.subscribe(f"{topics.base}/secagg/+/ready", qos=1)
        bad = np.full(DIM, 0.1, np.float32)
        bad[3] = np.nan
        await mem.offer(t, "u-bad", update("m0", "u-bad", bad))
        await mem.offer(t, "u-good", update("m0", "u-good", np.full(DIM, 0.1, np.float32)))
        first = m.parse_from_agent((await offers.get(timeout=5)).payload)
    assert refused == [("u-bad", "non_finite")]
    assert first.update_id == "u-good" and offers.queue.qsize() == 0  # type: ignore[union-attr]


async def test_after_a_restart_an_update_already_summed_is_acked_again_not_summed_twice(
        broker: BrokerConfig, federation: str, tmp_path: Path) -> None:
    topics = Topics(federation=federation)
    ms = [Member(f"m{i}", topics) for i in range(3)]
    deltas = {mem.agent_id: np.full(DIM, 0.1 * (i + 1), np.float32) for i, mem in enumerate(ms)}
    cfg = SecureConfig(cohort_size=3, min_cohort=3, phase_timeout=2.0, client_id=f"sa-{federation}")

    def aggregator() -> Aggregator:
        return Aggregator(mqtt_connector(broker), ZERO, fedbuff(1, weighting=constant()),
                          AggregatorConfig(topics=topics, client_id=f"agg-{federation}", state_dir=tmp_path))

    async with members(broker, topics, ms) as ts:
        async with aggregator() as agg, SecureAggregation(mqtt_connector(broker), agg, cfg) as sa:
            await sa.wait_connected()
            await offer_all(ms, ts, deltas)
            await until("no acks", lambda: all(mem.acks for mem in ms))
        params = flat(agg.numpy_params())
        async with aggregator() as agg, SecureAggregation(mqtt_connector(broker), agg, cfg) as sa:
            await sa.wait_connected()
            assert agg.version == 1
            await offer_all(ms, ts, deltas)  # every ack was lost, say: the same updates offered again
            await until("no second acks", lambda: all(len(mem.acks) == 2 for mem in ms))
            assert sa.offers == {} and agg.version == 1 and agg.state.counters.accepted == 1  # as before
    assert all(mem.acks[1].status == "accepted" and mem.acks[1].update_id == mem.acks[0].update_id for mem in ms)
    np.testing.assert_array_equal(flat(agg.numpy_params()), params)


async def test_members_refuse_a_cohort_too_small_to_hide_them(broker: BrokerConfig, federation: str) -> None:
    """A cohort of two would let the aggregator subtract one member's update from the sum to get the other:
    members refuse cohorts below their own minimum (3), whatever the aggregator asks."""
    topics = Topics(federation=federation)
    ms = [Member(f"m{i}", topics) for i in range(2)]
    agg = secure_aggregator(broker, topics)
    cfg = SecureConfig(cohort_size=2, min_cohort=2, phase_timeout=1.0, client_id=f"sa-{federation}")
    async with agg, SecureAggregation(mqtt_connector(broker), agg, cfg) as sa, members(broker, topics, ms) as ts:
        await sa.wait_connected()
        await offer_all(ms, ts, {mem.agent_id: np.ones(DIM, np.float32) for mem in ms})
        await until("no refused cohort", lambda: sa.refused["too_few"] >= 2)
        await until("the step went on", lambda: sum(sa.aborted.values()) >= 1)
        await until("not offered again", lambda: len(sa.offers) == 2 or sum(sa.aborted.values()) >= 2)
    assert sa.steps == 0 and agg.version == 0 and all(mem.client is None for mem in ms)


async def test_below_the_threshold_nothing_is_applied_and_the_updates_are_offered_again(
        broker: BrokerConfig, federation: str) -> None:
    topics = Topics(federation=federation)
    ms = [Member(f"m{i}", topics, vanish_at="forward" if i < 3 else None) for i in range(5)]  # 2 of 5 mask
    deltas = {mem.agent_id: np.full(DIM, 0.1, np.float32) for mem in ms}
    agg = secure_aggregator(broker, topics)
    cfg = SecureConfig(cohort_size=5, min_cohort=5, phase_timeout=1.0, client_id=f"sa-{federation}")
    offers = Inbox()
    async with agg, SecureAggregation(mqtt_connector(broker), agg, cfg) as sa, \
            members(broker, topics, ms) as ts, \
            mqtt_connector(broker)(ConnectOptions(f"spy-{federation}"[:60], on_message=offers)) as spy:
        await sa.wait_connected()
        await spy.subscribe(f"{topics.base}/secagg/+/ready", qos=1)
        await offer_all(ms, ts, deltas)
        await sa.wait_until(lambda: sum(sa.aborted.values()) >= 1, 20, lambda: "the step was not abandoned")
        await until("the updates were not offered again", lambda: offers.queue.qsize() >= 10)
    assert sa.aborted["too_few"] >= 1 and sa.steps == 0  # every cohort of these members stops at masking
    assert agg.version == 0 and agg.state.counters.accepted == 0
    assert all(mem.acks == [] for mem in ms)
    assert all(mem.ended and mem.ended[0].type == "abort" for mem in ms)


async def test_members_refuse_an_aggregator_that_asks_for_both_kinds_of_shares(
        broker: BrokerConfig, federation: str) -> None:
    """The test plays a malicious aggregator: after the survivors' reveals it claims one survivor dropped,
    to get its mask key as well (which would unmask that survivor's input alone)."""
    topics = Topics(federation=federation)
    ms = [Member(f"m{i}", topics) for i in range(4)]
    names = tuple(mem.agent_id for mem in ms)
    cohort = Cohort("evil-1", 0, names, 3, None, 1.0, 16, DIM)
    server = Server(cohort)
    inbox = Inbox()
    connect = mqtt_connector(broker)
    async with members(broker, topics, ms) as ts, \
            connect(ConnectOptions(f"evil-{federation}"[:60], on_message=inbox)) as evil:
        await evil.subscribe(f"{topics.base}/secagg/+/+", qos=1)
        await offer_all(ms, ts, {n: np.zeros(DIM, np.float32) for n in names})

        async def send(msg: m.CohortMsg | m.Roster | m.Forward | m.Unmask, to: tuple[str, ...] = names) -> None:
            for a in to:
                await evil.publish(f"{topics.base}/agents/{a}/secagg", m.dump(msg), qos=1)

        async def collect(kind: str, n: int) -> dict[str, bytes]:
            got: dict[str, bytes] = {}
            while len(got) < n:
                msg = await inbox.get(timeout=10)
                agent, k = msg.topic.rsplit("/", 2)[1:]
                if k == kind:
                    got[agent] = msg.payload
            return got

        await collect("ready", 4)
        for a in names:
            await send(m.CohortMsg(step="evil-1", update_id=f"u-{a}", version=0, members=list(names), threshold=3,
                                   clip=1.0, bits=16, dim=DIM, weight=1.0), (a,))
        for a, p in (await collect("keys", 4)).items():
            k = m.parse_from_agent(p)
            server.add_keys(a, m.unb64(k.c_pk), m.unb64(k.s_pk))  # type: ignore[union-attr]
        roster = server.roster()
        await send(m.Roster(step="evil-1", keys={a: (m.b64(c), m.b64(s)) for a, (c, s) in roster.items()}))
        for a, p in (await collect("shares", 4)).items():
            server.add_shares(a, {v: m.unb64(b) for v, b in m.parse_from_agent(p).shares.items()})  # type: ignore[union-attr]
        for a, boxes in server.forward().items():
            await send(m.Forward(step="evil-1", shares={u: m.b64(b) for u, b in boxes.items()}), (a,))
        await collect("masked", 4)
        await send(m.Unmask(step="evil-1", survivors=list(names)))
        first = {a: m.parse_from_agent(p) for a, p in (await collect("reveal", 4)).items()}
        assert all(set(r.b) == set(names) and not r.s for r in first.values())  # type: ignore[union-attr]
        await send(m.Unmask(step="evil-1", survivors=[n for n in names if n != "m3"]), names[:3])
        refusals = {a: m.parse_from_agent(p) for a, p in (await collect("refuse", 3)).items()}
    assert {a: r.reason for a, r in refusals.items()} == dict.fromkeys(names[:3], "double_reveal")  # type: ignore[union-attr]
    assert all(mem.client is not None and mem.client.revealed.get("m3") == "b" for mem in ms[:3])


async def test_secure_agents_learn_digits_and_the_aggregator_sees_only_sums(
        broker: BrokerConfig, federation: str) -> None:
    task = get_task("digits", num_clients=4, seed=0)
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    initial = task.trainer(0).initial
    agg = Aggregator(connect, initial, fedbuff(1, weighting=constant()),
                     AggregatorConfig(topics=topics, client_id=f"agg-{federation}"))
    cfg = SecureConfig(cohort_size=4, min_cohort=4, phase_timeout=5.0, client_id=f"sa-{federation}")
    evaluate = task.evaluate_fn(task.trainer(0))
    start = evaluate(initial)["accuracy"]
    agents = [EdgeAgent(connect, f"s{i}", task.trainer(0), task.data_for(i, 0),
                        AgentConfig(topics=topics, local_steps=10, ack_timeout=60.0, secure=True))
              for i in range(4)]
    seen = Inbox()
    async with agg, SecureAggregation(connect, agg, cfg) as sa, \
            connect(ConnectOptions(f"seen-{federation}"[:60], on_message=seen)) as spy, contextlib.AsyncExitStack() as st:
        await spy.subscribe(topics.updates_wildcard, qos=1)
        for a in agents:
            await st.enter_async_context(a)
        await agg.wait_version(8, 120)
    assert evaluate(agg.numpy_params())["accuracy"] >= start + 0.3
    assert seen.queue.qsize() == 0  # no plain update was ever published
    assert sa.steps >= 8 and agg.state.counters.accepted == sa.steps
    assert sum(a.acks["accepted"] for a in agents) >= 4 * 7  # members acked as their step is applied

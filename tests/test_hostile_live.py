"""Thirteen thousand hostile payloads through a real Mosquitto to a live aggregator and the secure-aggregation
service beside it, on every topic they read: updates in every form (tests/hostile_updates.py), update topics
that are not an agent's, retained updates, agents' statuses, the model topic and the secure-aggregation
topics (tests/hostile_messages.py). Every payload is refused for its own reason (told to its sender where the
protocol has an answer, counted where it has none), nothing crashes, and the model moves with the good
updates only."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import hostile_messages as hm
import hostile_updates as hu
from fedmqtt import codec, core
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.core import Limits
from fedmqtt.schemas import Ack
from fedmqtt.secure import SecureAggregation
from fedmqtt.strategies import fedasync
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, Transport, mqtt_connector

WARM_UP, REPLAYS, BAD_TOPICS, RETAINED, STATUSES, MODELS, SECAGG = 10, 500, 250, 100, 1000, 300, 1000
LIMITS = Limits(max_staleness=hu.MAX_STALENESS, max_update_norm=hu.MAX_NORM, max_payload=hu.MAX_PAYLOAD)


def good(i: int) -> bytes:
    """The i-th good update (from ``good``, on base i: the aggregator is at version i when it arrives)."""
    return hu.update(hu.FORMS[i % len(hu.FORMS)], agent="good", uid=f"g{i}", base=i)


def retained_updates() -> list[bytes]:
    """Left on update topics before the aggregator starts: updates that would be accepted, were they taken
    for updates (a retained copy comes back at every reconnect), and a hostile one of each form."""
    out = [hu.update(form, agent=f"r-{i}", uid=f"r{i}", base=0) for i, form in enumerate(hu.FORMS * 18)]
    out += [hu.non_finite(form, i, 0)[1] for i, form in enumerate(hu.FORMS * 2)]
    return out


class Evil:
    """The attacker's connection, counting the acks of every agent (by topic agent and reason)."""

    def __init__(self, t: Transport, inbox: Inbox, topics: Topics) -> None:
        self.t, self.inbox, self.topics = t, inbox, topics
        self.acks: Counter[tuple[str, str]] = Counter()
        self.expected = 0
        self.got = asyncio.Event()

    async def read(self) -> None:
        async for msg in self.inbox:
            ack = Ack.model_validate_json(msg.payload)
            self.acks[msg.topic.split("/")[-2], ack.reason or ack.status] += 1
            if self.acks.total() >= self.expected:
                self.got.set()

    async def send(self, items: list[tuple[str, bytes, bool]]) -> None:
        """Publish (topic, payload, whether an ack is owed) in batches of 500, each waited for until its acks
        have come (so that nothing is dropped for lack of room in the aggregator's queues)."""
        for start in range(0, len(items), 500):
            batch = items[start : start + 500]
            self.expected += sum(acked for _, _, acked in batch)
            self.got.clear()
            await asyncio.gather(*(self.t.publish(topic, payload, qos=1) for topic, payload, _ in batch))
            if self.acks.total() < self.expected:
                await asyncio.wait_for(self.got.wait(), 60)


@pytest.mark.broker
@pytest.mark.slow
async def test_thirteen_thousand_hostile_payloads(broker: BrokerConfig, federation: str, tmp_path: Path) -> None:
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    async with connect(ConnectOptions(f"planter-{federation}"[:60])) as planter:  # before the aggregator runs
        await asyncio.gather(*(planter.publish(topics.update(f"r-{i}"), payload, qos=1, retain=True)
                               for i, payload in enumerate(retained_updates())))
    cfg = AggregatorConfig(topics=topics, limits=LIMITS, max_queued=4096, state_dir=tmp_path / "state",
                           client_id=f"agg-{federation}")
    agg = Aggregator(connect, hu.PARAMS, fedasync(0.5), cfg)
    inbox = Inbox()
    async with agg, SecureAggregation(connect, agg) as sa, \
            connect(ConnectOptions(f"evil-{federation}"[:60], on_message=inbox)) as t:
        await agg.wait_connected()
        await sa.wait_connected()
        await t.subscribe(f"{topics.base}/agents/+/acks")
        evil = Evil(t, inbox, topics)
        reader = asyncio.create_task(evil.read())
        await agg.wait_until(lambda: agg.retained_cleared == RETAINED, 30, lambda: f"{agg.retained_cleared} cleared")

        # Good updates in every form, so that there is something to replay, and bases that are stale.
        await evil.send([(topics.update("good"), good(i), True) for i in range(WARM_UP)])
        assert agg.version == WARM_UP
        updates = hu.corpus(WARM_UP)
        # replays: g5..g9 are within the de-duplication window, g0..g4 left it with their bases (stale)
        replayed = [i % 2 * 5 + i // 2 % 5 for i in range(REPLAYS)]
        updates += [hu.Hostile("duplicate" if g >= 5 else "stale", hu.FORMS[g % 5], "good", good(g)) for g in replayed]
        random.Random(0).shuffle(updates)
        assert len({h.payload for h in updates}) > 0.9 * len(updates)
        await evil.send([(topics.update(h.agent), h.payload, True) for h in updates])
        for agent, payload in hm.bad_topic_updates(BAD_TOPICS, WARM_UP):  # no ack topic exists for these
            await t.publish(f"{topics.base}/updates/{agent}", payload, qos=1)
        await agg.wait_until(lambda: agg.state.counters.rejected.get("bad_topic") == BAD_TOPICS, 30,
                             lambda: f"bad_topic {agg.state.counters.rejected.get('bad_topic')}")

        # Statuses: none of them may change who is online.
        online, offline = [f"s-on-{i}" for i in range(10)], [f"s-off-{i}" for i in range(10)]
        for agent in online:
            await t.publish(topics.status(agent), b'{"schema": 1, "agent": "%s", "state": "online"}' % agent.encode())
        await agg.wait_until(lambda: agg.online == set(online), 10, lambda: f"online: {agg.online}")
        statuses = hm.statuses(STATUSES, online, offline)
        await asyncio.gather(*(t.publish(topics.status(s.agent), s.payload, qos=1) for s in statuses))
        await agg.wait_until(lambda: agg.metrics().statuses_refused == STATUSES, 30,
                             lambda: f"{agg.metrics().statuses_refused} statuses refused")
        assert agg.online == set(online)

        # The model topic: every foreign model is replaced by the aggregator's own.
        version, epoch, own = agg.committed_version, agg.committed.epoch, agg.model_payload()
        for payload in hm.foreign_models(MODELS, own, version, epoch):
            await t.publish(topics.model, payload, qos=1, retain=True)
        await agg.wait_until(lambda: agg.models_restored == MODELS, 30, lambda: f"{agg.models_restored} restored")
        await agg.wait_version(version, 10)
        probe = Inbox()
        async with connect(ConnectOptions(f"probe-{federation}"[:60], on_message=probe)) as p:
            await p.subscribe(topics.model)
            kept = codec.decode((await probe.get(timeout=10)).payload)
        mine = codec.decode(own)
        assert kept.metadata == mine.metadata, "the retained model is the aggregator's"
        for name, value in mine.tensors.items():
            np.testing.assert_array_equal(kept.tensors[name], value)
        assert (agg.committed_version, agg.committed.epoch) == (version, epoch)

        # Secure aggregation: broken or out-of-phase messages are ignored and counted; stale offers answered.
        secagg = hm.secagg_messages(SECAGG, hu.N, agg.version, hu.MAX_STALENESS)
        stale = sum(s.reason == "stale" for s in secagg)
        await evil.send([(f"{topics.base}/secagg/{s.agent}/{s.kind}", s.payload, s.reason == "stale")
                         for s in secagg])
        ignored = Counter(s.reason for s in secagg if s.reason != "stale")
        await sa.wait_until(lambda: sa.ignored == ignored, 30, lambda: f"ignored {dict(sa.ignored)}")
        assert not sa.offers and sa.steps == 0

        # The aggregator still applies a good update.
        await evil.send([(topics.update("good"), good(WARM_UP), True)])
        reader.cancel()
        m = agg.metrics()
        model = agg.numpy_params()

    n_updates = len(updates) + BAD_TOPICS
    total = n_updates + RETAINED + STATUSES + MODELS + SECAGG
    want = Counter(h.reason for h in updates) + Counter({"bad_topic": BAD_TOPICS})
    assert (m.accepted, m.version) == (WARM_UP + 1, WARM_UP + 1)
    assert m.rejected_by_reason == dict(want), "every update refused, each for its own reason"
    senders = Counter((h.agent, h.reason) for h in updates) + Counter({("good", "accepted"): WARM_UP + 1})
    senders += Counter((s.agent, "stale") for s in secagg if s.reason == "stale")
    assert evil.acks == senders, "each sender was told its reason"
    assert (m.retained_cleared, m.models_restored, m.statuses_refused) == (RETAINED, MODELS, STATUSES)
    assert all(len({h.form for h in updates if h.reason == r}) == 5 for r in hu.MAKERS), "every reason, every form"
    # the model is what the good updates alone make of it
    r = core.rules(fedasync(0.5), hu.PARAMS, LIMITS)
    state = core.init(r, hu.PARAMS, epoch="e", version=0)
    for i in range(WARM_UP + 1):
        state, _ = core.receive(state, "good", good(i), r)
    for name, value in model.items():
        np.testing.assert_array_equal(value, np.asarray(state.params[name]))
    assert all(np.isfinite(v).all() for v in model.values())
    inbox = Inbox()  # the retained updates are gone
    async with connect(ConnectOptions(f"probe2-{federation}"[:60], on_message=inbox)) as p:
        await p.subscribe(topics.updates_wildcard)
        await p.publish(topics.update("zz-marker"), b"", qos=1)
        assert (await inbox.get(timeout=10)).topic == topics.update("zz-marker")
    print(f"\nhostile payloads: {total} sent, 0 crashes; updates {n_updates} ({dict(want)}), retained {RETAINED}, "
          f"statuses {STATUSES}, models {MODELS}, secure aggregation {SECAGG} ({dict(ignored)}, stale {stale})")

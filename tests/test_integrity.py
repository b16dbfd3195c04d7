"""A device with valid credentials, or an operator's restore, must not freeze or steer the federation:
the model topic heals, and versions recover. Against a real Mosquitto, with the services."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from fedmqtt import codec
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.core import Timing
from fedmqtt.schemas import Ack
from fedmqtt.strategies import fedasync, fedavg
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, mqtt_connector

pytestmark = pytest.mark.broker

TASK = get_task("digits", num_clients=2, seed=0)


def forged(agg: Aggregator, version: int, epoch: str, nan: bool = False) -> bytes:
    """The aggregator's own model, re-labelled: another version, epoch or values."""
    decoded = codec.decode(agg.model_payload())
    tensors = {k: (np.full_like(v, np.nan) if nan else v) for k, v in decoded.tensors.items()}
    return codec.encode_model(tensors, version, extra={"fedmqtt.epoch": epoch})


@contextlib.asynccontextmanager
async def fleet(connect, topics: Topics, accepted: list[Ack], refused: list[Ack] | None = None,  # type: ignore[no-untyped-def]
                model_key: str | None = None, prefix: str = "i-", push_one: bool = False):
    """Two honest agents; accepted acks go to ``accepted``, refusals to ``refused`` (a ``duplicate`` answers a
    re-send of an update already applied: neither). With ``push_one`` the second stays subscribed to the
    model (push delivery), so that it sees every model published, forged ones included."""
    def on_ack(ack: Ack) -> None:
        if ack.status == "accepted":
            accepted.append(ack)
        elif ack.reason != "duplicate" and refused is not None:
            refused.append(ack)

    agents = [EdgeAgent(connect, f"{prefix}{i}", TASK.trainer(0), TASK.data_for(i, 0),
                        AgentConfig(topics=topics, local_steps=5, round_seconds=0.05, ack_timeout=2.0,
                                    backoff_max=0.5, model_key=model_key,
                                    model_delivery="push" if push_one and i == 1 else "pull"), on_ack=on_ack)
              for i in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        for a in agents:
            await stack.enter_async_context(a)
        yield agents


async def learning_goes_on(agg: Aggregator, accepted: list[Ack], more: int = 10, within: float = 30.0) -> None:
    count = len(accepted)
    await agg.wait_until(lambda: len(accepted) >= count + more, within,
                         lambda: f"only {len(accepted) - count} accepted updates since")


@pytest.mark.parametrize("kind", ["same-epoch-far-future", "nan-weights-other-epoch"])
async def test_a_forged_retained_model_is_replaced_and_learning_goes_on(broker: BrokerConfig, federation: str,
                                                                         kind: str) -> None:
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    accepted: list[Ack] = []
    agg = Aggregator(connect, TASK.trainer(0).initial, fedasync(),
                     AggregatorConfig(topics=topics, client_id=f"agg-{federation}"))
    async with agg, fleet(connect, topics, accepted):
        await learning_goes_on(agg, accepted)
        epoch = agg.committed.epoch
        payload = (forged(agg, agg.version + 1000, epoch) if kind == "same-epoch-far-future"
                   else forged(agg, 10**17, "forged", nan=True))
        async with connect(ConnectOptions(f"forger-{federation}"[:60])) as forger:
            await forger.publish(topics.model, payload, qos=1, retain=True)
        await learning_goes_on(agg, accepted)  # within 30 s of the forgery
        assert agg.metrics().models_restored >= 1
        retained = Inbox()  # what a device that connects now receives: the aggregator's model again
        async with connect(ConnectOptions(f"reader-{federation}"[:60], on_message=retained)) as reader:
            await reader.subscribe(topics.model)
            info = codec.decode((await retained.get(timeout=10)).payload).metadata
        assert info["fedmqtt.epoch"] == agg.committed.epoch
        assert int(info["fedmqtt.version"]) <= agg.committed_version < 10**6
        if kind == "same-epoch-far-future":
            assert agg.committed.epoch != epoch  # versions of the old epoch can no longer be trusted
        else:
            assert agg.committed.epoch == epoch
    assert all(np.isfinite(v).all() for v in agg.numpy_params().values())


async def test_an_aggregator_restored_from_an_older_backup_starts_a_new_epoch(
        broker: BrokerConfig, federation: str, tmp_path: Path) -> None:
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    state, backup = tmp_path / "state", tmp_path / "backup"
    cfg = AggregatorConfig(topics=topics, client_id=f"agg-{federation}", state_dir=state)
    accepted: list[Ack] = []
    initial = TASK.trainer(0).initial
    async with fleet(connect, topics, accepted) as agents:
        async with Aggregator(connect, initial, fedasync(), cfg) as agg:
            await learning_goes_on(agg, accepted)
        shutil.copytree(state, backup)  # the operator's backup, at this version
        backed_up, epoch = agg.version, agg.committed.epoch
        async with Aggregator(connect, initial, fedasync(), cfg) as agg:
            await learning_goes_on(agg, accepted, more=20)
            assert agg.committed_version > backed_up
        shutil.rmtree(state)
        shutil.copytree(backup, state)  # ... restored later
        async with Aggregator(connect, initial, fedasync(), cfg) as agg:
            assert agg.version == backed_up
            await learning_goes_on(agg, accepted)  # within 30 s of the restore
            assert agg.committed.epoch != epoch
            assert any(e == agg.committed.epoch for a in agents for e, _ in a.trained_versions)  # they followed


async def test_one_device_has_one_vote_per_sync_round(broker: BrokerConfig, federation: str) -> None:
    """Two updates with different ids from one device cannot fill a synchronous round between them."""
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    params = {"w": np.zeros(4, np.float32)}
    agg = Aggregator(connect, params, fedavg(), AggregatorConfig(topics=topics, client_id=f"agg-{federation}",
                                                                 timing=Timing(round_size=2)))

    def update(agent: str, uid: str, value: float) -> bytes:
        return codec.encode_update({"w": np.full(4, value, np.float32)}, agent=agent, update_id=uid,
                                   base_version=0, num_samples=10)

    acks = Inbox()
    async with agg, connect(ConnectOptions(f"voters-{federation}"[:60], on_message=acks)) as t:
        await agg.wait_connected()
        await t.subscribe(f"{topics.base}/agents/+/acks")
        await t.publish(topics.update("liar"), update("liar", "v1", 1.0))
        await t.publish(topics.update("liar"), update("liar", "v2", 1.0))
        got = [Ack.model_validate_json((await acks.get(timeout=10)).payload) for _ in range(2)]
        assert [(a.update_id, a.status, a.reason) for a in got] == [("v1", "accepted", None),
                                                                    ("v2", "rejected", "one_per_round")]
        assert agg.version == 0  # the round of 2 is not full
        await t.publish(topics.update("honest"), update("honest", "h1", 3.0))
        await agg.wait_version(1, 10)
    np.testing.assert_allclose(agg.numpy_params()["w"], 2.0)  # (1 + 3) / 2: one vote each


async def test_a_flooding_device_cannot_push_the_version_alone(broker: BrokerConfig, federation: str) -> None:
    """Valid zero-change updates as fast as the link allows, from one device with valid credentials: its
    rate is bounded (``rate_limited``; its share of the recent updates is bounded too, tested on the core
    below), and the honest devices' updates keep being accepted."""
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    accepted: list[Ack] = []
    refused: list[Ack] = []
    agg = Aggregator(connect, TASK.trainer(0).initial, fedasync(),
                     AggregatorConfig(topics=topics, client_id=f"agg-{federation}"))
    zero = {k: np.zeros_like(v) for k, v in TASK.trainer(0).initial.items()}
    fp = codec.fingerprint(zero)
    flood_acks = Inbox()
    async with agg, fleet(connect, topics, accepted, refused), connect(
            ConnectOptions(f"flood-{federation}"[:60], on_message=flood_acks)) as flood:
        await learning_goes_on(agg, accepted, more=4)
        await flood.subscribe(topics.acks("flooder"))
        before = len(accepted)
        started = time.monotonic()
        for start in range(0, 1000, 100):  # as fast as the link allows: 100 in flight at a time
            payloads = [codec.encode_update(zero, agent="flooder", update_id=f"f{i}", base_version=agg.version,
                                            num_samples=1, model_fingerprint=fp) for i in range(start, start + 100)]
            await asyncio.gather(*(flood.publish(topics.update("flooder"), p, qos=1) for p in payloads))
        flood_reasons = [Ack.model_validate_json((await flood_acks.get(timeout=30)).payload).reason
                         for _ in range(1000)]
        seconds = time.monotonic() - started
        await learning_goes_on(agg, accepted, more=4)
    c = agg.state.counters.rejected
    for reason in ("rate_limited", "share_exceeded"):
        assert c.get(reason, 0) == flood_reasons.count(reason)
    assert flood_reasons.count(None) + c.get("rate_limited", 0) + c.get("share_exceeded", 0) == 1000
    assert flood_reasons.count(None) <= 50 + 50 * seconds  # the burst, then 50 a second ...
    assert flood_reasons.count(None) <= 3 * len(accepted) + 32  # ... and at most 3/4 of the versions
    assert len(accepted) > before  # the honest devices went on being accepted ...
    assert refused == []  # ... and were never refused, not even as stale: the flood cannot age them


def test_one_device_holds_at_most_ten_times_its_fair_share_of_recent_updates() -> None:
    from fedmqtt import core

    params = {"w": np.zeros(2, np.float32)}
    r = core.rules(fedasync(), params, core.Limits(max_staleness=10**6))
    state = core.init(r, params, "e")
    n = 0

    def send(agent: str) -> str | None:
        nonlocal state, n
        n += 1
        payload = codec.encode_update({"w": np.zeros(2, np.float32)}, agent=agent, update_id=f"u{n}",
                                      base_version=state.version, num_samples=1)
        state, fx = core.receive(state, agent, payload, r)  # no clock: the rate is not checked
        return fx.replies[0].reason

    honest = [send(f"d{i % 30}") for i in range(300)]  # 30 devices take turns: the window is warm
    flood = [send("flooder") for _ in range(200)]
    assert honest == [None] * 300  # 10 each in a window of 200 from 30 devices: far from the bound
    bound = 10 * 200 / 30  # at most 10x its fair share of the window
    assert bound / 2 <= flood.count(None) <= bound + 1  # about a third of the window, never more
    assert set(flood) == {None, "share_exceeded"}
    assert [send(f"d{i}") for i in range(30)] == [None] * 30  # everyone else still gets in


def test_in_a_small_fleet_one_device_holds_at_most_three_quarters_of_the_versions() -> None:
    """With three devices the fair-share bound allows everything; the majority bound keeps a flooder to 3/4
    of the recent versions, so the honest devices' updates do not age past ``max_staleness``."""
    from fedmqtt import core

    params = {"w": np.zeros(2, np.float32)}
    r = core.rules(fedasync(), params, core.Limits())  # the default max_staleness, 64
    state = core.init(r, params, "e")
    n = 0

    def send(agent: str, base: int) -> tuple[bool, str | None]:
        nonlocal state, n
        n += 1
        payload = codec.encode_update({"w": np.zeros(2, np.float32)}, agent=agent, update_id=f"u{n}",
                                      base_version=base, num_samples=1)
        state, fx = core.receive(state, agent, payload, r)
        return fx.replies[0].accepted, fx.replies[0].reason

    flood: list[str | None] = []
    honest = []
    for _ in range(50):  # each honest round, the flooder sends 40 updates
        bases = {d: state.version for d in ("h0", "h1")}
        flood += [send("flooder", state.version)[1] for _ in range(40)]
        honest += [send(d, bases[d]) for d in ("h0", "h1")]
    assert honest == [(True, None)] * 100  # never stale, though 40 flooder updates arrived each round
    accepted = flood.count(None)
    assert 0.7 * 300 <= accepted <= 300 + 32  # three per honest pair of updates: 3/4 of the versions
    assert set(flood) == {None, "share_exceeded"}


async def test_a_liars_sample_count_weighs_no_more_than_twice_the_typical_device(
        broker: BrokerConfig, federation: str) -> None:
    """Sync FedAvg weighs updates by their claimed sample counts, which cannot be checked: a claim is capped
    at twice the median of recent claims, so 10^17 samples buy a liar the weight of a device with twice the
    typical data, not the round."""
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    params = {"w": np.zeros(4, np.float32)}
    agg = Aggregator(connect, params, fedavg(), AggregatorConfig(topics=topics, client_id=f"agg-{federation}",
                                                                 timing=Timing(round_size=3)))

    def update(agent: str, uid: str, value: float, samples: int, base: int) -> bytes:
        return codec.encode_update({"w": np.full(4, value, np.float32)}, agent=agent, update_id=uid,
                                   base_version=base, num_samples=samples)

    async with agg, connect(ConnectOptions(f"voters-{federation}"[:60])) as t:
        await agg.wait_connected()
        for version in range(3):  # honest rounds: 9 claims of 10 samples, all at value 0
            for agent in ("h1", "h2", "h3"):
                await t.publish(topics.update(agent), update(agent, f"{agent}-{version}", 0.0, 10, version))
            await agg.wait_version(version + 1, 10)
        await t.publish(topics.update("h1"), update("h1", "h1-3", 0.0, 10, 3))
        await t.publish(topics.update("h2"), update("h2", "h2-3", 0.0, 10, 3))
        await t.publish(topics.update("liar"), update("liar", "lie", 10.0, 10**17, 3))
        await agg.wait_version(4, 10)
    # capped at 2 x 10 samples: 20 x 10 / (10 + 10 + 20) = 5; uncapped it would be 10 (the whole round)
    np.testing.assert_allclose(agg.numpy_params()["w"], 5.0, rtol=1e-6)


async def test_agents_holding_the_key_adopt_only_signed_models(broker: BrokerConfig, federation: str,
                                                               tmp_path: Path) -> None:
    from fedmqtt import signing

    pem, public = signing.new_key()
    (tmp_path / "model.key").write_bytes(pem)
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    accepted: list[Ack] = []
    agg = Aggregator(connect, TASK.trainer(0).initial, fedasync(),
                     AggregatorConfig(topics=topics, client_id=f"agg-{federation}",
                                      signing_key=tmp_path / "model.key"))
    async with agg, fleet(connect, topics, accepted, model_key=public, prefix="s-", push_one=True) as agents:
        await learning_goes_on(agg, accepted)
        async with connect(ConnectOptions(f"forger-{federation}"[:60])) as forger:  # a plausible model, unsigned
            await forger.publish(topics.model, forged(agg, 10**6, "forged"), qos=1, retain=True)
        await learning_goes_on(agg, accepted)
    assert all(epoch != "forged" for a in agents for epoch, _ in a.trained_versions)  # never trained on it
    # the subscribed agent received it and said why (a pulling agent sees it only if it pulls in the moment
    # before the aggregator replaces it)
    assert agents[1].error is not None and "not signed" in agents[1].error


async def test_a_ghosts_retained_online_status_does_not_hold_sync_rounds(broker: BrokerConfig,
                                                                          federation: str) -> None:
    """A retained "online" status for a device that never trains counts toward a round only while it could
    still be starting (two round deadlines); after that, rounds close on the devices that train."""
    from fedmqtt.schemas import Status, dump

    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    accepted: list[Ack] = []
    async with connect(ConnectOptions(f"ghost-{federation}"[:60])) as ghost:
        await ghost.publish(topics.status("ghost"), dump(Status(agent="ghost", state="online")), retain=True)
    agg = Aggregator(connect, TASK.trainer(0).initial, fedavg(),
                     AggregatorConfig(topics=topics, client_id=f"agg-{federation}",
                                      timing=Timing(round_deadline=1.0)))  # the ghost counts for 2 s
    async with agg, fleet(connect, topics, accepted):
        await agg.wait_until(lambda: len(agg.online) == 3, 10, lambda: f"online: {agg.online}")
        await agg.wait_until(lambda: agg.round_members() == 2, 10, lambda: "the ghost still counts")
        assert len(agg.online) == 3  # its status still says online
        version = agg.version
        await agg.wait_version(version + 5, 30)  # rounds of the two that train


async def test_a_second_aggregator_for_a_federation_is_refused(broker: BrokerConfig, federation: str,
                                                                tmp_path: Path) -> None:
    """Two aggregators on one federation would take each other's session in turn; the second one to start
    sees the first's retained presence and refuses, before its client id can take anything."""
    from fedmqtt.errors import StateError

    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    params = TASK.trainer(0).initial

    def aggregator(name: str) -> Aggregator:
        return Aggregator(connect, params, fedasync(), AggregatorConfig(
            topics=topics, client_id=f"agg-{federation}", state_dir=tmp_path / name))

    first = aggregator("first")
    async with first:
        await first.wait_connected()
        with pytest.raises(StateError, match="another aggregator"):
            async with aggregator("second"):
                pass
        await asyncio.sleep(0.5)
        assert (first.connects, first.connected.is_set()) == (1, True)  # never disconnected
    async with aggregator("second") as second:  # the first said goodbye: the federation is free
        await second.wait_connected()
    async with aggregator("first") as again:  # a restart of the same state is the same aggregator
        await again.wait_connected()

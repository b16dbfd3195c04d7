"""Two tiers on three real brokers: a root Mosquitto with the aggregator, two site Mosquittos bridged to it
(fedmqtt.bridge), a site aggregator and devices on each site broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from fedmqtt import codec
from fedmqtt.admission import AdmissionLimits
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.bridge import bridged_brokers
from fedmqtt.broker import MosquittoProcess, has_mosquitto
from fedmqtt.core import Limits
from fedmqtt.schemas import Ack
from fedmqtt.site import Site, SiteConfig
from fedmqtt.strategies import fedasync, polynomial
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, mqtt_connector

pytestmark = pytest.mark.broker
TASK = get_task("digits", num_clients=6, seed=0)


@contextlib.asynccontextmanager
async def brokers(topics: Topics, sites: tuple[str, ...]) -> AsyncIterator[tuple[MosquittoProcess, dict]]:  # type: ignore[type-arg]
    """The root broker and one bridged broker per site."""
    if not has_mosquitto():
        pytest.skip("no mosquitto binary")
    async with bridged_brokers(topics, sites) as brokers:
        yield brokers


def root_limits(sites: tuple[str, ...]) -> Limits:
    """The root's limits with its sites exempt from the per-device share bound (a site may rightly hold most
    of the root's updates; without this, the faster of two sites is refused as share_exceeded)."""
    return Limits(admission=AdmissionLimits(exempt=frozenset(sites)))


async def test_two_sites_learn_through_their_bridges_one_upstream_update_per_k(federation: str,
                                                                             tmp_path: Path) -> None:
    topics = Topics(federation=federation)
    sites = ("site-a", "site-b")
    k = 3
    initial = TASK.trainer(0).initial
    evaluate = TASK.evaluate_fn(TASK.trainer(0))
    local_acks: dict[str, list[Ack]] = {}
    upstream = Inbox()

    def on_ack(agent: str):  # type: ignore[no-untyped-def]
        return lambda ack: local_acks.setdefault(agent, []).append(ack)

    async with brokers(topics, sites) as (root, procs), contextlib.AsyncExitStack() as stack:
        agg = await stack.enter_async_context(Aggregator(mqtt_connector(root.config), initial, fedasync(),
                                                         AggregatorConfig(topics=topics, limits=root_limits(sites))))
        spy = await stack.enter_async_context(mqtt_connector(root.config)(ConnectOptions("spy", on_message=upstream)))
        await spy.subscribe(topics.updates_wildcard, qos=1)
        site_objs = {}
        for i, s in enumerate(sites):
            connect = mqtt_connector(procs[s].config)
            site_objs[s] = await stack.enter_async_context(Site(connect, initial, SiteConfig(
                s, topics, buffer_size=k, state_dir=tmp_path / s)))
            for j in range(3):
                name = f"{s}-dev{j}"
                await stack.enter_async_context(EdgeAgent(
                    connect, name, TASK.trainer(0), TASK.data_for(3 * i + j, 0),
                    AgentConfig(topics=topics, local_steps=10, ack_timeout=30.0), on_ack=on_ack(name)))
        await agg.wait_version(12, 120)

        def settled() -> bool:  # every ack in flight arrived
            mine = {s: sum(x.status == "accepted" for a, acks in local_acks.items() if a.startswith(s) for x in acks)
                    for s in sites}
            return all(mine[s] == site.local_accepted == k * site.acked_up > 0 for s, site in site_objs.items()) and \
                agg.state.counters.accepted == sum(site.acked_up for site in site_objs.values())
        await until(settled, 10)
    senders = set()
    while upstream.queue.qsize():
        senders.add((await upstream.get()).topic.rsplit("/", 1)[1])
    assert senders == set(sites)  # the root saw the sites only, never a device
    assert evaluate(agg.numpy_params())["accuracy"] > evaluate(initial)["accuracy"] + 0.3
    refused = [x for acks in local_acks.values() for x in acks if x.status == "rejected"]
    assert refused == [] and all(site.upstream_refused == 0 for site in site_objs.values())


async def until(done, timeout: float) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        if loop.time() > deadline:
            raise TimeoutError("not settled")
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_a_site_aggregator_killed_mid_run_loses_nothing_and_applies_nothing_twice(
        federation: str, tmp_path: Path) -> None:
    """``fedmqtt site`` as a process, killed with SIGKILL twice while its devices keep sending; the ledger:
    every local update acknowledged ``accepted`` is in exactly one combined update the root applied, and the
    root applied each combined update once."""
    topics = Topics(federation=federation)
    k = 3
    initial = TASK.trainer(0).initial
    local: list[Ack] = []
    root_acks = Inbox()
    async with brokers(topics, ("site-a",)) as (root, procs), contextlib.AsyncExitStack() as stack:
        agg = await stack.enter_async_context(Aggregator(mqtt_connector(root.config), initial, fedasync(),
                                                         AggregatorConfig(topics=topics, limits=root_limits(("site-a",)))))
        spy = await stack.enter_async_context(mqtt_connector(root.config)(ConnectOptions("spy", on_message=root_acks)))
        await spy.subscribe(topics.acks("site-a"), qos=1)
        args = [sys.executable, "-m", "fedmqtt", "site", "--broker", f"mqtt://127.0.0.1:{procs['site-a'].port}",
                "--site-id", "site-a", "--federation", federation, "--buffer-size", str(k),
                "--state-dir", str(tmp_path / "site"), "--status-every", "0"]
        logs = []

        def start() -> subprocess.Popen[bytes]:
            logs.append(tmp_path / f"site-{len(logs)}.log")
            with open(logs[-1], "wb") as err:
                return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err,
                                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
        proc = start()
        connect = mqtt_connector(procs["site-a"].config)
        for j in range(3):
            await stack.enter_async_context(EdgeAgent(
                connect, f"dev{j}", TASK.trainer(0), TASK.data_for(j, 0),
                AgentConfig(topics=topics, local_steps=10, round_seconds=0.1, ack_timeout=3.0,
                            outbox_dir=tmp_path / "outbox"), on_ack=local.append))
        try:
            for target in (4, 10):  # kill it twice, each time once it has made progress upstream
                await agg.wait_version(target, 90)
                proc.send_signal(signal.SIGKILL)
                assert proc.wait() == -signal.SIGKILL
                proc = start()
            await agg.wait_version(16, 90)
        finally:
            proc.terminate()
            proc.wait(30)
        await asyncio.sleep(1.0)  # the last acks in flight
    applied: dict[str, int] = {}  # upstream id -> times the root said accepted
    while root_acks.queue.qsize():
        ack = Ack.model_validate_json((await root_acks.get()).payload)
        if ack.status == "accepted":
            applied[ack.update_id] = applied.get(ack.update_id, 0) + 1
    assert set(applied.values()) == {1} and agg.state.counters.accepted == len(applied)  # each once
    members: dict[str, list[str]] = {}
    for line in (tmp_path / "site" / "ledger.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "members" in r:
            members[r["id"]] = [f"{a}/{u}" for a, u, _ in r["members"]]
    carried = [m for upstream in applied for m in members[upstream]]
    assert len(carried) == len(set(carried))  # no local update in two applied combined updates
    accepted_local = {a.update_id for a in local if a.status == "accepted"}
    assert accepted_local  # and every accepted one is carried by an applied combined update
    assert accepted_local <= {m.split("/", 1)[1] for m in carried}
    assert sum(a.status == "rejected" for a in local) == 0


def test_a_site_weighs_each_local_update_by_its_staleness_when_the_buffer_is_combined(tmp_path: Path) -> None:
    """No broker: the site's decisions only. An update that waited in the buffer while versions passed is
    weighed by its staleness at the moment of the combine, not at its arrival."""
    params = {"w": np.zeros(3, np.float32)}
    site = Site(mqtt_connector(BrokerConfig()), params, SiteConfig("site-a", Topics(), buffer_size=2,
                                                                   state_dir=tmp_path))

    def model(version: int) -> bytes:
        return codec.encode_model(params, version)

    def update(agent: str, base: int, value: float) -> bytes:
        return codec.encode_update({"w": np.full(3, value, np.float32)}, agent=agent, update_id=f"u-{agent}",
                                   base_version=base, num_samples=5, model_fingerprint=codec.fingerprint(params))

    site._on_model(model(0))
    site._on_update("d1", update("d1", 0, 1.0))  # arrives fresh ...
    site._on_model(model(8))  # ... then 8 versions pass while it waits
    site._on_update("d2", update("d2", 8, 3.0))
    (upstream, pending), = site.outbox.items()
    sent = codec.decode(pending.payload)
    w = polynomial(0.5)
    np.testing.assert_allclose(sent.tensors["w"], (float(w(8)) * 1.0 + float(w(0)) * 3.0) / 2, rtol=1e-6)
    assert sent.metadata["fedmqtt.base_version"] == "8" and sent.metadata["fedmqtt.num_samples"] == "10"
    assert site.pending[upstream] == [("d1", "u-d1", 0), ("d2", "u-d2", 8)]
    again = Site(mqtt_connector(BrokerConfig()), params, SiteConfig("site-a", Topics(), buffer_size=2,
                                                                    state_dir=tmp_path))
    assert again.pending == site.pending and upstream in again.outbox  # from the ledger and the outbox on disk
    # A crash between recording the root's ack and deleting the outbox copy: the copy is not sent again.
    again._record({"acked": upstream, "ack": {"status": "accepted", "version": 9}})
    third = Site(mqtt_connector(BrokerConfig()), params, SiteConfig("site-a", Topics(), buffer_size=2,
                                                                    state_dir=tmp_path))
    assert third.pending == {} and upstream not in third.outbox
    assert third.answered[("d1", "u-d1")].status == "accepted" and third.answered[("d2", "u-d2")].version == 9


def test_an_update_on_a_version_the_site_has_not_seen_yet_waits_for_it(tmp_path: Path) -> None:
    """Devices and the site read the same bridged model; a device may get a version first."""
    params = {"w": np.zeros(3, np.float32)}
    site = Site(mqtt_connector(BrokerConfig()), params, SiteConfig("site-a", Topics(), buffer_size=1))
    site._on_model(codec.encode_model(params, 4))
    early = codec.encode_update({"w": np.ones(3, np.float32)}, agent="d1", update_id="u1", base_version=5,
                                num_samples=5, model_fingerprint=codec.fingerprint(params))
    site._on_update("d1", early)
    assert site.local_rejected == 0 and not site.outbox and len(site.early) == 1
    site._on_model(codec.encode_model(params, 5))
    assert site.early == [] and len(site.outbox) == 1  # combined (K = 1) once the site is at version 5


def test_a_site_follows_a_new_epoch_of_the_root() -> None:
    """A root restored from an older backup starts a new epoch with lower versions: the site counts from them,
    instead of judging its devices' updates against the old epoch's higher version."""
    params = {"w": np.zeros(3, np.float32)}
    site = Site(mqtt_connector(BrokerConfig()), params, SiteConfig("site-a", Topics(), buffer_size=1))
    site._on_model(codec.encode_model(params, 80, extra={"fedmqtt.epoch": "old"}))
    site._on_model(codec.encode_model(params, 3, extra={"fedmqtt.epoch": "new"}))
    assert (site.epoch, site.version) == ("new", 3)
    site._on_update("d1", codec.encode_update({"w": np.ones(3, np.float32)}, agent="d1", update_id="u1",
                                              base_version=3, num_samples=5,
                                              model_fingerprint=codec.fingerprint(params)))
    assert site.local_rejected == 0 and len(site.outbox) == 1
    site._on_model(codec.encode_model(params, 2, extra={"fedmqtt.epoch": "new"}))  # an older copy: ignored
    assert site.version == 3

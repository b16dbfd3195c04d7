"""The root's worker tier: workers share the devices' updates (MQTT 5 shared subscription), sum k at a time;
the aggregator that owns the model applies the sums. First the owner's and a worker's decisions without a
broker, then two `fedmqtt worker` processes on a real Mosquitto, one killed with SIGKILL mid-run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmqtt import codec, core, journal, members
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.broker import MosquittoProcess
from fedmqtt.errors import ConfigError
from fedmqtt.schemas import Ack
from fedmqtt.strategies import fedasync, fedbuff, polynomial
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, mqtt_connector
from fedmqtt.worker import Worker, WorkerConfig

PARAMS = {"w": np.zeros(4, np.float32)}
FP = codec.fingerprint(PARAMS)


def device_update(agent: str, update_id: str, base: int, value: float) -> bytes:
    return codec.encode_update({"w": np.full(4, value, np.float32)}, agent=agent, update_id=update_id,
                               base_version=base, num_samples=5, model_fingerprint=FP)


def combined(worker: str, update_id: str, base: int, mean: float, carried: list[members.Member]) -> bytes:
    return codec.encode_update({"w": np.full(4, mean, np.float32)}, agent=worker, update_id=update_id,
                               base_version=base, num_samples=5 * len(carried), model_fingerprint=FP,
                               extra={members.MEMBERS: members.encode(carried)})


def test_a_combined_update_of_k_is_the_same_step_as_its_k_members_one_by_one() -> None:
    r = core.rules(fedbuff(4), PARAMS)
    flat = core.init(r, PARAMS, "e")
    w = polynomial(0.5)
    flat = flat._replace(version=2, history={2: flat.params})
    values = [(0, 1.0), (2, 3.0), (1, -2.0), (2, 0.5)]  # (base, value)
    for i, (base, value) in enumerate(values):
        flat, _ = core.receive(flat, f"d{i}", device_update(f"d{i}", "u", base, value), r)
    # a worker sums the first three at version 2, the owner takes the fourth from another worker alone
    mean = sum(float(w(2 - b)) * v for b, v in values[:3]) / 3
    tiered = core.init(r, PARAMS, "e")
    tiered = tiered._replace(version=2, history={2: tiered.params})
    tiered, fx = core.receive(tiered, "w1", combined("w1", "c1", 2, mean, [(f"d{i}", "u", values[i][0])
                                                                          for i in range(3)]), r, combined=True)
    assert fx.replies[0].accepted and fx.records[0].kind == "combined" and not fx.stepped
    assert tiered.counters.accepted == 3 and tiered.counters.since_step == 3
    tiered, fx = core.receive(tiered, "w2", combined("w2", "c1", 2, 0.5, [("d3", "u", 2)]), r, combined=True)
    assert fx.stepped and tiered.version == flat.version == 3
    np.testing.assert_allclose(tiered.params["w"], flat.params["w"], rtol=1e-6)
    assert dict(tiered.counters.staleness) == dict(flat.counters.staleness)


def test_the_owner_applies_no_member_twice_and_replays_combined_updates_from_its_journal() -> None:
    r = core.rules(fedbuff(10), PARAMS)
    s = core.init(r, PARAMS, "e")
    first = combined("w1", "c1", 0, 1.0, [("d1", "u1", 0), ("d2", "u1", 0)])
    s, fx = core.receive(s, "w1", first, r, combined=True)
    entries = list(fx.records)
    # the same device update again, carried by another worker's combined update: refused as a whole
    s, fx = core.receive(s, "w2", combined("w2", "c9", 0, 1.0, [("d3", "u1", 0), ("d2", "u1", 0)]), r,
                         combined=True)
    assert fx.replies[0].reason == "duplicate_member" and "d2/u1" in (fx.replies[0].detail or "")
    s, fx = core.receive(s, "d2", device_update("d2", "u1", 0, 1.0), r)  # or sent straight to the owner
    assert fx.replies[0].reason == "duplicate"
    s, fx = core.receive(s, "w1", first, r, combined=True)  # the worker's re-send: applied already
    assert fx.replies[0].reason == "duplicate"
    s, fx = core.receive(s, "w2", combined("w2", "c9", 0, 2.0, [("d3", "u1", 0)]), r, combined=True)
    assert fx.replies[0].accepted and s.counters.accepted == 3
    entries += fx.records
    again = core.init(r, PARAMS, "e")
    for e in entries:
        again = core.replay(again, e, r)
    np.testing.assert_allclose(np.asarray(again.strategy.buffer["w"]), np.asarray(s.strategy.buffer["w"]))
    assert again.counters.accepted == 3 and core.receive(again, "w1", first, r, combined=True)[1].replies[0].reason \
        == "duplicate"


@pytest.mark.parametrize(("carried", "why"), [
    ("not json", "not JSON"), ("[]", "non-empty"), ('[["d1","u1",0],["d1","u1",0]]', "twice"),
    ('[["d1","u1",7]]', "base version <= 0"), ('[["$x","u1",0]]', "is not [agent"),
    ('[["d1","u1",true]]', "is not [agent"), ("[" + ",".join([f'["{"d" * 60}","u",0]'] * 200) + "]", "bytes"),
])
def test_a_combined_update_with_malformed_members_is_refused_with_the_reason(carried: str, why: str) -> None:
    r = core.rules(fedbuff(10), PARAMS)
    payload = codec.encode_update({"w": np.ones(4, np.float32)}, agent="w1", update_id="c1", base_version=0,
                                  num_samples=5, model_fingerprint=FP, extra={members.MEMBERS: carried})
    s, fx = core.receive(core.init(r, PARAMS, "e"), "w1", payload, r, combined=True)
    assert fx.replies[0].reason == "bad_metadata" and why in (fx.replies[0].detail or "")
    assert s.counters.accepted == 0 and s.strategy.n == 0


def test_members_count_only_on_the_workers_topic_and_only_for_a_strategy_that_sums() -> None:
    r = core.rules(fedbuff(10), PARAMS)
    forged = combined("d1", "u1", 0, 1.0, [(f"d{i}", "u", 0) for i in range(9)])
    s, fx = core.receive(core.init(r, PARAMS, "e"), "d1", forged, r)  # a device claiming to be nine
    assert fx.replies[0].accepted and s.counters.accepted == 1 and int(s.strategy.n) == 1
    ra = core.rules(fedasync(), PARAMS)
    summed = combined("w1", "c1", 0, 1.0, [("d1", "u1", 0)])
    _, fx = core.receive(core.init(ra, PARAMS, "e"), "w1", summed, ra, combined=True)
    assert fx.replies[0].reason == "bad_metadata" and "takes no combined updates" in (fx.replies[0].detail or "")
    with pytest.raises(ConfigError, match="cannot take them"):
        Aggregator(mqtt_connector(BrokerConfig()), PARAMS, fedasync(), AggregatorConfig(workers=True))


def test_a_worker_refused_for_a_member_applied_before_settles_it_and_takes_the_others_again(
        tmp_path: Path) -> None:
    """No broker: the worker's decisions. The owner refuses a combined update because one member was applied
    before (a device's re-send reached two workers) and names it: the worker answers that device ``accepted``,
    lets the other member go unanswered and takes its device's re-send as new."""
    topics = Topics()
    wk = Worker(mqtt_connector(BrokerConfig()), PARAMS, WorkerConfig("w1", topics, buffer_size=2,
                                                                      state_dir=tmp_path))
    answers: list[tuple[str, Ack]] = []
    wk._answer = lambda agent, ack: answers.append((agent, ack))  # type: ignore[method-assign]
    wk._on_model(codec.encode_model(PARAMS, 0))
    wk._on_update("d1", device_update("d1", "u1", 0, 1.0))
    wk._on_update("d2", device_update("d2", "u1", 0, 3.0))
    (first, pending), = wk.outbox.items()
    sent = codec.decode(pending.payload)
    assert json.loads(sent.metadata[members.MEMBERS]) == [["d1", "u1", 0], ["d2", "u1", 0]]
    assert wk.upstream_topic == topics.combined("w1") and wk.updates_filter.startswith("$share/")
    refusal = Ack(update_id=first, status="rejected", version=3, reason="duplicate_member", members=["d1/u1"])
    wk._settle(Ack.model_validate_json(refusal.model_dump_json()))  # the members survive the wire
    assert [(a, x.status, x.update_id, x.version) for a, x in answers] == [("d1", "accepted", "u1", 3)]
    assert wk.released == 1 and not wk.outbox and wk.pending == {}
    wk._on_update("d1", device_update("d1", "u1", 0, 1.0))  # a late re-send of the settled one: answered again
    wk._on_update("d2", device_update("d2", "u1", 0, 3.0))  # the other's re-send is taken again
    assert [a for a, _ in answers] == ["d1", "d1"] and len(wk.buffer) == 1
    restarted = Worker(mqtt_connector(BrokerConfig()), PARAMS, WorkerConfig("w1", topics, state_dir=tmp_path))
    assert restarted.pending == {} and restarted.answered[("d1", "u1")].status == "accepted"  # from the ledger
    assert ("d2", "u1") not in restarted.answered


async def test_root_with_two_workers_loses_nothing_when_one_is_killed(mosquitto: MosquittoProcess,
                                                                       federation: str, tmp_path: Path) -> None:
    """Two `fedmqtt worker` processes share the updates of six devices; one is killed with SIGKILL mid-run and
    not restarted. The ledger, from the owner's journal: every update a device was told was applied is carried
    by exactly one applied combined update, no device update is carried by two, and learning went on."""
    task = get_task("digits", num_clients=6, seed=0)
    topics = Topics(federation=federation)
    state = tmp_path / "state"
    acks: list[tuple[str, Ack]] = []
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for wid in ("w1", "w2"):
        with open(tmp_path / f"{wid}.log", "wb") as log:
            procs[wid] = subprocess.Popen(
                [sys.executable, "-m", "fedmqtt", "worker", "--broker", f"mqtt://127.0.0.1:{mosquitto.port}",
                 "--worker-id", wid, "--federation", federation, "--buffer-size", "4", "--max-wait", "0.05",
                 "--status-every", "0"], stdout=subprocess.DEVNULL, stderr=log,
                env={**os.environ, "JAX_PLATFORMS": "cpu"})
    cfg = AggregatorConfig(topics=topics, state_dir=state, keep_journal=True, workers=True)
    try:
        async with contextlib.AsyncExitStack() as stack:
            agg = await stack.enter_async_context(Aggregator(mqtt_connector(mosquitto.config),
                                                             task.trainer(0).initial, fedbuff(6), cfg))
            await asyncio.sleep(3.0)  # the workers are up (they import JAX) before the devices send
            connect = mqtt_connector(mosquitto.config)
            for j in range(6):
                await stack.enter_async_context(EdgeAgent(
                    connect, f"dev{j}", task.trainer(0), task.data_for(j, 0),
                    AgentConfig(topics=topics, local_steps=10, round_seconds=0.1, ack_timeout=3.0,
                                outbox_dir=tmp_path / "outbox"), on_ack=lambda a, j=j: acks.append((f"dev{j}", a))))
            await agg.wait_version(6, 90)
            procs["w1"].send_signal(signal.SIGKILL)
            assert procs["w1"].wait() == -signal.SIGKILL
            killed_at = agg.version
            await agg.wait_version(killed_at + 12, 120)
            await asyncio.sleep(1.0)  # the last acks in flight
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(30)
    carried: list[tuple[str, str]] = []
    by_worker: dict[str, int] = {}
    for _, worker, payload in journal.applied_updates(state, journal.COMBINED):
        meta = codec.header_metadata(codec.read_header(payload)[0])
        carried += [(a, u) for a, u, _ in members.parse(meta, int(meta["fedmqtt.base_version"]))]
        by_worker[worker] = by_worker.get(worker, 0) + 1
    assert len(carried) == len(set(carried))  # applied twice: 0
    assert set(by_worker) == {"w1", "w2"}  # the shared subscription gave both workers updates
    settled = {(a, x.update_id) for a, x in acks if x.status == "accepted" or x.reason == "duplicate"}
    assert settled and settled <= set(carried)  # lost: 0
    assert [x.reason for _, x in acks if x.status == "rejected" and x.reason != "duplicate"] == []
    assert journal.applied_updates(state) == []  # no device update reached the owner directly


def test_a_worker_bounds_a_flooding_device_as_the_aggregator_would() -> None:
    """Behind workers the aggregator sees only sums, so each worker applies the per-device rate and share
    bounds to the updates it is handed: a device sending far beyond its rate is refused, the others not."""
    from fedmqtt.admission import AdmissionLimits

    wk = Worker(mqtt_connector(BrokerConfig()), PARAMS, WorkerConfig(
        "w1", buffer_size=40, admission=AdmissionLimits(max_rate=5.0, max_burst=5.0, max_share=None,
                                                     max_fraction=None)))
    answers: list[tuple[str, Ack]] = []
    wk._answer = lambda agent, ack: answers.append((agent, ack))  # type: ignore[method-assign]
    wk._on_model(codec.encode_model(PARAMS, 0))
    for i in range(30):
        wk._on_update("flood", device_update("flood", f"u{i}", 0, 1.0))
    wk._on_update("calm", device_update("calm", "u0", 0, 1.0))
    refused = [(a, x.reason) for a, x in answers]
    assert len(refused) >= 20 and set(refused) == {("flood", "rate_limited")}
    assert ("calm", "u0") in {(a, u) for (a, u, _), *_ in wk.buffer}


def test_the_combined_update_vector_decodes_and_counts_as_its_members() -> None:
    """tests/vectors/combined_worker-1.safetensors and combined.json (protocol section 12): what another
    language's worker must produce, and what an owner makes of it."""
    vectors = Path(__file__).parent / "vectors"
    want = json.loads((vectors / "combined.json").read_text())
    payload = (vectors / "combined_worker-1.safetensors").read_bytes()
    got = codec.decode(payload)
    assert got.metadata == want["metadata"]
    for name, t in want["tensors"].items():
        np.testing.assert_array_equal(got.tensors[name].ravel(), np.asarray(t["values"], np.float32))
    assert [list(m) for m in members.parse(got.metadata, 7)] == want["members"]
    model = codec.decode((vectors / "model_v7.safetensors").read_bytes()).tensors
    r = core.rules(fedbuff(10), model)
    s = core.init(r, model, "e", version=7)
    s, fx = core.receive(s, "worker-1", payload, r, combined=True)
    assert fx.replies[0].accepted and s.counters.accepted == want["updates_it_stands_for"] == int(s.strategy.n)
    ack = Ack.model_validate(want["duplicate_member_ack"])
    assert ack.reason == "duplicate_member" and ack.members == ["edge-2/fedcba9876543210"]

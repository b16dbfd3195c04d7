"""Durable aggregator state: journal framing, torn tails, snapshots, recovery to the same state, and the
write-ahead rule (nothing an update caused is seen before its record is fsynced)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest

from fedmqtt import codec, core, dedup, journal, snapshot
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.core import ServerState, Timing
from fedmqtt.durability import Durability
from fedmqtt.errors import StateError
from fedmqtt.memory_broker import MemoryBroker
from fedmqtt.schemas import Ack, Metrics
from fedmqtt.strategies.base import Strategy, no_flush
from fedmqtt.strategies.registry import make
from fedmqtt.topics import Topics
from fedmqtt.transport import ConnectOptions, Inbox, Message

PARAMS = {"l/kernel": np.zeros((4, 3), np.float32), "l/bias": np.zeros(3, np.float32)}
FP = codec.fingerprint(PARAMS)
STRATEGIES = {
    "fedbuff-adam": ("fedbuff", {"buffer_size": 3, "server_opt": "fedadam", "server_lr": 0.1}),
    "fedbuff-dp": ("fedbuff", {"buffer_size": 3, "dp_clip": 0.5, "dp_noise": 1.0}),  # PRNG key, the gate
    "fedasync": ("fedasync", {}),
    "fedasync-guard": ("fedasync-guard", {"window": 4}),  # a window of deltas and a refusal count
    "fedbuff-guard": ("fedbuff-guard", {"buffer_size": 3}),
    "fedavg": ("fedavg", {}),
}


def update(rng: np.random.Generator, base: int, agent: str = "a1", update_id: str | None = None) -> bytes:
    delta = {k: (rng.normal(size=v.shape) * 0.1).astype(np.float32) for k, v in PARAMS.items()}
    return codec.encode_update(delta, agent=agent, update_id=update_id or uuid.uuid4().hex, base_version=base,
                               num_samples=5, model_fingerprint=FP)


def aggregator(state_dir: Path, name: str, broker: MemoryBroker | None = None, **cfg: object) -> Aggregator:
    strategy, options = STRATEGIES[name]
    config = AggregatorConfig(state_dir=state_dir, **cfg)  # type: ignore[arg-type]
    return Aggregator((broker or MemoryBroker()).connect, PARAMS, make(strategy, **options), config)


def crash(agg: Aggregator, to: Path) -> Path:
    """What a crash of ``agg`` would leave: its state directory as it is on disk now, never closed (no final
    snapshot). A copy, because the live ``agg`` keeps the directory's lock, as a dead process would not."""
    assert agg.config.state_dir is not None
    shutil.copytree(agg.config.state_dir, to)
    return to


def durability(agg: Aggregator) -> Durability:
    assert isinstance(agg.store, Durability)
    return agg.store


def assert_same_state(a: ServerState, b: ServerState) -> None:
    assert (b.version, b.epoch) == (a.version, a.epoch)
    for k in PARAMS:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]))
    assert jax.tree.structure(a.strategy) == jax.tree.structure(b.strategy)
    for x, y in zip(jax.tree.leaves(a.strategy), jax.tree.leaves(b.strategy), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert sorted(a.history) == sorted(b.history)
    for v in a.history:
        for k in PARAMS:
            np.testing.assert_array_equal(np.asarray(a.history[v][k]), np.asarray(b.history[v][k]))
    assert (b.seen.items(), b.seen.floor) == (a.seen.items(), a.seen.floor)
    assert b.counters == a.counters
    assert b.gate.in_step == a.gate.in_step
    assert b.admission.claims == a.admission.claims  # they cap sample weights: part of the maths


# ---- recovery -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(STRATEGIES))
async def test_crash_and_recover_gives_the_same_state(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    sync = name == "fedavg"
    a = aggregator(tmp_path / "state", name, snapshot_every=1000, **({"timing": Timing(round_size=4)} if sync else {}))
    a.recover()
    sent = []
    for i in range(20):
        base = a.version if sync else max(0, a.version - i % 3)  # async: stale by 0, 1 or 2 versions
        sent.append(update(rng, base, agent=f"a{i % 4}"))
        a.handle(f"a{i % 4}", sent[-1])
        assert a.state.counters.accepted == i + 1
        if sync and i % 4 == 3:
            assert a.version == (i + 1) // 4  # the fourth update closed the round
        if i == 4:
            a.handle("a0", sent[-1])  # a re-send: refused as a duplicate, and counted
        if i == 9:
            await durability(a).snapshot(lambda: a.state)  # half from the snapshot, half replayed
    assert a.state.counters.rejected == {"duplicate": 1}
    assert a.version >= 5 and (sync or len(a.state.counters.staleness) > 1)
    crashed = crash(a, tmp_path / "crashed")
    b = aggregator(crashed, name)
    assert b.recover() == (13 if sync else 10)  # fedavg: 10 updates + 3 closed rounds
    assert_same_state(a.state, b.state)
    _, fx = core.receive(b.state, "a3", sent[-1], b.rules)
    # a re-send of an update applied before the crash is refused; a sync round forgets ids once its round
    # closed, and refuses the re-send as stale instead
    assert [(r.accepted, r.reason) for r in fx.replies] == [(False, "stale" if sync else "duplicate")]
    assert len(journal.applied_updates(crashed)) == 10  # the first ten are covered by the snapshot
    nxt = update(rng, a.version, agent="a1")  # both go on identically (the DP noise key included)
    for agg in (a, b):
        agg.handle("a1", nxt)
        if sync:
            agg.close_round()
    assert_same_state(a.state, b.state)


def test_replay_count_and_journal_ledger(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = aggregator(tmp_path / "state", "fedasync", keep_journal=True)
    a.recover()
    ids = [uuid.uuid4().hex for _ in range(5)]
    for i, uid in enumerate(ids):
        a.handle(f"a{i % 2}", update(rng, a.version, agent=f"a{i % 2}", update_id=uid))
    crashed = crash(a, tmp_path / "crashed")
    b = aggregator(crashed, "fedasync", keep_journal=True)
    assert b.recover() == 5
    assert_same_state(a.state, b.state)
    ledger = [(seq, agent, codec.decode(p).metadata["fedmqtt.update_id"])
              for seq, agent, p in journal.applied_updates(crashed)]
    assert ledger == [(i + 1, f"a{i % 2}", uid) for i, uid in enumerate(ids)]


def test_torn_tail_is_cut_and_replay_continues(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    a = aggregator(tmp_path / "state", "fedasync")
    a.recover()
    for _ in range(3):
        a.handle("a1", update(rng, a.version))
    crashed = crash(a, tmp_path / "crashed")
    (_, seg), = journal.segments(crashed)
    size = seg.stat().st_size
    with open(seg, "ab") as f:  # half a record: what a crash in the middle of a write leaves
        f.write(seg.read_bytes()[: size // 5])
    b = aggregator(crashed, "fedasync")
    assert b.recover() == 3
    assert_same_state(a.state, b.state)
    assert seg.stat().st_size == size  # repaired
    b.handle("a1", update(rng, b.version))  # appended after the cut: readable on the next start
    c = aggregator(crash(b, tmp_path / "crashed-again"), "fedasync")
    assert c.recover() == 4
    assert_same_state(b.state, c.state)


async def test_corruption_before_the_last_segment_is_an_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    a = aggregator(tmp_path / "state", "fedasync", keep_journal=True)
    a.recover()
    a.handle("a1", update(rng, 0))
    await durability(a).snapshot(lambda: a.state)
    a.handle("a1", update(rng, a.version))
    crashed = crash(a, tmp_path / "crashed")
    (_, first), _ = journal.segments(crashed)
    data = bytearray(first.read_bytes())
    data[40] ^= 0xFF  # inside the first record's body
    first.write_bytes(bytes(data))
    (crashed / snapshot.FILE).unlink()  # force a replay from the start
    with pytest.raises(StateError, match="corrupt"):
        aggregator(crashed, "fedasync").recover()


@pytest.mark.parametrize("snapshot_taken", [True, False], ids=["after-a-snapshot", "first-start-snapshot"])
async def test_state_of_another_model_or_strategy_is_refused(tmp_path: Path, snapshot_taken: bool) -> None:
    a = aggregator(tmp_path / "state", "fedasync")
    a.recover()
    a.handle("a1", update(np.random.default_rng(4), 0))
    if snapshot_taken:
        await durability(a).snapshot(lambda: a.state)
    crashed = crash(a, tmp_path / "crashed")  # else only the snapshot of the first start names model and strategy
    with pytest.raises(StateError, match="strategy"):
        aggregator(crashed, "fedbuff-adam").recover()
    other = {"x": np.zeros(2, np.float32)}
    foreign = Aggregator(MemoryBroker().connect, other, make("fedasync"), AggregatorConfig(state_dir=crashed))
    with pytest.raises(StateError, match="fingerprint"):
        foreign.recover()
    b = aggregator(crashed, "fedasync")  # the refusals changed nothing, and let go of the directory
    assert b.recover() == (0 if snapshot_taken else 1)
    assert_same_state(a.state, b.state)


def test_replay_refuses_a_record_of_another_model_but_not_one_a_changed_limit_would() -> None:
    payload = update(np.random.default_rng(5), 0)
    entry = core.Entry("update", "a1", payload)
    strict = core.rules(make("fedasync"), PARAMS, core.Limits(max_update_norm=1e-6, max_payload=16))
    _, fx = core.receive(core.init(strict, PARAMS, "e"), "a1", payload, strict)
    assert not fx.replies[0].accepted  # the limits now refuse it as a new arrival ...
    applied = core.replay(core.init(strict, PARAMS, "e"), entry, strict)
    assert applied.version == 1 and applied.counters.accepted == 1  # ... but an acknowledged record replays
    other = {"x": np.zeros(2, np.float32)}
    foreign = core.rules(make("fedasync"), other)
    with pytest.raises(StateError, match="cannot be replayed"):
        core.replay(core.init(foreign, other, "e"), entry, foreign)


def test_rebuild_state_checks_leaves() -> None:
    template = (jax.numpy.zeros(2), jax.numpy.int32(0))
    with pytest.raises(StateError, match="leaves"):
        snapshot.rebuild_state(template, [("array", np.zeros(2, np.float32))])
    stored = [("array", np.zeros(3, np.float32)), ("array", np.array(0, np.int32))]
    with pytest.raises(StateError, match="does not fit"):
        snapshot.rebuild_state(template, stored)


def test_prng_key_leaves_survive_a_snapshot(tmp_path: Path) -> None:
    keyed = Strategy("keyed", "delta", "async", lambda p: {"key": jax.random.key(0), "n": jax.numpy.int32(0)},
                     lambda p, u, s: (p, s, False), no_flush)
    r = core.rules(keyed, PARAMS)
    state = core.init(r, PARAMS, epoch="e1")._replace(strategy={"key": jax.random.key(7), "n": jax.numpy.int32(3)})
    snapshot.write(tmp_path, state, r, seq=1)
    back = snapshot.read(tmp_path, r, "e1")
    assert back is not None
    seq, restored = back
    assert seq == 1 and restored.strategy["n"] == 3
    assert jax.random.key_data(restored.strategy["key"]).tolist() == jax.random.key_data(jax.random.key(7)).tolist()
    assert jax.random.key_impl(restored.strategy["key"]) == jax.random.key_impl(jax.random.key(7))


def test_dedup_window_evicts_the_oldest_base_and_raises_the_floor_only_to_it() -> None:
    w = dedup.Seen()
    w = dedup.add(w, "a/1", 5, capacity=2)
    w = dedup.add(w, "a/2", 3, capacity=2)  # applied later, on an older base
    w = dedup.add(w, "a/3", 7, capacity=2)
    assert not dedup.contains(w, "a/2", 3) and dedup.contains(w, "a/1", 5) and dedup.contains(w, "a/3", 7)
    assert w.floor == 3  # updates on bases 4 and 5 are still accepted; a replay of a/2 is stale
    w = dedup.expire(w, 6)
    assert w.items() == [("a/3", 7)] and w.size == 1 and w.floor == 3  # expiry does not raise the floor
    w = dedup.add(w, "b/0", 8, capacity=2)
    w = dedup.add(w, "b/1", 8, capacity=2)  # over capacity: base 7 goes, floor 7
    w = dedup.add(w, "b/2", 9, capacity=2)  # base 8 goes as a whole
    assert not dedup.contains(w, "b/1", 8) and not dedup.contains(w, "a/3", 7) and w.floor == 8
    assert w.items() == [("b/2", 9)]


def test_the_dedup_window_is_part_of_the_state_and_survives_a_restart(tmp_path: Path) -> None:
    r = core.rules(make("fedasync"), PARAMS, core.Limits(dedup_capacity=2))
    rng = np.random.default_rng(6)
    state = core.init(r, PARAMS, "e")
    for i in range(3):  # the third evicts the first base
        state, _ = core.receive(state, "a1", update(rng, i, update_id=f"u{i}"), r)
    assert state.seen.items() == [("a1/u1", 1), ("a1/u2", 2)] and state.seen.floor == 0
    snapshot.write(tmp_path, state, r, seq=3)
    back = snapshot.read(tmp_path, r, "e")
    assert back is not None
    assert_same_state(state, back[1])


# ---- the write-ahead rule -------------------------------------------------------------------------------
class FsyncHook:
    """An injectable fsync. Unarmed it is os.fsync. Armed, it numbers its calls (1, 2, ...); a call that was
    ``block``-ed signals ``entered[n]`` and waits for ``release(n)``; a call that ``fail(n)`` picks raises OSError."""

    def __init__(self) -> None:
        self.armed = False
        self.fail: Callable[[int], bool] = lambda n: False  # which calls raise OSError
        self.calls = 0
        self.entered: dict[int, threading.Event] = {}
        self._released: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def block(self, *calls: int) -> None:
        for n in calls:
            self.entered[n], self._released[n] = threading.Event(), threading.Event()

    def release(self, n: int) -> None:
        self._released[n].set()

    def release_all(self) -> None:
        self.armed = False
        for e in self._released.values():
            e.set()

    async def wait_entered(self, n: int, timeout: float = 10.0) -> None:
        assert await asyncio.to_thread(self.entered[n].wait, timeout), f"fsync call {n} never came"

    def __call__(self, fd: int) -> None:
        with self._lock:
            armed = self.armed
            if armed:
                self.calls += 1
            n = self.calls
        if armed and self.fail(n):
            raise OSError(5, "Input/output error (injected)")
        if armed and n in self.entered:
            self.entered[n].set()
            if not self._released[n].wait(30):
                raise OSError(5, f"fsync call {n} was never released (test bug)")
        os.fsync(fd)


def version_of(model: bytes) -> int:
    return int(codec.decode(model).metadata["fedmqtt.version"])


async def wait_for(inbox: Inbox, accept: Callable[[Message], bool], timeout: float = 10.0) -> Message:
    """The next message in ``inbox`` that ``accept`` takes (others are skipped)."""
    async with asyncio.timeout(timeout):
        while not accept(msg := await inbox.get()):
            pass
    return msg


async def test_acks_and_model_wait_for_their_own_fsync_and_fsyncs_are_grouped(tmp_path: Path) -> None:
    broker, hook, n = MemoryBroker(), FsyncHook(), 5
    topics = Topics()
    cfg = AggregatorConfig(state_dir=tmp_path, snapshot_interval=3600, metrics_interval=0.05)
    agg = Aggregator(broker.connect, PARAMS, make("fedasync"), cfg, fsync=hook)
    acks, metrics = Inbox(), Inbox()
    rng = np.random.default_rng(5)
    payloads = [update(rng, 0, agent=f"a{i}", update_id=f"u{i}") for i in range(n)]

    def published_acks() -> list[str]:
        return [Ack.model_validate_json(m.payload).update_id for m in broker.published if m.topic.endswith("/acks")]

    def model_version() -> int:
        return version_of(broker.retained[topics.model])

    try:
        async with agg, broker.connect(ConnectOptions("probe", on_message=acks)) as probe, \
                broker.connect(ConnectOptions("metrics", on_message=metrics)) as watcher:
            await agg.wait_connected()
            for i in range(n):
                await probe.subscribe(topics.acks(f"a{i}"))
            await watcher.subscribe(topics.metrics)
            await agg.wait_version(0, timeout=5)
            journal_ = durability(agg).journal
            assert journal_ is not None and journal_.synced_seq == journal_.written_seq == 0
            hook.block(1, 2)
            hook.armed = True

            await probe.publish(topics.update("a0"), payloads[0])
            await hook.wait_entered(1)  # the fsync covering record 1 has begun, and hangs
            for i in range(1, n):  # more updates meanwhile: records 2..n, written but not synced
                await probe.publish(topics.update(f"a{i}"), payloads[i])
            # the publisher has run since the last one was applied (its metrics count it): it had every chance
            # to publish a version, and must not have
            m = await wait_for(metrics, lambda m: Metrics.model_validate_json(m.payload).accepted == n)
            assert agg.version == n and journal_.written_seq == n and journal_.synced_seq == 0
            assert Metrics.model_validate_json(m.payload).version == 0 and agg.committed_version == 0
            assert model_version() == 0 and published_acks() == [] and acks.queue.empty()

            hook.release(1)  # record 1 is durable now; records 2..n are not
            ack = Ack.model_validate_json((await acks.get(timeout=10)).payload)
            assert (ack.update_id, ack.status, ack.version) == ("u0", "accepted", 1)
            await hook.wait_entered(2)  # the next fsync (records 2..n) has begun, and hangs
            await wait_for(metrics, lambda m: Metrics.model_validate_json(m.payload).version >= 1)
            assert published_acks() == ["u0"] and acks.queue.empty()  # 2..n wait for THEIR fsync
            assert journal_.synced_seq == 1 and agg.committed_version == 1 and model_version() == 1

            hook.release(2)
            got = [Ack.model_validate_json((await acks.get(timeout=10)).payload) for _ in range(1, n)]
            assert [(a.update_id, a.status, a.version) for a in got] == [(f"u{i}", "accepted", i + 1)
                                                                          for i in range(1, n)]
            await agg.wait_version(n, timeout=5)
            assert model_version() == n and journal_.synced_seq == n
            hook.armed = False
            assert hook.calls == 2  # grouped: one fsync for record 1, one for the n - 1 written meanwhile
    finally:
        hook.release_all()
    b = Aggregator(broker.connect, PARAMS, make("fedasync"), AggregatorConfig(state_dir=tmp_path))
    assert b.recover() == 0  # the clean stop left a snapshot
    assert b.version == n


@pytest.mark.parametrize("disk", ["fails-once", "fails-for-good"])
async def test_a_failed_fsync_stops_the_aggregator_and_nothing_unsynced_is_acknowledged(tmp_path: Path,
                                                                                        disk: str) -> None:
    broker, hook = MemoryBroker(), FsyncHook()
    topics = Topics()
    agg = Aggregator(broker.connect, PARAMS, make("fedasync"), AggregatorConfig(state_dir=tmp_path), fsync=hook)
    acks = Inbox()
    run = asyncio.create_task(agg.run())
    try:
        await agg.wait_connected()
        await agg.wait_version(0, timeout=5)
        async with broker.connect(ConnectOptions("probe", on_message=acks)) as probe:
            await probe.subscribe(topics.acks("a1"))
            hook.fail = (lambda n: n == 1) if disk == "fails-once" else (lambda n: True)
            hook.armed = True
            await probe.publish(topics.update("a1"), update(np.random.default_rng(7), 0))
            with pytest.raises(StateError, match="fsync"):
                await asyncio.wait_for(run, 10)
    finally:
        hook.release_all()
        if not run.done():
            run.cancel()
    assert hook.calls >= 1 and agg.version == 1  # the update was applied and journaled, never synced
    assert agg.committed_version == 0 and isinstance(agg.failure, StateError)
    assert [m for m in broker.published if m.topic == topics.acks("a1")] == [] and acks.queue.empty()
    assert version_of(broker.retained[topics.model]) == 0


async def test_sync_round_with_state_dir_is_committed_and_published(tmp_path: Path) -> None:
    """The cohort's last update closes the round; nothing follows it, yet the new version must go out."""
    broker = MemoryBroker()
    params = {"w": np.zeros(3, np.float32)}
    cfg = AggregatorConfig(timing=Timing(round_size=2), state_dir=tmp_path)
    async with Aggregator(broker.connect, params, make("fedavg"), cfg) as agg:
        await agg.wait_connected()
        async with broker.connect(ConnectOptions("client")) as t:
            for i, value in enumerate((1.0, 3.0)):
                payload = codec.encode_update({"w": np.full(3, value, np.float32)}, agent=f"a{i}", update_id=f"u{i}",
                                              base_version=0, num_samples=1, encoding="weights")
                await t.publish(Topics().update(f"a{i}"), payload)
            await agg.wait_version(1, timeout=5)
        store = durability(agg)
        assert store.journal is not None and store.journal.synced_seq == 3  # two updates and the round's flush
    model = codec.decode(broker.retained[Topics().model])
    assert model.metadata["fedmqtt.version"] == "1"
    np.testing.assert_allclose(model.tensors["w"], 2.0)
    assert snapshot.read_seq(tmp_path) == 3 and list(journal.read_records(tmp_path)) == []  # clean stop: all in it


def test_one_aggregator_per_state_directory(tmp_path: Path) -> None:
    first = aggregator(tmp_path, "fedasync")
    first.recover()
    second = aggregator(tmp_path, "fedasync")
    with pytest.raises(StateError, match="in use by another aggregator"):
        second.recover()
    first.handle("a1", update(np.random.default_rng(0), 0))
    asyncio.run(first.closed())  # a clean stop releases the directory
    third = aggregator(tmp_path, "fedasync")
    assert third.recover() == 0 and third.version == 1  # from the final snapshot


async def test_a_failed_journal_write_stops_the_aggregator_before_the_update_is_applied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = MemoryBroker()
    acks = Inbox()
    agg = aggregator(tmp_path, "fedasync", broker)
    rng = np.random.default_rng(1)

    def disk_full(fd: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    async with broker.connect(ConnectOptions("watch", on_message=acks)) as watch:
        await watch.subscribe(Topics().acks("a1"))
        async def serve() -> None:
            async with agg:
                await agg.wait_connected()
                agg.handle("a1", update(rng, 0, update_id="ok"))
                await agg.wait_until(lambda: acks.queue.qsize() == 1, 10, lambda: "no ack for the first update")
                monkeypatch.setattr(journal, "write_all", disk_full)
                agg.handle("a1", update(rng, 1, update_id="lost"))
                assert await agg.sleep(10)  # it is stopping; leaving the block raises the failure

        with pytest.raises(StateError, match="cannot write the journal"):
            await serve()
        assert agg.version == 1 and agg.state.counters.accepted == 1  # the second update was not applied
        await asyncio.sleep(0.05)
        assert [Ack.model_validate_json(m.payload).update_id for m in [acks.queue.get_nowait()]] == ["ok"]
        assert acks.queue.empty()

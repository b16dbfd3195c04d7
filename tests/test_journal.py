"""Durable aggregator state: journal framing, torn tails, snapshots, and recovery to the same state."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest

from fedmqtt import codec, journal
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.errors import StateError
from fedmqtt.schemas import Ack
from fedmqtt.strategies.registry import make
from fedmqtt.transport import ConnectOptions, MemoryBroker
from fedmqtt.validation import DedupWindow

PARAMS = {"l/kernel": np.zeros((4, 3), np.float32), "l/bias": np.zeros(3, np.float32)}
FP = codec.fingerprint(PARAMS)
STRATEGIES = {
    "fedbuff-adam": ("fedbuff", {"buffer_size": 3, "server_opt": "fedadam", "server_lr": 0.1}),
    "fedasync": ("fedasync", {}),
    "fedavg": ("fedavg", {}),
}


def update(rng: np.random.Generator, base: int, agent: str = "a1", update_id: str | None = None) -> bytes:
    delta = {k: (rng.normal(size=v.shape) * 0.1).astype(np.float32) for k, v in PARAMS.items()}
    return codec.encode_update(delta, agent=agent, update_id=update_id or uuid.uuid4().hex, base_version=base,
                               num_samples=5, model_fingerprint=FP)


def aggregator(state_dir: Path, name: str, **cfg: object) -> Aggregator:
    strategy, options = STRATEGIES[name]
    config = AggregatorConfig(state_dir=state_dir, **cfg)  # type: ignore[arg-type]
    return Aggregator(MemoryBroker().connect, PARAMS, make(strategy, **options), config)


def assert_same_state(a: Aggregator, b: Aggregator) -> None:
    assert (b.version, b.accepted) == (a.version, a.accepted)
    for k in PARAMS:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]))
    assert jax.tree.structure(a.state) == jax.tree.structure(b.state)
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert sorted(a._history) == sorted(b._history)
    assert a.applied.items() == b.applied.items()


@pytest.mark.parametrize("name", list(STRATEGIES))
async def test_crash_and_recover_gives_the_same_state(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    a = aggregator(tmp_path, name, snapshot_every=1000)
    a.recover()
    sent = []
    for i in range(20):
        sent.append(update(rng, a.version))
        assert a.handle("a1", sent[-1]).status == "accepted"
        if name == "fedavg" and i % 4 == 3:
            a.close_round()
        if i == 9:
            await a.snapshot()  # half from the snapshot, half replayed from the journal
    # a "crash": the object is abandoned without closing; a new one recovers from disk
    b = aggregator(tmp_path, name)
    assert b.recover() == (13 if name == "fedavg" else 10)  # fedavg: 10 updates + 3 closed rounds
    assert_same_state(a, b)
    if name != "fedavg":  # sync rounds forget ids once their round closed (they would be stale)
        assert b.handle("a1", sent[-1]).reason == "duplicate"
    assert len(journal.applied_updates(tmp_path)) == 10  # the first ten are covered by the snapshot


def test_replay_count_and_journal_ledger(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = aggregator(tmp_path, "fedasync", keep_journal=True)
    a.recover()
    ids = [uuid.uuid4().hex for _ in range(5)]
    for uid in ids:
        a.handle("a1", update(rng, a.version, update_id=uid))
    b = aggregator(tmp_path, "fedasync", keep_journal=True)
    assert b.recover() == 5
    ledger = [codec.decode(p).metadata["fedmqtt.update_id"] for _, _, p in journal.applied_updates(tmp_path)]
    assert ledger == ids


def test_torn_tail_is_cut_and_replay_continues(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    a = aggregator(tmp_path, "fedasync")
    a.recover()
    for _ in range(3):
        a.handle("a1", update(rng, a.version))
    (_, seg), = journal.segments(tmp_path)
    size = seg.stat().st_size
    with open(seg, "ab") as f:  # half a record: what a crash in the middle of a write leaves
        f.write(seg.read_bytes()[: size // 5])
    b = aggregator(tmp_path, "fedasync")
    assert b.recover() == 3
    assert b.version == 3
    assert seg.stat().st_size == size  # repaired
    b.handle("a1", update(rng, b.version))
    c = aggregator(tmp_path, "fedasync")
    assert c.recover() == 4


def test_corruption_before_the_last_segment_is_an_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    a = aggregator(tmp_path, "fedasync", keep_journal=True)
    a.recover()
    a.handle("a1", update(rng, 0))
    asyncio.run(a.snapshot())
    a.handle("a1", update(rng, a.version))
    (_, first), _ = journal.segments(tmp_path)
    data = bytearray(first.read_bytes())
    data[40] ^= 0xFF
    first.write_bytes(bytes(data))
    (tmp_path / journal.SNAPSHOT).unlink()  # force a replay from the start
    with pytest.raises(StateError, match="corrupt"):
        aggregator(tmp_path, "fedasync").recover()


def test_snapshot_of_another_model_or_strategy_is_refused(tmp_path: Path) -> None:
    a = aggregator(tmp_path, "fedasync")
    a.recover()
    a.handle("a1", update(np.random.default_rng(4), 0))
    asyncio.run(a.snapshot())
    with pytest.raises(StateError, match="strategy"):
        aggregator(tmp_path, "fedbuff-adam").recover()
    other = {"x": np.zeros(2, np.float32)}
    cfg = AggregatorConfig(state_dir=tmp_path)
    foreign = Aggregator(MemoryBroker().connect, other, make("fedasync"), cfg)
    with pytest.raises(StateError, match="fingerprint"):
        foreign.recover()


def test_rebuild_state_checks_leaves() -> None:
    template = (jax.numpy.zeros(2), jax.numpy.int32(0))
    with pytest.raises(StateError, match="leaves"):
        journal.rebuild_state(template, [("array", np.zeros(2, np.float32))])
    stored = [("array", np.zeros(3, np.float32)), ("array", np.array(0, np.int32))]
    with pytest.raises(StateError, match="does not fit"):
        journal.rebuild_state(template, stored)


def test_prng_key_leaves_survive_a_snapshot(tmp_path: Path) -> None:
    key = jax.random.key(7)
    snap = journal.Snapshot(seq=1, version=1, fingerprint=FP, strategy="s", params=PARAMS, state_leaves=[key],
                            history={1: PARAMS}, dedup=[], dedup_floor=-1, counters={})
    journal.write_snapshot(tmp_path, snap)
    back = journal.read_snapshot(tmp_path)
    assert back is not None
    (restored,) = journal.rebuild_state([jax.random.key(0)], back.state_leaves)
    assert jax.random.key_data(restored).tolist() == jax.random.key_data(key).tolist()


def test_dedup_window_evicts_the_oldest_base_and_raises_the_floor_only_to_it() -> None:
    w = DedupWindow(capacity=2)
    w.add("a/1", 5)
    w.add("a/2", 3)  # applied later, on an older base
    w.add("a/3", 7)
    assert "a/2" not in w and "a/1" in w and "a/3" in w
    assert w.floor == 3  # updates on bases 4 and 5 are still accepted; a replay of a/2 is stale
    w.expire(6)
    assert w.items() == [("a/3", 7)]
    w.add("a/3", 8)  # the same key again moves it
    w.add("b/1", 8)
    w.add("b/2", 9)
    assert "a/3" not in w and "b/1" not in w and w.floor == 8


async def test_acks_and_model_wait_for_the_fsync(tmp_path: Path) -> None:
    broker = MemoryBroker()
    agg = Aggregator(broker.connect, PARAMS, make("fedasync"), AggregatorConfig(state_dir=tmp_path))
    seen: list[Ack] = []
    calls = []
    async with agg:
        await agg.wait_connected()
        assert agg.durability is not None
        j = agg.durability.journal
        assert j is not None
        real_sync = j.sync

        def counting_sync() -> int:
            calls.append((j.written_seq, j.synced_seq))
            return real_sync()

        j.sync = counting_sync  # type: ignore[method-assign]
        t = broker.connect(ConnectOptions("probe"))
        async with t:
            await t.subscribe(agg.topics.acks("a1"))
            rng = np.random.default_rng(5)
            for _ in range(30):
                await t.publish(agg.topics.update("a1"), update(rng, 0))
            async for msg in t.messages():
                ack = Ack.model_validate_json(msg.payload)
                seen.append(ack)
                assert j.synced_seq >= 1  # no ack leaves before its record is durable
                if len(seen) == 30:
                    break
        await agg.wait_version(30, 5.0)
    assert all(a.status == "accepted" for a in seen)
    assert 1 <= len(calls) <= 30  # grouped: usually far fewer fsyncs than records
    b = Aggregator(broker.connect, PARAMS, make("fedasync"), AggregatorConfig(state_dir=tmp_path))
    assert b.recover() == 0  # the clean stop left a snapshot
    assert b.version == 30


async def test_sync_round_with_state_dir_is_committed_and_published(tmp_path: Path) -> None:
    """The cohort's last update triggers the round; nothing follows it, yet the new version must go out."""
    from fedmqtt import codec
    from fedmqtt.aggregator import Aggregator, AggregatorConfig
    from fedmqtt.strategies import fedavg
    from fedmqtt.topics import Topics
    from fedmqtt.transport import ConnectOptions, MemoryBroker

    broker = MemoryBroker()
    params = {"w": np.zeros(3, np.float32)}
    cfg = AggregatorConfig(round_size=2, state_dir=tmp_path)
    async with Aggregator(broker.connect, params, fedavg(), cfg) as agg:
        await agg.wait_connected()
        async with broker.connect(ConnectOptions("client")) as t:
            for i, value in enumerate((1.0, 3.0)):
                payload = codec.encode_update({"w": np.full(3, value, np.float32)}, agent=f"a{i}", update_id=f"u{i}",
                                              base_version=0, num_samples=1, encoding="weights")
                await t.publish(Topics().update(f"a{i}"), payload)
            await agg.wait_version(1, timeout=5)
    model = codec.decode(broker.retained[Topics().model])
    assert model.metadata["fedmqtt.version"] == "1"
    np.testing.assert_allclose(model.tensors["w"], 2.0)

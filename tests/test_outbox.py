"""The agent's outbox: unacknowledged updates on disk survive an agent restart and drain once acknowledged."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from fedmqtt import codec
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator
from fedmqtt.memory_broker import MemoryBroker
from fedmqtt.outbox import Outbox, Pending
from fedmqtt.strategies import fedasync
from fedmqtt.tasks import get_task


def payload(update_id: str, agent: str = "a1") -> bytes:
    delta = {"w": np.zeros(2, np.float32)}
    return codec.encode_update(delta, agent=agent, update_id=update_id, base_version=0, num_samples=1)


def test_outbox_persists_and_forgets(tmp_path: Path) -> None:
    box = Outbox(tmp_path, "a1")
    p1 = payload("u1")
    box["u1"] = Pending(p1, 1.0)
    box["u2"] = Pending(payload("u2"), 1.0)
    box["u1"] = Pending(p1, 2.0)  # a re-send only updates the time, in memory
    del box["u2"]
    (tmp_path / "u3.safetensors.tmp").write_bytes(b"half a write")
    (tmp_path / "junk.safetensors").write_bytes(b"not a payload")
    (tmp_path / "u4.safetensors").write_bytes(payload("u4", agent="someone-else"))
    again = Outbox(tmp_path, "a1")
    assert list(again) == ["u1"]
    assert again["u1"] == Pending(p1, 0.0, 1)  # due for a re-send at once; it may have gone out before
    assert not (tmp_path / "u3.safetensors.tmp").exists()
    assert not (tmp_path / "junk.safetensors").exists()
    assert (tmp_path / "u4.safetensors").exists()  # another agent's file is left alone
    assert len(Outbox()) == 0  # no directory: memory only


async def test_a_put_cancelled_during_its_write_still_keeps_the_update(tmp_path: Path) -> None:
    box = Outbox(tmp_path, "a1")
    put = asyncio.create_task(box.put("u1", Pending(payload("u1"), 1.0)))
    await asyncio.sleep(0)  # the write has started in its thread
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert list(box) == ["u1"] and list(Outbox(tmp_path, "a1")) == ["u1"]  # memory and disk agree


async def test_put_writes_to_disk_before_returning(tmp_path: Path) -> None:
    box, p1 = Outbox(tmp_path, "a1"), payload("u1")
    await box.put("u1", Pending(p1, 1.0))
    assert (tmp_path / "u1.safetensors").read_bytes() == p1  # durable once put returns
    assert list(Outbox(tmp_path, "a1")) == ["u1"]


async def test_unacknowledged_updates_survive_an_agent_restart(tmp_path: Path) -> None:
    broker = MemoryBroker()
    task = get_task("digits", num_clients=2, seed=0)
    cfg = AgentConfig(local_steps=2, max_outbox=3, ack_timeout=0.5, outbox_dir=tmp_path)
    trainer = task.trainer(0)
    # A retained model but no aggregator: updates pile up until the outbox is full and training pauses.
    broker.retained[cfg.topics.model] = codec.encode_model(trainer.initial, version=0)
    async with EdgeAgent(broker.connect, "edge-0", trainer, task.data_for(0), cfg) as agent:
        deadline = time.monotonic() + 30
        while len(agent.outbox) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        sent = set(agent.outbox)
    assert len(sent) == 3
    assert {p.name for p in (tmp_path / "edge-0").iterdir()} == {f"{u}.safetensors" for u in sent}

    restarted = EdgeAgent(broker.connect, "edge-0", task.trainer(0), task.data_for(0), cfg)
    assert set(restarted.outbox) == sent
    assert not restarted._outbox_space.is_set()  # still full: no training until acks arrive
    async with Aggregator(broker.connect, trainer.initial, fedasync()) as agg, restarted:
        await restarted.wait_updates(3, 30)
        assert agg.state.counters.accepted >= 3
    assert not any(p.name[:-len(".safetensors")] in sent for p in (tmp_path / "edge-0").iterdir())

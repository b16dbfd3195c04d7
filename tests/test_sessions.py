"""Persistent sessions with Mosquitto: updates sent while the aggregator is away wait in the broker (also
across a clean broker restart), and agents take the retained model again after reconnecting."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fedmqtt import codec
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.broker import MosquittoProcess
from fedmqtt.strategies import fedasync
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import ConnectOptions, mqtt_connector

pytestmark = [pytest.mark.broker, pytest.mark.fault]

PARAMS = {"w": np.zeros((3, 2), np.float32)}


def update(base: int) -> bytes:
    delta = {"w": np.full((3, 2), 0.1, np.float32)}
    uid = uuid.uuid4().hex
    return codec.encode_update(delta, agent="a1", update_id=uid, base_version=base, num_samples=1)


async def until(cond: object, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.05)


async def test_updates_wait_in_the_broker_while_the_aggregator_is_down(mosquitto: MosquittoProcess,
                                                                       tmp_path: Path) -> None:
    topics = Topics(federation="sessions")
    connect = mqtt_connector(mosquitto.config)
    cfg = AggregatorConfig(topics=topics, state_dir=tmp_path, client_id="agg-sessions")

    async with Aggregator(connect, PARAMS, fedasync(), cfg) as agg:  # creates the persistent session
        await agg.wait_connected()
    async with connect(ConnectOptions("sender")) as sender:  # aggregator away: the broker queues these
        for _ in range(5):
            await sender.publish(topics.update("a1"), update(0), qos=1)
    async with Aggregator(connect, PARAMS, fedasync(), cfg) as agg:
        await until(lambda: agg.state.counters.accepted == 5)
    assert agg.version == 5

    async with connect(ConnectOptions("sender")) as sender:  # away again, and the broker restarts cleanly
        for _ in range(3):
            await sender.publish(topics.update("a1"), update(5), qos=1)
    mosquitto.stop()  # SIGTERM: Mosquitto writes sessions and queued messages to its persistence file
    await mosquitto.start()
    async with Aggregator(connect, PARAMS, fedasync(), cfg) as agg:
        await until(lambda: agg.state.counters.accepted == 8)
        assert agg.version == 8


@pytest.mark.slow
async def test_agent_takes_the_retained_model_again_after_reconnecting(mosquitto: MosquittoProcess,
                                                                       tmp_path: Path) -> None:
    topics = Topics(federation="retake")
    connect = mqtt_connector(mosquitto.config)
    task = get_task("digits", num_clients=2, seed=0)
    trainer = task.trainer(0)
    agg = Aggregator(connect, trainer.initial, fedasync(),
                     AggregatorConfig(topics=topics, state_dir=tmp_path / "agg", backoff_max=0.5))
    agent = EdgeAgent(connect, "edge-0", task.trainer(0), task.data_for(0),
                      AgentConfig(topics=topics, local_steps=2, round_seconds=0.2, backoff_max=0.5,
                                  ack_timeout=2.0, outbox_dir=tmp_path / "outbox"))
    models: list[int] = []
    on_model = agent._on_model

    def counting(payload: bytes) -> None:
        models.append(int(codec.decode(payload).metadata["fedmqtt.version"]))
        on_model(payload)

    agent._on_model = counting  # type: ignore[method-assign]
    async with agg, agent:
        await agent.wait_updates(3, 60)
        for restart in (mosquitto.stop, mosquitto.kill):
            seen = len(models)
            restart()
            await asyncio.sleep(0.5)
            await mosquitto.start()
            await until(lambda s=seen: len(models) > s, 30)  # the model arrived again on the new connection
        n = sum(agent.acks.values())
        await agent.wait_updates(n + 2, 60)  # and training goes on after both restarts
        assert agent.model is not None
        assert agent.model.info.version == max(models)  # an older retained copy never replaces a newer model

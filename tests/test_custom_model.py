"""The README's "your own model and data" path: edge/my_agent.py's model, loss and data, with an aggregator
built from model_params() of the same architecture, on a real broker."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import optax
import pytest
from flax import nnx

from fedmqtt import (
    AgentConfig,
    Aggregator,
    AggregatorConfig,
    ArrayData,
    EdgeAgent,
    Topics,
    Trainer,
    fedasync,
    model_params,
    mqtt_connector,
)
from fedmqtt.transport import BrokerConfig

pytestmark = pytest.mark.broker


def load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("my_agent", Path(__file__).parents[1] / "edge" / "my_agent.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_custom_model_agent_updates_are_accepted(broker: BrokerConfig, federation: str) -> None:
    ex = load_example()
    connect = mqtt_connector(broker)
    topics = Topics(federation=federation)
    initial = model_params(ex.SensorNet(rngs=nnx.Rngs(0)))
    async with Aggregator(connect, initial, fedasync(), AggregatorConfig(topics=topics)) as agg:
        await agg.wait_connected()
        trainer = Trainer(ex.SensorNet(rngs=nnx.Rngs(0)), ex.loss_fn, optax.adam(1e-2))
        async with EdgeAgent(connect, "sensor-1", trainer, ArrayData(*ex.local_data()),
                             AgentConfig(topics=topics, local_steps=10)) as agent:
            await agent.wait_updates(3, timeout=30)
        assert agent.acks["accepted"] >= 3 and agent.acks["rejected"] == 0
        assert agg.version >= 3

"""A device running its own model on its own data: the template for a real deployment.

    FEDMQTT_BROKER_URL=mqtt://127.0.0.1:1883 FEDMQTT_AGENT_ID=sensor-7f3a python edge/my_agent.py

The same environment variables as ``fedmqtt edge`` (``fedmqtt broker init`` writes them per device).
The aggregator must hold the same architecture (same parameter names, shapes, dtypes): start it from Python
with ``Aggregator(connect, model_params(SensorNet(rngs=nnx.Rngs(0))), fedasync())``.
"""

from __future__ import annotations

import asyncio
import os

import jax
import numpy as np
import optax
from flax import nnx

from fedmqtt import AgentConfig, ArrayData, BrokerConfig, EdgeAgent, Trainer, mqtt_connector


class SensorNet(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(16, 32, rngs=rngs)
        self.out = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


def loss_fn(model: SensorNet, batch: dict[str, jax.Array]) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()


def local_data() -> tuple[np.ndarray, np.ndarray]:
    """Replace with the device's own readings; they never leave it."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(2), "little"))
    x = rng.normal(size=(256, 16)).astype(np.float32)
    return x, (x[:, :3].argmax(1)).astype(np.int32)


async def main() -> None:
    agent_id = os.environ.get("FEDMQTT_AGENT_ID")
    if not agent_id:  # two devices with one id would fight over one MQTT session
        raise SystemExit("error: set FEDMQTT_AGENT_ID to this device's own id (a pseudonym)")
    connect = mqtt_connector(BrokerConfig.from_url(os.environ.get("FEDMQTT_BROKER_URL", "mqtt://127.0.0.1:1883")))
    trainer = Trainer(SensorNet(rngs=nnx.Rngs(0)), loss_fn, optax.adam(1e-2))
    config = AgentConfig(local_steps=10, model_key=os.environ.get("FEDMQTT_MODEL_KEY") or None)
    agent = EdgeAgent(connect, agent_id, trainer, ArrayData(*local_data()), config)
    await agent.run()  # until Ctrl-C / SIGTERM


if __name__ == "__main__":
    asyncio.run(main())

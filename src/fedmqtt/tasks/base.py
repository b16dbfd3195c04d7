"""A learning task: model, loss, metrics, each agent's shard and the held-out test set."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import optax
from flax import nnx

from fedmqtt.data import ArrayData
from fedmqtt.training import LossFn, MetricsFn, Trainer, zero_model
from fedmqtt.types import Array


@dataclass(frozen=True)
class Task:
    """Everything the built-in demo, CLI and benchmarks need to know about one problem."""

    name: str
    make_model: Callable[[int], nnx.Module]
    loss_fn: LossFn
    metrics_fn: MetricsFn
    client_data: Callable[[int], tuple[Array, Array]]  # shard of agent index i
    test_data: tuple[Array, Array]
    num_clients: int
    learning_rate: float = 0.05
    batch_size: int = 32
    local_steps: int = 20

    def optimizer(self) -> optax.GradientTransformation:
        return optax.sgd(self.learning_rate, momentum=0.9)

    def trainer(self, seed: int = 0, prox_rho: float = 0.0, optimizer: optax.GradientTransformation | None = None,
                *, zero_init: bool = False, compiler_options: Mapping[str, Any] | None = None) -> Trainer:
        """A trainer of this task's model, its initial parameters from ``seed``; with ``zero_init``, zeros
        (for a device, which only trains the aggregator's model: see :func:`fedmqtt.training.zero_model`).
        ``compiler_options``: see :class:`fedmqtt.training.Trainer`."""
        model = zero_model(lambda: self.make_model(seed)) if zero_init else self.make_model(seed)
        return Trainer(model, self.loss_fn, optimizer or self.optimizer(), self.metrics_fn, prox_rho=prox_rho,
                       compiler_options=compiler_options)

    def data_for(self, index: int, seed: int = 0) -> ArrayData:
        x, y = self.client_data(index)
        return ArrayData(x, y, batch_size=self.batch_size, seed=seed + index)

    def evaluate_fn(self, trainer: Trainer) -> Callable[[dict[str, Array]], dict[str, float]]:
        x, y = self.test_data
        batch = {"x": x, "y": y}
        return lambda params: trainer.evaluate(params, batch)


def index_of(agent_id: str, num_clients: int) -> int:
    """Agent index from its id: the trailing number (``edge-3`` -> 3) modulo the number of shards,
    or a stable hash of the id when it has none."""
    m = re.search(r"(\d+)$", agent_id)
    n = int(m.group(1)) if m else zlib.crc32(agent_id.encode())
    return n % num_clients


def classification_loss(model: nnx.Module, batch: Any) -> jax.Array:
    logits = model(batch["x"])
    loss: jax.Array = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss


def classification_metrics(model: nnx.Module, batch: Any) -> dict[str, jax.Array]:
    logits = model(batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return {"accuracy": (logits.argmax(-1) == batch["y"]).mean(), "loss": loss}

"""Human activity recognition on the 30 volunteers of UCI HAPT: a natural device partition, one agent each.

The data file is not part of the project. :func:`find_data` looks for it, in order, at the ``path`` given,
at ``$FEDMQTT_HAPT``, and at ``../shared/data/hapt_har_30users.npz`` relative to the project root.

- Partition: agent ``i`` holds volunteer ``i + 1``'s windows. Each volunteer's windows are kept in time
  order; the first 80 % are that agent's training data, the last 20 % its test data, and the union of the
  test parts is the global test set.
- Normalisation: per channel, with mean and standard deviation of the union of the training parts.
- Classes: ``classes=6`` keeps the six classic UCI-HAR activities (y < 6), ``classes=12`` adds the six
  postural transitions.
- Model: a small 1-D CNN (~9k parameters) over 128 samples × 6 channels, fast on two CPU cores.

>>> task = hapt_task()  # doctest: +SKIP
>>> task.num_clients, task.client_data(0)[0].shape[1:]  # doctest: +SKIP
(30, (128, 6))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array as JaxArray

from fedmqtt.choices import find_hapt
from fedmqtt.tasks.base import Task, classification_loss, classification_metrics
from fedmqtt.types import Array

NUM_VOLUNTEERS = 30


def find_data(path: str | os.PathLike[str] | None = None) -> Path:
    """The HAPT file: ``path``, else ``$FEDMQTT_HAPT``, else ``<project root>/../shared/data/<file>``."""
    return find_hapt(path)


class HaptSplit(NamedTuple):
    """Per-volunteer train and test parts, already normalised and filtered to the chosen classes."""

    train: list[tuple[Array, Array]]  # index i: volunteer i + 1, time-ordered first 80 %
    test: list[tuple[Array, Array]]  # index i: volunteer i + 1, time-ordered last 20 %
    mean: Array  # per-channel statistics of the union of the training parts
    std: Array


def load_split(path: str | os.PathLike[str] | None = None, classes: int = 6,
               test_fraction: float = 0.2) -> HaptSplit:
    """Read X, y and client (never the pickled or string arrays) and split each volunteer in time order."""
    if classes not in (6, 12):
        raise ValueError("HAPT has 6 (basic activities) or 12 (with postural transitions) classes")
    with np.load(find_data(path), allow_pickle=False) as f:
        x, y, client = f["X"], f["y"].astype(np.int32), f["client"].astype(np.int32)
    keep = y < classes
    x, y, client = x[keep], y[keep], client[keep]
    train_idx, test_idx = [], []
    for v in range(1, NUM_VOLUNTEERS + 1):
        idx = np.flatnonzero(client == v)  # the file keeps each volunteer's windows in recording order
        cut = round(len(idx) * (1.0 - test_fraction))
        train_idx.append(idx[:cut])
        test_idx.append(idx[cut:])
    train_all = x[np.concatenate(train_idx)]
    mean = train_all.mean(axis=(0, 1), dtype=np.float64).astype(np.float32)  # float64: 1M values per channel
    std = (train_all.std(axis=(0, 1), dtype=np.float64) + 1e-6).astype(np.float32)

    def part(idx: Array) -> tuple[Array, Array]:
        return ((x[idx] - mean) / std).astype(np.float32), y[idx]

    return HaptSplit([part(i) for i in train_idx], [part(i) for i in test_idx], mean, std)


class TemporalConv(nnx.Module):
    """A 'same'-padded 1-D convolution written as im2col + one matmul.

    XLA's CPU backend runs the gradient of ``nnx.Conv`` over a length-128 signal about 10x slower than
    this (0.36 s vs 0.037 s for ten steps of the model below on two cores), and a fleet of 30 agents
    trains on those two cores.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 5, *, rngs: nnx.Rngs) -> None:
        self.kernel = kernel
        self.linear = nnx.Linear(cin * kernel, cout, rngs=rngs)

    def __call__(self, x: JaxArray) -> JaxArray:  # (batch, time, cin) -> (batch, time, cout)
        left = (self.kernel - 1) // 2
        padded = jnp.pad(x, ((0, 0), (left, self.kernel - 1 - left), (0, 0)))
        cols = jnp.concatenate([padded[:, i : i + x.shape[1]] for i in range(self.kernel)], axis=-1)
        return self.linear(cols)


class CNN1D(nnx.Module):
    """Three conv blocks (kernel 5, max-pool 2) over time, global average pool, linear classifier."""

    def __init__(self, channels: int = 6, width: int = 32, classes: int = 6, *, rngs: nnx.Rngs) -> None:
        self.c1 = TemporalConv(channels, width // 2, rngs=rngs)
        self.c2 = TemporalConv(width // 2, width, rngs=rngs)
        self.c3 = TemporalConv(width, width, rngs=rngs)
        self.out = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x: JaxArray) -> JaxArray:  # x: (batch, 128, channels)
        for conv in (self.c1, self.c2, self.c3):
            x = nnx.relu(conv(x))
            x = x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2]).max(axis=2)
        return self.out(jnp.mean(x, axis=1))


def hapt_task(path: str | os.PathLike[str] | None = None, classes: int = 6, seed: int = 0, width: int = 32,
              learning_rate: float = 0.05, local_steps: int = 10, batch_size: int = 32, **_: object) -> Task:
    """The HAPT task with one agent per volunteer (30); ``seed`` only seeds the model's initialisation.

    Extra keyword options (``num_clients``, ``partition``, ...) are accepted and ignored: the partition
    is the natural one.
    """
    split = load_split(path, classes)
    x_te = np.concatenate([x for x, _ in split.test])
    y_te = np.concatenate([y for _, y in split.test])
    del seed  # the model seed comes through make_model(seed)

    return Task(
        name=f"hapt{classes}",
        make_model=lambda s: CNN1D(classes=classes, width=width, rngs=nnx.Rngs(s)),
        loss_fn=classification_loss,
        metrics_fn=classification_metrics,
        client_data=lambda i: split.train[i % NUM_VOLUNTEERS],
        test_data=(x_te, y_te),
        num_clients=NUM_VOLUNTEERS,
        learning_rate=learning_rate,
        batch_size=batch_size,
        local_steps=local_steps,
    )

"""Where an agent's batches come from, and how a data set is split across agents.

An agent accepts either :class:`ArrayData` (arrays it samples mini-batches from) or any async iterator of
batches (a sensor stream); both become E stacked batches per local round through :func:`as_source`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import numpy as np

from fedmqtt.types import Array

Batch = dict[str, Array]


class BatchSource(Protocol):
    """Gives ``steps`` batches stacked on a leading axis, and how many examples the agent holds."""

    async def take(self, steps: int) -> Batch: ...
    @property
    def num_samples(self) -> int: ...


class ArrayData:
    """Random mini-batches (without replacement within an epoch) from in-memory arrays on the device."""

    def __init__(self, x: Array, y: Array, batch_size: int = 32, seed: int = 0) -> None:
        if len(x) != len(y) or len(x) == 0:
            raise ValueError("x and y must be non-empty and of equal length")
        self.x, self.y = np.asarray(x), np.asarray(y)
        self.batch_size = min(batch_size, len(x))
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(x))
        self._pos = 0

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def _indices(self, n: int) -> Array:
        out = []
        while n > 0:
            if self._pos >= len(self._order):
                self._order, self._pos = self._rng.permutation(len(self.x)), 0
            chunk = self._order[self._pos : self._pos + n]
            self._pos += len(chunk)
            n -= len(chunk)
            out.append(chunk)
        return np.concatenate(out)

    def batches(self, steps: int) -> Batch:
        """``steps`` batches stacked on a leading axis, without an event loop (simulations, warm-up)."""
        idx = self._indices(steps * self.batch_size).reshape(steps, self.batch_size)
        return {"x": self.x[idx], "y": self.y[idx]}

    async def take(self, steps: int) -> Batch:
        return self.batches(steps)


class StreamData:
    """Batches pulled from an async iterator (e.g. a sensor feed); counts the examples it has seen."""

    def __init__(self, stream: AsyncIterator[Batch]) -> None:
        self._stream = stream
        self._seen = 0

    @property
    def num_samples(self) -> int:
        return max(self._seen, 1)

    async def take(self, steps: int) -> Batch:
        batches = [await anext(self._stream) for _ in range(steps)]
        self._seen += sum(len(next(iter(b.values()))) for b in batches)
        return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def as_source(data: Any) -> BatchSource:
    """Accept ArrayData/any BatchSource, an ``(x, y)`` tuple, or an async iterator of batches."""
    if hasattr(data, "take") and hasattr(data, "num_samples"):
        return data  # type: ignore[no-any-return]
    if isinstance(data, tuple) and len(data) == 2:
        return ArrayData(*data)
    if hasattr(data, "__anext__"):
        return StreamData(data)
    raise TypeError("data must be ArrayData, an (x, y) tuple, or an async iterator of batches")


def iid_partition(n: int, num_clients: int, seed: int = 0) -> list[Array]:
    """Shuffle ``n`` indices and cut them into ``num_clients`` near-equal shards."""
    return list(np.array_split(np.random.default_rng(seed).permutation(n), num_clients))


def dirichlet_partition(labels: Array, num_clients: int, alpha: float, seed: int = 0,
                        min_size: int = 10) -> list[Array]:
    """Label-skewed shards: for each class, proportions ~ Dirichlet(alpha) across clients (Hsu et al. 2019).

    Smaller ``alpha`` means more skew. Redraws until every client has at least ``min_size`` examples.
    """
    if alpha <= 0:
        raise ValueError("Dirichlet alpha must be > 0")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    min_size = min(min_size, len(labels) // num_clients)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
            for shard, part in zip(shards, np.split(idx, cuts), strict=True):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [rng.permutation(np.array(s, dtype=np.int64)) for s in shards]
    raise ValueError(f"could not give every client {min_size} examples with alpha={alpha}")

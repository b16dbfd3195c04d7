"""An in-process, event-driven simulation of an asynchronous federation, for the privacy and robustness
benchmarks: the same Trainer, tasks and pure strategies as the services, without MQTT, so that many
configurations fit on a two-core machine and every run is reproducible from its seed.

Each agent i has a speed factor fᵢ ~ lognormal(0, sigma_speed); a local round takes fᵢ·(1 + U(0, 0.1)) time
units. When a round ends, the agent's delta (computed from the model version it last fetched) goes to the
strategy with staleness = current version - base version (updates staler than 64 are dropped, as the
aggregator does), then the agent fetches the newest model and starts again.
"""

from __future__ import annotations

import asyncio
import heapq
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np

from fedmqtt.privacy import ClientDP, ClientPrivacy
from fedmqtt.strategies.base import ClientUpdate, Strategy
from fedmqtt.tasks import Task

Attack = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def sign_flip(scale: float) -> Attack:
    """The poisoned update: the honest delta, negated and scaled."""
    return lambda delta: {k: (-scale * v).astype(v.dtype) for k, v in delta.items()}


@dataclass
class Result:
    accuracy: float
    version: int
    applied: int
    dropped: int
    deferred: int
    delta_norm_median: float
    attacker_share: float  # attackers' fraction of all arrivals
    curve: list[tuple[int, float]] = field(default_factory=list)


def simulate(task: Task, strategy: Strategy, *, updates: int, seed: int = 0, sigma_speed: float = 0.75,
             attackers: frozenset[int] = frozenset(), attack: Attack | None = None,
             client_dp: ClientDP | None = None, one_per_buffer: int | None = None, max_staleness: int = 64,
             eval_points: int = 0) -> Result:
    """Run ``updates`` arrivals; returns the final test accuracy of the global model.

    ``one_per_buffer=K`` holds back a second update from the same agent until the buffer of K has been
    emptied (central DP's sensitivity assumes one update per agent per buffer).
    """
    n = task.num_clients
    rng = np.random.default_rng(seed)
    trainer = task.trainer(seed)
    evaluate = task.evaluate_fn(trainer)
    params: dict[str, Any] = {k: jnp.asarray(v) for k, v in trainer.initial.items()}
    state = strategy.init(params)
    version = 0
    data = [task.data_for(i, seed) for i in range(n)]
    speeds = rng.lognormal(0.0, sigma_speed, n) if sigma_speed else np.ones(n)
    dp = [ClientPrivacy(client_dp, str(i)) for i in range(n)] if client_dp else None
    base: list[tuple[int, dict[str, np.ndarray]]] = [(0, trainer.initial)] * n
    queue = [(float(speeds[i] * rng.uniform(1.0, 1.1)), i) for i in range(n)]
    heapq.heapify(queue)
    in_buffer: set[int] = set()
    held: list[tuple[int, dict[str, np.ndarray], int]] = []
    norms: list[float] = []
    applied = dropped = deferred = attacked = 0
    curve: list[tuple[int, float]] = []
    every = max(updates // eval_points, 1) if eval_points else 0

    def accuracy() -> float:
        return float(evaluate({k: np.asarray(v) for k, v in params.items()})["accuracy"])

    def apply(i: int, delta: dict[str, np.ndarray], base_version: int) -> None:
        nonlocal params, state, version, applied, dropped
        staleness = version - base_version
        if staleness > max_staleness:
            dropped += 1
            return
        upd = ClientUpdate({k: jnp.asarray(v) for k, v in delta.items()}, jnp.int32(staleness),
                           jnp.float32(data[i].num_samples))
        params, state, stepped = strategy.apply(params, upd, state)
        applied += 1
        in_buffer.add(i)
        if bool(stepped):
            version += 1
            in_buffer.clear()

    for arrival in range(updates):
        now, i = heapq.heappop(queue)
        base_version, base_params = base[i]
        batches = asyncio.run(data[i].take(task.local_steps))
        new, _ = trainer.train(base_params, batches)
        delta = {k: np.asarray(new[k] - base_params[k], dtype=base_params[k].dtype) for k in new}
        if i in attackers and attack is not None:
            delta = attack(delta)
            attacked += 1
        if dp is not None:
            delta = dp[i](delta)
        if len(norms) < 200 and i not in attackers:
            norms.append(float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2))
                                           for v in delta.values()))))
        if one_per_buffer and i in in_buffer:
            held.append((i, delta, base_version))
            deferred += 1
        else:
            before = version
            apply(i, delta, base_version)
            while version > before and held:  # a new buffer: held updates go in first, once per agent
                before = version
                waiting, held = held, []
                for j, d, b in waiting:
                    (held.append((j, d, b)) if j in in_buffer else apply(j, d, b))
        base[i] = (version, {k: np.asarray(v) for k, v in params.items()})
        heapq.heappush(queue, (now + float(speeds[i] * rng.uniform(1.0, 1.1)), i))
        if every and (arrival + 1) % every == 0:
            curve.append((arrival + 1, accuracy()))
    return Result(accuracy(), version, applied, dropped, deferred, statistics.median(norms) if norms else 0.0,
                  attacked / updates, curve)


def median(values: list[float]) -> float:
    return float(statistics.median(values))

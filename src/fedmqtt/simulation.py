"""An asynchronous federation in simulated time, through the aggregator's own core: for benchmarks with many
configurations and for learning tests that must not depend on wall-clock timing.

Each agent i has a speed factor fᵢ ~ lognormal(0, sigma_speed); a local round takes fᵢ·(1 + U(0, 0.1)) time
units, all drawn from ``seed``, so the arrival order is the same in every run. When a round ends, the agent's
update is encoded as on the wire (codec.encode_update) and handed to ``core.receive`` exactly as the
aggregator service would (validation, staleness bound, de-duplication, one update per step, the strategy);
then the agent takes the newest model and starts again. In sync mode (FedAvg) an agent trains once per
version, as the real agent does, and a round is flushed after ``round_size`` updates (default: every agent).
No MQTT, no threads, no clocks.

>>> from fedmqtt.strategies import fedbuff
>>> from fedmqtt.tasks import get_task
>>> r = simulate(get_task("digits", num_clients=4, seed=0), fedbuff(2), updates=8)
>>> r.applied, r.version
(8, 4)
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmqtt import codec, core
from fedmqtt.attacks import Attack, Collusion, attack_success
from fedmqtt.compression import Compression, Compressor
from fedmqtt.core import Limits
from fedmqtt.data import ArrayData
from fedmqtt.privacy import ClientDP, ClientPrivacy
from fedmqtt.strategies.base import Strategy
from fedmqtt.tasks import Task


@dataclass
class Result:
    accuracy: float
    version: int
    applied: int
    dropped: int  # rejected (stale, norm, ...) by the core
    deferred: int  # held for a later step (one update per agent per step)
    delta_norm_median: float  # of honest deltas
    attacker_share: float  # attackers' fraction of all arrivals
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (arrivals, accuracy)
    uplink_bytes: int = 0  # every update payload, as encoded
    attack_success: float | None = None  # a backdoor's success rate on the final model
    privacy: dict[str, Any] = field(default_factory=dict)  # a DP strategy's report, as in the metrics


def simulate(task: Task, strategy: Strategy, *, updates: int, seed: int = 0, sigma_speed: float = 0.75,
             attackers: frozenset[int] = frozenset(), attack: Attack | None = None,
             client_dp: ClientDP | None = None, limits: Limits | None = None, eval_points: int = 0,
             round_size: int | None = None, prox_rho: float = 0.0,
             compression: Compression | None = None) -> Result:
    """Run ``updates`` arrivals through the core; returns the final test accuracy and counts."""
    n = task.num_clients
    rng = np.random.default_rng(seed)
    trainer = task.trainer(seed, prox_rho=prox_rho)
    evaluate = task.evaluate_fn(trainer)
    rules = core.rules(strategy, trainer.initial, limits or Limits(max_staleness=64, max_update_norm=None))
    state = core.init(rules, trainer.initial, epoch="sim")
    data = [task.data_for(i, seed) for i in range(n)]
    collusion = Collusion()
    sends = {i: attack.attacker(i, collusion) for i in attackers} if attack is not None else {}
    if attack is not None and attack.data is not None:
        for i in attackers:
            data[i] = ArrayData(*attack.examples(data[i].x, data[i].y), batch_size=task.batch_size, seed=seed + i)
    speeds = rng.lognormal(0.0, sigma_speed, n) if sigma_speed else np.ones(n)
    dp = [ClientPrivacy(client_dp, str(i)) for i in range(n)] if client_dp else None
    compressors = [Compressor(compression, np.random.default_rng([seed, i, 0xC0])) for i in range(n)
                   ] if compression is not None and compression.method != "none" else None
    uplink = 0  # update bytes as encoded
    base: list[tuple[int, dict[str, Any]]] = [(0, trainer.initial)] * n
    queue = [(float(speeds[i] * rng.uniform(1.0, 1.1)), i) for i in range(n)]
    heapq.heapify(queue)
    norms: list[float] = []
    applied = deferred = attacked = 0
    curve: list[tuple[int, float]] = []
    every = max(updates // eval_points, 1) if eval_points else 0
    sync = strategy.mode == "sync"
    round_size = round_size or n
    waiting: list[int] = []  # sync: agents that sent for this version, waiting for the next

    def accuracy() -> float:
        return float(evaluate({k: np.asarray(v) for k, v in state.params.items()})["accuracy"])

    arrival = 0
    while arrival < updates:
        now, i = heapq.heappop(queue)
        base_version, base_params = base[i]
        new, _ = trainer.train(base_params, data[i].batches(task.local_steps))
        delta = {k: np.asarray(new[k] - base_params[k], dtype=base_params[k].dtype) for k in new}
        if i in sends:
            delta = sends[i](delta)
            attacked += 1
        if dp is not None:
            delta = dp[i](delta)
        if len(norms) < 200 and i not in attackers:
            norms.append(float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))))
        agent, update_id = f"sim-{i}", f"u{arrival}"
        extra: dict[str, str] = {}
        if compressors is not None:
            sent = compressors[i](delta)
            delta, extra = sent.tensors, sent.metadata
        payload = codec.encode_update(delta, agent=agent, update_id=update_id, base_version=base_version,
                                      num_samples=data[i].num_samples, model_fingerprint=rules.reference.fingerprint,
                                      extra=extra)
        uplink += len(payload)
        state, effects = core.receive(state, agent, payload, rules)
        applied += sum(r.accepted for r in effects.replies)
        deferred += not any(r.update_id == update_id for r in effects.replies)
        if sync and (state.counters.since_step >= round_size or not queue):  # full, or everyone waits
            state, _ = core.flush(state, rules)
            params = {k: np.asarray(v) for k, v in state.params.items()}
            for j in [*waiting, i]:  # the new version is out: everyone starts a round on it
                base[j] = (state.version, params)
                heapq.heappush(queue, (now + float(speeds[j] * rng.uniform(1.0, 1.1)), j))
            waiting.clear()
        elif sync:
            waiting.append(i)  # trains once per version
        else:
            base[i] = (state.version, {k: np.asarray(v) for k, v in state.params.items()})
            heapq.heappush(queue, (now + float(speeds[i] * rng.uniform(1.0, 1.1)), i))
        arrival += 1
        if every and arrival % every == 0:
            curve.append((arrival, accuracy()))
    rejected = dict(state.counters.rejected)
    final = {k: np.asarray(v) for k, v in state.params.items()}
    success = attack_success(trainer, final, task.test_data, attack) if attack is not None else None
    report = dict(strategy.report(state.strategy, state.gate.most_taken())) if strategy.report else {}
    return Result(accuracy(), state.version, applied, sum(rejected.values()), deferred,
                  statistics.median(norms) if norms else 0.0, attacked / updates, rejected, curve, uplink,
                  success, report)

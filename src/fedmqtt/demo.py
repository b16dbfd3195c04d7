"""One command that shows a federation learning: a broker, the aggregator and N agents of uneven speed.

``asyncio.run(run_demo(agents=8, seconds=60))`` from Python; ``fedmqtt demo`` from the shell.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.broker import local_broker
from fedmqtt.core import Timing
from fedmqtt.fleet import Fleet, FleetConfig
from fedmqtt.schemas import Metrics
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import get_task
from fedmqtt.transport import BrokerConfig, mqtt_connector


@dataclass(frozen=True)
class DemoResult:
    version: int
    accepted: int
    rejected: int
    accuracy: float
    broker: str
    strategy: str
    agents: int
    seconds: float
    updates_sent: int
    rejected_by_reason: dict[str, int]
    staleness_mean: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def run_demo(
    agents: int = 8,
    seconds: float = 60.0,
    broker: str = "auto",
    strategy: str = "fedasync",
    task: str = "digits",
    partition: str = "iid",
    alpha: float = 0.5,
    base_seconds: float = 0.2,
    sigma: float = 0.75,
    seed: int = 0,
    on_progress: Callable[[float, Metrics], None] | None = None,
    strategy_options: dict[str, Any] | None = None,
) -> DemoResult:
    """Run the demo for ``seconds``; ``broker`` is auto, mosquitto, embedded or an mqtt:// URL."""
    t = get_task(task, num_clients=agents, partition=partition, alpha=alpha, seed=seed) if task == "digits" \
        else get_task(task, seed=seed)
    strat = make(strategy, **(strategy_options or {}))
    if broker.startswith(("mqtt://", "mqtts://")):
        return await _run(BrokerConfig.from_url(broker), "external", t, strat, agents, seconds, base_seconds,
                          sigma, seed, on_progress)
    async with local_broker(broker) as b:  # type: ignore[arg-type]
        return await _run(b.config, b.kind, t, strat, agents, seconds, base_seconds, sigma, seed, on_progress)


async def _run(cfg: BrokerConfig, kind: str, task: Any, strategy: Any, agents: int, seconds: float,
               base_seconds: float, sigma: float, seed: int,
               on_progress: Callable[[float, Metrics], None] | None) -> DemoResult:
    connect = mqtt_connector(cfg)
    evaluator = task.trainer(seed)
    evaluate = task.evaluate_fn(evaluator)
    agg_cfg = AggregatorConfig(timing=Timing(round_size=agents if strategy.mode == "sync" else None,
                                             round_deadline=30.0))
    async with Aggregator(connect, evaluator.initial, strategy, agg_cfg, evaluate=evaluate) as agg:
        await agg.wait_connected()
        fleet_cfg = FleetConfig(agents=agents, base_seconds=base_seconds, sigma=sigma, seed=seed)
        started = time.monotonic()
        async with Fleet(connect, task, fleet_cfg) as fleet:
            while (elapsed := time.monotonic() - started) < seconds:
                await asyncio.sleep(min(1.0, max(seconds - elapsed, 0.0)))
                if on_progress:
                    on_progress(time.monotonic() - started, agg.metrics())
            sent = fleet.updates_sent
        final = evaluate(agg.numpy_params())
        m = agg.metrics()
    return DemoResult(version=m.version, accepted=m.accepted, rejected=m.rejected,
                      accuracy=round(float(final["accuracy"]), 4), broker=kind, strategy=strategy.name,
                      agents=agents, seconds=round(time.monotonic() - started, 1), updates_sent=sent,
                      rejected_by_reason=m.rejected_by_reason, staleness_mean=m.staleness_mean)

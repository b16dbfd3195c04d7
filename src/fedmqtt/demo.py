"""One command that shows a federation learning: a broker, the aggregator and N agents of uneven speed.

``asyncio.run(run_demo(agents=8, seconds=60))`` from Python; ``fedmqtt demo`` from the shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmqtt import model_file
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
    interrupted: bool = False  # stopped before ``seconds`` had passed
    per_agent: list[dict[str, Any]] = field(default_factory=list)  # id, seconds per round, sent, acks

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
    on_start: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    save_model: str | Path | None = None,
) -> DemoResult:
    """Run the demo for ``seconds``, or until ``stop`` is set (the result then says ``interrupted``);
    ``broker`` is auto, mosquitto, embedded or an mqtt:// URL. ``on_start`` hears where the broker is."""
    t = get_task(task, num_clients=agents, partition=partition, alpha=alpha, seed=seed) if task == "digits" \
        else get_task(task, seed=seed)
    strat = make(strategy, **(strategy_options or {}))
    run = _Run(t, strat, agents, seconds, base_seconds, sigma, seed, on_progress, stop or asyncio.Event(),
               save_model)
    if broker.startswith(("mqtt://", "mqtts://")):
        if on_start:
            on_start(f"the broker at {broker}")
        return await run(BrokerConfig.from_url(broker), "external")
    async with local_broker(broker) as b:  # type: ignore[arg-type]
        if on_start:
            on_start(f"a {b.kind} broker of its own at {b.url}")
        return await run(b.config, b.kind)


@dataclass
class _Run:
    task: Any
    strategy: Any
    agents: int
    seconds: float
    base_seconds: float
    sigma: float
    seed: int
    on_progress: Callable[[float, Metrics], None] | None
    stop: asyncio.Event
    save_model: str | Path | None

    async def __call__(self, cfg: BrokerConfig, kind: str) -> DemoResult:
        """The aggregator and the fleet on the broker at ``cfg``, until ``seconds`` or ``stop``."""
        task, strategy, agents, seconds, seed = self.task, self.strategy, self.agents, self.seconds, self.seed
        connect = mqtt_connector(cfg)
        evaluator = task.trainer(seed)
        evaluate = task.evaluate_fn(evaluator)
        agg_cfg = AggregatorConfig(timing=Timing(round_size=agents if strategy.mode == "sync" else None,
                                                 round_deadline=30.0))
        async with Aggregator(connect, evaluator.initial, strategy, agg_cfg, evaluate=evaluate) as agg:
            await agg.wait_connected()
            fleet_cfg = FleetConfig(agents=agents, base_seconds=self.base_seconds, sigma=self.sigma, seed=seed)
            started = time.monotonic()
            async with Fleet(connect, task, fleet_cfg) as fleet:
                while (elapsed := time.monotonic() - started) < seconds and not self.stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), min(1.0, max(seconds - elapsed, 0.0)))
                    if self.on_progress:
                        self.on_progress(time.monotonic() - started, agg.metrics())
                sent = fleet.updates_sent
                per_agent = [{"agent": a.agent_id, "seconds_per_round": round(self.base_seconds * f, 3),
                              "sent": a.updates_sent, **a.acks}
                             for a, f in zip(fleet.agents, fleet.factors, strict=True)]
            params = agg.numpy_params()
            final = evaluate(params)
            m = agg.metrics()
            if self.save_model is not None:
                model_file.save(self.save_model, params, agg.version, agg.state.epoch)
        return DemoResult(version=m.version, accepted=m.accepted, rejected=m.rejected,
                          accuracy=round(float(final["accuracy"]), 4), broker=kind, strategy=strategy.name,
                          agents=agents, seconds=round(time.monotonic() - started, 1), updates_sent=sent,
                          rejected_by_reason=m.rejected_by_reason, staleness_mean=m.staleness_mean,
                          interrupted=self.stop.is_set(), per_agent=per_agent)

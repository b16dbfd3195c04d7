"""Many edge agents in one process, each with its own MQTT connection, its own speed and, optionally, churn.

Agent i pads each local round to ``base_seconds × fᵢ`` with fᵢ drawn from a seeded lognormal(0, σ), so a
fleet with σ = 1 has devices several times slower than others, as real fleets do.

Churn (``mean_online`` set): each agent stays online for an exponentially distributed time (mean
``mean_online`` seconds), leaves cleanly (its retained status says offline; an update it was training is
lost with it), stays away for an exponential time (mean ``mean_offline``), and comes back as a fresh
process would: new connection, empty outbox, the same data. Every draw is seeded from ``seed`` and the
agent index, so two runs with the same config see the same schedule.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Self

import numpy as np

from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.schemas import Ack
from fedmqtt.service import Loop, Service
from fedmqtt.tasks import Task
from fedmqtt.training import Trainer
from fedmqtt.transport import Connector


def _take_sync(data: Any, steps: int) -> Any:
    """``data.take`` of an ArrayData without awaiting (it never suspends)."""
    coro = data.take(steps)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("this data source suspends; warm up outside the event loop")


def speed_factors(n: int, sigma: float, seed: int = 0) -> list[float]:
    """fᵢ ~ lognormal(0, σ), seeded; σ = 0 gives every agent factor 1."""
    if sigma == 0:
        return [1.0] * n
    return [float(f) for f in np.random.default_rng(seed).lognormal(0.0, sigma, size=n)]


@dataclass(frozen=True)
class FleetConfig:
    agents: int = 8
    base_seconds: float = 0.2
    sigma: float = 0.75
    seed: int = 0
    prox_rho: float = 0.0
    agent: AgentConfig = field(default_factory=AgentConfig)
    id_prefix: str = "edge-"
    local_steps: int | None = None  # E per local round; None: the task's own (overrides agent.local_steps)
    mean_online: float | None = None  # churn: mean seconds online between departures; None: always online
    mean_offline: float = 5.0  # churn: mean seconds away before coming back
    share_trainer: bool = True  # one compiled Trainer for every agent (same model; saves N compilations)

    def conditions(self) -> dict[str, Any]:
        """Every setting as plain JSON values, for result files."""
        out = asdict(self)
        out["agent"] = {k: (str(v) if not isinstance(v, int | float | str | bool | type(None)) else v)
                        for k, v in out["agent"].items()}
        return out


class Fleet(Service):
    """``async with Fleet(connect, task, cfg) as fleet:`` runs the agents until the block ends."""

    stop_grace = 30.0  # each slot closes its agent cleanly (an "offline" status) when the fleet stops

    def __init__(self, connect: Connector | Sequence[Connector], task: Task, config: FleetConfig | None = None,
                 on_ack: Callable[[str, Ack], None] | None = None) -> None:
        """``connect`` is one connector for every agent, or one per agent (agent i uses ``connect[i]``: each
        behind its own emulated link, say)."""
        self.config = cfg = config or FleetConfig()
        super().__init__("fleet")
        self._agents_connect = list(connect) if isinstance(connect, Sequence) else [connect] * cfg.agents
        self.task = task
        self._on_ack = on_ack
        self.factors = speed_factors(cfg.agents, cfg.sigma, cfg.seed)
        shared = task.trainer(cfg.seed, prox_rho=cfg.prox_rho) if cfg.share_trainer else None
        self._trainers: list[Trainer] = [shared or task.trainer(cfg.seed, prox_rho=cfg.prox_rho)
                                         for _ in range(cfg.agents)]
        self._data = [task.data_for(i, cfg.seed) for i in range(cfg.agents)]
        steps = cfg.local_steps if cfg.local_steps is not None else task.local_steps
        self._agent_cfgs = [replace(cfg.agent, round_seconds=cfg.base_seconds * f, local_steps=steps)
                            for f in self.factors]
        self.agents: list[EdgeAgent] = [self._new_agent(i) for i in range(cfg.agents)]
        self.retired_sent = 0  # updates sent by incarnations that churned away
        self.retired_acks: dict[str, int] = {"accepted": 0, "rejected": 0}
        self.departures = 0
        self.departed: set[int] = set()  # slots whose agent left at least once
        self._retired_accepted_after_return = 0  # accepted from incarnations after a departure, since retired
        self.offline_seconds = 0.0
        self._started = [asyncio.Event() for _ in self.agents]

    def _new_agent(self, i: int) -> EdgeAgent:
        agent_id = f"{self.config.id_prefix}{i}"
        on_ack = self._on_ack
        callback = (lambda ack, a=agent_id: on_ack(a, ack)) if on_ack else None
        return EdgeAgent(self._agents_connect[i], agent_id, self._trainers[i], self._data[i], self._agent_cfgs[i],
                         on_ack=callback)

    def warm_up(self) -> None:
        """Compile every distinct Trainer once (one local round on throw-away state), so a benchmark's clock
        does not start with N agents waiting on the JIT."""
        done: set[int] = set()
        for i, trainer in enumerate(self._trainers):
            if id(trainer) in done:
                continue
            done.add(id(trainer))
            data = self.task.data_for(i, self.config.seed)  # a copy: the agent's own sampling order is kept
            trainer.train(trainer.initial, _take_sync(data, self._agent_cfgs[i].local_steps))

    def loops(self) -> dict[str, Loop]:
        return {self.agents[i].agent_id: self._slot(i) for i in range(len(self.agents))}

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        for started in self._started:
            await asyncio.wait_for(started.wait(), 30.0)
        return self

    async def _slot(self, i: int) -> None:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, i, 0xC4])
        first = True
        while True:
            agent = self.agents[i]
            async with agent:
                if first:
                    self._started[i].set()
                    first = False
                online = float(rng.exponential(cfg.mean_online)) if cfg.mean_online else None
                if await self.sleep(online):
                    return
            self.departures += 1
            if i in self.departed:  # this incarnation was itself a return
                self._retired_accepted_after_return += agent.acks["accepted"]
            self.departed.add(i)
            self.retired_sent += agent.updates_sent
            for k, v in agent.acks.items():
                self.retired_acks[k] = self.retired_acks.get(k, 0) + v
            self.agents[i] = self._new_agent(i)  # not connected until the absence ends
            away = float(rng.exponential(cfg.mean_offline))
            started = time.monotonic()
            closing = await self.sleep(away)
            self.offline_seconds += time.monotonic() - started
            if closing:
                return

    @property
    def accepted_after_return(self) -> int:
        """Updates accepted from agents that had left and come back (their later incarnations)."""
        return self._retired_accepted_after_return + sum(self.agents[i].acks["accepted"] for i in self.departed)

    @property
    def updates_sent(self) -> int:
        return self.retired_sent + sum(a.updates_sent for a in self.agents)

    @property
    def acks(self) -> dict[str, int]:
        out = dict(self.retired_acks)
        for a in self.agents:
            for k, v in a.acks.items():
                out[k] = out.get(k, 0) + v
        return out

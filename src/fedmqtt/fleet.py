"""Many edge agents in one process, each with its own MQTT connection and its own speed.

Agent i pads each local round to ``base_seconds × fᵢ`` with fᵢ drawn from a seeded lognormal(0, σ), so a
fleet with σ = 1 has devices several times slower than others, as real fleets do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Self

import numpy as np

from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.schemas import Ack
from fedmqtt.tasks import Task
from fedmqtt.transport import Connector


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


class Fleet:
    """``async with Fleet(connect, task, cfg) as fleet:`` runs the agents until the block ends."""

    def __init__(self, connect: Connector, task: Task, config: FleetConfig | None = None,
                 on_ack: Callable[[str, Ack], None] | None = None) -> None:
        self.config = cfg = config or FleetConfig()
        self.task = task
        self.factors = speed_factors(cfg.agents, cfg.sigma, cfg.seed)
        self.agents: list[EdgeAgent] = []
        for i, f in enumerate(self.factors):
            agent_id = f"{cfg.id_prefix}{i}"
            acfg = replace(cfg.agent, round_seconds=cfg.base_seconds * f)
            callback = (lambda ack, a=agent_id: on_ack(a, ack)) if on_ack else None
            self.agents.append(EdgeAgent(connect, agent_id, task.trainer(cfg.seed, prox_rho=cfg.prox_rho),
                                         task.data_for(i, cfg.seed), acfg, on_ack=callback))
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        await self._stack.__aenter__()
        for agent in self.agents:
            await self._stack.enter_async_context(agent)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._stack.__aexit__(et, e, tb)

    @property
    def updates_sent(self) -> int:
        return sum(a.updates_sent for a in self.agents)

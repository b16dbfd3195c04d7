"""Many edge agents in one process, each with its own MQTT connection, its own speed and, optionally, churn.

Agent i pads each local round to ``base_seconds × fᵢ`` with fᵢ drawn from a seeded lognormal(0, σ), so a
fleet with σ = 1 has devices several times slower than others, as real fleets do.

Churn (``mean_online`` set): each agent stays online for an exponentially distributed time (mean
``mean_online`` seconds), leaves cleanly (its retained status says offline; an update it was training is
lost with it), stays away for an exponential time (mean ``mean_offline``), and comes back as a fresh
process would: new connection, empty outbox, the same data. Every draw is seeded from ``seed`` and the
agent index, so two runs with the same config see the same schedule.

Several federations (protocol 1.1): give the fleet several tasks by name (``Fleet(connect, {"digits-a": a,
"digits-b": b}, FleetConfig(federations={"fed-a": "digits-a", "fed-b": "digits-b"}, holdings=(("digits-a",),
("digits-b",))))``). Each agent holds the tasks of ``holdings`` (agent i: ``holdings[i % len]``), starts in the
federation of its first one, advertises its capabilities and follows a coordinator's assignments; when one
moves it to another federation, its slot starts a new agent there with that task's trainer and data. The
aggregators and the coordinator run next to the fleet (tests/test_agent_allocation.py shows the whole set).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Self

import numpy as np

from fedmqtt.agent import AgentConfig, AllocationConfig, EdgeAgent
from fedmqtt.agent_allocation import moved_config
from fedmqtt.data import ArrayData
from fedmqtt.schemas import Ack
from fedmqtt.service import Loop, Service, first
from fedmqtt.tasks import Task
from fedmqtt.topics import Topics
from fedmqtt.training import Trainer
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
    local_steps: int | None = None  # E per local round; None: the task's own (overrides agent.local_steps)
    mean_online: float | None = None  # churn: mean seconds online between departures; None: always online
    mean_offline: float = 5.0  # churn: mean seconds away before coming back
    share_trainer: bool = True  # one compiled Trainer for every agent (same model; saves N compilations)
    # several federations: federation -> the task (by name) it runs; agents start in their first task's
    federations: Mapping[str, str] = field(default_factory=dict)
    holdings: tuple[tuple[str, ...], ...] = ()  # tasks held by agent i: holdings[i % len]; empty: every task
    tags: tuple[Mapping[str, str], ...] = ()  # tags advertised by agent i: tags[i % len]

    def conditions(self) -> dict[str, Any]:
        """Every setting as plain JSON values, for result files."""
        out = asdict(self)
        out["agent"] = {k: (str(v) if not isinstance(v, int | float | str | bool | type(None)) else v)
                        for k, v in out["agent"].items()}
        return out


class Fleet(Service):
    """``async with Fleet(connect, task, cfg) as fleet:`` runs the agents until the block ends."""

    stop_grace = 30.0  # each slot closes its agent cleanly (an "offline" status) when the fleet stops

    def __init__(self, connect: Connector | Sequence[Connector], task: Task | Mapping[str, Task],
                 config: FleetConfig | None = None, on_ack: Callable[[str, Ack], None] | None = None) -> None:
        """``connect`` is one connector for every agent, or one per agent (agent i uses ``connect[i]``: each
        behind its own emulated link, say). ``task``: one task, or several by name (several federations)."""
        self.config = cfg = config or FleetConfig()
        super().__init__("fleet")
        self._agents_connect = list(connect) if isinstance(connect, Sequence) else [connect] * cfg.agents
        alloc = cfg.agent.allocation
        self.tasks = dict(task) if isinstance(task, Mapping) else {alloc.task if alloc else task.name: task}
        self.task = next(iter(self.tasks.values()))
        self._on_ack = on_ack
        self.factors = speed_factors(cfg.agents, cfg.sigma, cfg.seed)
        self._trainers: dict[tuple[str, int], Trainer] = {}
        self._data: dict[tuple[str, int], ArrayData] = {}
        self._agent_cfgs = [self._agent_config(i, f) for i, f in enumerate(self.factors)]
        self.agents: list[EdgeAgent] = [self._new_agent(i) for i in range(cfg.agents)]
        self.moves = 0  # agents that moved to another federation (assigned there)
        self.retired_sent = 0  # updates sent by incarnations that churned away or moved
        self.retired_acks: dict[str, int] = {"accepted": 0, "rejected": 0}
        self.departures = 0
        self.departed: set[int] = set()  # slots whose agent left at least once
        self._retired_accepted_after_return = 0  # accepted from incarnations after a departure, since retired
        self.offline_seconds = 0.0
        self._started = [asyncio.Event() for _ in self.agents]

    def _agent_config(self, i: int, factor: float) -> AgentConfig:
        """Agent i's settings: its speed; with several tasks or federations, its tasks and where it starts."""
        cfg = self.config
        several = len(self.tasks) > 1 or bool(cfg.federations)
        if not several and cfg.agent.allocation is None:  # one federation, no allocation: as configured
            return replace(cfg.agent, round_seconds=cfg.base_seconds * factor, local_steps=self._steps(self.task))
        held = cfg.holdings[i % len(cfg.holdings)] if cfg.holdings else tuple(self.tasks)
        tags = dict(cfg.tags[i % len(cfg.tags)]) if cfg.tags else {}
        template = cfg.agent.allocation or AllocationConfig(held[0])
        alloc = replace(template, task=held[0], tasks=held[1:], tags={**template.tags, **tags})
        topics = cfg.agent.topics
        if several:
            start = next((f for f, t in cfg.federations.items() if t == held[0]), None)
            if start is None:
                raise ValueError(f"agent {i}: no federation runs its task {held[0]!r}")
            topics = Topics(topics.prefix, start)
        return replace(cfg.agent, round_seconds=cfg.base_seconds * factor, topics=topics, allocation=alloc,
                       local_steps=self._steps(self.tasks[held[0]]))

    def _steps(self, task: Task) -> int:
        return self.config.local_steps if self.config.local_steps is not None else task.local_steps

    def _task_name(self, i: int) -> str:
        alloc = self._agent_cfgs[i].allocation
        return alloc.task if alloc is not None else next(iter(self.tasks))

    def _trainer(self, name: str, i: int) -> Trainer:
        key = (name, -1 if self.config.share_trainer else i)
        if key not in self._trainers:
            self._trainers[key] = self.tasks[name].trainer(self.config.seed, prox_rho=self.config.prox_rho)
        return self._trainers[key]

    def _new_agent(self, i: int) -> EdgeAgent:
        agent_id = f"{self.config.id_prefix}{i}"
        on_ack = self._on_ack
        callback = (lambda ack, a=agent_id: on_ack(a, ack)) if on_ack else None
        name = self._task_name(i)
        if (name, i) not in self._data:  # kept across incarnations: an agent that comes back has the same data
            self._data[name, i] = self.tasks[name].data_for(i, self.config.seed)
        return EdgeAgent(self._agents_connect[i], agent_id, self._trainer(name, i), self._data[name, i],
                         self._agent_cfgs[i], on_ack=callback)

    def warm_up(self) -> None:
        """Compile every distinct Trainer once (one local round on throw-away state), so a benchmark's clock
        does not start with N agents waiting on the JIT."""
        done: set[int] = set()
        for i in range(len(self.agents)):
            name = self._task_name(i)
            trainer = self._trainer(name, i)
            if id(trainer) in done:
                continue
            done.add(id(trainer))
            data = self.tasks[name].data_for(i, self.config.seed)  # a copy: the agent's sampling order is kept
            trainer.train(trainer.initial, data.batches(self._agent_cfgs[i].local_steps))

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
        first, moved = True, False
        online: float | None = None
        while True:
            agent = self.agents[i]
            async with agent:
                if first:
                    self._started[i].set()
                    first = False
                if not moved:  # a moved agent keeps what was left of its time online
                    online = float(rng.exponential(cfg.mean_online)) if cfg.mean_online else None
                moved = False
                started = time.monotonic()
                if await self._serve(agent, online):
                    return
            if i in self.departed:  # this incarnation was itself a return
                self._retired_accepted_after_return += agent.acks["accepted"]
            self.retired_sent += agent.updates_sent
            for k, v in agent.acks.items():
                self.retired_acks[k] = self.retired_acks.get(k, 0) + v
            if agent.reassigned is not None:  # a new agent on the federation it is assigned to
                self.moves += 1
                there = moved_config(self._agent_cfgs[i], agent.reassigned)
                self._agent_cfgs[i] = replace(there, local_steps=self._steps(self.tasks[agent.reassigned.task]))
                self.agents[i] = self._new_agent(i)
                moved = True
                if online is not None:
                    online = max(online - (time.monotonic() - started), 0.0)
                continue
            online = None
            self.departures += 1
            self.departed.add(i)
            self.agents[i] = self._new_agent(i)  # not connected until the absence ends
            away = float(rng.exponential(cfg.mean_offline))
            started = time.monotonic()
            closing = await self.sleep(away)
            self.offline_seconds += time.monotonic() - started
            if closing:
                return

    async def _serve(self, agent: EdgeAgent, seconds: float | None) -> bool:
        """Until the fleet stops (True), ``seconds`` pass, or the agent ends its run (it was moved)."""
        await first(self.stopping(), agent.stopping(), *([asyncio.sleep(seconds)] if seconds is not None else []))
        return self._stop.is_set()

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

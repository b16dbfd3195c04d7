"""An edge agent's part in capability-based allocation (protocol 1.1, docs/protocol.md 10): what it advertises
and which assignment it follows. The agent holds one :class:`AgentAllocation` when its config has
``allocation`` set, and calls it at a few points: the status (``capabilities``), the assignment topic
(``offer``), before each local round (``settings``, ``participate``), after each round (``round_done``) and
each publish (``published``); ``due`` says when to republish the status (power source or loss changed).

No I/O of its own (the probe runs the trainer it is given; the power reader is injectable): the agent moves
the bytes. An assignment to another federation or task is not followed in place: it sets ``reassigned``, and
whoever runs the agent (``fedmqtt edge``, the fleet) starts a new agent there (:func:`moved_config`).

Speed is what a round takes, start to end: a device whose rounds are padded to emulate a slower one
(``round_seconds``) advertises the emulated speed, not the host's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sized
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from fedmqtt.agent_config import AgentConfig, AllocationConfig
from fedmqtt.allocation_schemas import capabilities_json
from fedmqtt.assignment import AssignmentFollower, Defaults, Settings
from fedmqtt.capabilities import Compute, ComputeEstimator, LinkEstimator, Power, measure, probe_compute
from fedmqtt.compression import Compressor
from fedmqtt.data import ArrayData, BatchSource
from fedmqtt.topics import Topics
from fedmqtt.training import Trainer

log = logging.getLogger("fedmqtt.agent")


class Host(Protocol):
    """What :meth:`AgentAllocation.serve` needs of its agent (an :class:`~fedmqtt.agent.EdgeAgent`)."""

    @property
    def agent_id(self) -> str: ...
    @property
    def last_loss(self) -> float | None: ...
    @property
    def outbox(self) -> Sized: ...

    async def wait_until(self, done: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None: ...
    async def advertise(self) -> None: ...
    def stop(self) -> None: ...


class AgentAllocation:
    """Capabilities and the assignment of one agent on ``topics`` (its current federation)."""

    def __init__(self, agent_id: str, config: AgentConfig, examples: int, batch_size: int | None) -> None:
        assert config.allocation is not None
        self.config: AllocationConfig = config.allocation
        self.topics = config.topics
        self.examples = examples
        defaults = Defaults(config.topics.federation, self.config.task, config.local_steps, batch_size,
                            config.compression)
        self.follower = (AssignmentFollower(agent_id, defaults, tasks=self.config.held, prefix=config.topics.prefix)
                         if self.config.follow else None)
        self.defaults = defaults
        self.link = LinkEstimator()
        self.compute: ComputeEstimator | None = None
        self.power: Power = self.config.read_power()
        self.reassigned: Settings | None = None  # an assignment elsewhere: the agent ends its run
        self.last_round = 1.0  # seconds the last local round took (a round sat out waits this long)
        self._advertised: tuple[str, float | None] | None = None  # (power source, loss) of the last status
        self._advertised_at = -math.inf

    # ---- what the agent advertises ------------------------------------------------------------------------
    async def probe(self, trainer: Trainer, data: BatchSource, steps: int, round_seconds: float) -> None:
        """Time the agent's own training round (in a worker thread). A round padded to ``round_seconds``
        counts as that long."""
        batches = await data.take(steps)
        init, size = trainer.initial, batch_size_of(batches)
        c = await asyncio.to_thread(probe_compute, lambda: trainer.train(init, batches), steps, size, 2)
        seconds = max(steps / c.steps_per_s, round_seconds)
        self.compute = ComputeEstimator(Compute(steps / seconds, size))
        self.last_round = seconds

    def capabilities(self, loss: float | None) -> dict[str, Any]:
        """The status's ``capabilities`` object, as of now."""
        compute = self.compute.current if self.compute is not None else None
        caps = measure(compute, self.link, self.examples, self.config.held, self.config.tags, loss, power=self.power)
        return capabilities_json(caps)

    def due(self, loss: float | None, now: float) -> bool:
        """Read the power source; True when the status should be republished now: at once when the power
        source changed since the last status (the coordinator should know within seconds), for a new loss
        only once the last status is ``refresh`` seconds old."""
        self.power = self.config.read_power()
        if self._advertised is None or self._advertised[0] != self.power.source:
            return True
        return self._advertised[1] != loss and now - self._advertised_at >= self.config.refresh

    def advertised(self, loss: float | None, now: float) -> None:
        """A status with capabilities went out."""
        self._advertised, self._advertised_at = (self.power.source, loss), now

    # ---- what it measures ---------------------------------------------------------------------------------
    def round_done(self, steps: int, seconds: float, batch_size: int | None) -> None:
        """One local round of ``steps`` steps took ``seconds`` (start to end, padding included)."""
        self.last_round = seconds
        if self.compute is None:
            self.compute = ComputeEstimator(Compute(steps / max(seconds, 1e-9), batch_size or 1))
        else:
            self.compute.observe(steps, seconds, batch_size)

    def published(self, nbytes: int, seconds: float) -> None:
        """A QoS 1 publish of ``nbytes`` took ``seconds`` to its PUBACK."""
        self.link.observe(nbytes, seconds)

    # ---- what it follows ----------------------------------------------------------------------------------
    @property
    def topic(self) -> str | None:
        """The assignment topic to subscribe to (None: not following)."""
        return self.follower.topic if self.follower is not None else None

    @property
    def settings(self) -> Settings:
        if self.follower is None:
            d = self.defaults
            return Settings(d.federation, d.task, d.local_steps, d.batch_size, 1.0, d.compression, False)
        return self.follower.settings

    def offer(self, payload: bytes) -> bool:
        """An assignment message; True when the settings changed. An assignment to another federation or
        task sets ``reassigned`` (the agent then ends its run)."""
        if self.follower is None or not self.follower.offer(payload):
            return False
        s = self.follower.settings
        if (s.federation, s.task) != (self.topics.federation, self.config.task):
            self.reassigned = s
        return True

    def participate(self) -> bool:
        return self.follower is None or self.follower.participate()

    async def next_round(self, data: BatchSource, compressor: Compressor, encoding: str
                         ) -> tuple[int, Compressor] | None:
        """Before a local round: sit rounds out as the participation says (each about as long as the last round
        took), then :meth:`adopt` the settings. None: the agent is moving to another federation."""
        while self.reassigned is None:
            if self.participate():
                return self.adopt(data, compressor, encoding)
            await asyncio.sleep(self.last_round)
        return None

    def adopt(self, data: BatchSource, compressor: Compressor, encoding: str) -> tuple[int, Compressor]:
        """The settings for the next round: the batch size where the data source has one (ArrayData), the
        compression (a new one starts without top-k's residual); returns the local steps and the compressor."""
        s = self.settings
        if s.batch_size is not None and isinstance(data, ArrayData):
            data.batch_size = min(s.batch_size, data.num_samples)
        if s.compression != compressor.setting and encoding == "delta":
            compressor = Compressor(s.compression)
        return s.local_steps, compressor

    async def serve(self, agent: Host) -> None:
        """The agent's ``allocation`` loop: republish its status when the power source changed (read every
        ``power_poll`` s) or the loss did (at most every ``refresh`` s); on an assignment elsewhere, wait for
        its outbox's acks (at most ``settle`` s) and end its run."""
        while self.reassigned is None:
            try:
                await agent.wait_until(lambda: self.reassigned is not None, self.config.power_poll, str)
            except TimeoutError:  # every power_poll seconds (not on every message): is a new status due?
                if self.due(agent.last_loss, time.monotonic()):
                    await agent.advertise()
        to = self.reassigned
        log.info("%s: assigned to federation %s (task %s): leaving %s", agent.agent_id, to.federation, to.task,
                 self.topics.federation)
        with contextlib.suppress(TimeoutError):
            await agent.wait_until(lambda: not agent.outbox, self.config.settle, str)
        agent.stop()


def batch_size_of(data: Any) -> int:
    """Examples per step: of stacked batches (a dict of arrays, steps first), or of a data source (its
    ``batch_size``, else 1)."""
    if isinstance(data, dict):
        return int(np.shape(next(iter(data.values())))[1])
    return int(getattr(data, "batch_size", 1))


def moved_config(config: AgentConfig, to: Settings) -> AgentConfig:
    """``config`` for the agent's next run, on the federation and task of ``to`` (an assignment that moved
    it): the same settings otherwise, and the same tasks held."""
    assert config.allocation is not None
    alloc = config.allocation
    held = alloc.held
    return replace(config, topics=Topics(config.topics.prefix, to.federation),
                   allocation=replace(alloc, task=to.task, tasks=tuple(t for t in held if t != to.task)))

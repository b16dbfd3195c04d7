"""One update per agent per server step, for central differential privacy.

Central DP in FedBuff (fedmqtt.privacy) bounds each device's influence on a noisy step by one clipped delta:
its ε assumes that no agent has two updates in one buffer. The aggregator enforces that with a ``StepGate``
(``AggregatorConfig(one_update_per_step=True)``, on by default with ``fedmqtt aggregator --dp-clip``): an
agent's second update in the same step is *held*, unacknowledged, and applied first thing after the step;
only then is it acknowledged, so an aggregator crash loses nothing (the agent's outbox re-sends it). A
re-send of a held update is held once. Memory stays bounded: beyond ``capacity`` updates or ``max_bytes``
in all, or ``per_agent`` from one agent, more are not held and are counted as ``dropped`` (the agents
re-send them after their ack timeout), so one device cannot crowd out the others.

Each held update remembers the version at which it arrived, so the aggregator judges its staleness as of
its arrival, not as of the end of the wait. If fewer than K agents are active, a step can never fill with
distinct agents; the aggregator then closes a partial step after ``step_deadline`` seconds.

>>> g = StepGate(capacity=4)
>>> g.admits("a"), g.admit("a"), g.admits("a")
(True, None, False)
>>> g.hold("a/u2", "a", b"...", version=7)
True
>>> g.advance(); list(g.ready())
[Held(agent='a', payload=b'...', version=7)]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple


class Held(NamedTuple):
    agent: str
    payload: bytes
    version: int  # the aggregator's version when the update arrived


class StepGate:
    """Tracks which agents contributed to the current step and the updates held for later steps."""

    def __init__(self, capacity: int = 1024, per_agent: int = 8, max_bytes: int = 256 << 20) -> None:
        self.capacity = capacity
        self.per_agent = per_agent
        self.max_bytes = max_bytes
        self.in_step: set[str] = set()
        self._held: dict[str, Held] = {}  # dedup key -> held update, in arrival order
        self._per_agent: Counter[str] = Counter()
        self._bytes = 0
        self.dropped = 0

    def admits(self, agent: str) -> bool:
        """Whether ``agent`` may contribute to the current step."""
        return agent not in self.in_step

    def admit(self, agent: str) -> None:
        """Record that ``agent`` contributed to the current step."""
        self.in_step.add(agent)

    def hold(self, key: str, agent: str, payload: bytes, version: int) -> bool:
        """Keep an update for a later step; False when it was not kept (a bound was reached)."""
        if key in self._held:
            return True  # a re-send of an update already held
        if (len(self._held) >= self.capacity or self._per_agent[agent] >= self.per_agent
                or self._bytes + len(payload) > self.max_bytes):
            self.dropped += 1
            return False
        self._held[key] = Held(agent, payload, version)
        self._per_agent[agent] += 1
        self._bytes += len(payload)
        return True

    def advance(self) -> None:
        """A step was taken: every agent may contribute again."""
        self.in_step.clear()

    def ready(self) -> Iterator[Held]:
        """Take out the held updates whose agents may contribute now, oldest first (at most one per agent
        per call; the caller admits each as it applies it)."""
        taken: set[str] = set()
        for key, held in list(self._held.items()):
            if held.agent in self.in_step or held.agent in taken:
                continue
            taken.add(held.agent)
            del self._held[key]
            self._per_agent[held.agent] -= 1
            if not self._per_agent[held.agent]:
                del self._per_agent[held.agent]
            self._bytes -= len(held.payload)
            yield held

    def __len__(self) -> int:
        return len(self._held)

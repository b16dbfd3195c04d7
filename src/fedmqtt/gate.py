"""One update per agent per server step, for central differential privacy.

Central DP in FedBuff (fedmqtt.privacy) bounds each device's influence on a noisy step by one clipped delta:
its ε assumes that no agent has two updates in one buffer. The aggregator enforces that with a ``StepGate``
(``AggregatorConfig(one_update_per_step=True)``, on by default with ``fedmqtt aggregator --dp-clip``): an
agent's second update in the same step is *held*, unacknowledged, and applied first thing after the step;
only then is it acknowledged, so an aggregator crash loses nothing (the agent's outbox re-sends it). A
re-send of a held update is held once. Beyond ``capacity`` held updates, more are not held and are counted
as ``dropped`` (the agents re-send them after their ack timeout), so memory stays bounded.

>>> g = StepGate(capacity=4)
>>> g.admits("a"), g.admit("a"), g.admits("a")
(True, None, False)
>>> g.hold("a/u2", "a", b"...")
True
>>> g.advance(); [key for key, _, _ in g.ready()]
['a/u2']
"""

from __future__ import annotations

from collections.abc import Iterable


class StepGate:
    """Tracks which agents contributed to the current step and the updates held for later steps."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self.in_step: set[str] = set()
        self._held: dict[str, tuple[str, bytes]] = {}  # dedup key -> (agent, payload), in arrival order
        self.dropped = 0

    def admits(self, agent: str) -> bool:
        """Whether ``agent`` may contribute to the current step."""
        return agent not in self.in_step

    def admit(self, agent: str) -> None:
        """Record that ``agent`` contributed to the current step."""
        self.in_step.add(agent)

    def hold(self, key: str, agent: str, payload: bytes) -> bool:
        """Keep an update for a later step; False when it was not kept (capacity reached)."""
        if key in self._held:
            return True  # a re-send of an update already held
        if len(self._held) >= self.capacity:
            self.dropped += 1
            return False
        self._held[key] = (agent, payload)
        return True

    def advance(self) -> None:
        """A step was taken: every agent may contribute again."""
        self.in_step.clear()

    def ready(self) -> Iterable[tuple[str, str, bytes]]:
        """Take out the held updates whose agents may contribute now, oldest first (at most one per agent
        per call; the caller admits each as it applies it)."""
        taken: set[str] = set()
        for key, (agent, payload) in list(self._held.items()):
            if agent in self.in_step or agent in taken:
                continue
            taken.add(agent)
            del self._held[key]
            yield key, agent, payload

    def __len__(self) -> int:
        return len(self._held)

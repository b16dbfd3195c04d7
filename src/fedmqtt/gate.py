"""One update per agent per server step, for central differential privacy: an immutable value in the server
state, and pure functions on it.

Central DP in FedBuff (fedmqtt.privacy) bounds each device's influence on a noisy step by one clipped delta:
its ε assumes that no agent has two updates in one buffer. A strategy with central DP says so
(``Strategy.one_update_per_step``) and the core then keeps a ``Gate``: an agent's second update in the same
step is *held*, unacknowledged, and applied first thing after the step; only then is it acknowledged, so a
crash loses nothing (the agent's outbox re-sends it). A re-send of a held update is held once. Memory stays
bounded: beyond ``max_held`` updates or ``max_held_bytes`` in all, or ``max_held_per_agent`` from one agent,
more are not held and are counted in ``dropped`` (the agents re-send them after their ack timeout), so one
device cannot crowd out the others.

The gate also counts, per agent, the steps it contributed to (``taken``): a device's privacy loss under
central DP accrues only in the steps that hold one of its updates (docs/security.md), so the accountant
charges the most-charged device. Beyond ``MAX_TRACKED`` agents the counts stop (``untracked``) and the
accountant falls back to charging every step to every device.

Each held update remembers the version at which it arrived, so its staleness is judged as of its arrival.
If fewer than K agents are active, a step can never fill with distinct agents; the aggregator then closes a
partial step after ``step_deadline`` seconds.

>>> g = admit(Gate(), "a")
>>> admits(g, "a"), admits(g, "b")
(False, True)
>>> g = hold(g, Held("a/u2", "a", b"...", 7), GateLimits())
>>> g, ready = take_ready(advance(g)); [h.key for h in ready], len(g.held)
(['a/u2'], 0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

MAX_TRACKED = 100_000  # agents whose steps are counted; memory stays bounded under made-up agent ids


class Held(NamedTuple):
    key: str  # agent/update_id
    agent: str
    payload: bytes
    version: int  # the server's version when the update arrived


class GateLimits(NamedTuple):
    max_held: int = 1024
    max_held_per_agent: int = 8  # the agent's default outbox size
    max_held_bytes: int = 256 << 20


class Gate(NamedTuple):
    in_step: frozenset[str] = frozenset()  # agents that contributed to the current step
    held: tuple[Held, ...] = ()  # in arrival order
    dropped: int = 0  # updates not held because a bound was reached
    taken: Mapping[str, int] = {}  # steps each agent contributed to; never mutated (a new mapping per step)
    untracked: bool = False  # an agent was not counted (MAX_TRACKED reached)

    def most_taken(self) -> int | None:
        """The most steps any one agent contributed to; None once an agent went uncounted."""
        return None if self.untracked else max(self.taken.values(), default=0)


def admits(gate: Gate, agent: str) -> bool:
    """Whether ``agent`` may contribute to the current step."""
    return agent not in gate.in_step


def admit(gate: Gate, agent: str) -> Gate:
    """``agent`` contributed to the current step."""
    return gate._replace(in_step=gate.in_step | {agent})


def hold(gate: Gate, update: Held, limits: GateLimits) -> Gate:
    """Keep ``update`` for a later step (a re-send of a held update is held once); counted in ``dropped``
    when a bound is reached."""
    if any(h.key == update.key for h in gate.held):
        return gate
    from_agent = sum(h.agent == update.agent for h in gate.held)
    size = sum(len(h.payload) for h in gate.held)
    if (len(gate.held) >= limits.max_held or from_agent >= limits.max_held_per_agent
            or size + len(update.payload) > limits.max_held_bytes):
        return gate._replace(dropped=gate.dropped + 1)
    return gate._replace(held=(*gate.held, update))


def advance(gate: Gate) -> Gate:
    """A step was taken: its agents' counts go up, and every agent may contribute again."""
    if not gate.in_step:
        return gate
    taken = dict(gate.taken)
    untracked = gate.untracked
    for agent in gate.in_step:
        if agent in taken or len(taken) < MAX_TRACKED:
            taken[agent] = taken.get(agent, 0) + 1
        else:
            untracked = True
    return gate._replace(in_step=frozenset(), taken=taken, untracked=untracked)


def take_ready(gate: Gate) -> tuple[Gate, tuple[Held, ...]]:
    """Take out the held updates whose agents may contribute now, oldest first, at most one per agent (the
    caller admits each as it applies it)."""
    taken: set[str] = set()
    ready, kept = [], []
    for h in gate.held:
        if h.agent in gate.in_step or h.agent in taken:
            kept.append(h)
        else:
            taken.add(h.agent)
            ready.append(h)
    return gate._replace(held=tuple(kept)), tuple(ready)

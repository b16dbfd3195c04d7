"""The agent's side of assignments (protocol 1.1, docs/protocol.md 10): hold the newest one, fall back to the
agent's own settings when there is none.

:class:`AssignmentFollower` is sans-I/O: the agent subscribes to :attr:`AssignmentFollower.topic`, hands every
message there to :meth:`~AssignmentFollower.offer` and reads :attr:`~AssignmentFollower.settings` before each
local round. ``offer`` applies the sequence rule (only a higher sequence replaces the assignment held: a stale
retained copy, or a duplicate delivery, changes nothing), refuses a payload that breaks the protocol's rules
or names a task the agent holds no data for (keeping what it had, with the reason in ``last_error``), and an
empty payload (the coordinator withdrew the assignment) returns the agent to its own settings.

>>> f = AssignmentFollower("edge-1", Defaults("default", "digits", local_steps=20), tasks=("digits",))
>>> f.settings.local_steps, f.settings.assigned
(20, False)
>>> f.offer(b'{"schema": 1, "agent": "edge-1", "federation": "digits-a", "task": "digits", "local_steps": 5,'
...         b' "participation": 0.5, "compression": "int8", "sequence": 7, "issued_at": 1.0, "policy": "p"}')
True
>>> s = f.settings; s.federation, s.local_steps, str(s.compression), s.participation
('digits-a', 5, 'int8', 0.5)
>>> f.offer(b'{"schema": 1, "agent": "edge-1", "federation": "other", "task": "digits", "sequence": 6,'
...         b' "issued_at": 0.5}')
False
>>> f.settings.federation, f.stale
('digits-a', 1)
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from fedmqtt.allocation.base import Assignment
from fedmqtt.allocation_schemas import parse_assignment
from fedmqtt.compression import Compression
from fedmqtt.errors import InvalidMessage
from fedmqtt.topics import CoordinatorTopics


@dataclass(frozen=True)
class Defaults:
    """The agent's own settings: what it does without an assignment."""

    federation: str
    task: str
    local_steps: int = 20
    batch_size: int | None = None  # None: whatever its data source uses
    compression: Compression = field(default_factory=Compression)


@dataclass(frozen=True)
class Settings:
    """What the agent should do for its next local round."""

    federation: str
    task: str
    local_steps: int
    batch_size: int | None
    participation: float  # train this round with this probability (see :meth:`AssignmentFollower.participate`)
    compression: Compression
    assigned: bool  # from an assignment (else the defaults)
    sequence: int | None = None
    policy: str = ""


class AssignmentFollower:
    """Holds one agent's current assignment. ``tasks``: the tasks the agent holds data for (None: accept
    any; the agent then checks the federation itself)."""

    def __init__(self, agent_id: str, defaults: Defaults, tasks: Iterable[str] | None = None,
                 prefix: str = "fedmqtt", rng: random.Random | None = None) -> None:
        self.agent_id = agent_id
        self.defaults = defaults
        self.tasks = frozenset(tasks) if tasks is not None else None
        self.topic = CoordinatorTopics(prefix).assignment(agent_id)
        self.current: Assignment | None = None
        self.highest = -1  # the highest sequence seen (kept when an assignment is withdrawn)
        self.stale = 0  # payloads ignored by the sequence rule
        self.refused = 0  # payloads that broke a rule
        self.last_error: str | None = None
        self._rng = rng or random.Random()

    @property
    def settings(self) -> Settings:
        d, a = self.defaults, self.current
        if a is None:
            return Settings(d.federation, d.task, d.local_steps, d.batch_size, 1.0, d.compression, False)
        p = a.plan
        return Settings(p.federation, p.task, p.local_steps or d.local_steps, p.batch_size or d.batch_size,
                        p.participation, Compression.parse(p.compression) if p.compression else d.compression,
                        True, a.sequence, a.policy)

    def offer(self, payload: bytes) -> bool:
        """One message from the assignment topic; True when what the agent should do changed (a new
        sequence with the same settings is not a change)."""
        before = self._what()
        if not payload:  # withdrawn: back to the agent's own settings
            self.current = None
            return self._what() != before
        try:
            a = parse_assignment(payload, self.agent_id)
            if self.tasks is not None and a.plan.task not in self.tasks:
                raise InvalidMessage(f"assignment: task {a.plan.task!r} is not one this agent holds data for "
                                     f"({', '.join(sorted(self.tasks))})")
        except InvalidMessage as exc:
            self.refused += 1
            self.last_error = str(exc)
            return False
        if a.sequence <= self.highest:
            self.stale += 1
            return False
        self.highest = a.sequence
        self.current = a
        return self._what() != before

    def _what(self) -> Settings:
        return replace(self.settings, sequence=None, policy="")

    def participate(self) -> bool:
        """Draw for one local round: True to train it, False to sit it out (then wait about as long as a
        round takes and draw again)."""
        p = self.settings.participation
        return p >= 1.0 or self._rng.random() < p

"""The allocation interface: what a policy sees (each agent's capabilities and history) and what it decides
(a :class:`Plan` per agent), as plain values. A policy is pure: no MQTT, clock or I/O; ``now`` comes in.

A :class:`Policy` is a name and one function, ``assign(agents, now, config) -> plans``. It is built from
parts (:class:`Part`), each of which refines one aspect of the plans the previous parts made (the federation,
the local steps, the participation, the encoding), as FedBuff's combine rules are parts of a strategy
(strategies/combine.py). Policies keep no state of their own: what they need to remember (participation
counts, last loss, the current assignment) is the coordinator's per-agent :class:`History`, which it
builds from what it observes, so a policy is a function of its inputs and a test can call it directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from fedmqtt.capabilities import Capabilities, check_task_name
from fedmqtt.topics import check_federation

MAX_LOCAL_STEPS = 100_000  # the bounds of an assignment (docs/protocol.md 10.2)
MAX_BATCH_SIZE = 1 << 20


@dataclass(frozen=True)
class Plan:
    """What one agent should do. ``None`` leaves a setting to the agent's own configuration.

    ``participation`` is the probability with which the agent trains a local round: before each round it
    draws u ~ U[0, 1) and, when u >= participation, sits the round out (waits as long as its last round
    took) and draws again. 1: always train."""

    federation: str
    task: str  # the task that federation runs: the agent trains its model on its data for it
    local_steps: int | None = None
    batch_size: int | None = None
    participation: float = 1.0
    compression: str | None = None  # a compression form (compression.Compression.parse): none, int8, topk:0.01


@dataclass(frozen=True)
class Assignment:
    """A plan as issued to one agent: ``sequence`` grows with every new assignment to that agent, so the
    agent can ignore an older one (a stale retained copy); ``policy`` names who decided."""

    agent: str
    plan: Plan
    sequence: int
    issued_at: float
    policy: str


@dataclass(frozen=True)
class History:
    """What the coordinator remembers of one agent (from its statuses and its own assignments)."""

    first_seen: float = 0.0
    last_seen: float = 0.0
    updates_sent: int = 0  # as the agent's status reports it
    last_progress: float | None = None  # when updates_sent last grew
    plan: Plan | None = None  # its current assignment


@dataclass(frozen=True)
class AgentView:
    capabilities: Capabilities
    history: History = field(default_factory=History)


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs of every part; each part reads the ones it needs."""

    federations: Mapping[str, str]  # federation -> the task it runs
    local_steps: int | None = None  # E for every agent (None: each agent's own); speed-aware scales it
    batch_size: int | None = None
    # speed-aware
    reference_steps: int = 20  # E of the median device when local_steps is None
    min_steps: int = 1
    max_steps: int = 500
    # and within [E / step_range, E · step_range]: many more local steps than the others' drift a fast
    # device's model far from the rest (HAPT, FedBuff, E = 10: up to 150 steps for the fastest devices
    # made the global model fall apart, 0.33 to 0.84 final accuracy over three seeds)
    step_range: float = 4.0
    battery_factor: float = 0.5  # on battery a device counts as this fraction of its speed
    # utility (Oort-like)
    participation_target: float = 0.5  # expected share of a federation's agents training at any time
    participation_floor: float = 0.05  # fairness: no online agent is ever below this
    exploration: float = 1.0  # weight of the bonus for agents that have taken part little
    preferred_round_s: float | None = None  # Oort's T; None: the federation's median round time
    straggler_penalty: float = 2.0  # Oort's alpha: utility x (T / t)^alpha for rounds slower than T
    low_battery: float = 20.0  # percent: a device on battery below it drops to the participation floor
    # bandwidth-aware encoding
    model_bytes: Mapping[str, int] = field(default_factory=dict)  # per federation (float32 update size)
    default_model_bytes: int = 1 << 20
    upload_budget: float = 2.0  # seconds an update should take on the device's uplink

    def __post_init__(self) -> None:
        if not self.federations:
            raise ValueError("a policy needs at least one federation")
        for fed, task in self.federations.items():  # else an assignment naming them could not be published
            check_federation(fed)
            check_task_name(task)
        if self.local_steps is not None and not 1 <= self.local_steps <= MAX_LOCAL_STEPS:
            raise ValueError(f"local_steps must be in 1..{MAX_LOCAL_STEPS}")
        if self.batch_size is not None and not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be in 1..{MAX_BATCH_SIZE}")
        if not 1 <= self.reference_steps <= MAX_LOCAL_STEPS or self.max_steps > MAX_LOCAL_STEPS:
            raise ValueError(f"reference_steps and max_steps must be in 1..{MAX_LOCAL_STEPS}")
        if not 0 < self.participation_floor <= self.participation_target <= 1:
            raise ValueError("need 0 < participation_floor <= participation_target <= 1")
        if not 1.0 <= self.step_range <= MAX_LOCAL_STEPS:
            raise ValueError(f"step_range must be in 1..{MAX_LOCAL_STEPS}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError("need 1 <= min_steps <= max_steps")
        if not 0 < self.battery_factor <= 1 or not self.upload_budget > 0:
            raise ValueError("battery_factor must be in (0, 1] and upload_budget > 0")


Plans = dict[str, Plan]
Agents = Mapping[str, AgentView]
Refine = Callable[[Plans, Agents, float, PolicyConfig], Plans]


class Part(NamedTuple):
    """One aspect of a policy: ``refine(plans, agents, now, config)`` returns the plans with its aspect set
    (agents without a plan stay without one)."""

    name: str
    refine: Refine


class Policy(NamedTuple):
    """``assign(agents, now, config) -> plans``: a plan for every agent that can be given one."""

    name: str
    assign: Callable[[Agents, float, PolicyConfig], Plans]


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def quantise_steps(steps: float, lo: int, hi: int) -> int:
    """Round to the grid 2^(k/4) (steps 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16, 19, ...) within [lo, hi]: a
    small drift of a measured speed does not change the plan, so no new assignment goes out for it.

    >>> [quantise_steps(x, 1, 100) for x in (0.2, 9.0, 20.0, 24.0, 1e6)]
    [1, 10, 19, 23, 100]
    """
    if not math.isfinite(steps) or steps <= 1:
        return max(lo, 1)
    return int(min(max(round(2 ** (round(4 * math.log2(steps)) / 4)), lo), hi))


def quantise_share(p: float, floor: float) -> float:
    """A probability rounded to 0.05 steps, at least ``floor``, at most 1."""
    return min(max(round(p * 20) / 20, floor), 1.0)

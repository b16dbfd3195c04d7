"""Policies by name, for the CLI: ``make("uniform")``, ``make("utility+speed-aware+bandwidth")``.

A name is one or more parts joined by ``+``; every policy starts with placement and the uniform defaults
(uniform.py), then applies its parts in a fixed order (speed-aware, bandwidth, utility: the utility part
estimates round times from the steps and the encoding the others chose), whatever order the name gives.

>>> make("bandwidth+speed-aware").name
'speed-aware+bandwidth'
>>> make("fastest")
Traceback (most recent call last):
...
ValueError: unknown allocation policy part 'fastest'; choose uniform, speed-aware, bandwidth, utility (joined by +)
"""

from __future__ import annotations

from collections.abc import Callable

from fedmqtt.allocation.bandwidth import bandwidth
from fedmqtt.allocation.base import Agents, Part, Plans, Policy, PolicyConfig
from fedmqtt.allocation.speed_aware import speed_aware
from fedmqtt.allocation.uniform import placement
from fedmqtt.allocation.utility import utility

PARTS: dict[str, Callable[[], Part]] = {"speed-aware": speed_aware, "bandwidth": bandwidth, "utility": utility}
NAMES = ("uniform", *PARTS)


def compose(*parts: Part) -> Policy:
    """Placement, then ``parts`` in the order given: a policy."""
    chain = (placement(), *parts)
    name = "+".join(p.name for p in parts) or "uniform"

    def assign(agents: Agents, now: float, config: PolicyConfig) -> Plans:
        plans: Plans = {}
        for part in chain:
            plans = part.refine(plans, agents, now, config)
        return plans

    return Policy(name, assign)


def make(name: str) -> Policy:
    """The policy ``name``: ``uniform``, or parts among speed-aware, bandwidth, utility joined by ``+``."""
    wanted = [n.strip() for n in name.split("+") if n.strip()]
    for n in wanted:
        if n not in NAMES:
            raise ValueError(f"unknown allocation policy part {n!r}; choose {', '.join(NAMES)} (joined by +)")
    return compose(*(PARTS[n]() for n in PARTS if n in wanted))

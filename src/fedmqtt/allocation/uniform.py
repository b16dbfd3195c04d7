"""Placement (which federation each agent works on) and the uniform plan: every agent on its own settings.

Placement: an agent can only work on a federation whose task it holds data for. It stays where it is while
that still holds (moving costs it a model download and its top-k residual); a new or displaced agent goes to
the eligible federation with the fewest agents (ties: by name). Agents are taken in id order, so the result
depends only on the inputs.

>>> from fedmqtt.capabilities import Capabilities
>>> cfg = PolicyConfig({"hapt": "hapt", "digits": "digits"}, local_steps=20)
>>> agents = {"a": AgentView(Capabilities(tasks=("digits",))), "b": AgentView(Capabilities(tasks=("hapt",))),
...           "c": AgentView(Capabilities(tasks=("hapt", "digits"))), "d": AgentView(Capabilities(tasks=("x",)))}
>>> {a: (p.federation, p.local_steps) for a, p in uniform().assign(agents, 0.0, cfg).items()}
{'a': ('digits', 20), 'b': ('hapt', 20), 'c': ('digits', 20)}
"""

from __future__ import annotations

from collections import Counter

from fedmqtt.allocation.base import Agents, AgentView, Part, Plan, Plans, Policy, PolicyConfig


def eligible(view: AgentView, config: PolicyConfig) -> list[str]:
    """The federations whose task the agent holds data for, by name."""
    tasks = set(view.capabilities.tasks)
    return sorted(f for f, task in config.federations.items() if task in tasks)


def place(agents: Agents, config: PolicyConfig) -> dict[str, str]:
    """agent -> federation, for every agent that has an eligible federation."""
    options = {a: eligible(agents[a], config) for a in sorted(agents)}
    out: dict[str, str] = {}
    load: Counter[str] = Counter()
    for agent, feds in options.items():  # stay where you are
        current = agents[agent].history.plan
        if current is not None and current.federation in feds:
            out[agent] = current.federation
            load[current.federation] += 1
    for agent, feds in options.items():  # the rest to the least loaded
        if agent not in out and feds:
            out[agent] = min(feds, key=lambda f: (load[f], f))
            load[out[agent]] += 1
    return out


def _uniform(plans: Plans, agents: Agents, now: float, config: PolicyConfig) -> Plans:
    del plans, now
    return {a: Plan(f, config.federations[f], config.local_steps, config.batch_size)
            for a, f in place(agents, config).items()}


def placement() -> Part:
    """The first part of every policy: a federation for each agent, and the fleet-wide defaults (the
    configured local steps and batch size, or each agent's own; participation 1; its own encoding)."""
    return Part("uniform", _uniform)


def uniform() -> Policy:
    """Every agent trains all the time with the same settings (as an agent without a coordinator does)."""
    part = placement()
    return Policy("uniform", lambda agents, now, config: part.refine({}, agents, now, config))

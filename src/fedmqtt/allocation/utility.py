"""Utility-based participation, after Oort (Lai et al., OSDI 2021): devices whose data the model still gets
wrong, and that answer fast, train more often; the rest less, never below a fairness floor.

Per federation, for each device i with a plan:

    stat_i = examples_i × loss_i                      (statistical utility: its reported training loss)
    t_i    = E_i / v_i + bytes_i / uplink_i           (expected round time: compute, then upload)
    sys_i  = (T / t_i)^α if t_i > T else 1            (T: preferred round time, default the median t)
    u_i    = stat_i × sys_i + c · ū · sqrt(ln(1 + N) / (1 + n_i))   (exploration bonus, UCB-like:
             n_i updates sent by i, N by all, ū the mean of stat × sys)
    p_i    = clamp(k · u_i / Σ u, floor, 1),  k = participation_target × (devices in the federation)

A device that has not reported a loss yet is unexplored: it trains every round (p = 1) until it has. A
device on battery below ``low_battery`` percent drops to the floor. Probabilities are rounded to 0.05, so a
small change of loss does not send a new assignment.

>>> from fedmqtt.allocation.base import AgentView, PolicyConfig
>>> from fedmqtt.allocation.uniform import placement
>>> from fedmqtt.capabilities import Capabilities, Compute
>>> cfg = PolicyConfig({"d": "digits"}, local_steps=10, participation_target=0.5, exploration=0.0)
>>> def dev(loss, speed=10.0):
...     return AgentView(Capabilities(Compute(speed, 32), examples=100, tasks=("digits",), loss=loss))
>>> agents = {"hard": dev(2.0), "easy": dev(0.2), "new": dev(None), "slow": dev(2.0, speed=1.0)}
>>> plans = utility().refine(placement().refine({}, agents, 0.0, cfg), agents, 0.0, cfg)
>>> {a: p.participation for a, p in sorted(plans.items())}
{'easy': 0.2, 'hard': 1.0, 'new': 1.0, 'slow': 0.05}
"""

from __future__ import annotations

import math
from dataclasses import replace

from fedmqtt.allocation.bandwidth import size_ratio
from fedmqtt.allocation.base import Agents, Part, Plans, PolicyConfig, median, quantise_share
from fedmqtt.allocation.speed_aware import effective_speed


def round_seconds(agents: Agents, plans: Plans, agent: str, config: PolicyConfig) -> float | None:
    """Expected seconds of one local round and its upload, where the device's speed is known."""
    view, plan = agents[agent], plans[agent]
    v = effective_speed(view, config)
    if v is None or v <= 0:
        return None
    seconds = (plan.local_steps or config.local_steps or config.reference_steps) / v
    uplink = view.capabilities.link.uplink
    if uplink:
        size = config.model_bytes.get(plan.federation, config.default_model_bytes)
        seconds += size * size_ratio(plan.compression) / uplink
    return seconds


def _refine(plans: Plans, agents: Agents, now: float, config: PolicyConfig) -> Plans:
    del now
    out = dict(plans)
    for fed in sorted({p.federation for p in plans.values()}):
        members = sorted(a for a, p in plans.items() if p.federation == fed)
        times = {a: round_seconds(agents, plans, a, config) for a in members}
        known = [t for t in times.values() if t is not None]
        preferred = config.preferred_round_s or (median(known) if known else 1.0)
        base: dict[str, float] = {}
        for a in members:
            c = agents[a].capabilities
            if c.loss is None:
                continue  # unexplored
            t = times[a]
            system = (preferred / t) ** config.straggler_penalty if t is not None and t > preferred else 1.0
            base[a] = max(c.examples, 1) * c.loss * system
        total_sent = sum(agents[a].history.updates_sent for a in members)
        mean = sum(base.values()) / len(base) if base else 0.0
        scores = {a: u + config.exploration * mean * math.sqrt(math.log1p(total_sent)
                                                               / (1 + agents[a].history.updates_sent))
                  for a, u in base.items()}
        k = config.participation_target * len(members)
        norm = sum(scores.values())
        for a in members:
            c = agents[a].capabilities
            percent = c.power.battery_percent
            if c.power.source == "battery" and percent is not None and percent < config.low_battery:
                p = config.participation_floor
            elif a not in scores:
                p = 1.0
            else:
                p = k * scores[a] / norm if norm > 0 else config.participation_target
            out[a] = replace(out[a], participation=quantise_share(p, config.participation_floor))
    return out


def utility() -> Part:
    return Part("utility", _refine)

"""Speed-aware local work, in the spirit of FedCompass (Li et al., 2023): each device gets as many local
steps as it can do in the time the federation's median device takes for the reference E, so that slow
devices' updates arrive as fresh as fast devices' and fast devices do not idle.

    vᵢ = steps/s of device i (its probe, then its real rounds) × battery_factor if it runs on battery
    T  = E_ref / median_j(steps/s of j)          (over the federation's devices, at full power)
    Eᵢ = clamp(T · vᵢ, max(min_steps, E_ref / step_range), min(max_steps, E_ref · step_range)), rounded to a
         2^(k/4) grid (FedCompass bounds local work the same way: far more steps than the others make a fast
         device's update drift from the population's)

A device on battery therefore does fewer steps (half, by default) and asks less of its battery; one whose
throughput is unknown keeps the reference E.

>>> from fedmqtt.allocation.base import AgentView, PolicyConfig
>>> from fedmqtt.allocation.uniform import placement
>>> from fedmqtt.capabilities import Capabilities, Compute, Power
>>> cfg = PolicyConfig({"d": "digits"}, reference_steps=20)
>>> def dev(speed, power="mains"):
...     return AgentView(Capabilities(Compute(speed, 32), power=Power(power), tasks=("digits",)))
>>> agents = {"slow": dev(10.0), "mid": dev(40.0), "fast": dev(160.0), "phone": dev(40.0, "battery")}
>>> plans = speed_aware().refine(placement().refine({}, agents, 0.0, cfg), agents, 0.0, cfg)
>>> {a: p.local_steps for a, p in plans.items()}
{'fast': 76, 'mid': 19, 'phone': 10, 'slow': 5}
"""

from __future__ import annotations

import math
from dataclasses import replace

from fedmqtt.allocation.base import Agents, AgentView, Part, Plans, PolicyConfig, median, quantise_steps


def effective_speed(view: AgentView, config: PolicyConfig) -> float | None:
    """Steps per second the policy counts on: the measured throughput, less on battery."""
    c = view.capabilities
    if c.compute is None:
        return None
    factor = config.battery_factor if c.power.source == "battery" else 1.0
    return c.compute.steps_per_s * factor


def _refine(plans: Plans, agents: Agents, now: float, config: PolicyConfig) -> Plans:
    del now
    reference = config.local_steps or config.reference_steps
    out = dict(plans)
    for fed in sorted({p.federation for p in plans.values()}):
        members = [a for a, p in plans.items() if p.federation == fed]
        full = [c.steps_per_s for a in members if (c := agents[a].capabilities.compute) is not None]
        if not full:
            continue
        seconds = reference / median(full)  # T: the median device's round with the reference E
        lo = max(config.min_steps, math.ceil(reference / config.step_range))
        hi = max(lo, min(config.max_steps, math.floor(reference * config.step_range)))
        for a in members:
            v = effective_speed(agents[a], config)
            steps = reference if v is None else quantise_steps(seconds * v, lo, hi)
            out[a] = replace(out[a], local_steps=steps)
    return out


def speed_aware() -> Part:
    return Part("speed-aware", _refine)

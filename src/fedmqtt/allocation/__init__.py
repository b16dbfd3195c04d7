"""Capability-based task allocation: pure policies from each agent's capabilities and history to a plan
(federation, local steps, batch size, participation, update encoding). The coordinator (coordinator.py) runs
one and publishes the plans as assignments."""

from fedmqtt.allocation.bandwidth import bandwidth
from fedmqtt.allocation.base import AgentView, Assignment, History, Part, Plan, Policy, PolicyConfig
from fedmqtt.allocation.registry import NAMES, compose, make
from fedmqtt.allocation.speed_aware import speed_aware
from fedmqtt.allocation.uniform import placement, uniform
from fedmqtt.allocation.utility import utility

__all__ = [
    "NAMES",
    "AgentView",
    "Assignment",
    "History",
    "Part",
    "Plan",
    "Policy",
    "PolicyConfig",
    "bandwidth",
    "compose",
    "make",
    "placement",
    "speed_aware",
    "uniform",
    "utility",
]

"""Built-in tasks: ``digits`` (default, bundled with fedmqtt) and ``hapt`` (human activity recognition)."""

from __future__ import annotations

from typing import Any

from fedmqtt.tasks.base import Task, index_of
from fedmqtt.tasks.digits import digits_task


def get_task(name: str = "digits", **options: Any) -> Task:
    """Build a built-in task by name; options go to its factory (num_clients, partition, alpha, seed, ...)."""
    if name == "digits":
        return digits_task(**options)
    if name == "digits-linear":  # logistic regression: 650 parameters, for DP with many devices
        return digits_task(**{**options, "hidden": 0})
    if name in ("hapt", "hapt6", "hapt12"):
        from fedmqtt.tasks.hapt import hapt_task  # optional: needs the HAPT file

        if name == "hapt12":
            options.setdefault("classes", 12)
        return hapt_task(**options)
    raise ValueError(f"unknown task {name!r}; choose digits, digits-linear or hapt")


__all__ = ["Task", "digits_task", "get_task", "index_of"]

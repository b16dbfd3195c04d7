"""Stopping background tasks reliably.

A single ``task.cancel()`` is not always enough: on Python 3.11, ``asyncio.wait_for`` (used inside aiomqtt's
publish) can swallow a cancellation that races with the inner future completing, leaving the task
running. ``cancel_all`` therefore repeats the request until every task has finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence


async def cancel_all(tasks: Sequence[asyncio.Task[None]], interval: float = 0.5) -> None:
    """Cancel ``tasks`` and wait until all are done, re-cancelling any that shrugged it off."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=interval)

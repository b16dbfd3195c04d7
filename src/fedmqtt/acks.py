"""Acknowledgements on their way out: what a core reply says on the wire, and the loop that publishes queued
acks (the aggregator's, a site's, a worker's)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from fedmqtt.schemas import Ack

if TYPE_CHECKING:
    from fedmqtt.core import Reply
    from fedmqtt.transport import Transport

T = TypeVar("T")


def of_reply(r: Reply) -> Ack:
    return Ack(update_id=r.update_id, status="accepted" if r.accepted else "rejected", version=r.version,
               reason=r.reason, detail=r.detail, members=list(r.members) if r.members else None)


async def send_queued(queue: asyncio.Queue[T], transport: Callable[[], Transport | None],
                      message: Callable[[T], tuple[str, bytes]], at_once: int = 256) -> None:
    """Publish what is queued, forever. Each QoS 1 publish waits a PUBACK round trip, so one at a time would
    cap acks at a few hundred a second: what queued meanwhile goes out together, at most ``at_once`` waiting
    (unbounded, aiomqtt's bookkeeping of pending publishes grows quadratic). An ack lost with the connection
    is answered again when its sender re-sends."""
    while True:
        batch = [await queue.get()]
        while not queue.empty() and len(batch) < at_once:
            batch.append(queue.get_nowait())
        t = transport()
        if t is None:
            continue
        await asyncio.gather(*(t.publish(*message(x), qos=1) for x in batch), return_exceptions=True)

"""An agent's part in secure aggregation: it offers each finished update (``ready``) instead of publishing it,
and runs the steps of the cohorts it is put in (secagg/client.py holds the session).

The update stays in the agent's outbox as ever; the ordinary ack settles it once its cohort's step is
applied. An ``abort`` (too few members, or this member was left out) makes it offer the update again, so an
update is summed exactly once or offered until it is. A request the session refuses (a second survivor list,
too few survivors) is answered with ``refuse`` and the session is kept, so that it keeps refusing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

from fedmqtt import codec
from fedmqtt.errors import CodecError, Reason, SecAggAbort, TransportError
from fedmqtt.schemas import Ack
from fedmqtt.secagg import Client
from fedmqtt.secagg import messages as m
from fedmqtt.topics import Topics
from fedmqtt.transport import Transport

log = logging.getLogger("fedmqtt.secure")


class SecureMember:
    def __init__(self, agent_id: str, topics: Topics, pending: Callable[[str], bytes | None],
                 min_members: int = 3, settle: Callable[[Ack], None] | None = None) -> None:
        self.agent_id, self.topics = agent_id, topics
        self.min_members = min_members  # a smaller cohort's sum would tell too much about each member
        self._settle = settle  # settles an update that cannot be offered, with the ack the aggregator would send
        self.topic = f"{topics.base}/agents/{agent_id}/secagg"
        self._pending = pending  # update id -> its payload while it is unacknowledged (the outbox)
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        self.client: Client | None = None
        self.update_id: str | None = None  # the update of the step in progress
        self._declined: tuple[str, str] | None = None  # (step, update id) of a cohort refused as too small
        self.steps_done = 0
        self.refused: dict[str, int] = {}
        self.dropped = 0  # messages from the aggregator dropped because the inbox was full

    def _out(self, kind: str) -> str:
        return f"{self.topics.base}/secagg/{self.agent_id}/{kind}"

    async def offer(self, t: Transport, update_id: str, payload: bytes) -> None:
        """Offer an update to the next cohort, unless it is in the step in progress."""
        if update_id == self.update_id:
            return
        decoded = codec.decode(payload)
        info = decoded.metadata
        if not all(np.isfinite(v).all() for v in decoded.tensors.values()):  # as the plain path refuses it
            log.error("%s: update %s holds NaN or Inf: not offered", self.agent_id, update_id)
            if self._settle is not None:
                self._settle(Ack(update_id=update_id, status="rejected", version=int(info["fedmqtt.base_version"]),
                                 reason=Reason.NON_FINITE.value, detail="the update holds NaN or Inf"))
            return
        ready = m.Ready(update_id=update_id, base_version=int(info["fedmqtt.base_version"]),
                        num_samples=int(info.get("fedmqtt.num_samples", "0")),
                        dim=sum(int(np.size(v)) for v in decoded.tensors.values()))
        await t.publish(self._out("ready"), m.dump(ready), qos=1)

    def receive(self, payload: bytes) -> None:
        try:
            self._inbox.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped += 1

    async def serve(self, transport: Callable[[], Transport | None]) -> None:
        """The agent's ``secagg`` loop: one message from the aggregator at a time."""
        while True:
            payload = await self._inbox.get()
            t = transport()
            if t is None:
                continue
            try:
                msg = m.parse_to_agent(payload)
                await self._handle(t, msg)
            except SecAggAbort as exc:
                self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
                log.warning("%s: secure aggregation: %s", self.agent_id, exc)
                step = self.client.cohort.step if self.client is not None else None
                if step is not None:
                    await _quiet(t.publish(self._out("refuse"), m.dump(m.Refuse(
                        step=step, reason=exc.reason, detail=exc.detail[:500])), qos=1))
            except (CodecError, TransportError) as exc:
                log.warning("%s: secure aggregation: %s", self.agent_id, exc)

    async def _handle(self, t: Transport, msg: m.CohortMsg | m.Roster | m.Forward | m.Unmask | m.End) -> None:
        if isinstance(msg, m.CohortMsg):
            payload = self._pending(msg.update_id)
            if payload is None:
                return  # settled meanwhile: not answering leaves this member out of the step
            if len(msg.members) < self.min_members:
                self._declined = (msg.step, msg.update_id)  # offered again when this step ends
                await t.publish(self._out("refuse"), m.dump(m.Refuse(
                    step=msg.step, reason="too_few", detail=f"{len(msg.members)} members, at least "
                    f"{self.min_members} asked")), qos=1)
                return
            self.client = Client(self.agent_id, msg.cohort(self.agent_id), _flat(payload))
            self.update_id = msg.update_id
            c_pk, s_pk = self.client.public_keys()
            await t.publish(self._out("keys"), m.dump(m.Keys(step=msg.step, c_pk=m.b64(c_pk), s_pk=m.b64(s_pk))), qos=1)
            return
        client = self.client
        if isinstance(msg, m.End) and self._declined is not None and msg.step == self._declined[0]:
            declined, self._declined = self._declined[1], None
            if (again := self._pending(declined)) is not None:
                await self.offer(t, declined, again)
            return
        if client is None or msg.step != client.cohort.step:
            return  # a message of a step this member is not in (any more)
        if isinstance(msg, m.Roster):
            roster = {v: (m.unb64(c, 32), m.unb64(s, 32)) for v, (c, s) in msg.keys.items()}
            boxes = client.share_keys(roster)
            await t.publish(self._out("shares"), m.dump(m.Shares(step=msg.step, shares={
                v: m.b64(b) for v, b in boxes.items()})), qos=1)
        elif isinstance(msg, m.Forward):
            y = client.masked_input({u: m.unb64(b) for u, b in msg.shares.items()})
            await t.publish(self._out("masked"), m.encode_masked(msg.step, y), qos=1)
        elif isinstance(msg, m.Unmask):
            b, s = client.reveal(msg.survivors)
            await t.publish(self._out("reveal"), m.dump(m.Reveal(step=msg.step, b={v: f"{x:x}" for v, x in b.items()},
                                                                 s={v: f"{x:x}" for v, x in s.items()})), qos=1)
        else:
            ended, self.client, self.update_id = self.update_id, None, None
            if msg.type == "done":
                self.steps_done += 1
                return
            log.info("%s: step %s abandoned (%s): offering the update again", self.agent_id, msg.step, msg.reason)
            payload = self._pending(ended) if ended else None
            if ended is not None and payload is not None:
                await self.offer(t, ended, payload)


def _flat(payload: bytes) -> np.ndarray:
    """An update's tensors, flattened in name order (the order of the aggregator's unflattening)."""
    tensors = codec.decode(payload).tensors
    return np.concatenate([np.ravel(tensors[k]).astype(np.float32) for k in sorted(tensors)])


async def _quiet(aw: object) -> None:
    try:
        await aw  # type: ignore[misc]
    except TransportError as exc:
        log.warning("secure aggregation: %s", exc)

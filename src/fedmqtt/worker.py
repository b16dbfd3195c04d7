"""A worker of the root aggregator: one of several processes that share the devices' updates, check them
and sum them, so that the one process that owns the model only adds sums.

Every worker subscribes to ``$share/{group}/{prefix}/{federation}/updates/+`` (an MQTT 5 shared
subscription: the broker hands each update to one member of the group). A worker checks each update as the
aggregator would (``validation.check_update``: fingerprint, names, shapes, staleness against the newest
published version, de-duplication; finite values and the norm bound; the per-device rate and share bounds
over what this worker sees, fed evenly by the shared subscription), buffers up to k of them, for at most
``max_wait`` seconds, and sends one **combined update** to the owner on ``.../combined/{worker}``: the
staleness-weighted mean Σ w(sᵢ)·Δᵢ / k on the newest version it has seen, its members named in
``fedmqtt.members``. The owner (``fedmqtt aggregator --workers``) takes it as k updates of FedBuff's buffer
(``ClientUpdate.updates``): the same sum as if they had come one by one, each weighed by its staleness at the
worker (at most one publish interval behind the owner).

Acks stay truthful: a device update is acknowledged ``accepted`` only once the owner has acknowledged, hence
applied and journaled, the combined update carrying it (site.py: the same ledger and outbox). Nothing is
applied twice: the owner keeps every member in its de-duplication window and refuses a combined update that
carries one applied before (``duplicate_member``, naming them); a device's re-send can reach another worker
while the first one still holds it, or after it died between the owner's ack and its own. The worker then
answers those members ``accepted`` (they were applied) and lets the others go unanswered: their devices
re-send them, and they are taken again.

A worker has no broker session to lose (clean start): what the broker was delivering to a worker that dies is
dropped, never acknowledged, and its devices re-send it (their outbox) to the workers that are left. With a
``state_dir``, the combined updates it had sent are sent again on restart under the same ids.

Two connections: ``connection`` takes the devices' updates (and the model) and answers the devices;
``upstream`` (client id ``...-up``) sends the sums and takes the aggregator's acks. On one connection, the
PUBACKs for the updates queued behind the worker's own 400 kB sums in its socket; a busy broker then saw no
PUBACK, stopped sending updates to the worker, and the sums waited seconds for theirs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedmqtt import admission, dedup
from fedmqtt import members as members_
from fedmqtt.admission import Admission, AdmissionLimits
from fedmqtt.errors import Reason
from fedmqtt.schemas import Ack
from fedmqtt.service import Loop
from fedmqtt.site import Member, Site, SiteConfig
from fedmqtt.strategies.staleness import StalenessFn, polynomial
from fedmqtt.topics import Topics, check_segment
from fedmqtt.transport import ConnectOptions, Connector, Transport
from fedmqtt.types import Array, check_id

log = logging.getLogger("fedmqtt.worker")
MAX_BUFFER = 40  # members: their ids (128 characters at most) stay within members.MAX_BYTES


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str  # unique among the workers; the owner acknowledges combined updates to it
    topics: Topics = field(default_factory=Topics)
    group: str = "fedmqtt-workers"  # the shared subscription's group: every worker of a federation in one
    buffer_size: int = 16  # k: device updates per combined update, at most ...
    max_wait: float = 0.02  # ... and seconds the first of them waits for the others
    state_dir: str | Path | None = None  # ledger and outbox (site.py); None: memory only
    max_staleness: int = 64
    staleness: StalenessFn = field(default_factory=lambda: polynomial(0.5))
    max_update_norm: float | None = 1e3
    ack_timeout: float = 10.0  # re-send a combined update the owner has not acknowledged after this long
    client_id: str | None = None
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)  # per device, on this worker's share

    def __post_init__(self) -> None:
        check_id(self.worker_id, "worker id")
        check_segment(self.group, "share group")
        if not 1 <= self.buffer_size <= MAX_BUFFER:
            raise ValueError(f"a worker combines 1 to {MAX_BUFFER} updates")
        if self.max_wait <= 0:
            raise ValueError("max_wait must be positive")


class Worker(Site):
    def __init__(self, connect: Connector, initial: Mapping[str, Array], config: WorkerConfig) -> None:
        cfg = config
        client_id = cfg.client_id or f"fedmqtt-{cfg.topics.federation}-worker-{cfg.worker_id}"
        super().__init__(connect, initial, SiteConfig(
            cfg.worker_id, cfg.topics, cfg.buffer_size, cfg.state_dir, cfg.max_staleness, cfg.staleness,
            cfg.ack_timeout, client_id, cfg.max_update_norm))
        self.name = f"worker-{cfg.worker_id}"
        self.worker = cfg
        self.updates_filter = self.topics.shared(cfg.group, self.topics.updates_wildcard)
        self.upstream_topic = self.topics.combined(cfg.worker_id)
        self.buffered_at = 0.0  # when the oldest update in the buffer arrived
        self.released = 0  # combined updates refused as a whole (their members re-sent by their devices)
        self.admission = Admission()
        self.up: Transport | None = None  # the upstream connection, while connected

    def loops(self) -> dict[str, Loop]:
        client_id = self.config.client_id or self.name
        down = ConnectOptions(client_id, on_message=self._on_message)  # clean start
        up = ConnectOptions(f"{client_id}-up", on_message=self._on_message)
        return {"connection": self.connection(down, self._subscribe),
                "upstream": self.connection(up, self._subscribe_up, slot="up"), "resender": self._resender(),
                "acks": self._ack_sender(), "combiner": self._combiner()}

    async def _subscribe(self, t: Transport) -> None:
        await t.subscribe(self.updates_filter, qos=1)
        await t.subscribe(self.topics.model, qos=1)

    async def _subscribe_up(self, t: Transport) -> None:
        await t.subscribe(self.topics.acks(self.config.site_id), qos=1)
        for upstream, pending in list(self.outbox.items()):
            await self._send_up(t, upstream, pending.payload)

    def _upstream(self) -> Transport | None:
        return self.up

    async def _combiner(self) -> None:
        """Sends a partly filled buffer once its oldest update has waited ``max_wait``."""
        wait = self.worker.max_wait
        while not await self.sleep(wait / 2):
            if self.buffer and time.monotonic() - self.buffered_at >= wait:
                self._combine()
                self.changed()

    def _on_update(self, agent: str, payload: bytes) -> None:
        empty = not self.buffer
        super()._on_update(agent, payload)
        if empty and self.buffer:
            self.buffered_at = time.monotonic()

    def _admit(self, agent: str, num_samples: int) -> str | None:
        now, limits = time.monotonic(), self.worker.admission
        refused = admission.check(self.admission, agent, now, limits)
        if refused is None:
            self.admission = admission.record(self.admission, agent, now, limits, num_samples)
        return refused

    def _extra(self, members: list[Member]) -> dict[str, str]:
        return {members_.MEMBERS: members_.encode(members)}

    def _settle(self, ack: Ack) -> None:
        carried = self.pending.get(ack.update_id)
        if carried is None:
            return  # a duplicate delivery
        refused = ack.status != "accepted" and ack.reason != Reason.DUPLICATE.value
        if ack.reason == Reason.DUPLICATE_MEMBER.value or (refused and len(carried) > 1):
            self._release(ack, carried)
        else:
            super()._settle(ack)

    def _release(self, ack: Ack, carried: list[Member]) -> None:
        """Refused as a whole: members the owner names as applied before are answered ``accepted`` (through
        another combined update); the others go unanswered and leave the de-duplication window, so that
        their devices' re-sends are taken and judged again. No delta is kept for this: holding every pending
        sum's updates cost as much memory as the owner's acks took time."""
        applied = set(ack.members or ()) if ack.reason == Reason.DUPLICATE_MEMBER.value else set()
        del self.pending[ack.update_id]
        settled = [(a, u) for a, u, _ in carried if dedup.key(a, u) in applied]
        self._record({"released": ack.update_id, "version": ack.version, "applied": settled})
        if ack.update_id in self.outbox:
            del self.outbox[ack.update_id]
        for agent, update_id, base in carried:
            self.carried.pop((agent, update_id), None)
            if (agent, update_id) not in settled:
                self.seen = dedup.discard(self.seen, dedup.key(agent, update_id), base)
        for agent, update_id in settled:
            answer = Ack(update_id=update_id, status="accepted", version=ack.version)
            self.answered[(agent, update_id)] = answer
            self._answer(agent, answer)
            self.local_accepted += 1
        self.released += 1
        log.info("%s: %s refused (%s: %s): %d of its %d members were applied before, the others will be "
                 "re-sent", self.name, ack.update_id, ack.reason, ack.detail, len(settled), len(carried))

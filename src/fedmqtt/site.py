"""A site aggregator: the aggregator of a site's devices on the site's own broker, and one agent of the
upstream federation. Devices at a site talk to their local broker; a Mosquitto bridge (``fedmqtt.bridge``)
carries the global model down and the site's own update topics up, nothing else.

The site checks each local update as the aggregator would (``validation.check_update``: fingerprint,
names, shapes, staleness against the newest global version it has seen, de-duplication), buffers K of them
and sends **one update upstream per K local ones**: their FedBuff mean Σ w(sᵢ)·Δᵢ / K with sᵢ each one's
staleness against the global version when the K-th arrives, on the base of that version, with a deterministic id
``{site}-{instance}-{seq}``. It keeps no model of its own: the devices train on the global model.

Exactly once, end to end, and truthful acks: a local update is acknowledged ``accepted`` only when the root
has acknowledged the combined update that carries it (``rejected`` with the root's reason if the root refuses
it). Before a combined update is sent, the site records its members in ``ledger.jsonl`` and the update in
its outbox (both fsynced, in ``state_dir``); after the root's ack it records ``acked`` and drops the
outbox copy. After a crash, pending combined updates are sent again under the same id (the root answers a
duplicate if it had applied it: it is applied once), and a device re-sending an update that a combined
update carries is answered when that one is, never counted twice. Local updates still in the buffer at the
crash were never acknowledged: their devices re-send them.

What the site reveals upstream: one delta per K local updates, their total sample count, and its own id;
not which devices took part, nor any single device's update (with K ≥ 2; the root can still difference
versions it publishes, docs/security.md section 5).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmqtt import acks, codec, dedup, validation
from fedmqtt.errors import CodecError, InvalidUpdate, Reason, TransportError
from fedmqtt.files import atomic_write
from fedmqtt.outbox import Outbox, Pending
from fedmqtt.schemas import Ack, dump
from fedmqtt.service import Loop, Service
from fedmqtt.strategies.staleness import StalenessFn, polynomial
from fedmqtt.topics import Topics
from fedmqtt.transport import ConnectOptions, Connector, Message, Transport
from fedmqtt.types import Array, check_id

log = logging.getLogger("fedmqtt.site")
Member = tuple[str, str, int]  # agent, update id, base version


@dataclass(frozen=True)
class SiteConfig:
    site_id: str  # the site's agent id upstream
    topics: Topics = field(default_factory=Topics)  # the same names at the site and upstream (bridged 1:1)
    buffer_size: int = 10  # K local updates per upstream update
    state_dir: str | Path | None = None  # ledger, outbox and instance id; None: memory only (tests)
    max_staleness: int = 64
    staleness: StalenessFn = field(default_factory=lambda: polynomial(0.5))
    ack_timeout: float = 30.0  # re-send a combined update the root has not acknowledged after this long
    client_id: str | None = None
    max_update_norm: float | None = 1e3  # each local update's bound on ‖Δ‖₂, as the root's (None: none)

    def __post_init__(self) -> None:
        check_id(self.site_id)
        if self.buffer_size < 1:
            raise ValueError("a site combines at least one update")


class Site(Service):
    def __init__(self, connect: Connector, initial: Mapping[str, Array], config: SiteConfig) -> None:
        self.config = cfg = config
        self.topics = cfg.topics
        super().__init__(f"site-{cfg.site_id}", connect)
        params = {k: np.asarray(v) for k, v in initial.items()}
        self.reference = validation.Reference.of(params)
        self.version = -1  # the newest global version seen (-1: none yet) ...
        self.epoch: str | None = None  # ... in this epoch of the root
        self.early: list[tuple[str, bytes]] = []  # updates on a version not seen here yet (bounded)
        self.seen = dedup.Seen()
        self.buffer: list[tuple[Member, dict[str, Array], int]] = []  # member, its delta, its sample count
        self.pending: dict[str, list[Member]] = {}  # upstream id -> its members, until the root acks it
        self.carried: dict[tuple[str, str], str] = {}  # (agent, update id) -> the upstream id carrying it
        self.answered: dict[tuple[str, str], Ack] = {}  # settled local updates -> their ack (re-sends)
        self.sent_up = self.bytes_up = self.local_accepted = self.local_rejected = 0
        self.upstream_refused = 0
        self.acked_up = 0  # combined updates the root applied (accepted, or a duplicate of one it had)
        directory = Path(cfg.state_dir) if cfg.state_dir is not None else None
        self.outbox = Outbox(directory / "outbox" if directory else None, cfg.site_id)
        self._ledger = directory / "ledger.jsonl" if directory else None
        self.instance = self._instance(directory)
        self._seq = 0
        self._publishing: set[asyncio.Future[Any]] = set()
        self._weights: dict[int, float] = {}
        self._acks: asyncio.Queue[tuple[str, Ack]] = asyncio.Queue(maxsize=10_000)
        self.acks_dropped = 0
        self.updates_filter = self.topics.updates_wildcard  # what the site takes: every local device's updates
        self.upstream_topic = self.topics.update(cfg.site_id)  # where its combined updates go
        self._load()

    # ---- durable state ----------------------------------------------------------------------------------
    @staticmethod
    def _instance(directory: Path | None) -> str:
        if directory is None:
            return secrets.token_hex(4)
        path = directory / "instance"
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write(path, secrets.token_hex(4).encode())
        return path.read_text().strip()

    def _record(self, record: dict[str, Any]) -> None:
        if self._ledger is None:
            return
        with self._ledger.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _load(self) -> None:
        if self._ledger is None or not self._ledger.exists():
            return
        members: dict[str, list[Member]] = {}
        for line in self._ledger.read_text().splitlines():
            r = json.loads(line)
            self._seq = max(self._seq, int(r.get("seq", 0)))
            if "members" in r:
                members[r["id"]] = [(str(a), str(u), int(b)) for a, u, b in r["members"]]
            elif "released" in r:  # a worker's, refused as a whole: some members applied before, the rest re-send
                members.pop(r["released"], None)
                if r["released"] in self.outbox:
                    del self.outbox[r["released"]]
                for agent, update_id in r["applied"]:
                    self.answered[(agent, update_id)] = Ack(update_id=update_id, status="accepted",
                                                            version=r["version"])
            elif "acked" in r:
                if r["acked"] in self.outbox:  # the crash came between the ledger and the outbox's delete
                    del self.outbox[r["acked"]]
                ack = r["ack"]
                for agent, update_id, _ in members.pop(r["acked"], []):
                    self.answered[(agent, update_id)] = Ack(update_id=update_id, status=ack["status"],
                                                            version=ack["version"], reason=ack.get("reason"))
        for upstream, ms in members.items():
            if upstream in self.outbox:  # sent, or about to be: wait for the root's answer
                self.pending[upstream] = ms
                for agent, update_id, _ in ms:
                    self.carried[(agent, update_id)] = upstream
            # else: the crash came between the ledger and the outbox: never sent, its members re-send
        log.info("%s: %d combined updates pending, %d local updates settled", self.name, len(self.pending),
                 len(self.answered))

    # ---- lifecycle --------------------------------------------------------------------------------------
    def loops(self) -> dict[str, Loop]:
        opts = ConnectOptions(self.config.client_id or f"fedmqtt-{self.topics.federation}-site-{self.config.site_id}",
                              clean_start=False, session_expiry=3600, on_message=self._on_message)
        return {"connection": self.connection(opts, self._subscribe), "resender": self._resender(),
                "acks": self._ack_sender()}

    async def _subscribe(self, t: Transport) -> None:
        await t.subscribe(self.updates_filter, qos=1)
        await t.subscribe(self.topics.model, qos=1)
        await t.subscribe(self.topics.acks(self.config.site_id), qos=1)
        for upstream, pending in list(self.outbox.items()):
            await self._send_up(t, upstream, pending.payload)

    async def _resender(self) -> None:
        while not await self.sleep(max(self.config.ack_timeout / 4, 0.05)):
            t, now = self._upstream(), time.monotonic()
            for upstream, pending in list(self.outbox.items()):
                if t is not None and now - pending.sent_at > self.config.ack_timeout:
                    await self._send_up(t, upstream, pending.payload)

    # ---- messages ---------------------------------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        if msg.topic == self.topics.model:
            self._on_model(msg.payload)
        elif msg.topic == self.topics.acks(self.config.site_id):
            self._on_upstream_ack(msg.payload)
        elif (agent := self.topics.agent_of_update(msg.topic)) is not None and agent != self.config.site_id \
                and not msg.retain:
            self._on_update(agent, msg.payload)
        self.changed()

    def _on_model(self, payload: bytes) -> None:
        try:
            meta = codec.header_metadata(codec.read_header(payload)[0])
            version, epoch = int(meta["fedmqtt.version"]), meta.get("fedmqtt.epoch", "")
        except (CodecError, KeyError, ValueError) as exc:
            log.warning("%s: unreadable global model: %s", self.name, exc)
            return
        if epoch != self.epoch:  # the root started afresh (a restored backup): its versions count anew
            if self.epoch is not None:
                log.warning("%s: new epoch upstream (%s, version %d): following it", self.name, epoch, version)
            self.epoch, self.version, self.seen = epoch, version, dedup.Seen()
        elif version > self.version:
            self.version = version
            self.seen = dedup.expire(self.seen, version - self.config.max_staleness)
        else:
            return
        early, self.early = self.early, []
        for agent, payload in early:  # updates on this version that came before it reached the site
            self._on_update(agent, payload)

    def _on_update(self, agent: str, payload: bytes) -> None:
        if self.version < 0:
            return  # no global model yet: unanswered, the device re-sends
        try:
            checked = validation.check_update(payload, agent, reference=self.reference, version=self.version,
                                              max_staleness=self.config.max_staleness, seen=self.seen)
            validation.check_norm(checked.tensors, self.config.max_update_norm)  # finite, and within the bound
        except InvalidUpdate as exc:
            if exc.reason == Reason.DUPLICATE:  # settled: the same answer again; else held: answered with the rest
                if (agent, exc.update_id or "") in self.answered:
                    self._answer(agent, self.answered[(agent, exc.update_id or "")])
                return
            if exc.reason == Reason.FUTURE_BASE and len(self.early) < 1_000:
                self.early.append((agent, payload))  # the device got the new model before the site did
                return
            self.local_rejected += 1
            self._answer(agent, Ack(update_id=exc.update_id or "", status="rejected", version=self.version,
                                    reason=exc.reason.value, detail=exc.detail))
            return
        info = checked.info
        key = (agent, info.update_id)
        if key in self.answered:
            self._answer(agent, self.answered[key])  # settled: the same answer again
            return
        if key in self.carried:
            return  # in a combined update the root has not answered yet
        refused = self._admit(agent, info.num_samples)
        if refused is not None:
            self.local_rejected += 1
            self._answer(agent, Ack(update_id=info.update_id, status="rejected", version=self.version,
                                    reason=refused, detail=f"{agent!r} is over its {refused.split('_')[0]} bound"))
            return
        self.seen = dedup.add(self.seen, dedup.key(agent, info.update_id), info.base_version, 100_000)
        self.buffer.append(((agent, info.update_id, info.base_version), checked.tensors, info.num_samples))
        if len(self.buffer) >= self.config.buffer_size:
            self._combine()

    def _combine(self) -> None:
        """The buffer's FedBuff mean, recorded and put in the outbox, then sent upstream."""
        batch, self.buffer = self.buffer, []
        self._seq += 1
        self._send_combined(f"{self.config.site_id}-{self.instance}-{self._seq}", batch)

    def _send_combined(self, upstream: str, batch: list[tuple[Member, dict[str, Array], int]]) -> None:
        k = len(batch)
        mean: dict[str, np.ndarray[Any, np.dtype[np.float32]]] = {}
        for (_, _, base), delta, _ in batch:  # in place: one model-sized array per tensor, whatever k
            w = np.float32(self._weight(max(0, self.version - base)) / k)
            for n, d in delta.items():
                if n in mean:
                    np.add(mean[n], w * np.asarray(d, np.float32), out=mean[n])
                else:
                    mean[n] = w * np.asarray(d, np.float32)
        members = [m for m, *_ in batch]
        payload = codec.encode_update(mean, agent=self.config.site_id, update_id=upstream,
                                      base_version=self.version, num_samples=sum(n for *_, n in batch),
                                      model_fingerprint=self.reference.fingerprint, extra=self._extra(members))
        self._record({"seq": self._seq, "id": upstream, "members": members})  # first: a crash now re-sends nothing
        self.outbox[upstream] = Pending(payload, time.monotonic())  # the resender waits from now
        self.pending[upstream] = members
        for agent, update_id, _ in members:
            self.carried[(agent, update_id)] = upstream
        t = self._upstream()
        if t is not None:
            self._spawn(self._send_up(t, upstream, payload))

    def _admit(self, agent: str, num_samples: int) -> str | None:
        """A per-device bound's reason to refuse this update (a worker's; a site's devices are bounded by
        the site broker's ACL and their own root-side share)."""
        return None

    def _weight(self, staleness: int) -> float:
        """w(s), memoised: the staleness function is a JAX function, costly to call per update."""
        if staleness not in self._weights:
            self._weights[staleness] = float(self.config.staleness(staleness))
        return self._weights[staleness]

    def _upstream(self) -> Transport | None:
        """The connection combined updates go up on (a site's one connection)."""
        return self.transport

    def _extra(self, members: list[Member]) -> dict[str, str]:
        """More metadata for a combined update (a worker names its members)."""
        return {}

    async def _send_up(self, t: Transport, upstream: str, payload: bytes) -> None:
        try:
            await t.publish(self.upstream_topic, payload, qos=1)
        except TransportError as exc:  # the resender tries again
            log.warning("%s: upstream send of %s failed: %s", self.name, upstream, exc)
            return
        if upstream in self.outbox:
            self.outbox[upstream] = Pending(payload, time.monotonic(), self.outbox[upstream].sends + 1)
        self.sent_up += 1
        self.bytes_up += len(payload)

    def _on_upstream_ack(self, payload: bytes) -> None:
        try:
            ack = Ack.model_validate_json(payload)
        except ValueError:
            return
        self._settle(ack)

    def _settle(self, ack: Ack) -> None:
        """The root's answer to a combined update: its members are answered with it."""
        members = self.pending.pop(ack.update_id, None)
        if members is None:
            return  # a duplicate delivery, or an ack for another client
        applied = ack.status == "accepted" or ack.reason == Reason.DUPLICATE.value  # duplicate: applied before
        local = Ack(update_id="", status="accepted" if applied else "rejected", version=ack.version,
                    reason=None if applied else ack.reason, detail=None if applied else f"upstream: {ack.detail}")
        self._record({"acked": ack.update_id, "ack": local.model_dump(exclude={"update_id", "detail"})})
        if ack.update_id in self.outbox:
            del self.outbox[ack.update_id]
        if applied:
            self.acked_up += 1
        else:
            self.upstream_refused += 1
            log.warning("%s: the root refused %s: %s (%s)", self.name, ack.update_id, ack.reason, ack.detail)
        for agent, update_id, _ in members:
            self.carried.pop((agent, update_id), None)
            answer = local.model_copy(update={"update_id": update_id})
            self.answered[(agent, update_id)] = answer
            self._answer(agent, answer)
            if applied:
                self.local_accepted += 1
            else:
                self.local_rejected += 1
        while len(self.answered) > 100_000:
            self.answered.pop(next(iter(self.answered)))

    def _answer(self, agent: str, ack: Ack) -> None:
        try:
            self._acks.put_nowait((agent, ack))
        except asyncio.QueueFull:
            self.acks_dropped += 1  # the device re-sends; the answer is kept for it

    def _ack_sender(self) -> Loop:
        """The devices' acks, from the queue ``_answer`` fills (fedmqtt.acks)."""
        return acks.send_queued(self._acks, lambda: self.transport, lambda item: (self.topics.acks(item[0]),
                                                                                  dump(item[1])))

    def _spawn(self, coro: Any) -> None:
        """Publish from a message callback: a task, kept until it is done. A publish lost with the connection
        is answered again: the device re-sends, the resender re-sends upstream."""
        async def quietly() -> None:
            try:
                await coro
            except TransportError as exc:
                log.info("%s: %s", self.name, exc)

        task = asyncio.ensure_future(quietly())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

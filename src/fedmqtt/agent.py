"""The edge agent: take the newest global model, train E local steps, publish the delta, repeat.

It never waits for other agents: after each local round it starts again from the newest model it holds
(in ``sync`` mode, announced by the model's ``fedmqtt.mode``, it trains once per version instead). It takes
the model when a round starts (pull delivery: the retained copy, not every version; see ``_next_model``) and
sends its update compressed when ``compression`` says so (top-k with error feedback; compression.py).
Presence is a retained status with a last will that marks it offline; the connection is re-made with
jittered exponential backoff; updates wait in an outbox until the aggregator acknowledges them (on disk
with ``outbox_dir``, so that a reboot keeps them; see outbox.py).

Lifecycle (service.py): ``async with EdgeAgent(...) as agent: await agent.wait_updates(10)``; named loops
``connection``, ``training`` and ``resender`` (and ``allocation`` when the config's ``allocation`` is set:
capabilities in the status and the coordinator's assignment followed, protocol 1.1; see agent_allocation.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from fedmqtt import codec, global_model, signing
from fedmqtt.agent_allocation import AgentAllocation, batch_size_of
from fedmqtt.agent_config import AgentConfig, AllocationConfig, GlobalModel
from fedmqtt.assignment import Settings
from fedmqtt.compression import Compressor
from fedmqtt.data import as_source
from fedmqtt.errors import CodecError, IncompatibleModel, InvalidUpdate, TransportError
from fedmqtt.outbox import Outbox, Pending, log_level, outcome, paced
from fedmqtt.privacy import ClientPrivacy
from fedmqtt.schemas import Ack, Status, dump
from fedmqtt.secure_member import SecureMember
from fedmqtt.service import Loop, Service
from fedmqtt.training import Trainer, delta_of
from fedmqtt.transport import ConnectOptions, Connector, Message, Transport, Will
from fedmqtt.types import Array, check_id

__all__ = ["AgentConfig", "AllocationConfig", "EdgeAgent", "GlobalModel", "Pending", "delta_of"]
log = logging.getLogger("fedmqtt.agent")


class EdgeAgent(Service):
    """One device. ``trainer`` knows the model and loss; ``data`` is ArrayData, (x, y) or an async stream."""

    def __init__(
        self,
        connect: Connector,
        agent_id: str,
        trainer: Trainer,
        data: Any,
        config: AgentConfig | None = None,
        on_ack: Callable[[Ack], None] | None = None,
    ) -> None:
        self.agent_id = check_id(agent_id)
        self.config = config or AgentConfig()
        super().__init__(self.agent_id, connect, self.config.backoff_max)
        self.topics = self.config.topics
        self.trainer = trainer
        self.data = as_source(data)
        self.fingerprint = codec.fingerprint(trainer.initial)
        self._on_ack = on_ack
        self.model: GlobalModel | None = None
        self._model_changed = asyncio.Event()
        self.alloc = (AgentAllocation(self.agent_id, self.config, self.data.num_samples, batch_size_of(self.data))
                      if self.config.allocation is not None else None)
        self.outbox = Outbox(self.config.outbox_path(self.agent_id), self.agent_id)
        self._outbox_space = asyncio.Event()
        # secure aggregation sums one update per member and step: a second one held would only grow stale
        self._max_outbox = 1 if self.config.secure else self.config.max_outbox
        if len(self.outbox) < self._max_outbox:
            self._outbox_space.set()
        self.updates_sent = 0
        self._future_base = 0  # consecutive future_base rejections
        self._resubscribe: asyncio.Task[None] | None = None
        self.acks: dict[str, int] = {"accepted": 0, "rejected": 0, "unknown": 0}
        self.unknown: collections.deque[str] = collections.deque(maxlen=1000)  # ids of the recent "unknown"
        self.last_rejection: Ack | None = None
        self.pause = 0.0  # seconds between local rounds, while the aggregator says rate_limited
        self.last_loss: float | None = None
        self.trained_versions: list[tuple[str, int]] = []  # (epoch, version) of recent local rounds
        self.error: str | None = None
        self._state = "online"
        self.privacy = ClientPrivacy(self.config.dp, self.agent_id) if self.config.dp is not None else None
        if self.config.model_key is not None:
            signing.check_public(self.config.model_key)
        self._compressor = Compressor(self.config.compression)  # with top-k's residual
        self._peeked = False  # pull: this round has peeked at the retained model on this connection
        self._fresh = False  # a model arrived since the last round took one
        self._model_subscribed: str | None = None  # pull: the topic subscribed to until a usable model comes
        self.models_received = 0
        form = self.config.model_download
        self._model_topic = self.topics.model if form == "float32" else self.topics.model_form(form)
        self._form_seen = form == "float32"  # the aggregator publishes the chosen form (seen once)
        self._spec = {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in trainer.initial.items()}
        self.secure = (SecureMember(self.agent_id, self.topics, lambda u: p.payload if (p := self.outbox.get(u))
                                    else None, settle=self._settle) if self.config.secure else None)

    # ---- lifecycle ------------------------------------------------------------------------------
    def loops(self) -> dict[str, Loop]:
        will = Will(self.topics.status(self.agent_id), self._status("offline"), qos=1, retain=True)
        opts = ConnectOptions(f"fedmqtt-{self.topics.federation}-agent-{self.agent_id}", will=will,
                              clean_start=False, session_expiry=self.config.session_expiry,
                              on_message=self._on_message)
        loops = {"connection": self.connection(opts, self._on_connect), "training": self._training_loop(),
                 "resender": self._resender()}
        if self.alloc is not None:
            loops["allocation"] = self.alloc.serve(self)
        if self.secure is not None:
            loops["secagg"] = self.secure.serve(lambda: self.transport)
        return loops

    async def starting(self) -> None:
        """With allocation: time this device's own training round before advertising it."""
        if self.alloc is not None:
            await self.alloc.probe(self.trainer, self.data, self.config.local_steps, self.config.round_seconds)

    @property
    def reassigned(self) -> Settings | None:
        """An assignment to another federation or task: this agent then ends its run (see agent_allocation)."""
        return self.alloc.reassigned if self.alloc is not None else None

    async def closing(self) -> None:
        """A clean goodbye; the will covers the rest."""
        t = self.transport
        if t is not None and self.connected.is_set():
            await self._publish_status(t, "offline")

    async def wait_model(self, timeout: float = 10.0) -> GlobalModel:
        await self.wait_until(lambda: self.model is not None, timeout, lambda: "no global model")
        assert self.model is not None
        return self.model

    async def wait_updates(self, n: int, timeout: float = 60.0) -> None:
        """Wait until ``n`` updates have been acknowledged (accepted or rejected)."""
        await self.wait_until(lambda: sum(self.acks.values()) >= n, timeout,
                              lambda: f"{self.acks}, wanted {n} acks")

    # ---- connection -----------------------------------------------------------------------------
    def _status(self, state: str) -> bytes:
        version = self.model.info.version if self.model else None
        caps = self.alloc.capabilities(self.last_loss) if self.alloc is not None and state != "offline" else None
        return dump(Status(agent=self.agent_id, state=state, version=version,  # type: ignore[arg-type]
                           updates_sent=self.updates_sent, ts=time.time(), capabilities=caps))

    async def _publish_status(self, t: Transport, state: str) -> None:
        self._state = state
        await self._timed(t, self.topics.status(self.agent_id), self._status(state), retain=True)
        if self.alloc is not None:
            self.alloc.advertised(self.last_loss, time.monotonic())

    async def advertise(self) -> None:
        """Republish the status (with allocation: its capabilities as of now), if connected."""
        t = self.transport
        if t is not None and self.connected.is_set():
            with contextlib.suppress(TransportError):  # the next connect publishes it anyway
                await self._publish_status(t, self._state)

    async def _timed(self, t: Transport, topic: str, payload: bytes, retain: bool = False) -> None:
        """A QoS 1 publish; with allocation, its time to the PUBACK feeds the link estimate."""
        started = time.monotonic()
        await t.publish(topic, payload, qos=1, retain=retain)
        if self.alloc is not None:
            self.alloc.published(len(payload), time.monotonic() - started)

    async def _on_connect(self, t: Transport) -> None:
        await self._publish_status(t, "online")
        await t.subscribe(self.topics.acks(self.agent_id), qos=1)
        if self.secure is not None:
            await t.subscribe(self.secure.topic, qos=1)
        if self.alloc is not None and self.alloc.topic is not None:  # the retained assignment comes at once
            await t.subscribe(self.alloc.topic, qos=1)
        if self.config.model_delivery == "push":
            await t.subscribe(self._waiting_topic(), qos=1)
        else:
            if self._model_subscribed:  # a kept session may still hold the subscription
                await t.unsubscribe(self._model_subscribed)
                self._model_subscribed = None
            self._peeked = False  # a pull in progress peeks again on this connection
        for update_id, pending in list(self.outbox.items()):  # re-send what was never acked
            await self._send(update_id, pending.payload)

    def _on_message(self, msg: Message) -> None:
        if msg.topic in (self._model_topic, self.topics.model):
            self._form_seen = self._form_seen or msg.topic == self._model_topic
            self._on_model(msg.payload)
        elif msg.topic == self.topics.acks(self.agent_id):
            self._on_ack_message(msg.payload)
        elif self.secure is not None and msg.topic == self.secure.topic:
            self.secure.receive(msg.payload)
        elif self.alloc is not None and msg.topic == self.alloc.topic and self.alloc.offer(msg.payload):
            log.info("%s: assignment %s", self.agent_id, self.alloc.settings)
        self.changed()

    def _on_model(self, payload: bytes) -> None:
        try:
            info, tensors = global_model.accept(payload, self.fingerprint, self._spec, self.config.model_key)
        except (CodecError, InvalidUpdate, IncompatibleModel) as exc:
            self.error = f"global model refused: {exc}"
            log.error("%s: %s", self.agent_id, self.error)
            return
        self.models_received += 1
        if global_model.supersedes(info, self.model.info if self.model else None):
            self.model = GlobalModel(info, tensors)
            self._fresh = True
            self._model_changed.set()

    def _on_ack_message(self, payload: bytes) -> None:
        try:
            self._settle(Ack.model_validate_json(payload))
        except ValueError:
            return

    def _settle(self, ack: Ack) -> None:
        """What an ack means for the outbox, the counters and the pace (from the aggregator, or from the secure
        member refusing to offer an update)."""
        self._watch_base(ack)
        pending = self.outbox.pop(ack.update_id, None)
        if pending is None and ack.update_id:
            return  # an ack for an update already settled (a duplicate delivery)
        if pending is not None:
            self._outbox_space.set()
        settled = outcome(ack, pending)
        self.acks[settled] += 1
        self.pause = paced(self.pause, ack)
        if settled == "unknown":
            self.unknown.append(ack.update_id)
            log.info("%s: update %s re-sent and refused as stale: an earlier copy may have been applied",
                     self.agent_id, ack.update_id)
        elif settled == "rejected":
            self.last_rejection = ack
            log.log(log_level(ack), "%s: %s rejected: %s (%s)", self.agent_id, ack.update_id, ack.reason, ack.detail)
        if self._on_ack:
            self._on_ack(ack)

    def _watch_base(self, ack: Ack) -> None:
        """Updates refused as ``future_base`` again and again mean the model held is not the aggregator's
        (a forged retained model, or an aggregator that went back): drop it, take the retained one again."""
        if ack.reason != "future_base":
            if ack.status == "accepted":
                self._future_base = 0
            return
        self._future_base += 1
        t = self.transport
        if self._future_base >= 3 and t is not None:
            log.warning("%s: %d updates refused as future_base: dropping model version %s, taking the retained "
                        "model again", self.agent_id, self._future_base,
                        self.model.info.version if self.model else None)
            self._future_base = 0
            self.model = None
            if self.config.model_delivery == "push":  # pull takes the retained model before the next round
                self._resubscribe = asyncio.get_running_loop().create_task(self._retake(t))

    async def _retake(self, t: Transport) -> None:
        with contextlib.suppress(TransportError):  # lost with the connection: the next connect subscribes anew
            await t.subscribe(self._waiting_topic(), qos=1)

    # ---- training and sending -------------------------------------------------------------------
    async def _next_model(self) -> GlobalModel:
        """The newest model; in sync mode, one newer than the last this agent trained on.

        Pull delivery: the agent peeks at the retained model (subscribe and unsubscribe at once, so that
        only the retained copy comes); only when that brings nothing usable (no model yet, or in sync mode
        the version it already trained on) does it stay subscribed until a new version comes. Its link
        then carries one model per local round, not one per global version."""
        pull = self.config.model_delivery == "pull"
        while True:
            m = self.model
            last = self.trained_versions[-1] if self.trained_versions else None
            trained = last is not None and m is not None and m.info.epoch == last[0] and m.info.version <= last[1]
            if m is not None and not (m.info.mode == "sync" and trained) and (not pull or self._fresh):
                if pull:
                    await self._end_pull()
                self._fresh = False  # the next round pulls again
                return m
            if pull and not self._peeked:
                await self._peek()
                continue  # what the peek brought is in self.model already
            if pull and not self._model_subscribed:
                await self._subscribe_model()
                continue
            self._model_changed.clear()
            await self._model_changed.wait()

    async def _peek(self) -> None:
        t = self.transport
        if t is None or not self.connected.is_set():
            await self.connected.wait()  # set once on_connect has run: then peek on the new connection
            return
        try:  # QoS 0: no PUBACK on the device's link, and no durable consumer on brokers that make one per
            # QoS 1 subscription (NATS); a copy lost with the connection is peeked again on the next one
            await t.peek(self._model_topic, qos=0)
            if not self._fresh and self._model_topic != self.topics.model:  # no such form published (yet)
                await t.peek(self.topics.model, qos=0)
            self._peeked = True
        except TransportError:
            await asyncio.sleep(0.5)  # the connection is going: the next one peeks again

    async def _subscribe_model(self) -> None:
        t = self.transport
        if t is None or not self.connected.is_set():
            await self.connected.wait()  # a new connection peeks first (_on_connect)
            return
        try:
            topic = self._waiting_topic()
            await t.subscribe(topic, qos=1)
            self._model_subscribed = topic
        except TransportError:
            await asyncio.sleep(0.5)

    async def _end_pull(self) -> None:
        self._peeked = False
        t = self.transport
        if self._model_subscribed and t is not None and self.connected.is_set():
            with contextlib.suppress(TransportError):  # a session that is lost ends its subscription anyway
                await t.unsubscribe(self._model_subscribed)
                self._model_subscribed = None

    def _waiting_topic(self) -> str:
        """Where to wait for the next version: the chosen form once the aggregator is seen publishing it."""
        return self._model_topic if self._form_seen else self.topics.model

    async def _training_loop(self) -> None:
        cfg = self.config
        while True:
            if self.pause:
                await asyncio.sleep(self.pause)
            steps = cfg.local_steps
            if self.alloc is not None:  # as assigned (it may sit rounds out)
                if (got := await self.alloc.next_round(self.data, self._compressor, cfg.encoding)) is None:
                    return  # moving to another federation: no more rounds here
                steps, self._compressor = got
            fallback = await self._next_model()
            if self.reassigned is not None:  # came while the model was awaited: no round here any more
                return
            await self._outbox_space.wait()
            batches = await self.data.take(steps)
            model, new, self.last_loss, started = await asyncio.to_thread(self._local_round, batches, fallback)
            tensors = delta_of(new, model.params) if cfg.encoding == "delta" else new
            if self.privacy is not None:
                tensors = self.privacy(tensors)
            extra: dict[str, str] = {}
            if self._compressor.setting.method != "none":
                sent = self._compressor(tensors)
                tensors, extra = sent.tensors, sent.metadata
            self.trained_versions.append((model.info.epoch, model.info.version))
            del self.trained_versions[:-100]
            update_id = uuid.uuid4().hex
            payload = codec.encode_update(
                tensors, agent=self.agent_id, update_id=update_id, base_version=model.info.version,
                num_samples=self.data.num_samples, encoding=cfg.encoding, model_fingerprint=self.fingerprint,
                extra=extra)
            remaining = cfg.round_seconds * (steps / cfg.local_steps) - (time.monotonic() - started)
            if remaining > 0:
                await asyncio.sleep(remaining)
            if self.alloc is not None:  # the whole round, padding included: an emulated device's speed
                self.alloc.round_done(steps, time.monotonic() - started, batch_size_of(batches))
            await self.outbox.put(update_id, Pending(payload, time.monotonic()))  # on disk before it is sent
            if len(self.outbox) >= self._max_outbox:
                self._outbox_space.clear()
            await self._send(update_id, payload)  # then the next round's model: it may hold this update

    def _local_round(self, batches: Any, fallback: GlobalModel) -> tuple[GlobalModel, dict[str, Array], float, float]:
        """Train on the newest model held when the computation starts (in a worker thread). Where many
        agents share a few cores (the fleet simulation), an agent may wait for a thread; taking the model
        and the round's start time only then keeps that wait out of its staleness and its device time."""
        started = time.monotonic()
        model = self.model or fallback  # None only just after dropping a model the aggregator refuses
        new, loss = self.trainer.train(model.params, batches)
        return model, new, loss, started

    async def _send(self, update_id: str, payload: bytes) -> None:
        t = self.transport
        if t is None:
            return  # stays in the outbox; sent after the next connect
        try:
            if self.secure is not None:
                await self.secure.offer(t, update_id, payload)
            else:
                await self._timed(t, self.topics.update(self.agent_id), payload)
            self.updates_sent += 1
            pending = self.outbox.get(update_id)
            if pending is not None:
                self.outbox[update_id] = Pending(payload, time.monotonic(), pending.sends + 1)
        except TransportError as exc:
            log.warning("%s: publish failed, kept in outbox: %s", self.agent_id, exc)

    async def _resender(self) -> None:
        while True:
            await asyncio.sleep(max(self.config.ack_timeout / 4, 0.05))
            now = time.monotonic()
            for update_id, pending in list(self.outbox.items()):
                if now - pending.sent_at > self.config.ack_timeout:
                    await self._send(update_id, pending.payload)

"""The aggregator service: the thin asyncio shell around the sans-I/O core (core.py).

It moves bytes and time and decides nothing: each received update goes to ``core.receive``; the records
of the returned effects go to the store (durability.py: the journal with a state directory, else nothing)
and the replies and the new version come back from it once the records are durable, to be sent as acks and
published as the retained model. Timers call ``core.flush`` when a sync round or an overdue step is due.

Lifecycle (service.py): ``async with Aggregator(...) as agg: ...`` or ``await agg.run()``. Named loops:
``connection`` (subscribe to updates and presence; reconnects with jittered backoff), ``publisher`` (model +
metrics), ``acks``, ``committer`` and ``snapshotter`` (the store), ``evaluator`` and ``steps`` (sync rounds,
overdue partial steps). Republishes coalesce: one model publish at a time, carrying the newest committed version;
``publish_interval`` (50 ms) and ``metrics_interval`` (0.5 s) cap how often the model and the metrics go out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedmqtt import acks, core, global_model, ownership
from fedmqtt.compression import MODEL_FORMS
from fedmqtt.core import Limits, Reply, ServerState, Timing
from fedmqtt.durability import Durability, Store, Volatile
from fedmqtt.errors import ConfigError, StateError, TransportError
from fedmqtt.files import Fsync
from fedmqtt.histogram import Durations
from fedmqtt.presence import Presence
from fedmqtt.schemas import Metrics, Status, dump
from fedmqtt.service import Loop, Service
from fedmqtt.signing import Signer
from fedmqtt.strategies.base import Strategy
from fedmqtt.topics import Topics
from fedmqtt.transport import ConnectOptions, Connector, Message, Transport, Will
from fedmqtt.types import Array

log = logging.getLogger("fedmqtt.aggregator")
Evaluate = Callable[[dict[str, Array]], Mapping[str, float]]


@dataclass(frozen=True)
class AggregatorConfig:
    topics: Topics = field(default_factory=Topics)
    limits: Limits = field(default_factory=Limits)  # what the core accepts: staleness, norm, size, held updates
    timing: Timing = field(default_factory=Timing)  # sync rounds and partial steps
    state_dir: str | Path | None = None  # durable state (journal + snapshots); None: memory only
    snapshot_every: int = 500  # journal records between snapshots ...
    snapshot_interval: float = 60.0  # ... or seconds since the last one (if any record was written)
    keep_journal: bool = False  # keep old journal segments: an audit ledger of every applied update
    publish_interval: float = 0.05  # at most one model publish per interval (newest version wins)
    metrics_interval: float = 0.5  # at most one metrics publish per interval
    eval_interval: float = 0.5
    max_queued: int = 1024  # acks waiting to be sent or for their fsync; more are dropped, counted (re-sent)
    max_online: int = 100_000  # agents tracked as online; presence beyond this is not tracked
    client_id: str | None = None  # default fedmqtt-{federation}-aggregator (stable: the session survives)
    session_expiry: int = 3600  # the broker queues updates this long while the aggregator is away
    backoff_max: float = 10.0
    signing_key: str | Path | None = None  # Ed25519 PEM file: sign every model published (protocol 1.1)
    model_forms: tuple[str, ...] = ()  # also publish the model compressed (float16, int8) on model/<form>
    workers: bool = False  # take workers' combined updates (fedmqtt.worker) instead of the devices' own


class Aggregator(Service):
    """Owns the global model; ``state`` is the core's :class:`~fedmqtt.core.ServerState`."""

    def __init__(self, connect: Connector, initial: Mapping[str, Array], strategy: Strategy,
                 config: AggregatorConfig | None = None, evaluate: Evaluate | None = None,
                 fsync: Fsync = os.fsync) -> None:
        self.config = cfg = config or AggregatorConfig()
        super().__init__(f"aggregator {cfg.topics.federation}", connect, cfg.backoff_max)
        self.topics = cfg.topics
        self.rules = core.rules(strategy, initial, cfg.limits)
        self.state = core.init(self.rules, initial, epoch=uuid.uuid4().hex[:16])
        self.store: Store = (Durability(cfg.state_dir, self._release, cfg.snapshot_every, cfg.snapshot_interval,
                                        cfg.keep_journal, cfg.max_queued, fsync)
                             if cfg.state_dir is not None else Volatile(self._release))
        self.committed = self.state  # the newest state whose version may be published (its records are durable)
        self._evaluate = evaluate
        self._signer = Signer.from_file(cfg.signing_key) if cfg.signing_key is not None else None
        if set(cfg.model_forms) - set(MODEL_FORMS):
            raise ConfigError(f"model forms {list(cfg.model_forms)}: each one of {', '.join(MODEL_FORMS)}")
        if cfg.workers and (not strategy.sums or self.rules.gated):
            raise ConfigError(f"workers send sums of updates: {strategy.name} cannot take them (use fedbuff, "
                              "the mean, without DP or a robust rule)")
        self._recovered = False
        self.presence = Presence(cfg.max_online)
        self.eval: dict[str, float] = {}
        self.evaluated_version: int | None = None
        self.acks_dropped = 0
        self._acks: asyncio.Queue[Reply] = asyncio.Queue(maxsize=cfg.max_queued)
        self._dirty = asyncio.Event()
        self._published_version, self._rate = -1, deque[float](maxlen=256)
        self._step_started = time.monotonic()
        self._own: deque[bytes] = deque(maxlen=32)  # digests of recent model publishes (ownership.digest)
        self.models_restored = self.retained_cleared = 0  # foreign models replaced; retained updates cleared
        self._to_clear: set[str] = set()  # update topics holding a retained message, to be cleared
        self._clearing: set[str] = set()  # cleared, their empty message not yet seen
        self.handling = Durations()  # the time each update took here (not counting the journal's fsync)

    # ---- reading the state ------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.state.version

    @property
    def params(self) -> dict[str, Any]:
        return self.state.params

    @property
    def strategy(self) -> Strategy:
        return self.rules.strategy

    @property
    def committed_version(self) -> int:
        """The newest version that survives a crash (equal to ``version`` without ``state_dir``)."""
        return self.committed.version

    def numpy_params(self) -> dict[str, Array]:
        """The current global parameters as numpy arrays."""
        return {k: np.asarray(v) for k, v in self.state.params.items()}

    def model_payload(self, form: str | None = None) -> bytes:
        """The newest committed model, encoded for the retained model topic (or, with ``form``, compressed
        for ``model/<form>``)."""
        s = self.committed
        payload = global_model.encode(s.params, s.version, mode=self.strategy.mode,
                                      fingerprint=self.rules.reference.fingerprint, epoch=s.epoch, form=form)
        return self._signer.sign(payload) if self._signer is not None else payload

    def metrics(self) -> Metrics:
        c, gate = self.state.counters, self.state.gate
        n = sum(c.staleness.values())
        now = time.monotonic()
        recent = [t for t in self._rate if now - t < 10.0]
        span = now - recent[0] if len(recent) > 1 else 0.0
        report = (self.strategy.report(self.committed.strategy, self.committed.gate.most_taken())
                  if self.strategy.report is not None else {})
        return Metrics(
            version=self.committed_version, accepted=c.accepted, rejected=sum(c.rejected.values()),
            rejected_by_reason=dict(c.rejected), strategy=self.strategy.name, accuracy=self.eval.get("accuracy"),
            loss=self.eval.get("loss"), evaluated_version=self.evaluated_version,
            staleness_mean=(sum(k * v for k, v in c.staleness.items()) / n) if n else None,
            staleness_max=max(c.staleness) if n else None,
            staleness_hist={str(k): v for k, v in sorted(c.staleness.items())}, agents_online=len(self.presence),
            updates_per_s=(len(recent) - 1) / span if span > 0 else 0.0, ts=time.time(),
            dropped=self.acks_dropped + self.store.dropped + gate.dropped, held=len(gate.held),
            retained_cleared=self.retained_cleared, models_restored=self.models_restored,
            statuses_refused=self.presence.refused, **report)

    # ---- feeding the core -------------------------------------------------------------------------------
    def recover(self) -> int:
        """Load the state directory (snapshot + journal replay); returns the records replayed. Called on
        entry; safe to call again."""
        if self._recovered:
            return 0
        self.state, replayed = self.store.open(self.rules, self.state)
        self.committed = self.state
        self._recovered = True
        if replayed or self.state.version:
            log.info("recovered version %d (%d journal records replayed)", self.state.version, replayed)
        return replayed

    def handle(self, agent: str, payload: bytes, combined: bool = False) -> None:
        """One update from ``agent``'s topic (a worker's, when ``combined``), through the core; its ack and
        any new version are released once its journal record is durable."""
        self.recover()
        now = time.monotonic()
        self._take(*core.receive(self.state, agent, payload, self.rules, now, combined), now)
        if self.strategy.mode == "sync" and self._flush_due(now):
            self.close_round()  # at once: a round takes its first arrivals, not whatever came until a timer
        self.handling.add(time.monotonic() - now)

    def close_round(self) -> bool:
        """Sync mode, or an overdue step: the strategy's flush; True when it made a new version."""
        self.recover()
        state, effects = core.flush(self.state, self.rules)
        self._take(state, effects, time.monotonic())
        return effects.stepped

    def _take(self, state: ServerState, effects: core.Effects, now: float) -> None:
        if self.failure is not None:
            return  # stopping: nothing more is applied or acknowledged
        try:
            self.store.append(effects.records)  # write-ahead: before the state moves on, before any effect
        except OSError as exc:
            self.fail(StateError(f"cannot write the journal ({exc}); stopping, nothing further is acknowledged"))
            return
        self.state = state
        for r in effects.replies:
            if r.accepted:
                self._rate.append(now)
                self.presence.trained(r.agent, r.version)
        if effects.stepped:
            self._step_started = now
        self.store.hold(effects.replies, state if effects.stepped else None)
        self._dirty.set()

    def _ack_message(self, r: Reply) -> tuple[str, bytes]:
        return self.topics.acks(r.agent), dump(acks.of_reply(r))

    def _release(self, replies: Sequence[Reply], state: ServerState | None) -> None:
        """From the store: these replies and this version are durable now."""
        for r in replies:
            try:
                self._acks.put_nowait(r)
            except asyncio.QueueFull:
                self.acks_dropped += 1  # the agent's outbox re-sends; the de-duplication window answers
        if state is not None and state.version > self.committed.version:
            self.committed = state
        self._dirty.set()
        self.changed()

    def _on_model(self, msg: Message) -> None:
        """The model topic is ours alone: anything else there is replaced by our newest model; a model of our
        epoch above our version means our state is behind what was published: a new epoch (ownership.py)."""
        c, info = self.committed, ownership.model_info(msg.payload, self.rules.reference.max_header)
        verdict = ownership.judge_model(info, ownership.digest(msg.payload), version=c.version, epoch=c.epoch,
                                        own=self._own, restarted=not self._own)
        if verdict == "ours":
            return
        if verdict == "behind":
            epoch = uuid.uuid4().hex[:16]
            log.warning("the model topic holds a version above this aggregator's %d in its epoch (a restored "
                        "backup, or a forged model): starting epoch %s", c.version, epoch)
            self.store.set_epoch(epoch)
            self.state = self.state._replace(epoch=epoch)
            self.committed = self.committed._replace(epoch=epoch)
        if verdict != "old-own":
            log.warning("a model this aggregator did not publish was on %s: replacing it", msg.topic)
            self.models_restored += 1
        self._published_version = -1  # publish ours again (after a publish in flight, if any)
        self._dirty.set()

    def _on_message(self, msg: Message) -> None:
        if msg.topic == self.topics.model:
            self._on_model(msg)
            return
        agent = self.topics.agent_of_update(msg.topic)
        if agent is not None and msg.retain:  # a stored copy, replayed at every connect: never an update
            if msg.payload:
                self._to_clear.add(msg.topic)
                self._dirty.set()
            return
        if agent is not None and not msg.payload and msg.topic in self._clearing:
            self._clearing.discard(msg.topic)  # our own clearing of a retained copy, coming back to us
            return
        if agent is not None:
            self.handle(agent, msg.payload)
            return
        worker = self.topics.worker_of_combined(msg.topic) if self.config.workers else None
        if worker is not None and msg.payload and not msg.retain:
            self.handle(worker, msg.payload, combined=True)
            return
        agent = self.topics.agent_of_status(msg.topic)
        if agent is not None:
            try:
                state = Status.model_validate_json(msg.payload).state if msg.payload else "offline"
                self.presence.status(agent, state != "offline", time.monotonic())
            except ValueError:
                self.presence.refused += 1  # not a status: presence stays as it was
            self.changed()

    # ---- lifecycle --------------------------------------------------------------------------------------
    async def starting(self) -> None:
        self.recover()
        assert self._connect is not None
        try:
            await ownership.check_alone(self._connect, self.topics, self.store.instance)
        except (TransportError, TimeoutError) as exc:  # best effort: the broker may not be up yet
            log.warning("could not check for another aggregator on this federation: %s", exc)
        except StateError:
            self.store.close(lambda: self.state)  # releases the state directory
            raise

    def loops(self) -> dict[str, Loop]:
        cfg = self.config
        client_id = cfg.client_id or f"fedmqtt-{self.topics.federation}-aggregator"
        will = Will(self.topics.aggregator_status, ownership.presence(self.store.instance, "offline"))
        opts = ConnectOptions(client_id, will=will, clean_start=False, session_expiry=cfg.session_expiry,
                              on_message=self._on_message)
        loops: dict[str, Loop] = {"connection": self.connection(opts, self._subscribe),
                                  "publisher": self._publisher(),
                                  "acks": acks.send_queued(self._acks, lambda: self.transport, self._ack_message),
                                  "committer": self.store.committer(),
                                  "snapshotter": self.store.snapshotter(lambda: self.state)}
        if self._evaluate is not None:
            loops["evaluator"] = self._evaluator(self._evaluate)
        if self.strategy.mode == "sync" or self.rules.gated:
            clocked = self.strategy.mode == "sync" or self.strategy.sampling is not None
            loops["steps"] = self._steps(0.02 if clocked else 0.5)
        return loops

    async def closing(self) -> None:
        """A clean stop leaves the last counts on the retained metrics topic."""
        t = self.transport
        if t is not None and self.connected.is_set():
            await t.publish(self.topics.metrics, dump(self.metrics()), qos=1, retain=True)
            await self._announce(t, "offline")

    async def closed(self) -> None:
        self.store.close(lambda: self.state)  # a clean stop leaves a snapshot: the next start replays nothing

    @property
    def online(self) -> set[str]:
        return self.presence.online

    def round_members(self) -> int:
        """Agents a sync round waits for (presence.py); the horizon is two round deadlines."""
        horizon = 2 * (self.config.timing.round_deadline or 30.0)
        return self.presence.round_members(self.state.version, time.monotonic(), horizon)

    async def wait_version(self, version: int, timeout: float) -> None:
        """Wait until the published model reaches ``version``."""
        await self.wait_until(lambda: self._published_version >= version, timeout,
                              lambda: f"version {version} not published (at {self.version})")

    # ---- loops ------------------------------------------------------------------------------------------
    async def _subscribe(self, t: Transport) -> None:
        await t.subscribe(self.topics.combined_wildcard if self.config.workers else self.topics.updates_wildcard,
                          qos=1)
        await t.subscribe(self.topics.status_wildcard, qos=1)
        await t.subscribe(self.topics.model, qos=1)  # to notice a model that is not ours
        await self._announce(t, "online")
        self._published_version = -1  # republish after (re)connecting
        self._dirty.set()

    async def _announce(self, t: Transport, state: Literal["online", "offline"]) -> None:
        await t.publish(self.topics.aggregator_status, ownership.presence(self.store.instance, state), qos=1,
                        retain=True)

    async def _publisher(self) -> None:
        """Model at most every ``publish_interval`` (the newest committed version), metrics at most every
        ``metrics_interval``: under load, many versions fold into one publish."""
        cfg = self.config
        last_metrics = -float("inf")
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            started = time.monotonic()
            t = self.transport
            if t is None or not self.connected.is_set():
                await self.connected.wait()
                self._dirty.set()
                continue
            try:
                while self._to_clear:
                    topic = self._to_clear.pop()
                    self._clearing.add(topic)
                    await t.publish(topic, b"", qos=1, retain=True)
                    self.retained_cleared += 1
                if self._published_version != self.committed_version:
                    version, payload = self.committed_version, self.model_payload()
                    self._own.append(ownership.digest(payload))
                    self._published_version = -2  # until published; a foreign model seen meanwhile makes it -1
                    await t.publish(self.topics.model, payload, qos=1, retain=True)
                    for form in cfg.model_forms:
                        await t.publish(self.topics.model_form(form), self.model_payload(form), qos=1, retain=True)
                    self._published_version = version if self._published_version == -2 else -1  # -1: once more
                    self.changed()
                if time.monotonic() - last_metrics >= cfg.metrics_interval:
                    await t.publish(self.topics.metrics, dump(self.metrics()), qos=1, retain=True)
                    last_metrics = time.monotonic()
                else:
                    self._dirty.set()  # metrics still owed; sent once the interval has passed
            except TransportError as exc:
                log.warning("publish failed: %s", exc)
                self._dirty.set()
            await asyncio.sleep(max(0.0, cfg.publish_interval - (time.monotonic() - started)))  # from start to start

    async def _evaluator(self, evaluate: Evaluate) -> None:
        while True:
            if self.evaluated_version != self.version:
                version, params = self.version, self.numpy_params()
                self.eval = dict(await asyncio.to_thread(evaluate, params))
                self.evaluated_version = version
                self._dirty.set()
            await asyncio.sleep(self.config.eval_interval)

    async def _steps(self, tick: float) -> None:
        """Sync rounds and overdue partial steps: the core says when (core.flush_due)."""
        while True:
            await asyncio.sleep(tick)
            if self._flush_due(time.monotonic()):
                self.close_round()

    def _flush_due(self, now: float) -> bool:
        return core.flush_due(self.state, self.rules, self.config.timing, self.round_members(),
                              now - self._step_started)


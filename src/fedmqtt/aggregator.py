"""The asyncio aggregator: validate each update as it arrives, apply it, republish the retained model.

Lifecycle: ``async with Aggregator(...) as agg: await agg.wait_closed()`` (or ``run()``). Inside, one
TaskGroup holds named tasks: ``connection`` (connect, subscribe, receive and handle; reconnects with
jittered backoff), ``publisher`` (model + metrics), ``acks``, ``evaluator`` and, in sync mode, ``rounds``.

Republishes coalesce: at most one model publish is in flight; updates applied meanwhile fold into the
next one, which always carries the newest version; ``publish_interval`` (50 ms) and ``metrics_interval``
(0.5 s) cap how often the model and the metrics go out.

Durability (``state_dir``; durability.py, journal.py and docs/reliability.md): ``handle`` writes each accepted
update to the journal before applying it; acknowledgements and model publishes are held until the
``committer`` task's fsync covers their record; ``snapshotter`` writes snapshots; ``recover`` (called on
entry) loads the newest snapshot and replays the journal after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np

from fedmqtt import codec, journal
from fedmqtt.durability import Durability
from fedmqtt.errors import ConfigError, InvalidUpdate, Reason, StateError, TransportError
from fedmqtt.gate import StepGate
from fedmqtt.lifecycle import cancel_all
from fedmqtt.schemas import Ack, Metrics, Status, dump
from fedmqtt.strategies.base import ClientUpdate, Strategy
from fedmqtt.topics import Topics, valid_segment
from fedmqtt.transport import ConnectOptions, Connector, Message
from fedmqtt.types import Array
from fedmqtt.validation import Checked, DedupWindow, Reference, check_norm, check_update, dedup_key

log = logging.getLogger("fedmqtt.aggregator")
Evaluate = Callable[[dict[str, Array]], Mapping[str, float]]


@dataclass(frozen=True)
class AggregatorConfig:
    topics: Topics = field(default_factory=Topics)
    max_staleness: int = 64  # async only; sync rounds accept base == version alone
    max_update_norm: float | None = 1e3  # bound on ‖Δ‖₂; None disables
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    dedup_capacity: int = 100_000
    publish_interval: float = 0.05  # at most one model publish per interval (newest version wins)
    metrics_interval: float = 0.5  # at most one metrics publish per interval
    eval_interval: float = 0.5
    round_size: int | None = None  # sync: updates per round (None: agents online)
    round_deadline: float | None = None  # sync: close a round after this many seconds with >= 1 update
    round_fraction: float | None = None  # sync: round = the first ceil(fraction × agents online) updates
    max_queued: int = 1024  # received updates held unprocessed; more are counted as dropped (agents re-send)
    backoff_max: float = 10.0
    client_id: str | None = None  # default fedmqtt-{federation}-aggregator (stable: the session survives)
    session_expiry: int = 3600  # the broker queues updates this long while the aggregator is away
    state_dir: str | Path | None = None  # durable state (journal + snapshots); None: memory only
    snapshot_every: int = 500  # journal records between snapshots ...
    snapshot_interval: float = 60.0  # ... or seconds since the last one (if any record was written)
    keep_journal: bool = False  # keep old journal segments: an audit ledger of every applied update
    max_online: int = 100_000  # agents tracked as online; presence beyond this is not tracked
    privacy: Callable[[Any], Mapping[str, Any]] | None = None  # strategy state -> extra metrics (DP ε)
    one_update_per_step: bool = False  # hold an agent's second update until the next step (central DP; gate.py)
    max_held: int = 1024  # updates held by one_update_per_step; more are dropped unacknowledged (re-sent)
    max_held_per_agent: int = 8  # ... from one agent (the agent's default outbox size)
    max_held_bytes: int = 256 << 20  # ... in payload bytes
    step_deadline: float | None = 30.0  # with held updates, close a partial step after this many seconds


class Aggregator:
    """Owns the global model. ``handle`` is the synchronous core; the rest moves bytes."""

    def __init__(
        self,
        connect: Connector,
        initial: Mapping[str, Array],
        strategy: Strategy,
        config: AggregatorConfig | None = None,
        evaluate: Evaluate | None = None,
        version: int = 0,
    ) -> None:
        self.config = cfg = config or AggregatorConfig()
        self.topics = cfg.topics
        self.strategy = strategy
        self.sync = strategy.mode == "sync"
        self.max_staleness = 0 if self.sync else cfg.max_staleness
        self._connect = connect
        self._evaluate = evaluate
        self.params: dict[str, Any] = {k: jnp.asarray(v) for k, v in initial.items()}
        self.reference = Reference.of({k: np.asarray(v) for k, v in initial.items()})
        self.state = strategy.init(self.params)
        self.version = version
        self.epoch = uuid.uuid4().hex[:16]  # kept in state_dir, so a recovered aggregator keeps it
        self._history: dict[int, dict[str, Any]] = {version: self.params}
        # Past versions are needed only to turn deltas into weights (FedAsync, FedAvg); a delta strategy
        # (FedBuff) keeps just the current one, so a weights-encoded update to it must be based on it.
        self._history_len = self.max_staleness + 1 if strategy.wants == "weights" else 1
        self.applied = DedupWindow(cfg.dedup_capacity)
        if cfg.one_update_per_step and self.sync:
            raise ConfigError("one_update_per_step is for asynchronous strategies; a sync round takes one "
                              "update per agent already")
        self.gate = (StepGate(cfg.max_held, cfg.max_held_per_agent, cfg.max_held_bytes)
                     if cfg.one_update_per_step else None)
        self._gate_opened = False  # a step was taken: held updates may go in
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.staleness: Counter[int] = Counter()
        self.online: set[str] = set()
        self.eval: dict[str, float] = {}
        self.evaluated_version: int | None = None
        self._round_started = time.monotonic()
        self._round_count = 0
        self._dirty = asyncio.Event()
        self._acks: asyncio.Queue[tuple[str, Ack]] = asyncio.Queue(maxsize=cfg.max_queued)
        self._connected = asyncio.Event()
        self._published_version = -1
        self._transport: Any = None
        self._tasks: asyncio.TaskGroup | None = None
        self._running: list[asyncio.Task[None]] = []
        self._closing = asyncio.Event()
        self._rate: deque[float] = deque(maxlen=256)
        self.acks_dropped = 0
        self._dropped_before = 0  # incoming drops counted by earlier connections
        # with a state_dir, once recovered: the newest version whose journal records are fsynced is published
        self.durability: Durability | None = None
        self._committed: tuple[int, dict[str, Any]] = (self.version, self.params)

    # ---- the synchronous core -------------------------------------------------------------------
    def handle(self, topic_agent: str, payload: bytes, arrived: int | None = None) -> Ack | None:
        """Validate and apply one update; returns the acknowledgement for its sender, or None when the update
        is held for the next step (``one_update_per_step``; acknowledged when applied). ``arrived`` is the
        version at which a held update arrived: its staleness bound is judged as of then. Never raises for
        bad input: every rejection is counted by reason."""
        update_id: str | None = None
        waited = self.version - arrived if arrived is not None else 0
        try:
            checked = check_update(payload, topic_agent, reference=self.reference, version=self.version,
                                   max_staleness=self.max_staleness + waited, applied=self.applied,
                                   max_payload=self.config.max_payload)
            update_id = checked.info.update_id
            if self.gate is not None and not self.gate.admits(topic_agent):
                self.gate.hold(dedup_key(topic_agent, update_id), topic_agent, payload,
                               self.version if arrived is None else arrived)
                return None
            update = self._client_update(checked, self.config.max_update_norm)
            params, state, stepped = self.strategy.apply(self.params, update, self.state)
        except InvalidUpdate as exc:
            self.rejected[exc.reason.value] += 1
            self._dirty.set()
            log.info("rejected update from %s: %s", topic_agent, exc)
            return Ack(update_id=update_id or exc.update_id or "", status="rejected", version=self.version,
                       reason=exc.reason.value, detail=exc.detail[:300])
        if self.durability is not None:  # write-ahead: the record exists before any effect is visible
            self.durability.append_update(topic_agent, payload)
        self._apply(checked, params, state, stepped)
        return Ack(update_id=checked.info.update_id, status="accepted", version=self.version)

    def _client_update(self, checked: Checked, max_norm: float | None) -> ClientUpdate:
        """What the strategy wants from a checked update; raises InvalidUpdate (base_unavailable, non_finite,
        norm)."""
        info = checked.info
        base = self._history.get(info.base_version)
        needs_base = info.encoding == "weights" or self.strategy.wants == "weights"
        if base is None and needs_base:
            raise InvalidUpdate(Reason.BASE_UNAVAILABLE, f"base version {info.base_version} no longer held")
        # numpy on the hot path: the jitted strategy takes numpy arrays directly, and small element-wise
        # work here costs less than extra JAX dispatches.
        tensors = checked.tensors
        if info.encoding == "delta":
            check_norm(tensors, max_norm)
            delta = tensors
            new = None
            if self.strategy.wants == "weights":
                assert base is not None
                new = {k: np.add(np.asarray(base[k]), v) for k, v in tensors.items()}
        else:
            assert base is not None
            delta = {k: np.subtract(v, np.asarray(base[k])) for k, v in tensors.items()}
            check_norm(delta, max_norm)
            new = tensors
        value = new if self.strategy.wants == "weights" else delta
        return ClientUpdate(value, np.int32(checked.staleness), np.float32(info.num_samples))

    def _apply(self, checked: Checked, params: dict[str, Any], state: Any, stepped: Any) -> None:
        self.state = state
        self.applied.add(dedup_key(checked.info.agent, checked.info.update_id), checked.info.base_version)
        if self.gate is not None:
            self.gate.admit(checked.info.agent)
        self.accepted += 1
        self.staleness[checked.staleness] += 1
        self._round_count += 1
        self._rate.append(time.monotonic())
        if bool(stepped):
            self._advance(params)

    def _advance(self, params: dict[str, Any]) -> None:
        self.params = params
        self.version += 1
        if self.durability is None:
            self._committed = (self.version, params)
        else:  # published once the record that made it is durable
            self.durability.hold_version(self.version, params)
        self._history[self.version] = params
        self._history.pop(self.version - self._history_len, None)
        self.applied.expire(self.version - self.max_staleness)
        self._round_started = time.monotonic()
        self._round_count = 0
        if self.gate is not None:
            self.gate.advance()
            self._gate_opened = True
        self._dirty.set()

    def round_target(self) -> int:
        """Sync mode: updates that close a round (round_size, else a fraction of, else all agents online)."""
        online = max(len(self.online), 1)
        if self.config.round_size:
            return self.config.round_size
        if self.config.round_fraction:
            return max(1, -(-int(self.config.round_fraction * online * 1000) // 1000))  # ceil, float-safe
        return online

    def close_round(self) -> bool:
        """Sync mode: average the round's updates into a new version (if any arrived)."""
        params, self.state, stepped = self.strategy.flush(self.params, self.state)
        if bool(stepped):
            if self.durability is not None:
                self.durability.append_flush()
            self._advance(params)
            return True
        return False

    # ---- durability -----------------------------------------------------------------------------
    @property
    def committed_version(self) -> int:
        """The newest version that survives a crash (equal to ``version`` without ``state_dir``)."""
        return self._committed[0]

    def recover(self) -> int:
        """With ``state_dir``: load the newest snapshot, replay the journal after it, open the journal for
        appending; returns the number of records replayed. Called on entry; safe to call again."""
        cfg = self.config
        if self.durability is not None or cfg.state_dir is None:
            return 0
        durability = Durability(cfg.state_dir, cfg.snapshot_every, cfg.snapshot_interval, cfg.keep_journal)
        self.epoch = durability.epoch(self.epoch)
        replayed = durability.open(self._restore, self._replay)
        self.durability = durability
        self._committed = (self.version, self.params)
        log.info("recovered version %d from %s (snapshot at record %d, %d replayed)", self.version,
                 durability.directory, durability.snapshot_seq, replayed)
        return replayed

    def _replay(self, rec: journal.Record) -> None:
        try:
            if rec.kind == journal.UPDATE:
                self._replay_update(rec.agent, rec.payload)
            elif rec.kind == journal.FLUSH:
                self.close_round()
        except InvalidUpdate as exc:  # never silently skip an acknowledged update
            raise StateError(f"journal record {rec.seq} cannot be replayed ({exc}); was the aggregator's "
                             "model or strategy changed?") from exc

    def _replay_update(self, agent: str, payload: bytes) -> None:
        """Re-apply a journalled update: the structural checks again, but not the policy bounds (staleness,
        norm, size) that accepted it, so a changed limit cannot drop an acknowledged update."""
        checked = check_update(payload, agent, reference=self.reference, version=self.version,
                               max_staleness=1 << 62, applied=self.applied, max_payload=1 << 62)
        update = self._client_update(checked, None)
        params, state, stepped = self.strategy.apply(self.params, update, self.state)
        self._apply(checked, params, state, stepped)

    def _restore(self, snap: journal.Snapshot) -> None:
        if snap.fingerprint != self.reference.fingerprint:
            raise StateError("the snapshot in state_dir belongs to a different model (fingerprint differs)")
        if snap.strategy != self.strategy.name:
            raise StateError(f"the snapshot in state_dir was written by strategy {snap.strategy!r}, "
                             f"not {self.strategy.name!r}")
        self.params = {k: jnp.asarray(v) for k, v in snap.params.items()}
        self.version = snap.version
        self.state = journal.rebuild_state(self.strategy.init(self.params), snap.state_leaves)
        self._history = {v: {k: jnp.asarray(a) for k, a in p.items()} for v, p in snap.history.items()}
        self._history[self.version] = self.params
        self.applied = DedupWindow(self.config.dedup_capacity)
        for key, base in snap.dedup:
            self.applied.add(key, base)
        self.applied.floor = max(self.applied.floor, snap.dedup_floor)
        c = snap.counters
        self.accepted = int(c.get("accepted", 0))
        self.rejected = Counter({str(k): int(v) for k, v in c.get("rejected", {}).items()})
        self.staleness = Counter({int(k): int(v) for k, v in c.get("staleness", {}).items()})
        self._round_count = int(c.get("round_count", 0))
        if self.gate is not None:
            self.gate.in_step = {str(a) for a in c.get("in_step", [])}

    def _capture(self, seq: int) -> journal.Snapshot:
        """The state after record ``seq``, by reference (jax arrays are immutable); serialised later in a
        worker thread."""
        return journal.Snapshot(
            seq=seq, version=self.version, fingerprint=self.reference.fingerprint,
            strategy=self.strategy.name, params=self.params,
            state_leaves=jax.tree_util.tree_leaves(self.state),
            history=dict(self._history), dedup=self.applied.items(), dedup_floor=self.applied.floor,
            counters={"accepted": self.accepted, "rejected": dict(self.rejected),
                      "staleness": {str(k): v for k, v in self.staleness.items()},
                      "round_count": self._round_count,
                      "in_step": sorted(self.gate.in_step) if self.gate is not None else []},
        )

    async def snapshot(self) -> None:
        """Write a snapshot now (the journal before it is then deleted, unless ``keep_journal``)."""
        if self.durability is not None:
            await self.durability.snapshot(self._capture)

    def _commit_version(self, version: int, params: dict[str, Any]) -> None:
        self._committed = (version, params)
        self._dirty.set()

    def numpy_params(self) -> dict[str, Array]:
        """The current global parameters as numpy arrays."""
        return {k: np.asarray(v) for k, v in self.params.items()}

    def model_payload(self) -> bytes:
        """The newest committed model, encoded for the retained model topic."""
        version, params = self._committed
        flat = {k: np.asarray(v) for k, v in params.items()}
        return codec.encode_model(flat, version, mode=self.strategy.mode,
                                  model_fingerprint=self.reference.fingerprint, extra={"fedmqtt.epoch": self.epoch})

    def metrics(self) -> Metrics:
        hist = {str(k): v for k, v in sorted(self.staleness.items())}
        n = sum(self.staleness.values())
        now = time.monotonic()
        recent = [t for t in self._rate if now - t < 10.0]
        span = now - recent[0] if len(recent) > 1 else 0.0
        return Metrics(
            version=self.committed_version, accepted=self.accepted, rejected=sum(self.rejected.values()),
            rejected_by_reason=dict(self.rejected), strategy=self.strategy.name,
            accuracy=self.eval.get("accuracy"), loss=self.eval.get("loss"),
            evaluated_version=self.evaluated_version,
            staleness_mean=(sum(k * v for k, v in self.staleness.items()) / n) if n else None,
            staleness_max=max(self.staleness) if n else None, staleness_hist=hist,
            agents_online=len(self.online), updates_per_s=(len(recent) - 1) / span if span > 0 else 0.0,
            ts=time.time(), dropped=self.acks_dropped + self._dropped_before
            + (self._transport.dropped if self._transport else 0) + (self.gate.dropped if self.gate is not None else 0),
            held=len(self.gate) if self.gate is not None else 0,
            **(self.config.privacy(self.state) if self.config.privacy else {}),
        )

    # ---- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self.recover()
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        loops = {"connection": self._connection_loop(), "publisher": self._publisher(), "acks": self._ack_sender()}
        if self.durability is not None:
            loops["committer"] = self.durability.committer(self._queue_ack, self._commit_version)
            loops["snapshotter"] = self.durability.snapshotter(self._capture)
        if self._evaluate is not None:
            loops["evaluator"] = self._evaluator()
        if self.sync:
            loops["rounds"] = self._rounds()
        if self.gate is not None and self.config.step_deadline is not None:
            loops["step deadline"] = self._step_deadline(self.config.step_deadline)
        self._running = [self._tasks.create_task(coro, name=name) for name, coro in loops.items()]
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._closing.set()
        assert self._tasks is not None
        await self._final_metrics()
        await cancel_all(self._running)
        with contextlib.suppress(asyncio.CancelledError):
            await self._tasks.__aexit__(None, None, None)
        if self.durability is not None:  # a clean stop leaves a snapshot, so the next start replays nothing
            self.durability.close(self._capture)
            self.durability = None

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def wait_version(self, version: int, timeout: float) -> None:
        """Wait until the published model reaches ``version``."""
        deadline = time.monotonic() + timeout
        while self._published_version < version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"version {version} not published within {timeout}s (at {self.version})")
            await asyncio.sleep(0.02)

    async def run(self) -> None:
        """Serve until cancelled."""
        async with self:
            await self._closing.wait()

    def stop(self) -> None:
        self._closing.set()

    # ---- background tasks -----------------------------------------------------------------------
    async def _connection_loop(self) -> None:
        attempt = 0
        while not self._closing.is_set():
            try:
                async with self._connect(self._connect_options()) as t:
                    self._transport = t
                    await t.subscribe(self.topics.updates_wildcard, qos=1)
                    await t.subscribe(self.topics.status_wildcard, qos=1)
                    self._connected.set()
                    self._published_version = -1  # republish after (re)connecting
                    self._dirty.set()
                    attempt = 0
                    async for msg in t.messages():  # empty where the transport calls _on_message itself
                        self._on_message(msg)
            except TransportError as exc:
                log.warning("aggregator connection: %s", exc)
            self._connected.clear()
            if self._transport is not None:
                self._dropped_before += self._transport.dropped
            self._transport = None
            attempt += 1
            delay = min(self.config.backoff_max, 0.2 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)

    def _connect_options(self) -> ConnectOptions:
        cfg = self.config
        client_id = cfg.client_id or f"fedmqtt-{self.topics.federation}-aggregator"
        return ConnectOptions(client_id, clean_start=False, session_expiry=cfg.session_expiry,
                              max_queued=cfg.max_queued, on_message=self._on_message)

    def _on_message(self, msg: Message) -> None:
        agent = self.topics.agent_of_update(msg.topic)
        if agent is not None:
            if not valid_segment(agent):  # e.g. "$x" or 200 characters: no ack topic can be built for it
                self.rejected[Reason.BAD_TOPIC.value] += 1
                self._dirty.set()
                return
            self._respond(agent, self.handle(agent, msg.payload))
            self._release_held()
            return
        agent = self.topics.agent_of_status(msg.topic)
        if agent is not None:
            try:
                state = Status.model_validate_json(msg.payload).state if msg.payload else "offline"
            except ValueError:
                return
            if state == "offline":
                self.online.discard(agent)
            elif len(self.online) < self.config.max_online:
                self.online.add(agent)

    def _release_held(self) -> None:
        """After a step, held updates go in first, one per agent per step, oldest first."""
        while self._gate_opened:
            self._gate_opened = False
            assert self.gate is not None
            for held in self.gate.ready():
                self._respond(held.agent, self.handle(held.agent, held.payload, arrived=held.version))

    def _respond(self, agent: str, ack: Ack | None) -> None:
        self._dirty.set()
        if ack is None:
            return  # held for the next step; acknowledged once applied
        if self.durability is None:
            self._queue_ack(agent, ack)
        elif not self.durability.hold_ack(agent, ack, self.config.max_queued):  # waits for the fsync, even
            self.acks_dropped += 1  # a "duplicate"; dropped: the agent's outbox re-sends, the dedup window answers

    def _queue_ack(self, agent: str, ack: Ack) -> None:
        try:
            self._acks.put_nowait((agent, ack))
        except asyncio.QueueFull:
            self.acks_dropped += 1  # the agent's outbox re-sends; the dedup window answers then

    async def _publisher(self) -> None:
        """Model at most every ``publish_interval`` (always the newest committed version), metrics at most
        every ``metrics_interval``: under load, many versions fold into one publish."""
        cfg = self.config
        last_metrics = -float("inf")
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            t = self._transport
            if t is None or not self._connected.is_set():
                await asyncio.sleep(0.05)
                self._dirty.set()
                continue
            try:
                if self._published_version != self.committed_version:
                    version, payload = self.committed_version, self.model_payload()
                    await t.publish(self.topics.model, payload, qos=1, retain=True)
                    self._published_version = version
                if time.monotonic() - last_metrics >= cfg.metrics_interval:
                    await t.publish(self.topics.metrics, dump(self.metrics()), qos=1, retain=True)
                    last_metrics = time.monotonic()
                else:
                    self._dirty.set()  # metrics still owed; sent once the interval has passed
            except TransportError as exc:
                log.warning("publish failed: %s", exc)
                self._dirty.set()
                await asyncio.sleep(0.1)
            await asyncio.sleep(cfg.publish_interval)

    async def _final_metrics(self) -> None:
        """On a clean stop, leave the last counts on the retained metrics topic."""
        t = self._transport
        if t is not None and self._connected.is_set():
            with contextlib.suppress(TransportError, TimeoutError):
                await asyncio.wait_for(t.publish(self.topics.metrics, dump(self.metrics()), qos=1, retain=True), 2)

    async def _ack_sender(self) -> None:
        """Publish acks concurrently: each QoS 1 publish waits a PUBACK round trip, so one at a time would
        cap acks at a few hundred per second; everything queued meanwhile goes out together."""
        while True:
            batch = [await self._acks.get()]
            while not self._acks.empty() and len(batch) < 256:
                batch.append(self._acks.get_nowait())
            t = self._transport
            if t is None:
                continue  # lost with the connection; the agents' outboxes re-send
            results = await asyncio.gather(
                *(t.publish(self.topics.acks(agent), dump(ack), qos=1) for agent, ack in batch),
                return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, TransportError):
                    raise r

    async def _evaluator(self) -> None:
        assert self._evaluate is not None
        while True:
            if self.evaluated_version != self.version:
                version, params = self.version, self.numpy_params()
                self.eval = dict(await asyncio.to_thread(self._evaluate, params))
                self.evaluated_version = version
                self._dirty.set()
            await asyncio.sleep(self.config.eval_interval)

    async def _step_deadline(self, seconds: float) -> None:
        """With ``one_update_per_step``, fewer than K active agents could never fill a step: when updates
        are held and no step was taken for ``seconds``, take a partial one (the strategy's ``flush``)."""
        while True:
            await asyncio.sleep(min(1.0, seconds / 4))
            assert self.gate is not None
            if len(self.gate) and time.monotonic() - self._round_started > seconds and self.close_round():
                log.info("took a partial step after %.0f s (updates held, too few agents)", seconds)
                self._release_held()

    async def _rounds(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            target = self.round_target()
            waited = time.monotonic() - self._round_started
            deadline = self.config.round_deadline
            if self._round_count >= target or (deadline and waited > deadline and self._round_count):
                self.close_round()

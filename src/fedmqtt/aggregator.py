"""The asyncio aggregator: validate each update as it arrives, apply it, republish the retained model.

Lifecycle: ``async with Aggregator(...) as agg: await agg.wait_closed()`` (or ``run()``). Inside, one
TaskGroup holds named tasks: ``connection`` (connect, subscribe, receive and handle; reconnects with
jittered backoff), ``publisher`` (model + metrics), ``acks``, ``evaluator`` and, in sync mode, ``rounds``.

Republishes coalesce: at most one model publish is in flight; updates applied meanwhile fold into the
next one, which always carries the newest version. ``publish_interval`` spaces publishes further.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np

from fedmqtt import codec
from fedmqtt.errors import InvalidUpdate, Reason, TransportError
from fedmqtt.schemas import Ack, Metrics, Status, dump
from fedmqtt.strategies.base import ClientUpdate, Strategy
from fedmqtt.topics import Topics
from fedmqtt.transport import Connector, ConnectOptions, Message
from fedmqtt.types import Array
from fedmqtt.validation import DedupWindow, Reference, check_norm, check_update, dedup_key

log = logging.getLogger("fedmqtt.aggregator")
Evaluate = Callable[[dict[str, Array]], Mapping[str, float]]


@dataclass(frozen=True)
class AggregatorConfig:
    topics: Topics = field(default_factory=Topics)
    max_staleness: int = 64  # async only; sync rounds accept base == version alone
    max_update_norm: float | None = 1e3  # bound on ‖Δ‖₂; None disables
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    dedup_capacity: int = 100_000
    publish_interval: float = 0.0  # extra spacing between model publishes (seconds)
    eval_interval: float = 0.5
    round_size: int | None = None  # sync: updates per round (None: agents online)
    round_deadline: float | None = None  # sync: close a round after this many seconds with >= 1 update
    max_queued: int = 1024  # received updates held unprocessed; more are counted as dropped (agents re-send)
    backoff_max: float = 10.0
    client_id: str = "fedmqtt-aggregator"
    session_expiry: int = 3600  # the broker queues updates this long while the aggregator is away


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
        self._history: dict[int, dict[str, Any]] = {version: self.params}
        self.applied = DedupWindow(cfg.dedup_capacity)
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
        self._add = jax.jit(lambda a, b: jax.tree.map(lambda x, y: (x + y).astype(x.dtype), a, b))
        self._sub = jax.jit(lambda a, b: jax.tree.map(lambda x, y: (x - y).astype(x.dtype), a, b))

    # ---- the synchronous core -------------------------------------------------------------------
    def handle(self, topic_agent: str, payload: bytes) -> Ack:
        """Validate and apply one update; returns the acknowledgement for its sender. Never raises
        for bad input: every rejection is counted by reason."""
        update_id: str | None = None
        try:
            checked = check_update(payload, topic_agent, reference=self.reference, version=self.version,
                                   max_staleness=self.max_staleness, applied=self.applied,
                                   max_payload=self.config.max_payload)
            info = checked.info
            update_id = info.update_id
            base = self._history.get(info.base_version)
            needs_base = info.encoding == "weights" or self.strategy.wants == "weights"
            if base is None and needs_base:
                raise InvalidUpdate(Reason.BASE_UNAVAILABLE, f"base version {info.base_version} no longer held")
            tensors = {k: jnp.asarray(v) for k, v in checked.tensors.items()}
            if info.encoding == "delta":
                check_norm(checked.tensors, self.config.max_update_norm)
                delta = tensors
                new = self._add(base, delta) if self.strategy.wants == "weights" else None
            else:
                delta = self._sub(tensors, base)
                check_norm({k: np.asarray(v) for k, v in delta.items()}, self.config.max_update_norm)
                new = tensors
            value = new if self.strategy.wants == "weights" else delta
            update = ClientUpdate(value, jnp.int32(checked.staleness), jnp.float32(info.num_samples))
            params, state, stepped = self.strategy.apply(self.params, update, self.state)
        except InvalidUpdate as exc:
            self.rejected[exc.reason.value] += 1
            self._dirty.set()
            log.info("rejected update from %s: %s", topic_agent, exc)
            return Ack(update_id=update_id or "", status="rejected", version=self.version,
                       reason=exc.reason.value, detail=exc.detail[:300])
        self.state = state
        self.applied.add(dedup_key(info.agent, info.update_id), info.base_version)
        self.accepted += 1
        self.staleness[checked.staleness] += 1
        self._round_count += 1
        self._rate.append(time.monotonic())
        if bool(stepped):
            self._advance(params)
        return Ack(update_id=info.update_id, status="accepted", version=self.version)

    def _advance(self, params: dict[str, Any]) -> None:
        self.params = params
        self.version += 1
        self._history[self.version] = params
        self._history.pop(self.version - self.max_staleness - 1, None)
        self.applied.expire(self.version - self.max_staleness)
        self._round_started = time.monotonic()
        self._round_count = 0
        self._dirty.set()

    def close_round(self) -> bool:
        """Sync mode: average the round's updates into a new version (if any arrived)."""
        params, self.state, stepped = self.strategy.flush(self.params, self.state)
        if bool(stepped):
            self._advance(params)
            return True
        return False

    def numpy_params(self) -> dict[str, Array]:
        """The current global parameters as numpy arrays."""
        return {k: np.asarray(v) for k, v in self.params.items()}

    def model_payload(self) -> bytes:
        return codec.encode_model(self.numpy_params(), self.version, mode=self.strategy.mode)

    def metrics(self) -> Metrics:
        hist = {str(k): v for k, v in sorted(self.staleness.items())}
        n = sum(self.staleness.values())
        now = time.monotonic()
        recent = [t for t in self._rate if now - t < 10.0]
        span = now - recent[0] if len(recent) > 1 else 0.0
        return Metrics(
            version=self.version, accepted=self.accepted, rejected=sum(self.rejected.values()),
            rejected_by_reason=dict(self.rejected), strategy=self.strategy.name,
            accuracy=self.eval.get("accuracy"), loss=self.eval.get("loss"),
            evaluated_version=self.evaluated_version,
            staleness_mean=(sum(k * v for k, v in self.staleness.items()) / n) if n else None,
            staleness_max=max(self.staleness) if n else None, staleness_hist=hist,
            agents_online=len(self.online), updates_per_s=(len(recent) - 1) / span if span > 0 else 0.0,
            ts=time.time(), dropped=self.acks_dropped + (self._transport.dropped if self._transport else 0),
        )

    # ---- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        loops = {"connection": self._connection_loop(), "publisher": self._publisher(), "acks": self._ack_sender()}
        if self._evaluate is not None:
            loops["evaluator"] = self._evaluator()
        if self.sync:
            loops["rounds"] = self._rounds()
        self._running = [self._tasks.create_task(coro, name=name) for name, coro in loops.items()]
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._closing.set()
        assert self._tasks is not None
        for task in self._running:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tasks.__aexit__(None, None, None)

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
                    async for msg in t.messages():
                        self._on_message(msg)
            except TransportError as exc:
                log.warning("aggregator connection: %s", exc)
            self._connected.clear()
            self._transport = None
            attempt += 1
            delay = min(self.config.backoff_max, 0.2 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)

    def _connect_options(self) -> ConnectOptions:
        cfg = self.config
        return ConnectOptions(cfg.client_id, clean_start=False, session_expiry=cfg.session_expiry,
                              max_queued=cfg.max_queued)

    def _on_message(self, msg: Message) -> None:
        agent = self.topics.agent_of_update(msg.topic)
        if agent is not None:
            ack = self.handle(agent, msg.payload)
            self._dirty.set()
            try:
                self._acks.put_nowait((agent, ack))
            except asyncio.QueueFull:
                self.acks_dropped += 1  # the agent's outbox re-sends; the dedup window answers then
            return
        agent = self.topics.agent_of_status(msg.topic)
        if agent is not None:
            try:
                state = Status.model_validate_json(msg.payload).state if msg.payload else "offline"
            except ValueError:
                return
            (self.online.add if state != "offline" else self.online.discard)(agent)

    async def _publisher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            t = self._transport
            if t is None or not self._connected.is_set():
                await asyncio.sleep(0.05)
                self._dirty.set()
                continue
            try:
                if self._published_version != self.version:
                    version, payload = self.version, self.model_payload()
                    await t.publish(self.topics.model, payload, qos=1, retain=True)
                    self._published_version = version
                await t.publish(self.topics.metrics, dump(self.metrics()), qos=1, retain=True)
            except TransportError as exc:
                log.warning("publish failed: %s", exc)
                self._dirty.set()
                await asyncio.sleep(0.1)
            if self.config.publish_interval:
                await asyncio.sleep(self.config.publish_interval)

    async def _ack_sender(self) -> None:
        while True:
            agent, ack = await self._acks.get()
            t = self._transport
            if t is None:
                continue  # lost with the connection; the agent's outbox re-sends
            with contextlib.suppress(TransportError):
                await t.publish(self.topics.acks(agent), dump(ack), qos=1)

    async def _evaluator(self) -> None:
        assert self._evaluate is not None
        while True:
            if self.evaluated_version != self.version:
                version, params = self.version, self.numpy_params()
                self.eval = dict(await asyncio.to_thread(self._evaluate, params))
                self.evaluated_version = version
                self._dirty.set()
            await asyncio.sleep(self.config.eval_interval)

    async def _rounds(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            target = self.config.round_size or max(len(self.online), 1)
            waited = time.monotonic() - self._round_started
            deadline = self.config.round_deadline
            if self._round_count >= target or (deadline and waited > deadline and self._round_count):
                self.close_round()

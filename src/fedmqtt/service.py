"""One skeleton for every async service (aggregator, agent, fleet): lifecycle, background loops, a broker
connection that comes back, and waits on events instead of polling.

Lifecycle: ``async with service:`` starts the named loops of :meth:`Service.loops` in one TaskGroup and
stops them on exit (``closing`` runs first, while still connected: a last metrics publish, an "offline"
status). ``await service.run()`` serves until :meth:`Service.stop` or a failure. A loop that fails stops
the service, and the failure is raised where the service is used (``run``, the waits, ``async with``'s exit).

``connection`` keeps one broker connection: connect, ``on_connect`` (subscribe, announce), serve until the
connection is lost or the service closes, then reconnect after a jittered exponential backoff.

Waits (:meth:`Service.wait_until`) are woken by :meth:`Service.changed`, which the service calls whenever
its observable state changes; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self

from fedmqtt.errors import TransportError
from fedmqtt.transport import ConnectOptions, Connector, Transport

log = logging.getLogger("fedmqtt.service")
Loop = Coroutine[Any, Any, None]


def backoff(attempt: int, maximum: float) -> float:
    """Seconds before reconnect attempt ``attempt`` (1, 2, ...): 0.2·2^attempt capped at ``maximum``, times a
    random factor in [0.5, 1] so that a fleet does not reconnect in lock-step after a broker restart."""
    return float(min(maximum, 0.2 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0))


async def cancel_all(tasks: Sequence[asyncio.Task[None]], interval: float = 0.5) -> None:
    """Cancel ``tasks`` and wait until all are done, re-cancelling any that shrugged it off (on Python 3.11,
    ``asyncio.wait_for`` inside aiomqtt's publish can swallow a cancellation that races with completion)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=interval)


async def first(*aws: Awaitable[None]) -> None:
    """Wait until the first of ``aws`` ends, cancel the rest; re-raise the first one's error, if any."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_all(tasks)
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


class Service:
    """Base of the aggregator, the agent and the fleet. Subclasses give ``loops`` and, if they need them,
    ``starting`` (before the loops start) and ``closing`` (before they stop). Loops that end by themselves
    when the service stops get ``stop_grace`` seconds to do so before they are cancelled."""

    stop_grace = 0.0

    def __init__(self, name: str, connect: Connector | None = None, backoff_max: float = 10.0) -> None:
        self.name = name
        self._connect = connect
        self.backoff_max = backoff_max
        self.transport: Transport | None = None
        self.connected = asyncio.Event()
        self.failure: BaseException | None = None
        self.connects = 0  # connections made (1 + reconnects)
        self.takeovers = 0  # connections the broker closed because another client took this client id
        self.last_error: str | None = None  # why the last connection attempt failed or was lost
        self._stop = asyncio.Event()  # stop() was asked for, or a loop failed
        self._closed = asyncio.Event()  # the loops are being stopped
        self._changed = asyncio.Event()
        self._waiting = 0  # coroutines in wait_until
        self._tasks: asyncio.TaskGroup | None = None
        self._running: list[asyncio.Task[None]] = []

    # ---- what subclasses give ---------------------------------------------------------------------------
    def loops(self) -> dict[str, Loop]:
        raise NotImplementedError

    async def starting(self) -> None:
        """Before the loops start."""

    async def closing(self) -> None:
        """Before the loops stop (still connected)."""

    # ---- lifecycle --------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.starting()
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._running = [self._tasks.create_task(self._guard(name, coro), name=f"{self.name}:{name}")
                         for name, coro in self.loops().items()]
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        with contextlib.suppress(TransportError, TimeoutError):  # after a failure too: say goodbye if connected
            await asyncio.wait_for(self.closing(), 5.0)
        self._stop.set()
        self._closed.set()
        if self.stop_grace and self._running:
            await asyncio.wait(self._running, timeout=self.stop_grace)
        await cancel_all(self._running)
        assert self._tasks is not None
        with contextlib.suppress(asyncio.CancelledError):
            await self._tasks.__aexit__(None, None, None)
        try:
            await self.closed()
        except Exception as exc:  # after a failure, the failure is what the user needs to see
            if self.failure is None:
                raise
            log.error("%s: while closing after a failure: %s", self.name, exc)
        if self.failure is not None and et is None:
            raise self.failure

    async def closed(self) -> None:
        """After the loops stopped (release what the service holds)."""

    async def run(self) -> None:
        """Serve until :meth:`stop` (or a failure, which is raised)."""
        async with self:
            await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    async def stopping(self) -> None:
        """Return once :meth:`stop` was asked for (or the service failed)."""
        await self._stop.wait()

    def fail(self, exc: BaseException) -> None:
        """Stop the service because of ``exc``, which is raised to its user."""
        log.error("%s: %s", self.name, exc)
        if self.failure is None:
            self.failure = exc
        self._stop.set()
        self.changed()

    async def _guard(self, name: str, coro: Loop) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any loop's failure stops the whole service, and is raised to its user
            self.fail(exc)

    # ---- waiting ----------------------------------------------------------------------------------------
    def changed(self) -> None:
        """Wake every :meth:`wait_until`: something they may be waiting for has changed (nothing to do, on
        the per-update path, when nobody waits)."""
        if self._waiting:
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_until(self, done: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
        """Return once ``done()`` holds; TimeoutError (saying ``what()``) after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            if self.failure is not None:
                raise self.failure
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: {what()} after {timeout}s")
            self._waiting += 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
            finally:
                self._waiting -= 1

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Return once connected; TransportError (saying why not) after ``timeout`` seconds."""
        try:
            await self.wait_until(self.connected.is_set, timeout, lambda: "not connected")
        except TimeoutError as exc:
            why = self.last_error or "no answer"
            raise TransportError(f"{self.name}: cannot reach the broker within {timeout:g} s: {why} (is it "
                                 "running, and are the host and port right?)") from exc

    async def sleep(self, seconds: float | None) -> bool:
        """Sleep ``seconds`` (None: until stopped); True when the service is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def _until_closed(self) -> None:
        await self._closed.wait()

    # ---- the broker connection --------------------------------------------------------------------------
    async def connection(self, opts: ConnectOptions, on_connect: Callable[[Transport], Awaitable[None]],
                         slot: str = "transport") -> None:
        """Keep one connection: connect, ``on_connect``, serve until lost or closing; reconnect with backoff.
        A service with a second connection names another attribute as its ``slot``; only the first one
        (``transport``) sets ``connected``."""
        primary = slot == "transport"
        assert self._connect is not None
        attempt = 0
        while not self._closed.is_set():
            try:
                async with self._connect(opts) as t:
                    setattr(self, slot, t)
                    await on_connect(t)
                    if primary:
                        self.connected.set()
                    self.connects += 1
                    self.changed()
                    if attempt or self.connects > 1:
                        log.info("%s: connected again (after %s)", self.name, self.last_error)
                    else:
                        log.info("%s: connected", self.name)
                    attempt = 0
                    await first(t.closed(), self._until_closed())
            except TransportError as exc:
                if "taken over" in str(exc).lower():  # MQTT 5 DISCONNECT reason 142
                    self.takeovers += 1
                    log.error("%s: another client connected with this client id (%s) and took the session: is "
                              "a second copy of this service running? (%d times so far)", self.name,
                              opts.client_id, self.takeovers)
                else:
                    log.warning("%s: connection: %s", self.name, exc)
                self.last_error = str(exc)
            finally:
                setattr(self, slot, None)
                if primary:
                    self.connected.clear()
                self.changed()
            if self._closed.is_set():
                return
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), backoff(attempt, self.backoff_max))

"""How the commands run: one error line, signals that stop a service cleanly, a status line now and then."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from fedmqtt.service import Service

err = Console(stderr=True, soft_wrap=True, highlight=False)
log = logging.getLogger("fedmqtt.cli")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` (one line) and return the Exit to raise."""
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def setup_logging(verbose: bool, services: bool = False) -> None:
    """WARNING and up; with ``services``, INFO too (connections, reconnects, status lines); everything with
    ``verbose``."""
    level = logging.DEBUG if verbose else logging.INFO if services else logging.WARNING
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("fedmqtt").setLevel(level)


def run(main: Callable[[asyncio.Event], Awaitable[Any]]) -> Any:
    """Run ``main(stop)`` until it returns. The first SIGINT/SIGTERM sets ``stop`` (a command that watches it
    winds down and reports); the second cancels it."""
    async def runner() -> Any:
        stop = asyncio.Event()
        task = asyncio.ensure_future(main(stop))
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                task.cancel()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            return await task
        return None

    return asyncio.run(runner())


def serve(service: Service, status: Callable[[], str], every: float, tick: Callable[[], None] | None = None,
          companions: Sequence[Service] = ()) -> Callable[[asyncio.Event], Awaitable[None]]:
    """``main`` for :func:`run`: serve until ``stop``; log ``status()`` every ``every`` seconds (0: never) and
    once more on the way out; call ``tick`` every second (exporters, files). ``companions`` run beside the
    service, started before it and stopped after it."""
    async def main(stop: asyncio.Event) -> None:
        async def watcher() -> None:
            loop = asyncio.get_running_loop()
            next_status = loop.time() + every
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                if tick is not None:
                    tick()
                if every > 0 and loop.time() >= next_status:
                    log.info("%s: %s", service.name, status())
                    next_status += every
            service.stop()

        side = asyncio.ensure_future(watcher())
        try:
            async with contextlib.AsyncExitStack() as stack:
                for c in companions:
                    await stack.enter_async_context(c)
                await service.run()
        finally:
            side.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await side
            if tick is not None:
                tick()
            err.print(f"{service.name} stopped: {status()}")
    return main

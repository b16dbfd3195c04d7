"""``fedmqtt watch``: follow a federation's metrics and agents' presence as a read-only MQTT client; it
reconnects when the broker goes away, and says so."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from rich.console import Console

from fedmqtt.errors import TransportError
from fedmqtt.recording import Recorder
from fedmqtt.schemas import Metrics, Status
from fedmqtt.service import backoff
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, mqtt_connector


async def watch(broker: str, topics: Topics, raw: bool = False, out: Console | None = None,
                limit: int | None = None, stop: asyncio.Event | None = None,
                recorder: Recorder | None = None) -> None:
    """Print each metrics and status message until ``stop`` (or ``limit`` messages); reconnect on loss."""
    console = out or Console()
    connect = mqtt_connector(BrokerConfig.from_url(broker))
    stop = stop or asyncio.Event()
    seen, attempt, started = 0, 0, time.monotonic()
    client_id = f"fedmqtt-watch-{uuid.uuid4().hex[:8]}"
    while not stop.is_set():
        inbox = Inbox(maxsize=10_000)
        try:
            async with connect(ConnectOptions(client_id, on_message=inbox)) as t:
                await t.subscribe(topics.metrics, qos=1)
                await t.subscribe(topics.status_wildcard, qos=1)
                console.print(f"[dim]watching {topics.base} on {broker}[/dim]")
                attempt = 0
                halt, lost = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(t.closed())
                try:
                    while True:
                        got = asyncio.ensure_future(inbox.get())
                        done, _ = await asyncio.wait({got, halt, lost}, return_when=asyncio.FIRST_COMPLETED)
                        if got not in done:
                            got.cancel()
                            if lost in done:
                                raise TransportError("connection lost")
                            return
                        msg = got.result()
                        try:
                            show(console, topics, msg.topic, msg.payload, raw)
                            if recorder is not None and msg.topic == topics.metrics:
                                recorder.metrics(time.monotonic() - started, Metrics.model_validate_json(msg.payload))
                        except ValueError as exc:  # anyone may publish here on an open broker: report, go on
                            console.print(f"[yellow]unreadable message on {msg.topic}: {str(exc)[:120]}[/yellow]")
                        seen += 1
                        if limit is not None and seen >= limit:
                            return
                finally:
                    halt.cancel()
                    lost.cancel()
        except TransportError as exc:
            attempt += 1
            wait = backoff(attempt, 10.0)
            console.print(f"[yellow]broker {broker}: {exc}; trying again in {wait:.1f} s[/yellow]")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)


def show(console: Console, topics: Topics, topic: str, payload: bytes, raw: bool) -> None:
    """Print one metrics or status message; raises ValueError on a payload that is not what it should be."""
    if raw:
        console.print_json(json.dumps({"topic": topic, "payload": json.loads(payload or b"null")}))
    elif topic == topics.metrics:
        m = Metrics.model_validate_json(payload)
        acc = f"{m.accuracy:.4f}" if m.accuracy is not None else "-"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(m.rejected_by_reason.items()))
        console.print(f"metrics  version {m.version}  accepted {m.accepted}  rejected {m.rejected}"
                      f"{f' ({reasons})' if reasons else ''}  accuracy {acc}  online {m.agents_online}  "
                      f"{m.updates_per_s:.1f}/s", markup=False)
    elif payload:
        s = Status.model_validate_json(payload)
        version = f"on version {s.version}" if s.version is not None else "no model yet"
        console.print(f"agent    {s.agent:<20} {s.state:<8} {version}  sent {s.updates_sent}", markup=False)

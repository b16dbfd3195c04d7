"""``fedmqtt watch``: follow a federation's metrics and agents' presence as a read-only MQTT client."""

from __future__ import annotations

import json
import uuid

from rich.console import Console

from fedmqtt.schemas import Metrics, Status
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, mqtt_connector


async def watch(broker: str, topics: Topics, raw: bool = False, out: Console | None = None,
                limit: int | None = None) -> None:
    """Print each metrics and status message; stop after ``limit`` messages when given."""
    console = out or Console()
    connect = mqtt_connector(BrokerConfig.from_url(broker))
    seen = 0
    inbox = Inbox()
    async with connect(ConnectOptions(f"fedmqtt-watch-{uuid.uuid4().hex[:8]}", on_message=inbox)) as t:
        await t.subscribe(topics.metrics, qos=1)
        await t.subscribe(topics.status_wildcard, qos=1)
        async for msg in inbox:
            try:
                show(console, topics, msg.topic, msg.payload, raw)
            except ValueError as exc:  # anyone may publish here on an open broker: report, keep watching
                console.print(f"[yellow]unreadable message on {msg.topic}: {str(exc)[:120]}[/yellow]")
            seen += 1
            if limit is not None and seen >= limit:
                return


def show(console: Console, topics: Topics, topic: str, payload: bytes, raw: bool) -> None:
    """Print one metrics or status message; raises ValueError on a payload that is not what it should be."""
    if raw:
        console.print_json(json.dumps({"topic": topic, "payload": json.loads(payload or b"null")}))
    elif topic == topics.metrics:
        m = Metrics.model_validate_json(payload)
        acc = f"{m.accuracy:.4f}" if m.accuracy is not None else "-"
        console.print(f"metrics  version {m.version}  accepted {m.accepted}  rejected {m.rejected} "
                      f"{m.rejected_by_reason or ''}  accuracy {acc}  online {m.agents_online}")
    elif payload:
        s = Status.model_validate_json(payload)
        console.print(f"agent    {s.agent:<20} {s.state:<8} version {s.version}  sent {s.updates_sent}")

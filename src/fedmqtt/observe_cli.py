"""``fedmqtt watch`` and ``fedmqtt report``: follow a federation's metrics and presence live, and plot a
recorded run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedmqtt.cli_options import BrokerOpt, ConfigOpt, FedOpt, PrefixOpt, check_broker_url
from fedmqtt.cli_run import err, run
from fedmqtt.topics import Topics


def watch(
    config: ConfigOpt = None,
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    prefix: PrefixOpt = "fedmqtt",
    federation: FedOpt = "default",
    json_out: Annotated[bool, typer.Option("--json", help="print raw JSON lines")] = False,
    record: Annotated[Path | None, typer.Option(
        help="also write the metrics into this directory (metrics.csv); `fedmqtt report` plots it")] = None,
) -> None:
    """Follow the metrics and agents' presence live; reconnects when the broker goes away."""
    check_broker_url(broker)
    from fedmqtt.recording import Recorder
    from fedmqtt.watch import watch as run_watch

    recorder = Recorder(record) if record is not None else None
    run(lambda stop: run_watch(broker, Topics(prefix, federation), json_out, out=Console(highlight=False),
                                stop=stop, recorder=recorder))


def report(
    run: Annotated[Path, typer.Argument(help="a directory written by --record (demo or watch)")],
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: RUN/report.png)")] = None,
) -> None:
    """Plot a recorded run: accuracy and version over time, staleness, each agent's accepted updates."""
    from fedmqtt.report import write_report

    path = write_report(run, out)
    err.print(f"report written to {path}")

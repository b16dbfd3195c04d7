"""``fedmqtt site``: a site aggregator for a built-in task, on the site's broker (bridged upstream with the
block ``fedmqtt broker bridge`` prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedmqtt.choices import check_task
from fedmqtt.cli_options import (
    BrokerOpt,
    ConfigOpt,
    FedOpt,
    PrefixOpt,
    TaskOpt,
    VerboseOpt,
    check_broker_url,
    check_names,
)
from fedmqtt.cli_run import err, run, serve, setup_logging
from fedmqtt.topics import Topics


def site(
    config: ConfigOpt = None,
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    site_id: Annotated[str, typer.Option(help="the site's agent id upstream")] = "",
    task: TaskOpt = "digits",
    prefix: PrefixOpt = "fedmqtt",
    federation: FedOpt = "default",
    buffer_size: Annotated[int, typer.Option(min=1, help="local updates combined into one upstream update")
                           ] = 10,
    state_dir: Annotated[Path | None, typer.Option(help="ledger and outbox of combined updates (a restart "
                                                        "resumes from them); default: memory only")] = None,
    max_staleness: Annotated[int, typer.Option(min=0, help="refuse local updates more versions old")] = 64,
    status_every: Annotated[float, typer.Option(help="log a status line every this many seconds (0: never)")
                            ] = 60.0,
    seed: Annotated[int, typer.Option(help="the task's seed (for the model's shape only)")] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Run a site aggregator: combine the site's device updates, K into one, and send them upstream."""
    check_names(site_id, prefix, federation)
    check_broker_url(broker)
    check_task(task)
    topics = Topics(prefix, federation)
    setup_logging(verbose, services=True)
    from fedmqtt.site import Site, SiteConfig
    from fedmqtt.tasks import get_task
    from fedmqtt.transport import BrokerConfig, mqtt_connector

    initial = get_task(task, seed=seed).trainer(seed).initial
    s = Site(mqtt_connector(BrokerConfig.from_url(broker)), initial,
             SiteConfig(site_id, topics, buffer_size, state_dir, max_staleness))
    err.print(f"site {site_id}: K = {buffer_size} on {broker}, federation {federation!r}"
              f"{f', state in {state_dir}' if state_dir else ' (no state kept)'}")
    run(serve(s, lambda: (f"global v{s.version}, {s.local_accepted} local updates accepted, "
                          f"{s.acked_up} combined applied upstream, {len(s.pending)} pending, "
                          f"{len(s.buffer)} buffered"), status_every))

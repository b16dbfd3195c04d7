"""``fedmqtt worker``: one of the root aggregator's workers for a built-in task (``fedmqtt aggregator
--workers`` owns the model); start as many as the updates need, on the root's broker."""

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


def worker(
    config: ConfigOpt = None,
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    worker_id: Annotated[str, typer.Option(help="this worker's id, unique among the workers")] = "",
    task: TaskOpt = "digits",
    prefix: PrefixOpt = "fedmqtt",
    federation: FedOpt = "default",
    group: Annotated[str, typer.Option(help="the shared subscription's group (the same for every worker)")
                     ] = "fedmqtt-workers",
    buffer_size: Annotated[int, typer.Option(min=1, max=40, help="device updates per combined update")] = 16,
    max_wait: Annotated[float, typer.Option(min=0.001, help="seconds an update waits for others to combine "
                                                            "with")] = 0.02,
    state_dir: Annotated[Path | None, typer.Option(help="ledger and outbox of combined updates (a restart "
                                                        "resumes from them); default: memory only")] = None,
    max_staleness: Annotated[int, typer.Option(min=0, help="refuse device updates more versions old")] = 64,
    max_update_norm: Annotated[float, typer.Option(help="refuse device updates whose delta L2 norm exceeds "
                                                        "this")] = 1e3,
    status_every: Annotated[float, typer.Option(help="log a status line every this many seconds (0: never)")
                            ] = 60.0,
    seed: Annotated[int, typer.Option(help="the task's seed (for the model's shape only)")] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Run a worker: check the devices' updates it is handed, sum them k at a time for the aggregator."""
    check_names(worker_id, prefix, federation)
    check_broker_url(broker)
    check_task(task)
    topics = Topics(prefix, federation)
    setup_logging(verbose, services=True)
    from fedmqtt import allocator
    from fedmqtt.tasks import get_task
    from fedmqtt.transport import BrokerConfig, mqtt_connector
    from fedmqtt.worker import Worker, WorkerConfig

    allocator.tune()  # model-sized arrays reused, as in the aggregator
    initial = get_task(task, seed=seed).trainer(seed).initial
    w = Worker(mqtt_connector(BrokerConfig.from_url(broker)), initial,
               WorkerConfig(worker_id, topics, group, buffer_size, max_wait, state_dir, max_staleness,
                            max_update_norm=max_update_norm))
    err.print(f"worker {worker_id}: k = {buffer_size} on {broker}, federation {federation!r}, group {group!r}"
              f"{f', state in {state_dir}' if state_dir else ' (no state kept)'}")
    run(serve(w, lambda: (f"global v{w.version}, {w.local_accepted} updates accepted, {w.acked_up} combined "
                          f"applied, {len(w.pending)} pending, {w.released} released"), status_every))

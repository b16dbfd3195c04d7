"""The command line: a thin face over the library (see README for examples)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any

import typer
from rich.console import Console

from fedmqtt.errors import FedMQTTError
from fedmqtt.topics import Topics

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Asynchronous federated learning over MQTT.")
err = Console(stderr=True, soft_wrap=True)

BrokerOpt = Annotated[str, typer.Option(envvar="FEDMQTT_BROKER_URL",
                                        help="mqtt://HOST:PORT or mqtts://HOST:PORT; credentials and TLS "
                                             "files come from FEDMQTT_* environment variables")]
PrefixOpt = Annotated[str, typer.Option(help="topic prefix")]
FedOpt = Annotated[str, typer.Option(help="federation name")]
TaskOpt = Annotated[str, typer.Option(help="built-in task: digits (default) or hapt")]


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _run(coro: Any) -> Any:
    """Run a service until it ends or SIGINT/SIGTERM arrive; map fedmqtt errors to exit code 1."""
    async def main() -> Any:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            return await task
        return None

    try:
        return asyncio.run(main())
    except FedMQTTError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


@app.command()
def demo(
    agents: Annotated[int, typer.Option(help="number of edge agents")] = 8,
    seconds: Annotated[float, typer.Option(help="how long to run")] = 60.0,
    json_out: Annotated[bool, typer.Option("--json", help="last line of output is one JSON object")] = False,
    broker: Annotated[str, typer.Option(help="auto, mosquitto, embedded, or an mqtt:// URL")] = "auto",
    strategy: Annotated[str, typer.Option(help="fedasync, fedasync-hinge, fedbuff, fedavg, ...")] = "fedasync",
    partition: Annotated[str, typer.Option(help="iid or dirichlet")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet alpha for --partition dirichlet")] = 0.5,
    sigma: Annotated[float, typer.Option(help="spread of device speeds, lognormal sigma")] = 0.75,
    base_seconds: Annotated[float, typer.Option(help="median seconds per local round")] = 0.2,
    seed: int = 0,
    verbose: bool = False,
) -> None:
    """Start a broker, the aggregator and N agents of different speeds; show progress and a summary."""
    from fedmqtt.demo import run_demo
    from fedmqtt.schemas import Metrics

    _logging(verbose)

    def progress(elapsed: float, m: Metrics) -> None:
        acc = f"{m.accuracy:.3f}" if m.accuracy is not None else "-"
        stal = f"{m.staleness_mean:.1f}" if m.staleness_mean is not None else "-"
        err.print(f"[{elapsed:5.1f}s] version {m.version:5d}  accepted {m.accepted:5d}  rejected "
                  f"{m.rejected:3d}  staleness {stal:>5}  accuracy {acc}  agents {m.agents_online}")

    result = _run(run_demo(agents=agents, seconds=seconds, broker=broker, strategy=strategy,
                           partition=partition, alpha=alpha, sigma=sigma, base_seconds=base_seconds, seed=seed,
                           on_progress=progress))
    err.print(f"\n[bold]{result.strategy}[/bold] on {result.broker} broker, {result.agents} agents, "
              f"{result.seconds}s: version {result.version}, accepted {result.accepted}, rejected "
              f"{result.rejected}, test accuracy [bold]{result.accuracy:.4f}[/bold]")
    if json_out:
        print(json.dumps(result.as_dict()), flush=True)


@app.command()
def aggregator(
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    strategy: Annotated[str, typer.Option(help="fedasync, fedasync-hinge, fedasync-constant, fedbuff, fedavg, "
                                              "fedbuff-outlier, fedbuff-krum, fedbuff-median, fedbuff-trimmed, "
                                              "fedbuff-norm")] = "fedasync",
    task: TaskOpt = "digits",
    prefix: PrefixOpt = "fedmqtt",
    federation: FedOpt = "default",
    max_staleness: int = 64,
    max_update_norm: Annotated[float, typer.Option(help="reject updates whose delta L2 norm exceeds this")] = 1e3,
    alpha: Annotated[float | None, typer.Option(help="FedAsync mixing rate (default 0.6)")] = None,
    buffer_size: Annotated[int | None, typer.Option(help="FedBuff K (default 10)")] = None,
    server_opt: Annotated[str | None, typer.Option(help="FedBuff server step: sgd (default), fedavgm, fedadam, "
                                                        "fedyogi")] = None,
    server_lr: Annotated[float | None, typer.Option(help="FedBuff (default 1.0) and fedavg-delta server lr")
                         ] = None,
    round_size: Annotated[int | None, typer.Option(help="fedavg: updates per round")] = None,
    round_deadline: Annotated[float | None, typer.Option(help="fedavg: round deadline, seconds")] = None,
    state_dir: Annotated[str | None, typer.Option(
        help="durable state (journal + snapshots); default: a directory per federation in the user's data "
             "directory ($XDG_DATA_HOME/fedmqtt/PREFIX/FEDERATION)")] = None,
    ephemeral: Annotated[bool, typer.Option(help="keep no state: a restart begins again at version 0")] = False,
    snapshot_every: Annotated[int, typer.Option(help="journal records between snapshots")] = 500,
    keep_journal: Annotated[bool, typer.Option(help="keep every journal segment (a ledger of applied "
                                                    "updates)")] = False,
    dp_clip: Annotated[float | None, typer.Option(help="fedbuff central DP: clip each delta to this L2 norm "
                                                       "(holds a device's second update until the next step)")
                       ] = None,
    dp_noise: Annotated[float | None, typer.Option(help="fedbuff central DP: noise multiplier sigma")] = None,
    trim: Annotated[float | None, typer.Option(help="fedbuff-trimmed: fraction cut at each end; fedbuff-krum: "
                                                     "attackers assumed per buffer, f = trim x K (default 0.2)")
                    ] = None,
    spread: Annotated[float | None, typer.Option(help="fedbuff-outlier: drop deltas farther from the median "
                                                       "than spread x the median distance (default 3)")] = None,
    one_update_per_step: Annotated[bool, typer.Option(
        help="hold a device's second update until the next step (always on with --dp-clip)")] = False,
    signing_key: Annotated[str | None, typer.Option(
        envvar="FEDMQTT_SIGNING_KEY_FILE", help="Ed25519 private key (PEM) to sign every model with "
        "(`broker init` makes one)")] = None,
    seed: int = 0,
    verbose: bool = False,
) -> None:
    """Run the aggregator for a built-in task until interrupted; it resumes where it stopped."""
    from fedmqtt.aggregator import Aggregator, AggregatorConfig
    from fedmqtt.core import Limits, Timing
    from fedmqtt.durability import default_directory
    from fedmqtt.strategies.registry import make
    from fedmqtt.tasks import get_task
    from fedmqtt.transport import BrokerConfig, mqtt_connector

    _logging(verbose)
    topics = Topics(prefix, federation)
    if ephemeral and state_dir:
        raise typer.BadParameter("--ephemeral keeps no state; drop --state-dir or --ephemeral")
    directory = None if ephemeral else (state_dir or str(default_directory(topics)))
    try:
        strat = make(strategy, alpha=alpha, buffer_size=buffer_size, server_opt=server_opt, server_lr=server_lr,
                     dp_clip=dp_clip, dp_noise=dp_noise, seed=seed if dp_clip is not None else None, trim=trim,
                     spread=spread)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    t = get_task(task, seed=seed)
    trainer = t.trainer(seed)
    limits = Limits(max_staleness=max_staleness, max_update_norm=max_update_norm,
                    one_update_per_step=one_update_per_step)
    cfg = AggregatorConfig(topics=topics, limits=limits, timing=Timing(round_size=round_size,
                                                                     round_deadline=round_deadline),
                           state_dir=directory, snapshot_every=snapshot_every, keep_journal=keep_journal,
                           signing_key=signing_key)
    err.print(f"aggregator: {strat.name} on {broker}, federation {federation!r}")
    try:
        agg = Aggregator(mqtt_connector(BrokerConfig.from_url(broker)), trainer.initial, strat, cfg,
                         evaluate=t.evaluate_fn(trainer))
        replayed = agg.recover()
    except FedMQTTError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    if directory is None:
        err.print("aggregator: ephemeral (no state kept): starting at version 0")
    else:
        err.print(f"aggregator: state in {directory}; resumed at version {agg.version} "
                  f"({replayed} journal records replayed)")
    _run(agg.run())


@app.command()
def edge(
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    agent_id: Annotated[str, typer.Option(help="this device's id (a pseudonym; see docs/security.md)")] = "",
    task: TaskOpt = "digits",
    shard: Annotated[int | None, typer.Option(help="data shard index (default: from the agent id)")] = None,
    num_shards: Annotated[int, typer.Option(help="shards the task is split into")] = 8,
    local_steps: int = 20,
    round_seconds: Annotated[float, typer.Option(help="pad each local round to this long")] = 0.0,
    prox_rho: Annotated[float, typer.Option(help="FedAsync proximal term rho (0 = off)")] = 0.0,
    dp_clip: Annotated[float | None, typer.Option(help="client DP: clip each delta to this L2 norm")] = None,
    dp_noise: Annotated[float, typer.Option(help="client DP: noise multiplier sigma")] = 0.0,
    outbox_dir: Annotated[str | None, typer.Option(
        help="keep unacknowledged updates on disk here, so they survive a reboot")] = None,
    model_key: Annotated[str | None, typer.Option(
        envvar="FEDMQTT_MODEL_KEY", help="the aggregator's public key (base64): adopt only models it signed")
    ] = None,
    prefix: PrefixOpt = "fedmqtt",
    federation: FedOpt = "default",
    seed: int = 0,
    verbose: bool = False,
) -> None:
    """Run one edge agent on its shard of a built-in task until interrupted."""
    from fedmqtt.agent import AgentConfig, EdgeAgent
    from fedmqtt.tasks import get_task, index_of
    from fedmqtt.transport import BrokerConfig, mqtt_connector

    _logging(verbose)
    agent_id = agent_id or os.environ.get("FEDMQTT_AGENT_ID", "")
    if not agent_id:
        raise typer.BadParameter("give --agent-id or FEDMQTT_AGENT_ID")
    t = get_task(task, num_clients=num_shards, seed=seed) if task == "digits" else get_task(task, seed=seed)
    index = shard if shard is not None else index_of(agent_id, t.num_clients)
    cfg = AgentConfig(topics=Topics(prefix, federation), local_steps=local_steps, round_seconds=round_seconds,
                      outbox_dir=outbox_dir, model_key=model_key)
    if dp_clip is not None:
        from fedmqtt.privacy import ClientDP

        cfg = replace(cfg, dp=ClientDP(dp_clip, dp_noise))
    try:
        agent = EdgeAgent(mqtt_connector(BrokerConfig.from_url(broker)), agent_id,
                          t.trainer(seed, prox_rho=prox_rho), t.data_for(index, seed), cfg)
    except (FedMQTTError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    err.print(f"edge agent {agent_id}: shard {index} of {t.name}, {agent.data.num_samples} examples, {broker}")
    _run(agent.run())


@app.command()
def watch(
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    prefix: PrefixOpt = "fedmqtt",
    federation: FedOpt = "default",
    json_out: Annotated[bool, typer.Option("--json", help="print raw JSON lines")] = False,
) -> None:
    """Follow the metrics and agents' presence live."""
    from fedmqtt.watch import watch as run_watch

    _run(run_watch(broker, Topics(prefix, federation), json_out, out=Console()))


broker_app = typer.Typer(help="Run or set up a Mosquitto broker.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")


@broker_app.command("run")
def broker_run(port: Annotated[int, typer.Option(help="loopback port (0: a free one)")] = 1883,
               kind: Annotated[str, typer.Option(help="auto, mosquitto or embedded")] = "auto") -> None:
    """Run a local broker from the repo's mosquitto.conf until interrupted."""
    from fedmqtt.broker import local_broker

    async def serve() -> None:
        async with local_broker(kind, port or None) as b:  # type: ignore[arg-type]
            err.print(f"{b.kind} broker listening on {b.url}")
            await asyncio.Event().wait()

    _run(serve())


@broker_app.command("init")
def broker_init(
    out: Annotated[str, typer.Option(help="directory for CA, certificates, passwd, acl, config, env files")],
    agents: Annotated[str, typer.Option(help="comma-separated agent ids (pseudonyms, see docs/security.md)")],
    client_certs: Annotated[bool, typer.Option(help="also issue client certificates, require them")] = False,
    host: Annotated[list[str] | None, typer.Option(help="broker name/address clients use (repeat)")] = None,
    port: Annotated[int, typer.Option(help="TLS listener port")] = 8883,
    prefix: PrefixOpt = "fedmqtt",
    federation: FedOpt = "default",
    force: Annotated[bool, typer.Option(help="replace an existing CA and every credential")] = False,
) -> None:
    """Create the secure broker profile: local CA, TLS certificates, passwords, ACL and one env file each."""
    from pathlib import Path

    from fedmqtt.security import init_broker

    hosts = tuple(host) if host else ("localhost", "127.0.0.1", "::1")
    try:
        profile = init_broker(Path(out), agents.split(","), topics=Topics(prefix, federation), hosts=hosts,
                              port=port, client_certs=client_certs, overwrite=force)
    except (FedMQTTError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    err.print(f"secure profile in {profile.directory}: mosquitto -c {profile.config}")
    err.print(f"identities: {', '.join(profile.identities)}; each one's settings are in env/<name>.env "
              "(copy only that file to its device)")


RELOAD_HINT = "then make Mosquitto re-read it: kill -HUP <pid> (Docker: docker compose kill -s HUP mosquitto)"
ProfileDir = Annotated[str, typer.Option("--dir", help="the profile directory made by broker init")]


def _each_agent(agents: list[str], action: Callable[[str], str]) -> None:
    """Run ``action`` for each agent id, print what it did; stop at the first error."""
    for agent in agents:
        try:
            err.print(action(agent))
        except (FedMQTTError, ValueError) as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
    err.print(RELOAD_HINT)


@broker_app.command("add-agent")
def broker_add_agent(directory: ProfileDir,
                     agents: Annotated[list[str], typer.Argument(help="agent ids to add")]) -> None:
    """Add devices to a secure profile: password, ACL block, env file (and client certificate)."""
    from pathlib import Path

    from fedmqtt.membership import add_agent

    def add(agent: str) -> str:
        ident = add_agent(Path(directory), agent)
        certs = f" and {ident.cert_file}, {ident.key_file}" if ident.cert_file else ""
        return f"added {agent}: copy {ident.env_file}{certs} to the device"

    _each_agent(agents, add)


@broker_app.command("revoke")
def broker_revoke(directory: ProfileDir,
                  agents: Annotated[list[str], typer.Argument(help="agent ids to revoke")]) -> None:
    """Revoke devices: remove password and ACL block, put the client certificate on the CRL."""
    from pathlib import Path

    from fedmqtt.membership import revoke_agent

    def revoke(agent: str) -> str:
        r = revoke_agent(Path(directory), agent)
        cert = f", certificate serial {r.certificate_serial:x} on the CRL" if r.certificate_serial else ""
        return (f"revoked {agent}: password {'removed' if r.password else 'absent'}, "
                f"ACL {'removed' if r.acl else 'absent'}{cert}")

    _each_agent(agents, revoke)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

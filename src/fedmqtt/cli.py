"""The command line: a thin face over the library (see README for examples).

Every mistake ends in one line, ``error: what is wrong (what to do)``, and a non-zero exit: usage errors exit
2, everything else 1, an interrupt 130. Arguments are checked before JAX is imported, so they are answered at
once. ``aggregator``, ``edge`` and ``watch`` read every option from the environment too (``--some-option``
from ``FEDMQTT_SOME_OPTION``) and from a TOML file given with ``--config``; the command line wins over the
environment, which wins over the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedmqtt import __version__
from fedmqtt.broker_cli import broker_app
from fedmqtt.choices import BROKER_KINDS, PARTITIONS, STRATEGIES, check_choice, check_task, parse_list, parse_tags
from fedmqtt.cli_options import (
    BrokerOpt,
    ConfigOpt,
    DpAdjacencyOpt,
    DpMaxStepsOpt,
    DpQuantileOpt,
    DpSamplingOpt,
    DpStepSecondsOpt,
    FedOpt,
    PrefixOpt,
    PrintConfigOpt,
    TaskOpt,
    VerboseOpt,
    check_broker_url,
    check_names,
    print_config_and_exit,
)
from fedmqtt.cli_run import err, fail, run, setup_logging
from fedmqtt.errors import ConfigError, FedMQTTError
from fedmqtt.observe_cli import report, watch
from fedmqtt.site_cli import site as site_command
from fedmqtt.worker_cli import worker as worker_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Asynchronous federated learning over MQTT.")
SERVICE = {"auto_envvar_prefix": "FEDMQTT"}  # --some-option also from FEDMQTT_SOME_OPTION



def _version(value: bool) -> None:
    if value:
        print(f"fedmqtt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Asynchronous federated learning over MQTT."""


# ---- demo ---------------------------------------------------------------------------------------------------
@app.command()
def demo(
    agents: Annotated[int, typer.Option(min=1, help="number of edge agents")] = 8,
    seconds: Annotated[float, typer.Option(min=0.1, help="how long to run")] = 60.0,
    json_out: Annotated[bool, typer.Option("--json", help="last line of output is one JSON object")] = False,
    broker: Annotated[str, typer.Option(help="auto, mosquitto, embedded, or an mqtt:// URL")] = "auto",
    strategy: Annotated[str, typer.Option(help="fedasync, fedasync-hinge, fedbuff, fedavg, ...")] = "fedasync",
    task: TaskOpt = "digits",
    partition: Annotated[str, typer.Option(help="digits: iid or dirichlet")] = "iid",
    dirichlet_alpha: Annotated[float, typer.Option(min=0.001,
                                                   help="Dirichlet concentration for --partition dirichlet")
                               ] = 0.5,
    sigma: Annotated[float, typer.Option(min=0.0, help="spread of device speeds, lognormal sigma")] = 0.75,
    base_seconds: Annotated[float, typer.Option(min=0.0, help="median seconds per local round")] = 0.2,
    save_model: Annotated[Path | None, typer.Option(help="write the final model here (plain safetensors)")
                          ] = None,
    record: Annotated[Path | None, typer.Option(
        help="write the run (metrics.csv, agents.csv, run.json) into this directory; `fedmqtt report` plots it")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for data shards, speeds and initial weights")] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Start a broker, the aggregator and N agents of different speeds; show progress and a summary."""
    check_choice(strategy, STRATEGIES, "strategy")
    check_choice(partition, PARTITIONS, "partition")
    check_task(task)
    if not broker.startswith(("mqtt://", "mqtts://")):
        check_choice(broker, BROKER_KINDS, "broker kind (or give an mqtt:// URL)")
    else:
        check_broker_url(broker)
    from fedmqtt.demo import run_demo
    from fedmqtt.recording import Recorder
    from fedmqtt.schemas import Metrics

    setup_logging(verbose)
    if not verbose:  # the demo's own services: what goes wrong shows in its progress lines and summary
        logging.getLogger("fedmqtt").setLevel(logging.ERROR)
    recorder = Recorder(record) if record is not None else None

    def started(where: str) -> None:
        err.print(f"[bold]fedmqtt demo[/bold]: {strategy} on {task}, {agents} agents, {where}; "
                  f"{seconds:g} s (Ctrl-C stops early)")

    def progress(elapsed: float, m: Metrics) -> None:
        acc = f"{m.accuracy:.3f}" if m.accuracy is not None else "-"
        stal = f"{m.staleness_mean:.1f}" if m.staleness_mean is not None else "-"
        err.print(f"[{elapsed:5.1f}s] version {m.version:5d}  accepted {m.accepted:5d}  rejected "
                  f"{m.rejected:3d}  staleness {stal:>5}  accuracy {acc}  agents {m.agents_online}")
        if recorder is not None:
            recorder.metrics(elapsed, m)

    result = run(lambda stop: run_demo(
        agents=agents, seconds=seconds, broker=broker, strategy=strategy, task=task, partition=partition,
        alpha=dirichlet_alpha, sigma=sigma, base_seconds=base_seconds, seed=seed, on_start=started,
        on_progress=progress, stop=stop, save_model=save_model))
    if result is None:
        raise fail("interrupted", 130)
    if recorder is not None:
        recorder.finish(result)
    ended = "interrupted after" if result.interrupted else "ran"
    err.print(f"\n[bold]{result.strategy}[/bold] on {result.broker} broker, {result.agents} agents, {ended} "
              f"{result.seconds}s: version {result.version}, accepted {result.accepted}, rejected "
              f"{result.rejected}, test accuracy [bold]{result.accuracy:.4f}[/bold]")
    if save_model is not None:
        err.print(f"model (version {result.version}) saved to {save_model}")
    if record is not None:
        err.print(f"run recorded in {record}: fedmqtt report {record}")
    if json_out:
        print(json.dumps(result.as_dict()), flush=True)
    if result.interrupted:
        raise typer.Exit(130)


# ---- aggregator ---------------------------------------------------------------------------------------------
@app.command(context_settings=SERVICE)
def aggregator(
    config: ConfigOpt = None,
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    strategy: Annotated[str, typer.Option(help="fedasync, fedasync-hinge, fedasync-constant, fedbuff, fedavg, "
                                              "fedbuff-outlier, fedbuff-krum, fedbuff-median, fedbuff-trimmed, "
                                              "fedbuff-norm")] = "fedasync",
    task: TaskOpt = "digits",
    prefix: PrefixOpt = "fedmqtt",
    federation: FedOpt = "default",
    max_staleness: Annotated[int, typer.Option(min=0, help="refuse updates more versions old than this")] = 64,
    max_update_norm: Annotated[float, typer.Option(help="reject updates whose delta L2 norm exceeds this")] = 1e3,
    alpha: Annotated[float | None, typer.Option(help="FedAsync mixing rate (default 0.6)")] = None,
    buffer_size: Annotated[int | None, typer.Option(min=1, help="FedBuff K (default 10)")] = None,
    server_opt: Annotated[str | None, typer.Option(help="FedBuff server step: sgd (default), fedavgm, fedadam, "
                                                        "fedyogi")] = None,
    server_lr: Annotated[float | None, typer.Option(help="FedBuff (default 1.0) and fedavg-delta server lr")
                         ] = None,
    round_size: Annotated[int | None, typer.Option(min=1, help="fedavg: updates per round")] = None,
    round_deadline: Annotated[float | None, typer.Option(help="fedavg: round deadline, seconds")] = None,
    state_dir: Annotated[str | None, typer.Option(
        help="durable state (journal + snapshots); default: a directory per federation in the user's data "
             "directory ($XDG_DATA_HOME/fedmqtt/PREFIX/FEDERATION)")] = None,
    ephemeral: Annotated[bool, typer.Option(help="keep no state: a restart begins again at version 0")] = False,
    snapshot_every: Annotated[int, typer.Option(min=1, help="journal records between snapshots")] = 500,
    keep_journal: Annotated[bool, typer.Option(help="keep every journal segment (a ledger of applied "
                                                    "updates)")] = False,
    dp_clip: Annotated[float | None, typer.Option(help="fedbuff central DP: clip each delta to this L2 norm "
                                                       "(holds a device's second update until the next step)")
                       ] = None,
    dp_noise: Annotated[float | None, typer.Option(help="fedbuff central DP: noise multiplier sigma")] = None,
    dp_adjacency: DpAdjacencyOpt = None,
    dp_sampling: DpSamplingOpt = None,
    dp_step_seconds: DpStepSecondsOpt = 10.0,
    dp_quantile: DpQuantileOpt = None,
    dp_max_steps: DpMaxStepsOpt = None,
    trim: Annotated[float | None, typer.Option(help="fedbuff-trimmed: fraction cut at each end; fedbuff-krum: "
                                                     "attackers assumed per buffer, f = trim x K (default 0.2)")
                    ] = None,
    spread: Annotated[float | None, typer.Option(help="fedbuff-outlier, the guards: drop deltas farther from the "
                                                       "median than spread x the median distance (default 3)")] = None,
    sites: Annotated[str, typer.Option(help="site aggregators' ids, comma-separated: no per-device rate or "
                                            "share bound for their combined updates")] = "",
    workers: Annotated[bool, typer.Option(help="take the combined updates of `fedmqtt worker` processes "
                                               "instead of the devices' own (fedbuff)")] = False,
    one_update_per_step: Annotated[bool, typer.Option(
        help="hold a device's second update until the next step (always on with --dp-clip)")] = False,
    secure: Annotated[bool, typer.Option(help="secure aggregation: FedBuff steps over cohorts of --buffer-size "
                                              "agents run with `edge --secure`; the aggregator sees sums only")
                      ] = False,
    signing_key: Annotated[str | None, typer.Option(
        envvar="FEDMQTT_SIGNING_KEY_FILE", help="Ed25519 private key (PEM) to sign every model with "
        "(`broker init` makes one)")] = None,
    model_forms: Annotated[str, typer.Option(
        help="also publish the model compressed for slow links, comma-separated: float16, int8 (retained on "
             "model/<form>)")] = "",
    init_model: Annotated[Path | None, typer.Option(
        help="start from these weights (safetensors, e.g. from --save-model) when there is no state yet")] = None,
    save_model: Annotated[Path | None, typer.Option(
        help="keep the newest durable model here (plain safetensors), rewritten each second it changed")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="serve Prometheus metrics on this port (/metrics; 0: a free port)")] = None,
    metrics_bind: Annotated[str, typer.Option(help="address for --metrics-port")] = "127.0.0.1",
    status_every: Annotated[float, typer.Option(help="log a status line every this many seconds (0: never)")
                            ] = 60.0,
    print_config: PrintConfigOpt = False,
    seed: Annotated[int, typer.Option(help="seed for data shards, speeds and initial weights")] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Run the aggregator for a built-in task until interrupted; it resumes where it stopped."""
    settings = {k: v for k, v in locals().items() if k != "print_config"}
    check_choice(strategy, STRATEGIES, "strategy")
    check_task(task)
    check_broker_url(broker)
    check_names(None, prefix, federation)
    if ephemeral and state_dir:
        raise typer.BadParameter("--ephemeral keeps no state; drop --state-dir or --ephemeral")
    for site_id in parse_list(sites):
        check_names(site_id, prefix, federation)
    if workers and (strategy != "fedbuff" or secure or dp_clip is not None or one_update_per_step):
        raise typer.BadParameter("--workers sends sums of updates: give --strategy fedbuff, without --secure, "
                                 "--dp-clip or --one-update-per-step")
    if dp_sampling is not None and (dp_clip is None or secure or strategy != "fedbuff"):
        raise typer.BadParameter("--dp-sampling is a mode of FedBuff's central DP: give --strategy fedbuff and "
                                 "--dp-clip, without --secure")
    if secure and strategy != "fedbuff":
        raise typer.BadParameter("--secure runs FedBuff steps: give --strategy fedbuff")
    if init_model is not None and not init_model.is_file():
        raise ConfigError(f"--init-model {init_model}: no such file")
    for form in filter(None, model_forms.split(",")):
        check_choice(form.strip(), ("float16", "int8"), "model form")
    if print_config:
        print_config_and_exit(settings)
    from fedmqtt.aggregator_cli import run_aggregator

    setup_logging(verbose, services=True)
    run_aggregator(settings)


# ---- edge ---------------------------------------------------------------------------------------------------
@app.command(context_settings=SERVICE)
def edge(
    config: ConfigOpt = None,
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    agent_id: Annotated[str, typer.Option(help="this device's id (a pseudonym; see docs/security.md)")] = "",
    task: TaskOpt = "digits",
    shard: Annotated[int | None, typer.Option(min=0, help="data shard index (default: from the agent id)")
                     ] = None,
    num_shards: Annotated[int, typer.Option(min=1, help="shards the task is split into")] = 8,
    local_steps: Annotated[int, typer.Option(min=1, help="optimiser steps per local round")] = 20,
    round_seconds: Annotated[float, typer.Option(min=0.0, help="pad each local round to this long")] = 0.0,
    prox_rho: Annotated[float, typer.Option(min=0.0, help="FedAsync proximal term rho (0 = off)")] = 0.0,
    dp_clip: Annotated[float | None, typer.Option(help="client DP: clip each delta to this L2 norm")] = None,
    dp_noise: Annotated[float, typer.Option(min=0.0, help="client DP: noise multiplier sigma")] = 0.0,
    compression: Annotated[str, typer.Option(
        help="how updates travel: none, float16, int8, int8-tensor or topk:<fraction> (e.g. topk:1%, with "
             "error feedback)")] = "none",
    model_delivery: Annotated[str, typer.Option(
        help="pull: take the retained model when a round starts; push: receive every version")] = "pull",
    model_download: Annotated[str, typer.Option(
        help="float32, or float16 / int8 where the aggregator publishes them (--model-forms)")] = "float32",
    outbox_dir: Annotated[str | None, typer.Option(
        help="keep unacknowledged updates on disk here, so they survive a reboot")] = None,
    model_key: Annotated[str | None, typer.Option(
        envvar="FEDMQTT_MODEL_KEY", help="the aggregator's public key (base64): adopt only models it signed")
    ] = None,
    secure: Annotated[bool, typer.Option(help="offer updates to secure-aggregation cohorts (aggregator --secure)")
                      ] = False,
    prefix: PrefixOpt = "fedmqtt",
    federation: FedOpt = "default",
    follow_assignments: Annotated[bool, typer.Option(
        help="advertise this device's capabilities and work where a coordinator assigns it (protocol 1.1)")
    ] = False,
    tasks: Annotated[str, typer.Option(help="built-in tasks this device holds data for, comma-separated "
                                            "(default: --task); implies --follow-assignments")] = "",
    tags: Annotated[str, typer.Option(help="tags to advertise, key=value,... (e.g. site=a,hw=pi4); implies "
                                           "--follow-assignments")] = "",
    status_every: Annotated[float, typer.Option(help="log a status line every this many seconds (0: never)")
                            ] = 60.0,
    metrics_port: Annotated[int | None, typer.Option(
        help="serve Prometheus metrics on this port (/metrics; 0: a free port)")] = None,
    metrics_bind: Annotated[str, typer.Option(help="address for --metrics-port")] = "127.0.0.1",
    threads: Annotated[int, typer.Option(min=1, help="XLA compute threads (more can speed up a large model "
                                                     "on a multi-core device, at some memory)")] = 1,
    print_config: PrintConfigOpt = False,
    seed: Annotated[int, typer.Option(help="seed for data shards, speeds and initial weights")] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Run one edge agent on its shard of a built-in task until interrupted (with --follow-assignments, on the
    federation and task a coordinator assigns it)."""
    settings = {k: v for k, v in locals().items() if k != "print_config"}
    if not agent_id:
        raise ConfigError("no agent id (give --agent-id or FEDMQTT_AGENT_ID; `broker init` writes it into "
                          "each device's env file)")
    check_names(agent_id, prefix, federation)
    for name in (task, *parse_list(tasks)):
        check_task(name)
    parse_tags(tags)
    check_broker_url(broker)
    check_choice(model_delivery, ("pull", "push"), "model delivery")
    check_choice(model_download, ("float32", "float16", "int8"), "model download")
    from fedmqtt.compression import Compression

    Compression.parse(compression)
    if print_config:
        print_config_and_exit(settings)
    from fedmqtt.edge_cli import run_edge

    setup_logging(verbose, services=True)
    run_edge(settings)


# ---- coordinator --------------------------------------------------------------------------------------------
@app.command(context_settings=SERVICE)
def coordinator(
    config: ConfigOpt = None,
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    federations: Annotated[str, typer.Option(help="the federations to serve, federation=task pairs: "
                                                  "hapt=hapt,digits=digits")] = "default=digits",
    policy: Annotated[str, typer.Option(help="uniform, or parts joined by +: speed-aware, bandwidth, utility "
                                             "(e.g. utility+speed-aware+bandwidth)")] = "uniform",
    prefix: PrefixOpt = "fedmqtt",
    local_steps: Annotated[int | None, typer.Option(min=1, help="E for every agent (default: each agent's "
                                                                "own; speed-aware scales it)")] = None,
    participation_target: Annotated[float, typer.Option(min=0.0, max=1.0, help="utility: share of a "
                                                        "federation's agents training at once")] = 0.5,
    participation_floor: Annotated[float, typer.Option(min=0.0, max=1.0, help="utility: no agent below this "
                                                       "participation")] = 0.05,
    upload_budget: Annotated[float, typer.Option(min=0.001, help="bandwidth: seconds an update may take on "
                                                 "a device's uplink")] = 2.0,
    debounce: Annotated[float, typer.Option(min=0.0, help="at most one policy run per this many seconds")] = 0.5,
    status_every: Annotated[float, typer.Option(help="log a status line every this many seconds (0: never)")
                            ] = 60.0,
    print_config: PrintConfigOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Assign agents to federations and settings from their capabilities (protocol 1.1), for every federation
    under a prefix."""
    settings = {k: v for k, v in locals().items() if k != "print_config"}
    check_broker_url(broker)
    check_names(None, prefix, "default")
    from fedmqtt.allocation import make as make_policy
    from fedmqtt.coordinator_cli import parse_federations, run_coordinator

    parse_federations(federations)
    try:
        make_policy(policy)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if print_config:
        print_config_and_exit(settings)
    setup_logging(verbose, services=True)
    run_coordinator(settings)


app.add_typer(broker_app, name="broker")
app.command(name="site", context_settings=SERVICE)(site_command)
app.command(name="worker", context_settings=SERVICE)(worker_command)
app.command(context_settings=SERVICE)(watch)
app.command()(report)


# ---- the entry point ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """``fedmqtt``: run the command; every error ends in one line and a non-zero exit."""
    try:
        code = app(args=argv, prog_name="fedmqtt", standalone_mode=False)
    except typer.TyperException as exc:  # usage: unknown option, bad value, missing argument
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":
            err.print(exc.format_message(), markup=False)
            raise SystemExit(0) from None
        where = f"; see {ctx.command_path} --help" if ctx is not None else ""
        err.print(f"[red]error:[/red] {escape(exc.format_message())}{where}")
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        raise SystemExit(130) from None
    except FedMQTTError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise SystemExit(1) from None
    except OSError as exc:  # a file or port the user named
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

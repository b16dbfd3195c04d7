"""The options several commands share (their types, defaults and help) and the checks they share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from fedmqtt.cli_config import CONFIG_HELP, load_config, print_config
from fedmqtt.errors import ConfigError
from fedmqtt.topics import check_federation, check_segment
from fedmqtt.types import check_id

BrokerOpt = Annotated[str, typer.Option(envvar="FEDMQTT_BROKER_URL",
                                        help="mqtt://HOST:PORT or mqtts://HOST:PORT; credentials and TLS "
                                             "files come from FEDMQTT_* environment variables")]
PrefixOpt = Annotated[str, typer.Option(help="topic prefix")]
FedOpt = Annotated[str, typer.Option(help="federation name")]
TaskOpt = Annotated[str, typer.Option(help="built-in task: digits, or hapt (needs the HAPT file, FEDMQTT_HAPT)")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help=CONFIG_HELP, callback=load_config, is_eager=True, expose_value=False, envvar="FEDMQTT_CONFIG")]
DpAdjacencyOpt = Annotated[str | None, typer.Option(
    help="fedbuff central DP: neighbouring data sets ε is stated for: replace (one device's data replaced; 2C "
         "per step it is in; the default), zero-out (its deltas zeroed; C) or, with --dp-sampling only, "
         "add-remove (the device absent; C; the default there) (docs/security.md)")]
DpSamplingOpt = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="fedbuff central DP: steps on a clock (--dp-step-seconds) instead of after K "
                           "deltas, each update taken with this probability (Poisson sampling, amplified ε; "
                           "1: clocked steps without sampling); K is the fixed denominator of each step")]
DpStepSecondsOpt = Annotated[float, typer.Option(
    min=0.01, help="with --dp-sampling: a step every this many seconds, whatever it holds")]
DpQuantileOpt = Annotated[float | None, typer.Option(
    help="fedbuff central DP: adaptive clipping, the clip follows this quantile of the deltas' norms (e.g. "
         "0.5); --dp-clip is where it starts; the count is noised with std K/20")]
DpMaxStepsOpt = Annotated[int | None, typer.Option(
    min=1, help="fedbuff central DP: steps one device may take part in; later updates are refused "
                "(privacy_budget), so ε is bounded by this count however long the federation runs")]
PrintConfigOpt = Annotated[bool, typer.Option(help="print the settings this command would run with, and exit")]
VerboseOpt = Annotated[bool, typer.Option(help="log everything (DEBUG); without it the services log connections "
                                               "and status lines, the demo only errors")]



def check_names(agent_id: str | None, prefix: str, federation: str) -> None:
    """Ids and topic levels, checked; a bad one is a ConfigError."""
    try:
        if agent_id is not None:
            check_id(agent_id, "agent id")
        check_segment(prefix, "prefix")
        check_federation(federation)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def check_broker_url(url: str) -> str:
    from fedmqtt.transport import BrokerConfig

    BrokerConfig.from_url(url)
    return url


def print_config_and_exit(settings: dict[str, Any]) -> NoReturn:
    print_config(settings)
    raise typer.Exit()

"""The options several commands share (their types, defaults and help), for cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedmqtt.cli_config import CONFIG_HELP, load_config

BrokerOpt = Annotated[str, typer.Option(envvar="FEDMQTT_BROKER_URL",
                                        help="mqtt://HOST:PORT or mqtts://HOST:PORT; credentials and TLS "
                                             "files come from FEDMQTT_* environment variables")]
PrefixOpt = Annotated[str, typer.Option(help="topic prefix")]
FedOpt = Annotated[str, typer.Option(help="federation name")]
TaskOpt = Annotated[str, typer.Option(help="built-in task: digits, or hapt (needs the HAPT file, FEDMQTT_HAPT)")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help=CONFIG_HELP, callback=load_config, is_eager=True, expose_value=False, envvar="FEDMQTT_CONFIG")]
PrintConfigOpt = Annotated[bool, typer.Option(help="print the settings this command would run with, and exit")]
VerboseOpt = Annotated[bool, typer.Option(help="log everything (DEBUG); without it the services log connections "
                                               "and status lines, the demo only errors")]


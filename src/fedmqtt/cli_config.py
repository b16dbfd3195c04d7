"""Settings files for the services: a deployment is a TOML file, not a 20-option command line.

A file holds the options of one command by their long names (``local-steps`` or ``local_steps``), at the top
level or in a table named after the command, so that one file can serve several::

    [aggregator]
    broker = "mqtts://broker.example:8883"
    strategy = "fedbuff"
    buffer-size = 10

    [edge]
    broker = "mqtts://broker.example:8883"
    local-steps = 20

The command line wins over the environment (``FEDMQTT_*``), which wins over the file. ``--print-config``
prints what a command would run with, in this format.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import typer

# "\\[": the help is rich markup, where [edge] alone would be taken for a style and vanish
CONFIG_HELP = ("TOML file of settings (option names as keys, at the top level or under \\[aggregator], "
               "\\[edge], \\[watch], \\[coordinator]); the command line and FEDMQTT_* variables override it")


def load_config(ctx: typer.Context, param: Any, value: Path | None) -> None:
    """Eager ``--config`` callback: the file's settings become the command's defaults."""
    if value is None:
        return
    try:
        data = tomllib.loads(Path(value).read_text())
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {value}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise typer.BadParameter(f"{value} is not valid TOML: {exc}") from exc
    name = ctx.info_name or ""
    section = data.get(name)
    table: dict[str, Any] = section if isinstance(section, dict) else {
        k: v for k, v in data.items() if not isinstance(v, dict)}
    known = {p.name for p in ctx.command.params if p.name and p.name != "config"}
    settings = {str(k).replace("-", "_"): v for k, v in table.items()}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise typer.BadParameter(f"{value}: {name} has no setting {', '.join(unknown)}")
    ctx.default_map = {**(ctx.default_map or {}), **settings}


def print_config(settings: dict[str, Any]) -> None:
    """Print ``settings`` as a TOML file that ``--config`` reads back (unset options are left out)."""
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        print(f"{key.replace('_', '-')} = {text}")

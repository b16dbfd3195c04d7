"""``fedmqtt coordinator``: one coordinator for every federation under a prefix (no JAX needed)."""

from __future__ import annotations

from typing import Any

from fedmqtt.allocation import PolicyConfig, make
from fedmqtt.cli_run import err, run, serve
from fedmqtt.coordinator import Coordinator, CoordinatorConfig
from fedmqtt.errors import ConfigError
from fedmqtt.topics import check_federation
from fedmqtt.transport import BrokerConfig, mqtt_connector


def parse_federations(text: str) -> dict[str, str]:
    """``hapt=hapt,digits=digits`` (federation=task; a bare name is its own task) as a dict.

    >>> parse_federations("plant-a=hapt, digits")
    {'plant-a': 'hapt', 'digits': 'digits'}
    """
    out: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        fed, _, task = item.partition("=")
        fed, task = fed.strip(), (task.strip() or fed.strip())
        try:
            check_federation(fed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if fed in out:
            raise ConfigError(f"federation {fed!r} given twice in --federations")
        out[fed] = task
    if not out:
        raise ConfigError("--federations names none (give federation=task pairs, e.g. hapt=hapt,digits=digits)")
    return out


def run_coordinator(s: dict[str, Any]) -> None:
    try:
        policy = make(s["policy"])
        cfg = PolicyConfig(parse_federations(s["federations"]), local_steps=s["local_steps"],
                           participation_target=s["participation_target"],
                           participation_floor=s["participation_floor"], upload_budget=s["upload_budget"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    coord = Coordinator(mqtt_connector(BrokerConfig.from_url(s["broker"])), policy,
                        CoordinatorConfig(cfg, prefix=s["prefix"], debounce=s["debounce"]))
    feds = ", ".join(f"{f} ({t})" for f, t in cfg.federations.items())
    err.print(f"coordinator: {policy.name} on {s['broker']}, prefix {s['prefix']!r}, federations {feds}")
    run(serve(coord, coord.status, s["status_every"]))

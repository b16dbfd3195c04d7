"""``fedmqtt broker``: run a local Mosquitto, or set up and change the secure profile."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from fedmqtt.choices import BROKER_KINDS, check_choice
from fedmqtt.cli_run import err, fail, run
from fedmqtt.errors import ConfigError, FedMQTTError
from fedmqtt.topics import Topics

PrefixOpt = Annotated[str, typer.Option(help="topic prefix")]
FedOpt = Annotated[str, typer.Option(help="federation name")]

broker_app = typer.Typer(help="Run or set up a Mosquitto broker.", no_args_is_help=True)


@broker_app.command("run")
def broker_run(
    port: Annotated[int, typer.Option(min=0, max=65535, help="listener port (0: a free one)")] = 1883,
    bind: Annotated[str, typer.Option(help="listener address (0.0.0.0: every interface)")] = "127.0.0.1",
    data_dir: Annotated[Path | None, typer.Option(
        help="where Mosquitto keeps retained models and queued sessions across restarts (default: "
             "$XDG_DATA_HOME/fedmqtt-broker)")] = None,
    kind: Annotated[str, typer.Option(help="auto, mosquitto or embedded (no persistence)")] = "auto",
) -> None:
    """Run a broker from the repo's mosquitto.conf until interrupted (stopped with SIGTERM, so it saves)."""
    from fedmqtt.broker import MosquittoProcess, check_port_free, free_port, has_mosquitto, local_broker
    from fedmqtt.durability import data_home

    check_choice(kind, BROKER_KINDS, "broker kind")
    port = port or free_port(bind if bind not in ("0.0.0.0", "::") else "127.0.0.1")
    check_port_free(bind, port)
    if kind == "embedded" or (kind == "auto" and not has_mosquitto()):
        async def embedded(stop: asyncio.Event) -> None:
            async with local_broker("embedded", port) as b:
                err.print(f"embedded broker (amqtt, MQTT 3.1.1, no persistence) listening on {b.url}")
                await stop.wait()
        run(embedded)
        return
    directory = data_dir or data_home() / "fedmqtt-broker"
    proc = MosquittoProcess.prepare(port, data_dir=directory, host=bind)

    async def serve(stop: asyncio.Event) -> None:
        await proc.start()
        err.print(f"mosquitto listening on mqtt://{bind}:{port}, data in {directory} (Ctrl-C stops it)")
        assert proc.process is not None
        while not stop.is_set() and proc.process.poll() is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        if proc.process.poll() is not None:
            raise ConfigError(f"mosquitto exited with status {proc.process.returncode}; see "
                              f"{directory / 'mosquitto.log'}")

    try:
        run(serve)
    finally:
        proc.stop()  # SIGTERM: Mosquitto writes its persistence file
    err.print(f"mosquitto stopped; its data stays in {directory}")


@broker_app.command("init")
def broker_init(
    out: Annotated[str, typer.Option(help="directory for CA, certificates, passwd, acl, config, env files")],
    agents: Annotated[str, typer.Option(help="comma-separated agent ids (pseudonyms, see docs/security.md)")],
    client_certs: Annotated[bool, typer.Option(help="also issue client certificates, require them")] = False,
    host: Annotated[list[str] | None, typer.Option(help="broker name/address clients use (repeat)")] = None,
    port: Annotated[int, typer.Option(help="TLS listener port")] = 8883,
    prefix: PrefixOpt = "fedmqtt",
    federation: FedOpt = "default",
    coordinator: Annotated[str | None, typer.Option(
        help="also make an identity for a coordinator (protocol 1.1): it reads every federation's agent "
             "statuses and alone writes the assignments")] = None,
    workers: Annotated[str, typer.Option(help="comma-separated ids of the aggregator's workers (`fedmqtt "
                                              "worker`): each reads the updates and writes sums and acks")] = "",
    force: Annotated[bool, typer.Option(help="replace an existing CA and every credential")] = False,
) -> None:
    """Create the secure broker profile: local CA, TLS certificates, passwords, ACL and one env file each."""
    from fedmqtt.security import init_broker

    hosts = tuple(host) if host else ("localhost", "127.0.0.1", "::1")
    try:
        profile = init_broker(Path(out), agents.split(","), topics=Topics(prefix, federation), hosts=hosts,
                              port=port, client_certs=client_certs, coordinator=coordinator,
                              workers=[w for w in workers.split(",") if w], overwrite=force)
    except (FedMQTTError, ValueError) as exc:
        raise fail(str(exc)) from exc
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
            raise fail(str(exc)) from exc
    err.print(RELOAD_HINT)


@broker_app.command("add-agent")
def broker_add_agent(directory: ProfileDir,
                     agents: Annotated[list[str], typer.Argument(help="agent ids to add")]) -> None:
    """Add devices to a secure profile: password, ACL block, env file (and client certificate)."""
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
    from fedmqtt.membership import revoke_agent

    def revoke(agent: str) -> str:
        r = revoke_agent(Path(directory), agent)
        cert = f", certificate serial {r.certificate_serial:x} on the CRL" if r.certificate_serial else ""
        return (f"revoked {agent}: password {'removed' if r.password else 'absent'}, "
                f"ACL {'removed' if r.acl else 'absent'}{cert}")

    _each_agent(agents, revoke)


@broker_app.command("bridge")
def broker_bridge(
    site_id: Annotated[str, typer.Option(help="the site's agent id upstream")],
    root: Annotated[str, typer.Option(help="the upstream broker, host:port")] = "127.0.0.1:1883",
    prefix: Annotated[str, typer.Option(help="topic prefix")] = "fedmqtt",
    federation: Annotated[str, typer.Option(help="federation name")] = "default",
    cafile: Annotated[str | None, typer.Option(help="CA certificate for TLS to the upstream broker")] = None,
    username: Annotated[str | None, typer.Option(help="the bridge's user name upstream")] = None,
) -> None:
    """Print the bridge block to append to a site broker's mosquitto.conf (only the site's topics cross it).
    The password, if any, goes in by hand: `remote_password ...`."""
    from fedmqtt.bridge import bridge_config

    host, _, port = root.rpartition(":")
    try:
        print(bridge_config(site_id, Topics(prefix, federation), host or "127.0.0.1", int(port), cafile=cafile,
                            username=username), end="")
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc

"""Start a broker for the demo and the tests: the local ``mosquitto`` binary with the repo's
``mosquitto.conf`` on a free loopback port, or, where no binary is installed, an embedded pure-Python
broker (amqtt, MQTT 3.1.1) in the same event loop.

``async with local_broker() as broker: broker.config`` is a :class:`BrokerConfig` pointing at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from fedmqtt.errors import ConfigError
from fedmqtt.transport import BrokerConfig

log = logging.getLogger("fedmqtt.broker")
Kind = Literal["auto", "mosquitto", "embedded"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def repo_config() -> Path | None:
    """``$FEDMQTT_MOSQUITTO_CONF``, else the ``mosquitto.conf`` at the root of a source checkout."""
    env = os.environ.get("FEDMQTT_MOSQUITTO_CONF")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "mosquitto.conf"
        if candidate.is_file() and (parent / "pyproject.toml").is_file():
            return candidate
    return None


def render_config(source: str, port: int, data_dir: Path, host: str = "127.0.0.1") -> str:
    """The repo's config with the listener moved to ``host:port`` (loopback by default) and persistence in
    ``data_dir``."""
    out, saw_listener = [], False
    for line in source.splitlines():
        word = line.split(maxsplit=1)[0] if line.strip() and not line.lstrip().startswith("#") else ""
        if word == "listener" and not saw_listener:
            out.append(f"listener {port} {host}")
            saw_listener = True
        elif word == "listener":
            continue  # only the first (plain) listener is started
        elif word == "persistence_location":
            out.append(f"persistence_location {data_dir}/")
        elif word in ("pid_file", "log_dest") and "stderr" not in line:
            continue
        else:
            out.append(line)
    if not saw_listener:
        out.append(f"listener {port} {host}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Started as root by fedmqtt: keep access to its own temporary directory.
        out.append("user root")
    return "\n".join(out) + "\n"


async def wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


@dataclass
class MosquittoProcess:
    """A Mosquitto subprocess that can be stopped cleanly, killed and started again on the same port
    and data directory (used by the fault-injection tests)."""

    port: int
    data_dir: Path
    conf_path: Path
    process: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"

    @classmethod
    def prepare(cls, port: int | None = None, config: Path | None = None, data_dir: Path | None = None,
                host: str = "127.0.0.1") -> MosquittoProcess:
        source = config or repo_config()
        text = source.read_text() if source else "persistence true\n"
        data = data_dir or Path(tempfile.mkdtemp(prefix="fedmqtt-mosquitto-"))
        data.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        conf = data / "mosquitto.conf"
        conf.write_text(render_config(text, port, data, host))
        return cls(port, data, conf, host=host)

    async def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        # Starting the process is quick; only the wait for its port needs to be asynchronous.
        with open(self.data_dir / "mosquitto.log", "ab") as log_file:  # noqa: ASYNC230  (the child keeps a copy)
            self.process = subprocess.Popen([binary, "-c", str(self.conf_path)],  # noqa: ASYNC220
                                            stdout=subprocess.DEVNULL, stderr=log_file)
        probe = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host
        try:
            await wait_listening(probe, self.port)
            if self.process.poll() is not None:  # what answered is somebody else
                raise OSError(f"mosquitto exited with status {self.process.returncode}")
        except OSError as exc:
            self.kill()
            log_text = (self.data_dir / "mosquitto.log").read_text(errors="replace").strip()[-1000:]
            raise ConfigError(f"mosquitto did not start on port {self.port}: {log_text or exc}") from exc

    def stop(self, timeout: float = 10.0) -> None:
        """Clean stop (SIGTERM): Mosquitto writes its persistence file first."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def config(self) -> BrokerConfig:
        return BrokerConfig(host="127.0.0.1", port=self.port)


def check_port_free(host: str, port: int) -> None:
    """ConfigError when ``host:port`` cannot be bound (another broker, most likely)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"port {port} on {host} is taken ({exc.strerror}): another broker? choose "
                              "another --port, or --port 0 for a free one") from exc


def has_mosquitto() -> bool:
    return shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").is_file()


@dataclass(frozen=True)
class RunningBroker:
    kind: Literal["mosquitto", "embedded", "external"]
    config: BrokerConfig

    @property
    def url(self) -> str:
        return self.config.url


@contextlib.asynccontextmanager
async def local_broker(kind: Kind = "auto", port: int | None = None) -> AsyncIterator[RunningBroker]:
    """Run a broker for the duration of the block (see module docstring)."""
    if kind == "auto":
        kind = "mosquitto" if has_mosquitto() else "embedded"
    if kind not in ("mosquitto", "embedded"):
        raise ConfigError(f"unknown broker kind {kind!r}: use auto, mosquitto, embedded or an mqtt:// URL")
    if kind == "mosquitto":
        proc = MosquittoProcess.prepare(port)
        await proc.start()
        try:
            yield RunningBroker("mosquitto", proc.config)
        finally:
            proc.kill()
            shutil.rmtree(proc.data_dir, ignore_errors=True)
        return
    async with embedded_broker(port or free_port()) as cfg:
        yield RunningBroker("embedded", cfg)


@contextlib.asynccontextmanager
async def embedded_broker(port: int) -> AsyncIterator[BrokerConfig]:
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise ConfigError("no mosquitto binary and no embedded broker: pip install 'fedmqtt[embedded]'") from exc
    config: dict[str, Any] = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 1000}},
        "sys_interval": 0,
        "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
        "topic-check": {"enabled": False},
    }
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    broker = Broker(config)
    await broker.start()
    try:
        await wait_listening("127.0.0.1", port)
        # amqtt speaks MQTT 3.1.1 only.
        yield replace(BrokerConfig(host="127.0.0.1", port=port), protocol=4)
    finally:
        await broker.shutdown()

"""Shared fixtures. Broker tests start their own Mosquitto from the repo's mosquitto.conf on a free
loopback port, or use an external broker when FEDMQTT_BROKER_URL is set."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator

import pytest

from fedmqtt.broker import MosquittoProcess, has_mosquitto
from fedmqtt.transport import BrokerConfig


def _start(proc: MosquittoProcess) -> None:
    asyncio.run(proc.start())


def _no_broker(why: str) -> None:
    """Skip a broker test where no broker can be had; in CI (``CI`` set) that is a failure, not a skip, so
    that the broker tests can never silently stop running."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {why}: the broker tests cannot run", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerConfig]:
    """A running broker for the whole session (shared: tests use unique federation names)."""
    url = os.environ.get("FEDMQTT_BROKER_URL")
    if url:
        yield BrokerConfig.from_url(url)
        return
    if not has_mosquitto():
        _no_broker("no mosquitto binary (install it, or set FEDMQTT_BROKER_URL)")
    proc = MosquittoProcess.prepare()
    _start(proc)
    try:
        yield proc.config
    finally:
        proc.kill()
        shutil.rmtree(proc.data_dir, ignore_errors=True)


@pytest.fixture
def mosquitto() -> Iterator[MosquittoProcess]:
    """A private Mosquitto process that the test may stop, kill and restart (fault injection)."""
    if not has_mosquitto():
        _no_broker("no mosquitto binary")
    proc = MosquittoProcess.prepare()
    _start(proc)
    try:
        yield proc
    finally:
        proc.kill()
        shutil.rmtree(proc.data_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _data_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Aggregators started by tests keep their default state in a temporary data directory, never in the
    user's own (the CLI aggregator is durable by default)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data-home")))


_counter = iter(range(1_000_000))


@pytest.fixture
def federation(request: pytest.FixtureRequest) -> str:
    """A federation name unique to this test, so tests sharing a broker never see each other's topics."""
    return f"t{os.getpid()}-{next(_counter)}-{request.node.name[:40]}".replace("[", "-").replace("]", "").replace(
        "/", "-").replace("+", "-").replace("#", "-")

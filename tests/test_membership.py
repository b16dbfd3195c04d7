"""Adding and revoking one device in a secure profile: the files offline, then a real Mosquitto that re-reads
them on SIGHUP (passwords, ACL, and the CRL for a copied client certificate)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fedmqtt.broker import has_mosquitto
from fedmqtt.errors import ConfigError, TransportError
from fedmqtt.membership import add_agent, revoke_agent, revoke_certificate, revoked_serials, users
from fedmqtt.security import init_broker, load_env_file
from fedmqtt.transport import BrokerConfig
from test_security import TOPICS, SecureBroker, collect, connected

pytest.importorskip("cryptography")


def test_add_and_revoke_touch_only_that_device(tmp_path: Path) -> None:
    p = init_broker(tmp_path / "s", ["a1", "a2"], port=18883, client_certs=True)
    d = p.directory
    before = {ln.split(":")[0]: ln for ln in (d / "passwd").read_text().splitlines()}
    ident = add_agent(d, "a3")
    assert ident.env_file is not None and ident.cert_file is not None and ident.cert_file.exists()
    assert ident.env_file.stat().st_mode & 0o077 == 0
    env = load_env_file(ident.env_file)
    assert env["FEDMQTT_AGENT_ID"] == env["FEDMQTT_USERNAME"] == "a3"
    assert env["FEDMQTT_BROKER_URL"] == "mqtts://localhost:18883"
    assert env["FEDMQTT_PASSWORD"] not in (d / "passwd").read_text()
    assert "user a3\ntopic write fedmqtt/default/updates/a3\n" in (d / "acl").read_text()
    with pytest.raises(ConfigError, match="already"):
        add_agent(d, "a3")

    r = revoke_agent(d, "a2")
    assert (r.password, r.acl) == (True, True) and r.certificate_serial in revoked_serials(d)
    assert users(d) == ["aggregator", "watcher", "a1", "a3"]
    after = {ln.split(":")[0]: ln for ln in (d / "passwd").read_text().splitlines()}
    assert after["a1"] == before["a1"] and after["aggregator"] == before["aggregator"]  # others untouched
    acl = (d / "acl").read_text()
    assert "a2" not in acl and "user a1" in acl and "user a3" in acl
    assert not (d / "env" / "a2.env").exists() and not (d / "clients" / "a2.key").exists()
    with pytest.raises(ConfigError, match="not in the profile"):
        revoke_agent(d, "a2")
    with pytest.raises(ConfigError, match="aggregator"):
        revoke_agent(d, "aggregator")


def test_revoking_needs_the_ca_key_and_changes_nothing_without_it(tmp_path: Path) -> None:
    p = init_broker(tmp_path / "s", ["a1"], port=18883, client_certs=True)
    d = p.directory
    before = {name: (d / name).read_bytes() for name in ("passwd", "acl", "crl.pem", "clients/a1.crt")}
    (d / "ca.key").rename(tmp_path / "offline-ca.key")
    with pytest.raises(ConfigError, match="CA key"):
        revoke_agent(d, "a1")
    assert {name: (d / name).read_bytes() for name in before} == before  # not half revoked


@pytest.mark.parametrize("bad", ["x:1", "a b", "a\nuser aggregator", "é"])
def test_usernames_that_would_corrupt_passwd_or_acl_are_refused(tmp_path: Path, bad: str) -> None:
    p = init_broker(tmp_path / "s", ["a1"], port=18883)
    with pytest.raises(ConfigError, match="must be"):
        add_agent(p.directory, bad)
    with pytest.raises(ConfigError, match="must be"):
        init_broker(tmp_path / "t", [bad])


# ---- against Mosquitto --------------------------------------------------------------------------------
@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SecureBroker]:
    if not has_mosquitto():
        pytest.fail("CI is set but there is no mosquitto binary") if os.environ.get("CI") else pytest.skip(
            "no mosquitto binary")
    b = SecureBroker(tmp_path / "secure", client_certs=True)
    try:
        yield b
    finally:
        b.stop()


def identity(b: SecureBroker, user: str) -> BrokerConfig:
    """A client config from the user's env file as it is on disk now (as a device would have it)."""
    env = load_env_file(b.profile.directory / "env" / f"{user}.env")
    return BrokerConfig.from_url(f"mqtts://127.0.0.1:{b.profile.port}", env=env)


async def can_connect(cfg: BrokerConfig, client_id: str) -> bool:
    try:
        async with connected(cfg, client_id):
            return True
    except TransportError:
        return False


async def until(predicate, seconds: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll an async predicate after a reload (Mosquitto gives no signal that it has re-read its files)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.2)
    return False


@pytest.mark.broker
async def test_added_device_joins_and_revoked_device_is_cut_off(broker: SecureBroker) -> None:
    d = broker.profile.directory
    add_agent(d, "a3")
    broker.process.send_signal(signal.SIGHUP)
    assert await until(lambda: can_connect(identity(broker, "a3"), "new-a3"))

    stolen = d.parent / "stolen"  # what a stolen device (or a copy of its files) still holds after revocation
    stolen.mkdir()
    for name in ("a2.crt", "a2.key"):
        shutil.copy(d / "clients" / name, stolen / name)
    a2_before = replace(identity(broker, "a2"), cert_file=str(stolen / "a2.crt"), key_file=str(stolen / "a2.key"))
    async with connected(broker.config("aggregator"), "m-agg") as agg:
        await agg.subscribe(f"{TOPICS.base}/updates/+")
        async with connected(a2_before, "old-a2") as a2, connected(identity(broker, "a3"), "m-a3") as a3:
            revoke_agent(d, "a2")
            broker.process.send_signal(signal.SIGHUP)
            assert await until(lambda: _not(a2_before))
            with contextlib.suppress(TransportError):  # the still-open session is no longer authorised
                await a2.publish(TOPICS.update("a2"), b"after revocation", qos=1)
            await a3.publish(TOPICS.update("a3"), b"sentinel", qos=1)
        got = await collect(agg, TOPICS.update("a3"))
    assert [(m.topic, m.payload) for m in got] == [(TOPICS.update("a3"), b"sentinel")]


async def _not(cfg: BrokerConfig) -> bool:
    return not await can_connect(cfg, "probe")


@pytest.mark.broker
async def test_revoked_certificate_is_refused_with_a_valid_password(broker: SecureBroker) -> None:
    d = broker.profile.directory
    cfg = identity(broker, "a1")
    assert await can_connect(cfg, "cert-a1")
    serial = revoke_certificate(d, d / "clients" / "a1.crt")  # the password stays valid: only the CRL acts
    assert serial in revoked_serials(d)
    broker.process.send_signal(signal.SIGHUP)
    assert await until(lambda: _not(cfg))
    assert not await can_connect(replace(cfg, cert_file=None, key_file=None), "nocert-a1")
    assert await can_connect(identity(broker, "a2"), "cert-a2")  # other certificates still work
    assert not await can_connect(cfg, "cert-a1-again")  # still refused once the reload is surely over


def test_cli_adds_and_revokes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedmqtt.cli import app

    d = init_broker(tmp_path / "s", ["a1"], port=18883).directory
    runner = CliRunner()
    added = runner.invoke(app, ["broker", "add-agent", "--dir", str(d), "a2", "a3"])
    assert added.exit_code == 0, added.output
    assert users(d) == ["aggregator", "watcher", "a1", "a2", "a3"]
    revoked = runner.invoke(app, ["broker", "revoke", "--dir", str(d), "a2"])
    assert revoked.exit_code == 0, revoked.output
    again = runner.invoke(app, ["broker", "revoke", "--dir", str(d), "a2"])
    assert again.exit_code == 1 and users(d) == ["aggregator", "watcher", "a1", "a3"]

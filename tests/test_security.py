"""The secure broker profile against a real Mosquitto: TLS only, passwords, per-agent ACL, client
certificates, and a federation that still learns over TLS. Also the offline helpers (pseudonyms, password
hashes, config)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.broker import free_port, has_mosquitto, wait_listening
from fedmqtt.errors import TransportError
from fedmqtt.security import (
    DOCKER_DIR,
    SecureProfile,
    init_broker,
    load_env_file,
    mosquitto_password_hash,
    pseudonym,
    secure_config,
)
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, Inbox, Message, MqttTransport, mqtt_connector

pytest.importorskip("cryptography")

TOPICS = Topics("fedmqtt", "secure")
AGENTS = ["a1", "a2"]
REPO = Path(__file__).resolve().parents[1]


# ---- a Mosquitto started from `broker init`'s files, on a free loopback port --------------------------
class SecureBroker:
    def __init__(self, directory: Path, client_certs: bool) -> None:
        port = free_port()
        self.profile = init_broker(directory, AGENTS, topics=TOPICS, hosts=("127.0.0.1", "localhost"),
                                   port=port, bind="127.0.0.1", client_certs=client_certs, workers=["w1"])
        conf = self.profile.config  # as written: started by root or by its owner, it reads its 0600 files
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.log = directory / "mosquitto.log"
        self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=self.log.open("ab"))
        asyncio.run(wait_listening("127.0.0.1", port))

    def config(self, user: str | None, **overrides: object) -> BrokerConfig:
        """A client config for ``user`` built the way devices build it: URL + env file."""
        env = self.profile.env(user) if user else {"FEDMQTT_CA_FILE": str(self.profile.ca_file)}
        return BrokerConfig.from_url(f"mqtts://127.0.0.1:{self.profile.port}", env=env, **overrides)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    if not has_mosquitto():
        pytest.fail("CI is set but there is no mosquitto binary") if os.environ.get("CI") else pytest.skip(
            "no mosquitto binary")
    b = SecureBroker(tmp_path_factory.mktemp("secure"), client_certs=False)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def secure_certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    if not has_mosquitto():
        pytest.fail("CI is set but there is no mosquitto binary") if os.environ.get("CI") else pytest.skip(
            "no mosquitto binary")
    b = SecureBroker(tmp_path_factory.mktemp("secure-certs"), client_certs=True)
    try:
        yield b
    finally:
        b.stop()


@contextlib.asynccontextmanager
async def connected(cfg: BrokerConfig, client_id: str) -> AsyncIterator[MqttTransport]:
    inbox = Inbox()
    async with MqttTransport(cfg, client_id, on_message=inbox, timeout=5.0) as t:
        INBOXES[id(t)] = inbox
        yield t


INBOXES: dict[int, Inbox] = {}


async def collect(t: MqttTransport, until: str, seconds: float = 10.0) -> list[Message]:
    """Messages received up to and including the first one on ``until``."""
    out: list[Message] = []

    async def run() -> None:
        async for m in INBOXES[id(t)]:
            out.append(m)
            if m.topic == until:
                return

    await asyncio.wait_for(run(), seconds)
    return out


# ---- authentication and transport -------------------------------------------------------------------
@pytest.mark.broker
async def test_valid_identity_connects(secure: SecureBroker) -> None:
    async with connected(secure.config("a1"), "ok-a1") as t:
        await t.publish(TOPICS.update("a1"), b"x")


@pytest.mark.broker
async def test_anonymous_refused(secure: SecureBroker) -> None:
    with pytest.raises(TransportError):
        async with connected(secure.config(None), "anon"):
            pass


@pytest.mark.broker
async def test_wrong_password_refused(secure: SecureBroker) -> None:
    with pytest.raises(TransportError):
        async with connected(replace(secure.config("a1"), password="not-the-password"), "wrong"):
            pass


@pytest.mark.broker
async def test_other_agents_password_refused(secure: SecureBroker) -> None:
    cfg = replace(secure.config("a1"), password=secure.profile.identities["a2"].password)
    with pytest.raises(TransportError):
        async with connected(cfg, "swap"):
            pass


@pytest.mark.broker
async def test_plain_tcp_refused(secure: SecureBroker) -> None:
    cfg = replace(secure.config("a1"), tls=False)
    with pytest.raises(TransportError):
        async with connected(cfg, "plain"):
            pass


@pytest.mark.broker
async def test_untrusted_server_certificate_refused(secure: SecureBroker) -> None:
    cfg = replace(secure.config("a1"), ca_file=None)  # the system trust store does not know our CA
    with pytest.raises(TransportError):
        async with connected(cfg, "no-ca"):
            pass


@pytest.mark.broker
async def test_client_certificate_required(secure_certs: SecureBroker) -> None:
    cfg = secure_certs.config("a1")
    assert cfg.cert_file
    assert cfg.key_file
    async with connected(cfg, "cert-ok"):
        pass
    with pytest.raises(TransportError):
        async with connected(replace(cfg, cert_file=None, key_file=None), "cert-missing"):
            pass


# ---- authorisation: what arrives at the aggregator and at other agents --------------------------------
@pytest.mark.broker
async def test_agent_cannot_write_others_topics(secure: SecureBroker) -> None:
    forbidden = [TOPICS.update("a2"), TOPICS.model, TOPICS.model_form("int8"), TOPICS.metrics, TOPICS.status("a2"),
                 TOPICS.acks("a2"),
                 f"{TOPICS.base}/updates/aggregator", "elsewhere/x"]
    async with connected(secure.config("aggregator"), "acl-agg") as agg:
        await agg.subscribe(f"{TOPICS.base}/#")
        await agg.subscribe("#")
        async with connected(secure.config("a1"), "acl-a1") as a1:
            for topic in forbidden:
                with contextlib.suppress(TransportError):  # a refusal may or may not surface per message
                    await a1.publish(topic, b"forged", qos=1)
            await a1.publish(TOPICS.update("a1"), b"sentinel", qos=1)
        got = await collect(agg, TOPICS.update("a1"))
    assert [(m.topic, m.payload) for m in got if not m.retain] == [(TOPICS.update("a1"), b"sentinel")]


@pytest.mark.broker
async def test_agent_reads_only_model_and_own_acks(secure: SecureBroker) -> None:
    async with connected(secure.config("a1"), "read-a1") as a1:
        await a1.subscribe("#")  # the broker accepts the filter but delivers only what the ACL allows
        async with connected(secure.config("aggregator"), "read-agg") as agg:
            for topic in (TOPICS.acks("a2"), TOPICS.metrics, TOPICS.status("a2"), TOPICS.update("a2")):
                await agg.publish(topic, b"private", qos=1)
            await agg.publish(TOPICS.model, b"model", qos=1)
            await agg.publish(TOPICS.model_form("int8"), b"int8 model", qos=1)
            await agg.publish(TOPICS.acks("a1"), b"mine", qos=1)
        got = await collect(a1, TOPICS.acks("a1"))
    assert [(m.topic, m.payload) for m in got] == [(TOPICS.model, b"model"), (TOPICS.model_form("int8"), b"int8 model"),
                                                   (TOPICS.acks("a1"), b"mine")]


@pytest.mark.broker
async def test_a_worker_takes_its_share_and_writes_sums_and_acks_which_no_device_may(secure: SecureBroker) -> None:
    """A worker identity (`broker init --workers`): its shared subscription to the updates is allowed, it may
    write its sums and the devices' acks; a device may write neither."""
    async with connected(secure.config("aggregator"), "wk-agg") as agg, \
            connected(secure.config("w1"), "wk-w1") as w1, connected(secure.config("a1"), "wk-a1") as a1:
        await agg.subscribe(TOPICS.combined_wildcard)
        await a1.subscribe(TOPICS.acks("a1"))
        await w1.subscribe(TOPICS.shared("fedmqtt-workers", TOPICS.updates_wildcard))
        for topic in (TOPICS.combined("a1"), TOPICS.combined("w1")):
            with contextlib.suppress(TransportError):
                await a1.publish(topic, b"forged sum", qos=1)
        await a1.publish(TOPICS.update("a1"), b"an update", qos=1)
        taken = await collect(w1, TOPICS.update("a1"))
        await w1.publish(TOPICS.combined("w1"), b"a sum", qos=1)
        await w1.publish(TOPICS.acks("a1"), b"accepted", qos=1)
        sums = await collect(agg, TOPICS.combined("w1"))
        acks = await collect(a1, TOPICS.acks("a1"))
    assert [(m.topic, m.payload) for m in taken] == [(TOPICS.update("a1"), b"an update")]
    assert [(m.topic, m.payload) for m in sums] == [(TOPICS.combined("w1"), b"a sum")]
    assert [m.payload for m in acks] == [b"accepted"]


@pytest.mark.broker
async def test_watcher_is_read_only(secure: SecureBroker) -> None:
    async with connected(secure.config("aggregator"), "w-agg") as agg:
        await agg.subscribe(f"{TOPICS.base}/#")
        async with connected(secure.config("watcher"), "w") as w:
            for topic in (TOPICS.model, TOPICS.metrics, TOPICS.update("watcher")):
                with contextlib.suppress(TransportError):
                    await w.publish(topic, b"forged", qos=1)
        async with connected(secure.config("a2"), "w-a2") as a2:
            await a2.publish(TOPICS.update("a2"), b"sentinel", qos=1)
        got = await collect(agg, TOPICS.update("a2"))
    assert [m.payload for m in got if not m.retain] == [b"sentinel"]


# ---- a federation over TLS ----------------------------------------------------------------------------
@pytest.mark.broker
@pytest.mark.slow
async def test_federation_learns_over_tls_with_signed_models(secure: SecureBroker) -> None:
    task = get_task("digits", num_clients=len(AGENTS), seed=0)
    trainer = task.trainer(0)
    evaluate = task.evaluate_fn(trainer)
    before = evaluate(trainer.initial)["accuracy"]
    agg_env = load_env_file(secure.profile.identities["aggregator"].env_file)  # type: ignore[arg-type]
    agg_cfg = AggregatorConfig(topics=TOPICS, client_id="fedmqtt-aggregator-tls",
                               signing_key=agg_env["FEDMQTT_SIGNING_KEY_FILE"])
    agg = Aggregator(mqtt_connector(secure.config("aggregator")), trainer.initial, make("fedasync"), agg_cfg)
    async with agg:
        await agg.wait_connected()
        async with contextlib.AsyncExitStack() as stack:
            agents = []
            for i, name in enumerate(AGENTS):
                env = load_env_file(secure.profile.identities[name].env_file)  # type: ignore[arg-type]
                cfg = BrokerConfig.from_url(f"mqtts://127.0.0.1:{secure.profile.port}", env=env)
                agent = EdgeAgent(mqtt_connector(cfg), env["FEDMQTT_AGENT_ID"], task.trainer(0),
                                  task.data_for(i, 0), AgentConfig(topics=TOPICS, model_key=env["FEDMQTT_MODEL_KEY"]))
                agents.append(await stack.enter_async_context(agent))
            await agg.wait_version(16, timeout=120)
        after = evaluate(agg.numpy_params())["accuracy"]
    assert agg.state.counters.accepted >= 16
    assert not agg.state.counters.rejected
    assert after > max(0.6, before + 0.3)
    assert all(a.error is None for a in agents)  # every model they took was signed by the aggregator


@pytest.mark.broker
async def test_a_device_using_the_aggregators_client_id_cannot_take_its_session(secure: SecureBroker) -> None:
    """The profile binds client ids to usernames: a device asking for the aggregator's client id gets its
    own, so the aggregator is neither disconnected nor robbed of its queued updates."""
    import numpy as np

    from fedmqtt import codec

    params = {"w": np.zeros(4, np.float32)}
    cfg = AggregatorConfig(topics=TOPICS, client_id="fedmqtt-secure-aggregator")
    agg = Aggregator(mqtt_connector(secure.config("aggregator")), params, make("fedasync"), cfg)
    update = codec.encode_update({"w": np.full(4, 0.1, np.float32)}, agent="a1", update_id="takeover-1",
                                 base_version=0, num_samples=1)
    async with agg:
        await agg.wait_connected()
        async with connected(secure.config("a1"), "fedmqtt-secure-aggregator") as thief:
            await thief.publish(TOPICS.update("a1"), update, qos=1)  # its own topic: allowed
            await agg.wait_until(lambda: agg.state.counters.accepted == 1, 10, lambda: "the update was lost")
            await asyncio.sleep(0.5)  # a takeover would have closed the aggregator's connection by now
        assert (agg.connects, agg.takeovers) == (1, 0)
        assert agg.connected.is_set()


# ---- offline helpers ------------------------------------------------------------------------------------
def test_password_hash_is_mosquitto_pbkdf2() -> None:
    line = mosquitto_password_hash("s3cret", rounds=101, salt=b"0123456789ab")
    _, kind, rounds, salt, digest = line.split("$")
    assert (kind, rounds, base64.b64decode(salt)) == ("7", "101", b"0123456789ab")
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", b"s3cret", b"0123456789ab", 101)
    assert mosquitto_password_hash("s3cret") != mosquitto_password_hash("s3cret")  # fresh salt each time


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="no mosquitto_passwd")
def test_password_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "u", "pw"], check=True, capture_output=True)
    _, _, rounds, salt, digest = f.read_text().strip().split(":", 1)[1].split("$")
    ours = mosquitto_password_hash("pw", int(rounds), base64.b64decode(salt))
    assert ours.split("$")[-1] == digest


def test_pseudonym_is_stable_keyed_and_valid() -> None:
    key = b"k" * 32
    assert pseudonym("serial-1", key) == pseudonym("serial-1", key)
    assert pseudonym("serial-1", key) != pseudonym("serial-2", key)
    assert pseudonym("serial-1", key) != pseudonym("serial-1", b"j" * 32)
    assert "serial" not in pseudonym("serial-1", key)
    Topics().update(pseudonym("serial-1", key))  # a valid topic level
    with pytest.raises(ValueError, match="16 bytes"):
        pseudonym("serial-1", b"short")


def test_init_writes_private_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    p: SecureProfile = init_broker(tmp_path / "s", ["dev-1"], port=18883)
    for name in ("ca.key", "server.key", "passwd", "env/dev-1.env", "env/aggregator.env"):
        assert (p.directory / name).stat().st_mode & 0o077 == 0, name
    env = load_env_file(p.directory / "env" / "dev-1.env")
    assert env["FEDMQTT_AGENT_ID"] == env["FEDMQTT_USERNAME"] == "dev-1"
    assert env["FEDMQTT_BROKER_URL"] == "mqtts://localhost:18883"
    assert env["FEDMQTT_PASSWORD"] not in (p.directory / "passwd").read_text()
    from fedmqtt.errors import ConfigError

    with pytest.raises(ConfigError, match="already holds a CA"):
        init_broker(tmp_path / "s", ["dev-1"])


def test_repo_secure_config_is_the_docker_rendering() -> None:
    repo = (REPO / "broker" / "secure" / "mosquitto.conf").read_text()
    assert repo == secure_config(DOCKER_DIR, 8883, None, False, Path("/mosquitto/data"))
    assert "allow_anonymous false" in repo
    assert "listener 1883" not in repo

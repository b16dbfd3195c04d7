"""BrokerConfig from URLs and the environment; MQTT topic matching; receiving through the one handler."""

from __future__ import annotations

import asyncio
import re
import subprocess

import pytest

from fedmqtt.broker import MosquittoProcess
from fedmqtt.errors import ConfigError, TransportError
from fedmqtt.memory_broker import MemoryBroker
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, mqtt_connector, topic_matches


def test_url_and_environment() -> None:
    env = {"FEDMQTT_USERNAME": "edge-1", "FEDMQTT_PASSWORD": "s3cret", "FEDMQTT_CA_FILE": "/etc/ca.crt"}
    cfg = BrokerConfig.from_url("mqtts://broker.example:8884", env=env)
    assert (cfg.host, cfg.port, cfg.tls) == ("broker.example", 8884, True)
    assert (cfg.username, cfg.password, cfg.ca_file) == ("edge-1", "s3cret", "/etc/ca.crt")
    assert "s3cret" not in repr(cfg)
    assert BrokerConfig.from_url("mqtt://h", env={}).port == 1883
    assert BrokerConfig.from_url("mqtts://h", env={}).port == 8883


@pytest.mark.parametrize("url", ["http://h:1883", "mqtt://", "mqtt://h:notaport", "mqtt://user:pw@h:1883"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        BrokerConfig.from_url(url, env={})


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [("a/+/c", "a/b/c", True), ("a/+/c", "a/b/d", False), ("a/#", "a/b/c", True), ("a/+", "a/b/c", False),
     ("fedmqtt/f/updates/+", "fedmqtt/f/updates/x", True), ("a/b", "a/b", True)],
)
def test_topic_matching(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


# ---- receiving: the one place fedmqtt relies on how aiomqtt receives (transport._delivery) --------------
@pytest.mark.broker
async def test_messages_reach_the_handler_in_order_through_aiomqtt(mosquitto: MosquittoProcess) -> None:
    """If aiomqtt stops handing each message to its queue's ``put_nowait`` (its ``queue_type`` option), this
    fails: no message would reach fedmqtt's handler, and every service would go deaf."""
    got = Inbox()
    connect = mqtt_connector(mosquitto.config)
    async with connect(ConnectOptions("rx", on_message=got)) as rx, connect(ConnectOptions("tx")) as tx:
        await rx.subscribe("t/#", qos=1)
        for i in range(50):
            await tx.publish(f"t/{i % 3}", str(i).encode(), qos=1)
        received = [await got.get(timeout=10) for _ in range(50)]
    assert [int(m.payload) for m in received] == list(range(50))
    assert [m.topic for m in received[:3]] == ["t/0", "t/1", "t/2"]
    assert got.dropped == 0


@pytest.mark.broker
async def test_closed_reports_a_lost_connection(mosquitto: MosquittoProcess) -> None:
    async with mqtt_connector(mosquitto.config)(ConnectOptions("lost")) as t:
        waiting = asyncio.create_task(t.closed())
        await asyncio.sleep(0.2)
        assert not waiting.done()  # open while the broker is up
        mosquitto.kill()
        with pytest.raises(TransportError, match="connection lost"):
            await asyncio.wait_for(waiting, 30)


def _data_segments_out(port: int) -> int | None:
    """The kernel's count of data segments sent by the TCP socket on local ``port`` (``ss``), or None."""
    try:
        out = subprocess.run(["ss", "-tin", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"data_segs_out:(\d+)", out)
    return int(found.group(1)) if found else None


@pytest.mark.broker
async def test_peek_sends_subscribe_and_unsubscribe_in_one_segment(mosquitto: MosquittoProcess) -> None:
    """A peek's UNSUBSCRIBE shares the SUBSCRIBE's TCP segment: sent apart, a lost second segment would keep
    the subscription open for a retransmission timeout and let newer versions down a slow link. Per peek the
    device sends one segment for both, and one for the PUBACK of the retained (QoS 1) copy: 2, not 3."""
    connect = mqtt_connector(mosquitto.config)
    got = Inbox()
    async with connect(ConnectOptions("pub")) as tx, connect(ConnectOptions("peeker", on_message=got)) as t:
        await tx.publish("m/peek", b"model", qos=1, retain=True)
        port = t._client._client.socket().getsockname()[1]  # type: ignore[attr-defined]
        before = _data_segments_out(port)
        if before is None:
            pytest.skip("no ss (iproute2) to read the socket's segment count")
        for _ in range(20):
            await t.peek("m/peek")
        after = _data_segments_out(port)
    assert got.queue.qsize() == 20  # each peek brought the retained copy
    assert after is not None and after - before <= 2 * 20


async def test_memory_broker_queues_at_most_max_queued_per_client() -> None:
    broker = MemoryBroker(max_queued=3)
    got = Inbox()
    async with broker.connect(ConnectOptions("rx", on_message=got)) as rx, \
            broker.connect(ConnectOptions("tx")) as tx:
        await rx.subscribe("t")
        for i in range(5):
            await tx.publish("t", bytes([i]))
        assert got.queue.qsize() == 0  # delivered later on the loop, never inside the publisher's call
        await asyncio.sleep(0)
        assert [m.payload for m in [got.queue.get_nowait() for _ in range(3)]] == [b"\x00", b"\x01", b"\x02"]
        assert rx.dropped == 2  # type: ignore[attr-defined]


def test_the_publish_decoder_returns_what_pahos_returns_without_its_copies() -> None:
    """fedmqtt.paho_patch replaces paho's PUBLISH decoder (which copies each payload four times): the same
    fields on well-formed packets of MQTT 3.1.1 and 5; MalformedPacket wherever paho raises it, and also for
    properties that run past the end of the packet (paho reads what is there)."""
    import struct

    from paho.mqtt.enums import MQTTProtocolVersion
    from paho.mqtt.exception import MalformedPacket
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from fedmqtt import paho_patch

    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/octet-stream"
    props.UserProperty = ("k", "v")
    checked = 0
    for topic in (b"fedmqtt/f/updates/a-1", b""):
        for qos in (0, 1, 2):
            for v5, prop in ((False, b""), (True, b"\x00"), (True, props.pack())):
                version = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
                body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", 7) if qos else b"") + prop
                header = 0x30 | (qos << 1) | 0x01 | 0x08
                for packet in (body, body + b"x" * 1000, *(body[:cut] for cut in (0, 1, 3, len(body) - 1))):
                    try:
                        want = paho_patch.paho_decode_publish(header, bytearray(packet), version)
                    except MalformedPacket:
                        with pytest.raises(MalformedPacket):
                            paho_patch.decode_publish(header, bytearray(packet), version)
                        continue
                    if len(packet) < len(body) and v5 and len(prop) > 1:  # properties cut short
                        with pytest.raises(MalformedPacket, match="properties"):
                            paho_patch.decode_publish(header, bytearray(packet), version)
                        continue
                    got = paho_patch.decode_publish(header, bytearray(packet), version)
                    assert (got.dup, got.qos, got.retain, got.topic, got.mid, got.payload) == \
                        (want.dup, want.qos, want.retain, want.topic, want.mid, bytes(want.payload))
                    assert str(got.properties) == str(want.properties)
                    checked += 1
    assert checked >= 24 and paho_patch.install()

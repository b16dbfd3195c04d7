"""paho-mqtt's PUBLISH decoder, without its copies of the payload; transport.py installs it.

paho-mqtt 2.x decodes each PUBLISH by peeling the packet with ``struct.unpack(f"!H{n}s", packet)`` three
times and then slicing it: four copies of the payload, made byte by byte by ``struct``. For a 400 kB update that
is most of the CPU a subscriber spends per message (measured: 2.3 s of 5 s in ``struct.unpack`` for a worker
taking 490 updates/s). This decoder reads the same fields through a memoryview and copies the payload once.
It returns what paho's returns, for MQTT 3.1.1 and 5 (a test compares the two on the same packets), and
raises ``MalformedPacket`` where paho's does.
"""

from __future__ import annotations

import struct
from typing import Any

import paho.mqtt
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

paho_decode_publish = _packet.decode_publish  # paho's own, kept for the comparison test


@_packet.convert_exception
def decode_publish(header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion) -> Any:
    view = memoryview(packet)
    (topic_len,) = struct.unpack_from("!H", view, 0)
    pos = 2 + topic_len
    if pos > len(view):
        raise MalformedPacket("topic longer than the packet")
    topic = bytes(view[2:pos])
    if protocol != MQTTProtocolVersion.MQTTv5 and not topic:
        raise MalformedPacket("topic can't be empty in MQTTv3")
    qos = (header & 0x06) >> 1
    mid = 0
    if qos > 0:
        (mid,) = struct.unpack_from("!H", view, pos)
        pos += 2
    properties = None
    if protocol == MQTTProtocolVersion.MQTTv5:
        length, vbi = VariableByteIntegers.decode(bytes(view[pos : pos + 4]))  # type: ignore[no-untyped-call]
        end = pos + vbi + length
        if end > len(view):
            raise MalformedPacket("properties longer than the packet")
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.unpack(bytes(view[pos:end]))  # type: ignore[no-untyped-call]
        pos = end
    return _packet.PublishPacket(dup=bool(header & 0x08), qos=qos, retain=bool(header & 0x01), topic=topic,
                                 mid=mid, properties=properties, payload=bytes(view[pos:]))


def install() -> bool:
    """Use this decoder in paho (2.x only: the one it was compared with); True when installed."""
    if not getattr(paho.mqtt, "__version__", "").startswith("2.") or not hasattr(_packet, "PublishPacket"):
        return False
    _packet.decode_publish = decode_publish
    return True

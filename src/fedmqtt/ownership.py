"""What an aggregator owns on the broker: its federation (one aggregator at a time) and its model topic.

``check_alone`` reads the retained aggregator presence (``.../aggregator/status``) on a connection of its
own, before the aggregator's client id could take another aggregator's session, and refuses to go on when
another instance is online. ``judge_model`` says what a model seen on the model topic means: ours (byte for
byte one we published), our own older copy from before a restart, a foreign model to replace (a forgery that
copies our version and epoch included), or proof that our state is behind what was published in our epoch (a
restored backup, or a forged far-future version): then a new epoch.

>>> from fedmqtt.types import ModelInfo
>>> judge_model(ModelInfo(7, "f", "async", "e1"), b"d1", version=7, epoch="e1", own={b"d1"})
'ours'
>>> judge_model(ModelInfo(7, "f", "async", "e1"), b"d2", version=7, epoch="e1", own={b"d1"})
'foreign'
>>> judge_model(ModelInfo(900, "f", "async", "e1"), b"d3", version=7, epoch="e1", own=set())
'behind'
>>> judge_model(None, b"d4", version=7, epoch="e1", own=set())
'foreign'
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Container
from typing import Literal

from fedmqtt import codec
from fedmqtt.errors import CodecError, InvalidUpdate, StateError
from fedmqtt.schemas import AggregatorStatus, dump, parse_model_metadata
from fedmqtt.topics import Topics
from fedmqtt.transport import ConnectOptions, Connector, Inbox
from fedmqtt.types import ModelInfo

Verdict = Literal["ours", "old-own", "foreign", "behind"]


def presence(instance: str, state: Literal["online", "offline"]) -> bytes:
    return dump(AggregatorStatus(instance=instance, state=state, ts=time.time()))


async def check_alone(connect: Connector, topics: Topics, instance: str, timeout: float = 5.0) -> None:
    """StateError when another aggregator instance is online for ``topics``' federation. Raises
    TransportError or TimeoutError when the broker cannot be asked (the caller decides)."""
    inbox = Inbox()
    probe = ConnectOptions(f"fedmqtt-{topics.federation}-probe-{uuid.uuid4().hex[:8]}", on_message=inbox)
    async with connect(probe) as t:
        await t.subscribe(topics.aggregator_status, qos=1)
        await t.publish(topics.aggregator_status, b"", qos=1)  # comes back after any retained one
        while (msg := await inbox.get(timeout=timeout)).payload:
            try:
                status = AggregatorStatus.model_validate_json(msg.payload)
            except ValueError:
                continue  # not a presence: nobody to yield to
            if status.state == "online" and status.instance != instance:
                raise StateError(
                    f"another aggregator (instance {status.instance}) serves federation {topics.federation!r} "
                    "on this broker; stop it first. (If it crashed, the broker marks it offline when its "
                    "keep-alive runs out, within a minute.)")


def model_info(payload: bytes, max_header: int) -> ModelInfo | None:
    """What a payload on the model topic says it is, from its header; None if it is not a model."""
    try:
        header, _ = codec.read_header(payload, max_header=max_header)
        return parse_model_metadata(codec.header_metadata(header))
    except (CodecError, InvalidUpdate):
        return None


def digest(payload: bytes) -> bytes:
    """What :func:`judge_model` compares: the SHA-256 of a whole model payload."""
    return hashlib.sha256(payload).digest()


def judge_model(info: ModelInfo | None, payload_digest: bytes, *, version: int, epoch: str,
                own: Container[bytes], restarted: bool = False) -> Verdict:
    """What a model seen on the model topic means to an aggregator at ``version`` of ``epoch`` that recently
    published the payloads whose digests are ``own``; ``restarted``: it has published nothing yet. Only the
    bytes make a model ours: a payload that claims our version and epoch but is not one we published is a
    forgery, and is replaced like any foreign model."""
    if payload_digest in own:
        return "ours"
    if info is None:
        return "foreign"
    if info.epoch == epoch and info.version > version:
        return "behind"
    if info.epoch == epoch and restarted:
        return "old-own"
    return "foreign"

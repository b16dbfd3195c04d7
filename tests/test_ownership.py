"""The model topic is the aggregator's alone (ownership.py): a model there that it did not publish is replaced
by its own, a forged copy that claims its current version and epoch included, and also when the forgery
arrives while the aggregator's own publish is still waiting for its acknowledgement."""

from __future__ import annotations

import asyncio

import numpy as np

from fedmqtt import codec, ownership
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.memory_broker import MemoryBroker, MemoryTransport
from fedmqtt.strategies import fedasync
from fedmqtt.topics import Topics
from fedmqtt.transport import ConnectOptions, Message
from fedmqtt.types import ModelInfo

PARAMS = {"w": np.zeros(4, np.float32)}
TOPICS = Topics(federation="owned")


def forgery(agg: Aggregator) -> bytes:
    """NaN weights under the aggregator's own version and epoch (both public on the retained model)."""
    c = agg.committed
    return codec.encode_model({"w": np.full(4, np.nan, np.float32)}, c.version, extra={"fedmqtt.epoch": c.epoch})


def is_ours(payload: bytes, agg: Aggregator) -> bool:
    d = codec.decode(payload)
    return (d.metadata["fedmqtt.version"], d.metadata["fedmqtt.epoch"]) == (str(agg.committed_version),
                                                                          agg.committed.epoch) \
        and bool(np.isfinite(d.tensors["w"]).all())


def test_only_the_bytes_published_make_a_model_ours() -> None:
    info = ModelInfo(7, "f", "async", "e1")
    ours, forged = ownership.digest(b"model as published"), ownership.digest(b"model as forged")
    assert ownership.judge_model(info, ours, version=7, epoch="e1", own={ours}) == "ours"
    assert ownership.judge_model(info, forged, version=7, epoch="e1", own={ours}) == "foreign"
    assert ownership.judge_model(info, forged, version=7, epoch="e1", own=set(), restarted=True) == "old-own"
    assert ownership.judge_model(info._replace(version=8), forged, version=7, epoch="e1", own={ours}) == "behind"


async def test_a_forged_copy_of_the_current_version_and_epoch_is_replaced() -> None:
    broker = MemoryBroker()
    agg = Aggregator(broker.connect, PARAMS, fedasync(), AggregatorConfig(topics=TOPICS))
    async with agg:
        await agg.wait_version(0, 5)
        forged = forgery(agg)
        broker.route(Message(TOPICS.model, forged, True))
        await agg.wait_until(lambda: agg.models_restored == 1, 5, lambda: "the forgery was not noticed")
        await agg.wait_until(lambda: is_ours(broker.retained[TOPICS.model], agg), 5,
                             lambda: "the forgery is still the retained model")


class Racing(MemoryTransport):
    """A connection on which a forged model reaches the aggregator while its own model publish is still
    waiting: the forger's copy came to the broker just after the aggregator's, so it is the one retained."""

    forged: bytes | None = None

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        await super().publish(topic, payload, qos, retain)
        if topic == TOPICS.model and Racing.forged is not None:
            forged, Racing.forged = Racing.forged, None
            self.broker.route(Message(topic, forged, True))
            for _ in range(3):
                await asyncio.sleep(0)  # handed to the aggregator before this publish returns


async def test_a_forgery_that_arrives_during_the_aggregators_own_publish_is_replaced() -> None:
    broker = MemoryBroker()

    def connect(opts: ConnectOptions) -> Racing:
        return Racing(broker, opts.client_id, opts.will, opts.on_message)

    agg = Aggregator(connect, PARAMS, fedasync(), AggregatorConfig(topics=TOPICS))
    async with agg:
        await agg.wait_version(0, 5)
        Racing.forged = forgery(agg)  # sent behind the next model the aggregator publishes
        update = codec.encode_update({"w": np.ones(4, np.float32)}, agent="a", update_id="u1", base_version=0,
                                     num_samples=1)
        broker.route(Message(TOPICS.update("a"), update, False))
        await agg.wait_until(lambda: agg.models_restored == 1, 5, lambda: "the forgery was not noticed")
        await agg.wait_until(lambda: is_ours(broker.retained[TOPICS.model], agg), 5,
                             lambda: "the forgery is still the retained model")
        assert agg.committed_version == 1

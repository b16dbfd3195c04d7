"""Hostile and malformed input: property tests of the decoder and validator. Thousands of bad payloads thrown
at a live aggregator through a real broker are in test_hostile_live.py; the agents' side in
test_hostile_agent_inputs.py; coverage-guided fuzzing in test_fuzz.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import uuid

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmqtt import codec, core, dedup
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.core import Entry, Limits
from fedmqtt.errors import CodecError, InvalidUpdate
from fedmqtt.strategies import fedasync
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, mqtt_connector
from fedmqtt.types import ID_PATTERN
from fedmqtt.validation import Reference, check_update

PARAMS = {"l1/kernel": np.zeros((8, 4), np.float32), "l1/bias": np.zeros(4, np.float32),
          "out/kernel": np.zeros((4, 3), np.float32)}
FP = codec.fingerprint(PARAMS)
REF = Reference.of(PARAMS)
RULES = core.rules(fedasync(0.5), PARAMS, Limits(max_staleness=2, max_update_norm=100.0, max_payload=1 << 16))
# version 3, so that stale and future bases both exist
STATE = core.init(RULES, PARAMS, epoch="t", version=3)


def good(agent: str = "good", base: int = 0, update_id: str | None = None, scale: float = 0.01,
         **over: object) -> bytes:
    delta = {k: np.full(v.shape, scale, v.dtype) for k, v in PARAMS.items()}
    args: dict[str, object] = {"agent": agent, "update_id": update_id or uuid.uuid4().hex,
                               "base_version": base, "num_samples": 10, "model_fingerprint": FP}
    args.update(over)
    return codec.encode_update(delta, **args)  # type: ignore[arg-type]


def raw_header(header: object, body: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


# ---- property tests -------------------------------------------------------------------------------------
def _decode_or_codec_error(payload: bytes) -> None:
    """Anything but CodecError escaping fails the test."""
    with contextlib.suppress(CodecError):
        codec.decode(payload, max_payload=1 << 16)


def _check_or_invalid(payload: bytes, agent: str = "good") -> None:
    """Anything but InvalidUpdate escaping check_update fails the test; the core answers every payload with
    exactly one reply, and a rejection changes nothing but its reason's counter."""
    with contextlib.suppress(InvalidUpdate):
        check_update(payload, agent, reference=REF, version=3, max_staleness=2, seen=dedup.Seen(),
                     max_payload=1 << 16)
    state, effects = core.receive(STATE, agent, payload, RULES)
    assert len(effects.replies) == 1
    reply = effects.replies[0]
    if reply.accepted:  # a fuzzer may stumble on a valid update: then it is applied like any other
        assert effects.records == (Entry("update", agent, payload),)
        assert state.version == 4 and state.counters.accepted == 1
        assert all(np.isfinite(np.asarray(v)).all() for v in state.params.values())
    else:
        assert reply.reason is not None and effects.records == ()
        assert (state.version, state.counters.accepted, dict(state.counters.rejected)) == (3, 0, {reply.reason: 1})
        assert state.params is STATE.params


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_decode_random_bytes(data: bytes) -> None:
    _decode_or_codec_error(data)
    _check_or_invalid(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
tensor_info = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F64", "I8", "U8", "BOOL", "F16", "BF16", "X", ""]) | json_values,
    "shape": st.lists(st.integers(-3, 2**40), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-3, 2**40), min_size=0, max_size=3) | json_values,
})
headers = st.dictionaries(
    st.sampled_from(["__metadata__", "l1/kernel", "l1/bias", "out/kernel", "x", ""]) | st.text(max_size=6),
    tensor_info | json_values | st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=6),
    max_size=5,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers, st.binary(max_size=256), st.integers(-64, 64))
def test_decode_structured_headers(header: dict[str, object], body: bytes, length_skew: int) -> None:
    payload = bytearray(raw_header(header, body))
    n = struct.unpack("<Q", payload[:8])[0] + length_skew
    payload[:8] = struct.pack("<Q", max(n, 0))
    _decode_or_codec_error(bytes(payload))
    _check_or_invalid(bytes(payload))


metadata = st.dictionaries(
    st.sampled_from(["fedmqtt.schema", "fedmqtt.kind", "fedmqtt.agent", "fedmqtt.update_id",
                     "fedmqtt.base_version", "fedmqtt.num_samples", "fedmqtt.encoding", "fedmqtt.fingerprint",
                     "other"]),
    st.sampled_from(["1", "update", "model", "good", "u1", "0", "3", "-1", "99999999999999999999", "delta",
                     "weights", FP, "", "\x00", "a/b", " 1"]) | st.text(max_size=20),
    max_size=9,
)
arrays = st.sampled_from([
    np.zeros((8, 4), np.float32), np.zeros(4, np.float32), np.zeros((4, 3), np.float32),
    np.zeros((8, 4), np.float64), np.zeros(0, np.float32), np.full(4, np.nan, np.float32),
    np.full((4, 3), np.inf, np.float32), np.zeros((2, 2, 2), np.int8), np.array(1.0, np.float32),
    np.ones(4, np.bool_),
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["l1/kernel", "l1/bias", "out/kernel", "extra", ""]), arrays,
                       max_size=4), metadata, st.integers(0, 400), st.integers(0, 255))
def test_valid_files_with_hostile_content(tensors: dict[str, np.ndarray], meta: dict[str, str], cut: int,
                                          flip: int) -> None:
    payload = safetensors.numpy.save(tensors, metadata=meta or None)
    _check_or_invalid(payload)
    _check_or_invalid(payload[: len(payload) - cut])  # truncated
    if payload:
        flipped = bytearray(payload)
        flipped[(flip * 7919) % len(flipped)] ^= 0xFF  # one corrupt byte
        _check_or_invalid(bytes(flipped))


def test_non_string_dtype_is_a_codec_error() -> None:
    with pytest.raises(CodecError):
        codec.decode(raw_header({"a": {"dtype": [1], "shape": [1], "data_offsets": [0, 4]}}, b"xxxx"))


ids = st.from_regex(ID_PATTERN, fullmatch=True)
valid_trees = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9_]{0,7}(/[a-z][a-z0-9_]{0,7}){0,2}", fullmatch=True),
    st.tuples(st.sampled_from([np.float32, np.float16]), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                                         max_side=5)),
    min_size=1, max_size=5,
).flatmap(lambda spec: st.fixed_dictionaries({
    name: hnp.arrays(dtype, shape, elements=st.floats(-4, 4, width=16)) for name, (dtype, shape) in spec.items()}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_trees, ids, ids, st.integers(0, 5), st.integers(1, 10**9), st.sampled_from(["delta", "weights"]))
def test_a_valid_update_decodes_passes_checks_and_is_accepted(tensors: dict[str, np.ndarray], agent: str,
                                                              update_id: str, base: int, samples: int,
                                                              encoding: str) -> None:
    """The positive property: whatever valid tree and metadata an honest agent encodes is decoded intact,
    passes every check, and is applied by the core (and its re-send answered as a duplicate)."""
    payload = codec.encode_update(tensors, agent=agent, update_id=update_id, base_version=base,
                                  num_samples=samples, encoding=encoding)  # type: ignore[arg-type]
    decoded = codec.decode(payload)
    assert decoded.tensors.keys() == tensors.keys()
    for name, arr in tensors.items():
        got = decoded.tensors[name]
        assert (got.dtype, got.shape) == (arr.dtype, arr.shape)
        np.testing.assert_array_equal(got, arr)
    initial = {k: np.zeros_like(v) for k, v in tensors.items()}  # the model the update was trained from
    checked = check_update(payload, agent, reference=Reference.of(initial), version=base, max_staleness=0,
                           seen=dedup.Seen())
    assert tuple(checked.info) == (agent, update_id, base, samples, encoding, codec.fingerprint(initial))
    assert checked.staleness == 0
    r = core.rules(fedasync(0.5), initial, Limits(max_update_norm=None))
    state = core.init(r, initial, epoch="t", version=base)
    state, effects = core.receive(state, agent, payload, r)
    assert effects.replies == (core.Reply(agent, update_id, True, base + 1),)
    assert effects.records == (Entry("update", agent, payload),)
    assert state.version == base + 1 and state.counters.rejected == {}
    for name, arr in tensors.items():
        got = np.asarray(state.params[name])
        assert (got.dtype, got.shape) == (arr.dtype, arr.shape)
        # FedAsync, s = 0, α = 0.5 from zeros: half the weights, or half the delta, either way
        np.testing.assert_allclose(got.astype(np.float32), 0.5 * arr.astype(np.float32), rtol=2e-3, atol=1e-3)
    _, again = core.receive(state, agent, payload, r)
    assert [(x.accepted, x.reason) for x in again.replies] == [(False, "duplicate")]


# ---- refusals that cost little, and retained copies --------------------------------------------------
def test_a_header_listing_thousands_of_tensors_is_refused_before_it_is_parsed() -> None:
    """About 1 MB of header for 15,500 tensors: refused on its length alone (the model's own header is far
    shorter), before any JSON is parsed or any tensor loaded; benchmarks/hostile_cost.py measures the cost."""
    tensors = {f"t{i:05d}": np.zeros(1, np.float32) for i in range(15_500)}
    payload = codec.encode_update(tensors, agent="h", update_id="u", base_version=0, num_samples=1,
                                  model_fingerprint=FP)
    ref = Reference.of(PARAMS)
    with pytest.raises(InvalidUpdate, match="header length") as err:
        check_update(payload, "h", reference=ref, version=0, max_staleness=1, seen=dedup.Seen())
    assert err.value.reason.value == "malformed" and len(payload) > 20 * ref.max_header


@pytest.mark.broker
async def test_retained_messages_on_update_topics_are_ignored_and_cleared(broker: BrokerConfig,
                                                                          federation: str) -> None:
    topics = Topics(federation=federation)
    connect = mqtt_connector(broker)
    async with connect(ConnectOptions(f"planter-{federation}"[:60])) as t:  # left behind on the update topic
        await t.publish(topics.update("good"), good(update_id="retained-1"), qos=1, retain=True)
    agg = Aggregator(connect, PARAMS, fedasync(), AggregatorConfig(topics=topics, client_id=f"agg-{federation}"))
    async with agg:
        await agg.wait_connected()
        await agg.wait_until(lambda: agg.retained_cleared == 1, 10, lambda: "the retained update was not cleared")
        assert agg.state.counters.accepted == 0 and not agg.state.counters.rejected  # never taken as an update
        assert agg.metrics().retained_cleared == 1
    inbox = Inbox()
    async with connect(ConnectOptions(f"probe-{federation}"[:60], on_message=inbox)) as probe:
        await probe.subscribe(topics.update("good"))  # a retained message would arrive right after SUBACK
        await asyncio.sleep(0.3)
    assert inbox.queue.empty(), "a retained message is still on the update topic"

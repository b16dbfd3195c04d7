"""Every validation rule, through the aggregator's synchronous core (no broker needed)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fedmqtt import codec
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.errors import Reason
from fedmqtt.strategies import fedasync
from fedmqtt.transport import MemoryBroker

PARAMS = {"l/kernel": np.ones((3, 2), np.float32), "l/bias": np.zeros(2, np.float32)}
FP = codec.fingerprint(PARAMS)


def make_agg(max_staleness: int = 4, max_norm: float | None = 100.0, max_payload: int = 1 << 20) -> Aggregator:
    cfg = AggregatorConfig(max_staleness=max_staleness, max_update_norm=max_norm, max_payload=max_payload)
    return Aggregator(MemoryBroker().connect, PARAMS, fedasync(), cfg)


def update(tensors: dict[str, np.ndarray] | None = None, **meta: object) -> bytes:
    args: dict[str, object] = {"agent": "a1", "update_id": "u1", "base_version": 0, "num_samples": 10,
                               "encoding": "delta", "model_fingerprint": FP}
    args.update(meta)
    t = tensors if tensors is not None else {k: np.full_like(v, 0.1) for k, v in PARAMS.items()}
    return codec.encode_update(t, **args)  # type: ignore[arg-type]


def rewrite_metadata(payload: bytes, **changes: str | None) -> bytes:
    """Change raw metadata strings (None deletes the key), bypassing the encoder's own typing."""
    d = codec.decode(payload)
    meta = {k: v for k, v in {**d.metadata, **changes}.items() if v is not None}
    import safetensors.numpy

    return safetensors.numpy.save(d.tensors, metadata=meta)  # type: ignore[arg-type]


def test_good_delta_is_applied_and_version_advances() -> None:
    agg = make_agg()
    ack = agg.handle("a1", update())
    assert (ack.status, ack.version, ack.update_id) == ("accepted", 1, "u1")
    # FedAsync, s = 0: x <- 0.4 x + 0.6 (x + delta) = x + 0.6 delta
    np.testing.assert_allclose(np.asarray(agg.params["l/kernel"]), 1.0 + 0.06, rtol=1e-6)
    assert agg.accepted == 1


def test_weights_encoding_is_mixed_directly() -> None:
    agg = make_agg()
    weights = {k: np.full_like(v, 2.0) for k, v in PARAMS.items()}
    assert agg.handle("a1", update(weights, encoding="weights")).status == "accepted"
    np.testing.assert_allclose(np.asarray(agg.params["l/bias"]), 0.6 * 2.0, rtol=1e-6)


def reject(agg: Aggregator, payload: bytes, reason: Reason, topic_agent: str = "a1") -> None:
    before = {k: np.asarray(v).copy() for k, v in agg.params.items()}
    ack = agg.handle(topic_agent, payload)
    assert ack.status == "rejected"
    assert ack.reason == reason.value, ack.detail
    assert agg.rejected[reason.value] >= 1
    assert agg.metrics().rejected_by_reason[reason.value] >= 1
    for k, v in agg.params.items():
        np.testing.assert_array_equal(np.asarray(v), before[k])


def test_oversized_payload() -> None:
    reject(make_agg(max_payload=100), update(), Reason.PAYLOAD_TOO_LARGE)


@pytest.mark.parametrize("payload", [b"", b"garbage" * 10, struct.pack("<Q", 1 << 62) + b"{}"])
def test_unparseable(payload: bytes) -> None:
    reject(make_agg(), payload, Reason.MALFORMED)


def test_schema_version() -> None:
    reject(make_agg(), rewrite_metadata(update(), **{"fedmqtt.schema": "2"}), Reason.SCHEMA)


def test_kind_model_sent_as_update() -> None:
    reject(make_agg(), codec.encode_model(PARAMS, 0), Reason.KIND)


@pytest.mark.parametrize(
    "change",
    [{"fedmqtt.num_samples": "-3"}, {"fedmqtt.num_samples": "0"}, {"fedmqtt.base_version": "1.5"},
     {"fedmqtt.encoding": "gzip"}, {"fedmqtt.update_id": None}, {"fedmqtt.update_id": "x" * 200},
     {"fedmqtt.fingerprint": "short"}],
)
def test_bad_metadata(change: dict[str, str | None]) -> None:
    reject(make_agg(), rewrite_metadata(update(), **change), Reason.BAD_METADATA)


def test_spoofed_agent_id() -> None:
    reject(make_agg(), update(agent="a2"), Reason.AGENT_MISMATCH, topic_agent="a1")


def test_replayed_update_id() -> None:
    agg = make_agg()
    assert agg.handle("a1", update()).status == "accepted"
    reject(agg, update(), Reason.DUPLICATE)
    # the same id from another agent is a different update
    assert agg.handle("a2", update(agent="a2")).status == "accepted"


def test_base_version_from_the_future() -> None:
    reject(make_agg(), update(base_version=5), Reason.FUTURE_BASE)


def test_too_stale() -> None:
    agg = make_agg(max_staleness=2)
    for i in range(3):
        assert agg.handle("a1", update(update_id=f"g{i}", base_version=agg.version)).status == "accepted"
    reject(agg, update(update_id="old", base_version=0), Reason.STALE)  # staleness 3 > 2
    assert agg.handle("a1", update(update_id="ok", base_version=1)).status == "accepted"  # staleness 2


def test_fingerprint_mismatch() -> None:
    reject(make_agg(), update(model_fingerprint="0" * 64), Reason.FINGERPRINT)


def test_missing_and_extra_tensors() -> None:
    agg = make_agg()
    missing = {"l/kernel": np.zeros((3, 2), np.float32)}
    reject(agg, update(missing), Reason.TENSOR_NAMES)
    extra = {**{k: np.zeros_like(v) for k, v in PARAMS.items()}, "evil": np.zeros(1, np.float32)}
    reject(agg, update(extra, update_id="u2"), Reason.TENSOR_NAMES)


def test_wrong_shape() -> None:
    t = {"l/kernel": np.zeros((2, 3), np.float32), "l/bias": np.zeros(2, np.float32)}
    reject(make_agg(), update(t), Reason.SHAPE)


def test_wrong_dtype() -> None:
    t = {"l/kernel": np.zeros((3, 2), np.float64), "l/bias": np.zeros(2, np.float32)}
    reject(make_agg(), update(t), Reason.DTYPE)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(bad: float) -> None:
    t = {k: np.zeros_like(v) for k, v in PARAMS.items()}
    t["l/kernel"][1, 1] = bad
    reject(make_agg(), update(t), Reason.NON_FINITE)


def test_non_finite_weights_encoding() -> None:
    t = {k: np.ones_like(v) for k, v in PARAMS.items()}
    t["l/bias"][0] = np.nan
    reject(make_agg(), update(t, encoding="weights"), Reason.NON_FINITE)


def test_enormous_norm() -> None:
    t = {k: np.full_like(v, 1e30) for k, v in PARAMS.items()}
    reject(make_agg(max_norm=100.0), update(t), Reason.NORM)
    t = {k: np.full_like(v, 50.0) for k, v in PARAMS.items()}  # finite but ‖Δ‖ ≈ 141 > 100
    reject(make_agg(max_norm=100.0), update(t), Reason.NORM)


def test_good_update_still_applied_after_rejections_and_model_finite() -> None:
    agg = make_agg()
    for payload in (b"junk", update(agent="zz"), update(base_version=99)):
        agg.handle("a1", payload)
    assert agg.handle("a1", update()).status == "accepted"
    assert all(np.isfinite(np.asarray(v)).all() for v in agg.params.values())
    m = agg.metrics()
    assert (m.accepted, m.rejected, m.version) == (1, 3, 1)
    assert m.rejected_by_reason == {"malformed": 1, "agent_mismatch": 1, "future_base": 1}


def test_ack_names_the_update_when_only_its_metadata_is_bad() -> None:
    ack = make_agg().handle("a1", rewrite_metadata(update(update_id="named-1"), **{"fedmqtt.schema": "9"}))
    assert (ack.status, ack.reason, ack.update_id) == ("rejected", "schema", "named-1")


def test_invalid_agent_id_in_the_topic_is_counted_not_fatal() -> None:
    from fedmqtt.transport import Message

    agg = make_agg()
    agg._on_message(Message("fedmqtt/default/updates/$evil", update(agent="$evil")))
    agg._on_message(Message("fedmqtt/default/updates/" + "x" * 200, update()))
    assert agg.rejected["bad_topic"] == 2
    assert agg.handle("a1", update()).status == "accepted"  # still serving

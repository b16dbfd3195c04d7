"""codec.py: round trips, the committed test vectors, the fingerprint rule and parse errors."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from fedmqtt import codec
from fedmqtt.errors import CodecError, Reason

VECTORS = Path(__file__).parent / "vectors"


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a/kernel": rng.normal(size=(4, 3)).astype(np.float32), "a/bias": np.zeros(3, np.float32),
            "b/0/w": rng.normal(size=(2,)).astype(np.float64)}


def test_model_round_trip_keeps_values_and_metadata() -> None:
    p = _params()
    d = codec.decode(codec.encode_model(p, version=12, mode="sync"))
    assert d.metadata["fedmqtt.version"] == "12"
    assert d.metadata["fedmqtt.mode"] == "sync"
    assert d.metadata["fedmqtt.fingerprint"] == codec.fingerprint(p)
    for k, v in p.items():
        np.testing.assert_array_equal(d.tensors[k], v)
        assert d.tensors[k].dtype == v.dtype


def test_update_round_trip() -> None:
    p = _params()
    payload = codec.encode_update(p, agent="dev-1", update_id="u1", base_version=3, num_samples=50,
                                  encoding="weights", extra={"x.custom": "kept"})
    d = codec.decode(payload)
    assert d.metadata["fedmqtt.agent"] == "dev-1"
    assert d.metadata["fedmqtt.base_version"] == "3"
    assert d.metadata["fedmqtt.encoding"] == "weights"
    assert d.metadata["x.custom"] == "kept"
    np.testing.assert_array_equal(d.tensors["a/kernel"], p["a/kernel"])


def test_fingerprint_depends_on_names_shapes_dtypes_not_values() -> None:
    p = _params()
    q = {k: v + 1 for k, v in p.items()}
    assert codec.fingerprint(p) == codec.fingerprint(q)
    assert codec.fingerprint(p) != codec.fingerprint({**p, "a/bias": np.zeros(4, np.float32)})
    assert codec.fingerprint(p) != codec.fingerprint({**p, "a/bias": np.zeros(3, np.float64)})
    assert codec.fingerprint(p) != codec.fingerprint({**p, "c": np.zeros(1, np.float32)})


def test_vectors_decode_to_documented_values() -> None:
    expected = json.loads((VECTORS / "expected.json").read_text())
    for kind, file in (("model", "model_v7.safetensors"), ("update", "update_edge-1.safetensors")):
        d = codec.decode((VECTORS / file).read_bytes())
        assert d.metadata == expected[kind]["metadata"]
        for name, t in expected[kind]["tensors"].items():
            assert list(d.tensors[name].shape) == t["shape"]
            assert codec.dtype_code(d.tensors[name].dtype) == t["dtype"]
            assert d.tensors[name].ravel().tolist() == t["values"]


def test_vector_fingerprint_follows_the_documented_rule() -> None:
    expected = json.loads((VECTORS / "expected.json").read_text())
    digest = hashlib.sha256(expected["fingerprint_lines"].encode()).hexdigest()
    assert expected["model"]["metadata"]["fedmqtt.fingerprint"] == digest
    model = codec.decode((VECTORS / "model_v7.safetensors").read_bytes())
    assert codec.fingerprint(model.tensors) == digest


def _with_header(header: object, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", Reason.MALFORMED),
        (b"\x01\x02", Reason.MALFORMED),
        (struct.pack("<Q", 1 << 40) + b"{}", Reason.MALFORMED),  # huge header length
        (struct.pack("<Q", 100) + b"{}", Reason.MALFORMED),  # header runs past the payload
        (struct.pack("<Q", 4) + b"\xff\xfe{}", Reason.MALFORMED),  # not UTF-8 JSON
        (_with_header([1, 2]), Reason.MALFORMED),
        (_with_header({"__metadata__": {"k": 1}}), Reason.MALFORMED),
        (_with_header({"t": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0"), Reason.DTYPE),
        (_with_header({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0\0\0\0"),
         Reason.MALFORMED),  # data shorter than the offsets say
    ],
)
def test_malformed_payloads_raise_codec_error_with_reason(payload: bytes, reason: Reason) -> None:
    with pytest.raises(CodecError) as info:
        codec.decode(payload)
    assert info.value.reason == reason


def test_payload_over_the_limit_is_refused_before_parsing() -> None:
    payload = codec.encode_model(_params(), version=1)
    with pytest.raises(CodecError) as info:
        codec.decode(payload, max_payload=len(payload) - 1)
    assert info.value.reason == Reason.PAYLOAD_TOO_LARGE

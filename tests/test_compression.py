"""compression.py: each form's round trip and error bound, error feedback, and the aggregator's strict decoder."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt import codec, core, dedup
from fedmqtt.compression import BLOCK, Compression, ErrorFeedback, check_header, compress, compress_model, expand
from fedmqtt.core import Limits
from fedmqtt.errors import ConfigError, InvalidUpdate
from fedmqtt.strategies import fedbuff
from fedmqtt.validation import Reference, check_update

PARAMS = {"l1/kernel": np.zeros((64, 20), np.float32), "l1/bias": np.zeros(20, np.float32),
          "out/kernel": np.zeros((20, 3), np.float32)}  # 1,360 entries: three int8 blocks
FP = codec.fingerprint(PARAMS)
SIZE = sum(v.size for v in PARAMS.values())  # entries of the model flattened in name order
BLOCKS = -(-SIZE // BLOCK)
REF = Reference.of(PARAMS)
VECTORS = Path(__file__).parent / "vectors"


def random_delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in PARAMS.items()}


def payload(tensors: dict[str, np.ndarray], method: str | None, agent: str = "a", **meta: str) -> bytes:
    extra = {"fedmqtt.compression": method} if method else {}
    return codec.encode_update(tensors, agent=agent, update_id=uuid.uuid4().hex, base_version=0, num_samples=5,
                               model_fingerprint=FP, extra={**extra, **meta})


def check(p: bytes) -> dict[str, np.ndarray]:
    return check_update(p, "a", reference=REF, version=0, max_staleness=4, seen=dedup.Seen()).tensors


@pytest.mark.parametrize("setting", ["float16", "int8", "topk:0.1", "topk:100%"])
def test_the_aggregator_rebuilds_exactly_what_the_agent_says_it_sent(setting: str) -> None:
    delta = random_delta()
    sent = compress(delta, Compression.parse(setting), np.random.default_rng(1))
    got = check(payload(sent.tensors, sent.metadata["fedmqtt.compression"]))
    for k in PARAMS:
        assert got[k].dtype == np.float32 and got[k].shape == PARAMS[k].shape
        np.testing.assert_array_equal(got[k], sent.dense[k])
    wire = len(payload(sent.tensors, sent.metadata["fedmqtt.compression"]))
    assert wire < len(payload(delta, None)) or setting == "topk:100%"


def test_each_form_stays_within_its_error_bound() -> None:
    delta = random_delta()
    f16 = compress(delta, Compression("float16"), np.random.default_rng(0)).dense
    i8 = compress(delta, Compression("int8"), np.random.default_rng(0)).dense
    top = compress(delta, Compression("topk", 0.25), np.random.default_rng(0)).dense
    for k, x in delta.items():
        assert np.abs(f16[k] - x).max() <= np.abs(x).max() * 2**-10
    flat, flat_i8 = (np.concatenate([d[k].ravel() for k in sorted(d)]) for d in (delta, i8))
    step = np.repeat(np.abs(np.pad(flat, (0, -flat.size % BLOCK))).reshape(-1, BLOCK).max(axis=1) / 127, BLOCK)[:SIZE]
    assert (np.abs(flat_i8 - flat) <= step * (1 + 1e-5)).all()  # stochastic rounding: within one step of its block
    flat = np.concatenate([delta[k].ravel() for k in sorted(delta)])
    kept = np.concatenate([top[k].ravel() for k in sorted(top)]) != 0
    assert kept.sum() == np.ceil(0.25 * flat.size)  # a quarter of the model, wherever the largest are
    assert np.abs(flat[kept]).min() >= np.abs(flat[~kept]).max()


def test_int8_stochastic_rounding_is_unbiased() -> None:
    x = {"w": np.full((8, 64), 0.3, np.float32), "b": np.linspace(-1, 1, 512, dtype=np.float32)}
    x["w"][0, 0] = 1.0  # both blocks' scale is 1/127: 0.3 lies between two steps
    rng = np.random.default_rng(0)
    mean = {k: np.mean([compress(x, Compression("int8"), rng).dense[k] for _ in range(2000)], axis=0) for k in x}
    for k in x:
        np.testing.assert_allclose(mean[k], x[k], atol=2e-3)
    assert np.unique(compress(x, Compression("int8"), rng).dense["w"].ravel()[1:]).size == 2  # two steps, not one


def test_error_feedback_delivers_everything_eventually() -> None:
    """With error feedback the sum of what was sent plus the residual equals the sum of the deltas, and
    entries too small for any single top-k update still get through."""
    ef = ErrorFeedback()
    rng = np.random.default_rng(0)
    deltas = [random_delta(i) for i in range(30)]
    total_sent = {k: np.zeros_like(v) for k, v in PARAMS.items()}
    for d in deltas:
        sent = ef(d, Compression("topk", 0.05), rng)
        for k in total_sent:
            total_sent[k] += sent.dense[k]
    for k in PARAMS:
        np.testing.assert_allclose(total_sent[k] + ef.residual[k], sum(d[k] for d in deltas), atol=1e-4)
    reached = sum(int((total_sent[k] != 0).sum()) for k in PARAMS)
    assert reached > 0.5 * sum(v.size for v in PARAMS.values())  # without feedback: at most 30 × 5 %, same entries


def test_the_cli_forms_parse_and_bad_ones_say_what_is_allowed() -> None:
    assert Compression.parse("topk:1%") == Compression("topk", 0.01)
    assert str(Compression.parse("topk:0.05")) == "topk:0.05"
    for bad in ("topk:0", "topk:2", "topk:x", "gzip", "float16:3", "int8-tensor"):
        with pytest.raises(ConfigError, match=r"topk|unknown compression"):
            Compression.parse(bad)


# ---- the strict decoder -----------------------------------------------------------------------------


def topk_tensors(k: int = 4, **over: np.ndarray) -> dict[str, np.ndarray]:
    return {"#idx": np.arange(k, dtype=np.int32), "#val": np.full(k, 0.01, np.float32), **over}


def int8_tensors(**over: np.ndarray) -> dict[str, np.ndarray]:
    return {"#q": np.ones(SIZE, np.int8), "#scale": np.full(BLOCKS, 0.01, np.float32), **over}


MALFORMED = {
    "unknown method": (lambda: payload(int8_tensors(), "int4"), "compression"),
    "weights encoding": (lambda: payload(int8_tensors(), "int8", **{"fedmqtt.encoding": "weights"}), "compression"),
    "index out of range": (lambda: payload(topk_tensors(**{"#idx": np.array([0, 1, 2, SIZE], np.int32)}),
                                           "topk"), "compression"),
    "negative index": (lambda: payload(topk_tensors(**{"#idx": np.array([-1, 1, 2, 3], np.int32)}),
                                       "topk"), "compression"),
    "repeated index": (lambda: payload(topk_tensors(**{"#idx": np.array([0, 1, 1, 3], np.int32)}),
                                       "topk"), "compression"),
    "unsorted index": (lambda: payload(topk_tensors(**{"#idx": np.array([3, 1, 2, 0], np.int32)}),
                                       "topk"), "compression"),
    "k above size": (lambda: payload(topk_tensors(SIZE + 1), "topk"), "shape"),
    "k differs": (lambda: payload(topk_tensors(**{"#val": np.zeros(3, np.float32)}), "topk"), "shape"),
    "2-d indices": (lambda: payload(topk_tensors(**{"#idx": np.arange(4, dtype=np.int32).reshape(2, 2)}),
                                    "topk"), "shape"),
    "float indices": (lambda: payload(topk_tensors(**{"#idx": np.arange(4, dtype=np.float32)}), "topk"),
                      "dtype"),
    "int64 indices": (lambda: payload(topk_tensors(**{"#idx": np.arange(4, dtype=np.int64)}), "topk"),
                      "dtype"),
    "missing values": (lambda: payload({"#idx": np.arange(4, dtype=np.int32)}, "topk"), "tensor_names"),
    "dense tensor in top-k": (lambda: payload({**topk_tensors(), "l1/bias": np.zeros(8, np.float32)}, "topk"),
                              "tensor_names"),
    "per-tensor top-k": (lambda: payload({f"{k}#{p}": np.zeros(1, np.int32 if p == "idx" else np.float32)
                                          for k in PARAMS for p in ("idx", "val")}, "topk"), "tensor_names"),
    "NaN value": (lambda: payload(topk_tensors(**{"#val": np.array([0, np.nan, 0, 0], np.float32)}),
                                  "topk"), "non_finite"),
    "missing scale": (lambda: payload({"#q": np.ones(SIZE, np.int8)}, "int8"), "tensor_names"),
    "a scale too many": (lambda: payload(int8_tensors(**{"#scale": np.ones(BLOCKS + 1, np.float32)}), "int8"),
                         "shape"),
    "scalar scale": (lambda: payload(int8_tensors(**{"#scale": np.float32(1).reshape(())}), "int8"), "shape"),
    "quanta short": (lambda: payload(int8_tensors(**{"#q": np.ones(SIZE - 1, np.int8)}), "int8"), "shape"),
    "NaN scale": (lambda: payload(int8_tensors(**{"#scale": np.array([0.1, np.nan, 0.1], np.float32)}), "int8"),
                  "compression"),
    "negative scale": (lambda: payload(int8_tensors(**{"#scale": np.array([0.1, 0.1, -1], np.float32)}), "int8"),
                       "compression"),
    "int16 quanta": (lambda: payload(int8_tensors(**{"#q": np.ones(SIZE, np.int16)}), "int8"), "dtype"),
    "per-tensor int8": (lambda: payload({k: np.ones(v.shape, np.int8) for k, v in PARAMS.items()}, "int8"),
                        "tensor_names"),
    "float16 Inf": (lambda: payload({k: np.full(v.shape, np.inf, np.float16) for k, v in PARAMS.items()},
                                    "float16"), "non_finite"),
    "float32 under float16": (lambda: payload(dict(PARAMS), "float16"), "dtype"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_malformed_compressed_form_is_refused_with_its_reason_and_changes_nothing(case: str) -> None:
    make, reason = MALFORMED[case]
    rules = core.rules(fedbuff(1), PARAMS, Limits(max_staleness=4, max_update_norm=100.0))
    state = core.init(rules, PARAMS, epoch="t")
    after, effects = core.receive(state, "a", make(), rules)
    (reply,) = effects.replies
    assert (reply.accepted, reply.reason) == (False, reason), reply.detail
    assert after.params is state.params and after.version == 0 and effects.records == ()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, SIZE + 2), min_size=0, max_size=12), st.booleans())
def test_any_index_list_is_either_expanded_exactly_or_refused(idx: list[int], nan: bool) -> None:
    values = np.linspace(0.1, 0.8, len(idx), dtype=np.float32)
    if nan and idx:
        values[0] = np.nan
    tensors = {"#idx": np.array(idx, np.int32), "#val": values}
    well_formed = idx == sorted(set(idx)) and all(0 <= i < SIZE for i in idx)
    if not well_formed:
        with pytest.raises(InvalidUpdate, match="compression"):
            check(payload(tensors, "topk"))
        return
    dense = check(payload(tensors, "topk"))  # NaN values pass here: the core's finite check refuses them
    expect = np.zeros(SIZE, np.float32)
    expect[idx] = values
    flat = np.concatenate([dense[k].ravel() for k in sorted(dense)])  # name order: l1/bias, l1/kernel, out/...
    np.testing.assert_array_equal(flat, expect)  # NaN equals NaN here


def test_the_vectors_decode_to_the_dense_deltas_they_document() -> None:
    expected = json.loads((VECTORS / "expected.json").read_text())
    params = {k: np.asarray(v["values"], np.float32).reshape(v["shape"])
              for k, v in expected["model"]["tensors"].items()}
    ref = Reference.of(params)
    for label, want in expected["compressed_updates"].items():
        raw = (VECTORS / f"update_edge-1_{label}.safetensors").read_bytes()
        got = check_update(raw, "edge-1", reference=ref, version=7, max_staleness=4, seen=dedup.Seen()).tensors
        assert codec.decode(raw).metadata == want["metadata"]
        for k, v in want["dense"].items():
            np.testing.assert_array_equal(got[k].ravel(), np.asarray(v["values"], np.float32))


@pytest.mark.parametrize("form", ["float16", "int8"])
def test_a_compressed_model_expands_to_within_half_a_step_of_the_model(form: str) -> None:
    params = random_delta(3)
    packed = compress_model(params, form)
    raw = codec.encode_model(packed.tensors, 5, model_fingerprint=FP, extra=packed.metadata)
    header, _ = codec.read_header(raw)
    check_header(form, header, REF.spec)
    got = expand(form, codec.decode(raw).tensors, REF.spec)
    data = len(raw) - 8 - codec.read_header(raw)[1]  # tensor bytes: 2 per weight, or 1 plus 4 per block
    assert data == (SIZE * 2 if form == "float16" else SIZE + 4 * -(-SIZE // BLOCK))
    flat, flat_got = (np.concatenate([d[k].ravel() for k in sorted(d)]) for d in (params, got))
    if form == "float16":
        bound = np.maximum(np.abs(flat) * 2**-11, 2**-25)  # 2**-25: subnormals
    else:
        bound = np.repeat(np.abs(np.pad(flat, (0, -SIZE % BLOCK))).reshape(-1, BLOCK).max(axis=1) / 254, BLOCK)[:SIZE]
    assert (np.abs(flat_got - flat) <= bound * (1 + 1e-5)).all()

"""Hostile input on the agents' side, decoder by decoder (no broker): models on the model topics (plain,
compressed, signed), model files, assignments, the aggregator's secure-aggregation messages, acks, and the
statuses a coordinator reads. Each payload must fail with the error class (and reason) it was made to fail
with; any other exception, or none, fails the test."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import hostile_messages as hm
import hostile_updates as hu
from fedmqtt import codec, global_model, model_file, ownership, signing
from fedmqtt.allocation_schemas import parse_assignment
from fedmqtt.assignment import AssignmentFollower, Defaults
from fedmqtt.coordinator import Book
from fedmqtt.errors import CodecError, ConfigError, IncompatibleModel, InvalidMessage, InvalidUpdate, SecAggAbort
from fedmqtt.schemas import Ack, Status
from fedmqtt.secagg import Client
from fedmqtt.secagg import messages as m

PARAMS, FP = hu.PARAMS, hu.FP
SPEC = {k: (v.shape, v.dtype) for k, v in PARAMS.items()}
Expect = tuple[type[Exception], str | None]  # the error class, and its reason (CodecError, InvalidUpdate)


def failures(cases: Iterable[tuple[str, bytes, Expect]], run: Callable[[bytes], object]) -> list[str]:
    """What did not fail as it should: ``run`` raised another class or reason, or nothing."""
    out = []
    for label, payload, (cls, reason) in cases:
        try:
            run(payload)
        except cls as exc:
            got = getattr(exc, "reason", None)
            if reason is not None and got != reason:
                out.append(f"{label}: {cls.__name__} {got}, not {reason}")
            continue
        except Exception as exc:  # anything else escaping is the failure this test exists for
            out.append(f"{label}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        out.append(f"{label}: accepted")
    return out


def model(form: str | None = None, **meta: str | None) -> bytes:
    """A model at version 7 (as the agent's own tree), ``meta`` changed as :func:`hostile_updates.with_meta` does."""
    params = {k: np.full(v.shape, 0.5, v.dtype) for k, v in PARAMS.items()}
    payload = global_model.encode(params, 7, mode="async", fingerprint=FP, epoch="e1", form=form)
    return hu.with_meta(payload, **meta) if meta else payload


def model_cases() -> list[tuple[str, bytes, Expect]]:
    cases: list[tuple[str, bytes, Expect]] = []
    nan = {k: np.full(v.shape, np.nan, v.dtype) for k, v in PARAMS.items()}
    for form in (None, "float16", "int8"):
        good = model(form)
        (n,) = struct.unpack("<Q", good[:8])
        names = sorted(set(json.loads(good[8 : 8 + n])) - {"__metadata__"})
        rng = np.random.default_rng(len(cases))
        cases += [(f"{form} random {i}", rng.bytes(i * 7), (CodecError, "malformed")) for i in range(60)]
        cases += [(f"{form} cut {c}", good[:c], (CodecError, "malformed")) for c in range(0, len(good), 3)]
        cases += [(f"{form} deep", struct.pack("<Q", 6000) + b"[" * 6000, (CodecError, "malformed")),
                  (f"{form} meta", hu.reheader(good, lambda h: h["__metadata__"].update(x=1)),  # type: ignore[attr-defined]
                   (CodecError, "malformed")),
                  (f"{form} gap", hu.tensor_entry(good, names[-1], data_offsets=[0, 1]),
                   (CodecError, "malformed"))]
        cases += [(f"{form} dtype {d}", hu.tensor_entry(good, names[0], dtype=d),
                   (CodecError, "dtype")) for d in ("BF16", "F8_E5M2", "X", 3)]
        for key, values, reason in (("schema", ["2", "", None], "schema"), ("kind", ["update", None], "kind"),
                                    ("version", ["x", "-1", "01", None], "bad_metadata"),
                                    ("fingerprint", ["XYZ", FP.upper(), None], "bad_metadata"),
                                    ("mode", ["turbo", ""], "bad_metadata"), ("epoch", ["a-b", "e" * 65], "bad_metadata")):
            cases += [(f"{form} {key}={v!r}", model(form, **{key: v}), (InvalidUpdate, reason)) for v in values]
        cases += [(f"{form} fingerprint", model(form, fingerprint="0" * 64), (IncompatibleModel, None)),
                  (f"{form} unknown form", hu.with_meta(good, compression="topk"), (IncompatibleModel, None))]
    float32 = {k: v.astype(np.float32) for k, v in PARAMS.items()}
    cases += [("nan", codec.encode_model(nan, 7, model_fingerprint=FP), (IncompatibleModel, None)),
              ("other tree", codec.encode_model(float32, 7, model_fingerprint=FP), (IncompatibleModel, None)),
              ("missing", codec.encode_model({"l1/bias": PARAMS["l1/bias"]}, 7, model_fingerprint=FP),
               (IncompatibleModel, None)),
              ("f16 nan", global_model.encode(nan, 7, mode="async", fingerprint=FP, epoch="e", form="float16"),
               (IncompatibleModel, None))]
    int8 = global_model.encode(PARAMS, 7, mode="async", fingerprint=FP, epoch="e", form="int8")
    tensors = codec.decode(int8).tensors
    for label, change, reason in (("scale nan", {"#scale": np.full(1, np.nan, np.float32)}, "compression"),
                                  ("scale <0", {"#scale": np.full(1, -1.0, np.float32)}, "compression"),
                                  ("q shape", {"#q": np.zeros(hu.N + 1, np.int8)}, "shape"),
                                  ("q dtype", {"#q": np.zeros(hu.N, np.int16)}, "dtype"),
                                  ("names", {"#idx": np.zeros(1, np.int32)}, "tensor_names")):
        payload = codec.encode_model({**tensors, **change}, 7, model_fingerprint=FP, extra={"fedmqtt.compression": "int8"})
        cases.append((f"int8 {label}", payload, (InvalidUpdate, reason)))
    big = {"#q": np.full(hu.N, 127, np.int8), "#scale": np.full(1, 3e38, np.float32)}  # overflows to Inf
    cases.append(("int8 inf", codec.encode_model(big, 7, model_fingerprint=FP, extra={"fedmqtt.compression": "int8"}),
                  (IncompatibleModel, None)))
    return cases


def test_hostile_models_fail_with_their_own_errors() -> None:
    cases = model_cases()
    assert len(cases) > 500
    assert failures(cases, lambda p: global_model.accept(p, FP, SPEC)) == []
    infos = [ownership.model_info(payload, 1 << 16) for _, payload, _ in cases]  # the aggregator's look: no raise
    assert sum(info is None for info in infos) > len(cases) / 2
    assert [global_model.accept(model(f), FP, SPEC)[0].version for f in (None, "float16", "int8")] == [7, 7, 7]


def test_hostile_signed_models_are_refused() -> None:
    pem, public = signing.new_key()
    signer, other = signing.Signer.from_pem(pem), signing.Signer.from_pem(signing.new_key()[0])
    cases: list[tuple[str, bytes, Expect]] = []
    for form in (None, "float16", "int8"):
        signed = signer.sign(model(form))
        data_at = len(signed) - 1
        cases += [(f"{form} unsigned", model(form), (IncompatibleModel, None)),
                  (f"{form} other key", other.sign(model(form)), (IncompatibleModel, None)),
                  (f"{form} version", hu.with_meta(signed, version="8"), (IncompatibleModel, None)),
                  (f"{form} epoch", hu.with_meta(signed, epoch="e2"), (IncompatibleModel, None)),
                  (f"{form} signature", hu.with_meta(signed, signature="!!"), (IncompatibleModel, None)),
                  (f"{form} data", signed[:data_at] + bytes([signed[data_at] ^ 1]), (IncompatibleModel, None))]
        cases += [(f"{form} garbage {i}", np.random.default_rng(i).bytes(i * 5), (IncompatibleModel, None))
                  for i in range(30)]
        assert global_model.accept(signed, FP, SPEC, model_key=public)[0].version == 7
    assert failures(cases, lambda p: global_model.accept(p, FP, SPEC, model_key=public)) == []


def test_hostile_model_files_are_config_errors(tmp_path: Path) -> None:
    good = model()
    cases: list[tuple[str, bytes, Expect]] = [(f"cut {c}", good[:c], (ConfigError, None)) for c in range(0, len(good), 5)]
    cases += [(f"random {i}", np.random.default_rng(i).bytes(i * 11), (ConfigError, None)) for i in range(50)]
    for dtype in ("BF16", "F8_E4M3", "F8_E5M2"):  # safetensors reads them; numpy has no such dtype
        raw = json.dumps({"l1/bias": {"dtype": dtype, "shape": [4], "data_offsets": [0, 8]}}).encode()
        cases.append((dtype, struct.pack("<Q", len(raw)) + raw + bytes(8), (ConfigError, None)))
    for label, tensors in (("missing", {"l1/bias": PARAMS["l1/bias"]}), ("shape", {**PARAMS, "l1/bias": np.zeros(5)}),
                           ("dtype", {**PARAMS, "out/kernel": np.zeros((4, 3), np.float32)})):
        cases.append((label, codec.encode_model(tensors, 1), (ConfigError, None)))
    path = tmp_path / "model.safetensors"

    def load(payload: bytes) -> object:
        path.write_bytes(payload)
        return model_file.load(path, PARAMS)

    assert failures(cases, load) == []
    assert load(good).keys() == PARAMS.keys()


ASSIGNMENT = {"schema": 1, "agent": "edge-1", "federation": "hapt", "task": "hapt", "local_steps": 10,
              "batch_size": None, "participation": 0.5, "compression": "int8", "sequence": 5, "issued_at": 1.0,
              "policy": "p"}
BAD_ASSIGNMENT: dict[str, list[object]] = {
    "schema": [2, "1", None], "agent": ["edge 1", "", 5], "federation": ["coordinator", "a/b", "", "$x", "a+b"],
    "task": ["a b", "", "t" * 65], "local_steps": [0, 100_001, "5", 1.5, True], "batch_size": [0, (1 << 20) + 1],
    "participation": [0, 1.5, -0.1, "1"], "compression": ["zip", "topk:2", "topk:0", "topk:x", "c" * 33, 3],
    "sequence": [-1, 2**53, 1.5, None], "issued_at": [-1, 1e12, "now"], "policy": ["a b", "p" * 129],
}


def test_hostile_assignments_are_refused_naming_the_field() -> None:
    cases = [(f"{k}={v!r}", json.dumps({**ASSIGNMENT, k: v}).encode(), k) for k, vs in BAD_ASSIGNMENT.items() for v in vs]
    cases += [(f"no {k}", json.dumps({x: v for x, v in ASSIGNMENT.items() if x != k}).encode(), k)
              for k in ("agent", "federation", "task", "sequence", "issued_at")]
    cases += [("for another agent", json.dumps({**ASSIGNMENT, "agent": "edge-2"}).encode(), "edge-2"),
              ("not JSON", b"{", "JSON"), ("NaN", json.dumps({**ASSIGNMENT, "participation": float("nan")}).encode(),
                                           "participation"),
              ("too long", json.dumps({**ASSIGNMENT, "policy": "p", "pad": "x" * (16 << 10)}).encode(), "bytes")]
    follower = AssignmentFollower("edge-1", Defaults("default", "hapt"), tasks=("hapt",))
    wrong = []
    for label, payload, field in cases:
        with pytest.raises(InvalidMessage) as err:
            parse_assignment(payload, "edge-1")
        if field not in str(err.value):
            wrong.append(f"{label}: {err.value}")
        assert follower.offer(payload) is False
    assert wrong == []
    assert (follower.refused, follower.settings.assigned) == (len(cases), False)
    assert follower.offer(json.dumps(ASSIGNMENT).encode()) and follower.settings.local_steps == 10


COHORT = {"type": "cohort", "step": "s1", "update_id": "u1", "version": 4, "members": ["a", "b", "c"],
          "threshold": 2, "degree": None, "clip": 1.0, "bits": 16, "dim": hu.N, "weight": 1.0, "norm": None}
BAD_COHORT: list[dict[str, object]] = [
    {"members": ["b", "a", "c"]}, {"members": ["a", "a", "c"]}, {"members": ["x", "y", "z"]}, {"members": []},
    {"threshold": 4}, {"threshold": 1}, {"threshold": 0}, {"degree": 3}, {"degree": 1}, {"clip": 0},
    {"clip": -1.0}, {"bits": 1}, {"bits": 25}, {"norm": 0}, {"weight": 0}, {"weight": 1.5}, {"dim": 0},
    {"dim": hu.N + 1}, {"step": "bad step"}, {"update_id": "a/b"}, {"version": -1},
    {"members": sorted(["a", *(f"m{i:03d}" for i in range(299))]), "threshold": 300, "bits": 24},  # wraps 2^32
]


def to_member(payload: bytes) -> object:
    """What a member does with a message from the aggregator before it answers (secure_member.py)."""
    msg = m.parse_to_agent(payload)
    if isinstance(msg, m.CohortMsg):
        return Client("a", msg.cohort("a"), np.zeros(hu.N, np.float32))
    if isinstance(msg, m.Roster):
        return [m.unb64(k, 32) for pair in msg.keys.values() for k in pair]
    return msg


def test_hostile_secure_aggregation_messages_to_a_member_are_protocol_errors() -> None:
    cases = [(f"cohort {bad}"[:60], json.dumps({**COHORT, **bad}).encode(), (SecAggAbort, "bad_message"))
             for bad in BAD_COHORT]
    cases += [(f"{label}", payload, (SecAggAbort, "bad_message")) for label, payload in (
        ("not JSON", b"{"), ("array", b"[]"), ("type", b'{"type": "hello", "step": "s1"}'),
        ("deep", b'{"type": "unmask", "step": "s1", "survivors": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
        ("roster key", json.dumps({"type": "roster", "step": "s1", "keys": {"a": ["!!", "!!"]}}).encode()),
        ("roster size", json.dumps({"type": "roster", "step": "s1", "keys": {"a": ["AAAA", "AAAA"]}}).encode()),
        ("survivor", json.dumps({"type": "unmask", "step": "s1", "survivors": ["a b"]}).encode()),
        ("end", json.dumps({"type": "finish", "step": "s1"}).encode()),
        ("big", json.dumps({"type": "unmask", "step": "s1", "pad": "x" * (1 << 20)}).encode()))]
    assert len(cases) > 25
    assert failures(cases, to_member) == []
    assert isinstance(to_member(json.dumps(COHORT).encode()), Client)


def test_a_masked_input_nested_beyond_the_parser_is_a_protocol_error() -> None:
    deep = b"[" * 6000  # once a RecursionError out of the service's message handler
    with pytest.raises(SecAggAbort, match="not a masked input"):
        m.decode_masked(len(deep).to_bytes(8, "little") + deep, hu.N)


def test_hostile_acks_and_statuses_are_refused() -> None:
    acks = [b"{", b"[]", b'{"update_id": "u"}', b'{"update_id": "u", "status": "ok", "version": 1}',
            b'{"update_id": "u", "status": "accepted", "version": "x"}', b'{"update_id": 5, "status": "accepted", '
            b'"version": 1}', b'{"update_id": "u", "status": "accepted", "version": 1, "reason": 7}',
            b'{"schema": 2, "update_id": "u", "status": "accepted", "version": 1}']
    for payload in acks:
        with pytest.raises(ValidationError):
            Ack.model_validate_json(payload)
    statuses = hm.statuses(1000, [f"on-{i}" for i in range(5)], [f"off-{i}" for i in range(5)])
    wrong = []
    for s in statuses:
        with pytest.raises(ValidationError) as err:
            Status.model_validate_json(s.payload)
        first = err.value.errors()[0]
        where = {"json_invalid": "json", "model_type": "object"}.get(first["type"]) or str(first["loc"][0])
        if where != s.field:
            wrong.append(f"{s.payload[:60]!r}: {where}, not {s.field}")
    assert wrong == []
    book = Book()
    assert not any(book.status("f", s.agent, s.payload, 1.0) for s in statuses)
    caps: list[dict[str, object]] = [
        {"compute": {"steps_per_s": 0, "batch_size": 32}}, {"compute": {"steps_per_s": 1e10, "batch_size": 32}},
        {"compute": {"steps_per_s": "5", "batch_size": 32}}, {"compute": {"steps_per_s": 5.0, "batch_size": 0}},
        {"memory": {"total": 10, "available": 11}}, {"memory": {"total": -1}}, {"power": {"source": "solar"}},
        {"power": {"battery_percent": 101}}, {"link": {"uplink": 0}}, {"link": {"rtt": -1}}, {"examples": -1},
        {"tasks": [f"t{i}" for i in range(17)]}, {"tasks": ["a", "a"]}, {"tasks": ["a b"]},
        {"tags": {f"k{i}": "v" for i in range(17)}}, {"tags": {"a b": "v"}}, {"tags": {"k": "\x00"}}, {"loss": -1},
        {"loss": 1e7}, [], "fast",
    ]
    base = {"schema": 1, "agent": "e", "state": "online"}
    bad = [json.dumps({**base, "capabilities": c}).encode() for c in caps]
    bad += [json.dumps({**base, "updates_sent": -1}).encode(), json.dumps({**base, "pad": "x" * (16 << 10)}).encode()]
    assert [book.status("f", "e", p, 1.0) for p in bad] == [False] * len(bad)
    assert book.invalid == len(statuses) + len(bad)
    assert book.status("f", "e", json.dumps({**base, "capabilities": {"examples": 3}}).encode(), 1.0)

"""Hostile updates for the live suite (tests/test_hostile_live.py): every rejection reason of an update (docs/
protocol.md 4) in every form an update travels in: plain deltas and whole weights (float32 and float16
tensors), and the float16, int8 and top-k compressed forms (3.5). Each payload carries the reason it must be
refused for, known from how it was made, never from running the validator; the sizes below make every reason
in every form at least 50 times."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from fedmqtt import codec
from fedmqtt.compression import KEY, Compression, compress

PARAMS = {"l1/kernel": np.zeros((8, 4), np.float32), "l1/bias": np.zeros(4, np.float32),
          "out/kernel": np.zeros((4, 3), np.float16)}  # float32 and float16 tensors
FP = codec.fingerprint(PARAMS)
N = sum(v.size for v in PARAMS.values())  # entries of the flattened model (int8 and top-k)
FORMS = ("delta", "weights", "float16", "int8", "topk")
MAX_STALENESS, MAX_NORM, MAX_PAYLOAD = 5, 100.0, 256 << 10


class Hostile(NamedTuple):
    reason: str  # what the aggregator must answer
    form: str  # the form the update claims to be in
    agent: str  # the agent id of the topic it is published on
    payload: bytes


def dense(value: float = 0.01, **override: float) -> dict[str, np.ndarray]:
    """A float32 delta in the model's names and shapes, ``value`` everywhere (``override``: per tensor, with
    ``/`` written ``__``)."""
    return {k: np.full(v.shape, override.get(k.replace("/", "__"), value), np.float32) for k, v in PARAMS.items()}


def wire(form: str, delta: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata that carry ``delta`` in ``form``."""
    if form in ("delta", "weights"):
        with np.errstate(over="ignore"):
            return {k: v.astype(PARAMS[k].dtype) for k, v in delta.items()}, {}
    setting = Compression.parse({"float16": "float16", "int8": "int8", "topk": "topk:0.25"}[form])
    with np.errstate(over="ignore", invalid="ignore"):
        sent = compress(delta, setting, np.random.default_rng(0))
    return sent.tensors, sent.metadata


def update(form: str, tensors: dict[str, np.ndarray] | None = None, *, agent: str, uid: str, base: int,
           extra: dict[str, str] | None = None, delta: dict[str, np.ndarray] | None = None, **meta: object) -> bytes:
    """An update in ``form``: of ``delta`` (default: small values), or of ``tensors`` as they are."""
    form_meta: dict[str, str] = {}
    if tensors is None:
        tensors, form_meta = wire(form, delta if delta is not None else dense())
    elif form not in ("delta", "weights"):
        form_meta = {KEY: form}
    args: dict[str, object] = {"agent": agent, "update_id": uid, "base_version": base, "num_samples": 10,
                               "encoding": "weights" if form == "weights" else "delta", "model_fingerprint": FP}
    args.update(meta)
    return codec.encode_update(tensors, extra={**form_meta, **(extra or {})}, **args)  # type: ignore[arg-type]


def reheader(payload: bytes, edit: Callable[[dict[str, object]], object]) -> bytes:
    """``payload`` with its JSON header changed by ``edit`` (the data section as it was)."""
    (n,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload[8 + n :]


def with_meta(payload: bytes, **changes: str | None) -> bytes:
    """``payload`` with ``fedmqtt.<key>`` metadata set (None: removed)."""
    def edit(header: dict[str, object]) -> None:
        meta = header.setdefault("__metadata__", {})
        assert isinstance(meta, dict)
        for key, value in changes.items():
            name = KEY if key == "compression" else f"fedmqtt.{key}"
            if value is None:
                meta.pop(name, None)
            else:
                meta[name] = value
    return reheader(payload, edit)


def tensor_entry(payload: bytes, name: str, **entry: object) -> bytes:
    """``payload`` with the header entry of tensor ``name`` changed."""
    def edit(header: dict[str, object]) -> None:
        info = header[name]
        assert isinstance(info, dict)
        info.update(entry)
    return reheader(payload, edit)


def first_tensor(form: str) -> str:
    return {"int8": "#q", "topk": "#idx"}.get(form, "l1/kernel")


# ---- one maker per reason: (form, i, base) -> (topic agent or None for the default, payload) ---------------
Made = tuple[str | None, bytes]


def too_large(form: str, i: int, base: int) -> Made:
    good = update(form, agent=f"h-payload_too_large-{form}", uid=f"big{i}", base=base)
    if i % 2:
        return None, with_meta(good, pad="x" * (MAX_PAYLOAD + i))  # a whole update, padded past the limit
    return None, np.random.default_rng(i).bytes(MAX_PAYLOAD + 1 + i)


def malformed(form: str, i: int, base: int) -> Made:
    good = update(form, agent=f"h-malformed-{form}", uid=f"m{i}", base=base)
    rng = np.random.default_rng(i)
    (n,) = struct.unpack("<Q", good[:8])
    cases: list[Callable[[], bytes]] = [
        lambda: rng.bytes(int(rng.integers(0, 600))),  # random bytes (an 8-byte length beyond the bound)
        lambda: good[: int(rng.integers(0, len(good)))],  # truncated anywhere
        lambda: struct.pack("<Q", int(rng.integers(1 << 15, 1 << 63))) + good[8:],  # header length beyond the bound
        lambda: struct.pack("<Q", n + 1 + i % 7) + good[8:],  # header length runs into the data
        lambda: good + b"\0" * (1 + i % 9),  # bytes after the last tensor
        lambda: struct.pack("<Q", 9) + b"{not json" + good[8 + n :],  # header not JSON
        lambda: struct.pack("<Q", 4) + b"\x80\x81{}" + good[8 + n :],  # not UTF-8
        lambda: struct.pack("<Q", 6000) + b"[" * 6000,  # nested deeper than any parser's recursion limit
        lambda: struct.pack("<Q", 6) + b"[1, 2]" + good[8 + n :],  # JSON, not an object
        lambda: reheader(good, lambda h: h["__metadata__"].update({"fedmqtt.x": [i]})),  # type: ignore[attr-defined]
        lambda: tensor_entry(good, first_tensor(form), data_offsets=[0, 1 << 40]),  # beyond the payload
        lambda: tensor_entry(good, first_tensor(form), shape=[-1, 3]),  # a negative dimension
        lambda: tensor_entry(good, first_tensor(form), shape="8x4"),
        lambda: tensor_entry(good, first_tensor(form), data_offsets=[4, 0]),  # reversed
        lambda: reheader(good, lambda h: [info.update(data_offsets=[0, info["data_offsets"][1] - info["data_offsets"][0]])  # type: ignore[index]
                                          for k, info in h.items() if k != "__metadata__"]),  # all overlap
    ]
    return None, cases[i % len(cases)]()


def dtype(form: str, i: int, base: int) -> Made:
    good = update(form, agent=f"h-dtype-{form}", uid=f"d{i}", base=base)
    bad_codes: list[object] = ["BF16", "F8_E4M3", "C64", "X", "", "f32", 5, ["F32"], None, {"F32": 1}]
    if i % 3 == 0:  # a dtype that is not listed, or an entry that is not an object
        victim = first_tensor(form)
        return None, (reheader(good, lambda h: h.update({victim: "F32"})) if i % 7 == 0
                      else tensor_entry(good, victim, dtype=bad_codes[(i // 3) % len(bad_codes)]))
    wrong: dict[str, list[tuple[str, object]]] = {  # listed dtypes, the right shapes, the wrong tensor type
        "delta": [("l1/kernel", np.float64), ("out/kernel", np.float32), ("l1/bias", np.int32)],
        "weights": [("out/kernel", np.float64), ("l1/kernel", np.float16), ("l1/bias", np.uint8)],
        "float16": [("l1/kernel", np.float32), ("out/kernel", np.float64), ("l1/bias", np.int16)],
        "int8": [("#q", np.int16), ("#q", np.uint8), ("#scale", np.float16), ("#scale", np.float64)],
        "topk": [("#idx", np.int64), ("#idx", np.uint32), ("#val", np.float16), ("#val", np.float64)],
    }
    name, to = wrong[form][i % len(wrong[form])]
    tensors, _ = wire(form, dense())
    tensors[name] = tensors[name].astype(to)  # type: ignore[call-overload]
    return None, update(form, tensors, agent=f"h-dtype-{form}", uid=f"d{i}", base=base)


def schema(form: str, i: int, base: int) -> Made:
    good = update(form, agent=f"h-schema-{form}", uid=f"s{i}", base=base)
    return None, with_meta(good, schema=["2", "0", "", "01", " 1", "1.0", None, str(3 + i)][i % 8])


def kind(form: str, i: int, base: int) -> Made:
    if i % 5 == 4:
        return None, codec.encode_model(PARAMS, version=i)  # a whole model sent as an update
    good = update(form, agent=f"h-kind-{form}", uid=f"k{i}", base=base)
    return None, with_meta(good, kind=["model", "", "Update", None][i % 4])


def bad_metadata(form: str, i: int, base: int) -> Made:
    good = update(form, agent=f"h-bad_metadata-{form}", uid=f"b{i}", base=base)
    changes: list[dict[str, str | None]] = [
        {"num_samples": "0"}, {"num_samples": "-3"}, {"num_samples": "1e3"}, {"base_version": "-1"},
        {"base_version": "1.5"}, {"base_version": "x"}, {"base_version": ""}, {"base_version": "007"},
        {"base_version": "9" * 19}, {"agent": ""}, {"agent": "a b"}, {"agent": "x" * 129}, {"update_id": "a/b"},
        {"update_id": ""}, {"update_id": "ü"}, {"encoding": "sum"}, {"encoding": ""}, {"fingerprint": "XYZ"},
        {"fingerprint": FP.upper()}, {"agent": None}, {"update_id": None}, {"fingerprint": None},
        {"num_samples": None}, {"base_version": None}, {"encoding": None},
    ]
    return None, with_meta(good, **changes[i % len(changes)])


def agent_mismatch(form: str, i: int, base: int) -> Made:
    return None, update(form, agent=f"victim-{i}", uid=f"a{i}", base=base)


def future_base(form: str, i: int, base: int) -> Made:
    return None, update(form, agent=f"h-future_base-{form}", uid=f"f{i}", base=base + 1 + i)


def stale(form: str, i: int, base: int) -> Made:
    return None, update(form, agent=f"h-stale-{form}", uid=f"st{i}", base=i % (base - MAX_STALENESS))


def fingerprint(form: str, i: int, base: int) -> Made:
    return None, update(form, agent=f"h-fingerprint-{form}", uid=f"fp{i}", base=base,
                        model_fingerprint=f"{i:064x}" if i % 2 else codec.fingerprint({"w": np.zeros(i + 1)}))


def compression(form: str, i: int, base: int) -> Made:
    agent, uid = f"h-compression-{form}", f"c{i}"
    if form in ("delta", "weights") or i % 3 == 0:  # an unknown form, or a known one on whole weights
        good = update(form, agent=agent, uid=uid, base=base)
        names = ["int4", "zstd", "TOPK", "", "none", "float32", "Float16", "topk:0.1"]
        if form == "weights":
            return None, with_meta(good, compression=["float16", "int8", "topk", *names][i % 11])
        return None, with_meta(good, compression=names[i % len(names)])
    if form == "float16":
        good = update(form, agent=agent, uid=uid, base=base)
        return None, with_meta(good, encoding="weights")
    if form == "int8":
        scale = np.full(-(-N // 512), [np.nan, np.inf, -np.inf, -0.5, -1e-30][i % 5], np.float32)
        return None, update(form, {"#q": np.ones(N, np.int8), "#scale": scale}, agent=agent, uid=uid, base=base)
    idx = [[0, N], [-5, 1], [1, 1], [3, 1], [N + 100], [0, 2, 2, 7], [-1]][i % 7]
    return None, update(form, {"#idx": np.array(idx, np.int32), "#val": np.full(len(idx), 0.01, np.float32)},
                        agent=agent, uid=uid, base=base)


def tensor_names(form: str, i: int, base: int) -> Made:
    tensors, _ = wire(form, dense())
    first = sorted(tensors)[i % len(tensors)]
    cases = [{k: v for k, v in tensors.items() if k != first}, {**tensors, f"x{i}": np.zeros(1, np.float32)},
             {}, {f"{first}/extra": tensors[first]}]
    others = {"float16": ("int8", "topk"), "int8": ("delta", "topk"), "topk": ("delta", "int8")}.get(form, ())
    cases += [wire(other, dense())[0] for other in others]  # a compressed form announced over another's tensors
    return None, update(form, cases[i % len(cases)], agent=f"h-tensor_names-{form}", uid=f"t{i}", base=base)


def shape(form: str, i: int, base: int) -> Made:
    tensors, _ = wire(form, dense())
    if form in ("delta", "weights", "float16"):
        name = sorted(tensors)[i % 3]
        v = tensors[name]
        bad = [np.zeros((v.size + 1,), v.dtype), np.zeros((*v.shape, 1), v.dtype), np.zeros((), v.dtype),
               np.zeros((*v.shape[::-1], 2), v.dtype)][i % 4]
        tensors[name] = bad
    elif form == "int8":
        which, size = [("#q", (N + 1,)), ("#q", (N - 1,)), ("#q", (1, N)), ("#scale", (2,)), ("#scale", ())][i % 5]
        tensors[which] = np.zeros(size, tensors[which].dtype)
    else:
        k = tensors["#idx"].size
        tensors = [{"#idx": np.arange(k, dtype=np.int32), "#val": np.zeros(k + 1, np.float32)},
                   {"#idx": np.arange(N + 1, dtype=np.int32), "#val": np.zeros(N + 1, np.float32)},
                   {"#idx": np.zeros((1, 2), np.int32), "#val": np.zeros((1, 2), np.float32)},
                   {"#idx": np.array(3, np.int32), "#val": np.array(0.1, np.float32)}][i % 4]
    return None, update(form, tensors, agent=f"h-shape-{form}", uid=f"sh{i}", base=base)


def non_finite(form: str, i: int, base: int) -> Made:
    bad = [np.nan, np.inf, -np.inf][i % 3]
    agent, uid = f"h-non_finite-{form}", f"nf{i}"
    if form == "int8":  # finite on the wire, but q x scale overflows float32
        scale = np.full(-(-N // 512), 3e38, np.float32)
        return None, update(form, {"#q": np.full(N, 127, np.int8), "#scale": scale}, agent=agent, uid=uid, base=base)
    name = ["l1__kernel", "l1__bias", "out__kernel"][i % 3]
    return None, update(form, agent=agent, uid=uid, base=base, delta=dense(**{name: bad}))


def norm(form: str, i: int, base: int) -> Made:
    agent, uid = f"h-norm-{form}", f"n{i}"
    if form == "int8":
        q, scale = np.full(N, 127, np.int8), [10.0, 500.0, 1e30][i % 3]
        if scale > 1e4:
            q[-PARAMS["out/kernel"].size :] = 0  # the float16 tensor (last in name order) stays finite
        scales = np.full(-(-N // 512), scale, np.float32)
        return None, update(form, {"#q": q, "#scale": scales}, agent=agent, uid=uid, base=base)
    big = [1e3, 3e4, 6e4 if form == "float16" else 1e19][i % 3]  # 1e19: finite values whose squares overflow
    delta = dense(big, out__kernel=0.01) if big > 6e4 else dense(big)
    return None, update(form, agent=agent, uid=uid, base=base, delta=delta)


MAKERS: dict[str, tuple[Callable[[str, int, int], Made], int]] = {  # reason -> (maker, payloads)
    "payload_too_large": (too_large, 250), "malformed": (malformed, 1000), "dtype": (dtype, 750),
    "schema": (schema, 500), "kind": (kind, 500), "bad_metadata": (bad_metadata, 1000),
    "agent_mismatch": (agent_mismatch, 500), "future_base": (future_base, 500), "stale": (stale, 500),
    "fingerprint": (fingerprint, 500), "compression": (compression, 1000), "tensor_names": (tensor_names, 750),
    "shape": (shape, 750), "non_finite": (non_finite, 750), "norm": (norm, 750),
}


def corpus(base: int) -> list[Hostile]:
    """Every maker's payloads for an aggregator at version ``base``, the forms in turn."""
    out = []
    for reason, (make, count) in MAKERS.items():
        for i in range(count):
            form = FORMS[i % len(FORMS)]
            agent, payload = make(form, i // len(FORMS), base)
            out.append(Hostile(reason, form, agent or f"h-{reason}-{form}", payload))
    return out

"""The model the fuzz targets check against, and one valid message of each kind to start each target's corpus
from: libFuzzer mutates these, so that the fuzzer spends its time past the first parse (a random string is
rarely a safetensors file with a JSON header, let alone an update that names the right tensors)."""

from __future__ import annotations

import json

import numpy as np

from fedmqtt import codec, global_model
from fedmqtt.compression import Compression, compress
from fedmqtt.secagg import messages as m

#: A small model with both float dtypes the wire carries in practice.
PARAMS = {"l1/kernel": np.zeros((3, 2), np.float32), "l1/bias": np.zeros(2, np.float32),
          "out/kernel": np.zeros((2, 2), np.float16)}
FP = codec.fingerprint(PARAMS)
SPEC = {k: (v.shape, v.dtype) for k, v in PARAMS.items()}
DIM = sum(v.size for v in PARAMS.values())
AGENT = "edge-1"


def _update(tensors: dict[str, np.ndarray], encoding: str = "delta", extra: dict[str, str] | None = None,
            base: int = 2) -> bytes:
    return codec.encode_update(tensors, agent=AGENT, update_id="u1", base_version=base, num_samples=12,
                               encoding=encoding, model_fingerprint=FP, extra=extra)  # type: ignore[arg-type]


def _delta() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: (rng.standard_normal(v.shape) * 0.1).astype(v.dtype) for k, v in PARAMS.items()}


def plain_updates() -> list[bytes]:
    d = _delta()
    return [_update(d), _update(d, "weights"), _update({k: np.zeros_like(v) for k, v in d.items()}, base=3)]


def compressed_updates() -> list[bytes]:
    d = {k: v.astype(np.float32) for k, v in _delta().items()}
    out = []
    for form in ("float16", "int8", "topk:0.3", "topk:1"):
        sent = compress(d, Compression.parse(form), np.random.default_rng(1))
        out.append(_update(sent.tensors, extra=sent.metadata))
    return out


def models(signer: object | None = None) -> list[bytes]:
    out = [global_model.encode(PARAMS, v, mode=mode, fingerprint=FP, epoch="e1", form=form)  # type: ignore[arg-type]
           for v, mode, form in ((7, "async", None), (8, "sync", "float16"), (9, "async", "int8"))]
    return [signer.sign(p) for p in out] if signer is not None else out  # type: ignore[attr-defined]


def statuses() -> list[bytes]:
    caps = {"compute": {"steps_per_s": 85.2, "batch_size": 32}, "memory": {"total": 4096, "available": 2048},
            "power": {"source": "battery", "battery_percent": 64.0}, "link": {"uplink": 125000.0, "rtt": 0.05},
            "examples": 1200, "tasks": ["hapt"], "tags": {"hw": "rpi4"}, "loss": 0.41}
    base = {"schema": 1, "agent": AGENT, "state": "online", "version": 41, "updates_sent": 17, "ts": 1795612345.2}
    return [json.dumps(base).encode(), json.dumps({**base, "capabilities": caps}).encode(),
            json.dumps({**base, "state": "offline", "version": None}).encode()]


def acks() -> list[bytes]:
    return [b'{"schema": 1, "update_id": "3f2a", "status": "accepted", "version": 42, "reason": null}',
            b'{"schema": 1, "update_id": "", "status": "rejected", "version": 4, "reason": "stale", "detail": "x"}']


def assignments() -> list[bytes]:
    a = {"schema": 1, "agent": AGENT, "federation": "hapt", "task": "hapt", "local_steps": 10, "batch_size": None,
         "participation": 0.5, "compression": "topk:1%", "sequence": 1795612345200, "issued_at": 1795612345.2,
         "policy": "utility+speed-aware"}
    return [json.dumps(a).encode(), json.dumps({**a, "compression": "int8", "local_steps": None}).encode()]


KEY = m.b64(bytes(range(32)))


def from_agents() -> list[bytes]:
    """Prefixed by the byte that picks the topic (:data:`KINDS_IN` in decoders.py) and whether a step runs."""
    msgs = [(0, {"type": "ready", "update_id": "u1", "base_version": 0, "num_samples": 3, "dim": DIM}),
            (1, {"type": "keys", "step": "s1", "c_pk": KEY, "s_pk": m.b64(bytes(32 * [7]))}),
            (2, {"type": "shares", "step": "s1", "shares": {"b": m.b64(b"x" * 144)}}),
            (4, {"type": "reveal", "step": "s1", "b": {"a": "1f"}, "s": {"c": "2e"}}),
            (5, {"type": "refuse", "step": "s1", "reason": "too_few", "detail": ""})]
    out = [bytes([k | 0x80]) + json.dumps(body).encode() for k, body in msgs]
    deep = b"[" * 5000  # once a RecursionError out of the masked input's header parse
    return [*out, bytes([3 | 0x80]) + m.encode_masked("s1", np.arange(DIM, dtype=np.uint32)),
            bytes([3 | 0x80]) + len(deep).to_bytes(8, "little") + deep]


def to_agents() -> list[bytes]:
    cohort = {"type": "cohort", "step": "s1", "update_id": "u1", "version": 4, "members": ["a", "b", "c"],
              "threshold": 2, "degree": None, "clip": 1.0, "bits": 16, "dim": DIM, "weight": 1.0, "norm": None}
    too_many = sorted(["a", *(f"m{i:03d}" for i in range(299))])  # 300 at 24 bits: once a ValueError
    return [json.dumps(x).encode() for x in (
        cohort, {**cohort, "members": too_many, "threshold": 300, "bits": 24},
        {**cohort, "degree": 2, "norm": 5.0, "members": ["a", "b", "c", "d", "e"], "threshold": 2},
        {"type": "roster", "step": "s1", "keys": {"a": [KEY, KEY]}},
        {"type": "forward", "step": "s1", "shares": {"b": m.b64(b"y" * 144)}},
        {"type": "unmask", "step": "s1", "survivors": ["a", "b"]},
        {"type": "done", "step": "s1"}, {"type": "abort", "step": "s1", "reason": "too_few"})]

"""Hostile messages for every other topic an aggregator reads (tests/test_hostile_live.py): update topics
whose agent level is not an id, agents' status topics, its own model topic, and the secure-aggregation topics
of the service beside it; each with what it must come to, known from how it was made."""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np

from fedmqtt import codec, global_model
from fedmqtt.secagg import messages as m
from hostile_updates import FORMS, FP, PARAMS, update

BAD_IDS = ("a b", "é", "x" * 129, "a$b", "<script>", "~", "a,b", "'", "ä" * 3)


def bad_topic_updates(count: int, base: int) -> list[tuple[str, bytes]]:
    """(topic agent level, payload): good updates of each form on topics whose agent level is not an id."""
    return [(BAD_IDS[i % len(BAD_IDS)], update(FORMS[i % len(FORMS)], agent="good", uid=f"bt{i}", base=base))
            for i in range(count)]


class Status(NamedTuple):
    agent: str
    field: str  # where the status is wrong: a field name, or "json" (not JSON) or "object" (JSON, not an object)
    payload: bytes


def statuses(count: int, online: list[str], offline: list[str]) -> list[Status]:
    """Broken statuses: to an agent that is online each says "offline", to one that is not each says "online",
    so that a reader that took any of them would change who is online."""
    out = []
    rng = np.random.default_rng(7)
    for i in range(count):
        agent = (online if i % 2 else offline)[(i // 2) % len(online if i % 2 else offline)]
        good = {"schema": 1, "agent": agent, "state": "offline" if i % 2 else "online", "version": 3, "ts": 1.5}
        defects: list[tuple[str, object]] = [
            ("state", "ONLINE"), ("state", ""), ("state", 1), ("state", None), ("state", ["online"]),
            ("agent", 5), ("agent", None), ("agent", ["a"]), ("version", "x"), ("version", 1.5), ("version", [3]),
            ("version", 1e400), ("updates_sent", "many"), ("updates_sent", 2.5), ("ts", "noon"), ("ts", [1]),
            ("schema", "one"), ("schema", 1.5), ("schema", None), ("schema", 2), ("schema", 0),
            ("ts", float("nan")), ("ts", float("inf")), ("capabilities", "deep"),
        ]
        k = i // 2 % (len(defects) + 6)
        if k < len(defects):
            name, value = defects[k]
            body = dict(good)
            if name == "capabilities":  # nested beyond the JSON reader's depth limit
                text = json.dumps(body)[:-1] + ', "capabilities": ' + "[" * 400 + "]" * 400 + "}"
                out.append(Status(agent, "json", text.encode()))
                continue
            body[name] = value
            out.append(Status(agent, name, json.dumps(body).encode()))
        elif k == len(defects):
            out.append(Status(agent, "state", json.dumps({k: v for k, v in good.items() if k != "state"}).encode()))
        elif k == len(defects) + 1:
            out.append(Status(agent, "agent", json.dumps({k: v for k, v in good.items() if k != "agent"}).encode()))
        elif k == len(defects) + 2:
            text = json.dumps(good).encode()
            out.append(Status(agent, "json", text[: int(rng.integers(1, len(text)))]))  # truncated
        elif k == len(defects) + 3:
            out.append(Status(agent, "json", b"\x80" + rng.bytes(int(rng.integers(0, 64)))))  # not UTF-8
        elif k == len(defects) + 4:
            out.append(Status(agent, "object", [b"[]", b"null", b"1", b'"online"', b"[{}]"][i % 5]))
        else:
            out.append(Status(agent, "json", json.dumps(good).encode() + b" trailing"))
    return out


def foreign_models(count: int, own: bytes, version: int, epoch: str) -> list[bytes]:
    """Payloads on the model topic that this aggregator (at ``version`` of ``epoch``, whose retained model is
    ``own``) did not publish; none claims a version above its own in its epoch (that starts a new epoch)."""
    nan = {k: np.full(v.shape, np.nan, v.dtype) for k, v in PARAMS.items()}
    ones = {k: np.ones(v.shape, v.dtype) for k, v in PARAMS.items()}

    def model(params: dict[str, np.ndarray], v: int, e: str, **extra: str) -> bytes:
        return codec.encode_model(params, v, model_fingerprint=FP, extra={"fedmqtt.epoch": e, **extra})

    def flipped(i: int) -> bytes:
        b = bytearray(own)
        b[len(b) - 1 - i % 16] ^= 0x5A  # a data byte: the same header, version and epoch
        return bytes(b)

    rng = np.random.default_rng(11)
    makers = [
        lambda i: rng.bytes(int(rng.integers(0, 400))), lambda i: b"",
        lambda i: own[: int(rng.integers(0, len(own)))], flipped,
        lambda i: model(nan, version, epoch), lambda i: model(ones, version, epoch),  # forged copies of ours
        lambda i: model(ones, version, "other"), lambda i: model(ones, version + 5 + i, "other"),
        lambda i: model(ones, max(version - 1 - i % 3, 0), epoch),
        lambda i: global_model.encode(PARAMS, version, mode="async", fingerprint=FP, epoch=epoch, form="float16"),
        lambda i: codec.encode_model({"w": np.ones(3, np.float32)}, version, extra={"fedmqtt.epoch": epoch}),
        lambda i: update("delta", agent="good", uid=f"mt{i}", base=version),
        lambda i: model(ones, version, epoch, **{"fedmqtt.version": "x"}),
    ]
    return [makers[i % len(makers)](i // len(makers)) for i in range(count)]


class SecAgg(NamedTuple):
    reason: str  # "bad_message" or "phase" (ignored and counted), or "stale" (an ack says so)
    agent: str
    kind: str  # the topic's last level
    payload: bytes


def secagg_messages(count: int, dim: int, version: int, max_staleness: int) -> list[SecAgg]:
    """Messages from members to the secure-aggregation service while no step runs."""
    key = m.b64(bytes(range(32)))
    ready = {"type": "ready", "update_id": "u1", "base_version": version, "num_samples": 3, "dim": dim}
    valid = {"keys": {"type": "keys", "step": "s1", "c_pk": key, "s_pk": key},
             "shares": {"type": "shares", "step": "s1", "shares": {"b": m.b64(b"x" * 144)}},
             "reveal": {"type": "reveal", "step": "s1", "b": {"a": "1f"}, "s": {"c": "2e"}},
             "refuse": {"type": "refuse", "step": "s1", "reason": "too_few", "detail": ""}}
    masked = m.encode_masked("s1", np.zeros(dim, np.uint32))
    deep = b"[" * 6000
    bad: list[tuple[str, bytes]] = [
        ("ready", b"{"), ("keys", b"\x80\x81"), ("shares", b"[]"), ("reveal", b"null"), ("refuse", b"7"),
        ("ready", b'{"type": "hello"}'), ("ready", json.dumps(valid["keys"]).encode()),  # type != topic
        ("bogus", json.dumps(valid["keys"]).encode()), ("ready", json.dumps({**ready, "dim": dim + 1}).encode()),
        ("ready", json.dumps({**ready, "dim": 0}).encode()), ("ready", json.dumps({**ready, "base_version": -1}).encode()),
        ("ready", json.dumps({**ready, "update_id": "a/b"}).encode()),
        ("ready", json.dumps({k: v for k, v in ready.items() if k != "num_samples"}).encode()),
        ("keys", json.dumps({**valid["keys"], "c_pk": "!!!"}).encode()),
        ("keys", json.dumps({**valid["keys"], "step": "bad step"}).encode()),
        ("shares", json.dumps({**valid["shares"], "shares": {"a b": key}}).encode()),
        ("reveal", json.dumps({**valid["reveal"], "b": {"a": "xyz"}}).encode()),
        ("refuse", json.dumps({**valid["refuse"], "reason": "r" * 65}).encode()),
        ("ready", b'{"type": "ready", "dim": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("masked", b"\x07" * 5), ("masked", len(deep).to_bytes(8, "little") + deep),
        ("masked", m.encode_masked("s1", np.zeros(dim + 1, np.uint32))),
        ("masked", masked.replace(b'"U32"', b'"I32"')),
        ("masked", masked.replace(b"fedmqtt.secagg.step", b"fedmqtt.secagg.stop")),
        ("masked", masked + b"\0" * (1 << 17)),
    ]
    out = []
    for i in range(count):
        agent = f"m{i % 7}"
        j = i % 4
        if j in (0, 1):
            kind, payload = bad[(i // 2) % len(bad)]
            out.append(SecAgg("bad_message", agent, kind, payload))
        elif j == 2:
            kind = ["keys", "shares", "reveal", "refuse", "masked"][(i // 4) % 5]
            payload = masked if kind == "masked" else json.dumps(valid[kind]).encode()
            out.append(SecAgg("phase", agent, kind, payload))
        else:
            old = {**ready, "update_id": f"old{i}", "base_version": (i // 4) % (version - max_staleness)}
            out.append(SecAgg("stale", f"st{i % 5}", "ready", json.dumps(old).encode()))
    return out

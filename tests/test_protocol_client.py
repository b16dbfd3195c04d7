"""A client written from docs/protocol.md alone (paho-mqtt, json, struct, hashlib, numpy; no fedmqtt code)
against `fedmqtt aggregator` and three `fedmqtt edge` processes on a real Mosquitto."""

from __future__ import annotations

import hashlib
import json
import math
import queue
import re
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

VECTORS = Path(__file__).parent / "vectors"
DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I32": np.int32, "I64": np.int64, "I8": np.int8}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


# ---- the independent implementation of sections 3 and 3.1 ------------------------------------------
def parse(payload: bytes) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    (n,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + n])
    data = payload[8 + n :]
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        arr = np.frombuffer(data[begin:end], dtype=np.dtype(DTYPES[info["dtype"]]).newbyteorder("<"))
        tensors[name] = arr.reshape(info["shape"])
    return meta, tensors


def build(meta: dict[str, str], tensors: dict[str, np.ndarray]) -> bytes:
    header: dict[str, object] = {"__metadata__": meta}
    chunks, offset = [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": CODES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def fingerprint(tensors: dict[str, np.ndarray]) -> str:
    lines = "".join(f"{n}\t{CODES[tensors[n].dtype]}\t{','.join(map(str, tensors[n].shape))}\n" for n in sorted(tensors))
    return hashlib.sha256(lines.encode()).hexdigest()


def expand(meta: dict[str, str], tensors: dict[str, np.ndarray], shapes: dict[str, list[int]]
           ) -> dict[str, np.ndarray]:
    """Section 3.5: the dense float32 delta a compressed update stands for."""
    form = meta.get("fedmqtt.compression")
    sizes = {n: int(np.prod(s)) for n, s in shapes.items()}
    total = sum(sizes.values())
    flat = np.zeros(total, np.float32)  # int8 and topk: the model laid end to end in name order
    if form == "int8":
        q, scale = tensors["#q"], tensors["#scale"]
        assert q.shape == (total,) and scale.shape == ((total + 511) // 512,) and (scale >= 0).all()
        flat = q.astype(np.float32) * np.repeat(scale, 512)[:total]
    elif form == "topk":
        idx, val = tensors["#idx"], tensors["#val"]
        assert list(idx) == sorted(set(idx)) and all(0 <= i < total for i in idx)
        flat[idx] = val
    elif form not in (None, "float16"):
        raise ValueError(form)
    out, at = {}, 0
    for name in sorted(shapes):
        if form in (None, "float16"):
            out[name] = tensors[name].astype(np.float32)
        else:
            out[name] = flat[at : at + sizes[name]].reshape(shapes[name])
        at += sizes[name]
    return out


def test_independent_decoder_reads_every_compressed_vector() -> None:
    expected = json.loads((VECTORS / "expected.json").read_text())
    shapes = {k: v["shape"] for k, v in expected["model"]["tensors"].items()}
    for label, want in expected["compressed_updates"].items():
        meta, tensors = parse((VECTORS / f"update_edge-1_{label}.safetensors").read_bytes())
        assert meta == want["metadata"] and meta["fedmqtt.compression"] == label
        assert fingerprint({k: np.zeros(s, np.float32) for k, s in shapes.items()}) == meta["fedmqtt.fingerprint"]
        dense = expand(meta, tensors, shapes)
        for k, v in want["dense"].items():
            np.testing.assert_array_equal(dense[k].ravel(), np.asarray(v["values"], np.float32))


# ---- section 10: capabilities and assignments, from the documented rules -----------------------------
ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def is_int(v: object, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def is_num(v: object, lo: float, hi: float, open_lo: bool = False) -> bool:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
    return ok and not (open_lo and v == lo)


def assignment_ok(a: dict[str, object]) -> bool:
    """Section 10.2's table, as a reader applies it."""
    comp = a.get("compression")
    comp_ok = comp is None or comp in ("none", "float16", "int8") or (
        isinstance(comp, str) and comp.startswith("topk:") and _fraction_ok(comp[5:]))
    fed = a.get("federation")
    return (a.get("schema") == 1 and isinstance(a.get("agent"), str) and bool(ID.match(str(a["agent"])))
            and isinstance(fed, str) and 1 <= len(fed) <= 128 and not set(fed) & set("/+#\0")
            and not fed.startswith("$") and fed != "coordinator"
            and isinstance(a.get("task"), str) and bool(NAME.match(str(a["task"])))
            and (a.get("local_steps") is None or is_int(a["local_steps"], 1, 100_000))
            and (a.get("batch_size") is None or is_int(a["batch_size"], 1, 1 << 20))
            and is_num(a.get("participation", 1.0), 0.0, 1.0, open_lo=True) and comp_ok
            and is_int(a.get("sequence"), 0, 2**53 - 1) and is_num(a.get("issued_at"), 0.0, 1e11))


def _fraction_ok(text: str) -> bool:
    try:
        f = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return False
    return 0 < f <= 1


def test_independent_reader_of_capabilities_and_assignments() -> None:
    status = json.loads((VECTORS / "status_with_capabilities.json").read_text())
    c = status["capabilities"]
    assert status["state"] in ("online", "training", "offline")
    assert is_num(c["compute"]["steps_per_s"], 0, 1e9, open_lo=True) and is_int(c["compute"]["batch_size"], 1, 1 << 20)
    assert c["power"]["source"] in ("mains", "battery", "charging", "unknown")
    assert c["memory"]["available"] <= c["memory"]["total"] and is_int(c["examples"], 0, 2**53 - 1)
    assert len(c["tags"]) <= 16 and all(len(v) <= 64 for v in c["tags"].values())
    assert all(NAME.match(t) for t in c["tasks"]) and len(set(c["tasks"])) == len(c["tasks"]) <= 16

    good = json.loads((VECTORS / "assignment.json").read_text())
    assert assignment_ok(good)
    # the sequence rule: only a higher sequence replaces the assignment held
    held = good
    for offered in ({**good, "sequence": good["sequence"] - 1, "local_steps": 99}, {**good, "local_steps": 98}):
        held = offered if offered["sequence"] > held["sequence"] else held
    assert held is good
    for case in json.loads((VECTORS / "assignment_invalid.json").read_text()):
        assert not assignment_ok(case["payload"]), case["field"]


# ---- processes -------------------------------------------------------------------------------------
@pytest.fixture
def federation_processes(broker, federation: str) -> Iterator[str]:  # type: ignore[no-untyped-def]
    url = broker.url
    common = ["--broker", url, "--federation", federation]
    cmd = [sys.executable, "-m", "fedmqtt"]
    procs = [subprocess.Popen([*cmd, "aggregator", *common], stdout=subprocess.DEVNULL)]
    procs += [subprocess.Popen([*cmd, "edge", *common, "--agent-id", f"edge-{i}", "--round-seconds", "0.3"],
                               stdout=subprocess.DEVNULL) for i in range(3)]
    try:
        yield federation
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.broker
@pytest.mark.slow
def test_independent_client_decodes_model_and_its_update_is_applied(broker, federation_processes: str) -> None:  # type: ignore[no-untyped-def]
    base = f"fedmqtt/{federation_processes}"
    me = f"proto-{uuid.uuid4().hex[:6]}"
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=me, protocol=mqtt.MQTTv311)
    client.on_message = lambda c, u, m: inbox.put((m.topic, m.payload))
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(f"{base}/model", qos=1)
        client.subscribe(f"{base}/agents/{me}/acks", qos=1)
        client.subscribe(f"{base}/metrics", qos=1)
        deadline = time.monotonic() + 90
        model = None
        metrics: dict[str, object] = {}
        # Wait for a retained model that the three edge agents have already moved past version 0.
        while time.monotonic() < deadline and (model is None or int(model[0]["fedmqtt.version"]) < 3):
            try:
                topic, payload = inbox.get(timeout=1)
            except queue.Empty:
                continue
            if topic.endswith("/model"):
                model = parse(payload)
        assert model is not None, "no retained model received"
        meta, tensors = model
        assert meta["fedmqtt.schema"] == "1" and meta["fedmqtt.kind"] == "model"
        assert fingerprint(tensors) == meta["fedmqtt.fingerprint"]
        assert all(np.isfinite(t).all() for t in tensors.values())

        update_id = uuid.uuid4().hex
        delta = {k: np.full_like(v, 1e-3) for k, v in tensors.items()}
        payload = build({"fedmqtt.schema": "1", "fedmqtt.kind": "update", "fedmqtt.agent": me,
                         "fedmqtt.update_id": update_id, "fedmqtt.base_version": meta["fedmqtt.version"],
                         "fedmqtt.num_samples": "10", "fedmqtt.encoding": "delta",
                         "fedmqtt.fingerprint": meta["fedmqtt.fingerprint"]}, delta)
        client.publish(f"{base}/updates/{me}", payload, qos=1).wait_for_publish(10)

        ack = None
        while time.monotonic() < deadline and ack is None:
            try:
                topic, body = inbox.get(timeout=1)
            except queue.Empty:
                continue
            if topic.endswith("/acks"):
                ack = json.loads(body)
            elif topic.endswith("/metrics"):
                metrics = json.loads(body)
        assert ack is not None, "no acknowledgement"
        assert ack["update_id"] == update_id
        assert ack["status"] == "accepted", ack
        assert ack["version"] > int(meta["fedmqtt.version"])

        # The same, compressed (3.5): a top-k update with three entries.
        sparse_id = uuid.uuid4().hex
        n = sum(t.size for t in tensors.values())
        sparse = {"#idx": np.array([0, n // 2, n - 1], np.int32), "#val": np.array([1e-3, -1e-3, 1e-3], np.float32)}
        payload = build({"fedmqtt.schema": "1", "fedmqtt.kind": "update", "fedmqtt.agent": me,
                         "fedmqtt.update_id": sparse_id, "fedmqtt.base_version": str(ack["version"]),
                         "fedmqtt.num_samples": "10", "fedmqtt.encoding": "delta", "fedmqtt.compression": "topk",
                         "fedmqtt.fingerprint": meta["fedmqtt.fingerprint"]}, sparse)
        client.publish(f"{base}/updates/{me}", payload, qos=1).wait_for_publish(10)
        ack = None
        while time.monotonic() < deadline and ack is None:
            topic, body = inbox.get(timeout=5)
            if topic.endswith("/acks"):
                ack = json.loads(body)
        assert ack is not None and ack["update_id"] == sparse_id and ack["status"] == "accepted", ack
        # Metrics count the three edges' updates and ours.
        while time.monotonic() < deadline and int(metrics.get("accepted", 0)) < 5:  # type: ignore[call-overload]
            topic, body = inbox.get(timeout=5)
            if topic.endswith("/metrics"):
                metrics = json.loads(body)
        assert metrics["accepted"] >= 5 and metrics["rejected"] == 0
    finally:
        client.loop_stop()
        client.disconnect()

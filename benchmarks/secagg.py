"""What secure aggregation costs per FedBuff step (bytes, CPU, wall time on Mosquitto), and if it changes HAPT accuracy.

    nice -n 19 python benchmarks/secagg.py                        # both parts, 3 repeats / 3 seeds (~4 min on 2 cores)
    python benchmarks/secagg.py --part overhead --repeats 1       # quicker: the step costs only
    python benchmarks/secagg.py --part accuracy --updates 400     # quicker: a shorter HAPT run
    python benchmarks/secagg.py --part live                       # one step through a real Mosquitto (~15 s)

**Overhead** (``--part overhead``): one secure-aggregation step in-process with the real sessions
(``fedmqtt.secagg``: ``Client`` per member, one ``Server``), K = 10, 50, 100 members at 100,000 float32
parameters (``dense/kernel`` 999x100 and ``dense/bias`` 100), clip 1.0, 16 bits; also K = 100 on the sparse
SecAgg+ graph (degree 2*ceil(log2 K) = 14, threshold 8 of the 15 holders of each secret), K = 100 with a
third of the cohort gone after masking (no reveal), and K = 100 with 10 % gone before masking (the server
must rebuild their pairwise masks with every surviving neighbour). Every message goes through its wire form,
built and parsed as ``fedmqtt.secure`` (aggregator side) and ``fedmqtt.secure_member`` (agent side) do:
agent -> aggregator ``ready``, ``keys``, ``shares``, the safetensors masked input, ``reveal``; aggregator ->
agent ``cohort``, ``roster``, ``forward``, ``unmask``, ``done``/``abort`` and the ordinary ack. Bytes are
MQTT payload bytes (topic and MQTT header, ~40-70 bytes per message, not counted); each message is published
once and delivered to one subscriber, so "through the broker" is the sum of every payload of the step, in
and again out; it is compared with plain FedBuff per update summed (the updates left out of a step are
offered to a later one, so a dropout costs the bytes it sent for nothing). Times are CPU seconds of this thread (``time.thread_time``, so the other processes on the
machine do not inflate them):

- member: everything one agent does for the step (parse the aggregator's messages, decode its own update
  from the outbox, the ``Client`` calls, build its replies); median over the members that saw the step
  through (neither dropped);
- server session: the ``Server`` calls (``add_*``, ``roster``, ``forward``, ``survivors``, ``unmask``);
  server total adds the wire (parsing every message, decoding the masked inputs, building every message to
  the agents) and the decode of the sum into the mean;
- plain: FedBuff without secure aggregation: the update payload (``codec.encode_update``) up, the ack down;
  the server decodes the K payloads (``codec.decode``) and sums them with numpy.

Each step is checked: the unmasked sum must equal, bit for bit, the sum of the survivors' encodings computed
with the same random generators (the masks cancel exactly in Z_2^32). Medians over ``--repeats`` steps.

**Accuracy** (``--part accuracy``): HAPT (30 volunteers, one agent each; ``--data`` or ``$FEDMQTT_HAPT``),
the simulation of ``fedmqtt.simulation`` (same arrivals, trainer and core as ``benchmarks/robustness.py``,
1,600 updates, K = 10, server SGD lr 1.0), plain ``fedbuff(10)`` against FedBuff with secure aggregation,
3 seeds, same seed = same partition, device speeds and arrival order. The secure strategy is a wrapper
around ``fedbuff(1, weighting=constant())`` (what ``fedmqtt aggregator --secure`` runs): it buffers K
updates, each member's staleness weight w = (1+s)^-0.5 (``polynomial(0.5)``, as ``SecureConfig.staleness``)
goes into the cohort and the member multiplies its flattened delta by it before encoding, then it runs **the
real Client/Server sessions** on the K flattened deltas (full graph, threshold 6, clip ``--clip``, 16 bits,
stochastic rounding) and hands the unmasked mean decode_sum(Σ encode(wᵢΔᵢ)) / K to the inner FedBuff as
one update, as ``SecureAggregation._apply`` does. The staleness is the same as the service's: the version
does not move while a buffer fills. "Final" is the accuracy at the end of the run (as robustness.py);
"tail" the mean of the last 4 of 16 evaluation points (as update_compression.py; one snapshot of an
asynchronous model swings by a point). The table gives medians over seeds and the difference in points,
and the largest |wᵢΔᵢ| coordinate seen, to judge the clip.

**Live** (``--part live``; ``--part all`` runs all three, ``both`` stays overhead and accuracy): the wall time of
one step through a real Mosquitto, started from the repo's ``mosquitto.conf`` on a free loopback port
(``fedmqtt.broker.MosquittoProcess``, as tests/conftest.py; the config sets ``set_tcp_nodelay true``: with
Nagle on in Mosquitto, a message the broker sends a client right after its PUBACK to that client waits for the
client's delayed ACK, ~40 ms on Linux, once per request/reply round trip),
K = 10, 50, 100 at 100,000 float32 parameters (the same two tensors).
Secure: an ``Aggregator`` with ``fedbuff(1, weighting=constant())`` and ``SecureAggregation`` beside it
(cohort_size = min_cohort = K, phase_timeout 30 s); K protocol-level members as in tests/test_secure.py (a
``SecureMember`` whose outbox is a dict, one MQTT connection each, its secagg loop served as a task); wall time
from the moment the K offers go out (published concurrently) to the last member's ack; "service" is the
service's own ``last_step["seconds"]`` (cohort formed to the acks sent). Plain: an ``Aggregator`` with
``fedbuff(K)``; K agents (one connection each) publish one update each (``codec.encode_update``, QoS 1) on
``topics.update(agent)``; wall time from the first publish to the last of the K acks (the first K-1 acks go out
when their update is buffered, the last once the step is applied). ``--repeats`` steps each (new update ids,
based on the current version), medians; the first step of each aggregator includes compiling its strategy.
Everything but the broker runs in this process on one event loop (aggregator, secure service and all K agents),
so the members' work is done one after another, as it never is in a real fleet: process CPU is
``time.process_time`` over the step, the whole fleet's; broker CPU is the Mosquitto process's (psutil). Each
step is checked: K "accepted" acks, one new version, and the model moved by the mean of the K (clipped) deltas
to within one quantisation step (secure) or 1e-6 (plain).

Writes results/secagg-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedmqtt import codec
from fedmqtt.errors import SecAggAbort
from fedmqtt.schemas import Ack
from fedmqtt.schemas import dump as dump_schema
from fedmqtt.secagg import Client, Cohort, Server, default_threshold, field
from fedmqtt.secagg import messages as m
from fedmqtt.secure_member import SecureMember
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Message, Transport, mqtt_connector

ROOT = Path(__file__).resolve().parents[1]
CLIP, BITS = 1.0, 16


# ---- part 1: the cost of one step ----------------------------------------------------------------------
class Clock:
    """CPU seconds of this thread, summed per key."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        t = time.thread_time()
        try:
            yield
        finally:
            self.cpu[key] += time.thread_time() - t


class Config(NamedTuple):
    label: str
    k: int
    degree: int | None
    drop_before: float = 0.0  # fraction of the cohort gone after sharing, before sending its masked input
    drop_after: float = 0.0  # fraction gone after its masked input arrived (no reveal)


def sparse_degree(k: int) -> int:
    return 2 * math.ceil(math.log2(k))  # even by construction


def configs(dims_k: list[int]) -> list[Config]:
    out = [Config(f"K={k}", k, None) for k in dims_k]
    big = max(dims_k)
    d = sparse_degree(big)
    out += [Config(f"K={big}, SecAgg+ degree {d}", big, d),
            Config(f"K={big}, 1/3 drop after masking", big, None, drop_after=1 / 3),
            Config(f"K={big}, 10% drop before masking", big, None, drop_before=0.1),
            Config(f"K={big}, degree {d}, 10% drop before masking", big, d, drop_before=0.1)]
    return out


def model_params(dim: int) -> dict[str, np.ndarray]:
    """A 'dense' layer of ``dim`` float32 parameters (kernel and bias), as benchmarks/hostile_cost.py."""
    bias = 100
    return {"dense/bias": np.zeros(bias, np.float32), "dense/kernel": np.zeros(((dim - bias) // 100, 100), np.float32)}


def spread(members: tuple[str, ...], fraction: float, offset: int) -> set[str]:
    """round(fraction * K) members spread evenly over the ring (every 1/fraction-th one)."""
    n = round(fraction * len(members))
    if n == 0:
        return set()
    return {members[(offset + (i * len(members)) // n) % len(members)] for i in range(n)}


def flat(payload: bytes) -> np.ndarray:
    """secure_member._flat: an update's tensors, flattened in name order."""
    tensors = codec.decode(payload).tensors
    return np.concatenate([np.ravel(tensors[k]).astype(np.float32) for k in sorted(tensors)])


def secure_step(cfg: Config, dim: int, seed: int) -> dict[str, Any]:
    """One step through the real sessions and wire messages; bytes, CPU seconds and the exactness check."""
    rng = np.random.default_rng([seed, cfg.k, 0x5EC])
    params = model_params(dim)
    dim = sum(v.size for v in params.values())
    fp = codec.fingerprint(params)
    members = tuple(sorted(f"edge-{i}" for i in range(cfg.k)))
    holders = cfg.k if cfg.degree is None or cfg.degree >= cfg.k - 1 else cfg.degree + 1
    step = f"{uuid.uuid4().hex[:16]}-0-{seed}"
    cohort = Cohort(step, 0, members, default_threshold(holders), cfg.degree, CLIP, BITS, dim)
    gone_before = spread(members, cfg.drop_before, 1)
    gone_after = spread(members, cfg.drop_after, 2) - gone_before
    update_ids = {a: uuid.uuid4().hex for a in members}
    outbox = {a: codec.encode_update({k: rng.normal(0.0, 0.01, v.shape).astype(np.float32) for k, v in params.items()},
                                     agent=a, update_id=update_ids[a], base_version=0, num_samples=300,
                                     model_fingerprint=fp) for a in members}
    up: dict[str, int] = defaultdict(int)  # agent -> payload bytes it published
    down: dict[str, int] = defaultdict(int)  # agent -> payload bytes published to it
    n_up: dict[str, int] = defaultdict(int)
    n_down: dict[str, int] = defaultdict(int)
    member = {a: Clock() for a in members}
    server = Clock()  # keys: session, wire, decode
    inbox: dict[str, list[bytes]] = defaultdict(list)  # aggregator -> agent, per agent

    def publish_down(agent: str, payload: bytes) -> None:
        down[agent] += len(payload)
        n_down[agent] += 1
        inbox[agent].append(payload)

    def publish_up(agent: str, payload: bytes) -> bytes:
        up[agent] += len(payload)
        n_up[agent] += 1
        return payload

    pending = {update_ids[a]: outbox[a] for a in members}  # the agents' outboxes, by update id
    clients: dict[str, Client] = {}
    started = time.perf_counter()
    # offers: SecureMember.offer decodes the outbox payload for its metadata and its size
    offers: dict[str, m.Ready] = {}
    for a in members:
        with member[a]("ready"):
            info = codec.decode(outbox[a]).metadata
            dim_a = sum(int(np.size(v)) for v in codec.decode(outbox[a]).tensors.values())
            ready = publish_up(a, m.dump(m.Ready(update_id=update_ids[a], base_version=int(info["fedmqtt.base_version"]),
                                                 num_samples=int(info.get("fedmqtt.num_samples", "0")), dim=dim_a)))
        with server("wire"):
            msg = m.parse_from_agent(ready)
            assert isinstance(msg, m.Ready)
            assert msg.dim == dim
            offers[a] = msg
    # cohort -> keys
    with server("session"):
        srv = Server(cohort)
    for a in members:
        with server("wire"):
            publish_down(a, m.dump(m.CohortMsg(step=step, update_id=offers[a].update_id, version=0,
                                               members=list(members), threshold=cohort.threshold,
                                               degree=cfg.degree, clip=CLIP, bits=BITS, dim=dim, weight=1.0)))
    for i, a in enumerate(members):
        with member[a]("keys"):
            start = m.parse_to_agent(inbox[a].pop(0))
            assert isinstance(start, m.CohortMsg)
            clients[a] = cl = Client(a, start.cohort(a), flat(pending[start.update_id]),
                                     np.random.default_rng([seed, i]))
            c_pk, s_pk = cl.public_keys()
            payload = publish_up(a, m.dump(m.Keys(step=step, c_pk=m.b64(c_pk), s_pk=m.b64(s_pk))))
        with server("wire"):
            keys = m.parse_from_agent(payload)
            assert isinstance(keys, m.Keys)
            c_raw, s_raw = m.unb64(keys.c_pk, 32), m.unb64(keys.s_pk, 32)
        with server("session"):
            srv.add_keys(a, c_raw, s_raw)
    # roster -> shares
    with server("session"):
        roster = srv.roster()
    for a in roster:
        with server("wire"):
            publish_down(a, m.dump(m.Roster(step=step, keys={v: (m.b64(c), m.b64(s)) for v, (c, s) in roster.items()})))
    for a in roster:
        with member[a]("shares"):
            ros = m.parse_to_agent(inbox[a].pop(0))
            assert isinstance(ros, m.Roster)
            boxes = clients[a].share_keys({v: (m.unb64(c, 32), m.unb64(s, 32)) for v, (c, s) in ros.keys.items()})
            payload = publish_up(a, m.dump(m.Shares(step=step, shares={v: m.b64(b) for v, b in boxes.items()})))
        with server("wire"):
            shares = m.parse_from_agent(payload)
            assert isinstance(shares, m.Shares)
            got = {v: m.unb64(box) for v, box in shares.shares.items()}
        with server("session"):
            srv.add_shares(a, got)
    # forward -> masked inputs
    with server("session"):
        forward = srv.forward()
    for a, boxes in forward.items():
        with server("wire"):
            publish_down(a, m.dump(m.Forward(step=step, shares={u: m.b64(b) for u, b in boxes.items()})))
    for a in forward:
        msg_bytes = inbox[a].pop(0)
        if a in gone_before:
            continue  # received the forward, never answered
        with member[a]("masked"):
            fwd = m.parse_to_agent(msg_bytes)
            assert isinstance(fwd, m.Forward)
            y = clients[a].masked_input({u: m.unb64(b) for u, b in fwd.shares.items()})
            payload = publish_up(a, m.encode_masked(step, y))
        with server("wire"):
            got_step, y_in = m.decode_masked(payload, dim)
            assert got_step == step
        with server("session"):
            srv.add_masked(a, y_in)
    # unmask -> reveals
    with server("session"):
        survivors = srv.survivors()
    for a in survivors:
        with server("wire"):
            publish_down(a, m.dump(m.Unmask(step=step, survivors=list(survivors))))
    for a in survivors:
        msg_bytes = inbox[a].pop(0)
        if a in gone_after:
            continue
        with member[a]("reveal"):
            ask = m.parse_to_agent(msg_bytes)
            assert isinstance(ask, m.Unmask)
            b, s = clients[a].reveal(ask.survivors)
            payload = publish_up(a, m.dump(m.Reveal(step=step, b={v: f"{x:x}" for v, x in b.items()},
                                                    s={v: f"{x:x}" for v, x in s.items()})))
        with server("wire"):
            rev = m.parse_from_agent(payload)
            assert isinstance(rev, m.Reveal)
            b_in, s_in = {v: int(x, 16) for v, x in rev.b.items()}, {v: int(x, 16) for v, x in rev.s.items()}
        with server("session"):
            srv.add_reveal(a, b_in, s_in)
    with server("session"):
        total, summed = srv.unmask()
    with server("decode"):
        mean = field.decode_sum(total, len(summed), CLIP, BITS) / np.float32(len(summed))
    for a in members:  # the end of the step: done and the ack for the summed, abort for the others
        with server("wire"):
            if a in summed:
                publish_down(a, m.dump(m.End(step=step, type="done")))
                publish_down(a, dump_schema(Ack(update_id=update_ids[a], status="accepted", version=1)))
            else:
                publish_down(a, m.dump(m.End(step=step, type="abort", reason="dropped",
                                             detail="not in the survivors; offer the update again")))
    for a in members:
        with member[a]("end"):
            for payload in inbox.pop(a, []):
                with contextlib.suppress(SecAggAbort):  # the ack is not a secagg message
                    m.parse_to_agent(payload)
    wall = time.perf_counter() - started
    # exactness: the same generators give the same encodings; their uint32 sum is what unmask must return
    want = np.zeros(dim, np.uint32)
    plain_sum = np.zeros(dim, np.float64)
    for i, a in enumerate(members):
        if a in summed:
            x = flat(outbox[a])
            want += field.encode(x * np.float32(1.0), CLIP, BITS, np.random.default_rng([seed, i]))
            plain_sum += np.clip(x, -CLIP, CLIP)
    exact = bool(np.array_equal(total, want))
    err = float(np.abs(mean.astype(np.float64) - plain_sum / len(summed)).max())
    complete = [a for a in members if a not in gone_before | gone_after]
    member_cpu = {a: sum(member[a].cpu.values()) for a in members}
    phases = ("ready", "keys", "shares", "masked", "reveal", "end")
    return {
        "config": cfg.label, "k": cfg.k, "degree": cfg.degree, "threshold": cohort.threshold,
        "dropped_before_masking": len(gone_before), "dropped_after_masking": len(gone_after),
        "summed": len(summed), "exact_sum": exact, "max_error_of_mean": err,
        "up_per_member": statistics.median(up[a] for a in complete),
        "down_per_member": statistics.median(down[a] for a in complete),
        "messages_up_per_member": statistics.median(n_up[a] for a in complete),
        "messages_down_per_member": statistics.median(n_down[a] for a in complete),
        "cohort_bytes": sum(up.values()) + sum(down.values()),
        "cohort_bytes_up": sum(up.values()), "cohort_bytes_down": sum(down.values()),
        "member_cpu_median": statistics.median(member_cpu[a] for a in complete),
        "member_cpu_max": max(member_cpu[a] for a in complete),
        "member_cpu_by_phase": {p: statistics.median(member[a].cpu.get(p, 0.0) for a in complete) for p in phases},
        "server_session_cpu": server.cpu["session"], "server_wire_cpu": server.cpu["wire"],
        "server_decode_cpu": server.cpu["decode"],
        "server_total_cpu": sum(server.cpu.values()), "wall_seconds": wall,
    }


def plain_step(k: int, dim: int, seed: int) -> dict[str, Any]:
    """The same K updates without secure aggregation: payload up, ack down, the server decodes and sums."""
    rng = np.random.default_rng([seed, k, 0x5EC])
    params = model_params(dim)
    fp = codec.fingerprint(params)
    members = [f"edge-{i}" for i in range(k)]
    ids = {a: uuid.uuid4().hex for a in members}
    encode_cpu = []
    payloads = {}
    for a in members:
        tensors = {n: rng.normal(0.0, 0.01, v.shape).astype(np.float32) for n, v in params.items()}
        t = time.thread_time()
        payloads[a] = codec.encode_update(tensors, agent=a, update_id=ids[a], base_version=0, num_samples=300,
                                          model_fingerprint=fp)
        encode_cpu.append(time.thread_time() - t)
    acks = {}
    t = time.thread_time()
    total = {n: np.zeros(v.shape, np.float32) for n, v in params.items()}
    for a in members:
        for n, v in codec.decode(payloads[a]).tensors.items():
            total[n] += np.asarray(v, np.float32)
    mean = {n: v / np.float32(k) for n, v in total.items()}
    server = time.thread_time() - t
    t = time.thread_time()
    for a in members:
        acks[a] = dump_schema(Ack(update_id=ids[a], status="accepted", version=1))
    server_acks = time.thread_time() - t
    assert all(np.all(np.isfinite(v)) for v in mean.values())
    return {"k": k, "up_per_member": statistics.median(len(p) for p in payloads.values()),
            "down_per_member": statistics.median(len(p) for p in acks.values()),
            "cohort_bytes": sum(map(len, payloads.values())) + sum(map(len, acks.values())),
            "member_encode_cpu_median": statistics.median(encode_cpu),
            "server_cpu": server, "server_cpu_with_acks": server + server_acks}


def med(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def part_overhead(args: argparse.Namespace) -> list[dict[str, Any]]:
    ks = [int(k) for k in args.k.split(",")]
    print(f"\n## Overhead per step: {args.dim:,} float32 parameters, clip {CLIP}, {BITS} bits, "
          f"medians of {args.repeats} steps\n")
    print("| configuration | threshold | summed | up / member (B) | vs plain | down / member (B) | plain down (B) "
          "| cohort via broker (MB) | vs plain, per update summed | member CPU (s) | server session (s) | server total (s) "
          "| plain server (s) | exact |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    plain_by_k: dict[int, list[dict[str, Any]]] = {}
    out = []
    for cfg in configs(ks):
        if cfg.k not in plain_by_k:
            plain_by_k[cfg.k] = [plain_step(cfg.k, args.dim, r) for r in range(args.repeats)]
        plain = plain_by_k[cfg.k]
        runs = [secure_step(cfg, args.dim, r) for r in range(args.repeats)]
        row = {"config": cfg.label, "k": cfg.k, "degree": cfg.degree, "threshold": runs[0]["threshold"],
               "summed": runs[0]["summed"], "exact_sum_every_run": all(r["exact_sum"] for r in runs),
               "max_error_of_mean": max(r["max_error_of_mean"] for r in runs),
               **{key: med(runs, key) for key in (
                   "up_per_member", "down_per_member", "messages_up_per_member", "messages_down_per_member",
                   "cohort_bytes", "cohort_bytes_up", "cohort_bytes_down", "member_cpu_median", "member_cpu_max",
                   "server_session_cpu", "server_wire_cpu", "server_decode_cpu", "server_total_cpu",
                   "wall_seconds")},
               "member_cpu_by_phase": {p: statistics.median(r["member_cpu_by_phase"][p] for r in runs)
                                       for p in runs[0]["member_cpu_by_phase"]},
               "plain": {key: med(plain, key) for key in plain[0] if key != "k"},
               "runs": runs, "plain_runs": plain}
        p = row["plain"]
        row["cohort_bytes_per_summed"] = row["cohort_bytes"] / row["summed"]
        plain_per_update = p["cohort_bytes"] / cfg.k
        row["cohort_bytes_per_summed_vs_plain"] = row["cohort_bytes_per_summed"] / plain_per_update
        print(f"| {cfg.label} | {row['threshold']} | {row['summed']}/{cfg.k} | {row['up_per_member']:,.0f} | "
              f"{row['up_per_member'] / p['up_per_member']:.3f} | {row['down_per_member']:,.0f} | "
              f"{p['down_per_member']:,.0f} | {row['cohort_bytes'] / 1e6:.2f} | "
              f"{row['cohort_bytes_per_summed'] / plain_per_update:.3f} | {row['member_cpu_median']:.3f} | "
              f"{row['server_session_cpu']:.2f} | {row['server_total_cpu']:.2f} | {p['server_cpu']:.3f} | "
              f"{'yes' if row['exact_sum_every_run'] else 'NO'} |", flush=True)
        out.append(row)
    return out


# ---- part 2: accuracy on HAPT -----------------------------------------------------------------------------
class ClipStats:
    """What the members encoded: the largest |w·Δ| coordinate, how many were clipped, how far the secure mean
    is from the exact mean of the same w·Δ."""

    def __init__(self, clip: float) -> None:
        self.clip = clip
        self.max_abs = 0.0
        self.coords = self.clipped = self.updates = 0
        self.q999: list[float] = []  # per update: the 99.9th percentile of |w·Δ|
        self.rel_error: list[float] = []  # per step: ‖secure mean - exact mean‖ / ‖exact mean‖
        self.max_abs_error: list[float] = []  # per step: the largest coordinate error of the mean
        self.inexact_steps = 0  # unmasked sums that differ from the sum of the encodings (a bug if any)

    def observe(self, wx: np.ndarray) -> None:
        a = np.abs(wx)
        self.max_abs = max(self.max_abs, float(a.max()))
        self.coords += a.size
        self.clipped += int(np.count_nonzero(a > self.clip))
        self.updates += 1
        self.q999.append(float(np.quantile(a, 0.999)))

    def summary(self) -> dict[str, Any]:
        return {"max_abs_w_delta": self.max_abs, "clipped_fraction": self.clipped / max(self.coords, 1),
                "updates": self.updates, "median_q999_abs_w_delta": statistics.median(self.q999) if self.q999 else 0,
                "median_relative_error_of_mean": statistics.median(self.rel_error) if self.rel_error else 0,
                "max_abs_error_of_mean": max(self.max_abs_error, default=0.0), "inexact_steps": self.inexact_steps}


class SecureBuffState(NamedTuple):
    inner: Any  # the inner fedbuff(1)'s state
    pending: tuple[tuple[np.ndarray, float, float], ...]  # (flat delta, staleness weight, samples) per member
    steps: Any  # secure steps taken (numpy int: a pytree leaf)


def secure_fedbuff(k: int, lr: float, clip: float, bits: int, seed: int, stats: ClipStats):  # type: ignore[no-untyped-def]
    """FedBuff(K) with secure aggregation: K buffered updates summed by the real sessions, the mean handed to
    fedbuff(1, constant()) as one update (the aggregator's strategy under ``--secure``)."""
    from fedmqtt.strategies import ClientUpdate, Strategy, constant, fedbuff, polynomial, server_optimizer

    inner = fedbuff(1, server_optimizer("sgd", lr), weighting=constant())
    staleness = polynomial(0.5)  # SecureConfig.staleness

    def init(params: Any) -> SecureBuffState:
        return SecureBuffState(inner.init(params), (), np.int64(0))

    def apply(params: Any, update: ClientUpdate, state: SecureBuffState) -> tuple[Any, SecureBuffState, bool]:
        names = sorted(update.params)
        x = np.concatenate([np.ravel(np.asarray(update.params[n], np.float32)) for n in names])
        w = min(1.0, float(staleness(int(np.asarray(update.staleness)))))
        stats.observe(x * np.float32(w))
        pending = (*state.pending, (x, w, float(np.asarray(update.num_samples))))
        if len(pending) < k:
            return params, state._replace(pending=pending), False
        step = int(state.steps)
        mean = cohort_mean(pending, f"sim-{seed}-{step}", clip, bits, [seed, step], stats)
        tensors, at = {}, 0
        for n in names:  # SecureAggregation._apply: unflatten in name order
            size = int(np.size(params[n]))
            tensors[n] = mean[at : at + size].reshape(np.shape(params[n])).astype(np.float32)
            at += size
        one = ClientUpdate(tensors, np.int32(0), np.float32(sum(p[2] for p in pending)))
        params, inner_state, stepped = inner.apply(params, one, state.inner)
        return params, SecureBuffState(inner_state, (), np.int64(step + 1)), bool(stepped)

    def flush(params: Any, state: SecureBuffState) -> tuple[Any, SecureBuffState, bool]:
        return params, state, False  # the simulation's async mode never flushes

    return Strategy("fedbuff-secure", "delta", "async", init, apply, flush)


def cohort_mean(pending: tuple[tuple[np.ndarray, float, float], ...], step: str, clip: float, bits: int,
                seed: list[int], stats: ClipStats) -> np.ndarray:
    """One secure step over the buffered members with the real sessions: the unmasked mean Σ clip(wᵢΔᵢ) / K."""
    k = len(pending)
    members = tuple(f"m{i:03d}" for i in range(k))
    dim = pending[0][0].size
    weights = {a: p[1] for a, p in zip(members, pending, strict=True)}
    cohort = Cohort(step, 0, members, default_threshold(k), None, clip, bits, dim, weights)
    rngs = [np.random.default_rng([*seed, i]) for i in range(k)]
    clients = {a: Client(a, cohort._replace(weights={a: weights[a]}), p[0], rngs[i])  # CohortMsg.cohort(agent)
               for i, (a, p) in enumerate(zip(members, pending, strict=True))}
    server = Server(cohort)
    for a, cl in clients.items():
        server.add_keys(a, *cl.public_keys())
    roster = server.roster()
    for a in roster:
        server.add_shares(a, clients[a].share_keys(roster))
    for a, boxes in server.forward().items():
        server.add_masked(a, clients[a].masked_input(boxes))
    survivors = server.survivors()
    for a in survivors:
        server.add_reveal(a, *clients[a].reveal(survivors))
    total, summed = server.unmask()
    mean = field.decode_sum(total, len(summed), clip, bits) / np.float32(len(summed))
    # checks, outside the protocol: the sum is exactly that of the encodings; how far from the exact mean
    want = np.zeros(dim, np.uint32)
    exact = np.zeros(dim, np.float64)
    for i, p in enumerate(pending):
        wx = p[0] * np.float32(p[1])
        want += field.encode(wx, clip, bits, np.random.default_rng([*seed, i]))
        exact += wx
    stats.inexact_steps += not np.array_equal(total, want)
    exact /= k
    stats.rel_error.append(float(np.linalg.norm(mean - exact) / max(float(np.linalg.norm(exact)), 1e-30)))
    stats.max_abs_error.append(float(np.abs(mean - exact).max()))
    return mean


def part_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from fedmqtt.simulation import simulate
    from fedmqtt.strategies.registry import make
    from fedmqtt.tasks import get_task

    if args.data:
        os.environ["FEDMQTT_HAPT"] = str(args.data)
    task0 = get_task("hapt", seed=0)
    dim = sum(int(np.size(v)) for v in task0.trainer(0).initial.values())
    print(f"\n## Accuracy on HAPT: {task0.num_clients} agents, {dim:,} parameters, K={args.buffer}, "
          f"{args.updates} updates, server lr {args.server_lr}, clip {args.clip}, {BITS} bits, "
          f"seeds {args.seeds}\n", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "secure": []}
    stats_all = []
    for seed in range(args.seeds):
        task = get_task("hapt", seed=seed)
        for kind in ("plain", "secure"):
            stats = ClipStats(args.clip)
            strategy = (make("fedbuff", buffer_size=args.buffer, server_lr=args.server_lr) if kind == "plain" else
                        secure_fedbuff(args.buffer, args.server_lr, args.clip, BITS, seed, stats))
            t = time.perf_counter()
            r = simulate(task, strategy, updates=args.updates, seed=seed, eval_points=16)
            tail = [acc for _, acc in r.curve[-4:]]
            runs[kind].append({"seed": seed, "accuracy": r.accuracy, "tail_accuracy": sum(tail) / len(tail),
                               "version": r.version, "applied": r.applied, "rejected": r.rejected_by_reason,
                               "curve": r.curve, "seconds": round(time.perf_counter() - t, 1),
                               **({"clip": stats.summary()} if kind == "secure" else {})})
            if kind == "secure":
                stats_all.append(stats.summary())
            print(f"  seed {seed} {kind}: final {r.accuracy:.4f}, tail {sum(tail) / len(tail):.4f}, "
                  f"version {r.version}, {time.perf_counter() - t:.0f} s", flush=True)
    res: dict[str, Any] = {"task": task0.name, "dim": dim, "buffer": args.buffer, "updates": args.updates,
                           "server_lr": args.server_lr, "clip": args.clip, "bits": BITS, "runs": runs}
    print("\n| run | final accuracy (median) | per seed | tail accuracy (median) | per seed | versions |\n"
          "|---|---|---|---|---|---|")
    for kind in ("plain", "secure"):
        rs = runs[kind]
        res[f"{kind}_final_median"] = statistics.median(r["accuracy"] for r in rs)
        res[f"{kind}_tail_median"] = statistics.median(r["tail_accuracy"] for r in rs)
        label = "FedBuff (plain)" if kind == "plain" else "FedBuff + secure aggregation"
        finals = ", ".join(f"{r['accuracy']:.3f}" for r in rs)
        tails = ", ".join(f"{r['tail_accuracy']:.3f}" for r in rs)
        versions = ", ".join(str(r["version"]) for r in rs)
        print(f"| {label} | {res[kind + '_final_median']:.4f} | {finals} | {res[kind + '_tail_median']:.4f} | "
              f"{tails} | {versions} |")
    paired = [100 * (s["accuracy"] - p["accuracy"]) for p, s in zip(runs["plain"], runs["secure"], strict=True)]
    paired_tail = [100 * (s["tail_accuracy"] - p["tail_accuracy"])
                   for p, s in zip(runs["plain"], runs["secure"], strict=True)]
    res["difference_points_final"] = 100 * (res["secure_final_median"] - res["plain_final_median"])
    res["difference_points_tail"] = 100 * (res["secure_tail_median"] - res["plain_tail_median"])
    res["paired_difference_points_final"] = paired
    res["paired_difference_points_tail"] = paired_tail
    res["clip_stats"] = {"max_abs_w_delta": max(s["max_abs_w_delta"] for s in stats_all),
                         "clipped_fraction": max(s["clipped_fraction"] for s in stats_all),
                         "median_q999_abs_w_delta": statistics.median(s["median_q999_abs_w_delta"] for s in stats_all),
                         "median_relative_error_of_mean":
                             statistics.median(s["median_relative_error_of_mean"] for s in stats_all),
                         "max_abs_error_of_mean": max(s["max_abs_error_of_mean"] for s in stats_all),
                         "inexact_steps": sum(s["inexact_steps"] for s in stats_all)}
    cs = res["clip_stats"]
    print(f"\nsecure - plain: {res['difference_points_final']:+.2f} points (final, medians), "
          f"{res['difference_points_tail']:+.2f} (tail); paired per seed final "
          f"{', '.join(f'{d:+.2f}' for d in paired)}, tail {', '.join(f'{d:+.2f}' for d in paired_tail)}")
    print(f"largest |w·Δ| coordinate {cs['max_abs_w_delta']:.4f} (clip {args.clip}; coordinates clipped: "
          f"{cs['clipped_fraction']:.2e}); median 99.9th percentile per update {cs['median_q999_abs_w_delta']:.4f}; "
          f"secure mean vs exact mean of the same w·Δ: relative error {cs['median_relative_error_of_mean']:.2e} "
          f"(median per step), largest coordinate error {cs['max_abs_error_of_mean']:.2e} "
          f"(one step 2c/(2^b-1) = {2 * args.clip / (2**BITS - 1):.2e}); unmasked sums not equal to the sum of "
          f"the encodings: {cs['inexact_steps']}")
    return res


# ---- part 3: one step through a real Mosquitto ------------------------------------------------------------
class Acks:
    """The acks a fleet waits for: ``done`` is set, and ``last`` (perf_counter) noted, when the last one came."""

    def __init__(self) -> None:
        self.waiting: set[str] = set()
        self.statuses: dict[str, int] = defaultdict(int)
        self.done = asyncio.Event()
        self.last = 0.0

    def expect(self, update_ids: Iterable[str]) -> None:
        self.waiting = set(update_ids)
        self.statuses.clear()
        self.done.clear()

    def __call__(self, ack: Ack) -> None:
        if ack.update_id in self.waiting:
            self.waiting.discard(ack.update_id)
            self.statuses[ack.status] += 1
            if not self.waiting:
                self.last = time.perf_counter()
                self.done.set()


class LiveMember(SecureMember):
    """tests/test_secure.py's protocol-level member: its outbox is a dict of payloads by update id."""

    def __init__(self, agent: str, topics: Topics) -> None:
        self.payloads: dict[str, bytes] = {}
        super().__init__(agent, topics, self.payloads.get)


@contextlib.asynccontextmanager
async def fleet(broker: BrokerConfig, topics: Topics, agents: list[str], acks: Acks,
                members: dict[str, LiveMember] | None = None) -> AsyncIterator[dict[str, Transport]]:
    """One MQTT connection per agent, subscribed to its acks (and, for a member, its secagg topic, served
    as a task: tests/test_secure.py's ``members``)."""
    members = members or {}
    connect = mqtt_connector(broker)
    async with contextlib.AsyncExitStack() as stack:
        ts: dict[str, Transport] = {}
        for a in agents:
            mem = members.get(a)

            def route(msg: Message, mem: LiveMember | None = mem) -> None:
                if mem is not None and msg.topic == mem.topic:
                    mem.receive(msg.payload)
                else:
                    acks(Ack.model_validate_json(msg.payload))
            t = await stack.enter_async_context(connect(ConnectOptions(f"{topics.federation}-{a}"[:60],
                                                                       on_message=route)))
            if mem is not None:
                await t.subscribe(mem.topic, qos=1)
            await t.subscribe(topics.acks(a), qos=1)
            ts[a] = t
        tasks = [asyncio.create_task(mem.serve(functools.partial(ts.get, a))) for a, mem in members.items()]
        try:
            yield ts
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def broker_cpu(proc: Any) -> float:
    """CPU seconds (user + system) of the Mosquitto process so far; NaN without psutil."""
    if proc is None:
        return math.nan
    t = proc.cpu_times()
    return float(t.user + t.system)


def flat_params(params: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(params[k], np.float64)) for k in sorted(params)])


def live_updates(agents: list[str], params: dict[str, np.ndarray], version: int, rng: np.random.Generator
                 ) -> tuple[dict[str, str], dict[str, bytes], np.ndarray]:
    """One update per agent (new ids), as its outbox holds it; and the mean of their clipped flat deltas."""
    fp = codec.fingerprint(params)
    ids = {a: uuid.uuid4().hex for a in agents}
    payloads, total = {}, np.zeros(sum(v.size for v in params.values()), np.float64)
    for a in agents:
        tensors = {n: rng.normal(0.0, 0.01, v.shape).astype(np.float32) for n, v in params.items()}
        payloads[a] = codec.encode_update(tensors, agent=a, update_id=ids[a], base_version=version, num_samples=300,
                                          model_fingerprint=fp)
        total += np.clip(flat_params(tensors), -CLIP, CLIP)
    return ids, payloads, total / len(agents)


async def live_steps(kind: str, k: int, dim: int, repeats: int, broker: BrokerConfig, mosq: Any,
                     timeout: float) -> list[dict[str, Any]]:
    """``repeats`` steps of K updates through the broker, secure (members offer, the service runs the step)
    or plain (each agent publishes its update to the aggregator's FedBuff(K)); wall time from the first
    offer or update published to the last ack received."""
    from fedmqtt.aggregator import Aggregator, AggregatorConfig
    from fedmqtt.secure import SecureAggregation, SecureConfig
    from fedmqtt.strategies import constant, fedbuff

    topics = Topics(federation=f"live-{uuid.uuid4().hex[:8]}-{kind}-{k}")
    params = model_params(dim)
    agents = [f"edge-{i}" for i in range(k)]
    connect = mqtt_connector(broker)
    strategy = fedbuff(1, weighting=constant()) if kind == "secure" else fedbuff(k)
    agg = Aggregator(connect, params, strategy, AggregatorConfig(topics=topics, client_id=f"agg-{topics.federation}"))
    members = {a: LiveMember(a, topics) for a in agents} if kind == "secure" else {}
    acks = Acks()
    runs: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(agg)
        cfg = SecureConfig(cohort_size=k, min_cohort=k, phase_timeout=30, client_id=f"sa-{topics.federation}")
        sa = await stack.enter_async_context(SecureAggregation(connect, agg, cfg)) if kind == "secure" else None
        if sa is not None:
            await sa.wait_connected()
        await agg.wait_connected()
        ts = await stack.enter_async_context(fleet(broker, topics, agents, acks, members))
        for r in range(repeats):
            version = agg.version
            ids, payloads, want = live_updates(agents, params, version, np.random.default_rng([r, k, 0x11FE]))
            for a, mem in members.items():
                mem.payloads[ids[a]] = payloads[a]
            before = flat_params(agg.numpy_params())
            acks.expect(ids.values())
            cpu, bcpu = time.process_time(), broker_cpu(mosq)
            started = time.perf_counter()
            if sa is not None:
                await asyncio.gather(*(members[a].offer(ts[a], ids[a], payloads[a]) for a in agents))
            else:
                await asyncio.gather(*(ts[a].publish(topics.update(a), payloads[a], qos=1) for a in agents))
            published = time.perf_counter() - started
            try:
                await asyncio.wait_for(acks.done.wait(), timeout)
            except TimeoutError:
                state = (f"aborted {dict(sa.aborted)}, refused {dict(sa.refused)}, bad messages {sa.bad_messages}, "
                         f"offers {len(sa.offers)}" if sa is not None else f"version {agg.version}")
                raise TimeoutError(f"{kind} K={k} step {r}: {len(acks.waiting)} acks missing after {timeout:.0f} s "
                                   f"({state})") from None
            wall = acks.last - started
            cpu, bcpu = time.process_time() - cpu, broker_cpu(mosq) - bcpu
            if sa is not None:
                # one version per secure step: counted (last_step set) once steps catches up with the version
                await sa.wait_until(lambda: sa.steps >= agg.version, 30, lambda: "the step was not counted")
            err = float(np.abs((flat_params(agg.numpy_params()) - before) - want).max())
            bound = (2 * CLIP / (2**BITS - 1) if sa is not None else 0.0) + 1e-6  # one quantisation step
            run = {"wall_seconds": wall, "offers_published_seconds": published, "process_cpu": cpu,
                   "broker_cpu": bcpu, "acks": dict(acks.statuses), "version": agg.version,
                   "max_error_of_mean": err, "checked": acks.statuses.get("accepted") == k
                   and agg.version == version + 1 and err <= bound
                   and (sa is None or sa.last_step["survivors"] == k)}
            if sa is not None:
                run.update(service_seconds=sa.last_step["seconds"], survivors=int(sa.last_step["survivors"]),
                           aborted=sum(sa.aborted.values()), refused=sum(sa.refused.values()),
                           bad_messages=sa.bad_messages, members_dropped=sum(mem.dropped for mem in members.values()))
            runs.append(run)
            print(f"  {kind} K={k} step {r}: {wall:.3f} s wall (offers/updates published in {published:.3f} s"
                  + (f", service {run['service_seconds']:.3f} s" if sa is not None else "")
                  + f"), process CPU {cpu:.2f} s, broker CPU {bcpu:.2f} s, acks {dict(acks.statuses)}, "
                  f"max error of the applied mean {run['max_error_of_mean']:.1e}", flush=True)
    return runs


def part_live(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(live(args))


async def live(args: argparse.Namespace) -> dict[str, Any]:
    from fedmqtt.broker import MosquittoProcess, free_port, has_mosquitto

    try:
        import psutil
    except ImportError:
        psutil = None
    if not has_mosquitto():
        raise SystemExit("--part live needs the mosquitto binary")
    ks = [int(k) for k in args.k.split(",")]
    port = free_port()
    while port == 1883:  # never the default broker's port
        port = free_port()
    proc = MosquittoProcess.prepare(port)
    conf = "the repo's mosquitto.conf"
    print(f"\n## One step through Mosquitto (127.0.0.1:{port}, {conf}): {args.dim:,} float32 "
          f"parameters, clip {CLIP}, {BITS} bits, medians of {args.repeats} steps; the aggregator, the secure "
          "service and the K agents (one MQTT connection each) all run in this process, on one event loop\n",
          flush=True)
    rows = []
    try:
        await proc.start()
        assert proc.process is not None
        mosq = psutil.Process(proc.process.pid) if psutil is not None else None
        for k in ks:
            secure = await live_steps("secure", k, args.dim, args.repeats, proc.config, mosq, args.live_timeout)
            plain = await live_steps("plain", k, args.dim, args.repeats, proc.config, mosq, args.live_timeout)
            row: dict[str, Any] = {"k": k, **{f"secure_{key}": med(secure, key) for key in (
                "wall_seconds", "service_seconds", "offers_published_seconds", "process_cpu", "broker_cpu")},
                   **{f"plain_{key}": med(plain, key) for key in (
                       "wall_seconds", "offers_published_seconds", "process_cpu", "broker_cpu")},
                   "secure_runs": secure, "plain_runs": plain}
            row["ratio"] = row["secure_wall_seconds"] / row["plain_wall_seconds"]
            row["checked_every_step"] = all(r["checked"] for r in secure + plain)
            rows.append(row)
    finally:
        proc.kill()
        shutil.rmtree(proc.data_dir, ignore_errors=True)
    print("\n| K | secure step wall (s) | service step (s) | plain step wall (s) | secure / plain | process CPU "
          "secure (s) | process CPU plain (s) | broker CPU secure (s) | broker CPU plain (s) | checked |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['k']} | {row['secure_wall_seconds']:.3f} | {row['secure_service_seconds']:.3f} | "
              f"{row['plain_wall_seconds']:.3f} | {row['ratio']:.1f} | {row['secure_process_cpu']:.2f} | "
              f"{row['plain_process_cpu']:.2f} | {row['secure_broker_cpu']:.2f} | {row['plain_broker_cpu']:.2f} | "
              f"{'yes' if row['checked_every_step'] else 'NO'} |")
    return {"dim": args.dim, "repeats": args.repeats, "broker": "mosquitto", "port": port, "config": conf,
            "psutil": psutil is not None, "phase_timeout": 30, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("both", "overhead", "accuracy", "live", "all"), default="both",
                    help="both: overhead and accuracy; all: both and live")
    ap.add_argument("--k", default="10,50,100", help="overhead and live: cohort sizes (overhead: the largest also "
                    "gets the sparse graph and the dropout cases)")
    ap.add_argument("--dim", type=int, default=100_000, help="overhead and live: float32 parameters per update")
    ap.add_argument("--repeats", type=int, default=3, help="overhead and live: steps per configuration (medians)")
    ap.add_argument("--live-timeout", type=float, default=180.0, help="live: seconds a step may take before the "
                    "run stops (each phase of the secure step waits up to 30 s for silent members)")
    ap.add_argument("--data", type=Path, default=None, help="accuracy: the HAPT .npz (default: $FEDMQTT_HAPT, "
                    "else ../shared/data/hapt_har_30users.npz)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--updates", type=int, default=1600, help="accuracy: arrivals per run (robustness.py: 1600)")
    ap.add_argument("--buffer", type=int, default=10, help="accuracy: FedBuff K = the cohort size")
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=CLIP, help="accuracy: clip of w·Δ coordinates")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"secagg-{time.strftime('%Y%m%d-%H%M%S')}.json"
    started = time.perf_counter()
    print(f"# {' '.join(sys.argv)}\n# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    doc: dict[str, Any] = {"argv": sys.argv, "machine": platform.platform(), "python": platform.python_version(),
                           "cpus": os.cpu_count(), "clip": CLIP, "bits": BITS}

    def save() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        doc["wall_seconds"] = round(time.perf_counter() - started, 1)
        doc["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
        path.write_text(json.dumps(doc, indent=1))

    if args.part in ("both", "all", "overhead"):
        doc["overhead"] = {"dim": args.dim, "repeats": args.repeats, "rows": part_overhead(args)}
        save()
    if args.part in ("both", "all", "accuracy"):
        doc["accuracy"] = part_accuracy(args)
        save()
    if args.part in ("all", "live"):
        doc["live"] = part_live(args)
        save()
    save()
    print(f"\n{doc['wall_seconds']:.0f} s wall, {doc['cpu_seconds']:.0f} s CPU "
          f"({doc['cpu_seconds'] / max(doc['wall_seconds'], 1e-9):.2f} cores)\nwrote {path}")


if __name__ == "__main__":
    main()

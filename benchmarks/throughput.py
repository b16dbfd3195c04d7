"""Aggregator throughput against the raw broker rate, side by side in one run, through a real Mosquitto.

For each model size (default 100k and 1M float32 parameters) it starts one Mosquitto and runs two phases
with the same publishers (P processes, paho, QoS 1, at most ``--window`` unacknowledged publishes each,
a freshly encoded fedmqtt update per message, as fast as the broker takes them):

1. raw: Mosquitto's own C subscriber (``mosquitto_sub -F %U``: a timestamp per message, into a file), or with
   ``--raw paho`` a paho subscriber process that does nothing with the messages;
2. aggregator: the real Aggregator (FedBuff K=10 by default; ``--strategy fedasync`` for the CLI's default)
   in this process, in memory or with ``--durable`` a state directory (journal, fsync); publishers take
   their base version from the aggregator's acks; a watcher process subscribes to the retained model.

The aggregator and the publishers raise glibc's malloc thresholds as ``fedmqtt aggregator`` does
(fedmqtt.allocator; ``--default-malloc`` leaves them): otherwise every model-sized buffer is faulted in
again page by page, which on a VM costs more than the work done on it.

``--workers N`` runs the root's worker tier: N worker processes (fedmqtt.worker) share the updates through an
MQTT 5 shared subscription, check them and send sums of up to ``--worker-k`` to the aggregator, which then
takes combined updates only (FedBuff). Reported besides: the workers' CPU seconds per update, so that what
moved off the aggregator is visible.

``--rate R`` offers R messages/s in all instead of as many as the broker takes: below capacity, the
latency from publish to retained model is the aggregator's, not a backlog's.

Reported: messages/s received by the raw subscriber and updates/s applied by the aggregator over the same
steady-state window (after a warm-up), their ratio, the aggregator process's CPU seconds per applied update
(everything: MQTT client, validation, strategy, acks, model publishes), wall time inside
``Aggregator.handle`` per update, and the latency from an update's publish to the first retained model that
includes it (p50/p90/p99; for FedBuff this includes the wait for the buffer to fill).

    python benchmarks/throughput.py                      # 100k and 1M parameters, 4 publishers, 10 s phases
    python benchmarks/throughput.py --params 100000 --seconds 5
    python benchmarks/throughput.py --params 100000 --strategy fedasync --durable --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_params(n: int) -> dict[str, np.ndarray]:
    """A dense layer with about ``n`` float32 parameters (kernel rows × 100, plus a bias of 100)."""
    rows = max(1, (n - 100) // 100)
    return {"dense/bias": np.zeros(100, np.float32), "dense/kernel": np.zeros((rows, 100), np.float32)}


# ---- processes (no jax imported here) ---------------------------------------------------------------
def _client(client_id: str) -> Any:
    import paho.mqtt.client as paho

    return paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)


def publisher(port: int, topic: str, agent: str, acks_topic: str | None, n_params: int, start_at: float,
              seconds: float, window: int, out: Any, rate: float = 0.0, tune: bool = True) -> None:
    from fedmqtt import allocator, codec

    # a device encodes one update at a time; with glibc's default thresholds each 400 KB (4 MB) payload is
    # faulted in page by page, which on this VM costs more than the aggregator's whole handling of it
    if tune:
        allocator.tune()
    params = make_params(n_params)
    rng = np.random.default_rng(abs(hash(agent)) % 2**32)
    delta = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in params.items()}
    fp = codec.fingerprint(params)
    base = [0]
    c = _client(agent)
    if acks_topic:
        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            with contextlib.suppress(ValueError, KeyError):
                base[0] = max(base[0], int(json.loads(msg.payload)["version"]))
        c.on_message = on_message
    c.max_inflight_messages_set(window)
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if acks_topic:
        c.subscribe(acks_topic, qos=1)
    sent: list[tuple[str, float]] = []
    pending: list[Any] = []
    while time.monotonic() < start_at:
        time.sleep(0.001)
    end = start_at + seconds
    next_at = start_at
    while time.monotonic() < end:
        if rate:  # an offered load below capacity: one message every 1/rate s
            next_at += 1.0 / rate
            time.sleep(max(0.0, next_at - time.monotonic()))
        uid = uuid.uuid4().hex
        payload = codec.encode_update(delta, agent=agent, update_id=uid, base_version=base[0], num_samples=100,
                                      model_fingerprint=fp)
        pending.append(c.publish(topic, payload, qos=1))
        sent.append((uid, time.monotonic()))
        while len(pending) >= window:  # back-pressure: as fast as the broker acknowledges (PUBACK)
            pending.pop(0).wait_for_publish(5.0)
    for info in pending:
        info.wait_for_publish(5.0)
    time.sleep(0.5)
    c.loop_stop()
    c.disconnect()
    out.put(("sent", agent, sent))


def _subscribe_until(port: int, topic: str, client_id: str, on_message: Any, ready: Any, stop: Any) -> None:
    """Run a paho subscriber on ``topic`` until ``stop`` is set; ``ready`` is set once it is subscribed."""
    c = _client(client_id)
    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    c.connect("127.0.0.1", port, keepalive=60)
    c.subscribe(topic, qos=1)
    c.loop_start()
    stop.wait()
    c.loop_stop()


def counter(port: int, topic: str, ready: Any, stop: Any, out: Any) -> None:
    """The raw consumer: a paho subscriber that only records arrival times."""
    arrivals: list[float] = []
    _subscribe_until(port, topic, "raw-subscriber", lambda _c, _u, _m: arrivals.append(time.monotonic()),
                     ready, stop)
    out.put(("raw", arrivals))


def watcher(port: int, topic: str, ready: Any, stop: Any, out: Any) -> None:
    """Records when each model version first appears on the retained model topic."""
    from fedmqtt import codec

    seen: dict[int, float] = {}

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        header, _ = codec.read_header(msg.payload)
        meta = header.get("__metadata__", {})
        if isinstance(meta, dict):
            seen.setdefault(int(meta["fedmqtt.version"]), time.monotonic())

    _subscribe_until(port, topic, "model-watcher", on_message, ready, stop)
    out.put(("models", seen))


# ---- phases -----------------------------------------------------------------------------------------
def worker_proc(port: int, federation: str, n_params: int, worker_id: str, k: int, ready: Any, stop: Any,
                out: Any) -> None:
    """One worker of the root, in its own process, until ``stop``; reports its CPU time."""
    from fedmqtt import allocator
    from fedmqtt.admission import AdmissionLimits
    from fedmqtt.topics import Topics
    from fedmqtt.transport import BrokerConfig, mqtt_connector
    from fedmqtt.worker import Worker, WorkerConfig

    allocator.tune()  # as `fedmqtt worker` does

    async def serve() -> None:
        w = Worker(mqtt_connector(BrokerConfig(port=port)), make_params(n_params),
                   WorkerConfig(worker_id, Topics(federation=federation), buffer_size=k,
                                max_staleness=1_000_000, max_update_norm=None,
                                admission=AdmissionLimits(max_rate=None, max_share=None)))  # as the aggregator's
        async with w:
            await w.wait_connected()
            ready.set()
            cpu0 = time.process_time()
            await asyncio.to_thread(stop.wait)
            out.put(("worker", worker_id, time.process_time() - cpu0, w.local_accepted))

    asyncio.run(serve())


def rate_in(times: list[float], lo: float, hi: float) -> float:
    return sum(lo <= t < hi for t in times) / (hi - lo)


def pctl(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def raw_publishers(ctx: Any, port: int, args: Any, n_params: int, out: Any) -> tuple[float, list[Any], list[Any]]:
    """Run the publishers of a raw phase to the end; their start time, processes and results."""
    start_at = time.monotonic() + 1.5
    pubs = [ctx.Process(target=publisher, args=(port, f"raw/updates/p{i}", f"p{i}", None, n_params, start_at,
                                                args.seconds, args.window, out, args.rate / args.publishers,
                                                not args.default_malloc))
            for i in range(args.publishers)]
    for p in pubs:
        p.start()
    results = [out.get(timeout=args.seconds + 120) for _ in pubs]
    time.sleep(1.0)
    return start_at, pubs, results


def run_raw(ctx: Any, port: int, args: Any, n_params: int) -> dict[str, Any]:
    if args.raw == "mosquitto_sub":
        return run_raw_c(ctx, port, args, n_params)
    out, ready, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    sub = ctx.Process(target=counter, args=(port, "raw/updates/+", ready, stop, out))
    sub.start()
    ready.wait(10)
    start_at, pubs, results = raw_publishers(ctx, port, args, n_params, out)
    stop.set()
    arrivals = out.get(timeout=30)[1]
    for p in [*pubs, sub]:
        p.join(10)
    lo, hi = start_at + args.warmup, start_at + args.seconds
    sent = sum(len(r[2]) for r in results)
    return {"received": len(arrivals), "sent": sent, "rate": rate_in(arrivals, lo, hi),
            "window_seconds": hi - lo}


def run_raw_c(ctx: Any, port: int, args: Any, n_params: int) -> dict[str, Any]:
    """The raw rate as Mosquitto's own C subscriber sees it: it prints a timestamp per message (``-F %U``)
    into a file, and costs far less CPU than any Python subscriber."""
    import subprocess
    import tempfile

    stamps = Path(tempfile.mkstemp(prefix="fedmqtt-raw-")[1])
    offset = time.monotonic() - time.time()  # mosquitto_sub prints Unix time
    with stamps.open("w") as f:
        sub = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-t", "raw/updates/+", "-q", "1", "-F", "%U",
                                "-i", "raw-subscriber"], stdout=f)
    try:
        time.sleep(0.5)  # subscribed
        start_at, pubs, results = raw_publishers(ctx, port, args, n_params, ctx.Queue())
    finally:
        sub.terminate()
        sub.wait(10)
    arrivals = [float(line) + offset for line in stamps.read_text().split()]
    stamps.unlink()
    for p in pubs:
        p.join(10)
    lo, hi = start_at + args.warmup, start_at + args.seconds
    return {"received": len(arrivals), "sent": sum(len(r[2]) for r in results), "rate": rate_in(arrivals, lo, hi),
            "window_seconds": hi - lo, "subscriber": "mosquitto_sub"}


async def run_aggregator(ctx: Any, port: int, args: Any, n_params: int) -> dict[str, Any]:
    from fedmqtt import allocator, codec
    from fedmqtt.admission import AdmissionLimits
    from fedmqtt.aggregator import Aggregator, AggregatorConfig
    from fedmqtt.core import Limits
    from fedmqtt.strategies.registry import applicable, make
    from fedmqtt.topics import Topics
    from fedmqtt.transport import BrokerConfig, mqtt_connector

    if not args.default_malloc:
        allocator.tune()  # as `fedmqtt aggregator` does
    topics = Topics(federation=f"tp{n_params}")
    strategy = make(args.strategy, **applicable(args.strategy, buffer_size=args.buffer_size))
    # a capacity test: a few publishers stand in for a fleet, so the per-device bounds are off
    unbounded = AdmissionLimits(max_rate=None, max_share=None)
    import tempfile

    state_dir = tempfile.mkdtemp(prefix="fedmqtt-tp-state-") if args.durable else None
    cfg = AggregatorConfig(topics=topics, limits=Limits(max_staleness=args.max_staleness, admission=unbounded),
                           max_queued=args.max_queued, state_dir=state_dir, workers=args.workers > 0)
    agg = Aggregator(mqtt_connector(BrokerConfig(port=port)), make_params(n_params), strategy, cfg)
    handled: list[float] = []  # completion times of accepted updates
    handle_wall: list[float] = []
    included: dict[str, int] = {}  # update_id -> first version that includes it
    inner = agg.handle

    def timed(topic_agent: str, payload: bytes, combined: bool = False) -> None:
        before, accepted = agg.version, agg.state.counters.accepted
        t = time.perf_counter()
        inner(topic_agent, payload, combined)
        handle_wall.append(time.perf_counter() - t)
        now, added = time.monotonic(), agg.state.counters.accepted - accepted
        if added:
            handled.extend([now] * added)  # a combined update: its k device updates
            meta: Any = codec.read_header(payload)[0]["__metadata__"]
            ids = [u for _, u, _ in json.loads(meta["fedmqtt.members"])] if combined else [meta["fedmqtt.update_id"]]
            for uid in ids:
                included[uid] = before + 1

    agg.handle = timed  # type: ignore[method-assign]
    out, ready, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    up = [ctx.Event() for _ in range(args.workers)]
    workers = [ctx.Process(target=worker_proc, args=(port, topics.federation, n_params, f"w{i}", args.worker_k,
                                                     up[i], stop, out)) for i in range(args.workers)]
    for w in workers:
        w.start()
    for e in up:
        await asyncio.to_thread(e.wait, 60)
    async with agg:
        await agg.wait_connected()
        watch = ctx.Process(target=watcher, args=(port, topics.model, ready, stop, out))
        watch.start()
        await asyncio.to_thread(ready.wait, 10)
        # compile the strategy before the clock starts (one throw-away update through handle)
        start_at = time.monotonic() + 2.0
        pubs = [ctx.Process(target=publisher,
                            args=(port, topics.update(f"p{i}"), f"p{i}", topics.acks(f"p{i}"), n_params, start_at,
                                  args.seconds, args.window, out, args.rate / args.publishers,
                                  not args.default_malloc))
                for i in range(args.publishers)]
        for p in pubs:
            p.start()
        lo, hi = start_at + args.warmup, start_at + args.seconds
        await asyncio.sleep(max(0.0, lo - time.monotonic()))
        cpu0, wall0 = time.process_time(), time.monotonic()
        n0 = len(handled)
        await asyncio.sleep(max(0.0, hi - time.monotonic()))
        cpu1, wall1 = time.process_time(), time.monotonic()
        n1 = len(handled)
        results = [await asyncio.to_thread(out.get, True, args.seconds + 120) for _ in pubs]
        await asyncio.sleep(2.0)  # let the backlog drain and the last models publish
        stop.set()
        reports = [await asyncio.to_thread(out.get, True, 30) for _ in range(1 + len(workers))]
        models = next(r for r in reports if r[0] == "models")[1]
        worker_cpu = sum(r[2] for r in reports if r[0] == "worker")
        metrics = agg.metrics()
    for p in [*pubs, watch, *workers]:
        p.join(10)
    if state_dir is not None:
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)
    sent = {uid: t for r in results for uid, t in r[2]}
    versions = sorted(models)
    latencies = []
    for uid, v in included.items():
        if uid in sent:
            # the first published version >= v (publishes coalesce, so v itself may never appear)
            i = np.searchsorted(versions, v)
            if i < len(versions):
                latencies.append(models[versions[i]] - sent[uid])
    applied = n1 - n0
    return {
        "sent": len(sent), "accepted": agg.state.counters.accepted, "rejected_by_reason": dict(agg.state.counters.rejected),
        "rate": applied / (wall1 - wall0), "window_seconds": wall1 - wall0,
        "cpu_ms_per_update": 1000 * (cpu1 - cpu0) / applied if applied else None,
        "cpu_utilisation": (cpu1 - cpu0) / (wall1 - wall0),
        "workers": args.workers, "worker_k": args.worker_k,
        "worker_cpu_ms_per_update": 1000 * worker_cpu / agg.state.counters.accepted
        if workers and agg.state.counters.accepted else None,
        "handle_ms_mean": 1000 * statistics.fmean(handle_wall) if handle_wall else None,
        "handle_ms_p50": 1000 * (pctl(handle_wall, 0.5) or 0), "handle_ms_p99": 1000 * (pctl(handle_wall, 0.99) or 0),
        "latency_ms_p50": 1000 * (pctl(latencies, 0.5) or 0), "latency_ms_p90": 1000 * (pctl(latencies, 0.9) or 0),
        "latency_ms_p99": 1000 * (pctl(latencies, 0.99) or 0), "latency_samples": len(latencies),
        "versions": agg.version, "models_seen": len(models), "dropped": metrics.dropped,
        "staleness_mean": metrics.staleness_mean, "staleness_max": metrics.staleness_max,
    }


async def run_size(ctx: Any, args: Any, n_params: int) -> dict[str, Any]:
    from fedmqtt import codec
    from fedmqtt.broker import local_broker

    size = len(codec.encode_update(make_params(n_params), agent="p0", update_id=uuid.uuid4().hex,
                                   base_version=0, num_samples=100))
    async with local_broker("mosquitto") as broker:
        port = broker.config.port
        raw = await asyncio.to_thread(run_raw, ctx, port, args, n_params)
        print(f"  raw: {raw['rate']:.0f} msg/s", file=sys.stderr, flush=True)
        agg = await run_aggregator(ctx, port, args, n_params)
        print(f"  aggregator: {agg['rate']:.0f} updates/s", file=sys.stderr, flush=True)
    return {"params": n_params, "payload_bytes": size, "raw": raw, "aggregator": agg,
            "ratio": agg["rate"] / raw["rate"] if raw["rate"] else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--publishers", type=int, default=4)
    p.add_argument("--window", type=int, default=16, help="unacknowledged QoS 1 publishes per publisher")
    p.add_argument("--seconds", type=float, default=10.0, help="publishing time per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds excluded at the start of each phase")
    p.add_argument("--strategy", default="fedbuff")
    p.add_argument("--buffer-size", type=int, default=10)
    p.add_argument("--max-staleness", type=int, default=1_000_000,
                   help="the publishers learn versions from acks, which lag far behind under a saturating flood;"
                        " the cut-off is policy, not capacity, so by default every well-formed update counts")
    p.add_argument("--max-queued", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1, help="repeat each size; the table shows medians")
    p.add_argument("--raw", choices=["mosquitto_sub", "paho"], default="mosquitto_sub",
                   help="the raw phase's subscriber: Mosquitto's C client (default) or a paho loop")
    p.add_argument("--durable", action="store_true", help="the aggregator keeps a state directory (journal, fsync)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="offered load in messages/s over all publishers (0: as fast as the broker takes them)")
    p.add_argument("--workers", type=int, default=0, help="worker processes in front of the aggregator (FedBuff)")
    p.add_argument("--worker-k", type=int, default=16, help="device updates per combined update")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds alone in the aggregator and the publishers "
                        "(`fedmqtt aggregator` tunes them: fedmqtt.allocator)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.params:
        for r in range(args.repeats):
            print(f"{n} parameters, repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
            rows.append(asyncio.run(run_size(ctx, args, n)))
    print(f"{'params':>9s}{'payload':>10s}{'raw/s':>9s}{'agg/s':>9s}{'ratio':>7s}{'cpu ms/u':>9s}"
          f"{'handle ms':>10s}{'lat p50':>9s}{'lat p99':>9s}{'rejected':>10s}")
    for n in args.params:
        rs = [r for r in rows if r["params"] == n]

        def m(f: Any, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.median(f(r) or 0.0 for r in rs)

        print(f"{n:9d}{rs[0]['payload_bytes'] / 1e3:9.0f}K{m(lambda r: r['raw']['rate']):9.0f}"
              f"{m(lambda r: r['aggregator']['rate']):9.0f}{m(lambda r: r['ratio']):7.2f}"
              f"{m(lambda r: r['aggregator']['cpu_ms_per_update']):9.2f}"
              f"{m(lambda r: r['aggregator']['handle_ms_mean']):10.2f}"
              f"{m(lambda r: r['aggregator']['latency_ms_p50']):8.0f}m{m(lambda r: r['aggregator']['latency_ms_p99']):8.0f}m"
              f"{sum(sum(r['aggregator']['rejected_by_reason'].values()) for r in rs):10d}")
    path = args.out / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"benchmark": "throughput", "args": {k: str(v) for k, v in vars(args).items()},
                                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

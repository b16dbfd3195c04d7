"""Time to accuracy and bytes on emulated slow, lossy links: 30 HAPT devices, each behind its own link.

Needs root (network namespaces, TUN). Per configuration and seed it builds an emulated network
(fedmqtt.link_emulator: a hub namespace with Mosquitto and the aggregator, a fleet namespace with the devices,
one link per device with its own rate, delay and loss), starts the hub and the fleet as processes inside
their namespaces, runs for ``--seconds`` from the moment the fleet is warmed up, and records:

- the aggregator's accuracy curve (held-out subjects), accepted updates, staleness;
- per link and direction the IP bytes that crossed (TCP/IP and MQTT overhead and retransmissions included),
  sampled every second, and the packets lost;
- per device the MQTT payload bytes: models received, updates sent;
- CPU seconds of the hub, the fleet and the emulator.

    sudo .venv/bin/python benchmarks/slow_links.py                       # every configuration, 1 seed
    sudo .venv/bin/python benchmarks/slow_links.py --configs float32,topk1 --seconds 120 --seeds 2

It writes ``results/slow-links-<stamp>.json`` and ``.png`` (accuracy against bytes, accuracy against time)
and prints a table of medians over seeds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SELF = str(Path(__file__).resolve())
ROOT = Path(SELF).parents[1]
FEDERATION = "links"
# name: (update compression, model download, model delivery)
CONFIGS = {
    "push-float32": ("none", "float32", "push"),
    "float32": ("none", "float32", "pull"),
    "float16": ("float16", "float16", "pull"),
    "int8": ("int8", "int8", "pull"),
    "topk10": ("topk:10%", "int8", "pull"),
    "topk5": ("topk:5%", "int8", "pull"),
    "topk3": ("topk:3%", "int8", "pull"),
    "topk1": ("topk:1%", "int8", "pull"),
}


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its waited-for children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# ---- the hub: Mosquitto and the aggregator, in the hub namespace ------------------------------------------
async def hub_role(a: argparse.Namespace) -> None:
    from fedmqtt.aggregator import Aggregator, AggregatorConfig
    from fedmqtt.broker import MosquittoProcess
    from fedmqtt.core import Limits
    from fedmqtt.strategies.registry import make
    from fedmqtt.tasks import get_task
    from fedmqtt.topics import Topics
    from fedmqtt.transport import mqtt_connector

    task = get_task(a.task, seed=a.seed)
    trainer = task.trainer(a.seed)
    evaluate = task.evaluate_fn(trainer)
    broker = MosquittoProcess.prepare(a.port, host="0.0.0.0")  # the hub namespace has no other way in
    await broker.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    cfg = AggregatorConfig(topics=Topics(federation=FEDERATION), eval_interval=1.0,
                           limits=Limits(max_staleness=a.max_staleness),
                           model_forms=("float16", "int8"))
    curve: list[dict[str, Any]] = []
    born: dict[int, tuple[float, int]] = {}
    try:
        async with Aggregator(mqtt_connector(broker.config), trainer.initial, make(a.strategy), cfg,
                              evaluate=evaluate) as agg:
            await agg.wait_connected()
            print("ready", flush=True)
            seen: int | None = None
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)
                born.setdefault(agg.version, (time.time(), agg.state.counters.accepted))
                if agg.evaluated_version is not None and agg.evaluated_version != seen:
                    seen = agg.evaluated_version
                    t, accepted = born.get(seen, (time.time(), agg.state.counters.accepted))
                    curve.append({"t": t, "version": seen, "accepted": accepted,
                                  "accuracy": agg.eval.get("accuracy")})
            final = evaluate(agg.numpy_params())
            c = agg.state.counters
            out = {"curve": curve, "final_accuracy": float(final["accuracy"]), "version": agg.version,
                   "accepted": c.accepted, "rejected_by_reason": dict(c.rejected),
                   "staleness": {str(k): v for k, v in sorted(c.staleness.items())},
                   "model_bytes": len(agg.model_payload()),
                   "model_bytes_by_form": {f: len(agg.model_payload(f)) for f in cfg.model_forms},
                   "cpu_seconds": cpu_seconds(os.getpid())}
    finally:
        broker.stop()
    write_json(a.out, out)


# ---- the fleet: every device, in the fleet namespace ------------------------------------------------------
async def fleet_role(a: argparse.Namespace) -> None:
    from dataclasses import replace

    from fedmqtt.agent import AgentConfig
    from fedmqtt.compression import Compression
    from fedmqtt.fleet import Fleet, FleetConfig
    from fedmqtt.link_emulator import EmulatedNetwork
    from fedmqtt.tasks import get_task
    from fedmqtt.topics import Topics
    from fedmqtt.transport import BrokerConfig, ConnectOptions, Connector, Message, Transport, mqtt_connector

    topics = Topics(federation=FEDERATION)
    task = get_task(a.task, seed=a.seed)
    n = task.num_clients
    counts = [{"model_bytes": 0, "models": 0, "update_bytes": 0, "updates": 0, "other_down": 0} for _ in range(n)]

    def counting(i: int) -> Connector:
        inner = mqtt_connector(BrokerConfig(host=EmulatedNetwork.hub_address(i), port=a.port))
        c = counts[i]

        def connect(opts: ConnectOptions) -> Transport:
            handler = opts.on_message

            def on_message(m: Message) -> None:
                if m.topic.startswith(topics.model):
                    c["model_bytes"] += len(m.payload)
                    c["models"] += 1
                else:
                    c["other_down"] += len(m.payload)
                if handler is not None:
                    handler(m)

            t = inner(opts._replace(on_message=on_message))
            publish = t.publish

            async def counted(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
                await publish(topic, payload, qos, retain)
                if "/updates/" in topic:
                    c["update_bytes"] += len(payload)
                    c["updates"] += 1

            t.publish = counted  # type: ignore[method-assign]
            return t
        return connect

    agent = AgentConfig(topics=topics, compression=Compression.parse(a.compression), model_download=a.download,
                        model_delivery=a.delivery, ack_timeout=60.0)
    fleet = Fleet([counting(i) for i in range(n)], task,
                  FleetConfig(agents=n, base_seconds=a.base_seconds, sigma=a.sigma, seed=a.seed, agent=agent))
    fleet.warm_up()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", time.time(), flush=True)
    async with fleet:
        await stop.wait()
        agents = [{"acks": dict(ag.acks), "sent": ag.updates_sent, **counts[i]} for i, ag in enumerate(fleet.agents)]
    write_json(a.out, {"agents": agents, "factors": fleet.factors, "cpu_seconds": cpu_seconds(os.getpid()),
                       "config": replace(fleet.config, agent=agent).conditions()})


# ---- one run: network, hub, fleet -------------------------------------------------------------------------
async def run_one(name: str, seed: int, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from fedmqtt.broker import free_port
    from fedmqtt.link_emulator import EmulatedNetwork, link_mix

    compression, download, delivery = CONFIGS[name]
    mix = {k: float(v) for k, v in (kv.split("=") for kv in a.mix.split(","))}
    net = EmulatedNetwork(link_mix(30, mix, seed), seed=seed)
    port = free_port()
    me = [sys.executable, SELF]
    common = ["--port", str(port), "--seed", str(seed), "--task", a.task]
    hub_out, fleet_out = tmp / f"{name}-{seed}-hub.json", tmp / f"{name}-{seed}-fleet.json"
    series: list[dict[str, Any]] = []
    emulator_cpu0 = cpu_seconds(os.getpid())
    async with net:
        hub = await asyncio.create_subprocess_exec(
            *net.exec_in("hub", [*me, "hub", *common, "--strategy", a.strategy, "--max-staleness",
                                 str(a.max_staleness), "--out", str(hub_out)]), stdout=asyncio.subprocess.PIPE)
        fleet = None
        try:
            assert hub.stdout is not None
            line = await asyncio.wait_for(hub.stdout.readline(), 120)
            if not line.startswith(b"ready"):
                raise RuntimeError(f"hub did not start: {line!r}")
            fleet = await asyncio.create_subprocess_exec(
                *net.exec_in("fleet", [*me, "fleet", *common, "--compression", compression, "--download", download,
                                       "--delivery", delivery, "--base-seconds", str(a.base_seconds),
                                       "--sigma", str(a.sigma), "--out", str(fleet_out)]),
                stdout=asyncio.subprocess.PIPE)
            assert fleet.stdout is not None
            line = await asyncio.wait_for(fleet.stdout.readline(), 300)
            if not line.startswith(b"ready"):
                raise RuntimeError(f"fleet did not start: {line!r}")
            t0 = float(line.split()[1])
            while (now := time.time() - t0) < a.seconds:
                await asyncio.sleep(1.0)
                st = net.stats()
                series.append({"t": round(now, 2), "up": sum(s["up"]["bytes"] for s in st),
                               "down": sum(s["down"]["bytes"] for s in st)})
            links = net.stats()
            emulator_cpu = cpu_seconds(os.getpid()) - emulator_cpu0
        finally:
            for p in (fleet, hub):  # the fleet first: its agents say goodbye before the broker goes
                if p is not None and p.returncode is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        await asyncio.wait_for(p.wait(), 60)
                    except TimeoutError:
                        p.kill()
    h, f = read_json(hub_out), read_json(fleet_out)
    for c in h["curve"]:
        c["t"] = round(c["t"] - t0, 2)
    return {"config": name, "seed": seed, "compression": compression, "download": download, "delivery": delivery,
            "hub": h, "fleet": f, "links": links, "bytes_series": series, "emulator_cpu_seconds": emulator_cpu,
            "seconds": a.seconds}


# ---- analysis ---------------------------------------------------------------------------------------------
def reach(curve: list[dict[str, Any]], target: float) -> float | None:
    return next((c["t"] for c in curve if c["accuracy"] is not None and c["accuracy"] >= target), None)


def summary(r: dict[str, Any], targets: list[float]) -> dict[str, Any]:
    links, agents, h = r["links"], r["fleet"]["agents"], r["hub"]
    n, accepted = len(links), max(h["accepted"], 1)
    up = sum(s["up"]["bytes"] for s in links)
    down = sum(s["down"]["bytes"] for s in links)
    model_size = h["model_bytes"]
    return {
        "final_accuracy": h["final_accuracy"], "accepted": h["accepted"],
        "rejected": sum(h["rejected_by_reason"].values()),
        "up_bytes_per_device": up / n, "down_bytes_per_device": down / n,
        "up_bytes_per_accepted": up / accepted, "down_bytes_per_accepted": down / accepted,
        "update_payload_bytes_per_update": sum(a["update_bytes"] for a in agents) / max(
            sum(a["updates"] for a in agents), 1),
        "model_payload_bytes_per_accepted": sum(a["model_bytes"] for a in agents) / accepted,
        "model_payload_per_accepted_in_models": sum(a["model_bytes"] for a in agents) / accepted / model_size,
        "models_per_accepted": sum(a["models"] for a in agents) / accepted,
        "lost_packets": sum(s["up"]["lost"] + s["down"]["lost"] for s in links),
        "overflow_packets": sum(s["up"]["overflow"] + s["down"]["overflow"] for s in links),
        "cpu_share": (r["hub"]["cpu_seconds"] + r["fleet"]["cpu_seconds"] + r["emulator_cpu_seconds"])
        / (r["seconds"] * (os.cpu_count() or 1)),
        **{f"t_{t:g}": reach(h["curve"], t) for t in targets},
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        if r["seed"] != results[0]["seed"]:
            continue
        curve = [c for c in r["hub"]["curve"] if c["accuracy"] is not None and c["t"] >= 0]
        ts = np.array([c["t"] for c in curve])
        acc = np.array([c["accuracy"] for c in curve])
        st = r["bytes_series"]
        mb = np.interp(ts, [0] + [s["t"] for s in st], [0] + [(s["up"] + s["down"]) / 1e6 for s in st])
        ax1.plot(mb, acc, label=r["config"])
        ax2.plot(ts, acc, label=r["config"])
    ax1.set_xscale("log")
    ax1.set_xlabel("MB crossing the devices' links (up + down, IP bytes)")
    ax2.set_xlabel("seconds")
    for ax in (ax1, ax2):
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.3, 1.0)
        ax.grid(alpha=0.3)
    ax2.legend(loc="lower right")
    fig.suptitle("HAPT, 30 devices on emulated links (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main_role(a: argparse.Namespace) -> None:
    from fedmqtt.link_emulator import EmulatedNetwork

    why = EmulatedNetwork.available()
    if why:
        raise SystemExit(f"cannot emulate links: {why}")
    me = asyncio.current_task()
    assert me is not None
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop the processes and remove the namespaces on the way out
        asyncio.get_running_loop().add_signal_handler(sig, me.cancel)
    os.nice(-5)  # the links must not wait for the CPU behind the devices' training
    out = Path(a.results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tmp = out / f"slow-links-{stamp}"
    tmp.mkdir(parents=True)
    targets = [float(t) for t in a.targets.split(",")]
    print(f"# {' '.join(sys.argv)}\n# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"links {a.mix}; {a.strategy}, base {a.base_seconds} s, sigma {a.sigma}, {a.seconds:.0f} s per run",
          flush=True)
    results: list[dict[str, Any]] = []
    for seed in range(a.seeds):
        for name in a.configs.split(","):
            r = await run_one(name, seed, a, tmp)
            r["summary"] = summary(r, targets)
            results.append(r)
            s = r["summary"]
            print(f"  {name} seed {seed}: accuracy {s['final_accuracy']:.4f}, accepted {s['accepted']}, "
                  + ", ".join(f"t({t:g}) {s[f't_{t:g}']}" for t in targets)
                  + f", up/device {s['up_bytes_per_device'] / 1e6:.2f} MB, down/device "
                  f"{s['down_bytes_per_device'] / 1e6:.2f} MB, models/accepted {s['models_per_accepted']:.2f}, "
                  f"CPU {s['cpu_share']:.0%}", flush=True)
            write_json(out / f"slow-links-{stamp}.json", {"argv": sys.argv, "results": results})
    print("\n| configuration | final accuracy | accepted | "
          + " | ".join(f"time to {t:g} (s)" for t in targets)
          + " | up per device (kB) | down per device (kB) | up per accepted (kB) | down per accepted (kB) "
          "| model payload per accepted (models) | CPU |\n|" + "---|" * (9 + len(targets)))
    for name in a.configs.split(","):
        rows = [r["summary"] for r in results if r["config"] == name]

        def med(key: str, rows: list[dict[str, Any]] = rows) -> float | None:
            vals = [r[key] for r in rows if r[key] is not None]
            return statistics.median(vals) if len(vals) == len(rows) else None

        times = " | ".join(f"{v:.0f}" if (v := med(f"t_{t:g}")) is not None else "not reached" for t in targets)
        print(f"| {name} | {med('final_accuracy'):.4f} | {med('accepted'):.0f} | {times} | "
              f"{med('up_bytes_per_device') / 1e3:,.0f} | {med('down_bytes_per_device') / 1e3:,.0f} | "
              f"{med('up_bytes_per_accepted') / 1e3:.1f} | {med('down_bytes_per_accepted') / 1e3:.1f} | "
              f"{med('model_payload_per_accepted_in_models'):.2f} | {med('cpu_share'):.0%} |")
    plot(results, out / f"slow-links-{stamp}.png")
    print(f"\nwrote {out / f'slow-links-{stamp}.json'} and .png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", nargs="?", default="main", choices=("main", "hub", "fleet"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--task", default="hapt")
    ap.add_argument("--strategy", default="fedasync")
    ap.add_argument("--max-staleness", type=int, default=64)
    ap.add_argument("--base-seconds", type=float, default=1.0, help="median device compute time per round")
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal spread of device speeds")
    ap.add_argument("--mix", default="cellular=0.5,narrowband=0.5",
                    help="link classes and their shares (cellular, narrowband, wifi)")
    ap.add_argument("--targets", default="0.8,0.85")
    ap.add_argument("--results", default=str(ROOT / "results"))
    # hub and fleet processes
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compression", default="none")
    ap.add_argument("--download", default="float32")
    ap.add_argument("--delivery", default="pull")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    role = {"main": main_role, "hub": hub_role, "fleet": fleet_role}[a.role]
    asyncio.run(role(a))


if __name__ == "__main__":
    main()

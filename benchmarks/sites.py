"""Two tiers against one: 2 sites × 10 devices and a root on three Mosquittos bridged together, against the
flat federation (the same 20 devices on one broker), all on this machine.

    nice -n 10 python benchmarks/sites.py                          # HAPT, 20 devices, K = 5, 120 s per run, seeds 0 1
    nice -n 10 python benchmarks/sites.py --task digits --seconds 60 --seeds 0
    nice -n 10 python benchmarks/sites.py --root fedasync fedasync:alpha=0.9 fedbuff:buffer_size=2

Flat: one Mosquitto (the repo's mosquitto.conf on a free loopback port), ``Aggregator`` with the CLI's default
strategy (``fedasync``, alpha 0.6), and a ``Fleet`` of 20 EdgeAgents (lognormal speeds, each local round padded
to ``base_seconds × fᵢ``, so that the fleet is paced by its emulated devices rather than by this machine's CPUs).

Two tiers: a root Mosquitto with the same aggregator, and two site Mosquittos each bridged to it with
``fedmqtt.bridge.bridge_config`` (as tests/test_site.py starts them); on each site broker a ``Site`` (K =
``--k`` local updates per upstream update) and 10 of the devices: devices 0-9 at site-a, 10-19 at site-b,
the same agents as in the flat run (same seed: the same data partition, speeds and model initialisation).
``--root`` lists the root strategies to try in the two-tier setup (``name[:option=value,...]``, the names of
``fedmqtt.strategies.registry``); the flat run always uses ``--flat`` (default ``fedasync``).

Both setups run for the same wall time, one after the other. Measured, at the end of the window:
- accuracy of the root's model on the task's test set (``task.evaluate_fn``): final, and the median of the
  evaluations in the last quarter of the window (FedAsync's curve is noisy); the accuracy curve (the root
  evaluates every ``--eval-every`` s) and the time to each ``--targets`` accuracy;
- updates the root applied; local updates the sites applied (Σ ``site.local_accepted``) and combined updates
  (Σ ``site.acked_up``): one upstream per K local;
- update payload bytes that reached the root broker: a client on the root broker subscribed to
  ``{base}/updates/+`` sums the payload lengths (flat: every device update; two tiers: the combined ones);
- model bytes downstream: flat, the models the devices took from the root broker (counted at each agent's
  connection); two tiers, the models the bridges delivered to the site brokers (a client on each site broker
  subscribed to the model topic), next to the models the devices took from their site broker (local traffic);
- CPU: this process's CPU seconds and the brokers' (from /proc) over the window, as a share of the machine's
  CPUs, the load average, and the fleet's pace (local rounds done / rounds its padding allows: near 1 means
  the devices, not the CPUs, set the pace).

Prints markdown tables (per run, and medians over seeds per setup) and writes results/sites-<task>-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from slow_links import cpu_seconds  # benchmarks/ is on sys.path when a script in it runs
from time_to_accuracy import Curve, machine

from fedmqtt import codec
from fedmqtt.admission import AdmissionLimits
from fedmqtt.agent import AgentConfig
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.bridge import bridged_brokers
from fedmqtt.broker import has_mosquitto
from fedmqtt.core import Limits
from fedmqtt.errors import CodecError
from fedmqtt.fleet import Fleet, FleetConfig, speed_factors
from fedmqtt.site import Site, SiteConfig
from fedmqtt.strategies.base import Strategy
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import Task, get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import ConnectOptions, Connector, Message, mqtt_connector

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-a", "site-b")


# ---- strategies by spec ---------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``fedasync:alpha=0.9`` -> ("fedasync", {"alpha": 0.9}); values are int, float, bool or str."""
    name, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        value: Any = raw
        for conv in (int, float):
            try:
                value = conv(raw)
                break
            except ValueError:
                continue
        if raw in ("true", "false"):
            value = raw == "true"
        opts[key.replace("-", "_")] = value
    return name, opts


def strategy_of(spec: str) -> Strategy:
    name, opts = parse_spec(spec)
    return make(name, **opts)


# ---- brokers and counters -------------------------------------------------------------------------------
class Tally:
    """Payload bytes and messages, by the last topic level; with ``bases``, each update's base version."""

    def __init__(self, bases: bool = False) -> None:
        self.bytes = self.msgs = 0
        self.by_sender: dict[str, int] = {}
        self.bases: dict[str, int] | None = {} if bases else None

    def __call__(self, m: Message) -> None:
        self.bytes += len(m.payload)
        self.msgs += 1
        sender = m.topic.rsplit("/", 1)[-1]
        self.by_sender[sender] = self.by_sender.get(sender, 0) + 1
        if self.bases is not None and (key := update_key(m.payload)) is not None:
            self.bases.setdefault(key[1], key[2])

    def snapshot(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "messages": self.msgs, "by_sender": dict(sorted(self.by_sender.items()))}


def counting_models(connect: Connector, topic: str, tally: Tally) -> Connector:
    """``connect``, with every model message the connection receives counted in ``tally``."""
    def wrapped(opts: ConnectOptions) -> Any:
        handler = opts.on_message

        def count(m: Message) -> None:
            if m.topic == topic:
                tally.bytes += len(m.payload)
                tally.msgs += 1
            if handler is not None:
                handler(m)

        return connect(opts._replace(on_message=count))
    return wrapped


def update_key(payload: bytes) -> tuple[str, str, int] | None:
    """(agent, update id, base version) from an update's header, or None if unreadable."""
    try:
        meta = codec.header_metadata(codec.read_header(payload)[0])
        return meta["fedmqtt.agent"], meta["fedmqtt.update_id"], int(meta["fedmqtt.base_version"])
    except (CodecError, KeyError, ValueError):
        return None


def observing_site(connect: Connector, topics: Topics, site_id: str, sites: dict[str, Site],
                   arrivals: dict[tuple[str, str], int]) -> Connector:
    """``connect`` for a Site, noting the global version the site holds when each local update reaches it
    (the version its staleness weight is taken against; the site handles the message right after this)."""
    def wrapped(opts: ConnectOptions) -> Any:
        handler = opts.on_message

        def note(m: Message) -> None:
            agent = topics.agent_of_update(m.topic)
            site = sites.get(site_id)
            if site is not None and agent not in (None, site_id) and not m.retain and (key := update_key(m.payload)):
                arrivals.setdefault((key[0], key[1]), site.version)
            if handler is not None:
                handler(m)

        return connect(opts._replace(on_message=note))
    return wrapped


def buffer_staleness(ledgers: list[Path], combined_bases: dict[str, int], arrivals: dict[tuple[str, str], int],
                     weight: Callable[[int], Any]) -> dict[str, Any]:
    """For every local update in a combined update that reached the root: its staleness when it reached the
    site and when it was combined (what the site weighs it by: the version the combined update is based on,
    which the root's staleness is counted from), and the ratio of the two weights (how much weighing on
    arrival would have over-weighed it)."""
    gaps, ratios, at_arrival, at_combine = [], [], [], []
    for ledger in ledgers:
        if not ledger.exists():
            continue
        for line in ledger.read_text().splitlines():
            r = json.loads(line)
            if "members" not in r or r["id"] not in combined_bases:
                continue
            base = combined_bases[r["id"]]
            for agent, update_id, member_base in r["members"]:
                arrived = arrivals.get((agent, update_id))
                if arrived is None:
                    continue
                at_arrival.append(arrived - member_base)
                at_combine.append(base - member_base)
                gaps.append(base - arrived)
                ratios.append(float(weight(arrived - member_base)) / float(weight(base - member_base)))
    if not gaps:
        return {}
    return {"members": len(gaps), "staleness_at_arrival_mean": statistics.mean(at_arrival),
            "staleness_at_combine_mean": statistics.mean(at_combine),
            "versions_in_buffer_mean": statistics.mean(gaps), "versions_in_buffer_max": max(gaps),
            "share_with_versions_in_buffer": sum(g > 0 for g in gaps) / len(gaps),
            "weight_ratio_mean": statistics.mean(ratios), "weight_ratio_max": max(ratios)}


@contextlib.asynccontextmanager
async def listening(connect: Connector, client_id: str, topic: str, tally: Tally) -> AsyncIterator[None]:
    async with connect(ConnectOptions(client_id, on_message=tally)) as t:
        await t.subscribe(topic, qos=1)
        yield


# ---- one run --------------------------------------------------------------------------------------------
async def run_one(setup: str, strategy_spec: str, seed: int, task: Task, a: argparse.Namespace,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """``setup``: "flat" or "sites"."""
    two_tier = setup == "sites"
    strategy = strategy_of(strategy_spec)
    topics = Topics(federation=f"sites-bench-{setup}-{seed}")
    evaluator = task.trainer(seed)
    evaluate = task.evaluate_fn(evaluator)
    initial = evaluator.initial
    evaluate(initial)  # compile the evaluation before the clock starts
    fleet_cfg = FleetConfig(agents=a.devices, base_seconds=a.base_seconds, sigma=a.sigma, seed=seed,
                            local_steps=a.local_steps, agent=AgentConfig(topics=topics))
    # the root names its sites (fedmqtt aggregator --sites): no per-device share bound for them
    limits = Limits(admission=AdmissionLimits(exempt=frozenset(SITES))) if two_tier else Limits()
    agg_cfg = AggregatorConfig(topics=topics, eval_interval=a.eval_every, limits=limits)
    up, bridged = Tally(bases=True), {s: Tally() for s in SITES}
    arrivals: dict[tuple[str, str], int] = {}
    device_models = Tally()
    recorder = Curve()
    curve = recorder.points
    state_root = Path(tempfile.mkdtemp(prefix="fedmqtt-bench-site-state-"))
    sites: dict[str, Site] = {}
    try:
        async with bridged_brokers(topics, SITES if two_tier else ()) as (root, procs), contextlib.AsyncExitStack() as stack:
            root_connect = mqtt_connector(root.config)
            await stack.enter_async_context(listening(root_connect, "bench-upstream-counter",
                                                      topics.updates_wildcard, up))
            for s, p in procs.items():  # before the aggregator publishes: every model the bridge carries
                await stack.enter_async_context(listening(mqtt_connector(p.config), f"bench-model-counter-{s}",
                                                          topics.model, bridged[s]))
            agg = await stack.enter_async_context(Aggregator(root_connect, initial, strategy, agg_cfg,
                                                             evaluate=evaluate))
            await agg.wait_connected()
            if two_tier:
                per_site = a.devices // len(SITES)
                connects: list[Connector] = []
                for i, s in enumerate(SITES):
                    site_connect = mqtt_connector(procs[s].config)
                    sites[s] = await stack.enter_async_context(Site(
                        observing_site(site_connect, topics, s, sites, arrivals), initial,
                        SiteConfig(s, topics, buffer_size=a.k, state_dir=state_root / s)))
                    n = per_site if i < len(SITES) - 1 else a.devices - per_site * (len(SITES) - 1)
                    connects += [counting_models(site_connect, topics.model, device_models)] * n
                deadline = time.monotonic() + 30
                while any(site.version < 0 for site in sites.values()):  # the model crossed both bridges
                    if time.monotonic() > deadline:
                        raise TimeoutError("the global model did not reach the sites through the bridges")
                    await asyncio.sleep(0.05)
                fleet = Fleet(connects, task, fleet_cfg)
            else:
                fleet = Fleet(counting_models(root_connect, topics.model, device_models), task, fleet_cfg)
            fleet.warm_up()
            pids = [p.process.pid for p in (root, *procs.values()) if p.process is not None]
            async with fleet:
                t0, cpu0 = time.monotonic(), time.process_time()
                broker_cpu0 = sum(cpu_seconds(pid) for pid in pids)
                start: dict[str, Any] = {"up": up.snapshot(), "bridged": sum(t.bytes for t in bridged.values()),
                         "device_models": device_models.bytes}
                recorder.start(agg)
                last_log = 0.0
                while (now := time.monotonic() - t0) < a.seconds:
                    await asyncio.sleep(0.05)
                    recorder.tick(agg, now)
                    if now - last_log > 20:
                        last_log = now
                        acc = recorder.last_accuracy
                        local = sum(s.local_accepted for s in sites.values())
                        log(f"  [{setup} {strategy_spec} seed {seed}] {now:5.0f}s root v{agg.version} "
                            f"applied {agg.state.counters.accepted}" + (f", local {local}" if two_tier else "")
                            + f", accuracy {acc:.4f}")
                # the end of the window: everything is read here, before the fleet stops
                wall = time.monotonic() - t0
                cpu = time.process_time() - cpu0
                broker_cpu = sum(cpu_seconds(pid) for pid in pids) - broker_cpu0
                load = os.getloadavg()
                final_params = agg.numpy_params()
                version, applied = agg.version, agg.state.counters.accepted
                rejected = dict(agg.state.counters.rejected)
                staleness = dict(agg.state.counters.staleness)
                sent, acks = fleet.updates_sent, fleet.acks
                up_end = up.snapshot()
                bridged_end = {s: t.snapshot() for s, t in bridged.items()}
                device_models_end = {"bytes": device_models.bytes, "messages": device_models.msgs}
                site_stats = {s: {"version": site.version, "local_accepted": site.local_accepted,
                                  "local_rejected": site.local_rejected, "sent_up": site.sent_up,
                                  "acked_up": site.acked_up, "upstream_refused": site.upstream_refused,
                                  "bytes_up": site.bytes_up, "buffered": len(site.buffer),
                                  "pending": len(site.pending)}
                              for s, site in sites.items()}
                factors = fleet.factors
                combined_bases = dict(up.bases or {})
        buffered = buffer_staleness([state_root / s / "ledger.jsonl" for s in sites], combined_bases, arrivals,
                                    SiteConfig("x").staleness) if two_tier else None
    finally:
        shutil.rmtree(state_root, ignore_errors=True)
    final = evaluate(final_params)
    tail = [c["accuracy"] for c in curve if c["t_eval"] >= 0.75 * a.seconds and c["accuracy"] is not None]
    allowed = sum(wall / (a.base_seconds * f) for f in factors)  # rounds the padding alone would allow
    local = sum(s["local_accepted"] for s in site_stats.values()) if two_tier else applied
    up_bytes = up_end["bytes"] - start["up"]["bytes"]
    up_msgs = up_end["messages"] - start["up"]["messages"]
    return {
        "setup": setup, "strategy": strategy_spec, "seed": seed, "k": a.k if two_tier else None,
        "seconds": round(wall, 2), "curve": curve,
        "final_accuracy": float(final["accuracy"]), "final_loss": float(final["loss"]),
        "tail_accuracy": float(statistics.median(tail)) if tail else None,
        "best_accuracy": max((c["accuracy"] for c in curve if c["accuracy"] is not None), default=None),
        "time_to": {f"{t:.2f}": next((c["t"] for c in curve if c["accuracy"] is not None and c["accuracy"] >= t),
                                     None) for t in a.targets},
        "root_version": version, "root_applied": applied, "root_rejected": rejected,
        "root_staleness": {str(k): v for k, v in sorted(staleness.items())},
        "root_staleness_mean": (sum(k * v for k, v in staleness.items()) / max(1, sum(staleness.values()))),
        "local_updates_applied": local, "device_updates_sent": sent, "device_acks": acks,
        "sites": site_stats, "site_buffer_staleness": buffered,
        "upstream_bytes": up_bytes, "upstream_messages": up_msgs, "upstream_by_sender": up_end["by_sender"],
        "upstream_bytes_per_local_update": up_bytes / local if local else None,
        "bridge_model_bytes": sum(b["bytes"] for b in bridged_end.values()) if two_tier else None,
        "bridge_model_messages": {s: b["messages"] for s, b in bridged_end.items()} if two_tier else None,
        "device_model_bytes": device_models_end["bytes"] - start["device_models"],
        "device_model_messages": device_models_end["messages"],
        "downstream_model_bytes": (sum(b["bytes"] for b in bridged_end.values()) if two_tier
                                   else device_models_end["bytes"]),
        "cpu_seconds_process": round(cpu, 2), "cpu_seconds_brokers": round(broker_cpu, 2),
        "cpu_share": round((cpu + broker_cpu) / wall / (os.cpu_count() or 1), 3),
        "loadavg_end": [round(x, 2) for x in load],
        "fleet_pace": round(sent / allowed, 3) if allowed else None,
    }


# ---- summary --------------------------------------------------------------------------------------------
def med(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals and len(vals) == len(values) else None


def label(r: dict[str, Any]) -> str:
    return f"flat ({r['strategy']})" if r["setup"] == "flat" else f"2 sites, K={r['k']} (root {r['strategy']})"


def fmt(v: float | None, spec: str, scale: float = 1.0, none: str = "—") -> str:
    return none if v is None else format(v / scale, spec)


def summarise(runs: list[dict[str, Any]], a: argparse.Namespace) -> dict[str, Any]:
    flat = {r["seed"]: r for r in runs if r["setup"] == "flat"}
    for r in runs:  # per seed, against the flat run of the same seed
        f = flat.get(r["seed"])
        if f is None:
            continue
        r["vs_flat"] = {
            "final_accuracy_points": round(100 * (r["final_accuracy"] - f["final_accuracy"]), 2),
            "tail_accuracy_points": (round(100 * (r["tail_accuracy"] - f["tail_accuracy"]), 2)
                                     if r["tail_accuracy"] is not None and f["tail_accuracy"] is not None else None),
            "upstream_bytes_reduction": f["upstream_bytes"] / r["upstream_bytes"] if r["upstream_bytes"] else None,
            "upstream_bytes_per_local_update_reduction": (
                f["upstream_bytes_per_local_update"] / r["upstream_bytes_per_local_update"]
                if r["upstream_bytes_per_local_update"] else None),
            "downstream_bytes_reduction": (f["downstream_model_bytes"] / r["downstream_model_bytes"]
                                           if r["downstream_model_bytes"] else None),
        }
    table: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(label(r) for r in runs):
        rs = [r for r in runs if label(r) == name]
        row: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
        for key in ("final_accuracy", "tail_accuracy", "best_accuracy", "root_applied", "local_updates_applied",
                    "device_updates_sent", "upstream_bytes", "upstream_messages", "downstream_model_bytes",
                    "cpu_share", "fleet_pace", "root_staleness_mean"):
            row[key] = med([r[key] for r in rs])
        for t in a.targets:
            row[f"t_{t:.2f}"] = med([r["time_to"][f"{t:.2f}"] for r in rs])
        for key in ("final_accuracy_points", "tail_accuracy_points", "upstream_bytes_reduction",
                    "upstream_bytes_per_local_update_reduction", "downstream_bytes_reduction"):
            row[key] = med([r.get("vs_flat", {}).get(key) for r in rs])
        table[name] = row
    return table


def print_tables(runs: list[dict[str, Any]], table: dict[str, dict[str, Any]], a: argparse.Namespace) -> None:
    targets = [f"{t:.2f}" for t in a.targets]
    print("\nPer run (at the end of the window)\n")
    print("| setup | seed | final acc | last-quarter acc | " + " | ".join(f"t→{t} (s)" for t in targets)
          + " | root applied | local applied | upstream msgs | upstream MB | upstream ÷ | ÷ per local update "
          "| downstream model MB | CPU share | fleet pace |")
    print("|---|---:|---:|---:|" + "---:|" * len(targets) + "---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        v = r.get("vs_flat", {})
        print(f"| {label(r)} | {r['seed']} | {r['final_accuracy']:.4f} | {fmt(r['tail_accuracy'], '.4f')} | "
              + " | ".join(fmt(r["time_to"][t], ".0f", none="not reached") for t in targets)
              + f" | {r['root_applied']} | {r['local_updates_applied']} | {r['upstream_messages']} | "
              f"{r['upstream_bytes'] / 1e6:.2f} | {fmt(v.get('upstream_bytes_reduction'), '.2f')} | "
              f"{fmt(v.get('upstream_bytes_per_local_update_reduction'), '.2f')} | "
              f"{r['downstream_model_bytes'] / 1e6:.2f} | {r['cpu_share']:.0%} | {r['fleet_pace']:.2f} |")
    print("\nMedians over seeds; Δ: points of accuracy against the flat run of the same seed\n")
    print("| setup | seeds | final acc | Δ final | last-quarter acc | Δ last quarter | "
          + " | ".join(f"t→{t} (s)" for t in targets)
          + " | root applied | local applied | upstream MB | upstream ÷ | ÷ per local update | downstream ÷ |")
    print("|---|---|---:|---:|---:|---:|" + "---:|" * len(targets) + "---:|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        print(f"| {name} | {','.join(map(str, row['seeds']))} | {fmt(row['final_accuracy'], '.4f')} | "
              f"{fmt(row['final_accuracy_points'], '+.2f')} | {fmt(row['tail_accuracy'], '.4f')} | "
              f"{fmt(row['tail_accuracy_points'], '+.2f')} | "
              + " | ".join(fmt(row[f"t_{t}"], ".0f", none="not reached") for t in targets)
              + f" | {fmt(row['root_applied'], '.0f')} | {fmt(row['local_updates_applied'], '.0f')} | "
              f"{fmt(row['upstream_bytes'], '.2f', 1e6)} | {fmt(row['upstream_bytes_reduction'], '.2f')} | "
              f"{fmt(row['upstream_bytes_per_local_update_reduction'], '.2f')} | "
              f"{fmt(row['downstream_bytes_reduction'], '.2f')} |")
    tiers = [r for r in runs if r.get("site_buffer_staleness")]
    if tiers:
        print("\nTwo tiers: local updates in combined updates the root received; staleness in global versions\n")
        print("| setup | seed | local updates | staleness on arrival at the site | staleness at combine (weighed) | "
              "versions while buffered (mean, max) | share with ≥ 1 | weight on arrival ÷ weight at combine (mean, max) "
              "| root staleness of combined updates (mean) | K·acked = local? |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in tiers:
            b = r["site_buffer_staleness"]
            k_ok = all(x["local_accepted"] == r["k"] * x["acked_up"] for x in r["sites"].values())
            print(f"| {label(r)} | {r['seed']} | {b['members']} | {b['staleness_at_arrival_mean']:.2f} | "
                  f"{b['staleness_at_combine_mean']:.2f} | {b['versions_in_buffer_mean']:.2f}, "
                  f"{b['versions_in_buffer_max']} | {b['share_with_versions_in_buffer']:.0%} | "
                  f"{b['weight_ratio_mean']:.2f}, {b['weight_ratio_max']:.2f} | {r['root_staleness_mean']:.2f} | "
                  f"{'yes' if k_ok else 'NO'} |")
    print("\nupstream: update payloads that reached the root broker; ÷: flat ÷ two tiers (same seed); per local "
          "update: upstream bytes ÷ local updates applied (flat: the root's applied updates). downstream: models "
          "the devices took from the root (flat) or the bridges carried to the sites (two tiers). CPU share: "
          "this process + the brokers, of all CPUs. fleet pace: local rounds sent ÷ rounds the padding allows.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="hapt", help="hapt (six classes, one volunteer per device) or digits")
    p.add_argument("--devices", type=int, default=20, help="devices in all; two tiers: half at each site")
    p.add_argument("--k", type=int, default=5, help="site buffer size K: local updates per upstream update")
    p.add_argument("--seconds", type=float, default=120.0, help="wall time of each run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--flat", default="fedasync", help="the flat aggregator's strategy (default: the CLI's)")
    p.add_argument("--root", nargs="+", default=["fedasync"],
                   help="root strategies for the two tiers, name[:option=value,...], e.g. fedasync:alpha=0.9")
    p.add_argument("--sigma", type=float, default=0.75, help="lognormal spread of device speed factors")
    p.add_argument("--base-seconds", type=float, default=1.0, help="median seconds per local round (padding)")
    p.add_argument("--local-steps", type=int, default=None, help="E; default: the task's own")
    p.add_argument("--eval-every", type=float, default=2.0, help="seconds between the root's evaluations")
    p.add_argument("--targets", type=float, nargs="*", default=None, help="accuracy targets for time-to")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    a = p.parse_args(argv)
    if a.targets is None:
        a.targets = [0.80, 0.85, 0.90] if a.task.startswith("hapt") else [0.85, 0.90, 0.95]
    if not has_mosquitto():
        raise SystemExit("needs the mosquitto binary (three brokers, two of them bridged)")
    for spec in (a.flat, *a.root):
        strategy_of(spec)  # a misspelt option fails now, not after the first run
    logging.basicConfig(level=logging.ERROR)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = a.out / f"sites-{a.task}-{stamp}.json"
    print(f"# {' '.join(sys.argv)}\n# {os.cpu_count()} CPUs; {a.task}, {a.devices} devices (flat) or "
          f"{len(SITES)} sites × {a.devices // len(SITES)} (K = {a.k}), {a.seconds:.0f} s per run, sigma {a.sigma}, "
          f"base {a.base_seconds} s, seeds {a.seeds}", flush=True)
    runs: list[dict[str, Any]] = []
    conditions: dict[str, Any] = {}
    started = time.monotonic()
    info = machine()  # at the start: the commit the run imported, and whether src/ differed from it
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "mosquitto.conf"],
                            capture_output=True, text=True, check=False).stdout
    info["git_dirty_src"] = bool(status.strip())
    for seed in a.seeds:
        task = get_task(a.task, num_clients=a.devices, seed=seed)
        if task.num_clients < a.devices:
            raise SystemExit(f"{a.task} has {task.num_clients} clients, fewer than --devices {a.devices}")
        conditions[str(seed)] = {"speed_factors": [round(f, 4) for f in speed_factors(a.devices, a.sigma, seed)],
                                 "local_steps": a.local_steps or task.local_steps,
                                 "learning_rate": task.learning_rate, "batch_size": task.batch_size}
        for setup, spec in [("flat", a.flat)] + [("sites", s) for s in a.root]:
            log(f"run {setup} ({spec}) seed {seed}: {a.task}, {a.devices} devices, {a.seconds:.0f} s")
            r = asyncio.run(run_one(setup, spec, seed, task, a, log))
            log(f"  -> final {r['final_accuracy']:.4f} (last quarter {fmt(r['tail_accuracy'], '.4f')}), root applied "
                f"{r['root_applied']}, local {r['local_updates_applied']}, upstream {r['upstream_messages']} msgs "
                f"{r['upstream_bytes'] / 1e6:.2f} MB, CPU {r['cpu_share']:.0%}, pace {r['fleet_pace']:.2f}"
                + (f", sites {r['sites']}" if r["sites"] else ""))
            runs.append(r)
            table = summarise(runs, a)
            result = {"benchmark": "sites", "argv": sys.argv,
                      "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                      "conditions_by_seed": conditions, "machine": info,
                      "wall_seconds_total": round(time.monotonic() - started, 1), "summary": table, "runs": runs}
            path.write_text(json.dumps(result, indent=1))
    print_tables(runs, summarise(runs, a), a)
    print(f"\nwrote {path} ({time.monotonic() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

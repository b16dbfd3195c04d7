"""Time to accuracy: synchronous FedAvg against FedAsync (constant, polynomial, hinge) and FedBuff.

Every run starts its own Mosquitto (the repo's mosquitto.conf on a free loopback port), the aggregator and a
fleet of agents in this process (asyncio tasks, one MQTT connection per agent), under identical conditions:
the same task, partition, model seed, device speeds (seeded lognormal), churn schedule and duration.

    python benchmarks/time_to_accuracy.py                 # HAPT six-class, 30 agents, sigma 1, base 0.5 s
    python benchmarks/time_to_accuracy.py --quick         # digits, about three minutes

Per strategy and seed it records the accuracy curve (wall time, version, accepted updates), wall time and
updates to reach each target (the synchronous FedAvg plateau minus 2 points, and fixed targets), bytes
published and delivered, final and best accuracy, and the staleness distribution. It writes
``results/tta-<stamp>.json`` and ``.png`` and prints a table of medians over seeds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.broker import local_broker
from fedmqtt.core import Limits, Timing
from fedmqtt.fleet import Fleet, FleetConfig, speed_factors
from fedmqtt.strategies.registry import applicable, make
from fedmqtt.tasks import Task, get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import ConnectOptions, Connector, Message, Transport, mqtt_connector

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("fedavg", "fedasync-constant", "fedasync-polynomial", "fedasync-hinge", "fedbuff")


# ---- counting bytes at every client -----------------------------------------------------------------
@dataclass
class ByteCounter:
    published: int = 0
    published_msgs: int = 0
    delivered: int = 0  # to the agents (models, acks): what devices download
    delivered_msgs: int = 0
    delivered_to_aggregator: int = 0  # updates and presence
    by_role: dict[str, int] = field(default_factory=dict)


class CountingTransport:
    """Wraps a transport and counts payload bytes it publishes and receives."""

    def __init__(self, inner: Transport, counter: ByteCounter, role: str) -> None:
        self._inner, self._c, self._role = inner, counter, role

    async def __aenter__(self) -> Self:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._inner.__aexit__(et, e, tb)

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        await self._inner.publish(topic, payload, qos, retain)
        self._c.published += len(payload)
        self._c.published_msgs += 1
        self._c.by_role[self._role] = self._c.by_role.get(self._role, 0) + len(payload)

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        await self._inner.subscribe(topic, qos)

    async def unsubscribe(self, topic: str) -> None:
        await self._inner.unsubscribe(topic)

    async def peek(self, topic: str, qos: int = 1) -> None:
        await self._inner.peek(topic, qos)

    async def closed(self) -> None:
        await self._inner.closed()


def counting(connect: Connector, counter: ByteCounter) -> Connector:
    def wrapped(opts: ConnectOptions) -> Transport:
        role = "aggregator" if "aggregator" in opts.client_id else "agents"
        handler = opts.on_message

        def count(m: Message) -> None:
            if role == "agents":
                counter.delivered += len(m.payload)
                counter.delivered_msgs += 1
            else:
                counter.delivered_to_aggregator += len(m.payload)
            if handler is not None:
                handler(m)

        return CountingTransport(connect(opts._replace(on_message=count)), counter, role)  # type: ignore[return-value]
    return wrapped


# ---- one run --------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    strategy: str
    seed: int
    task: str
    agents: int
    seconds: float
    fleet: FleetConfig
    max_staleness: int
    buffer_size: int
    alpha: float
    server_lr: float
    round_fraction: float | None
    round_deadline: float | None
    eval_interval: float


def build_task(name: str, agents: int, seed: int) -> Task:
    if name == "digits":
        return get_task("digits", num_clients=agents, seed=seed)
    return get_task(name, seed=seed)


class Curve:
    """The aggregator's accuracy curve: each evaluated version with the time it first appeared and the
    updates accepted by then. ``tick`` every few tens of milliseconds while the fleet runs."""

    def __init__(self) -> None:
        self.points: list[dict[str, Any]] = []
        self.born: dict[int, tuple[float, int]] = {}  # version -> (seconds since start when first seen, accepted)
        self._seen_eval: int | None = None

    def start(self, agg: Aggregator) -> None:
        self.born[agg.version] = (0.0, 0)

    def tick(self, agg: Aggregator, now: float) -> None:
        self.born.setdefault(agg.version, (now, agg.state.counters.accepted))
        if agg.evaluated_version is not None and agg.evaluated_version != self._seen_eval:
            self._seen_eval = agg.evaluated_version
            t_v, n_v = self.born.get(self._seen_eval, (now, agg.state.counters.accepted))
            self.points.append({"t": round(t_v, 3), "t_eval": round(now, 3), "version": self._seen_eval,
                                "accepted": n_v, "accuracy": agg.eval.get("accuracy"), "loss": agg.eval.get("loss")})

    @property
    def last_accuracy(self) -> float:
        return self.points[-1]["accuracy"] if self.points else float("nan")


async def run_one(spec: RunSpec, task: Task, log: Callable[[str], None]) -> dict[str, Any]:
    strategy = make(spec.strategy, **applicable(spec.strategy, alpha=spec.alpha, buffer_size=spec.buffer_size,
                                                server_lr=spec.server_lr))
    counter = ByteCounter()
    topics = Topics(federation=f"tta-{spec.strategy}-{spec.seed}")
    fleet_cfg = replace(spec.fleet, agent=replace(spec.fleet.agent, topics=topics))
    evaluator = task.trainer(spec.seed)
    evaluate = task.evaluate_fn(evaluator)
    agg_cfg = AggregatorConfig(topics=topics, limits=Limits(max_staleness=spec.max_staleness),
                               eval_interval=spec.eval_interval,
                               timing=Timing(round_fraction=spec.round_fraction, round_deadline=spec.round_deadline))
    recorder = Curve()
    curve = recorder.points
    async with local_broker("mosquitto") as broker:
        connect = counting(mqtt_connector(broker.config), counter)
        async with Aggregator(connect, evaluator.initial, strategy, agg_cfg, evaluate=evaluate) as agg:
            await agg.wait_connected()
            fleet = Fleet(connect, task, fleet_cfg)
            fleet.warm_up()
            async with fleet:
                t0 = time.monotonic()
                recorder.start(agg)
                last_log = 0.0
                while (now := time.monotonic() - t0) < spec.seconds:
                    await asyncio.sleep(0.05)
                    recorder.tick(agg, now)
                    if now - last_log > 15:
                        last_log = now
                        acc = recorder.last_accuracy
                        log(f"  [{spec.strategy} seed {spec.seed}] {now:5.0f}s version {agg.version} "
                            f"accepted {agg.state.counters.accepted} accuracy {acc:.4f}")
                sent, acks = fleet.updates_sent, fleet.acks
                departures, offline_s = fleet.departures, fleet.offline_seconds
            final_params = agg.numpy_params()
            final = evaluate(final_params)
            m = agg.metrics()
    stal = sorted(k for k, v in agg.state.counters.staleness.items() for _ in range(v))

    def pct(q: float) -> int | None:
        return stal[min(len(stal) - 1, int(q * len(stal)))] if stal else None

    return {
        "strategy": spec.strategy, "seed": spec.seed, "mode": strategy.mode,
        "curve": curve, "final_accuracy": float(final["accuracy"]), "final_loss": float(final["loss"]),
        "best_accuracy": max((c["accuracy"] for c in curve if c["accuracy"] is not None), default=None),
        "version": agg.version, "accepted": agg.state.counters.accepted, "rejected_by_reason": dict(agg.state.counters.rejected),
        "updates_sent": sent, "acks": acks, "churn_departures": departures,
        "churn_offline_seconds": round(offline_s, 1),
        "bytes_published": counter.published, "messages_published": counter.published_msgs,
        "bytes_published_by_role": counter.by_role,
        "bytes_delivered": counter.delivered, "bytes_delivered_to_aggregator": counter.delivered_to_aggregator, "messages_delivered": counter.delivered_msgs,
        "staleness_hist": {str(k): v for k, v in sorted(agg.state.counters.staleness.items())},
        "staleness_mean": m.staleness_mean, "staleness_p50": pct(0.5), "staleness_p90": pct(0.9),
        "staleness_max": m.staleness_max, "dropped": m.dropped,
    }


# ---- analysis -------------------------------------------------------------------------------------------
def plateau(curve: list[dict[str, Any]], seconds: float, tail: float = 0.25) -> float:
    """Median accuracy over the last ``tail`` of the run (the run must be long enough to plateau)."""
    pts = [c["accuracy"] for c in curve if c["t_eval"] >= (1 - tail) * seconds and c["accuracy"] is not None]
    if not pts:
        pts = [c["accuracy"] for c in curve[-3:] if c["accuracy"] is not None]
    return float(statistics.median(pts))


def reach(curve: list[dict[str, Any]], target: float) -> tuple[float | None, int | None]:
    """(seconds, accepted updates) when an evaluated model first reached ``target``, or (None, None)."""
    for c in curve:
        if c["accuracy"] is not None and c["accuracy"] >= target:
            return c["t"], c["accepted"]
    return None, None


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if len(vals) == len(values) and vals else None


def summarise(runs: list[dict[str, Any]], seconds: float, fixed: list[float]) -> dict[str, Any]:
    seeds = sorted({r["seed"] for r in runs})
    targets_by_seed: dict[int, float] = {}
    for s in seeds:
        sync = [r for r in runs if r["seed"] == s and r["strategy"] == "fedavg"]
        if sync:
            targets_by_seed[s] = round(plateau(sync[0]["curve"], seconds) - 0.02, 4)
    for r in runs:
        goal = targets_by_seed.get(r["seed"])
        r["targets"] = {}
        if goal is not None:
            t, n = reach(r["curve"], goal)
            r["targets"]["sync_plateau_minus_2"] = {"target": goal, "seconds": t, "updates": n}
        for f in fixed:
            t, n = reach(r["curve"], f)
            r["targets"][f"{f:.2f}"] = {"target": f, "seconds": t, "updates": n}
    table: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["strategy"] for r in runs):
        rs = [r for r in runs if r["strategy"] == name]
        row: dict[str, Any] = {"seeds": len(rs)}
        for key in rs[0]["targets"]:
            row[f"t_{key}"] = med([r["targets"][key]["seconds"] for r in rs])
            row[f"n_{key}"] = med([r["targets"][key]["updates"] for r in rs])
            row[f"reached_{key}"] = sum(r["targets"][key]["seconds"] is not None for r in rs)
        for key in ("final_accuracy", "best_accuracy", "bytes_published", "bytes_delivered", "accepted",
                    "staleness_mean", "staleness_p90", "staleness_max"):
            row[key] = med([r[key] for r in rs])
        table[name] = row
    speedups: dict[str, Any] = {}
    key = "sync_plateau_minus_2"
    for name in table:
        if name == "fedavg":
            continue
        per_seed = []
        for s in seeds:
            a = [r for r in runs if r["seed"] == s and r["strategy"] == name]
            b = [r for r in runs if r["seed"] == s and r["strategy"] == "fedavg"]
            if a and b and key in a[0]["targets"]:
                ta, tb = a[0]["targets"][key]["seconds"], b[0]["targets"][key]["seconds"]
                per_seed.append(tb / ta if ta and tb else None)
        speedups[name] = {"per_seed": per_seed, "median": med(per_seed)}
    return {"targets_by_seed": targets_by_seed, "table": table, "speedup_vs_fedavg": speedups}


def print_table(summary: dict[str, Any], fixed: list[float]) -> None:
    keys = ["sync_plateau_minus_2"] + [f"{f:.2f}" for f in fixed]
    head = f"{'strategy':22s}" + "".join(f"{'t→' + k[:6]:>10s}{'n→' + k[:6]:>9s}" for k in keys)
    head += f"{'final':>8s}{'best':>8s}{'MB pub':>8s}{'MB dlv':>8s}{'s.mean':>7s}{'s.p90':>7s}"
    head += f"{'speedup':>8s}"
    print(head)
    for name, row in summary["table"].items():
        line = f"{name:22s}"
        for k in keys:
            t, n = row.get(f"t_{k}"), row.get(f"n_{k}")
            line += f"{(f'{t:.1f}s' if t is not None else '—'):>10s}"
            line += f"{(f'{n:.0f}' if n is not None else '—'):>9s}"
        sp = summary["speedup_vs_fedavg"].get(name, {}).get("median")
        line += (f"{row['final_accuracy']:8.4f}{(row['best_accuracy'] or 0):8.4f}"
                 f"{row['bytes_published'] / 1e6:8.1f}{row['bytes_delivered'] / 1e6:8.1f}"
                 f"{(row['staleness_mean'] or 0):7.1f}{(row['staleness_p90'] or 0):7.0f}"
                 f"{(f'{sp:.2f}x' if sp else '—'):>8s}")
        print(line)
    print("t→/n→: median wall seconds / accepted updates to reach the target (—: not reached in every seed)")
    print(f"targets per seed (sync plateau - 2 points): {summary['targets_by_seed']}; s.mean, s.p90: staleness")


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install -e '.[bench]'); the figures are in {path.with_suffix('.json')}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = dict(zip(dict.fromkeys(r["strategy"] for r in runs), plt.cm.tab10.colors, strict=False))
    for r in runs:
        xs = [c["t"] for c in r["curve"]]
        ys = [c["accuracy"] for c in r["curve"]]
        first = r["seed"] == min(x["seed"] for x in runs if x["strategy"] == r["strategy"])
        ax.plot(xs, ys, color=colors[r["strategy"]], alpha=0.9 if first else 0.35, lw=1.4 if first else 0.8,
                label=r["strategy"] if first else None)
    for s, goal in summary["targets_by_seed"].items():
        ax.axhline(goal, color="grey", ls="--", lw=0.7)
        ax.text(0, goal, f" target seed {s}", va="bottom", fontsize=7, color="grey")
        break
    lows = [c["accuracy"] for r in runs for c in r["curve"][len(r["curve"]) // 5:] if c["accuracy"]]
    ax.set_ylim(max(0.0, min(lows) - 0.05) if lows else 0, 1.0)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("global test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine() -> dict[str, Any]:
    def cmd(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "cpu_model": next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                               if ln.startswith("model name")), ""),
            "mosquitto": cmd("mosquitto", "-h").splitlines()[0] if cmd("mosquitto", "-h") else "",
            "git_commit": cmd("git", "-C", str(ROOT), "rev-parse", "HEAD")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits, 10 agents, 25 s per run, one seed (~3 min)")
    p.add_argument("--task", default="hapt", help="hapt (six-class), hapt12 or digits")
    p.add_argument("--agents", type=int, default=30)
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal spread of device speed factors")
    p.add_argument("--base-seconds", type=float, default=0.5, help="median seconds per local round")
    p.add_argument("--seconds", type=float, default=120.0, help="wall time per run (sync must plateau)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    p.add_argument("--local-steps", type=int, default=None, help="E; default: the task's own")
    p.add_argument("--max-staleness", type=int, default=500)
    p.add_argument("--buffer-size", type=int, default=10, help="FedBuff K")
    p.add_argument("--alpha", type=float, default=0.6, help="FedAsync mixing rate")
    p.add_argument("--server-lr", type=float, default=0.5,
                   help="FedBuff server learning rate (1.0 diverged on HAPT in a trial run)")
    p.add_argument("--round-fraction", type=float, default=None,
                   help="fedavg: round = first ceil(fraction x online agents) updates")
    p.add_argument("--round-deadline", type=float, default=None, help="fedavg: round deadline in seconds")
    p.add_argument("--mean-online", type=float, default=None,
                   help="churn: mean seconds online (default: no churn)")
    p.add_argument("--mean-offline", type=float, default=5.0, help="churn: mean seconds offline")
    p.add_argument("--prox-rho", type=float, default=0.0, help="FedAsync proximal term on the agents")
    p.add_argument("--eval-interval", type=float, default=0.5)
    p.add_argument("--targets", type=float, nargs="*", default=None, help="fixed accuracy targets")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    a = p.parse_args(argv)
    if a.quick:
        a.task, a.agents, a.seconds, a.seeds, a.base_seconds = "digits", 10, 25.0, a.seeds[:1], 0.2
    default_targets = [0.85, 0.90] if a.task.startswith("hapt") else [0.9, 0.95]
    fixed = a.targets if a.targets is not None else default_targets
    logging.basicConfig(level=logging.ERROR)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: list[dict[str, Any]] = []
    conditions: dict[str, Any] = {}
    for seed in a.seeds:
        task = build_task(a.task, a.agents, seed)
        if task.num_clients < a.agents:
            a.agents = task.num_clients
        fleet = FleetConfig(agents=a.agents, base_seconds=a.base_seconds, sigma=a.sigma, seed=seed,
                            prox_rho=a.prox_rho, local_steps=a.local_steps, mean_online=a.mean_online,
                            mean_offline=a.mean_offline)
        for name in a.strategies:
            spec = RunSpec(name, seed, a.task, a.agents, a.seconds, fleet, a.max_staleness, a.buffer_size,
                           a.alpha, a.server_lr, a.round_fraction, a.round_deadline, a.eval_interval)
            log(f"run {name} seed {seed} ({a.task}, {a.agents} agents, sigma {a.sigma}, {a.seconds:.0f}s)")
            r = asyncio.run(run_one(spec, task, log))
            log(f"  -> final {r['final_accuracy']:.4f}, accepted {r['accepted']}, version {r['version']}, "
                f"rejected {r['rejected_by_reason']}")
            runs.append(r)
        conditions[str(seed)] = fleet.conditions()
        conditions[str(seed)]["speed_factors"] = [round(f, 4) for f in speed_factors(a.agents, a.sigma, seed)]
        conditions[str(seed)]["local_steps_effective"] = a.local_steps or task.local_steps
        conditions[str(seed)]["learning_rate"] = task.learning_rate
        conditions[str(seed)]["batch_size"] = task.batch_size
    summary = summarise(runs, a.seconds, fixed)
    result = {"benchmark": "time_to_accuracy", "args": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in vars(a).items()},
              "fleet_conditions_by_seed": conditions, "machine": machine(), "summary": summary, "runs": runs}
    path = a.out / f"tta-{a.task}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    title = (f"{a.task}, {a.agents} agents, sigma={a.sigma}, base {a.base_seconds}s, seeds {a.seeds}, "
             f"churn {a.mean_online or 'off'}")
    plot(runs, summary, path.with_suffix(".png"), title)
    print_table(summary, fixed)
    print(f"wrote {path}" + (f" and {path.with_suffix('.png')}" if path.with_suffix(".png").exists() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

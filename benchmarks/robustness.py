"""Accuracy (and a backdoor's success) with 20 % attackers, for every attack against every defence.

    python benchmarks/robustness.py                                    # simulation: digits and HAPT, 3 seeds
    python benchmarks/robustness.py --tasks hapt --seeds 1 --attacks alie,backdoor --defences mean,guard
    python benchmarks/robustness.py --strategy fedasync                # FedAsync, with and without its guard
    python benchmarks/robustness.py --engine mqtt --tasks hapt --defences mean,guard   # through Mosquitto

Attacks (fedmqtt.attacks; attackers are agents 0, 5, 10, ... = 20 %, colluding): ``sign-flip`` (-5 × the
honest delta), ``alie`` (z from the paper's formula for 30 clients, 6 attackers), ``ipm`` (ε 0.5),
``label-flip`` (c → C-1-c), ``backdoor`` (half the attacker's examples carry the trigger and the target
label 0; success rate reported), ``adaptive`` (knows the defence's rule and the buffer size, and picks
the scale of ALIE's direction that drags the defence's output furthest). "clean" runs without attackers.

Defences, FedBuff (K = 10): ``mean`` (none), ``norm`` (median norm), ``median``, ``trimmed`` (β 0.2),
``krum`` (Multi-Krum, f = 3), ``outlier`` (spread 3), ``guard`` (staleness-aware, spread 3). FedAsync
(α 0.6): ``mean`` (plain FedAsync) and ``guard`` (fedasync-guard, window 20).

Engines: ``sim`` (default, fedmqtt.simulation: the aggregator's core in simulated time, reproducible from
the seed, ``--updates`` arrivals per run) and ``mqtt`` (a Mosquitto of its own, the real Aggregator and a
Fleet of 30 agents with their own connections, ``--seconds`` of wall time; an attacker's delta is replaced
just before encoding, where client DP would act). Results go to ``results/robustness-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmqtt import attacks
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.attacks import Attack, Collusion
from fedmqtt.broker import local_broker
from fedmqtt.core import Limits
from fedmqtt.data import ArrayData
from fedmqtt.fleet import Fleet, FleetConfig
from fedmqtt.simulation import simulate
from fedmqtt.strategies import combine
from fedmqtt.strategies.base import Strategy
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import Task, get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import mqtt_connector

ROOT = Path(__file__).resolve().parents[1]
AGENTS, ATTACKER_EVERY = 30, 5
FEDBUFF_DEFENCES: dict[str, tuple[str, dict[str, float], combine.Combine | None]] = {
    "mean": ("fedbuff", {}, None),
    "norm": ("fedbuff-norm", {}, combine.norm_bound()),
    "median": ("fedbuff-median", {}, combine.median()),
    "trimmed": ("fedbuff-trimmed", {"trim": 0.2}, combine.trimmed(0.2)),
    "krum": ("fedbuff-krum", {"trim": 0.3}, combine.multi_krum(0.3)),
    "outlier": ("fedbuff-outlier", {"spread": 3.0}, combine.outlier(3.0)),
    "guard": ("fedbuff-guard", {"spread": 3.0}, combine.guard(3.0)),
}
FEDASYNC_DEFENCES: dict[str, tuple[str, dict[str, float], combine.Combine | None]] = {
    "mean": ("fedasync", {}, None),
    "guard": ("fedasync-guard", {"spread": 3.0, "window": 20}, combine.guard(3.0)),
}
ATTACKS = ("clean", "sign-flip", "alie", "ipm", "label-flip", "backdoor", "adaptive")


def build_task(name: str, seed: int) -> Task:
    return get_task(name, num_clients=AGENTS, seed=seed) if name == "digits" else get_task(name, seed=seed)


def build_attack(name: str, task: Task, rule: combine.Combine | None, buffer: int) -> Attack | None:
    classes = int(task.test_data[1].max()) + 1
    attackers = AGENTS // ATTACKER_EVERY
    return {
        "clean": lambda: None,
        "sign-flip": lambda: attacks.sign_flip(5.0),
        "alie": lambda: attacks.alie(attacks.alie_z(AGENTS, attackers)),
        "ipm": lambda: attacks.ipm(0.5),
        "label-flip": lambda: attacks.label_flip(classes),
        "backdoor": lambda: attacks.backdoor(task.name),
        "adaptive": lambda: attacks.adaptive(rule.fn if rule is not None else None, buffer,
                                             round(buffer / ATTACKER_EVERY)),
    }[name]()


def build_strategy(family: str, defence: str, buffer: int, server_lr: float) -> Strategy:
    name, options, _ = (FEDBUFF_DEFENCES if family == "fedbuff" else FEDASYNC_DEFENCES)[defence]
    if family == "fedbuff":
        return make(name, buffer_size=buffer, server_lr=server_lr, **options)
    return make(name, **options)


async def run_mqtt(task: Task, strategy: Strategy, attack: Attack | None, *, seed: int, seconds: float,
                   base_seconds: float, sigma: float) -> dict[str, Any]:
    """One run through a real Mosquitto; returns final accuracy, attack success and the aggregator's counters."""
    attackers = range(0, task.num_clients, ATTACKER_EVERY) if attack is not None else range(0)
    topics = Topics(federation=f"robust-{strategy.name}-{seed}")
    fleet_cfg = FleetConfig(agents=task.num_clients, base_seconds=base_seconds, sigma=sigma, seed=seed)
    fleet_cfg = replace(fleet_cfg, agent=replace(fleet_cfg.agent, topics=topics))
    evaluator = task.trainer(seed)
    async with local_broker("mosquitto") as broker:
        connect = mqtt_connector(broker.config)
        cfg = AggregatorConfig(topics=topics, limits=Limits(max_staleness=500))
        async with Aggregator(connect, evaluator.initial, strategy, cfg) as agg:
            await agg.wait_connected()
            fleet = Fleet(connect, task, fleet_cfg)
            collusion = Collusion()
            for i in attackers:
                assert attack is not None
                fleet.agents[i].privacy = attack.attacker(i, collusion)  # type: ignore[assignment]
                if attack.data is not None:
                    data = fleet.agents[i].data
                    assert isinstance(data, ArrayData)
                    data.x, data.y = attack.examples(data.x, data.y)
            fleet.warm_up()
            async with fleet:
                await asyncio.sleep(seconds)
            params = agg.numpy_params()
            sent = [a.updates_sent for a in fleet.agents]
            return {"accuracy": float(task.evaluate_fn(evaluator)(params)["accuracy"]),
                    "attack_success": (attacks.attack_success(evaluator, params, task.test_data, attack)
                                       if attack is not None else None),
                    "version": agg.version, "accepted": agg.state.counters.accepted,
                    "rejected": dict(agg.state.counters.rejected),
                    "attacker_share": sum(sent[i] for i in attackers) / max(sum(sent), 1)}


def one_run(args: argparse.Namespace, task: Task, attack_name: str, defence: str, seed: int) -> dict[str, Any]:
    family = args.strategy
    rule = (FEDBUFF_DEFENCES if family == "fedbuff" else FEDASYNC_DEFENCES)[defence][2]
    window = int(FEDASYNC_DEFENCES["guard"][1]["window"])
    attack = build_attack(attack_name, task, rule, args.buffer if family == "fedbuff" else window)
    strategy = build_strategy(family, defence, args.buffer, args.lr)
    if args.engine == "mqtt":
        return asyncio.run(run_mqtt(task, strategy, attack, seed=seed, seconds=args.seconds,
                                    base_seconds=args.base_seconds, sigma=args.sigma))
    attackers = frozenset(range(0, task.num_clients, ATTACKER_EVERY)) if attack is not None else frozenset()
    r = simulate(task, strategy, updates=int(args.budget[task.name.rstrip("0123456789")]), seed=seed,
                 attackers=attackers, attack=attack)
    return {"accuracy": r.accuracy, "attack_success": r.attack_success, "version": r.version,
            "applied": r.applied, "rejected": r.rejected_by_reason, "attacker_share": r.attacker_share}


def cell(runs: list[dict[str, Any]]) -> str:
    acc = statistics.median(r["accuracy"] for r in runs)
    asr = [r["attack_success"] for r in runs if r["attack_success"] is not None]
    return f"{acc:.4f}" + (f" (ASR {statistics.median(asr):.2f})" if asr else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("sim", "mqtt"), default="sim")
    ap.add_argument("--strategy", choices=("fedbuff", "fedasync"), default="fedbuff")
    ap.add_argument("--tasks", default="digits,hapt")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--defences", default="", help="comma-separated (default: every defence of --strategy)")
    ap.add_argument("--buffer", type=int, default=10, help="FedBuff K")
    ap.add_argument("--updates", default="digits=1000,hapt=1600", help="sim: arrivals per run, per task")
    ap.add_argument("--seconds", type=float, default=120.0, help="mqtt: wall seconds per run")
    ap.add_argument("--base-seconds", type=float, default=0.5, help="mqtt: median seconds per local round")
    ap.add_argument("--sigma", type=float, default=1.0, help="mqtt: lognormal spread of device speeds")
    ap.add_argument("--server-lr", type=float, default=None,
                    help="FedBuff server SGD learning rate (default: 1.0 in sim, 0.5 over MQTT)")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    args.lr = args.server_lr if args.server_lr is not None else (1.0 if args.engine == "sim" else 0.5)
    args.budget = dict(kv.split("=") for kv in args.updates.split(","))
    table = FEDBUFF_DEFENCES if args.strategy == "fedbuff" else FEDASYNC_DEFENCES
    defences = args.defences.split(",") if args.defences else list(table)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"robustness-{args.engine}-{args.strategy}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results: list[dict[str, Any]] = []
    print(f"# {' '.join(sys.argv)}")
    for name in args.tasks.split(","):
        task = build_task(name, 0)
        amount = (f"{args.budget[name]} arrivals" if args.engine == "sim"
                  else f"{args.seconds:.0f} s over Mosquitto, base {args.base_seconds} s, sigma {args.sigma}")
        print(f"\n{task.name}, {args.strategy}: {task.num_clients} agents, 20 % attackers, {amount}, seeds {seeds}"
              f"\n\n| attack | {' | '.join(defences)} |\n|---|{'---|' * len(defences)}", flush=True)
        for attack_name in args.attacks.split(","):
            cells = []
            for defence in defences:
                started = time.monotonic()
                runs = [one_run(args, task, attack_name, defence, seed) for seed in seeds]
                cells.append(cell(runs))
                results.append({"task": task.name, "strategy": args.strategy, "attack": attack_name,
                                "defence": defence, "seeds": seeds, "runs": runs,
                                "seconds": round(time.monotonic() - started, 1)})
                path.write_text(json.dumps({"argv": sys.argv, "engine": args.engine, "server_lr": args.lr,
                                            "results": results}, indent=1))
            print(f"| {attack_name} | {' | '.join(cells)} |", flush=True)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""Accuracy with 20 % attackers sending sign-flipped, scaled updates, with and without a robust FedBuff rule.

    python benchmarks/robustness.py                        # simulation: digits and HAPT, 3 seeds, medians
    python benchmarks/robustness.py --tasks hapt --seeds 1 --rows 0,1,6
    python benchmarks/robustness.py --engine mqtt --tasks hapt --rows 0,1,6   # through Mosquitto

Two engines run the same rows:

- ``sim`` (default): the event-driven asynchronous simulation in ``fedmqtt.simulation`` (same trainer, tasks and
  pure strategies as the services, no MQTT), ``--updates`` arrivals per run; reproducible from its seed.
- ``mqtt``: a Mosquitto of its own (the repo's mosquitto.conf on a free port), the real ``Aggregator`` and a
  ``Fleet`` of agents speaking MQTT, ``--seconds`` of wall time per run. An attacker is an ordinary agent
  whose outgoing delta is replaced by the attack just before encoding (where client DP would act).

30 agents per task (digits split IID in 30 shards; HAPT one per volunteer); attackers are agents 0, 5, 10, ...
(every fifth, 20 %), each sending -scale x its honest delta. Results go to ``results/robustness-*.json``.
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

from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.broker import local_broker
from fedmqtt.core import Limits
from fedmqtt.fleet import Fleet, FleetConfig
from fedmqtt.simulation import Attack, sign_flip, simulate
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import Task, get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import mqtt_connector

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, bool, dict[str, float]]] = [  # (label, strategy, attacked, strategy options)
    ("clean, FedBuff (mean)", "fedbuff", False, {}),
    ("attacked, FedBuff (mean), no defence", "fedbuff", True, {}),
    ("attacked, norm bound (median norm)", "fedbuff-norm", True, {}),
    ("attacked, coordinate-wise median", "fedbuff-median", True, {}),
    ("attacked, trimmed mean (beta 0.2)", "fedbuff-trimmed", True, {"trim": 0.2}),
    ("attacked, Multi-Krum (f = 3)", "fedbuff-krum", True, {"trim": 0.3}),
    ("attacked, outlier filter (spread 3)", "fedbuff-outlier", True, {"spread": 3.0}),
    ("clean, outlier filter (spread 3)", "fedbuff-outlier", False, {"spread": 3.0}),
    ("clean, coordinate-wise median", "fedbuff-median", False, {}),
    ("clean, Multi-Krum (f = 3)", "fedbuff-krum", False, {"trim": 0.3}),
]


def build_task(name: str, seed: int) -> Task:
    return get_task(name, num_clients=30, seed=seed) if name == "digits" else get_task(name, seed=seed)


async def run_mqtt(task: Task, strategy_name: str, options: dict[str, float], *, seed: int, seconds: float,
                   buffer: int, server_lr: float, attackers: frozenset[int], attack: Attack | None,
                   base_seconds: float, sigma: float) -> dict[str, Any]:
    """One run through a real Mosquitto; returns final accuracy and the aggregator's counters."""
    strategy = make(strategy_name, buffer_size=buffer, server_lr=server_lr, **options)  # type: ignore[arg-type]
    topics = Topics(federation=f"robust-{strategy_name}-{seed}")
    fleet_cfg = FleetConfig(agents=task.num_clients, base_seconds=base_seconds, sigma=sigma, seed=seed)
    fleet_cfg = replace(fleet_cfg, agent=replace(fleet_cfg.agent, topics=topics))
    evaluator = task.trainer(seed)
    evaluate = task.evaluate_fn(evaluator)
    async with local_broker("mosquitto") as broker:
        connect = mqtt_connector(broker.config)
        cfg = AggregatorConfig(topics=topics, limits=Limits(max_staleness=500))
        async with Aggregator(connect, evaluator.initial, strategy, cfg) as agg:
            await agg.wait_connected()
            fleet = Fleet(connect, task, fleet_cfg)
            if attack is not None:
                for i in attackers:  # the attack replaces the delta where client DP would transform it
                    fleet.agents[i].privacy = attack
            fleet.warm_up()
            async with fleet:
                await asyncio.sleep(seconds)
                sent, acks = fleet.updates_sent, fleet.acks
            final = evaluate(agg.numpy_params())
            return {"accuracy": float(final["accuracy"]), "version": agg.version, "accepted": agg.state.counters.accepted,
                    "rejected": dict(agg.state.counters.rejected), "sent": sent, "acks": acks,
                    "attacker_share": _attacker_share(fleet, attackers)}


def _attacker_share(fleet: Fleet, attackers: frozenset[int]) -> float:
    sent = [a.updates_sent for a in fleet.agents]
    return sum(sent[i] for i in attackers) / max(sum(sent), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("sim", "mqtt"), default="sim")
    ap.add_argument("--tasks", default="digits,hapt")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--buffer", type=int, default=10, help="FedBuff K")
    ap.add_argument("--scale", type=float, default=5.0, help="attackers send -scale x their honest delta")
    ap.add_argument("--updates", default="digits=1000,hapt=1600", help="sim: arrivals per run, per task")
    ap.add_argument("--seconds", type=float, default=120.0, help="mqtt: wall seconds per run")
    ap.add_argument("--base-seconds", type=float, default=0.5, help="mqtt: median seconds per local round")
    ap.add_argument("--sigma", type=float, default=1.0, help="mqtt: lognormal spread of device speeds")
    ap.add_argument("--server-lr", type=float, default=None,
                    help="server SGD learning rate (default: 1.0 in sim, 0.5 over MQTT as time_to_accuracy)")
    ap.add_argument("--rows", default="", help="comma-separated row numbers to run (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    lr = args.server_lr if args.server_lr is not None else (1.0 if args.engine == "sim" else 0.5)
    budget = dict(kv.split("=") for kv in args.updates.split(","))
    rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"robustness-{args.engine}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results: list[dict[str, Any]] = []
    print(f"# {' '.join(sys.argv)}")
    for name in args.tasks.split(","):
        task = build_task(name, 0)
        attackers = frozenset(range(0, task.num_clients, 5))
        amount = (f"{int(budget[name])} updates" if args.engine == "sim"
                  else f"{args.seconds:.0f} s over Mosquitto, base {args.base_seconds} s, sigma {args.sigma}")
        print(f"\n{task.name}: {task.num_clients} agents, {len(attackers)} attackers, K={args.buffer}, {amount}, "
              f"scale {args.scale}, server lr {lr}, seeds {args.seeds}\n")
        print("| run | accuracy (median) | per seed | attackers' share of updates |\n|---|---|---|---|",
              flush=True)
        for label, strategy, attacked, options in rows:
            runs: list[dict[str, Any]] = []
            started = time.monotonic()
            for seed in range(args.seeds):
                attack = sign_flip(args.scale) if attacked else None
                if args.engine == "sim":
                    r = simulate(task, make(strategy, buffer_size=args.buffer, server_lr=lr, **options),
                                 updates=int(budget[name]), seed=seed,
                                 attackers=attackers if attacked else frozenset(), attack=attack)
                    runs.append({"accuracy": r.accuracy, "version": r.version, "applied": r.applied,
                                 "attacker_share": r.attacker_share})
                else:
                    runs.append(asyncio.run(run_mqtt(
                        task, strategy, options, seed=seed, seconds=args.seconds, buffer=args.buffer,
                        server_lr=lr, attackers=attackers, attack=attack, base_seconds=args.base_seconds,
                        sigma=args.sigma)))
            accs = [r["accuracy"] for r in runs]
            share = f"{statistics.median(r['attacker_share'] for r in runs):.2f}" if attacked else "—"
            print(f"| {label} | {statistics.median(accs):.4f} | {', '.join(f'{a:.3f}' for a in accs)} | "
                  f"{share} |", flush=True)
            results.append({"task": task.name, "row": label, "strategy": strategy, "options": options,
                            "attacked": attacked, "runs": runs, "seconds": round(time.monotonic() - started, 1)})
            path.write_text(json.dumps({"argv": sys.argv, "engine": args.engine, "server_lr": lr,
                                        "results": results}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

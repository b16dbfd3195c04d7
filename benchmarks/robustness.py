"""Accuracy with 20 % attackers sending sign-flipped, scaled updates, with and without a robust FedBuff rule.

    python benchmarks/robustness.py                       # digits and HAPT, 3 seeds, median reported
    python benchmarks/robustness.py --tasks digits --seeds 1

Runs the event-driven asynchronous simulation in ``_async_sim.py`` (same trainer, tasks and pure strategies
as the services, no MQTT). 30 agents per task (digits split IID in 30 shards; HAPT one per volunteer);
attackers are agents 0, 5, 10, ... (every fifth, 20 %), each sending -scale x its honest delta.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _async_sim import sign_flip, simulate

from fedmqtt.strategies.registry import make
from fedmqtt.tasks import get_task

ROWS = [  # (label, strategy, attacked)
    ("clean, FedBuff (mean)", "fedbuff", False),
    ("attacked, FedBuff (mean), no defence", "fedbuff", True),
    ("attacked, norm bound (median norm)", "fedbuff-norm", True),
    ("attacked, coordinate-wise median", "fedbuff-median", True),
    ("attacked, trimmed mean (beta 0.2)", "fedbuff-trimmed", True),
    ("clean, coordinate-wise median", "fedbuff-median", False),
    ("clean, trimmed mean (beta 0.2)", "fedbuff-trimmed", False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,hapt")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--buffer", type=int, default=10, help="FedBuff K")
    ap.add_argument("--scale", type=float, default=5.0, help="attackers send -scale x their honest delta")
    ap.add_argument("--updates", default="digits=600,hapt=800", help="arrivals per run, per task")
    ap.add_argument("--rows", default="", help="comma-separated row numbers to run (default: all)")
    args = ap.parse_args()
    budget = dict(kv.split("=") for kv in args.updates.split(","))
    rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    print(f"# {' '.join(sys.argv)}")
    for name in args.tasks.split(","):
        task = get_task(name, num_clients=30, seed=0) if name == "digits" else get_task(name, seed=0)
        attackers = frozenset(range(0, task.num_clients, 5))
        updates = int(budget[name])
        print(f"\n{task.name}: {task.num_clients} agents, {len(attackers)} attackers, K={args.buffer}, "
              f"{updates} updates, scale {args.scale}, seeds {args.seeds}\n")
        print("| run | accuracy (median) | per seed |\n|---|---|---|", flush=True)
        for label, strategy, attacked in rows:
            accs = []
            started = time.monotonic()
            for seed in range(args.seeds):
                r = simulate(task, make(strategy, buffer_size=args.buffer), updates=updates, seed=seed,
                             attackers=attackers if attacked else frozenset(),
                             attack=sign_flip(args.scale) if attacked else None)
                accs.append(r.accuracy)
            print(f"| {label} | {statistics.median(accs):.4f} | {', '.join(f'{a:.3f}' for a in accs)} |",
                  flush=True)
            print(json.dumps({"task": task.name, "row": label, "strategy": strategy, "attacked": attacked,
                              "accuracy": accs, "seconds": round(time.monotonic() - started, 1)}),
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

"""Accuracy against ε (δ = 1e-5) for central DP in FedBuff: clip each delta to C, add N(0, (sigma C)²) to the
buffered sum; sigma is the smallest noise multiplier whose ε after the run's server steps is the target.

    python benchmarks/privacy.py                          # digits and HAPT; ε = 1, 4, 8, clip only, no DP
    python benchmarks/privacy.py --tasks digits --seeds 1
    python benchmarks/privacy.py --tasks digits --agents 300 --buffer 100 --updates digits=3000
    python benchmarks/privacy.py --engine mqtt             # through Mosquitto, ε read from the metrics
    python benchmarks/privacy.py --tasks digits --agents 1000 --buffer 500 --updates digits=20000 \
        --hidden 16 --local-steps 5 --epsilons inf,8           # the many-device configuration

``sim`` (default) runs the event-driven asynchronous simulation in ``fedmqtt.simulation`` (no MQTT), 30 agents by
default, and holds a second update from the same agent until the buffer has been emptied, so that each
agent contributes at most one delta per noisy step (the sensitivity the accountant assumes). ``mqtt`` runs
a Mosquitto of its own, the real ``Aggregator`` (the DP strategy holds a second update per step and reports ε) and a
``Fleet`` of 30 agents until the planned number of noisy steps is taken, then reads ε from the aggregator's
retained metrics. sigma is calibrated for replace-one adjacency (sensitivity 2C per step a device takes part
in, docs/security.md) over the planned steps; "ε reported" is what the aggregator's accountant reports for
the run (the most-charged device's steps), with no amplification by sampling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.broker import local_broker
from fedmqtt.core import Limits
from fedmqtt.fleet import Fleet, FleetConfig
from fedmqtt.privacy import ADJACENCY, DELTA, noise_for_epsilon
from fedmqtt.simulation import simulate
from fedmqtt.strategies.base import Strategy
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import Task, get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import ConnectOptions, Inbox, mqtt_connector

CLIP = {"digits": 1.0, "hapt6": 0.5}  # about the median honest delta norm of each task (printed below)


async def run_mqtt(task: Task, strategy: Strategy, sigma: float | None, *, steps: int, seed: int,
                   base_seconds: float, stall: float = 20.0) -> dict[str, Any]:
    """Run the real aggregator and fleet until ``steps`` versions; ε comes from the retained metrics."""
    topics = Topics(federation=f"privacy-{seed}-{sigma}")
    fleet_cfg = FleetConfig(agents=task.num_clients, base_seconds=base_seconds, sigma=1.0, seed=seed)
    fleet_cfg = replace(fleet_cfg, agent=replace(fleet_cfg.agent, topics=topics))
    evaluator = task.trainer(seed)
    cfg = AggregatorConfig(topics=topics, limits=Limits(max_staleness=500))  # DP FedBuff gates itself
    async with local_broker("mosquitto") as broker:
        connect = mqtt_connector(broker.config)
        async with Aggregator(connect, evaluator.initial, strategy, cfg) as agg:
            await agg.wait_connected()
            fleet = Fleet(connect, task, fleet_cfg)
            fleet.warm_up()
            started = last_step = time.monotonic()
            seen = agg.version
            async with fleet:  # until the planned steps, or no step for `stall` seconds (a ruined model's
                while agg.version < steps and time.monotonic() - last_step < stall:  # deltas are rejected)
                    await asyncio.sleep(0.02)
                    if agg.version != seen:
                        seen, last_step = agg.version, time.monotonic()
            accuracy = float(task.evaluate_fn(evaluator)(agg.numpy_params())["accuracy"])
            held = agg.metrics().held
        inbox = Inbox()
        async with connect(ConnectOptions(f"privacy-reader-{seed}", on_message=inbox)) as reader:  # anyone reads
            await reader.subscribe(topics.metrics)
            metrics = json.loads((await inbox.get(timeout=30)).payload)
    return {"accuracy": accuracy, "steps": metrics["version"], "epsilon": metrics.get("dp_epsilon", math.inf),
            "dp_steps": metrics.get("dp_steps"), "accepted": metrics["accepted"], "held_at_end": held,
            "rejected_by_reason": metrics["rejected_by_reason"],
            "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,hapt")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--buffer", type=int, default=20, help="FedBuff K (agents per noisy step)")
    ap.add_argument("--epsilons", default="inf,clip,8,4,1", help="targets; inf = no DP, clip = clip only")
    ap.add_argument("--updates", default="digits=600,hapt=800", help="arrivals per run, per task")
    ap.add_argument("--agents", type=int, default=30, help="digits: agents (IID shards); HAPT has 30")
    ap.add_argument("--engine", choices=("sim", "mqtt"), default="sim")
    ap.add_argument("--base-seconds", default="digits=0.2,hapt=0.5", help="mqtt: median seconds per local round")
    ap.add_argument("--hidden", type=int, default=64, help="digits: the MLP's width")
    ap.add_argument("--local-steps", type=int, default=None, help="local SGD steps per round (default: the task's)")
    ap.add_argument("--server-lr", type=float, default=1.0, help="FedBuff server SGD learning rate")
    ap.add_argument("--quantile", type=float, default=None, help="adaptive clipping to this quantile of norms")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    base_seconds = dict(kv.split("=") for kv in args.base_seconds.split(","))
    budget = dict(kv.split("=") for kv in args.updates.split(","))
    print(f"# {' '.join(sys.argv)}")
    for name in args.tasks.split(","):
        task = (get_task(name, num_clients=args.agents, seed=0, hidden=args.hidden) if name == "digits"
                else get_task(name, seed=0))
        if args.local_steps is not None:
            task = replace(task, local_steps=args.local_steps)
        updates = int(budget[name])
        clip = CLIP.get(task.name, 1.0)
        planned_steps = updates // args.buffer  # an upper bound: held updates can only lower the count
        print(f"\n{task.name}: {task.num_clients} agents, K={args.buffer}, {updates} updates "
              f"(<= {planned_steps} noisy steps), clip C={clip}, delta={DELTA}, seeds {args.seeds}\n")
        print("| target ε | noise multiplier sigma | std on the mean (sigma C / K) | ε reported (δ=1e-5) "
              "| accuracy (median) | per seed |\n|---|---|---|---|---|---|", flush=True)
        for target in args.epsilons.split(","):
            if target == "inf":
                kw: dict[str, float | None] = {}
                sigma = 0.0
            elif target == "clip":
                kw, sigma = {"dp_clip": clip, "dp_noise": 0.0}, 0.0
            else:
                sigma = ADJACENCY["replace"] * noise_for_epsilon(float(target), planned_steps)
                kw = {"dp_clip": clip, "dp_noise": sigma}
                if args.quantile is not None:
                    kw.update(dp_quantile=args.quantile, dp_count_noise=args.buffer / 20)
            accs, eps, steps, norms = [], [], [], []
            started = time.monotonic()
            for seed in range(args.seeds):
                strategy = make("fedbuff", buffer_size=args.buffer, server_lr=args.server_lr,  # type: ignore[arg-type]
                                seed=seed if kw else None, **kw)
                if args.engine == "mqtt":
                    r2 = asyncio.run(run_mqtt(task, strategy, sigma if target != "inf" else None,
                                              steps=planned_steps, seed=seed,
                                              base_seconds=float(base_seconds[name])))
                    accs.append(r2["accuracy"])
                    steps.append(r2["steps"])
                    eps.append(r2["epsilon"] if target not in ("inf", "clip") else math.inf)
                    print(json.dumps({"seed": seed, **r2}), file=sys.stderr, flush=True)
                    continue
                r = simulate(task, strategy, updates=updates, seed=seed)  # DP: one update per agent per step
                accs.append(r.accuracy)
                steps.append(r.version)
                norms.append(r.delta_norm_median)
                eps.append(r.privacy["dp_epsilon"] if target not in ("inf", "clip") else math.inf)
            label = {"inf": "no DP", "clip": "clip only"}.get(target, target)
            noise = f"{sigma:.3g}" if sigma else "0"
            std = f"{sigma * clip / args.buffer:.3g}" if sigma else "0"
            print(f"| {label} | {noise} | {std} | {max(eps):.2f} | {statistics.median(accs):.4f} | "
                  f"{', '.join(f'{a:.3f}' for a in accs)} |", flush=True)
            print(json.dumps({"task": task.name, "target": target, "sigma": sigma, "clip": clip,
                              "accuracy": accs, "epsilon": eps, "steps": steps, "delta_norm_median": norms,
                              "seconds": round(time.monotonic() - started, 1)}), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

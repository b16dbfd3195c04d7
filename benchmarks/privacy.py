"""Accuracy against ε (δ = 1e-5) for central DP in FedBuff: clip each delta to C, add N(0, (sigma C)²) to the
buffered sum; sigma is the smallest noise multiplier whose ε after the run's server steps is the target.

    python benchmarks/privacy.py                          # digits and HAPT; ε = 1, 4, 8, clip only, no DP
    python benchmarks/privacy.py --tasks digits --seeds 1
    python benchmarks/privacy.py --tasks digits --agents 300 --buffer 100 --updates digits=3000

Runs the event-driven asynchronous simulation in ``_async_sim.py`` (no MQTT), 30 agents by default, and holds
a second update from the same agent until the buffer has been emptied, so that each agent contributes at
most one delta per noisy step (the sensitivity the accountant assumes). ε is from dp-accounting's RDP
accountant over the steps actually taken, with no amplification by sampling (see fedmqtt.privacy).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

from _async_sim import simulate

from fedmqtt.privacy import DELTA, epsilon, noise_for_epsilon
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import get_task

CLIP = {"digits": 1.0, "hapt6": 0.5}  # about the median honest delta norm of each task (printed below)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,hapt")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--buffer", type=int, default=20, help="FedBuff K (agents per noisy step)")
    ap.add_argument("--epsilons", default="inf,clip,8,4,1", help="targets; inf = no DP, clip = clip only")
    ap.add_argument("--updates", default="digits=600,hapt=800", help="arrivals per run, per task")
    ap.add_argument("--agents", type=int, default=30, help="digits: agents (IID shards); HAPT has 30")
    args = ap.parse_args()
    budget = dict(kv.split("=") for kv in args.updates.split(","))
    print(f"# {' '.join(sys.argv)}")
    for name in args.tasks.split(","):
        task = get_task(name, num_clients=args.agents, seed=0) if name == "digits" else get_task(name, seed=0)
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
                sigma = noise_for_epsilon(float(target), planned_steps)
                kw = {"dp_clip": clip, "dp_noise": sigma}
            accs, eps, steps, norms = [], [], [], []
            started = time.monotonic()
            for seed in range(args.seeds):
                strategy = make("fedbuff", buffer_size=args.buffer, seed=seed, **kw)  # type: ignore[arg-type]
                r = simulate(task, strategy, updates=updates, seed=seed,
                             one_per_buffer=args.buffer if kw else None)
                accs.append(r.accuracy)
                steps.append(r.version)
                norms.append(r.delta_norm_median)
                eps.append(epsilon(sigma, r.version) if target not in ("inf", "clip") else math.inf)
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

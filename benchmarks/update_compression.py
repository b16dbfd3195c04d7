"""Accuracy against uplink bytes for compressed updates, at the same number of accepted updates.

Each run sends the same arrivals (same seed: partition, device speeds, arrival order) through the
aggregator's own core in simulated time (fedmqtt.simulation: every update encoded as on the wire, validated
and applied as the service would), once per compression. It records the test accuracy at 16 points of the
run and the update bytes as encoded. "Final accuracy" is the mean over the last quarter of the run (the last
4 points: one snapshot of an asynchronous model swings by a point or more from one update to the next); it
prints medians over seeds, with each form's bytes as a fraction of float32's.

    python benchmarks/update_compression.py                           # HAPT, FedAsync and FedBuff, 1,600 updates, 3 seeds
    python benchmarks/update_compression.py --strategies fedbuff --seeds 1 --updates 400   # quicker
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from fedmqtt.compression import Compression
from fedmqtt.simulation import simulate
from fedmqtt.strategies.registry import make
from fedmqtt.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
FORMS = ("none", "float16", "int8", "topk:10%", "topk:1%", "topk:1%/no-feedback")


def setting(form: str) -> Compression:
    name, _, flag = form.partition("/")
    c = Compression.parse(name)
    return c._replace(error_feedback=flag != "no-feedback")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="hapt")
    ap.add_argument("--strategies", default="fedasync,fedbuff")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--updates", type=int, default=1600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compression-{time.strftime('%Y%m%d-%H%M%S')}.json"
    task = get_task(args.task, seed=0)
    print(f"# {' '.join(sys.argv)}\n# {task.name}: {task.num_clients} agents, {args.updates} updates per run, "
          f"{args.seeds} seeds; {platform.machine()}, Python {platform.python_version()}")
    results: list[dict[str, Any]] = []
    for strategy in args.strategies.split(","):
        print(f"\n{strategy}\n\n| update form | final accuracy (median) | per seed | bytes per update | vs float32 |\n"
              "|---|---|---|---|---|", flush=True)
        base_bytes: float | None = None
        for form in args.forms.split(","):
            runs = []
            for seed in range(args.seeds):
                task = get_task(args.task, seed=seed)
                r = simulate(task, make(strategy), updates=args.updates, seed=seed, compression=setting(form),
                             eval_points=16)
                tail = [acc for _, acc in r.curve[-4:]]
                runs.append({"seed": seed, "accuracy": sum(tail) / len(tail), "last_accuracy": r.accuracy,
                             "curve": r.curve, "applied": r.applied, "uplink_bytes": r.uplink_bytes,
                             "rejected": r.rejected_by_reason})
            acc = statistics.median(r["accuracy"] for r in runs)
            per_update = statistics.median(r["uplink_bytes"] / args.updates for r in runs)
            if form == "none":
                base_bytes = per_update
            ratio = per_update / base_bytes if base_bytes else float("nan")
            seeds = ", ".join(f"{r['accuracy']:.3f}" for r in runs)
            print(f"| {form} | {acc:.4f} | {seeds} | "
                  f"{per_update:,.0f} | {ratio:.3f} |", flush=True)
            results.append({"strategy": strategy, "form": form, "accuracy_median": acc,
                            "bytes_per_update": per_update, "ratio_to_float32": ratio, "runs": runs})
            path.write_text(json.dumps({"argv": sys.argv, "task": task.name, "updates": args.updates,
                                        "results": results}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

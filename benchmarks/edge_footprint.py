"""What one `fedmqtt edge` process costs a device: resident memory, threads and CPU while it trains.

    python benchmarks/edge_footprint.py                        # digits (the default task), 60 s, 3 repeats
    python benchmarks/edge_footprint.py --task hapt --seconds 90

Per repeat: a Mosquitto of its own, `fedmqtt aggregator` (ephemeral) and one `fedmqtt edge` (the real CLI,
as a device runs it), each its own process. The edge process is sampled every 0.5 s from /proc: resident
memory (VmRSS; its peak VmHWM), threads, CPU seconds; its status lines give the updates accepted. The first
``--warmup`` seconds (imports, the first jitted step) count for the peak but not for the steady state.
Prints medians over repeats and writes results/edge-footprint-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from slow_links import cpu_seconds  # benchmarks/ is on sys.path when a script in it runs

from fedmqtt.broker import MosquittoProcess, free_port

ROOT = Path(__file__).resolve().parents[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile (kB) and Threads of a live process."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            out[key] = int(value.split()[0])
    return out


def one_run(a: argparse.Namespace, repeat: int) -> dict[str, Any]:
    port = free_port()
    broker = MosquittoProcess.prepare(port)
    asyncio.run(broker.start())
    url = f"mqtt://127.0.0.1:{port}"
    fed = f"fp{repeat}"
    cli = [sys.executable, "-m", "fedmqtt"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        agg = subprocess.Popen([*cli, "aggregator", "--broker", url, "--federation", fed, "--task", a.task,
                                "--ephemeral"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        log = Path(tmp) / "edge.log"
        with log.open("w") as sink:
            edge = subprocess.Popen([*cli, "edge", "--broker", url, "--federation", fed, "--task", a.task,
                                     "--agent-id", "device-1", "--status-every", "1"],
                                    stdout=sink, stderr=subprocess.STDOUT, env=env)
            samples: list[dict[str, float]] = []
            t0 = time.monotonic()
            try:
                while (now := time.monotonic() - t0) < a.seconds:
                    time.sleep(0.5)
                    if edge.poll() is not None:
                        raise RuntimeError(f"edge exited: {log.read_text()[-2000:]}")
                    s = proc_status(edge.pid)
                    samples.append({"t": now, "rss_kb": s["VmRSS"], "hwm_kb": s["VmHWM"], "anon_kb": s["RssAnon"],
                                    "file_kb": s["RssFile"], "threads": s["Threads"], "cpu": cpu_seconds(edge.pid)})
            finally:
                for p in (edge, agg):
                    p.terminate()
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                broker.stop()
        text = log.read_text()
    accepted = [int(m) for m in re.findall(r"accepted (\d+)", text)]
    steady = [s for s in samples if s["t"] >= a.warmup]
    window = steady[-1]["t"] - steady[0]["t"] if len(steady) > 1 else 1.0
    return {
        "repeat": repeat,
        "peak_rss_mb": samples[-1]["hwm_kb"] / 1024,
        "steady_rss_mb": statistics.median(s["rss_kb"] for s in steady) / 1024,
        "steady_anon_mb": statistics.median(s["anon_kb"] for s in steady) / 1024,
        "steady_file_mb": statistics.median(s["file_kb"] for s in steady) / 1024,
        "threads_max": max(int(s["threads"]) for s in samples),
        "threads_steady": statistics.median(int(s["threads"]) for s in steady),
        "cpu_share_steady": (steady[-1]["cpu"] - steady[0]["cpu"]) / window if len(steady) > 1 else None,
        "accepted": max(accepted, default=0),
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"# {' '.join(sys.argv)}\n# {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; task {a.task}, {a.seconds:.0f} s per repeat", flush=True)
    runs = []
    for r in range(a.repeats):
        run = one_run(a, r)
        runs.append(run)
        print(f"  repeat {r}: peak RSS {run['peak_rss_mb']:.0f} MB, steady RSS {run['steady_rss_mb']:.0f} MB "
              f"({run['steady_anon_mb']:.0f} anonymous, {run['steady_file_mb']:.0f} file-backed), "
              f"threads {run['threads_steady']:.0f} (max {run['threads_max']}), CPU {run['cpu_share_steady']:.0%} "
              f"of one core, {run['accepted']} updates accepted", flush=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"\n| task | peak RSS (MB) | steady RSS (MB) | of which anonymous | threads | CPU (one core) | "
          f"accepted in {a.seconds:.0f} s |\n|---|---|---|---|---|---|---|\n| {a.task} | {med('peak_rss_mb'):.0f} | "
          f"{med('steady_rss_mb'):.0f} | {med('steady_anon_mb'):.0f} | "
          f"{med('threads_steady'):.0f} | {med('cpu_share_steady'):.0%} | {med('accepted'):.0f} |")
    path = a.out / f"edge-footprint-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"argv": sys.argv, "task": a.task, "runs": runs}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

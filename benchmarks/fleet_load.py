"""A thousand live devices against one aggregator on this machine, with churn, and the ledger afterwards.

    python benchmarks/fleet_load.py                          # 1,000 agents, 5 minutes
    python benchmarks/fleet_load.py --agents 100 --seconds 60

What runs: a Mosquitto of its own; `fedmqtt aggregator` as its own process (FedBuff with K = 50, as a fleet
of this size would run it, durable state, here with `--keep-journal` so that every applied update stays on
disk as the ledger); and ``--procs`` load processes of lightweight protocol agents. Each agent is one MQTT connection
(persistent session), sends a real update on the digits model (its fingerprint, shapes and dtypes, small
random values) after an exponential wait of mean ``--interval`` seconds, keeps it in its outbox until
the ack arrives, re-sends it after ``--ack-timeout`` and after every reconnect, and goes offline for an
exponential time of mean ``--mean-offline`` after an exponential online time of mean ``--mean-online``
(the broker queues its acks meanwhile). It is not the JAX agent: it does not train, and it learns the
version to base its next update on from its acks rather than by receiving every model (the load is the
aggregator's update path, not model fan-out).

With ``--train TASK`` the agents learn for real (the many-device DP configuration): each load process follows
the retained model, and an agent's update is one local round of the task's trainer on its own shard of the
task's data (the shard of agent i of ``--agents``), based on the newest model its process holds, as a device
that pulls the model when its round starts. The aggregator then runs ``--task TASK`` with the strategy
options given (``--server-lr``, ``--dp-clip``, ``--dp-noise``); ``--until-version`` stops the run at a version;
the final model is evaluated on the task's test set and ε is read from the aggregator's retained metrics.

    python benchmarks/fleet_load.py --train digits-linear --agents 1000 --buffer-size 500 --interval 4 \
        --local-steps 1 --local-lr 0.5 --server-lr 4 --dp-clip 1 --dp-noise 4.42 --dp-max-steps 12 \
        --until-version 24
    python benchmarks/fleet_load.py --train digits-linear --agents 1000 --buffer-size 1000 --interval 4 \
        --local-steps 1 --local-lr 0.5 --server-lr 4 --dp-clip 1 --dp-noise 3.13 --dp-sampling 1 \
        --dp-step-seconds 4 --until-version 24        # clocked steps, add/remove neighbours

At the end the agents stop sending and wait up to 60 s for their outstanding acks; the aggregator is stopped
and its journal read. Reported: accepted updates per second, update-to-ack latency p50/p99, the
aggregator's and the broker's resident memory over time and their CPU, the load processes' CPU, and the
ledger: acknowledged but never applied (lost), applied twice, still unacknowledged. Prints a summary and
writes results/fleet-load-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from fleet_learning import FEDERATION, Learner, final_model, scrape_version  # benchmarks/ is on sys.path

from fedmqtt import codec, dedup, journal, members
from fedmqtt.broker import MosquittoProcess, free_port
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Message, mqtt_connector

ROOT = Path(__file__).resolve().parents[1]


# ---- one load process ------------------------------------------------------------------------------------
class LightAgent:
    def __init__(self, agent_id: str, worker: Worker) -> None:
        self.id, self.w = agent_id, worker
        self.outbox: dict[str, tuple[bytes, float, float]] = {}  # id -> payload, first sent, last sent
        self.version = worker.version
        self.session = 0  # connections so far: an ack in the session that sent the update came while online
        self.sent_in: dict[str, int] = {}

    def on_message(self, msg: Message) -> None:
        try:
            ack = json.loads(msg.payload)
        except ValueError:
            return
        entry = self.outbox.pop(ack.get("update_id", ""), None)
        self.version = max(self.version, int(ack.get("version") or 0))
        if entry is not None:
            now = time.monotonic()
            # from the first send (what the device waits), and from the last one when the ack came over the
            # same connection (what the aggregator and the broker take)
            online = now - entry[2] if self.sent_in.pop(ack["update_id"], -1) == self.session else None
            self.w.acks.append((self.id, ack["update_id"], ack["status"], ack.get("reason"),
                                round(now - entry[1], 4), None if online is None else round(online, 4)))

    async def send(self, t: Any, update_id: str) -> None:
        payload, first, _ = self.outbox[update_id]
        self.outbox[update_id] = (payload, first, time.monotonic())
        self.sent_in[update_id] = self.session
        await t.publish(self.w.topics.update(self.id), payload, qos=1)
        self.w.sent += 1

    async def run(self, stop: asyncio.Event, drain: asyncio.Event) -> None:
        rng = random.Random(self.id)
        a = self.w.args
        opts = ConnectOptions(f"fedmqtt-load-{self.id}", clean_start=False, session_expiry=3600,
                              on_message=self.on_message)
        await asyncio.sleep(rng.uniform(0, a.interval))  # no thundering start
        while not (drain.is_set() and not self.outbox):
            online_until = time.monotonic() + rng.expovariate(1 / a.mean_online)
            self.session += 1  # before connecting: the acks the broker queued arrive during the handshake
            try:
                async with self.w.connect(opts) as t:
                    self.version = max(self.version, self.w.version)  # a device gets the retained model on connect
                    await t.subscribe(self.w.topics.acks(self.id), qos=1)
                    for uid in list(self.outbox):
                        await self.send(t, uid)
                    while time.monotonic() < online_until or drain.is_set():
                        if drain.is_set():
                            if not self.outbox:
                                return
                            await asyncio.sleep(0.5)
                        else:
                            wait = rng.expovariate(1 / a.interval)
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(stop.wait(), wait)
                            if not stop.is_set() and len(self.outbox) < 8:
                                uid = uuid.uuid4().hex
                                self.outbox[uid] = (self.w.update(self.id, uid, self.version), time.monotonic(), 0.0)
                                await self.send(t, uid)
                        now = time.monotonic()
                        for uid, (_, _, last) in list(self.outbox.items()):
                            if now - last > a.ack_timeout:
                                await self.send(t, uid)
                                self.w.resent += 1
            except Exception as exc:  # a lost connection: like a device, come back later
                self.w.errors[type(exc).__name__] += 1
            if drain.is_set():
                await asyncio.sleep(0.5)
                continue  # back online to collect the last acks
            self.w.departures += 1
            await asyncio.sleep(rng.expovariate(1 / a.mean_offline))


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.topics = Topics(federation=FEDERATION)
        self.connect = mqtt_connector(BrokerConfig.from_url(args.broker))
        self.acks: list[tuple[str, str, str, str | None, float, float | None]] = []
        self.sent = self.resent = self.departures = 0
        self.errors: Counter[str] = Counter()
        self.version = 0
        self.rng = np.random.default_rng()
        self.template: dict[str, np.ndarray] = {}
        self.fingerprint = ""
        self.learner = Learner(args) if args.train else None

    def update(self, agent: str, update_id: str, base: int) -> bytes:
        if self.learner is not None:  # one local round on the agent's shard, from the newest model held
            delta, n = self.learner.round(int(agent[1:]), self.template)
            return codec.encode_update(delta, agent=agent, update_id=update_id, base_version=self.version,
                                       num_samples=n, model_fingerprint=self.fingerprint)
        delta = {k: (self.rng.standard_normal(v.shape) * 1e-3).astype(v.dtype) for k, v in self.template.items()}
        return codec.encode_update(delta, agent=agent, update_id=update_id, base_version=base, num_samples=100,
                                   model_fingerprint=self.fingerprint)

    async def model(self) -> None:
        got: asyncio.Queue[Message] = asyncio.Queue()
        first = asyncio.Event()

        def on_model(msg: Message) -> None:
            decoded = codec.decode(msg.payload)
            version = int(decoded.metadata["fedmqtt.version"])
            if version >= self.version or not first.is_set():
                self.template, self.version = dict(decoded.tensors), version
                self.fingerprint = self.fingerprint or codec.fingerprint(self.template)
                first.set()

        async def follow() -> None:  # training agents base each round on the newest model
            async with self.connect(ConnectOptions(f"fedmqtt-load-w{self.args.worker}-{uuid.uuid4().hex[:6]}",
                                                   on_message=on_model)) as t:
                await t.subscribe(self.topics.model, qos=1)
                if self.learner is None:
                    await first.wait()
                    return
                await asyncio.Event().wait()

        self._follower = asyncio.ensure_future(follow())
        await asyncio.wait_for(first.wait(), 60)
        del got

    async def watch_version(self) -> None:
        """The current version, from the retained metrics: what a reconnecting device learns from the retained
        model (one connection per load process instead of a model download per device)."""
        def on_metrics(msg: Message) -> None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.version = max(self.version, int(json.loads(msg.payload)["version"]))

        async with self.connect(ConnectOptions(f"fedmqtt-load-v{self.args.worker}-{uuid.uuid4().hex[:6]}",
                                               on_message=on_metrics)) as t:
            await t.subscribe(self.topics.metrics, qos=1)
            await asyncio.Event().wait()

    async def run(self) -> None:
        a = self.args
        await self.model()
        watcher = asyncio.ensure_future(self.watch_version())
        stop, drain = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        agents = [LightAgent(f"d{i:05d}", self) for i in range(a.first, a.first + a.count)]
        tasks = [asyncio.ensure_future(ag.run(stop, drain)) for ag in agents]
        await stop.wait()
        drain.set()
        _, pending = await asyncio.wait(tasks, timeout=60)
        for t in pending:
            t.cancel()
        watcher.cancel()
        left = {f"{ag.id}/{uid}" for ag in agents for uid in ag.outbox}
        Path(a.out).write_text(json.dumps({  # noqa: ASYNC240  (once, at the end)
            "acks": self.acks, "sent": self.sent, "resent": self.resent, "departures": self.departures,
            "errors": dict(self.errors), "unacknowledged": sorted(left),
            "cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}))


# ---- the driver ------------------------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[float, float]:
    """(RSS MB, CPU seconds) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def drive(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.agents + 1024)), hard))
    work = Path(tempfile.mkdtemp(prefix="fedmqtt-load-"))
    broker = MosquittoProcess.prepare()
    asyncio.run(broker.start())
    url = f"mqtt://127.0.0.1:{broker.port}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    metrics_port = free_port()
    agg = subprocess.Popen([sys.executable, "-m", "fedmqtt", "aggregator", "--broker", url, "--federation",
                            FEDERATION, "--state-dir", str(work / "state"), "--keep-journal",
                            "--strategy", args.strategy, "--status-every", "30", "--metrics-port", str(metrics_port),
                            *(["--buffer-size", str(args.buffer_size)] if args.strategy.startswith("fedbuff") else []),
                            *(["--task", args.train, "--server-lr", str(args.server_lr)] if args.train else []),
                            *(["--dp-clip", str(args.dp_clip), "--dp-noise", str(args.dp_noise)]
                              if args.dp_clip is not None else []),
                            *(["--dp-max-steps", str(args.dp_max_steps)] if args.dp_max_steps else []),
                            *(["--dp-adjacency", args.dp_adjacency] if args.dp_adjacency else []),
                            *(["--dp-sampling", str(args.dp_sampling), "--dp-step-seconds", str(args.dp_step_seconds)]
                              if args.dp_sampling is not None else []),
                            *(["--workers"] if args.root_workers else [])],
                           stdout=subprocess.DEVNULL, stderr=open(work / "aggregator.log", "wb"), env=env)  # noqa: SIM115
    crew = [subprocess.Popen([sys.executable, "-m", "fedmqtt", "worker", "--broker", url, "--federation", FEDERATION,
                              "--worker-id", f"w{i}", "--status-every", "30", *(["--task", args.train] if args.train else [])],
                             stdout=subprocess.DEVNULL, stderr=open(work / f"w{i}.log", "wb"), env=env)  # noqa: SIM115
            for i in range(args.root_workers)]  # the aggregator's workers (`fedmqtt worker`), when asked for
    time.sleep(8)  # JAX import, first model published
    per = -(-args.agents // args.procs)
    workers = []
    for i in range(args.procs):
        first, count = i * per, min(per, args.agents - i * per)
        if count <= 0:
            break
        workers.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", str(i), "--broker", url, "--first", str(first), "--count",
             str(count), "--interval", str(args.interval), "--mean-online", str(args.mean_online),
             "--mean-offline", str(args.mean_offline), "--ack-timeout", str(args.ack_timeout),
             "--out", str(work / f"worker-{i}.json"),
             *(["--train", args.train, "--agents", str(args.agents), "--local-steps", str(args.local_steps),
                "--local-lr", str(args.local_lr)] if args.train else [])], env=env))
    samples = []
    started = time.monotonic()
    assert broker.process is not None
    learned: dict[str, Any] = {}
    try:
        while time.monotonic() - started < args.seconds:
            for _ in range(10):  # a sample every 10 s; the version, when the run stops at one, every second
                time.sleep(1)
                if args.until_version is not None and scrape_version(metrics_port) >= args.until_version:
                    learned = asyncio.run(final_model(url, args.train))
                    break
            if learned:
                break
            if crew and args.kill_worker_at is not None and time.monotonic() - started >= args.kill_worker_at \
                    and crew[0].poll() is None:
                crew[0].send_signal(signal.SIGKILL)  # not restarted: the others take its share
                print(f"[{time.monotonic() - started:6.1f}s] worker w0 killed (SIGKILL)", flush=True)
            a_rss, a_cpu = proc_stat(agg.pid)
            b_rss, b_cpu = proc_stat(broker.process.pid)
            samples.append({"t": round(time.monotonic() - started, 1), "aggregator_rss_mb": round(a_rss, 1),
                            "aggregator_cpu_s": round(a_cpu, 2), "broker_rss_mb": round(b_rss, 1),
                            "broker_cpu_s": round(b_cpu, 2)})
            print(f"[{samples[-1]['t']:6.1f}s] aggregator {a_rss:.0f} MB, {a_cpu:.1f} CPU s; broker {b_rss:.0f} MB, "
                  f"{b_cpu:.1f} CPU s", flush=True)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(120)
        for c in crew:
            c.send_signal(signal.SIGTERM)
        for c in crew:
            c.wait(60)
        agg.send_signal(signal.SIGTERM)
        agg.wait(60)
        broker.stop()
    results = [json.loads((work / f"worker-{i}.json").read_text()) for i in range(len(workers))]
    acks = [tuple(x) for r in results for x in r["acks"]]
    accepted = {f"{a}/{u}" for a, u, status, _, _, _ in acks if status == "accepted"}
    settled_dup = {f"{a}/{u}" for a, u, _, reason, _, _ in acks if reason == "duplicate"}
    rejected = Counter(reason for _, _, status, reason, _, _ in acks if status == "rejected" and reason != "duplicate")
    applied_list = [f"{agent}/{codec.decode(p).metadata['fedmqtt.update_id']}"
                    for _, agent, p in journal.applied_updates(work / "state")]
    for _, _, p in journal.applied_updates(work / "state", journal.COMBINED):  # a worker's sum: its members
        meta = codec.decode(p).metadata
        applied_list += [dedup.key(a, u) for a, u, _ in members.parse(meta, int(meta["fedmqtt.base_version"]))]
    applied = set(applied_list)
    latencies = [lat for _, _, status, _, lat, _ in acks if status == "accepted"]
    online = [lat for _, _, status, _, _, lat in acks if status == "accepted" and lat is not None]
    window = samples[-1]["t"] if samples else args.seconds
    steady = [s for s in samples if s["t"] >= 60] or samples
    summary = {
        "agents": args.agents, "seconds": window, "load_processes": len(workers),
        "sent": sum(r["sent"] for r in results), "re_sent": sum(r["resent"] for r in results),
        "departures": sum(r["departures"] for r in results), "connection_errors": sum(
            (Counter(r["errors"]) for r in results), Counter()),
        "accepted": len(accepted), "accepted_per_s": round(len(accepted) / window, 1),
        "rejected": dict(rejected), "ack_latency_p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "ack_latency_p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "ack_latency_while_online_p50_p99_ms": [round(percentile(online, 50) * 1000, 1),
                                                round(percentile(online, 99) * 1000, 1)],
        "lost": len((accepted | settled_dup) - applied), "applied_twice": len(applied_list) - len(applied),
        "unacknowledged_at_end": sum(len(r["unacknowledged"]) for r in results),
        "aggregator_rss_mb_first_last_steady": [steady[0]["aggregator_rss_mb"], steady[-1]["aggregator_rss_mb"]]
        if steady else None,
        "aggregator_cpu_share": round((samples[-1]["aggregator_cpu_s"] - samples[0]["aggregator_cpu_s"])
                                      / max(samples[-1]["t"] - samples[0]["t"], 1e-9), 3) if len(samples) > 1 else None,
        "broker_rss_mb_max": max(s["broker_rss_mb"] for s in samples) if samples else None,
        "broker_cpu_share": round((samples[-1]["broker_cpu_s"] - samples[0]["broker_cpu_s"])
                                  / max(samples[-1]["t"] - samples[0]["t"], 1e-9), 3) if len(samples) > 1 else None,
        "load_cpu_share": round(sum(r["cpu_seconds"] for r in results) / window, 3),
        "median_interval_between_updates_s": args.interval, "root_workers": args.root_workers,
        "worker_killed_at_s": args.kill_worker_at if args.root_workers else None,
        **learned,
    }
    print(json.dumps(summary, indent=1, default=str))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"fleet-load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"benchmark": "fleet_load", "args": {k: str(v) for k, v in vars(args).items()},
                                "machine": platform.platform(), "summary": summary, "samples": samples},
                               indent=1, default=str))
    print(f"saved {path}")
    if not os.environ.get("FEDMQTT_KEEP_LOAD"):
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    return 0 if summary["lost"] == 0 and summary["applied_twice"] == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--procs", type=int, default=4, help="load processes the agents are spread over")
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--interval", type=float, default=10.0, help="mean seconds between a device's updates")
    p.add_argument("--mean-online", type=float, default=120.0)
    p.add_argument("--mean-offline", type=float, default=20.0)
    p.add_argument("--ack-timeout", type=float, default=30.0)
    p.add_argument("--strategy", default="fedbuff")
    p.add_argument("--buffer-size", type=int, default=50)
    p.add_argument("--out-dir", type=Path, default=ROOT / "results")
    p.add_argument("--train", default="", help="agents train this task for real (e.g. digits-linear)")
    p.add_argument("--local-steps", type=int, default=0, help="--train: local steps per round (default: the task's)")
    p.add_argument("--local-lr", type=float, default=0.0, help="--train: local learning rate (default: the task's)")
    p.add_argument("--server-lr", type=float, default=1.0, help="--train: the aggregator's server learning rate")
    p.add_argument("--dp-clip", type=float, default=None, help="central DP at the aggregator: clip")
    p.add_argument("--dp-noise", type=float, default=None, help="central DP at the aggregator: noise multiplier")
    p.add_argument("--dp-adjacency", default=None, help="central DP: replace (default), zero-out, add-remove "
                                                        "(with --dp-sampling: the default there)")
    p.add_argument("--dp-sampling", type=float, default=None, help="central DP: steps on a clock, each update "
                                                                    "taken with this probability")
    p.add_argument("--dp-step-seconds", type=float, default=4.0, help="--dp-sampling: seconds between steps")
    p.add_argument("--dp-max-steps", type=int, default=None, help="central DP: steps one device may take part in")
    p.add_argument("--until-version", type=int, default=None, help="stop when the model reaches this version")
    p.add_argument("--root-workers", type=int, default=0, help="`fedmqtt worker` processes in front of the "
                                                               "aggregator (FedBuff; the aggregator takes their sums)")
    p.add_argument("--kill-worker-at", type=float, default=None, help="--root-workers: SIGKILL one worker at "
                                                                       "this second (not restarted)")
    # a load process (started by the driver)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--broker", default="", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        asyncio.run(Worker(args).run())
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())

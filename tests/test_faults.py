"""Fault injection against real processes, then a ledger check (in the spirit of Jepsen's queue checkers).

The aggregator runs as ``python -m fedmqtt aggregator --state-dir ... --keep-journal`` and is killed with
SIGKILL at random moments, six times; Mosquitto is stopped cleanly once and killed once; one agent is
restarted (its outbox lives on disk). Afterwards:

* acknowledged: every update an agent was told "accepted" (or "duplicate": applied before) is in the
  aggregator's journal — the ledger of what it applied — exactly once (lost = 0, applied twice = 0);
* versions only grew: each restarted aggregator resumed at a version >= every version acknowledged before;
* the final model still reaches its accuracy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedmqtt import codec, core, journal, snapshot
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.broker import MosquittoProcess
from fedmqtt.schemas import Ack
from fedmqtt.strategies import fedasync
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import mqtt_connector

pytestmark = [pytest.mark.fault, pytest.mark.broker, pytest.mark.slow]

AGENTS = 4
AGG_KILLS = 6
RESUMED = re.compile(r"resumed at version (\d+)")


class AggregatorProcess:
    """``fedmqtt aggregator`` as a subprocess; each incarnation logs to its own file."""

    def __init__(self, port: int, federation: str, state_dir: Path, logs: Path) -> None:
        self.args = [sys.executable, "-m", "fedmqtt", "aggregator", "--broker", f"mqtt://127.0.0.1:{port}",
                     "--federation", federation, "--strategy", "fedasync",
                     "--state-dir", str(state_dir), "--keep-journal", "--snapshot-every", "40"]
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.resumed: list[int] = []
        self.killed: list[int] = []

    def start(self) -> None:
        self.incarnation += 1
        self.log = self.logs / f"aggregator-{self.incarnation}.log"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=err, env=env)

    async def wait_resumed(self, within: float = 60.0) -> int:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            m = RESUMED.search(self.log.read_text(errors="replace"))
            if m:
                return int(m.group(1))
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"aggregator exited: {self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"aggregator did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.killed.append(self.proc.wait())  # the exit status: -9 when the kill is what ended it

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def test_kills_and_broker_restarts_lose_nothing(mosquitto: MosquittoProcess, federation: str,
                                                       tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("FEDMQTT_FAULT_SEED", "4")))
    state, outboxes = tmp_path / "state", tmp_path / "outbox"
    topics = Topics(federation=federation)
    task = get_task("digits", num_clients=AGENTS, seed=0)
    connect = mqtt_connector(mosquitto.config)
    acks: list[tuple[str, Ack]] = []
    cfg = AgentConfig(topics=topics, local_steps=10, round_seconds=0.15, ack_timeout=2.0, backoff_max=1.0,
                      outbox_dir=outboxes, max_outbox=4)

    incarnations: list[EdgeAgent] = []

    def make_agent(i: int) -> EdgeAgent:
        agent_id = f"edge-{i}"
        incarnations.append(EdgeAgent(connect, agent_id, task.trainer(0), task.data_for(i, 0), replace(cfg),
                                      on_ack=lambda ack, a=agent_id: acks.append((a, ack))))
        return incarnations[-1]

    def max_acked() -> int:
        return max((a.version for _, a in acks if a.status == "accepted"), default=0)

    agg = AggregatorProcess(mosquitto.port, federation, state, tmp_path)
    agg.start()
    agg.resumed.append(await agg.wait_resumed())
    events = ["aggregator"] * AGG_KILLS + ["broker-stop", "broker-kill", "agent-restart"]
    rng.shuffle(events)
    log: list[str] = []
    agents: list[EdgeAgent] = []
    broker_exits: list[int | None] = []  # Mosquitto's exit status at each stop and kill
    try:
        for i in range(AGENTS):
            agents.append(make_agent(i))
            await agents[-1].__aenter__()
        while len(acks) < 10:  # let the federation get going
            await asyncio.sleep(0.1)
        for event in events:
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            if event == "aggregator":
                agg.kill()
                before = max_acked()
                agg.start()
                resumed = await agg.wait_resumed()
                agg.resumed.append(resumed)
                assert resumed >= before, f"resumed at {resumed} after acknowledging version {before}"
                log.append(f"kill -9 aggregator: acked up to v{before}, resumed at v{resumed}")
            elif event == "broker-stop":
                mosquitto.stop()
                broker_exits.append(mosquitto.process.returncode if mosquitto.process else None)
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                await mosquitto.start()
                log.append("mosquitto: clean stop, restart")
            elif event == "broker-kill":
                mosquitto.kill()
                broker_exits.append(mosquitto.process.returncode if mosquitto.process else None)
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                await mosquitto.start()
                log.append("mosquitto: kill -9, restart")
            else:
                old = agents[0]
                await old.__aexit__(None, None, None)
                pending = len(old.outbox)
                agents[0] = make_agent(0)
                await agents[0].__aenter__()
                assert len(agents[0].outbox) == pending  # the disk outbox survived the restart
                log.append(f"agent edge-0 restarted with {pending} unacknowledged update(s) from disk")
        # Quiet time: outboxes drain (re-sends after the timeout) against the last incarnation.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
                sum(len(a.outbox) for a in agents) > AGENTS or len(acks) < 150):
            await asyncio.sleep(0.2)
        pending = sum(len(a.outbox) for a in agents)
    finally:
        for a in agents:
            with contextlib.suppress(Exception):
                await a.__aexit__(None, None, None)
        agg.terminate()  # clean stop: writes a final snapshot

    # ---- the ledger -------------------------------------------------------------------------------------
    applied_list = []
    for _, agent, payload in journal.applied_updates(state):
        meta = codec.decode(payload).metadata
        applied_list.append(f"{agent}/{meta['fedmqtt.update_id']}")
    applied = set(applied_list)
    applied_twice = len(applied_list) - len(applied)
    accepted = {f"{a}/{ack.update_id}" for a, ack in acks if ack.status == "accepted"}
    settled_dup = {f"{a}/{ack.update_id}" for a, ack in acks if ack.reason == "duplicate"}
    rejected = Counter(a.reason for _, a in acks if a.status == "rejected" and a.reason != "duplicate")
    # A re-send refused as stale may have been applied from an earlier copy: the agent files it as
    # "unknown", never as rejected.
    unknown = {f"{a.agent_id}/{u}" for a in incarnations for u in a.unknown}
    told_rejected = {f"{a}/{ack.update_id}" for a, ack in acks if ack.status == "rejected" and ack.reason != "duplicate"}
    told_rejected_but_applied = (told_rejected - unknown) & applied
    stale = {f"{a}/{ack.update_id}" for a, ack in acks if ack.reason == "stale"}
    lost = (accepted | settled_dup) - applied
    trainer = task.trainer(0)
    found = snapshot.read(state, core.rules(fedasync(), trainer.initial), epoch="")
    assert found is not None
    snap = found[1]
    x, y = task.test_data
    accuracy = trainer.evaluate({k: np.asarray(v) for k, v in snap.params.items()}, {"x": x, "y": y})["accuracy"]

    print("\n".join(["", *log]))
    print(f"ledger: acknowledged {len(accepted)} accepted + {len(settled_dup)} settled as duplicate, "
          f"applied {len(applied_list)} ({len(applied)} distinct), duplicates suppressed {len(settled_dup)} "
          f"(aggregator counted {snap.counters.rejected.get('duplicate', 0)} since its last snapshot), applied twice {applied_twice}, lost {len(lost)}; other rejections {dict(rejected)}; "
          f"outcome unknown {len(unknown)} ({len(unknown & applied)} of them applied); "
          f"told rejected but applied {len(told_rejected_but_applied)}; still pending in outboxes {pending}")
    print(f"versions at each start: {agg.resumed}; final version {snap.version}, accepted counter "
          f"{snap.counters.accepted}; accuracy {accuracy:.3f}")

    assert agg.killed == [-signal.SIGKILL] * AGG_KILLS  # every kill ended a running aggregator
    assert len(agg.resumed) == AGG_KILLS + 1  # and each restart resumed
    assert len(broker_exits) == 2 and -signal.SIGKILL in broker_exits and None not in broker_exits
    assert told_rejected_but_applied == set()
    assert unknown <= stale  # only a stale refusal of a re-send is "unknown"
    assert lost == set(), f"acknowledged but never applied: {sorted(lost)[:5]}"
    assert applied_twice == 0
    assert snap.counters.accepted == len(applied_list)  # the state holds exactly what the ledger says
    assert agg.resumed == sorted(agg.resumed), "versions only grow"
    assert snap.version >= max([*agg.resumed, max_acked()])
    assert len(accepted) >= 50
    assert accuracy >= 0.85


async def test_aggregator_with_no_options_resumes_after_kill_9(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """``fedmqtt aggregator`` with no option is durable: its state lives in the user's data directory."""
    data_home = tmp_path / "data"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_DATA_HOME": str(data_home),
           "FEDMQTT_BROKER_URL": f"mqtt://127.0.0.1:{mosquitto.port}"}
    topics = Topics()  # the defaults: prefix fedmqtt, federation default
    task = get_task("digits", num_clients=2, seed=0)
    connect = mqtt_connector(mosquitto.config)
    acked: list[int] = []

    def start(n: int) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"aggregator-{n}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "fedmqtt", "aggregator"], stdout=subprocess.DEVNULL,
                                    stderr=err, env=env)
        return proc, log

    async def resumed(proc: subprocess.Popen[bytes], log: Path) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = RESUMED.search(log.read_text(errors="replace"))
            if m:
                return int(m.group(1))
            assert proc.poll() is None, log.read_text()[-3000:]
            await asyncio.sleep(0.05)
        raise TimeoutError(log.read_text()[-3000:])

    proc, log = start(1)
    try:
        assert await resumed(proc, log) == 0
        assert f"state in {data_home / 'fedmqtt' / 'fedmqtt' / 'default'}" in log.read_text()
        agents = [EdgeAgent(connect, f"d-{i}", task.trainer(0), task.data_for(i, 0),
                            AgentConfig(topics=topics, local_steps=5, ack_timeout=2.0),
                            on_ack=lambda ack: acked.append(ack.version) if ack.status == "accepted" else None)
                  for i in range(2)]
        async with contextlib.AsyncExitStack() as stack:
            for a in agents:
                await stack.enter_async_context(a)
            await agents[0].wait_until(lambda: len(acked) >= 20, 120, lambda: f"{len(acked)} acks")
            proc.send_signal(signal.SIGKILL)  # mid-run: the agents keep training and sending
            proc.wait()
            before = max(acked)
            proc, log = start(2)
            after = await resumed(proc, log)
            assert after >= before > 0, f"acknowledged version {before}, resumed at {after}"
            count = len(acked)
            await agents[0].wait_until(lambda: len(acked) >= count + 5, 120, lambda: "no progress after restart")
        assert max(acked) > after  # it went on from there
    finally:
        proc.kill()
        proc.wait()

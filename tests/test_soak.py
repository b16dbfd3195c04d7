"""Long run (``-m soak``): the aggregator's memory stays flat while streaming agents train and a crowd of
never-repeating agent ids sends updates and presence. RSS is read from /proc/<pid>/status.

FEDMQTT_SOAK_SECONDS sets the length (default 120).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from fedmqtt import codec
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.broker import MosquittoProcess
from fedmqtt.schemas import Ack, Metrics, Status, dump
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import ConnectOptions, Inbox, mqtt_connector

pytestmark = [pytest.mark.soak, pytest.mark.broker, pytest.mark.slow]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_aggregator(port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "fedmqtt", "aggregator", "--broker", f"mqtt://127.0.0.1:{port}",
            "--federation", "soak", "--strategy", "fedasync", "--state-dir", str(tmp_path / "state"),
            "--snapshot-every", "200"]
    with open(tmp_path / "aggregator.log", "wb") as err:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)


async def stream(x: np.ndarray, y: np.ndarray, seed: int) -> AsyncIterator[dict[str, np.ndarray]]:
    """A sensor feed: an endless stream of fresh mini-batches."""
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(0, len(x), 32)
        yield {"x": x[idx], "y": y[idx]}
        await asyncio.sleep(0)


async def test_memory_is_flat_under_streaming_agents_and_agent_churn(mosquitto: MosquittoProcess,
                                                                     tmp_path: Path) -> None:
    seconds = float(os.environ.get("FEDMQTT_SOAK_SECONDS", "120"))
    topics = Topics(federation="soak")
    connect = mqtt_connector(mosquitto.config)
    task = get_task("digits", num_clients=4, seed=0)
    trainer = task.trainer(0)
    fp = codec.fingerprint(trainer.initial)
    proc = start_aggregator(mosquitto.port, tmp_path)
    samples: list[tuple[float, float]] = []
    latest = 0
    crowd_sent = 0
    try:
        agents = []
        for i in range(4):
            x, y = task.client_data(i)
            agents.append(EdgeAgent(connect, f"stream-{i}", task.trainer(0), stream(x, y, i),
                                    AgentConfig(topics=topics, local_steps=5, round_seconds=0.3)))
        async with contextlib.AsyncExitStack() as stack:
            for a in agents:
                await stack.enter_async_context(a)
            acks = Inbox()
            crowd = await stack.enter_async_context(connect(ConnectOptions("soak-crowd", on_message=acks)))
            await crowd.subscribe(f"{topics.base}/agents/+/acks")

            async def versions() -> None:
                nonlocal latest
                async for msg in acks:
                    latest = max(latest, Ack.model_validate_json(msg.payload).version)

            reader = asyncio.create_task(versions())
            zero = {k: np.zeros_like(v) for k, v in trainer.initial.items()}
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                # A new agent id every time: presence on, one update, presence off (memory must not grow).
                agent = f"crowd-{crowd_sent}"
                update = codec.encode_update(zero, agent=agent, update_id=f"u{crowd_sent}",
                                             base_version=latest, num_samples=1, model_fingerprint=fp)
                await crowd.publish(topics.status(agent), dump(Status(agent=agent, state="online")))
                await crowd.publish(topics.update(agent), update)
                await crowd.publish(topics.status(agent), dump(Status(agent=agent, state="offline")))
                crowd_sent += 1
                if crowd_sent % 20 == 0:
                    samples.append((time.monotonic() - start, rss_mib(proc.pid)))
                await asyncio.sleep(0.05)
            reader.cancel()
            inbox = Inbox()
            async with connect(ConnectOptions("soak-metrics", on_message=inbox)) as probe:
                await probe.subscribe(topics.metrics)
                metrics = Metrics.model_validate_json((await inbox.get(timeout=30)).payload)
    finally:
        proc.terminate()
        proc.wait(30)

    warm = [r for t, r in samples if seconds * 0.25 <= t < seconds * 0.5]
    end = [r for t, r in samples if t >= seconds * 0.75]
    growth = statistics.median(end) - statistics.median(warm)
    print(f"\nsoak {seconds:.0f}s: {crowd_sent} crowd agent ids + 4 streaming agents; "
          f"version {metrics.version}, accepted {metrics.accepted}, dropped {metrics.dropped}; "
          f"aggregator RSS MiB: "
          f"first {samples[0][1]:.0f}, warm median {statistics.median(warm):.0f}, "
          f"end median {statistics.median(end):.0f}, max {max(r for _, r in samples):.0f}")
    assert metrics.accepted > crowd_sent / 2
    assert growth < max(0.1 * statistics.median(warm), 16.0), f"RSS grew {growth:.1f} MiB"

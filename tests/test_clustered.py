"""A federation on a 3-node NATS cluster (JetStream and MQTT on every node, the MQTT streams replicated on
all three), agents connected to different nodes; one node killed mid-run: learning goes on and the
aggregator's journal holds every update acknowledged ``accepted``, each once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmqtt import codec, journal
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.broker import free_port, wait_listening
from fedmqtt.schemas import Ack
from fedmqtt.strategies import fedasync
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, mqtt_connector

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.cluster]
NATS = shutil.which("nats-server")


class NatsCluster:
    """Three nats-server processes of our own on free loopback ports (never the machine's service)."""

    def __init__(self, nodes: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fedmqtt-nats-"))
        self.routes = [free_port() for _ in range(nodes)]
        self.mqtt = [free_port() for _ in range(nodes)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(nodes):
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            conf = self.dir / f"n{i}.conf"
            conf.write_text(f"listen: 127.0.0.1:{free_port()}\nserver_name: n{i}\n"
                            f'jetstream {{ store_dir: "{self.dir}/js{i}" }}\n'
                            f"cluster {{ name: fedmqtt; listen: 127.0.0.1:{self.routes[i]}; routes: [{routes}] }}\n"
                            f"mqtt {{ listen: 127.0.0.1:{self.mqtt[i]}; stream_replicas: {nodes} }}\n")
            with open(self.dir / f"n{i}.log", "wb") as log:
                self.procs.append(subprocess.Popen([str(NATS), "-c", str(conf)], stdout=log, stderr=log))

    def url(self, first: int) -> str:
        """Every node, starting with ``first``: the client tries the next one when its node is gone."""
        order = self.mqtt[first:] + self.mqtt[:first]
        return "mqtt://" + ",".join(f"127.0.0.1:{p}" for p in order) + "?version=3.1.1"

    def kill(self, i: int) -> int:
        self.procs[i].send_signal(signal.SIGKILL)
        return self.procs[i].wait()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    if NATS is None:
        pytest.skip("no nats-server binary")
    c = NatsCluster()
    try:
        yield c
    finally:
        if os.environ.get("FEDMQTT_KEEP_NATS_LOGS"):
            shutil.copytree(c.dir, os.environ["FEDMQTT_KEEP_NATS_LOGS"], dirs_exist_ok=True)
        c.close()


async def test_a_node_killed_mid_run_loses_nothing_acknowledged(cluster: NatsCluster, tmp_path: Path) -> None:
    for port in cluster.mqtt:
        await wait_listening("127.0.0.1", port, 20)
    topics = Topics(federation="cluster")
    task = get_task("digits", num_clients=3, seed=0)
    state = tmp_path / "state"
    acks: list[tuple[str, Ack]] = []
    agg = Aggregator(mqtt_connector(BrokerConfig.from_url(cluster.url(0))), task.trainer(0).initial, fedasync(),
                     AggregatorConfig(topics=topics, state_dir=state, keep_journal=True))
    agents = [EdgeAgent(mqtt_connector(BrokerConfig.from_url(cluster.url(i))), f"e{i}", task.trainer(0),
                        task.data_for(i, 0), AgentConfig(topics=topics, local_steps=10, round_seconds=0.1,
                                                         ack_timeout=3.0, backoff_max=1.0,
                                                         outbox_dir=tmp_path / "outbox"),
                        on_ack=lambda ack, a=f"e{i}": acks.append((a, ack)))
              for i in range(3)]
    timeline = []
    async with agg, contextlib.AsyncExitStack() as stack:
        for a in agents:
            await stack.enter_async_context(a)
        await agg.wait_version(15, 60)
        before = len(acks)
        assert cluster.kill(1) == -signal.SIGKILL  # the node of e1
        killed = time.monotonic()
        while len(acks) < before + 30:  # learning goes on through the two nodes left
            assert time.monotonic() - killed < 60, (f"stalled: {len(acks) - before} acks since the kill; "
                                                    f"connects {agg.connects} {[a.connects for a in agents]}; {agg.last_error}, "
                                                    f"{[a.last_error for a in agents]}")
            await asyncio.sleep(0.2)
        timeline.append(time.monotonic() - killed)
        assert agents[1].connects >= 2  # e1 moved to another node
        deadline = time.monotonic() + 30
        while sum(len(a.outbox) for a in agents) > 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    applied = [f"{agent}/{codec.decode(p).metadata['fedmqtt.update_id']}"
               for _, agent, p in journal.applied_updates(state)]
    accepted = {f"{a}/{ack.update_id}" for a, ack in acks if ack.status == "accepted"}
    print(f"\n30 acks {timeline[0]:.1f} s after the kill; accepted {len(accepted)}, applied {len(applied)}")
    assert len(applied) == len(set(applied))  # nothing applied twice
    assert accepted <= set(applied)  # nothing acknowledged lost

"""``fedmqtt edge``: one agent on its shard of a built-in task."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.cli_run import err, run, serve
from fedmqtt.compression import Compression
from fedmqtt.tasks import get_task, index_of
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, mqtt_connector


def status(agent: EdgeAgent) -> str:
    version = f"model v{agent.model.info.version}" if agent.model is not None else "no model yet"
    a = agent.acks
    unknown = f", {a['unknown']} unknown" if a.get("unknown") else ""
    return (f"{version}, sent {agent.updates_sent}, accepted {a['accepted']}, rejected {a['rejected']}{unknown}, "
            f"{len(agent.outbox)} waiting for an ack, {'connected' if agent.connected.is_set() else 'offline'}")


def run_edge(s: dict[str, Any]) -> None:
    task = get_task(s["task"], num_clients=s["num_shards"], seed=s["seed"]) if s["task"] == "digits" \
        else get_task(s["task"], seed=s["seed"])
    index = s["shard"] if s["shard"] is not None else index_of(s["agent_id"], task.num_clients)
    cfg = AgentConfig(topics=Topics(s["prefix"], s["federation"]), local_steps=s["local_steps"],
                      round_seconds=s["round_seconds"], outbox_dir=s["outbox_dir"], model_key=s["model_key"],
                      compression=Compression.parse(s["compression"]), model_delivery=s["model_delivery"],
                      model_download=s["model_download"])
    if s["dp_clip"] is not None:
        from fedmqtt.privacy import ClientDP

        cfg = replace(cfg, dp=ClientDP(s["dp_clip"], s["dp_noise"]))
    agent = EdgeAgent(mqtt_connector(BrokerConfig.from_url(s["broker"])), s["agent_id"],
                      task.trainer(s["seed"], prox_rho=s["prox_rho"]), task.data_for(index, s["seed"]), cfg)
    err.print(f"edge agent {s['agent_id']}: shard {index} of {task.name}, {agent.data.num_samples} examples, "
              f"{s['broker']}")
    exporter = None
    if s["metrics_port"] is not None:
        from fedmqtt.prometheus import EdgeExporter, EdgeReading

        exporter = EdgeExporter()
        port = exporter.start(s["metrics_port"], s["metrics_bind"])
        err.print(f"edge agent {s['agent_id']}: Prometheus metrics on http://{s['metrics_bind']}:{port}/metrics")

    def tick() -> None:
        if exporter is not None:
            exporter.update(EdgeReading(agent.updates_sent, dict(agent.acks), len(agent.outbox),
                                        agent.model.info.version if agent.model is not None else None,
                                        agent.connected.is_set(), agent.last_loss))

    try:
        run(serve(agent, lambda: status(agent), s["status_every"], tick))
    finally:
        if exporter is not None:
            exporter.stop()

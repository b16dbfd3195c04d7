"""``fedmqtt edge``: one agent on its shard of a built-in task.

With ``--follow-assignments`` (or ``--tasks`` / ``--tags``) the agent advertises its capabilities and follows
a coordinator's assignment; when one moves it to another federation, the agent there is started here, on that
federation's topics with that task's model and data (the same process, the same agent id).
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import replace
from typing import Any

from fedmqtt import footprint
from fedmqtt.agent import AgentConfig, AllocationConfig, EdgeAgent
from fedmqtt.agent_allocation import moved_config
from fedmqtt.choices import parse_list, parse_tags
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


def agent_config(s: dict[str, Any]) -> AgentConfig:
    """The agent's settings from the command's."""
    cfg = AgentConfig(topics=Topics(s["prefix"], s["federation"]), local_steps=s["local_steps"],
                      round_seconds=s["round_seconds"], outbox_dir=s["outbox_dir"], model_key=s["model_key"],
                      compression=Compression.parse(s["compression"]), model_delivery=s["model_delivery"],
                      model_download=s["model_download"], secure=s["secure"])
    if s["dp_clip"] is not None:
        from fedmqtt.privacy import ClientDP

        cfg = replace(cfg, dp=ClientDP(s["dp_clip"], s["dp_noise"]))
    if s["follow_assignments"] or s["tasks"] or s["tags"]:
        cfg = replace(cfg, allocation=AllocationConfig(s["task"], parse_list(s["tasks"]), parse_tags(s["tags"])))
    return cfg


def build_agent(s: dict[str, Any], cfg: AgentConfig) -> EdgeAgent:
    """An agent on ``cfg``'s federation, with the model and data of its task (``cfg.allocation.task``, else
    ``--task``)."""
    name = cfg.allocation.task if cfg.allocation is not None else s["task"]
    task = get_task(name, num_clients=s["num_shards"], seed=s["seed"]) if name == "digits" \
        else get_task(name, seed=s["seed"])
    index = s["shard"] if s["shard"] is not None else index_of(s["agent_id"], task.num_clients)
    trainer = task.trainer(s["seed"], prox_rho=s["prox_rho"], zero_init=True,  # it trains the aggregator's model
                           compiler_options=footprint.COMPILER_OPTIONS)
    agent = EdgeAgent(mqtt_connector(BrokerConfig.from_url(s["broker"])), s["agent_id"], trainer,
                      task.data_for(index, s["seed"]), cfg)
    err.print(f"edge agent {s['agent_id']}: shard {index} of {task.name}, {agent.data.num_samples} examples, "
              f"federation {cfg.topics.federation}, {s['broker']}")
    return agent


def run_edge(s: dict[str, Any]) -> None:
    footprint.limit_threads(s["threads"])  # before the first array: JAX's backend starts with it
    footprint.hand_back()  # the library's code run once, at import
    current = [build_agent(s, agent_config(s))]  # the agent of the federation it works on now
    trained: list[EdgeAgent] = []  # agents that have done a local round, after which memory is handed back
    exporter = None
    if s["metrics_port"] is not None:
        from fedmqtt.prometheus import EdgeExporter, EdgeReading

        exporter = EdgeExporter()
        port = exporter.start(s["metrics_port"], s["metrics_bind"])
        err.print(f"edge agent {s['agent_id']}: Prometheus metrics on http://{s['metrics_bind']}:{port}/metrics")

    def tick() -> None:
        agent = current[0]
        if agent.trained_versions and agent not in trained:  # its local round is compiled: what that took
            footprint.hand_back()
            trained[:] = [agent]
        if exporter is not None:
            exporter.update(EdgeReading(agent.updates_sent, dict(agent.acks), len(agent.outbox),
                                        agent.model.info.version if agent.model is not None else None,
                                        agent.connected.is_set(), agent.last_loss))

    async def main(stop: asyncio.Event) -> None:
        while True:
            agent = current[0]
            await serve(agent, functools.partial(status, agent), s["status_every"], tick)(stop)
            moved = agent.reassigned
            if stop.is_set() or moved is None:
                return
            err.print(f"edge agent {s['agent_id']}: assigned to federation {moved.federation} (task "
                      f"{moved.task}): moving there")
            current[0] = build_agent(s, moved_config(agent.config, moved))

    try:
        run(main)
    finally:
        if exporter is not None:
            exporter.stop()

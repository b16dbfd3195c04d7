"""The learning half of ``fleet_load.py --train``: light agents that train for real, and the run's end (the
aggregator's version, the final model's accuracy and the DP fields of its metrics)."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from typing import Any

import numpy as np

from fedmqtt import codec
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Message, mqtt_connector

FEDERATION = "load"


class Learner:
    """A load process's real training: the task's trainer, each agent's shard, one local round per update."""

    def __init__(self, args: argparse.Namespace) -> None:
        from dataclasses import replace

        from fedmqtt.tasks import get_task

        task = get_task(args.train, num_clients=args.agents, seed=0)
        self.task = replace(task, local_steps=args.local_steps or task.local_steps,
                            learning_rate=args.local_lr or task.learning_rate)
        self.trainer = self.task.trainer(0)
        self.data: dict[int, Any] = {}

    def round(self, index: int, params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        if index not in self.data:
            self.data[index] = self.task.data_for(index)
        data = self.data[index]
        new, _ = self.trainer.train(params, data.batches(self.task.local_steps))
        return {k: np.asarray(new[k] - params[k], dtype=params[k].dtype) for k in params}, data.num_samples


def scrape_version(port: int) -> int:
    """The aggregator's version, from its Prometheus endpoint (0 while it is not up)."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0
    return next((int(float(line.split()[-1])) for line in text.splitlines()
                 if line.startswith("fedmqtt_version ")), 0)


async def final_model(url: str, task_name: str) -> dict[str, Any]:
    """The retained model's accuracy on the task's test set, and the DP fields of the retained metrics."""
    from fedmqtt.tasks import get_task

    got: asyncio.Queue[Message] = asyncio.Queue()
    topics = Topics(federation=FEDERATION)
    async with mqtt_connector(BrokerConfig.from_url(url))(ConnectOptions(f"fedmqtt-load-eval-{uuid.uuid4().hex[:6]}",
                                                                          on_message=got.put_nowait)) as t:
        await t.subscribe(topics.model, qos=1)
        await t.subscribe(topics.metrics, qos=1)
        model = metrics = None
        while model is None or metrics is None:
            msg = await asyncio.wait_for(got.get(), 30)
            if msg.topic == topics.model:
                model = codec.decode(msg.payload)
            else:
                metrics = json.loads(msg.payload)
    task = get_task(task_name, seed=0)
    accuracy = float(task.evaluate_fn(task.trainer(0))(dict(model.tensors))["accuracy"])
    return {"accuracy": accuracy, "model_version": int(model.metadata["fedmqtt.version"]),
            **{k: v for k, v in metrics.items() if k.startswith("dp_")}}

"""fedmqtt: asynchronous federated learning over MQTT for IoT and edge fleets.

Build an aggregator and agents from Python in a few lines (see README "Your own model and data"):

    connect = mqtt_connector(BrokerConfig.from_url("mqtt://127.0.0.1:1883"))
    trainer = Trainer(model, loss_fn, optax.sgd(0.05))
    async with EdgeAgent(connect, "device-1", trainer, ArrayData(x, y)) as agent: ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmqtt.agent import AgentConfig, EdgeAgent
    from fedmqtt.aggregator import Aggregator, AggregatorConfig
    from fedmqtt.broker import local_broker
    from fedmqtt.codec import decode, encode_model, encode_update, fingerprint
    from fedmqtt.data import ArrayData, StreamData, dirichlet_partition, iid_partition
    from fedmqtt.errors import (
        CodecError,
        ConfigError,
        FedMQTTError,
        IncompatibleModel,
        InvalidUpdate,
        Reason,
        StateError,
        TransportError,
    )
    from fedmqtt.fleet import Fleet, FleetConfig
    from fedmqtt.memory_broker import MemoryBroker
    from fedmqtt.secure import SecureAggregation, SecureConfig
    from fedmqtt.site import Site, SiteConfig
    from fedmqtt.strategies import fedasync, fedavg, fedbuff
    from fedmqtt.tasks import Task, get_task
    from fedmqtt.topics import Topics
    from fedmqtt.training import Trainer, model_params
    from fedmqtt.transport import BrokerConfig, mqtt_connector

__version__ = "0.1.0"

# Imported on first use: ``fedmqtt --help`` and argument errors need no JAX.
_HOME = {
    "AgentConfig": "fedmqtt.agent",
    "Aggregator": "fedmqtt.aggregator",
    "AggregatorConfig": "fedmqtt.aggregator",
    "ArrayData": "fedmqtt.data",
    "BrokerConfig": "fedmqtt.transport",
    "CodecError": "fedmqtt.errors",
    "ConfigError": "fedmqtt.errors",
    "EdgeAgent": "fedmqtt.agent",
    "FedMQTTError": "fedmqtt.errors",
    "Fleet": "fedmqtt.fleet",
    "FleetConfig": "fedmqtt.fleet",
    "IncompatibleModel": "fedmqtt.errors",
    "InvalidUpdate": "fedmqtt.errors",
    "MemoryBroker": "fedmqtt.memory_broker",
    "Reason": "fedmqtt.errors",
    "SecureAggregation": "fedmqtt.secure",
    "SecureConfig": "fedmqtt.secure",
    "Site": "fedmqtt.site",
    "SiteConfig": "fedmqtt.site",
    "StateError": "fedmqtt.errors",
    "StreamData": "fedmqtt.data",
    "Task": "fedmqtt.tasks",
    "Topics": "fedmqtt.topics",
    "Trainer": "fedmqtt.training",
    "TransportError": "fedmqtt.errors",
    "decode": "fedmqtt.codec",
    "dirichlet_partition": "fedmqtt.data",
    "encode_model": "fedmqtt.codec",
    "encode_update": "fedmqtt.codec",
    "fedasync": "fedmqtt.strategies",
    "fedavg": "fedmqtt.strategies",
    "fedbuff": "fedmqtt.strategies",
    "fingerprint": "fedmqtt.codec",
    "get_task": "fedmqtt.tasks",
    "iid_partition": "fedmqtt.data",
    "local_broker": "fedmqtt.broker",
    "model_params": "fedmqtt.training",
    "mqtt_connector": "fedmqtt.transport",
}

__all__ = [
    "AgentConfig",
    "Aggregator",
    "AggregatorConfig",
    "ArrayData",
    "BrokerConfig",
    "CodecError",
    "ConfigError",
    "EdgeAgent",
    "FedMQTTError",
    "Fleet",
    "FleetConfig",
    "IncompatibleModel",
    "InvalidUpdate",
    "MemoryBroker",
    "Reason",
    "SecureAggregation",
    "SecureConfig",
    "Site",
    "SiteConfig",
    "StateError",
    "StreamData",
    "Task",
    "Topics",
    "Trainer",
    "TransportError",
    "decode",
    "dirichlet_partition",
    "encode_model",
    "encode_update",
    "fedasync",
    "fedavg",
    "fedbuff",
    "fingerprint",
    "get_task",
    "iid_partition",
    "local_broker",
    "model_params",
    "mqtt_connector",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'fedmqtt' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

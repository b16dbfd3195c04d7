"""fedmqtt: asynchronous federated learning over MQTT for IoT and edge fleets.

Build an aggregator and agents from Python in a few lines (see README "Your own model and data"):

    connect = mqtt_connector(BrokerConfig.from_url("mqtt://127.0.0.1:1883"))
    trainer = Trainer(model, loss_fn, optax.sgd(0.05))
    async with EdgeAgent(connect, "device-1", trainer, ArrayData(x, y)) as agent: ...
"""

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
from fedmqtt.strategies import fedasync, fedavg, fedbuff
from fedmqtt.tasks import Task, get_task
from fedmqtt.topics import Topics
from fedmqtt.training import Trainer, model_params
from fedmqtt.transport import BrokerConfig, MemoryBroker, mqtt_connector

__version__ = "0.1.0"

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

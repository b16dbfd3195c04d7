"""Aggregation strategies: pure functions on pytrees."""

from fedmqtt.strategies.base import ClientUpdate, EmptyState, Strategy
from fedmqtt.strategies.fedasync import fedasync
from fedmqtt.strategies.fedavg import FedAvgState, fedavg
from fedmqtt.strategies.fedbuff import FedBuffState, fedbuff, server_optimizer
from fedmqtt.strategies.robust import RobustState, robust_fedbuff
from fedmqtt.strategies.staleness import StalenessFn, constant, hinge, polynomial

__all__ = [
    "ClientUpdate",
    "EmptyState",
    "FedAvgState",
    "FedBuffState",
    "RobustState",
    "StalenessFn",
    "Strategy",
    "constant",
    "fedasync",
    "fedavg",
    "fedbuff",
    "hinge",
    "polynomial",
    "robust_fedbuff",
    "server_optimizer",
]

"""Aggregation strategies: pure functions on pytrees, composed from parts (combine rules, DP, optax)."""

from fedmqtt.strategies.base import ClientUpdate, EmptyState, Strategy
from fedmqtt.strategies.combine import Combine, guard, mean, median, multi_krum, norm_bound, outlier, trimmed
from fedmqtt.strategies.fedasync import fedasync
from fedmqtt.strategies.fedasync_guard import fedasync_guard
from fedmqtt.strategies.fedavg import FedAvgState, fedavg
from fedmqtt.strategies.fedbuff import FedBuffState, fedbuff, server_optimizer
from fedmqtt.strategies.staleness import StalenessFn, constant, hinge, polynomial

__all__ = [
    "ClientUpdate",
    "Combine",
    "EmptyState",
    "FedAvgState",
    "FedBuffState",
    "StalenessFn",
    "Strategy",
    "constant",
    "fedasync",
    "fedasync_guard",
    "fedavg",
    "fedbuff",
    "guard",
    "hinge",
    "mean",
    "median",
    "multi_krum",
    "norm_bound",
    "outlier",
    "polynomial",
    "server_optimizer",
    "trimmed",
]

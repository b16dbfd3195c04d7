"""Secure aggregation for FedBuff steps: the aggregator learns only the sum of a cohort's updates.

Pure parts, no I/O: ``field`` (fixed-point encoding into Z_(2^32), the AES-CTR PRG), ``shamir`` (secret
sharing), ``cohort`` (members, the SecAgg+ graph, key agreement), ``client`` and ``server`` (the two sides of
one step as sans-I/O state machines). The MQTT messages and the services that run them are in
``fedmqtt.secure`` (docs/protocol.md, "Secure aggregation").
"""

from fedmqtt.secagg.client import Client
from fedmqtt.secagg.cohort import Cohort, default_threshold
from fedmqtt.secagg.server import Server

__all__ = ["Client", "Cohort", "Server", "default_threshold"]

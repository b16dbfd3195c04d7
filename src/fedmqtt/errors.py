"""fedmqtt's exceptions.

Library exceptions (aiomqtt, safetensors, pydantic) are caught where they enter and re-raised as one of
these, ``raise ... from exc``, so callers only ever handle fedmqtt's own tree:

    FedMQTTError
    ├── TransportError          the broker connection failed or was refused
    ├── CodecError              a payload is not a well-formed fedmqtt safetensors file
    ├── InvalidUpdate           an update was parsed but breaks a rule; ``reason`` is machine-readable
    ├── IncompatibleModel       a received model does not fit the local parameter tree
    ├── InvalidMessage          a JSON message (capabilities, assignment) breaks the protocol's rules
    ├── StateError              a state directory (journal, snapshot, outbox) is unreadable or foreign
    ├── SecAggAbort             a secure-aggregation step cannot go on (too few members, a refused request)
    └── ConfigError             a setting or URL is wrong
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Machine-readable rejection reasons; they are the keys of ``rejected_by_reason`` in metrics."""

    PAYLOAD_TOO_LARGE = "payload_too_large"
    MALFORMED = "malformed"
    BAD_METADATA = "bad_metadata"
    SCHEMA = "schema"
    KIND = "kind"
    AGENT_MISMATCH = "agent_mismatch"
    FINGERPRINT = "fingerprint"
    TENSOR_NAMES = "tensor_names"
    SHAPE = "shape"
    DTYPE = "dtype"
    NON_FINITE = "non_finite"
    NORM = "norm"
    FUTURE_BASE = "future_base"
    STALE = "stale"
    DUPLICATE = "duplicate"
    BASE_UNAVAILABLE = "base_unavailable"
    BAD_TOPIC = "bad_topic"  # the update topic's agent id is not a valid id (no ack can be sent)
    ONE_PER_ROUND = "one_per_round"  # sync: the agent already has an update in this round
    RATE_LIMITED = "rate_limited"  # the device sends faster than Limits.admission.max_rate
    SHARE_EXCEEDED = "share_exceeded"  # the device holds too many of the recent accepted updates
    COMPRESSION = "compression"  # an unknown compressed form, or one whose indices or scales are invalid
    PRIVACY_BUDGET = "privacy_budget"  # central DP: the device took part in its maximum number of steps
    NOT_SAMPLED = "not_sampled"  # participation sampling: the server's coin left the device out of this step
    DUPLICATE_MEMBER = "duplicate_member"  # a worker's combined update carries an update applied before


class FedMQTTError(Exception):
    """Base class of every fedmqtt error."""


class TransportError(FedMQTTError):
    """The MQTT connection failed, was refused or dropped."""


class ConfigError(FedMQTTError):
    """A setting, URL or file given by the user is wrong."""


class CodecError(FedMQTTError):
    """A payload is not a well-formed fedmqtt safetensors file."""

    def __init__(self, reason: Reason, detail: str, update_id: str | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.update_id = update_id  # known once the metadata parsed, so the ack can name the update


class InvalidUpdate(FedMQTTError):
    """An update breaks a validation rule. ``reason`` names the rule, ``detail`` says how, and
    ``update_id`` names the update once its metadata parsed (so its ack can say which one)."""

    def __init__(self, reason: Reason, detail: str, update_id: str | None = None,
                 members: tuple[str, ...] = ()) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.update_id = update_id
        self.members = members  # duplicate_member: the members applied before (``agent/update_id``)


class StateError(FedMQTTError):
    """Durable state on disk (aggregator journal or snapshot, agent outbox) is corrupt or does not fit."""


class IncompatibleModel(FedMQTTError):
    """A received global model does not match the local model's parameter tree."""


class InvalidMessage(FedMQTTError, ValueError):
    """A JSON message breaks the protocol's rules (docs/protocol.md 10: capabilities, assignments); the
    text says which field and how. A ValueError too, as pydantic's own errors are."""


class SecAggAbort(FedMQTTError):
    """A secure-aggregation step cannot go on; ``reason`` is machine-readable (``too_few``, ``double_reveal``,
    ``bad_message``, ``phase``); nothing secret was revealed because of it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

"""MQTT topic names of protocol v1 (see docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass

from fedmqtt.types import check_id

_FORBIDDEN = set("+#/\x00")


def check_segment(value: str, what: str) -> str:
    """Return ``value`` if it is a valid single topic level (a prefix or federation name), else ValueError.
    Agent ids follow the stricter id rule (:func:`fedmqtt.types.check_id`)."""
    if not value or len(value) > 128 or any(c in _FORBIDDEN for c in value) or value.startswith("$"):
        raise ValueError(f"{what} {value!r} must be 1-128 characters without '/', '+', '#', NUL or leading '$'")
    return value


#: The one topic level a federation may not be named: the coordinator's assignments live under it.
RESERVED_FEDERATION = "coordinator"


def check_federation(value: str) -> str:
    """:func:`check_segment` for a federation name, which also may not be the reserved ``coordinator``
    (``{prefix}/coordinator/agents/{id}/assignment`` must never be one federation's agent topics)."""
    check_segment(value, "federation")
    if value == RESERVED_FEDERATION:
        raise ValueError(f"federation {value!r} is reserved for the coordinator's assignments; choose another name")
    return value


@dataclass(frozen=True)
class Topics:
    """Every topic of one federation. ``Topics().model == 'fedmqtt/default/model'``."""

    prefix: str = "fedmqtt"
    federation: str = "default"

    def __post_init__(self) -> None:
        check_segment(self.prefix, "prefix")
        check_federation(self.federation)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.federation}"

    @property
    def model(self) -> str:
        return f"{self.base}/model"

    def model_form(self, form: str) -> str:
        """The retained model in a compressed form (``float16``, ``int8``), for agents on slow links."""
        return f"{self.base}/model/{form}"

    @property
    def metrics(self) -> str:
        return f"{self.base}/metrics"

    @property
    def aggregator_status(self) -> str:
        return f"{self.base}/aggregator/status"

    @property
    def updates_wildcard(self) -> str:
        return f"{self.base}/updates/+"

    @property
    def status_wildcard(self) -> str:
        return f"{self.base}/agents/+/status"

    def update(self, agent_id: str) -> str:
        return f"{self.base}/updates/{check_id(agent_id)}"

    @property
    def combined_wildcard(self) -> str:
        """Where the root's workers send their combined updates to the aggregator that owns the model."""
        return f"{self.base}/combined/+"

    def combined(self, worker_id: str) -> str:
        return f"{self.base}/combined/{check_id(worker_id)}"

    def shared(self, group: str, topic: str) -> str:
        """An MQTT 5 shared subscription to ``topic``: the broker hands each message to one member of
        ``group``."""
        return f"$share/{check_segment(group, 'share group')}/{topic}"

    def status(self, agent_id: str) -> str:
        return f"{self.base}/agents/{check_id(agent_id)}/status"

    def acks(self, agent_id: str) -> str:
        return f"{self.base}/agents/{check_id(agent_id)}/acks"

    def agent_of_update(self, topic: str) -> str | None:
        """The agent id in an update topic, or None if ``topic`` is not one."""
        return _level_after(topic, f"{self.base}/updates/")

    def worker_of_combined(self, topic: str) -> str | None:
        """The worker id in a combined-update topic, or None if ``topic`` is not one."""
        return _level_after(topic, f"{self.base}/combined/")

    def agent_of_status(self, topic: str) -> str | None:
        head, tail = f"{self.base}/agents/", "/status"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        agent = topic[len(head) : -len(tail)]
        return agent if agent and "/" not in agent else None


def _level_after(topic: str, head: str) -> str | None:
    """The one non-empty topic level after ``head``, or None."""
    if not topic.startswith(head):
        return None
    level = topic[len(head) :]
    return level if level and "/" not in level else None


@dataclass(frozen=True)
class CoordinatorTopics:
    """The coordinator's topics: every federation's agent statuses under one prefix, and the assignments
    (protocol 1.1). ``CoordinatorTopics().assignment("edge-1") == 'fedmqtt/coordinator/agents/edge-1/assignment'``."""

    prefix: str = "fedmqtt"

    def __post_init__(self) -> None:
        check_segment(self.prefix, "prefix")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{RESERVED_FEDERATION}"

    @property
    def statuses(self) -> str:
        """Every agent's retained status in every federation."""
        return f"{self.prefix}/+/agents/+/status"

    @property
    def assignments(self) -> str:
        return f"{self.base}/agents/+/assignment"

    def assignment(self, agent_id: str) -> str:
        return f"{self.base}/agents/{check_id(agent_id)}/assignment"

    def status_of(self, topic: str) -> tuple[str, str] | None:
        """(federation, agent) of a status topic under this prefix, or None."""
        parts = topic.split("/")
        if (len(parts) != 5 or parts[0] != self.prefix or parts[2] != "agents" or parts[4] != "status"
                or parts[1] == RESERVED_FEDERATION or not parts[1] or not parts[3]):
            return None
        return parts[1], parts[3]

    def agent_of_assignment(self, topic: str) -> str | None:
        head, tail = f"{self.base}/agents/", "/assignment"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        agent = topic[len(head) : -len(tail)]
        return agent if agent and "/" not in agent else None

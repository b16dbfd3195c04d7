"""The wire form of capabilities and assignments (protocol 1.1, docs/protocol.md 10), checked at the boundary.

Pydantic models turn untrusted JSON into the plain values of capabilities.py and allocation/base.py, or
raise :class:`~fedmqtt.errors.InvalidMessage` naming the field and the rule: every number finite and
bounded, every list and map bounded, enums known, compression forms parsed by compression.py. Readers
ignore unknown keys (extensions), as for every JSON message of the protocol.

>>> c = parse_capabilities({"compute": {"steps_per_s": 50, "batch_size": 32}, "power": {"source": "battery"},
...                         "examples": 120, "tasks": ["digits"], "tags": {"hw": "rpi4"}})
>>> c.compute.steps_per_s, c.power.source, c.tasks
(50.0, 'battery', ('digits',))
>>> parse_capabilities({"power": {"source": "solar"}})
Traceback (most recent call last):
...
fedmqtt.errors.InvalidMessage: capabilities: power.source: Input should be 'mains', 'battery', 'charging' or 'unknown'
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmqtt.allocation.base import Assignment, Plan
from fedmqtt.capabilities import MAX_TAG_LEN, MAX_TAGS, MAX_TASKS, Capabilities, Compute, Link, Memory, Power
from fedmqtt.compression import Compression
from fedmqtt.errors import ConfigError, InvalidMessage
from fedmqtt.topics import check_federation
from fedmqtt.types import ID_PATTERN, SCHEMA_VERSION

MAX_MESSAGE = 16 << 10  # bytes: a status or an assignment larger than this is refused unread
MAX_INT = 2**53 - 1  # exact in every JSON reader
_NAME = r"^[A-Za-z0-9._-]{1,64}$"  # a task name
_TAG_KEY = r"^[A-Za-z0-9._:-]{1,64}$"
_POLICY = r"^[A-Za-z0-9._+-]{0,128}$"  # empty allowed (protocol.md 10.2)


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True, allow_inf_nan=False)


class ComputeMsg(_Part):
    steps_per_s: float = Field(gt=0, le=1e9)
    batch_size: int = Field(ge=1, le=1 << 20)


class MemoryMsg(_Part):
    total: int | None = Field(default=None, ge=0, le=MAX_INT)
    available: int | None = Field(default=None, ge=0, le=MAX_INT)

    @model_validator(mode="after")
    def _fits(self) -> MemoryMsg:
        if self.total is not None and self.available is not None and self.available > self.total:
            raise ValueError("available memory exceeds total")
        return self


class PowerMsg(_Part):
    source: Literal["mains", "battery", "charging", "unknown"] = "unknown"
    battery_percent: float | None = Field(default=None, ge=0, le=100)


class LinkMsg(_Part):
    uplink: float | None = Field(default=None, gt=0, le=1e12)  # bytes/s
    rtt: float | None = Field(default=None, ge=0, le=3600)  # seconds


class CapabilitiesMsg(_Part):
    """The ``capabilities`` object of an agent's status."""

    compute: ComputeMsg | None = None
    memory: MemoryMsg = Field(default_factory=MemoryMsg)
    power: PowerMsg = Field(default_factory=PowerMsg)
    link: LinkMsg = Field(default_factory=LinkMsg)
    examples: int = Field(default=0, ge=0, le=MAX_INT)
    tasks: list[str] = Field(default_factory=list, max_length=MAX_TASKS)
    tags: dict[str, str] = Field(default_factory=dict)
    loss: float | None = Field(default=None, ge=0, le=1e6)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        for t in v:
            if not re.fullmatch(_NAME, t):
                raise ValueError(f"task {t[:80]!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        if len(set(v)) != len(v):
            raise ValueError("tasks must not repeat")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags, got {len(v)}")
        for key, value in v.items():
            if not re.fullmatch(_TAG_KEY, key):
                raise ValueError(f"tag key {key[:80]!r} must be 1-{MAX_TAG_LEN} of A-Z a-z 0-9 . _ : -")
            if len(value) > MAX_TAG_LEN or not value.isprintable():
                raise ValueError(f"tag {key!r}: the value must be at most {MAX_TAG_LEN} printable characters")
        return v


class AssignmentMsg(_Part):
    """A retained assignment on ``{prefix}/coordinator/agents/{agent_id}/assignment``."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True, allow_inf_nan=False,
                              populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")  # SCHEMA_VERSION
    agent: str = Field(pattern=ID_PATTERN)
    federation: str
    task: str = Field(pattern=_NAME)
    local_steps: int | None = Field(default=None, ge=1, le=100_000)
    batch_size: int | None = Field(default=None, ge=1, le=1 << 20)
    participation: float = Field(default=1.0, gt=0, le=1)
    compression: str | None = Field(default=None, max_length=32)
    sequence: int = Field(ge=0, le=MAX_INT)
    issued_at: float = Field(ge=0, le=1e11)
    policy: str = Field(default="", pattern=_POLICY)

    @field_validator("federation")
    @classmethod
    def _federation(cls, v: str) -> str:
        return check_federation(v)  # ValueError: not a topic level, or the reserved name

    @field_validator("compression")
    @classmethod
    def _compression(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return str(Compression.parse(v))  # canonical: "topk:1%" -> "topk:0.01"
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


def _why(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def parse_capabilities(obj: Mapping[str, Any] | object) -> Capabilities:
    """A status's ``capabilities`` value (already JSON-decoded) as plain values; InvalidMessage if it is not
    an object or breaks a rule."""
    try:
        m = CapabilitiesMsg.model_validate(obj)
    except ValidationError as exc:
        raise InvalidMessage(f"capabilities: {_why(exc)}") from exc
    compute = Compute(m.compute.steps_per_s, m.compute.batch_size) if m.compute is not None else None
    return Capabilities(compute=compute, memory=Memory(m.memory.total, m.memory.available),
                        power=Power(m.power.source, m.power.battery_percent), link=Link(m.link.uplink, m.link.rtt),
                        examples=m.examples, tasks=tuple(m.tasks), tags=dict(m.tags), loss=m.loss)


def capabilities_json(c: Capabilities) -> dict[str, Any]:
    """The wire object of ``c`` (for an agent's status); checked, so an agent never sends what a coordinator
    would refuse (a NaN from a bad clock, too many tags)."""
    obj: dict[str, Any] = {
        "compute": ({"steps_per_s": c.compute.steps_per_s, "batch_size": c.compute.batch_size}
                    if c.compute is not None else None),
        "memory": {"total": c.memory.total, "available": c.memory.available},
        "power": {"source": c.power.source, "battery_percent": c.power.battery_percent},
        "link": {"uplink": c.link.uplink, "rtt": c.link.rtt},
        "examples": c.examples, "tasks": list(c.tasks), "tags": dict(c.tags), "loss": c.loss,
    }
    parse_capabilities(obj)
    return obj


def parse_assignment(payload: bytes, agent: str | None = None) -> Assignment:
    """An assignment payload as plain values; InvalidMessage if it breaks a rule (or names another agent
    than ``agent``)."""
    if len(payload) > MAX_MESSAGE:
        raise InvalidMessage(f"assignment: {len(payload)} bytes, more than {MAX_MESSAGE}")
    try:
        m = AssignmentMsg.model_validate_json(payload)
    except ValidationError as exc:
        raise InvalidMessage(f"assignment: {_why(exc)}") from exc
    if agent is not None and m.agent != agent:
        raise InvalidMessage(f"assignment: for agent {m.agent!r}, not {agent!r}")
    plan = Plan(m.federation, m.task, m.local_steps, m.batch_size, m.participation, m.compression)
    return Assignment(m.agent, plan, m.sequence, m.issued_at, m.policy)


def assignment_payload(a: Assignment) -> bytes:
    """The JSON bytes of an assignment (checked as a reader would check them)."""
    p = a.plan
    body = {"schema": SCHEMA_VERSION, "agent": a.agent, "federation": p.federation, "task": p.task,
            "local_steps": p.local_steps,
            "batch_size": p.batch_size, "participation": p.participation, "compression": p.compression,
            "sequence": a.sequence, "issued_at": a.issued_at, "policy": a.policy}
    payload = json.dumps(body, allow_nan=False).encode()
    parse_assignment(payload)
    return payload

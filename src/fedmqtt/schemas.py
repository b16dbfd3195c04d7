"""Pydantic models of everything that crosses the wire as metadata or JSON (the boundary only).

Inside the package, plain values flow (:class:`fedmqtt.types.UpdateInfo`, dicts of arrays); these
models exist to turn untrusted strings into them, with a specific error when they cannot.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmqtt.errors import InvalidUpdate, Reason
from fedmqtt.types import ID_PATTERN, SCHEMA_VERSION, Encoding, Mode, ModelInfo, UpdateInfo

SCHEMA = SCHEMA_VERSION
_HEX64 = r"^[0-9a-f]{64}$"
_INT = r"^(0|[1-9][0-9]{0,17})$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class _Message(BaseModel):
    """A JSON message that readers must accept with unknown keys (protocol: "ignore unknown keys"), of
    schema 1 and with finite numbers only (JSON has no NaN, but Python's and others' encoders write it)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True, allow_inf_nan=False)


class UpdateHeader(_Frozen):
    """The ``fedmqtt.*`` metadata of an update payload (unknown keys are dropped before this)."""

    agent: str = Field(alias="fedmqtt.agent", pattern=ID_PATTERN)
    update_id: str = Field(alias="fedmqtt.update_id", pattern=ID_PATTERN)
    base_version: str = Field(alias="fedmqtt.base_version", pattern=_INT)
    num_samples: str = Field(alias="fedmqtt.num_samples", pattern=_INT)
    encoding: Encoding = Field(alias="fedmqtt.encoding")
    fingerprint: str = Field(alias="fedmqtt.fingerprint", pattern=_HEX64)


class ModelHeader(_Frozen):
    version: str = Field(alias="fedmqtt.version", pattern=_INT)
    fingerprint: str = Field(alias="fedmqtt.fingerprint", pattern=_HEX64)
    mode: Mode = Field(default="async", alias="fedmqtt.mode")
    epoch: str = Field(default="", alias="fedmqtt.epoch", pattern=r"^[A-Za-z0-9]{0,64}$")


def _check_schema_and_kind(metadata: dict[str, str], kind: str) -> None:
    if metadata.get("fedmqtt.schema") != str(SCHEMA):
        raise InvalidUpdate(Reason.SCHEMA,
                            f"fedmqtt.schema is {metadata.get('fedmqtt.schema')!r}, expected '{SCHEMA}'")
    if metadata.get("fedmqtt.kind") != kind:
        raise InvalidUpdate(Reason.KIND, f"fedmqtt.kind is {metadata.get('fedmqtt.kind')!r}, expected {kind!r}")


def _known(metadata: dict[str, str], model: type[BaseModel]) -> dict[str, str]:
    aliases = {f.alias for f in model.model_fields.values()}
    return {k: v for k, v in metadata.items() if k in aliases}


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "metadata"
    return f"{where}: {err['msg']}"


def parse_update_metadata(metadata: dict[str, str]) -> UpdateInfo:
    """Validate an update's metadata; raises InvalidUpdate(schema|kind|bad_metadata)."""
    _check_schema_and_kind(metadata, "update")
    try:
        h = UpdateHeader.model_validate(_known(metadata, UpdateHeader))
    except ValidationError as exc:
        raise InvalidUpdate(Reason.BAD_METADATA, _first_error(exc)) from exc
    samples = int(h.num_samples)
    if samples < 1:
        raise InvalidUpdate(Reason.BAD_METADATA, "fedmqtt.num_samples must be at least 1")
    return UpdateInfo(h.agent, h.update_id, int(h.base_version), samples, h.encoding, h.fingerprint)


def parse_model_metadata(metadata: dict[str, str]) -> ModelInfo:
    """Validate a global model's metadata; raises InvalidUpdate(schema|kind|bad_metadata)."""
    _check_schema_and_kind(metadata, "model")
    try:
        h = ModelHeader.model_validate(_known(metadata, ModelHeader))
    except ValidationError as exc:
        raise InvalidUpdate(Reason.BAD_METADATA, _first_error(exc)) from exc
    return ModelInfo(int(h.version), h.fingerprint, h.mode, h.epoch)


class Ack(_Message):
    """Sent by the aggregator on ``.../agents/{id}/acks`` once per received update (QoS 1)."""

    schema_: Literal[1] = Field(default=1, alias="schema")  # SCHEMA_VERSION
    update_id: str  # empty when the update was too broken to carry one
    status: Literal["accepted", "rejected"]
    version: int
    reason: str | None = None
    detail: str | None = None
    # duplicate_member (a worker's combined update, protocol 12): its members applied before, "agent/update_id"
    members: list[str] | None = Field(default=None, exclude_if=lambda v: v is None)


class Status(_Message):
    """An agent's retained presence on ``.../agents/{id}/status``."""

    schema_: Literal[1] = Field(default=1, alias="schema")  # SCHEMA_VERSION
    agent: str
    state: Literal["online", "training", "offline"]
    version: int | None = None
    updates_sent: int = 0
    ts: float = 0.0
    # protocol 1.1: what the device can do (docs/protocol.md 10). Any JSON value here, so that presence never
    # depends on it (not even on its being an object); the coordinator validates it (parse_capabilities).
    capabilities: Any = None


class AggregatorStatus(_Message):
    """The aggregator's retained presence on ``.../aggregator/status`` (last will: offline). ``instance``
    names the state it serves (one per state directory), so a second aggregator can tell it is not alone."""

    schema_: Literal[1] = Field(default=1, alias="schema")  # SCHEMA_VERSION
    instance: str
    state: Literal["online", "offline"]
    ts: float = 0.0


class Metrics(BaseModel):
    """The aggregator's retained metrics on ``.../metrics``; readers must ignore unknown keys."""

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")  # SCHEMA_VERSION
    version: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    strategy: str = ""
    accuracy: float | None = None
    loss: float | None = None
    evaluated_version: int | None = None
    staleness_mean: float | None = None
    staleness_max: int | None = None
    staleness_hist: dict[str, int] = Field(default_factory=dict)
    agents_online: int = 0
    updates_per_s: float = 0.0
    dropped: int = 0  # incoming messages or acks that did not fit a bounded queue
    held: int = 0  # updates waiting for the next step (one update per agent per step, central DP)
    retained_cleared: int = 0  # retained messages found on update topics (ignored, then cleared)
    models_restored: int = 0  # models the aggregator did not publish, found on its model topic and replaced
    statuses_refused: int = 0  # payloads on agents' status topics that are not a status (ignored)
    ts: float = 0.0


def dump(model: BaseModel) -> bytes:
    """JSON bytes of a boundary model, with aliases (``schema``)."""
    return model.model_dump_json(by_alias=True).encode()

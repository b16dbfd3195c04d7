"""The wire form of secure aggregation (docs/protocol.md, "Secure aggregation"), checked at the boundary.

JSON messages, one pydantic model per ``type``; binary values are base64 (keys, encrypted shares) or hex
(Shamir shares, integers below 2^521). The masked input travels as a safetensors file holding one ``U32``
tensor ``masked``. Anything malformed raises :class:`~fedmqtt.errors.SecAggAbort` (``bad_message``).
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Literal

import numpy as np
import safetensors.numpy
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fedmqtt.errors import SecAggAbort
from fedmqtt.secagg.cohort import Cohort
from fedmqtt.types import ID_PATTERN

MAX_MEMBERS = 1024
_STEP = r"^[A-Za-z0-9._-]{1,80}$"
_B64 = r"^[A-Za-z0-9+/=]{1,4096}$"
_HEX = r"^[0-9a-f]{1,140}$"
Agent = Annotated[str, Field(pattern=ID_PATTERN)]


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)
    step: str = Field(pattern=_STEP)


# ---- agent -> aggregator: {base}/secagg/{agent}/{type} -----------------------------------------------------
class Ready(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    type: Literal["ready"] = "ready"
    update_id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    base_version: int = Field(ge=0, le=2**53 - 1)
    num_samples: int = Field(ge=0, le=2**53 - 1)
    dim: int = Field(ge=1, le=1 << 30)


class Keys(_Msg):
    type: Literal["keys"] = "keys"
    c_pk: str = Field(pattern=_B64)
    s_pk: str = Field(pattern=_B64)


class Shares(_Msg):
    type: Literal["shares"] = "shares"
    shares: dict[Agent, Annotated[str, Field(pattern=_B64)]] = Field(max_length=MAX_MEMBERS)


class Reveal(_Msg):
    type: Literal["reveal"] = "reveal"
    b: dict[Agent, Annotated[str, Field(pattern=_HEX)]] = Field(max_length=MAX_MEMBERS)
    s: dict[Agent, Annotated[str, Field(pattern=_HEX)]] = Field(max_length=MAX_MEMBERS)


class Refuse(_Msg):
    type: Literal["refuse"] = "refuse"
    reason: str = Field(max_length=64)
    detail: str = Field(default="", max_length=512)


# ---- aggregator -> agent: {base}/agents/{agent}/secagg -----------------------------------------------------
class CohortMsg(_Msg):
    type: Literal["cohort"] = "cohort"
    update_id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")  # the member's update this step sums
    version: int = Field(ge=0, le=2**53 - 1)
    members: list[Agent] = Field(min_length=1, max_length=MAX_MEMBERS)
    threshold: int = Field(ge=1, le=MAX_MEMBERS)
    degree: int | None = Field(default=None, ge=2, le=MAX_MEMBERS)
    clip: float = Field(gt=0)
    bits: int = Field(ge=2, le=24)
    dim: int = Field(ge=1, le=1 << 30)
    weight: float = Field(gt=0, le=1)
    norm: float | None = Field(default=None, gt=0, le=1e9)  # DP: clip the weighted update to this L2 norm

    def cohort(self, agent: str) -> Cohort:
        c = Cohort(self.step, self.version, tuple(self.members), self.threshold, self.degree, self.clip,
                   self.bits, self.dim, {agent: self.weight}, self.norm)
        c.check()
        return c


class Roster(_Msg):
    type: Literal["roster"] = "roster"
    keys: dict[Agent, tuple[Annotated[str, Field(pattern=_B64)], Annotated[str, Field(pattern=_B64)]]] = \
        Field(max_length=MAX_MEMBERS)


class Forward(_Msg):
    type: Literal["forward"] = "forward"
    shares: dict[Agent, Annotated[str, Field(pattern=_B64)]] = Field(max_length=MAX_MEMBERS)


class Unmask(_Msg):
    type: Literal["unmask"] = "unmask"
    survivors: list[Agent] = Field(max_length=MAX_MEMBERS)


class End(_Msg):
    """The step is over for this member: ``done`` (its update is in the sum; the ack follows on the acks
    topic) or ``abort`` (not summed: offer the update again)."""

    type: Literal["done", "abort"]
    reason: str = Field(default="", max_length=64)
    detail: str = Field(default="", max_length=512)


ToAgent = Annotated[CohortMsg | Roster | Forward | Unmask | End, Field(discriminator="type")]
FromAgent = Annotated[Ready | Keys | Shares | Reveal | Refuse, Field(discriminator="type")]
_to_agent: TypeAdapter[ToAgent] = TypeAdapter(ToAgent)
_from_agent: TypeAdapter[FromAgent] = TypeAdapter(FromAgent)
MAX_JSON = 1 << 20


def parse_to_agent(payload: bytes) -> CohortMsg | Roster | Forward | Unmask | End:
    return _parse(_to_agent, payload)  # type: ignore[no-any-return]


def parse_from_agent(payload: bytes) -> Ready | Keys | Shares | Reveal | Refuse:
    return _parse(_from_agent, payload)  # type: ignore[no-any-return]


def _parse(adapter: TypeAdapter[Any], payload: bytes) -> Any:
    if len(payload) > MAX_JSON:
        raise SecAggAbort("bad_message", f"a {len(payload)}-byte message (at most {MAX_JSON})")
    try:
        return adapter.validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SecAggAbort("bad_message", f"{where}: {first['msg']}") from exc


def dump(msg: BaseModel) -> bytes:
    return msg.model_dump_json().encode()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unb64(text: str, size: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error: bad padding
        raise SecAggAbort("bad_message", f"not base64: {exc}") from exc
    if size is not None and len(raw) != size:
        raise SecAggAbort("bad_message", f"{len(raw)} bytes where {size} belong")
    return raw


def encode_masked(step: str, y: np.ndarray) -> bytes:
    return safetensors.numpy.save({"masked": np.ascontiguousarray(y, np.uint32)},
                                  metadata={"fedmqtt.secagg.step": step})


def decode_masked(payload: bytes, dim: int) -> tuple[str, np.ndarray]:
    """(step, masked input) from a safetensors payload, checked against ``dim`` before the data is read."""
    if len(payload) < 8 or len(payload) > 8 + (1 << 16) + 4 * dim:
        raise SecAggAbort("bad_message", "a masked input of the wrong size")
    n = int.from_bytes(payload[:8], "little")
    try:
        header = json.loads(payload[8 : 8 + n])
        entry, step = header["masked"], header["__metadata__"]["fedmqtt.secagg.step"]
        ok = entry["dtype"] == "U32" and entry["shape"] == [dim] and len(header) == 2
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise SecAggAbort("bad_message", f"not a masked input ({str(exc)[:200]})") from exc
    if not ok:
        raise SecAggAbort("bad_message", f"a masked input is one U32 tensor 'masked' of shape [{dim}]")
    try:
        y = safetensors.numpy.load(bytes(payload))["masked"]
    except Exception as exc:  # safetensors raises its own error type
        raise SecAggAbort("bad_message", f"safetensors rejected the masked input: {exc}") from exc
    return str(step), y.astype(np.uint32)

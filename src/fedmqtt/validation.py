"""Checks on every arriving update, in a fixed order, each failing with its own :class:`Reason`.

Order (cheapest first, and so that a reason is never masked by a later one): size and parse → schema →
kind → metadata → agent matches topic → duplicate → base version not in the future → not stale →
fingerprint → tensor names → shapes → dtypes → finite values → delta norm bound.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from fedmqtt import codec
from fedmqtt.errors import CodecError, InvalidUpdate, Reason
from fedmqtt.schemas import ID_PATTERN, parse_update_metadata
from fedmqtt.types import Array, UpdateInfo

_ID = re.compile(ID_PATTERN)


class Reference(NamedTuple):
    """The shape of the global model that every update must match."""

    fingerprint: str
    spec: Mapping[str, tuple[tuple[int, ...], np.dtype[np.generic]]]

    @classmethod
    def of(cls, params: Mapping[str, Array]) -> Reference:
        spec = {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in params.items()}
        return cls(codec.fingerprint(params), spec)


class Checked(NamedTuple):
    info: UpdateInfo
    tensors: dict[str, Array]
    staleness: int


class DedupWindow:
    """Applied ``agent/update_id`` keys, remembered while a replay could still pass the staleness check.

    An entry whose base version is older than ``version - max_staleness`` is forgotten: a replay of it would
    be rejected as stale anyway. ``capacity`` bounds memory under any load: beyond it, the entries with the
    oldest base version go first, and ``floor`` rises to that base; updates on a base ``<= floor`` are
    refused as stale, so an evicted id can never be applied twice, and the floor rises no further than it
    must.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.floor = -1
        self._keys: dict[str, int] = {}
        self._by_base: dict[int, set[str]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, base_version: int) -> None:
        if key in self._keys:
            old = self._keys[key]
            self._by_base[old].discard(key)
            if not self._by_base[old]:
                del self._by_base[old]
        self._keys[key] = base_version
        self._by_base.setdefault(base_version, set()).add(key)
        while len(self._keys) > self.capacity:
            oldest = min(self._by_base)
            self._drop(oldest)
            self.floor = max(self.floor, oldest)

    def expire(self, oldest_acceptable_base: int) -> None:
        for base in [b for b in self._by_base if b < oldest_acceptable_base]:
            self._drop(base)

    def _drop(self, base: int) -> None:
        for key in self._by_base.pop(base):
            del self._keys[key]

    def items(self) -> list[tuple[str, int]]:
        return list(self._keys.items())


def dedup_key(agent: str, update_id: str) -> str:
    return f"{agent}/{update_id}"


def check_update(
    payload: bytes,
    topic_agent: str,
    *,
    reference: Reference,
    version: int,
    max_staleness: int,
    applied: DedupWindow,
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD,
) -> Checked:
    """Everything that can be checked without the model's values; raises InvalidUpdate."""
    try:
        decoded = codec.decode(payload, max_payload)
    except CodecError as exc:
        raise InvalidUpdate(exc.reason, exc.detail) from exc
    try:
        info = parse_update_metadata(decoded.metadata)
    except InvalidUpdate as exc:  # name the update in the ack when its id at least is well-formed
        claimed = decoded.metadata.get("fedmqtt.update_id", "")
        exc.update_id = claimed if _ID.fullmatch(claimed) else None
        raise
    try:
        if info.agent != topic_agent:
            raise InvalidUpdate(Reason.AGENT_MISMATCH,
                                f"fedmqtt.agent {info.agent!r} sent on the topic of {topic_agent!r}")
        if dedup_key(info.agent, info.update_id) in applied:
            raise InvalidUpdate(Reason.DUPLICATE, f"update {info.update_id!r} was already applied")
        if info.base_version <= applied.floor:
            raise InvalidUpdate(Reason.STALE, f"base {info.base_version} predates the de-duplication window")
        if info.base_version > version:
            raise InvalidUpdate(Reason.FUTURE_BASE, f"base version {info.base_version} > current {version}")
        staleness = version - info.base_version
        if staleness > max_staleness:
            raise InvalidUpdate(Reason.STALE, f"staleness {staleness} > max_staleness {max_staleness}")
        if info.fingerprint != reference.fingerprint:
            raise InvalidUpdate(Reason.FINGERPRINT, "fingerprint differs from the global model's")
        tensors = decoded.tensors
        if tensors.keys() != reference.spec.keys():
            missing = sorted(reference.spec.keys() - tensors.keys())[:3]
            extra = sorted(tensors.keys() - reference.spec.keys())[:3]
            raise InvalidUpdate(Reason.TENSOR_NAMES, f"missing {missing}, unexpected {extra}")
        for name, arr in tensors.items():
            shape, dtype = reference.spec[name]
            if arr.shape != shape:
                raise InvalidUpdate(Reason.SHAPE, f"{name}: shape {arr.shape} != {shape}")
            if arr.dtype != dtype:
                raise InvalidUpdate(Reason.DTYPE, f"{name}: dtype {arr.dtype} != {dtype}")
        return Checked(info, tensors, staleness)
    except InvalidUpdate as exc:
        exc.update_id = info.update_id
        raise


def delta_norm(delta: Mapping[str, Array]) -> float:
    """Global L2 norm of a delta; raises InvalidUpdate(non_finite) on NaN or Inf values."""
    total = 0.0
    for name, arr in delta.items():
        flat = np.asarray(arr, dtype=np.float32).ravel()  # no copy for float32 params
        with np.errstate(over="ignore", invalid="ignore"):
            sq = float(np.dot(flat, flat))
        if not np.isfinite(sq):
            if not np.isfinite(flat).all():
                raise InvalidUpdate(Reason.NON_FINITE, f"{name} holds NaN or Inf")
            raise InvalidUpdate(Reason.NORM, f"{name}: norm overflows")
        total += sq
    return float(np.sqrt(total))


def check_norm(delta: Mapping[str, Array], max_norm: float | None) -> float:
    """Finite values and ‖Δ‖₂ ≤ max_norm (when set); returns the norm."""
    norm = delta_norm(delta)
    if max_norm is not None and norm > max_norm:
        raise InvalidUpdate(Reason.NORM, f"delta L2 norm {norm:.4g} > limit {max_norm:.4g}")
    return norm

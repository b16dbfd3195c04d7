"""Checks on every arriving update, in a fixed order, each failing with its own :class:`Reason`.

Order (cheapest first, and so that a reason is never masked by a later one): size → header length (bounded
by the model's own header size before it is parsed) and parse, each tensor's byte range included → schema →
kind → metadata → agent matches topic → duplicate → base version not in the future → not stale →
fingerprint → compression (an announced form must be known; its indices and scales are checked once the
header passed) → tensor names → shapes → dtypes → finite values → delta norm bound. Everything up to the dtypes
is read from the header alone; tensor data is touched only after all of it passed, so refusing a hostile
payload costs about as much as reading its header.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from fedmqtt import codec, compression, dedup
from fedmqtt.errors import CodecError, InvalidUpdate, Reason
from fedmqtt.schemas import parse_update_metadata
from fedmqtt.types import Array, UpdateInfo, is_id


class Reference(NamedTuple):
    """The shape of the global model that every update must match."""

    fingerprint: str
    spec: Mapping[str, tuple[tuple[int, ...], np.dtype[np.generic]]]
    max_header: int  # bytes: an honest update's header is shorter (two entries per tensor, metadata, 16 KiB more)
    wire: Mapping[str, tuple[list[int], str]]  # per tensor: shape and dtype as a safetensors header writes them

    @classmethod
    def of(cls, params: Mapping[str, Array]) -> Reference:
        spec = {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in params.items()}
        max_header = sum(2 * len(k.encode()) + 256 for k in spec) + (16 << 10)  # compressed: two entries each
        wire = {k: (list(shape), codec.dtype_code(dtype)) for k, (shape, dtype) in spec.items()}
        return cls(codec.fingerprint(params), spec, max_header, wire)


class Checked(NamedTuple):
    info: UpdateInfo
    tensors: dict[str, Array]
    staleness: int
    metadata: Mapping[str, str] = {}  # the header's metadata as sent (e.g. a combined update's members)


def check_update(
    payload: bytes,
    topic_agent: str,
    *,
    reference: Reference,
    version: int,
    max_staleness: int,
    seen: dedup.Seen,
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD,
) -> Checked:
    """Everything that can be checked without the model's values; raises InvalidUpdate."""
    try:
        header, header_len = codec.read_header(payload, max_payload, reference.max_header)
        metadata = codec.header_metadata(header)
        where = codec.layout(header, header_len, len(payload))  # from the header: no tensor is read yet
    except CodecError as exc:
        raise InvalidUpdate(exc.reason, exc.detail) from exc
    try:
        info = parse_update_metadata(metadata)
    except InvalidUpdate as exc:  # name the update in the ack when its id at least is well-formed
        claimed = metadata.get("fedmqtt.update_id", "")
        exc.update_id = claimed if is_id(claimed) else None
        raise
    try:
        if info.agent != topic_agent:
            raise InvalidUpdate(Reason.AGENT_MISMATCH,
                                f"fedmqtt.agent {info.agent!r} sent on the topic of {topic_agent!r}")
        if dedup.contains(seen, dedup.key(info.agent, info.update_id), info.base_version):
            raise InvalidUpdate(Reason.DUPLICATE, f"update {info.update_id!r} was already applied")
        if info.base_version <= seen.floor:
            raise InvalidUpdate(Reason.STALE, f"base {info.base_version} predates the de-duplication window")
        if info.base_version > version:
            raise InvalidUpdate(Reason.FUTURE_BASE, f"base version {info.base_version} > current {version}")
        staleness = version - info.base_version
        if staleness > max_staleness:
            raise InvalidUpdate(Reason.STALE, f"staleness {staleness} > max_staleness {max_staleness}")
        if info.fingerprint != reference.fingerprint:
            raise InvalidUpdate(Reason.FINGERPRINT, "fingerprint differs from the global model's")
        method = compression.method_of(metadata, info.encoding)
        if method != "none":
            compression.check_header(method, header, reference.spec)
            tensors = compression.expand(method, codec.tensors_of(payload, where), reference.spec)
            return Checked(info, tensors, staleness, metadata)
        names = header.keys() - {"__metadata__"}
        if names != reference.spec.keys():
            missing = sorted(reference.spec.keys() - names)[:3]
            extra = sorted(names - reference.spec.keys())[:3]
            raise InvalidUpdate(Reason.TENSOR_NAMES, f"missing {missing}, unexpected {extra}")
        for name in names:
            entry = header[name]
            assert isinstance(entry, dict)  # header_metadata checked each entry's dtype
            shape, code = reference.wire[name]
            if entry.get("shape") != shape:
                raise InvalidUpdate(Reason.SHAPE, f"{name}: shape {entry.get('shape')} != {tuple(shape)}")
            if entry["dtype"] != code:
                raise InvalidUpdate(Reason.DTYPE, f"{name}: dtype {entry['dtype']} != {code}")
        return Checked(info, codec.tensors_of(payload, where), staleness, metadata)
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

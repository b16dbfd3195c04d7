"""The wire format: safetensors files with fedmqtt metadata (docs/protocol.md, "Payloads").

Pure functions, no I/O. Encoding uses the safetensors library; decoding reads the header itself first
(bounded size, JSON object, string metadata) so that hostile input is refused before any tensor is read,
then lets safetensors check the offsets and build the arrays.

>>> import numpy as np
>>> params = {"dense/kernel": np.ones((2, 3), np.float32)}
>>> payload = encode_model(params, version=7)
>>> decoded = decode(payload)
>>> decoded.metadata["fedmqtt.version"], decoded.tensors["dense/kernel"].shape
('7', (2, 3))
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import safetensors.numpy

from fedmqtt.errors import CodecError, Reason
from fedmqtt.types import SCHEMA_VERSION, Array, Encoding, FlatParams, Mode

SCHEMA = str(SCHEMA_VERSION)
#: The largest header we read; a model with thousands of tensors stays far below it.
MAX_HEADER_BYTES = 1 << 20
#: Default cap on a whole payload (the broker's message_size_limit should match).
DEFAULT_MAX_PAYLOAD = 64 << 20

_DTYPE_CODES: dict[str, str] = {
    "float16": "F16", "float32": "F32", "float64": "F64",
    "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}
_ALLOWED_CODES = frozenset(_DTYPE_CODES.values())


class Decoded(NamedTuple):
    """A parsed payload: tensors by name and the raw string metadata."""

    tensors: dict[str, Array]
    metadata: dict[str, str]


def dtype_code(dtype: np.dtype[np.generic]) -> str:
    """safetensors' name of a numpy dtype (``float32`` -> ``F32``)."""
    try:
        return _DTYPE_CODES[np.dtype(dtype).name]
    except KeyError as exc:
        raise CodecError(Reason.DTYPE, f"dtype {np.dtype(dtype).name} cannot cross the wire") from exc


def fingerprint(params: FlatParams) -> str:
    """SHA-256 (hex) of the parameter tree's names, dtypes and shapes, independent of values.

    One line per tensor, sorted by name: ``name<TAB>dtype code<TAB>comma-joined dims<LF>``.
    """
    lines = []
    for name in sorted(params):
        arr = params[name]
        dims = ",".join(str(d) for d in np.shape(arr))
        lines.append(f"{name}\t{dtype_code(np.asarray(arr).dtype)}\t{dims}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _contiguous(params: FlatParams) -> dict[str, Array]:
    return {name: np.asarray(value, order="C") for name, value in params.items()}  # keeps 0-d arrays 0-d


def encode_model(
    params: FlatParams,
    version: int,
    *,
    mode: Mode = "async",
    model_fingerprint: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """Serialise a global model of the given version (pass ``model_fingerprint`` when it is known)."""
    metadata = {
        "fedmqtt.schema": SCHEMA,
        "fedmqtt.kind": "model",
        "fedmqtt.version": str(int(version)),
        "fedmqtt.fingerprint": model_fingerprint or fingerprint(params),
        "fedmqtt.mode": mode,
        **(extra or {}),
    }
    return safetensors.numpy.save(_contiguous(params), metadata=metadata)


def encode_update(
    tensors: FlatParams,
    *,
    agent: str,
    update_id: str,
    base_version: int,
    num_samples: int,
    encoding: Encoding = "delta",
    model_fingerprint: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """Serialise an agent's update: ``delta`` (new minus base weights) or ``weights``."""
    metadata = {
        "fedmqtt.schema": SCHEMA,
        "fedmqtt.kind": "update",
        "fedmqtt.agent": agent,
        "fedmqtt.update_id": update_id,
        "fedmqtt.base_version": str(int(base_version)),
        "fedmqtt.num_samples": str(int(num_samples)),
        "fedmqtt.encoding": encoding,
        "fedmqtt.fingerprint": model_fingerprint or fingerprint(tensors),
        **(extra or {}),
    }
    return safetensors.numpy.save(_contiguous(tensors), metadata=metadata)


def read_header(payload: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD, max_header: int = MAX_HEADER_BYTES
                ) -> tuple[dict[str, object], int]:
    """Parse and bound-check the safetensors JSON header; returns it and its length. ``max_header`` bounds
    the header's length before it is parsed (a receiver that knows its model passes a bound near its size)."""
    if len(payload) > max_payload:
        raise CodecError(Reason.PAYLOAD_TOO_LARGE, f"{len(payload)} bytes > limit {max_payload}")
    if len(payload) < 8:
        raise CodecError(Reason.MALFORMED, f"{len(payload)} bytes is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", payload[:8])
    if n > min(max_header, MAX_HEADER_BYTES):
        raise CodecError(Reason.MALFORMED, f"header length {n} exceeds {min(max_header, MAX_HEADER_BYTES)}")
    if n > len(payload) - 8:
        raise CodecError(Reason.MALFORMED, f"header length {n} runs past the {len(payload)}-byte payload")
    try:
        header = json.loads(payload[8 : 8 + n])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CodecError(Reason.MALFORMED, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CodecError(Reason.MALFORMED, "header is not a JSON object")
    return header, n


def header_metadata(header: Mapping[str, object]) -> dict[str, str]:
    """The string metadata of a parsed header, after checking that every tensor names an allowed dtype."""
    raw_meta = header.get("__metadata__", {})
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise CodecError(Reason.MALFORMED, "__metadata__ must map strings to strings")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(dtype, str) or dtype not in _ALLOWED_CODES:  # a list or dict would be unhashable
            raise CodecError(Reason.DTYPE, f"tensor {name!r} has unsupported dtype {dtype!r}")
    return dict(raw_meta)


class Layout(NamedTuple):
    """Where each tensor of a payload lies, read from its header alone."""

    dtype: str  # safetensors code, e.g. F32
    shape: tuple[int, ...]
    start: int  # byte offsets into the payload
    end: int


_ITEMSIZE = {"F16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1, "U16": 2, "U32": 4,
             "U64": 8, "BOOL": 1}
_NUMPY = {code: np.dtype(name).newbyteorder("<") for name, code in _DTYPE_CODES.items()}


def layout(header: Mapping[str, object], header_len: int, payload_len: int) -> dict[str, Layout]:
    """Each tensor's dtype, shape and byte range, checked against the payload's size (contiguous, in
    bounds, the size its shape says) without reading any tensor data; raises CodecError(malformed)."""
    base = 8 + header_len
    out: dict[str, Layout] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CodecError(Reason.MALFORMED, f"tensor {name!r}: entry is not an object")
        shape, offsets, dtype = info.get("shape"), info.get("data_offsets"), info.get("dtype")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets) or dtype not in _ITEMSIZE):
            raise CodecError(Reason.MALFORMED, f"tensor {name!r}: bad shape, dtype or data_offsets")
        start, end = offsets
        if end - start != _ITEMSIZE[dtype] * math.prod(shape) or base + end > payload_len:
            raise CodecError(Reason.MALFORMED, f"tensor {name!r}: data_offsets do not fit its shape or the payload")
        out[name] = Layout(dtype, tuple(shape), base + start, base + end)
    spans = sorted((t.start, t.end) for t in out.values())
    at = base
    for start, end in spans:
        if start != at:
            raise CodecError(Reason.MALFORMED, "tensor data overlaps or leaves gaps")
        at = end
    if at != payload_len:
        raise CodecError(Reason.MALFORMED, f"{payload_len - at} bytes after the last tensor")
    return out


def tensors_of(payload: bytes, where: Mapping[str, Layout]) -> dict[str, Array]:
    """Read-only numpy views of the tensors (no copy), once :func:`layout` has checked where they lie."""
    return {name: np.frombuffer(payload, _NUMPY[t.dtype], (t.end - t.start) // _ITEMSIZE[t.dtype], t.start
                                ).reshape(t.shape) for name, t in where.items()}


def decode(payload: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Decoded:
    """Parse a fedmqtt payload. Raises :class:`CodecError` with a specific reason on any defect."""
    header, _ = read_header(payload, max_payload)
    raw_meta = header_metadata(header)
    try:
        tensors = safetensors.numpy.load(bytes(payload))
    except Exception as exc:  # safetensors raises its own SafetensorError, or ValueError/TypeError
        raise CodecError(Reason.MALFORMED, f"safetensors rejected the payload: {exc}") from exc
    return Decoded(tensors=dict(tensors), metadata=dict(raw_meta))

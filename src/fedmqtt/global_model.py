"""The global model as it crosses the model topics: encoded by the aggregator (float32, or a compressed
form for ``model/<form>``) and checked by an agent before it trains on it (signature, parameter tree,
compressed form, finite values). Pure functions, no I/O.

>>> import numpy as np
>>> from fedmqtt import codec
>>> params = {"w": np.ones((2, 2), np.float32)}
>>> raw = encode(params, 3, mode="async", fingerprint=codec.fingerprint(params), epoch="e1", form="int8")
>>> info, tensors = accept(raw, codec.fingerprint(params), {"w": ((2, 2), np.dtype(np.float32))})
>>> info.version, tensors["w"].tolist()
(3, [[1.0, 1.0], [1.0, 1.0]])
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmqtt import codec, compression, signing
from fedmqtt.errors import IncompatibleModel
from fedmqtt.schemas import parse_model_metadata
from fedmqtt.types import Array, Mode, ModelInfo


def encode(params: Mapping[str, Array], version: int, *, mode: Mode, fingerprint: str, epoch: str,
           form: str | None = None) -> bytes:
    """The model payload (unsigned): float32, or with ``form`` the compressed copy (compression.py)."""
    tensors = {k: np.asarray(v) for k, v in params.items()}
    extra = {"fedmqtt.epoch": epoch}
    if form is not None:
        packed = compression.compress_model(tensors, form)
        tensors, extra = packed.tensors, {**extra, **packed.metadata}
    return codec.encode_model(tensors, version, mode=mode, model_fingerprint=fingerprint, extra=extra)


def accept(payload: bytes, fingerprint: str, spec: compression.Spec, model_key: str | None = None
           ) -> tuple[ModelInfo, dict[str, Array]]:
    """A received model's info and dense tensors, once it proved to fit the agent's own model (``spec``:
    names, shapes, dtypes): signed by ``model_key`` when given, the same parameter tree (the tensors
    themselves, not only the fingerprint they claim), finite. Raises IncompatibleModel, CodecError or
    InvalidUpdate (a malformed compressed form)."""
    if model_key is not None:
        signing.verify(payload, model_key)
    decoded = codec.decode(payload)
    info = parse_model_metadata(decoded.metadata)
    tensors = decoded.tensors
    form = decoded.metadata.get(compression.KEY)
    if form is not None:  # a compressed download: checked against the agent's own model, expanded
        if form not in compression.MODEL_FORMS:
            raise IncompatibleModel(f"unknown model form {form!r}")
        compression.check_header(form, codec.read_header(payload)[0], spec)  # type: ignore[arg-type]
        tensors = compression.expand(form, tensors, spec)  # type: ignore[arg-type]
    if info.fingerprint != fingerprint or codec.fingerprint(tensors) != fingerprint:
        raise IncompatibleModel("the global model's parameter tree differs from this agent's model")
    if not all(np.isfinite(t).all() for t in tensors.values() if t.dtype.kind == "f"):
        raise IncompatibleModel("the global model holds NaN or Inf")
    return info, tensors


def supersedes(info: ModelInfo, held: ModelInfo | None) -> bool:
    """Whether a received model replaces the one held: within one epoch versions only grow (an older retained
    copy is ignored); a new epoch means the aggregator started afresh and its version counter restarted."""
    return held is None or info.epoch != held.epoch or info.version >= held.version

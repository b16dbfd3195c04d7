"""Compressed updates (protocol 1.1, docs/protocol.md 3.5): float16, int8 with stochastic rounding, top-k.

Pure functions. The agent side turns a dense delta into the tensors that travel (:func:`compress`) and keeps
what top-k left out for the next update (:class:`ErrorFeedback`); the aggregator side checks a compressed
payload's header against the model (:func:`check_header`, before any tensor is read) and rebuilds the dense
delta (:func:`expand`), refusing out-of-range or repeated indices and non-finite scales. The float16 and int8
forms also serve compressed model downloads (:func:`compress_model`), checked and expanded the same way.

Wire forms, announced by ``fedmqtt.compression``. int8 and top-k work on the model **flattened**: its
tensors laid end to end in name order (as in the fingerprint), each row-major, n entries in all; they have
two header entries whatever the model, so that a small model's update is not mostly header.

- ``float16``: every model tensor ``<name>`` as F16, the model's shape.
- ``int8``: ``#q`` as I8 of shape ``[n]`` and ``#scale`` as F32 of shape ``[ceil(n / 512)]``: entry i is
  ``q[i] * scale[i // 512]`` (a scale per block of 512 entries).
- ``topk``: ``#idx`` as I32 and ``#val`` as F32, both of shape ``[k]`` with ``0 <= k <= n``: strictly
  increasing positions into the flattened model and the values there; the rest is 0.

>>> import numpy as np
>>> delta = {"w": np.array([[0.5, -2.0], [0.01, 1.0]], np.float32), "b": np.array([0.1], np.float32)}
>>> sent = compress(delta, Compression.parse("topk:0.4"), np.random.default_rng(0))
>>> sent.metadata, sent.tensors["#idx"].tolist(), sent.dense["w"].tolist()
({'fedmqtt.compression': 'topk'}, [2, 4], [[0.0, -2.0], [0.0, 1.0]])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, NamedTuple

import numpy as np

from fedmqtt.errors import ConfigError, InvalidUpdate, Reason
from fedmqtt.types import Array

Method = Literal["none", "float16", "int8", "topk"]
METHODS: tuple[str, ...] = ("float16", "int8", "topk")
KEY = "fedmqtt.compression"
Spec = Mapping[str, tuple[tuple[int, ...], np.dtype[np.generic]]]  # validation.Reference.spec


class Compression(NamedTuple):
    """How an agent compresses its updates. ``parse`` reads the CLI form: ``none``, ``float16``, ``int8``,
    ``topk:0.01`` or ``topk:1%``."""

    method: Method = "none"
    fraction: float = 0.01  # topk: the share of the model's entries sent
    error_feedback: bool = True  # topk: add what was left out to the next update

    @classmethod
    def parse(cls, text: str) -> Compression:
        name, _, arg = text.strip().partition(":")
        if name in ("none", "float16", "int8") and not arg:
            return cls(name)  # type: ignore[arg-type]
        if name == "topk":
            try:
                fraction = float(arg[:-1]) / 100 if arg.endswith("%") else float(arg or "0.01")
            except ValueError:
                fraction = math.nan
            if not 0 < fraction <= 1:
                raise ConfigError(f"topk needs a fraction in (0, 1], as topk:0.01 or topk:1%; got {arg!r}")
            return cls("topk", fraction)
        raise ConfigError(f"unknown compression {text!r}: none, float16, int8, topk:<fraction>")

    def __str__(self) -> str:
        return f"topk:{self.fraction:g}" if self.method == "topk" else self.method


class Compressed(NamedTuple):
    tensors: dict[str, Array]  # what travels
    metadata: dict[str, str]  # extra update metadata announcing the form
    dense: dict[str, Array]  # what the aggregator will rebuild (for error feedback)


def compress(delta: Mapping[str, Array], setting: Compression, rng: np.random.Generator) -> Compressed:
    """The wire tensors for ``delta`` (float32 deltas) under ``setting``."""
    if setting.method == "none":
        return Compressed(dict(delta), {}, dict(delta))
    if setting.method == "topk":
        return _topk(delta, setting.fraction)
    if setting.method == "int8":
        return _int8(delta, rng)
    tensors: dict[str, Array] = {k: np.asarray(v, np.float32).astype(np.float16) for k, v in delta.items()}
    return Compressed(tensors, {KEY: "float16"}, {k: v.astype(np.float32) for k, v in tensors.items()})


def _flatten(delta: Mapping[str, Array]) -> Array:
    names = sorted(delta)
    return np.concatenate([np.asarray(delta[n], np.float32).ravel() for n in names]) if names else np.zeros(0)


def _shapes(delta: Mapping[str, Array]) -> dict[str, tuple[int, ...]]:
    return {name: np.shape(value) for name, value in delta.items()}


def _int8(delta: Mapping[str, Array], rng: np.random.Generator | None) -> Compressed:
    q, scale = _quantise(_flatten(delta), rng)
    return Compressed({"#q": q, "#scale": scale}, {KEY: "int8"}, _unflatten(_dequantise(q, scale), _shapes(delta)))


def _topk(delta: Mapping[str, Array], fraction: float) -> Compressed:
    flat = _flatten(delta)
    n = flat.size
    k = min(n, max(1, math.ceil(fraction * n))) if n else 0
    idx = np.sort(np.argpartition(np.abs(flat), n - k)[n - k:]) if k else np.zeros(0, np.int64)
    kept = np.zeros(n, np.float32)
    kept[idx] = flat[idx]
    return Compressed({"#idx": idx.astype(np.int32), "#val": flat[idx]}, {KEY: "topk"},
                      _unflatten(kept, _shapes(delta)))


def _unflatten(flat: Array, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Array]:
    out, at = {}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        out[name] = flat[at : at + size].reshape(shapes[name])
        at += size
    return out


BLOCK = 512  # int8: entries per scale (overhead 0.8 %; quantisation error grows with a block's largest entry)


def _quantise(flat: Array, rng: np.random.Generator | None) -> tuple[Array, Array]:
    """Symmetric int8, a scale per block of :data:`BLOCK` entries (max |x| / 127), with stochastic rounding
    (unbiased: E[scale * q] = x), or rounded to nearest without ``rng``."""
    n = flat.size
    padded = np.zeros(-(-n // BLOCK) * BLOCK, np.float32)
    padded[:n] = flat
    blocks = padded.reshape(-1, BLOCK)
    scale = (np.abs(blocks).max(axis=1) / 127.0).astype(np.float32) if n else np.zeros(0, np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    q = np.floor(blocks / safe + rng.random(blocks.shape, dtype=np.float32)) if rng is not None \
        else np.rint(blocks / safe)
    return np.clip(q, -127, 127).astype(np.int8).ravel()[:n], scale


def _dequantise(q: Array, scale: Array) -> Array:
    out: Array = q.astype(np.float32) * np.repeat(np.asarray(scale, np.float32), BLOCK)[: q.size]
    return out


MODEL_FORMS: tuple[str, ...] = ("float16", "int8")


def compress_model(params: Mapping[str, Array], form: str) -> Compressed:
    """A global model for a compressed download (``float16``, or ``int8`` rounded to nearest): about 1/2 or
    1/4 of the float32 bytes. Agents train from it and send deltas against it."""
    if form not in MODEL_FORMS:
        raise ConfigError(f"unknown model form {form!r}: {', '.join(MODEL_FORMS)}")
    if form == "int8":
        packed = _int8(params, None)
        return packed._replace(dense={})
    return Compressed({k: np.asarray(v, np.float32).astype(np.float16) for k, v in params.items()}, {KEY: form}, {})


class ErrorFeedback:
    """The residual an agent keeps: what compression left out of earlier updates, added to the next one
    (error feedback, as in Deep Gradient Compression and EF-SGD) so that nothing is lost, only delayed."""

    def __init__(self) -> None:
        self.residual: dict[str, Array] = {}

    def __call__(self, delta: Mapping[str, Array], setting: Compression, rng: np.random.Generator) -> Compressed:
        corrected = {k: np.add(v, self.residual[k], dtype=np.float32) if k in self.residual else
                     np.asarray(v, np.float32) for k, v in delta.items()}
        sent = compress(corrected, setting, rng)
        self.residual = {k: np.subtract(corrected[k], sent.dense[k]) for k in corrected}
        return sent


class Compressor:
    """One agent's compression: its setting, its error-feedback residual (top-k) and its random numbers
    (stochastic rounding). ``compressor(delta)`` gives what to send."""

    def __init__(self, setting: Compression, rng: np.random.Generator | None = None) -> None:
        self.setting = setting
        self.feedback = ErrorFeedback()
        self._rng = rng or np.random.default_rng()

    def __call__(self, delta: Mapping[str, Array]) -> Compressed:
        if self.setting.method == "topk" and self.setting.error_feedback:
            return self.feedback(delta, self.setting, self._rng)
        return compress(delta, self.setting, self._rng)


# ---- the aggregator side ------------------------------------------------------------------------------
def method_of(metadata: Mapping[str, str], encoding: str) -> Method:
    """The announced form (``none`` when absent); InvalidUpdate(compression) for an unknown one."""
    method = metadata.get(KEY)
    if method is None:
        return "none"
    if method not in METHODS:
        raise InvalidUpdate(Reason.COMPRESSION, f"unknown {KEY} {method!r}; known: {', '.join(METHODS)}")
    if encoding != "delta":
        raise InvalidUpdate(Reason.COMPRESSION, f"{KEY} {method} needs fedmqtt.encoding delta, not {encoding}")
    return method  # type: ignore[return-value]


def check_header(method: Method, header: Mapping[str, object], spec: Spec) -> None:
    """Names, shapes and dtypes of a compressed payload against the model, from its header alone."""
    n = sum(math.prod(shape) for shape, _ in spec.values())
    expected: dict[str, tuple[list[int] | None, str]]  # per wire tensor: its shape (None: [k]) and dtype
    if method == "float16":
        expected = {name: (list(shape), "F16") for name, (shape, _) in spec.items()}
    elif method == "int8":
        expected = {"#q": ([n], "I8"), "#scale": ([-(-n // BLOCK)], "F32")}
    else:
        expected = {"#idx": (None, "I32"), "#val": (None, "F32")}
    names = header.keys() - {"__metadata__"}
    if names != expected.keys():
        missing, extra = sorted(expected.keys() - names)[:3], sorted(names - expected.keys())[:3]
        raise InvalidUpdate(Reason.TENSOR_NAMES, f"{method}: missing {missing}, unexpected {extra}")
    for wire_name, (shape, code) in expected.items():
        entry = header[wire_name]
        assert isinstance(entry, dict)  # codec.header_metadata checked every entry
        if entry["dtype"] != code:
            raise InvalidUpdate(Reason.DTYPE, f"{wire_name}: dtype {entry['dtype']} != {code}")
        if shape is not None and entry.get("shape") != shape:
            raise InvalidUpdate(Reason.SHAPE, f"{wire_name}: shape {entry.get('shape')} != {shape}")
    if method == "topk":
        k_idx, k_val = header["#idx"]["shape"], header["#val"]["shape"]  # type: ignore[index]
        if len(k_idx) != 1 or k_idx != k_val or k_idx[0] > n:
            raise InvalidUpdate(Reason.SHAPE, f"top-k shapes {k_idx} and {k_val} must both be [k], k <= {n}")


def expand(method: Method, tensors: Mapping[str, Array], spec: Spec) -> dict[str, Array]:
    """The dense delta, in the model's dtypes, from wire tensors that passed :func:`check_header`."""
    with np.errstate(over="ignore"):  # a hostile int8 scale overflows to Inf: the caller refuses it as non-finite
        return _expand(method, tensors, spec)


def _expand(method: Method, tensors: Mapping[str, Array], spec: Spec) -> dict[str, Array]:
    shapes = {name: shape for name, (shape, _) in spec.items()}
    if method == "float16":
        return {name: tensors[name].astype(dtype) for name, (_, dtype) in spec.items()}
    n = sum(math.prod(shape) for shape in shapes.values())
    if method == "int8":
        scale = np.asarray(tensors["#scale"], np.float32)
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise InvalidUpdate(Reason.COMPRESSION, "#scale holds a negative, NaN or Inf scale")
        full = _dequantise(tensors["#q"], scale)
    else:
        idx, val = tensors["#idx"].astype(np.int64), tensors["#val"]
        if idx.size and (idx[0] < 0 or idx[-1] >= n or (np.diff(idx) <= 0).any()):
            raise InvalidUpdate(Reason.COMPRESSION, f"#idx must be strictly increasing positions in [0, {n})")
        full = np.zeros(n, np.float32)
        full[idx] = val
    parts = _unflatten(full, shapes)
    return {name: parts[name].astype(dtype, copy=False) for name, (_, dtype) in spec.items()}

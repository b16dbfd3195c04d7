"""Signed global models (protocol 1.1): the aggregator signs each model it publishes with Ed25519, and agents
that know its public key adopt only models that carry a valid signature.

The signature, base64 in the model's ``fedmqtt.signature`` metadata, covers::

    b"fedmqtt model v1\\0" + version + "\\0" + epoch + "\\0" + fingerprint + "\\0" + mode + "\\0"
        + SHA-256(the payload's data section: every byte after the header)

so neither the tensors nor the version, epoch, parameter tree or mode can be changed without the key.
A key pair comes from :func:`new_key` (``fedmqtt broker init`` makes one per profile: the private key stays
with the aggregator, the public key goes into every agent's env file as ``FEDMQTT_MODEL_KEY``).

>>> import numpy as np
>>> from fedmqtt import codec
>>> private_pem, public = new_key()
>>> payload = Signer.from_pem(private_pem).sign(codec.encode_model({"w": np.ones(2, np.float32)}, 3))
>>> verify(payload, public).version
3
>>> verify(payload.replace(b'"fedmqtt.version":"3"', b'"fedmqtt.version":"9"'), public)
Traceback (most recent call last):
...
fedmqtt.errors.IncompatibleModel: the model's signature does not verify: not the aggregator's model
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmqtt import codec
from fedmqtt.errors import CodecError, ConfigError, IncompatibleModel, InvalidUpdate
from fedmqtt.schemas import parse_model_metadata
from fedmqtt.types import ModelInfo

_CONTEXT = b"fedmqtt model v1\x00"
SIGNATURE = "fedmqtt.signature"


def _message(meta: Mapping[str, str], data: bytes) -> bytes:
    fields = [meta.get(k, "") for k in ("fedmqtt.version", "fedmqtt.epoch", "fedmqtt.fingerprint", "fedmqtt.mode")]
    return _CONTEXT + "\x00".join(fields).encode() + b"\x00" + hashlib.sha256(data).digest()


def new_key() -> tuple[bytes, str]:
    """A new Ed25519 key pair: the private key as PKCS#8 PEM, the public key as base64 (32 raw bytes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, public_of(pem)


def public_of(private_pem: bytes) -> str:
    """The base64 public key of a PEM private key."""
    from cryptography.hazmat.primitives import serialization

    key = _load_private(private_pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _load_private(pem: bytes) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("the model-signing key must be an Ed25519 key")
    return key


class Signer:
    """Signs model payloads (the aggregator's side)."""

    def __init__(self, key: Any) -> None:
        self._key = key

    @classmethod
    def from_pem(cls, pem: bytes) -> Signer:
        return cls(_load_private(pem))

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        try:
            return cls.from_pem(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read the model-signing key {path}: {exc}") from exc

    def sign(self, payload: bytes) -> bytes:
        """``payload`` (an encoded model) with its signature added to the metadata."""
        header, n = codec.read_header(payload)
        meta = codec.header_metadata(header)
        signature = self._key.sign(_message(meta, payload[8 + n :]))
        header["__metadata__"] = {**meta, SIGNATURE: base64.b64encode(signature).decode()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors keeps the data section 8-byte aligned
        return struct.pack("<Q", len(raw)) + raw + payload[8 + n :]


def check_public(public_key: str) -> str:
    """``public_key`` if it is a base64 Ed25519 public key, else ConfigError."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
    except ValueError as exc:
        raise ConfigError(f"the model key {public_key!r} is not a base64 Ed25519 public key: {exc}") from exc
    return public_key


def verify(payload: bytes, public_key: str) -> ModelInfo:
    """The model's info if ``payload`` carries a valid signature by ``public_key`` (base64); raises
    IncompatibleModel otherwise (unsigned, signed by another key, or changed after signing)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        header, n = codec.read_header(payload)
        meta = codec.header_metadata(header)
        info = parse_model_metadata(meta)
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
    except (CodecError, InvalidUpdate) as exc:
        raise IncompatibleModel(f"not a model: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"FEDMQTT_MODEL_KEY is not a base64 Ed25519 public key: {exc}") from exc
    signature = meta.get(SIGNATURE)
    if signature is None:
        raise IncompatibleModel("the model is not signed: not the aggregator's model")
    try:
        key.verify(base64.b64decode(signature, validate=True), _message(meta, payload[8 + n :]))
    except (InvalidSignature, ValueError) as exc:
        raise IncompatibleModel("the model's signature does not verify: not the aggregator's model") from exc
    return info

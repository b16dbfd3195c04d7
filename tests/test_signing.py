"""Signed models: what a signature covers, and what an agent holding the public key refuses."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from fedmqtt import codec, signing
from fedmqtt.errors import ConfigError, IncompatibleModel

PARAMS = {"a/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "a/bias": np.ones(3, np.float32)}


@pytest.fixture(scope="module")
def keys() -> tuple[signing.Signer, str]:
    pem, public = signing.new_key()
    return signing.Signer.from_pem(pem), public


def model(version: int = 7, epoch: str = "e1") -> bytes:
    return codec.encode_model(PARAMS, version, extra={"fedmqtt.epoch": epoch})


def test_a_signed_model_verifies_and_decodes_like_an_unsigned_one(keys: tuple[signing.Signer, str]) -> None:
    signer, public = keys
    signed = signer.sign(model())
    info = signing.verify(signed, public)
    assert (info.version, info.epoch) == (7, "e1")
    decoded = codec.decode(signed)  # an old agent reads it as any model: the signature is one more key
    assert set(decoded.metadata) == set(codec.decode(model()).metadata) | {signing.SIGNATURE}
    for k, v in PARAMS.items():
        np.testing.assert_array_equal(decoded.tensors[k], v)


@pytest.mark.parametrize("change", [{"version": 9}, {"epoch": "e2"}, {"mode": "sync"}, {"value": 1e6}, {}])
def test_any_change_after_signing_is_refused(keys: tuple[signing.Signer, str], change: dict[str, object]) -> None:
    """The signature of a genuine model, carried over to a model that differs in one thing."""
    signer, public = keys
    signature = codec.header_metadata(codec.read_header(signer.sign(model()))[0])[signing.SIGNATURE]
    params = {k: v.copy() for k, v in PARAMS.items()}
    if "value" in change:
        params["a/bias"][0] = change["value"]
    forged = codec.encode_model(params, int(change.get("version", 7)),  # type: ignore[call-overload]
                                mode=str(change.get("mode", "async")),  # type: ignore[arg-type]
                                extra={"fedmqtt.epoch": str(change.get("epoch", "e1")), signing.SIGNATURE: signature})
    if not change:  # the control: the signature carried over to the same model verifies
        assert signing.verify(forged, public).version == 7
        return
    with pytest.raises(IncompatibleModel, match="does not verify"):
        signing.verify(forged, public)


def test_unsigned_or_foreign_models_are_refused(keys: tuple[signing.Signer, str]) -> None:
    signer, public = keys
    with pytest.raises(IncompatibleModel, match="not signed"):
        signing.verify(model(), public)
    other_pem, _ = signing.new_key()
    with pytest.raises(IncompatibleModel, match="does not verify"):
        signing.verify(signing.Signer.from_pem(other_pem).sign(model()), public)
    assert signing.verify(signer.sign(model()), public).version == 7


def test_bad_keys_are_configuration_errors() -> None:
    with pytest.raises(ConfigError):
        signing.check_public("not base64!")
    with pytest.raises(ConfigError):
        signing.check_public(base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="PEM"):
        signing.Signer.from_pem(b"-----BEGIN NOTHING-----")


def test_a_compressed_model_download_is_signed_over_its_own_bytes(keys: tuple[signing.Signer, str]) -> None:
    from fedmqtt.compression import compress_model

    signer, public = keys
    packed = compress_model(PARAMS, "int8")
    payload = codec.encode_model(packed.tensors, 7, model_fingerprint=codec.fingerprint(PARAMS),
                                 extra={"fedmqtt.epoch": "e1", **packed.metadata})
    signed = signer.sign(payload)
    assert signing.verify(signed, public).version == 7
    tampered = bytearray(signed)
    tampered[-1] ^= 1  # one byte of the tensors (a quantised weight or a scale)
    with pytest.raises(IncompatibleModel):
        signing.verify(bytes(tampered), public)

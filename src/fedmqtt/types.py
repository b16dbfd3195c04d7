"""Plain types and the one definition of each shared concept (no project imports).

>>> is_id("edge-7"), is_id("dev ice"), is_id("$SYS")
(True, False, False)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]
#: Parameters as they cross the wire: parameter path joined by "/" -> array.
FlatParams = Mapping[str, Array]
#: How an update carries its parameters: new-minus-base (``delta``) or the new parameters (``weights``).
Encoding = Literal["delta", "weights"]
#: How the aggregator advances: on every arrival or buffer (``async``) or in rounds (``sync``).
Mode = Literal["async", "sync"]

#: The payload and JSON schema version (``fedmqtt.schema`` in metadata, ``schema`` in JSON messages).
SCHEMA_VERSION = 1
#: Agent ids and update ids: one topic level, and a safe file, user and ACL name.
ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"
_ID = re.compile(ID_PATTERN)


def is_id(value: str) -> bool:
    """Whether ``value`` is a valid agent or update id (1-128 of ``A-Z a-z 0-9 . _ : @ -``)."""
    return bool(_ID.fullmatch(value))


def check_id(value: str, what: str = "agent id") -> str:
    """``value`` if it is a valid id, else ValueError naming the rule."""
    if not is_id(value):
        raise ValueError(f"{what} {value!r} must be 1-128 of A-Z a-z 0-9 . _ : @ -")
    return value


class ModelInfo(NamedTuple):
    """What a global model payload says about itself."""

    version: int
    fingerprint: str
    mode: Mode
    epoch: str = ""  # changes when an aggregator starts without its old state; versions restart then


class UpdateInfo(NamedTuple):
    """What an update payload says about itself, after validation."""

    agent: str
    update_id: str
    base_version: int
    num_samples: int
    encoding: Encoding
    fingerprint: str

"""Plain types shared by every layer (no project imports)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]
#: Parameters as they cross the wire: parameter path joined by "/" -> array.
FlatParams = Mapping[str, Array]
Encoding = Literal["delta", "weights"]
Mode = Literal["async", "sync"]


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

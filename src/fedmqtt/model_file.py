"""The global model as a file: plain safetensors that any tool reads (``safetensors.numpy.load_file``), with
the version and epoch in its metadata; and weights to start a federation from.

>>> import tempfile, numpy as np
>>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
>>> save(path, {"w": np.ones(2, np.float32)}, version=3)
>>> load(path, {"w": np.zeros(2, np.float32)})["w"].tolist()
[1.0, 1.0]
>>> load(path, {"w": np.zeros(3, np.float32)})
Traceback (most recent call last):
...
fedmqtt.errors.ConfigError: ... does not fit the model: w: shape (2,) where the model has (3,)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_bytes
from safetensors.numpy import save as save_bytes

from fedmqtt.errors import ConfigError
from fedmqtt.files import atomic_write
from fedmqtt.types import Array


def save(path: str | Path, params: Mapping[str, Array], version: int, epoch: str = "") -> None:
    """Write ``params`` to ``path`` atomically (a reader never sees half a file)."""
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in params.items()}
    meta = {"fedmqtt.kind": "model", "fedmqtt.version": str(version), "fedmqtt.epoch": epoch}
    atomic_write(Path(path), save_bytes(tensors, metadata=meta))


def load(path: str | Path, like: Mapping[str, Array]) -> dict[str, Array]:
    """The tensors in ``path``, which must have exactly the names, shapes and dtypes of ``like``."""
    try:
        tensors = load_bytes(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except (SafetensorError, ValueError) as exc:
        raise ConfigError(f"{path} is not a safetensors file: {exc}") from exc
    except KeyError as exc:  # safetensors.numpy has no numpy dtype for BF16 or the F8 types
        raise ConfigError(f"{path} holds a tensor of dtype {exc}, which numpy cannot hold") from exc
    problems = [f"{k}: missing" for k in like if k not in tensors]
    problems += [f"{k}: not in the model" for k in tensors if k not in like]
    for k in set(like) & set(tensors):
        want, got = np.asarray(like[k]), tensors[k]
        if got.shape != want.shape:
            problems.append(f"{k}: shape {got.shape} where the model has {want.shape}")
        elif got.dtype != want.dtype:
            problems.append(f"{k}: dtype {got.dtype} where the model has {want.dtype}")
    if problems:
        raise ConfigError(f"{path} does not fit the model: {'; '.join(sorted(problems)[:5])}")
    return dict(tensors)

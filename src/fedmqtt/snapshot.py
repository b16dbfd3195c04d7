"""A snapshot is the server state (core.ServerState), serialised: safetensors for the arrays, JSON metadata
for the rest. No pickle.

``snapshot.safetensors`` in a state directory holds the parameters (``params/<name>``), the strategy state's
leaves (``state/<i>``; PRNG keys as their raw data), the past versions a stale update may still be based on
(``history/<version>/<name>``) and, in the metadata, the journal sequence number it covers, the version, the
model fingerprint, the strategy name, the de-duplication window and the counters. Together with the journal
records after ``seq`` it gives back the exact state (core.replay). Written atomically (files.atomic_write).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from fedmqtt import dedup
from fedmqtt.admission import Admission
from fedmqtt.core import Counters, Rules, ServerState
from fedmqtt.errors import StateError
from fedmqtt.files import Fsync, atomic_write
from fedmqtt.gate import Gate

FILE = "snapshot.safetensors"
FORMAT = "1"
_lock = threading.Lock()


def _leaf_to_numpy(leaf: Any) -> tuple[np.ndarray[Any, Any], bool]:
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf)), True
    return np.asarray(leaf, order="C"), False


def encode(state: ServerState, r: Rules, seq: int) -> bytes:
    """The snapshot file's bytes for ``state`` after journal record ``seq``."""
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for name, arr in state.params.items():
        tensors[f"params/{name}"] = np.asarray(arr, order="C")
    leaves = jax.tree_util.tree_leaves(state.strategy)
    keys = []
    for i, leaf in enumerate(leaves):
        tensors[f"state/{i:06d}"], is_key = _leaf_to_numpy(leaf)
        if is_key:
            keys.append(i)
    held = sorted(v for v in state.history if v != state.version)  # the current version is params/
    for version in held:
        for name, arr in state.history[version].items():
            tensors[f"history/{version}/{name}"] = np.asarray(arr, order="C")
    c = state.counters
    counters = {"accepted": c.accepted, "rejected": dict(c.rejected),
                "staleness": {str(k): v for k, v in c.staleness.items()}, "round_count": c.since_step,
                "in_step": sorted(state.gate.in_step), "claims": list(state.admission.claims),
                "taken": dict(state.gate.taken), "untracked": state.gate.untracked}
    meta = {
        "fedmqtt.snapshot": FORMAT, "seq": str(seq), "version": str(state.version),
        "fingerprint": r.reference.fingerprint, "strategy": r.strategy.name, "state_leaves": str(len(leaves)),
        "state_key_leaves": json.dumps(keys), "history": json.dumps(held), "dedup": json.dumps(state.seen.items()),
        "dedup_floor": str(state.seen.floor), "counters": json.dumps(counters),
    }
    return safetensors.numpy.save(tensors, metadata=meta)


def write(directory: Path, state: ServerState, r: Rules, seq: int, fsync: Fsync = os.fsync) -> None:
    """Write the snapshot of ``state`` after record ``seq`` atomically. Thread-safe (the state is immutable);
    a snapshot older than the one already on disk is skipped."""
    data = encode(state, r, seq)
    with _lock:
        current = read_seq(directory)
        if current is not None and current > seq:
            return
        atomic_write(directory / FILE, data, fsync=fsync)


def read_seq(directory: Path) -> int | None:
    path = directory / FILE
    if not path.exists():
        return None
    with safetensors.safe_open(str(path), "np") as f:
        return int((f.metadata() or {})["seq"])


def read(directory: Path, r: Rules, epoch: str) -> tuple[int, ServerState] | None:
    """``(seq, state)`` of the newest snapshot in ``directory`` (None if there is none); raises StateError
    if it is unreadable or was written for another model or strategy."""
    path = directory / FILE
    if not path.exists():
        return None
    try:
        with safetensors.safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        tensors = safetensors.numpy.load_file(str(path))
        if meta.get("fedmqtt.snapshot") != FORMAT:
            raise StateError(f"{path}: not a fedmqtt snapshot (format {meta.get('fedmqtt.snapshot')!r})")
        if meta["fingerprint"] != r.reference.fingerprint:
            raise StateError(f"the snapshot in {directory} belongs to a different model (fingerprint differs)")
        if meta["strategy"] != r.strategy.name:
            raise StateError(f"the snapshot in {directory} was written by strategy {meta['strategy']!r}, "
                             f"not {r.strategy.name!r}")
        params = {k[len("params/"):]: jnp.asarray(v) for k, v in tensors.items() if k.startswith("params/")}
        n = int(meta["state_leaves"])
        key_leaves = set(json.loads(meta["state_key_leaves"]))
        stored = [("key" if i in key_leaves else "array", tensors[f"state/{i:06d}"]) for i in range(n)]
        version = int(meta["version"])
        history: dict[int, dict[str, Any]] = {}
        for v in json.loads(meta["history"]):
            head = f"history/{v}/"
            history[int(v)] = {k[len(head):]: jnp.asarray(a) for k, a in tensors.items() if k.startswith(head)}
        history[version] = params
        c = json.loads(meta["counters"])
        counters = Counters(int(c.get("accepted", 0)), {str(k): int(v) for k, v in c.get("rejected", {}).items()},
                            {int(k): int(v) for k, v in c.get("staleness", {}).items()}, int(c.get("round_count", 0)))
        seen = dedup.of([(str(k), int(b)) for k, b in json.loads(meta["dedup"])], int(meta["dedup_floor"]))
        state = ServerState(params, version, epoch, rebuild_state(r.strategy.init(params), stored), history, seen,
                            Gate(in_step=frozenset(str(a) for a in c.get("in_step", [])),
                                 taken={str(k): int(v) for k, v in c.get("taken", {}).items()},
                                 untracked=bool(c.get("untracked", False))), counters,
                            Admission(claims=tuple(int(n) for n in c.get("claims", []))))
        return int(meta["seq"]), state
    except StateError:
        raise
    except Exception as exc:  # safetensors' own error, KeyError, ValueError: all mean "unreadable"
        raise StateError(f"cannot read snapshot {path}: {exc}") from exc


def rebuild_state(template: Any, leaves: list[tuple[str, np.ndarray[Any, Any]]]) -> Any:
    """The strategy state: ``template``'s tree structure (``strategy.init(params)``), the stored leaves.

    >>> stored = [("array", np.ones(2, np.float32)), ("array", np.array(3, np.int32))]
    >>> rebuild_state((jnp.zeros(2), jnp.int32(0)), stored)
    (Array([1., 1.], dtype=float32), Array(3, dtype=int32))
    """
    t_leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(t_leaves) != len(leaves):
        raise StateError(f"snapshot holds {len(leaves)} strategy-state leaves, the strategy has "
                         f"{len(t_leaves)} (a different strategy or optimizer than the one that wrote it?)")
    out = []
    for i, (t, (kind, stored)) in enumerate(zip(t_leaves, leaves, strict=True)):
        if kind == "key":
            out.append(jax.random.wrap_key_data(jnp.asarray(stored), impl=jax.random.key_impl(t)))
            continue
        t_arr = jnp.asarray(t)
        if tuple(stored.shape) != tuple(t_arr.shape) or stored.dtype != t_arr.dtype:
            raise StateError(f"strategy-state leaf {i}: stored {stored.dtype}{list(stored.shape)} does not "
                             f"fit {t_arr.dtype}{list(t_arr.shape)}")
        out.append(jnp.asarray(stored, dtype=t_arr.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

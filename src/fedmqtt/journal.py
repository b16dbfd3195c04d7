"""Durable aggregator state: a write-ahead journal of accepted updates plus atomic snapshots.

A state directory holds::

    snapshot.safetensors        the newest complete snapshot (written to a temp file, fsynced, renamed)
    journal-000000000042.log    journal segment whose first record has sequence number 42

The aggregator appends one record per accepted update (the raw payload and the topic's agent id) and one
per closed sync round, *before* the update's effect becomes visible outside the process; acknowledgements
and model publishes wait until an ``fsync`` covers the record (:meth:`Journal.sync`, grouped: one fsync
commits every record written while the previous one ran). A snapshot holds everything needed to resume
without the journal before it: parameters, version, the strategy state's leaves, the model history kept
for stale bases, the de-duplication window and counters. Recovery = newest snapshot + replay of the
records after it through the same strategy code, so the resumed state equals the state before the crash.

Records are framed ``magic "FJ" | seq u64 | kind u8 | length u32 | crc32 u32 | body`` (little endian); a
torn or corrupt tail of the last segment (a write the crash interrupted, never acknowledged) is cut off.
No pickle anywhere: snapshots are safetensors with JSON metadata, records are bytes.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import safetensors.numpy

from fedmqtt.errors import StateError
from fedmqtt.types import Array

log = logging.getLogger("fedmqtt.journal")

UPDATE = 1  #: body: u16 agent-id length | agent id (utf-8) | update payload
FLUSH = 2  #: body: empty (a sync round was closed)
_FRAME = struct.Struct("<2sQBII")
_MAGIC = b"FJ"
_SEGMENT = re.compile(r"^journal-(\d{12})\.log$")
SNAPSHOT = "snapshot.safetensors"
SNAPSHOT_FORMAT = "1"


class Record(NamedTuple):
    seq: int
    kind: int
    agent: str
    payload: bytes


class Snapshot(NamedTuple):
    """The aggregator's state after journal record ``seq`` (``seq`` 0: before any record)."""

    seq: int
    version: int
    fingerprint: str
    strategy: str
    params: Mapping[str, Any]
    state_leaves: list[Any]
    history: Mapping[int, Mapping[str, Any]]
    dedup: list[tuple[str, int]]
    dedup_floor: int
    counters: Mapping[str, Any]


# ---- records --------------------------------------------------------------------------------------------
def update_body(agent: str, payload: bytes) -> bytes:
    raw = agent.encode()
    return struct.pack("<H", len(raw)) + raw + payload


def _frame(seq: int, kind: int, body: bytes) -> bytes:
    head = struct.pack("<QBI", seq, kind, len(body))
    return _FRAME.pack(_MAGIC, seq, kind, len(body), zlib.crc32(body, zlib.crc32(head)))


def _parse(seq: int, kind: int, body: bytes) -> Record:
    if kind == UPDATE:
        (n,) = struct.unpack_from("<H", body)
        return Record(seq, kind, body[2 : 2 + n].decode(), body[2 + n :])
    return Record(seq, kind, "", b"")


def _read_segment(path: Path) -> tuple[list[Record], int, bool]:
    """Records of one segment, the byte offset after the last good one, and whether the file ends there."""
    data = path.read_bytes()
    records, pos = [], 0
    while pos + _FRAME.size <= len(data):
        magic, seq, kind, length, crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if magic != _MAGIC or end > len(data):
            break
        body = data[pos + _FRAME.size : end]
        if zlib.crc32(body, zlib.crc32(struct.pack("<QBI", seq, kind, length))) != crc:
            break
        records.append(_parse(seq, kind, body))
        pos = end
    return records, pos, pos == len(data)


def segments(directory: Path) -> list[tuple[int, Path]]:
    """Journal segments by first sequence number."""
    found = []
    for p in directory.iterdir():
        m = _SEGMENT.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def read_records(directory: Path, after: int = 0, repair: bool = False) -> Iterator[Record]:
    """Every record with ``seq > after``, in order. A torn tail of the *last* segment ends the journal (and is
    truncated when ``repair``); a defect anywhere else is corruption and raises :class:`StateError`."""
    segs = segments(directory)
    expected: int | None = None
    for i, (start, path) in enumerate(segs):
        if i + 1 < len(segs) and segs[i + 1][0] <= after + 1:
            continue  # wholly covered by the snapshot
        records, good, clean = _read_segment(path)
        last = i == len(segs) - 1
        if not clean:
            if not last:
                raise StateError(f"journal segment {path} is corrupt at byte {good}")
            log.warning("journal %s: cutting a torn tail at byte %d (an interrupted write)", path, good)
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        for r in records:
            if expected is not None and r.seq != expected:
                raise StateError(f"journal {path}: record {r.seq} follows {expected - 1}")
            expected = r.seq + 1
            if r.seq > after:
                yield r
        if records and records[0].seq != start:
            raise StateError(f"journal {path} starts at record {records[0].seq}, not {start}")


def applied_updates(directory: str | Path) -> list[tuple[int, str, bytes]]:
    """``(seq, agent, payload)`` of every UPDATE record still on disk (all of them with ``keep_journal``):
    the aggregator's ledger of what it applied."""
    return [(r.seq, r.agent, r.payload) for r in read_records(Path(directory)) if r.kind == UPDATE]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Appends records from the event loop; :meth:`sync` (run in a worker thread) makes them durable.

    ``written_seq`` is the last record written (in the OS page cache), ``synced_seq`` the last one an fsync
    covered. Segments rotate at snapshots; older segments are deleted once a snapshot covers them, or kept
    as an audit ledger with ``keep``.
    """

    def __init__(self, directory: Path, next_seq: int, keep: bool = False) -> None:
        self.directory = directory
        self.keep = keep
        self.written_seq = self.synced_seq = next_seq - 1
        self._lock = threading.Lock()  # serialises sync/close/rotate bookkeeping across threads
        self._retired: list[int] = []
        self._fd = self._open_segment(next_seq)
        self._dir_dirty = True
        self.closed = False

    def _open_segment(self, first_seq: int) -> int:
        path = self.directory / f"journal-{first_seq:012d}.log"
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def append(self, kind: int, body: bytes = b"") -> int:
        """Write one record (no fsync); returns its sequence number. Raises OSError on a disk error."""
        seq = self.written_seq + 1
        data = _frame(seq, kind, body) + body
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.written_seq = seq
        return seq

    def rotate(self) -> None:
        """Start a new segment at the next sequence number (called before a snapshot)."""
        with self._lock:
            self._retired.append(self._fd)
            self._fd = self._open_segment(self.written_seq + 1)
            self._dir_dirty = True

    def sync(self) -> int:
        """fsync everything written so far (thread-safe; blocks); returns the seq now durable."""
        with self._lock:
            if self.closed:
                return self.synced_seq
            target = self.written_seq
            retired, self._retired = self._retired, []
            for fd in [*retired, self._fd]:
                os.fsync(fd)
            for fd in retired:
                os.close(fd)
            if self._dir_dirty:
                _fsync_dir(self.directory)
                self._dir_dirty = False
            self.synced_seq = max(self.synced_seq, target)
            return self.synced_seq

    def prune(self, upto_seq: int) -> None:
        """Delete segments whose records are all covered by a snapshot at ``upto_seq`` (unless ``keep``)."""
        if self.keep:
            return
        segs = segments(self.directory)
        for (_, path), (nxt, _) in itertools.pairwise(segs):
            if nxt <= upto_seq + 1:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        self.sync()
        with self._lock:
            if not self.closed:
                os.close(self._fd)
                self.closed = True


# ---- snapshots ------------------------------------------------------------------------------------------
def _leaf_to_numpy(leaf: Any) -> tuple[np.ndarray[Any, Any], bool]:
    if isinstance(leaf, jax.Array) and jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf)), True
    return np.asarray(leaf, order="C"), False


_write_lock = threading.Lock()


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_snapshot(directory: Path, snap: Snapshot) -> None:
    """Write ``snap`` atomically: temp file, fsync, rename over the old one, fsync the directory.

    Thread-safe; a snapshot older than the one already on disk is skipped."""
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for name, arr in snap.params.items():
        tensors[f"params/{name}"] = np.asarray(arr, order="C")
    keys = []
    for i, leaf in enumerate(snap.state_leaves):
        tensors[f"state/{i:06d}"], is_key = _leaf_to_numpy(leaf)
        if is_key:
            keys.append(i)
    held = []
    for version, params in snap.history.items():
        if params is snap.params:
            continue  # the current version: stored once, as params/
        held.append(version)
        for name, arr in params.items():
            tensors[f"history/{version}/{name}"] = np.asarray(arr, order="C")
    meta = {
        "fedmqtt.snapshot": SNAPSHOT_FORMAT,
        "seq": str(snap.seq),
        "version": str(snap.version),
        "fingerprint": snap.fingerprint,
        "strategy": snap.strategy,
        "state_leaves": str(len(snap.state_leaves)),
        "state_key_leaves": json.dumps(keys),
        "history": json.dumps(sorted(held)),
        "dedup": json.dumps(snap.dedup),
        "dedup_floor": str(snap.dedup_floor),
        "counters": json.dumps(snap.counters),
    }
    with _write_lock:
        current = read_snapshot_seq(directory)
        if current is not None and current > snap.seq:
            return
        tmp = directory / f"{SNAPSHOT}.{snap.seq}.tmp"
        safetensors.numpy.save_file(tensors, str(tmp), metadata=meta)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / SNAPSHOT)
        _fsync_dir(directory)


def read_snapshot_seq(directory: Path) -> int | None:
    path = directory / SNAPSHOT
    if not path.exists():
        return None
    with safetensors.safe_open(str(path), "np") as f:
        return int((f.metadata() or {})["seq"])


def read_snapshot(directory: Path) -> Snapshot | None:
    """The newest snapshot in ``directory`` (``None`` if there is none); raises StateError if unreadable."""
    path = directory / SNAPSHOT
    if not path.exists():
        return None
    try:
        with safetensors.safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        tensors = safetensors.numpy.load_file(str(path))
        if meta.get("fedmqtt.snapshot") != SNAPSHOT_FORMAT:
            raise StateError(f"{path}: not a fedmqtt snapshot (format {meta.get('fedmqtt.snapshot')!r})")
        params = {k[len("params/"):]: v for k, v in tensors.items() if k.startswith("params/")}
        n = int(meta["state_leaves"])
        keys = set(json.loads(meta["state_key_leaves"]))
        leaves: list[Any] = [("key" if i in keys else "array", tensors[f"state/{i:06d}"]) for i in range(n)]
        history: dict[int, dict[str, Array]] = {}
        for version in json.loads(meta["history"]):
            head = f"history/{version}/"
            history[int(version)] = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
        return Snapshot(
            seq=int(meta["seq"]), version=int(meta["version"]), fingerprint=meta["fingerprint"],
            strategy=meta["strategy"], params=params, state_leaves=leaves, history=history,
            dedup=[(str(k), int(b)) for k, b in json.loads(meta["dedup"])],
            dedup_floor=int(meta["dedup_floor"]), counters=json.loads(meta["counters"]),
        )
    except StateError:
        raise
    except Exception as exc:  # safetensors' own error, KeyError, ValueError: all mean "unreadable"
        raise StateError(f"cannot read snapshot {path}: {exc}") from exc


def rebuild_state(template: Any, leaves: list[tuple[str, np.ndarray[Any, Any]]]) -> Any:
    """The strategy state: ``template``'s tree structure (``strategy.init(params)``), the stored leaves.

    >>> import jax.numpy as jnp
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
            out.append(jax.random.wrap_key_data(jax.numpy.asarray(stored), impl=jax.random.key_impl(t)))
            continue
        t_arr = jax.numpy.asarray(t)
        if tuple(stored.shape) != tuple(t_arr.shape) or stored.dtype != t_arr.dtype:
            raise StateError(f"strategy-state leaf {i}: stored {stored.dtype}{list(stored.shape)} does not "
                             f"fit {t_arr.dtype}{list(t_arr.shape)}")
        out.append(jax.numpy.asarray(stored, dtype=t_arr.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

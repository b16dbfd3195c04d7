"""The aggregator's write-ahead journal: one record per accepted update and per flushed step.

A state directory holds::

    snapshot.safetensors        the newest complete snapshot of the server state (snapshot.py)
    journal-000000000042.log    journal segment whose first record has sequence number 42

The aggregator appends one record per accepted update (the raw payload and the topic's agent id) and one
per closed sync round, *before* the update's effect becomes visible outside the process; acknowledgements
and model publishes wait until an ``fsync`` covers the record (:meth:`Journal.sync`, grouped: one fsync
commits every record written while the previous one ran). Recovery = the newest snapshot + replay of the
records after it through the same core (core.replay), so the resumed state equals the state before the
crash.

Records are framed ``magic "FJ" | seq u64 | kind u8 | length u32 | crc32 u32 | body`` (little endian); a
torn or corrupt tail of the last segment (a write the crash interrupted, never acknowledged) is cut off.
No pickle anywhere: records are bytes.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from fedmqtt.errors import StateError
from fedmqtt.files import Fsync, fsync_dir, write_all

log = logging.getLogger("fedmqtt.journal")

UPDATE = 1  #: body: u16 agent-id length | agent id (utf-8) | update payload
FLUSH = 2  #: body: empty (a sync round was closed)
COMBINED = 3  #: body: as UPDATE, the agent id being a worker's (a combined update, fedmqtt.members)
_FRAME = struct.Struct("<2sQBII")
_MAGIC = b"FJ"
_SEGMENT = re.compile(r"^journal-(\d{12})\.log$")


class Record(NamedTuple):
    seq: int
    kind: int
    agent: str
    payload: bytes


# ---- records --------------------------------------------------------------------------------------------
def update_body(agent: str, payload: bytes) -> bytes:
    raw = agent.encode()
    return struct.pack("<H", len(raw)) + raw + payload


def _frame(seq: int, kind: int, body: bytes) -> bytes:
    head = struct.pack("<QBI", seq, kind, len(body))
    return _FRAME.pack(_MAGIC, seq, kind, len(body), zlib.crc32(body, zlib.crc32(head)))


def _parse(seq: int, kind: int, body: bytes) -> Record:
    if kind in (UPDATE, COMBINED):
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


def applied_updates(directory: str | Path, kind: int = UPDATE) -> list[tuple[int, str, bytes]]:
    """``(seq, agent, payload)`` of every UPDATE record (``kind=COMBINED``: every combined update) still on
    disk (all of them with ``keep_journal``): the aggregator's ledger of what it applied."""
    return [(r.seq, r.agent, r.payload) for r in read_records(Path(directory)) if r.kind == kind]


class Journal:
    """Appends records from the event loop; :meth:`sync` (run in a worker thread) makes them durable.

    ``written_seq`` is the last record written (in the OS page cache), ``synced_seq`` the last one an fsync
    covered. Segments rotate at snapshots; older segments are deleted once a snapshot covers them, or kept
    as an audit ledger with ``keep``.
    """

    def __init__(self, directory: Path, next_seq: int, keep: bool = False, fsync: Fsync = os.fsync) -> None:
        self.directory = directory
        self.keep = keep
        self._fsync = fsync  # injectable: tests delay or fail it
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
        write_all(self._fd, _frame(seq, kind, body) + body)
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
                self._fsync(fd)
            for fd in retired:
                os.close(fd)
            if self._dir_dirty:
                fsync_dir(self.directory, self._fsync)
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

    def abandon(self) -> None:
        """Close without syncing (after a failed fsync: nothing more can be promised)."""
        with self._lock:
            if not self.closed:
                for fd in [*self._retired, self._fd]:
                    os.close(fd)
                self._retired = []
                self.closed = True

    def close(self) -> None:
        self.sync()
        with self._lock:
            if not self.closed:
                os.close(self._fd)
                self.closed = True

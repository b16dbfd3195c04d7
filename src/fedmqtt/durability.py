"""Where the aggregator's effects wait until they may be seen: write-ahead records, group commit, snapshots,
recovery. ``journal.py`` holds the record format, ``snapshot.py`` the state's; this module decides when.

The rule it keeps: nothing an update caused is visible outside the process before the update's journal
record is on disk. The service appends the records of each core.Effects (``append``) and hands over the
replies and the new version (``hold``); they wait until the ``committer`` task's fsync covers the records.
One fsync commits every record written while the previous one ran (group commit), so under load the cost
is one fsync per batch, not per update. A failed fsync stops the service (StateError): after one, the OS may
have dropped the written pages, so nothing written since can be promised. The ``snapshotter`` writes the
state every ``snapshot_every`` records or ``snapshot_interval`` seconds and trims the journal; ``open``
loads the newest snapshot and replays the records after it through the core.

:class:`Volatile` has the same interface for an aggregator without a state directory: it releases at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, Protocol
from urllib.parse import quote

from fedmqtt import core, journal, snapshot
from fedmqtt.core import Entry, Reply, Rules, ServerState
from fedmqtt.errors import StateError
from fedmqtt.files import Fsync, atomic_write
from fedmqtt.topics import Topics

log = logging.getLogger("fedmqtt.durability")
Release = Callable[[Sequence[Reply], ServerState | None], None]  # replies to send, a state whose version to publish
Current = Callable[[], ServerState]
_KIND = {"update": journal.UPDATE, "combined": journal.COMBINED, "flush": journal.FLUSH}
_ENTRY: dict[int, Literal["update", "combined"]] = {journal.UPDATE: "update", journal.COMBINED: "combined"}


def data_home(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME``, or ``~/.local/share`` when unset."""
    e = os.environ if env is None else env
    return Path(e["XDG_DATA_HOME"]) if e.get("XDG_DATA_HOME") else Path.home() / ".local" / "share"


def default_directory(topics: Topics, env: Mapping[str, str] | None = None) -> Path:
    """Where ``fedmqtt aggregator`` keeps a federation's state unless told otherwise:
    ``$XDG_DATA_HOME/fedmqtt/<prefix>/<federation>`` (``~/.local/share/fedmqtt/...`` when unset).

    >>> str(default_directory(Topics("fedmqtt", "plant-3"), {"XDG_DATA_HOME": "/data"}))
    '/data/fedmqtt/fedmqtt/plant-3'
    """
    base = data_home(env)
    # topic levels may hold any character but '/', '+', '#' and NUL: keep "." and ".." from meaning a path
    names = [quote(n, safe="") if n not in (".", "..") else n.replace(".", "%2E") for n in (topics.prefix,
                                                                                           topics.federation)]
    return base / "fedmqtt" / names[0] / names[1]


class _Waiting(NamedTuple):
    seq: int  # released once this record is durable
    replies: Sequence[Reply]
    state: ServerState | None  # publish its version


class Store(Protocol):
    """What the aggregator needs of its state storage (a :class:`Durability` or a :class:`Volatile`)."""

    dropped: int
    instance: str  # names the state this store holds (kept in a state directory, random otherwise)

    def open(self, r: Rules, fresh: ServerState) -> tuple[ServerState, int]: ...
    def set_epoch(self, epoch: str) -> None: ...
    def append(self, records: Sequence[Entry]) -> None: ...
    def hold(self, replies: Sequence[Reply], state: ServerState | None) -> None: ...
    async def committer(self) -> None: ...
    async def snapshotter(self, current: Current) -> None: ...
    def close(self, current: Current) -> None: ...


class Volatile:
    """No state directory: everything is released at once, and lost with the process."""

    def __init__(self, release: Release) -> None:
        self.release = release
        self.dropped = 0
        self.instance = uuid.uuid4().hex[:16]

    def open(self, r: Rules, fresh: ServerState) -> tuple[ServerState, int]:
        return fresh, 0

    def set_epoch(self, epoch: str) -> None:
        del epoch

    def append(self, records: Sequence[Entry]) -> None:
        del records

    def hold(self, replies: Sequence[Reply], state: ServerState | None) -> None:
        self.release(replies, state)

    async def committer(self) -> None:
        await asyncio.Event().wait()  # nothing to commit

    async def snapshotter(self, current: Current) -> None:
        await asyncio.Event().wait()

    def close(self, current: Current) -> None:
        del current


class Durability:
    """One state directory. Used from the event loop; fsyncs and snapshot writes go to worker threads."""

    def __init__(self, directory: str | Path, release: Release, snapshot_every: int = 500,
                 snapshot_interval: float = 60.0, keep_journal: bool = False, max_waiting: int = 1024,
                 fsync: Fsync = os.fsync) -> None:
        self.directory = Path(directory)
        self.release = release
        self.snapshot_every = snapshot_every
        self.snapshot_interval = snapshot_interval
        self.keep_journal = keep_journal
        self.max_waiting = max_waiting
        self.fsync = fsync  # injectable, so that tests can delay or fail it
        self.journal: journal.Journal | None = None
        self.snapshot_seq = 0
        self.dropped = 0  # replies not kept (more than max_waiting waited): the agents re-send
        self.instance = uuid.uuid4().hex[:16]  # replaced by the directory's own at open()
        self.failed = False  # an fsync failed: no snapshot is written at close
        self._rules: Rules | None = None
        self._lock_fd: int | None = None
        self._waiting: deque[_Waiting] = deque()
        self._commit_wanted = asyncio.Event()
        self._snapshot_due = asyncio.Event()

    # ---- recovery ---------------------------------------------------------------------------------------
    def open(self, r: Rules, fresh: ServerState) -> tuple[ServerState, int]:
        """The state after the newest snapshot and every record after it (``fresh`` on a first start, whose
        epoch is then kept); opens the journal for appending. Returns the state and the records replayed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            return self._recover(r, fresh)
        except BaseException:
            self._unlock()
            raise

    def _recover(self, r: Rules, fresh: ServerState) -> tuple[ServerState, int]:
        self._rules = r
        instance_file = self.directory / "instance"
        if instance_file.is_file():
            self.instance = instance_file.read_text().strip()
        else:
            atomic_write(instance_file, self.instance.encode(), fsync=self.fsync)
        epoch_file = self.directory / "epoch"
        if epoch_file.is_file():
            fresh = fresh._replace(epoch=epoch_file.read_text().strip())
        else:
            atomic_write(epoch_file, fresh.epoch.encode(), fsync=self.fsync)
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink()  # a snapshot the crash interrupted
        found = snapshot.read(self.directory, r, fresh.epoch)
        if found is None and not journal.segments(self.directory):
            # the first start: a snapshot at record 0 names the model and strategy, checked at every later start
            snapshot.write(self.directory, fresh, r, 0, self.fsync)
        last, state = found if found is not None else (0, fresh)
        self.snapshot_seq = last
        replayed = 0
        for rec in journal.read_records(self.directory, last, repair=True):
            kind = _ENTRY.get(rec.kind)
            entry = Entry(kind, rec.agent, rec.payload) if kind is not None else Entry("flush")
            state = core.replay(state, entry, r)
            last, replayed = rec.seq, replayed + 1
        self.journal = journal.Journal(self.directory, last + 1, keep=self.keep_journal, fsync=self.fsync)
        self.journal.sync()
        return state, replayed

    def _lock(self) -> None:
        """One aggregator per state directory: a second one would interleave two journals."""
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(f"{self.directory} is in use by another aggregator (one per federation and state "
                             "directory)") from None
        self._lock_fd = fd

    def set_epoch(self, epoch: str) -> None:
        """Start a new epoch (kept across restarts from now on)."""
        atomic_write(self.directory / "epoch", epoch.encode(), fsync=self.fsync)

    # ---- the write-ahead rule ---------------------------------------------------------------------------
    def append(self, records: Sequence[Entry]) -> None:
        j = self.journal
        assert j is not None, "open() first"
        for e in records:
            j.append(_KIND[e.kind], journal.update_body(e.agent, e.payload) if e.kind != "flush" else b"")
        if j.written_seq - self.snapshot_seq >= self.snapshot_every:
            self._snapshot_due.set()

    def hold(self, replies: Sequence[Reply], state: ServerState | None) -> None:
        """Release ``replies`` and publish ``state``'s version once every record written so far is durable.
        Beyond ``max_waiting`` waiting replies, more are dropped and counted (the agents re-send them after
        their ack timeout, and the de-duplication window answers then)."""
        assert self.journal is not None
        if replies and len(self._waiting) >= self.max_waiting:
            self.dropped += len(replies)
            replies = ()
        if replies or state is not None:
            self._waiting.append(_Waiting(self.journal.written_seq, replies, state))
            self._commit_wanted.set()

    async def committer(self) -> None:
        """Group commit: one fsync covers every record written since the last; then release what waited."""
        j = self.journal
        assert j is not None
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            if j.synced_seq < j.written_seq:
                try:
                    await asyncio.to_thread(j.sync)  # the loop keeps handling updates meanwhile
                except OSError as exc:
                    self.failed = True
                    raise StateError(f"fsync of the journal in {self.directory} failed ({exc}); stopping: "
                                     "nothing written since the last good fsync can be promised") from exc
            while self._waiting and self._waiting[0].seq <= j.synced_seq:
                w = self._waiting.popleft()
                self.release(w.replies, w.state)

    # ---- snapshots --------------------------------------------------------------------------------------
    async def snapshotter(self, current: Current) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._snapshot_due.wait(), self.snapshot_interval)
            self._snapshot_due.clear()
            await self.snapshot(current)

    async def snapshot(self, current: Current) -> None:
        """Write a snapshot now (the journal before it is then deleted, unless ``keep_journal``)."""
        j = self.journal
        if j is None or j.written_seq == self.snapshot_seq:
            return
        j.rotate()
        seq, state = j.written_seq, current()  # the state after record seq: the loop is between events
        self.snapshot_seq = seq
        await asyncio.to_thread(self._write, state, seq)

    def _write(self, state: ServerState, seq: int) -> None:
        assert self._rules is not None
        assert self.journal is not None
        snapshot.write(self.directory, state, self._rules, seq, self.fsync)
        self.journal.prune(seq)

    def close(self, current: Current) -> None:
        """A clean stop leaves a snapshot, so the next start replays nothing."""
        j = self.journal
        if j is None:
            return
        if self.failed:
            j.abandon()
            self.journal = None
            self._unlock()
            return
        try:
            if j.written_seq != self.snapshot_seq:
                j.rotate()
                self._write(current(), j.written_seq)
            j.close()
        except OSError as exc:
            raise StateError(f"cannot write the final snapshot in {self.directory}: {exc}") from exc
        finally:
            self.journal = None
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

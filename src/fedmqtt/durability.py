"""The aggregator's durable state at run time: write-ahead records, group commit, held acks and versions,
snapshots and recovery. ``journal.py`` holds the file formats; this module decides when things happen.

The rule it keeps: nothing an update caused is visible outside the process before the update's journal
record is on disk. ``handle`` appends the record (``append_update``) before applying the update; its ack
(``hold_ack``) and the model version it made (``hold_version``) wait until the ``committer`` task's fsync
covers the record. One fsync commits every record written while the previous one ran (group commit), so
under load the cost is one fsync per batch, not per update. The ``snapshotter`` task writes a snapshot
every ``snapshot_every`` records or ``snapshot_interval`` seconds and trims the journal; ``open`` loads
the newest snapshot and replays the records after it, through callbacks of the aggregator.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmqtt import journal
from fedmqtt.schemas import Ack

Capture = Callable[[int], journal.Snapshot]  # sequence number -> the aggregator's state at that record


class Durability:
    """One state directory. Not thread-safe: used from the event loop (fsync and snapshot writes go to
    worker threads)."""

    def __init__(self, directory: str | Path, snapshot_every: int = 500, snapshot_interval: float = 60.0,
                 keep_journal: bool = False) -> None:
        self.directory = Path(directory)
        self.snapshot_every = snapshot_every
        self.snapshot_interval = snapshot_interval
        self.keep_journal = keep_journal
        self.journal: journal.Journal | None = None
        self.snapshot_seq = 0
        self._versions: deque[tuple[int, int, dict[str, Any]]] = deque()  # (version, seq, params)
        self._acks: deque[tuple[int, str, Ack]] = deque()  # (seq to be durable, agent, ack)
        self._commit_wanted = asyncio.Event()
        self._snapshot_due = asyncio.Event()

    # ---- recovery ---------------------------------------------------------------------------------------
    def epoch(self, new: str) -> str:
        """The epoch kept in the directory (``new`` is written there on the first start)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "epoch"
        if path.is_file():
            return path.read_text().strip()
        journal.atomic_write(path, new.encode())
        return new

    def open(self, restore: Callable[[journal.Snapshot], None],
             replay: Callable[[journal.Record], None]) -> int:
        """Restore the newest snapshot, replay every record after it, open the journal for appending;
        returns the number of records replayed."""
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink()  # a snapshot the crash interrupted
        snap = journal.read_snapshot(self.directory)
        if snap is not None:
            restore(snap)
        last = self.snapshot_seq = snap.seq if snap else 0
        replayed = 0
        for rec in journal.read_records(self.directory, last, repair=True):
            replay(rec)
            last, replayed = rec.seq, replayed + 1
        self.journal = journal.Journal(self.directory, last + 1, keep=self.keep_journal)
        self.journal.sync()
        return replayed

    # ---- the write-ahead rule -----------------------------------------------------------------------------
    @property
    def written_seq(self) -> int:
        assert self.journal is not None
        return self.journal.written_seq

    def append_update(self, agent: str, payload: bytes) -> None:
        assert self.journal is not None
        seq = self.journal.append(journal.UPDATE, journal.update_body(agent, payload))
        if seq - self.snapshot_seq >= self.snapshot_every:
            self._snapshot_due.set()

    def append_flush(self) -> None:
        """A closed sync round; no update may follow to trigger the fsync, so it is asked for here."""
        assert self.journal is not None
        self.journal.append(journal.FLUSH)
        self._commit_wanted.set()

    def hold_version(self, version: int, params: dict[str, Any]) -> None:
        """Publish ``version`` once every record written so far is durable."""
        self._versions.append((version, self.written_seq, params))

    def hold_ack(self, agent: str, ack: Ack, limit: int) -> bool:
        """Send ``ack`` once every record written so far is durable; False when ``limit`` acks already
        wait (the caller counts it as dropped; the agent re-sends and the dedup window answers then)."""
        if len(self._acks) >= limit:
            return False
        self._acks.append((self.written_seq, agent, ack))
        self._commit_wanted.set()
        return True

    async def committer(self, send_ack: Callable[[str, Ack], None],
                        commit_version: Callable[[int, dict[str, Any]], None]) -> None:
        """Group commit: one fsync covers every record written since the last; then release what waited."""
        j = self.journal
        assert j is not None
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            if j.synced_seq < j.written_seq:
                await asyncio.to_thread(j.sync)  # the loop keeps handling updates meanwhile
            while self._acks and self._acks[0][0] <= j.synced_seq:
                _, agent, ack = self._acks.popleft()
                send_ack(agent, ack)
            while self._versions and self._versions[0][1] <= j.synced_seq:
                version, _, params = self._versions.popleft()
                commit_version(version, params)

    # ---- snapshots ----------------------------------------------------------------------------------------
    async def snapshotter(self, capture: Capture) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._snapshot_due.wait(), self.snapshot_interval)
            self._snapshot_due.clear()
            await self.snapshot(capture)

    async def snapshot(self, capture: Capture) -> None:
        """Write a snapshot now (the journal before it is then deleted, unless ``keep_journal``)."""
        j = self.journal
        if j is None or j.written_seq == self.snapshot_seq:
            return
        j.rotate()
        snap = capture(j.written_seq)
        self.snapshot_seq = snap.seq
        await asyncio.to_thread(self._write, snap)

    def _write(self, snap: journal.Snapshot) -> None:
        journal.write_snapshot(self.directory, snap)
        assert self.journal is not None
        self.journal.prune(snap.seq)

    def close(self, capture: Capture) -> None:
        """A clean stop leaves a snapshot, so the next start replays nothing."""
        j = self.journal
        if j is None:
            return
        if j.written_seq != self.snapshot_seq:
            j.rotate()
            self._write(capture(j.written_seq))
        j.close()
        self.journal = None

"""An agent's unacknowledged updates: in memory, or on disk so that a reboot keeps them too.

:class:`Outbox` is a mapping ``update_id -> Pending``. With a directory, the first time an update is put in
it is written as ``<update_id>.safetensors`` (temp file, fsync, rename, fsync the directory) *before* it is
sent, and the file is deleted when the aggregator's acknowledgement settles it. On start every file left
behind is loaded back and re-sent. Later puts of the same id (a new ``sent_at`` after a re-send) stay in
memory only.

>>> box = Outbox()
>>> box["u1"] = Pending(b"...", 0.0)
>>> len(box), box.pop("u1").payload
(1, b'...')
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import NamedTuple

from fedmqtt import codec
from fedmqtt.errors import CodecError
from fedmqtt.files import atomic_write
from fedmqtt.schemas import Ack

log = logging.getLogger("fedmqtt.outbox")
_NAME = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_SUFFIX = ".safetensors"


class Pending(NamedTuple):
    payload: bytes
    sent_at: float  # time.monotonic() of the last send; 0.0 = never sent by this process
    sends: int = 0  # how often it was published; an update loaded back from disk counts as sent once


class Outbox(MutableMapping[str, Pending]):
    """Unacknowledged updates by id; persisted under ``directory`` when one is given."""

    def __init__(self, directory: str | Path | None = None, agent: str | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._items: dict[str, Pending] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load(agent)

    def _load(self, agent: str | None) -> None:
        assert self.directory is not None
        for path in sorted(self.directory.iterdir(), key=lambda p: p.stat().st_mtime):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write the crash interrupted; never sent
                continue
            update_id = path.name[: -len(_SUFFIX)]
            if not path.name.endswith(_SUFFIX) or not _NAME.match(update_id):
                continue
            payload = path.read_bytes()
            try:
                meta = codec.decode(payload).metadata
            except CodecError as exc:
                log.warning("outbox: dropping unreadable %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            if meta.get("fedmqtt.update_id") != update_id or (agent and meta.get("fedmqtt.agent") != agent):
                log.warning("outbox: %s belongs to another agent or update; left alone", path)
                continue
            self._items[update_id] = Pending(payload, 0.0, 1)  # it may have gone out
        if self._items:
            log.info("outbox: %d unacknowledged update(s) loaded from %s", len(self._items), self.directory)

    def _path(self, update_id: str) -> Path:
        assert self.directory is not None
        if not _NAME.match(update_id):
            raise ValueError(f"update id {update_id!r} cannot name a file")
        return self.directory / f"{update_id}{_SUFFIX}"

    def __getitem__(self, update_id: str) -> Pending:
        return self._items[update_id]

    def __setitem__(self, update_id: str, pending: Pending) -> None:
        if self.directory is not None and update_id not in self._items:
            atomic_write(self._path(update_id), pending.payload)
        self._items[update_id] = pending

    async def put(self, update_id: str, pending: Pending) -> None:
        """``box[update_id] = pending`` with the disk write and its fsyncs in a worker thread, so that a
        slow flash card does not stall the agent's event loop. Cancelled meanwhile, it lets the write finish
        and keeps the update (it is on disk, so it is sent after a restart) before giving up."""
        if self.directory is not None and update_id not in self._items:
            write = asyncio.ensure_future(asyncio.to_thread(atomic_write, self._path(update_id), pending.payload))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                with contextlib.suppress(OSError):
                    await write
                    self._items[update_id] = pending
                raise
        self._items[update_id] = pending

    def __delitem__(self, update_id: str) -> None:
        del self._items[update_id]
        if self.directory is not None:
            self._path(update_id).unlink(missing_ok=True)  # a crash before this only causes a re-send

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def outcome(ack: Ack, pending: Pending | None) -> str:
    """How an acknowledgement settles an update: ``accepted`` (``duplicate`` too: the aggregator applied it
    before), ``rejected``, or ``unknown``: a re-sent update refused as ``stale`` may have been applied from an
    earlier copy whose acknowledgement was lost; the aggregator forgets applied ids once their base is past
    ``max_staleness``, so it cannot tell. Either way the update is settled: nothing is re-sent."""
    if ack.status == "accepted" or ack.reason == "duplicate":
        return "accepted"
    if ack.reason == "stale" and pending is not None and pending.sends > 1:
        return "unknown"
    return "rejected"


def log_level(ack: Ack) -> int:
    """How loudly an agent logs a refusal: ``not_sampled`` is routine (participation sampling leaves most
    devices out of most steps), every other refusal is a warning.

    >>> log_level(Ack(update_id="u", status="rejected", version=0, reason="not_sampled")) == logging.INFO
    True
    """
    return logging.INFO if ack.reason == "not_sampled" else logging.WARNING


PRIVACY_BUDGET_PAUSE = 300.0  # seconds between rounds once the aggregator refuses updates as privacy_budget


def paced(pause: float, ack: Ack) -> float:
    """Seconds between local rounds after ``ack``: over the aggregator's rate bound, twice as long each time;
    easing off again as updates are accepted (a device faster than the bound settles just under it). A device
    whose privacy budget is spent tries again only every five minutes (the operator may raise the budget).
    An update the server's coin left out (``not_sampled``) paces like an accepted one: a device's schedule
    must not depend on the coins, or its arrivals would tell them (docs/security.md).

    >>> paced(0.0, Ack(update_id="u", status="rejected", version=0, reason="rate_limited"))
    0.02
    >>> paced(0.0, Ack(update_id="u", status="rejected", version=0, reason="privacy_budget"))
    300.0
    """
    if ack.reason == "privacy_budget":
        return PRIVACY_BUDGET_PAUSE
    if ack.reason == "rate_limited":
        return min(max(2 * pause, 0.02), 10.0)
    if ack.status == "accepted" or ack.reason == "not_sampled":
        return pause * 0.9 if pause > 0.005 else 0.0
    return pause

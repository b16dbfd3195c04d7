"""Which updates were applied: the de-duplication window, an immutable value (part of the server state).

An update is named by ``agent/update_id`` and remembered under the base version it was trained on, while a
re-send of it could still pass the staleness check. ``expire`` forgets the bases older than
``version - max_staleness`` (a re-send of those would be refused as stale anyway). ``capacity`` bounds memory
under any load: beyond it, the oldest base goes first and ``floor`` rises to it; updates on a base ``<= floor``
are refused as stale, so an evicted id can never be applied twice, and the floor rises no further than it must.

A re-send is the same payload, so it carries the same base: the lookup is by base. The maps are
persistent (hash array mapped tries, ``immutables.Map``): remembering one more update costs O(log n) and
shares the rest with the previous value, however many updates are on one base (a frozenset copied per
update made it O(n): 0.14 ms per update with 20,000 updates on one base).

>>> s = add(Seen(), "a/u1", base=3, capacity=2)
>>> contains(s, "a/u1", 3), contains(s, "a/u2", 3)
(True, False)
>>> s = add(add(s, "b/u1", 4, capacity=2), "c/u1", 5, capacity=2)  # over capacity: base 3 goes
>>> s.floor, s.size
(3, 2)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from immutables import Map

_EMPTY: Map[str, None] = Map()


class Seen(NamedTuple):
    by_base: Map[int, Map[str, None]] = Map()  # base -> the names on it; persistent, shared between values
    size: int = 0
    floor: int = -1  # updates on a base <= floor are refused as stale

    def items(self) -> list[tuple[str, int]]:
        """``(key, base)`` pairs, oldest base first (for snapshots)."""
        return [(k, b) for b in sorted(self.by_base) for k in sorted(self.by_base[b])]


def key(agent: str, update_id: str) -> str:
    return f"{agent}/{update_id}"


def contains(seen: Seen, name: str, base: int) -> bool:
    keys = seen.by_base.get(base)
    return keys is not None and name in keys


def add(seen: Seen, name: str, base: int, capacity: int) -> Seen:
    """``seen`` with ``name`` remembered under ``base``; the oldest bases go beyond ``capacity``."""
    names = seen.by_base.get(base, _EMPTY)
    if name in names:
        return seen
    by_base = seen.by_base.set(base, names.set(name, None))
    size, floor = seen.size + 1, seen.floor
    while size > capacity and by_base:
        oldest = min(by_base)
        size -= len(by_base[oldest])
        by_base = by_base.delete(oldest)
        floor = max(floor, oldest)
    return Seen(by_base, size, floor)


def discard(seen: Seen, name: str, base: int) -> Seen:
    """``seen`` without ``name`` (a worker letting an update go unanswered, to take its re-send)."""
    names = seen.by_base.get(base)
    if names is None or name not in names:
        return seen
    names = names.delete(name)
    by_base = seen.by_base.set(base, names) if names else seen.by_base.delete(base)
    return Seen(by_base, seen.size - 1, seen.floor)


def expire(seen: Seen, oldest_acceptable_base: int) -> Seen:
    """``seen`` without the bases older than ``oldest_acceptable_base``."""
    old = [b for b in seen.by_base if b < oldest_acceptable_base]
    if not old:
        return seen
    by_base, size = seen.by_base, seen.size
    for b in old:
        size -= len(by_base[b])
        by_base = by_base.delete(b)
    return Seen(by_base, size, seen.floor)


def of(items: Iterable[tuple[str, int]], floor: int) -> Seen:
    """A window holding ``items`` (``(key, base)`` pairs, as :meth:`Seen.items` gives them)."""
    by_base: dict[int, dict[str, None]] = {}
    for name, base in items:
        by_base.setdefault(base, {})[name] = None
    return Seen(Map({b: Map(names) for b, names in by_base.items()}), sum(len(k) for k in by_base.values()), floor)

"""Which updates were applied: the de-duplication window, an immutable value (part of the server state).

An update is named by ``agent/update_id`` and remembered under the base version it was trained on, while a
re-send of it could still pass the staleness check. ``expire`` forgets the bases older than
``version - max_staleness`` (a re-send of those would be refused as stale anyway). ``capacity`` bounds memory
under any load: beyond it, the oldest base goes first and ``floor`` rises to it; updates on a base ``<= floor``
are refused as stale, so an evicted id can never be applied twice, and the floor rises no further than it must.

A re-send is the same payload, so it carries the same base: the lookup is by base, O(1).

>>> s = add(Seen(), "a/u1", base=3, capacity=2)
>>> contains(s, "a/u1", 3), contains(s, "a/u2", 3)
(True, False)
>>> s = add(add(s, "b/u1", 4, capacity=2), "c/u1", 5, capacity=2)  # over capacity: base 3 goes
>>> s.floor, s.size
(3, 2)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple


class Seen(NamedTuple):
    by_base: Mapping[int, frozenset[str]] = {}  # never mutated: every change builds a new mapping
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
    by_base = dict(seen.by_base)
    by_base[base] = by_base.get(base, frozenset()) | {name}
    size, floor = seen.size + 1, seen.floor
    while size > capacity and by_base:
        oldest = min(by_base)
        size -= len(by_base.pop(oldest))
        floor = max(floor, oldest)
    return Seen(by_base, size, floor)


def expire(seen: Seen, oldest_acceptable_base: int) -> Seen:
    """``seen`` without the bases older than ``oldest_acceptable_base``."""
    old = [b for b in seen.by_base if b < oldest_acceptable_base]
    if not old:
        return seen
    by_base = dict(seen.by_base)
    size = seen.size
    for b in old:
        size -= len(by_base.pop(b))
    return Seen(by_base, size, seen.floor)


def of(items: Iterable[tuple[str, int]], floor: int) -> Seen:
    """A window holding ``items`` (``(key, base)`` pairs, as :meth:`Seen.items` gives them)."""
    by_base: dict[int, set[str]] = {}
    for name, base in items:
        by_base.setdefault(base, set()).add(name)
    frozen = {b: frozenset(k) for b, k in by_base.items()}
    return Seen(frozen, sum(len(k) for k in frozen.values()), floor)

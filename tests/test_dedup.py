"""The de-duplication window is a value: a later add never changes an earlier one (snapshots and the
committed state hold earlier ones), and it stays correct with many updates on one base."""

from __future__ import annotations

from fedmqtt import dedup


def test_an_earlier_window_is_unchanged_by_later_adds_and_a_repeat_counts_once() -> None:
    first = dedup.add(dedup.Seen(), "a/u0", 5, capacity=10_000)
    later = first
    for i in range(1, 3000):  # thousands on one base, as a fleet on a slowly moving version makes
        later = dedup.add(later, f"a/u{i}", 5, capacity=10_000)
    assert first.size == 1 and not dedup.contains(first, "a/u1", 5)
    assert later.size == 3000 and dedup.contains(later, "a/u2999", 5) and dedup.contains(later, "a/u0", 5)
    assert dedup.add(later, "a/u7", 5, capacity=10_000).size == 3000
    assert dedup.of(later.items(), later.floor) == later  # a snapshot's round trip


def test_over_capacity_the_oldest_base_goes_and_the_floor_rises_to_it() -> None:
    s = dedup.Seen()
    for base in range(4):
        for i in range(3):
            s = dedup.add(s, f"d{i}/u{base}", base, capacity=7)
    assert s.floor == 1 and s.size == 6 and sorted(s.by_base) == [2, 3]
    assert not dedup.contains(s, "d0/u0", 0) and dedup.contains(s, "d0/u3", 3)
    expired = dedup.expire(s, 3)
    assert sorted(expired.by_base) == [3] and expired.size == 3 and s.size == 6

"""A fixed-bucket histogram of durations, cheap enough for the per-update path (one bisect, one add).

>>> h = Durations((0.001, 0.01))
>>> h.add(0.0005); h.add(0.005); h.add(1.0)
>>> h.counts, round(h.total, 4)
([1, 1, 1], 1.0055)
"""

from __future__ import annotations

import bisect

HANDLING_BOUNDS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)


class Durations:
    def __init__(self, bounds: tuple[float, ...] = HANDLING_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> tuple[tuple[float, ...], list[int], float]:
        return self.bounds, list(self.counts), self.total

"""Per-device admission: how much of the federation one device may take, an immutable value in the server
state, and pure functions on it.

Two bounds, each counted under its own rejection reason, with defaults that an honest device does not meet:

- **rate** (``rate_limited``): a token bucket per device, ``max_rate`` accepted updates per second
  sustained, ``max_burst`` at once. Time is the event's (``now``, given by the service); without it the rate
  is not checked (the simulation, replay).
- **share** (``share_exceeded``): among the last ``window`` accepted updates, one device may hold at most
  ``max_share`` times its fair share (``window / devices seen in it``), and never fewer than ``min_count``.
  Valid but worthless updates sent as fast as the link allows cannot push the version forward alone or
  crowd a buffer: with 30 devices, one holds at most a third of the versions.
- **majority** (``share_exceeded`` too): while other devices are in the window, one device may hold at most
  ``max_fraction`` of it (and never fewer than ``majority_min``, 32, so that the device that happens to start
  first is not refused while the others connect), from the first updates on. In a small fleet
  the fair-share bound allows everything (ten times a third of the window is more than the window), so
  without it one device sending at its rate limit would make every version and the others' updates stale
  (``max_staleness`` versions pass within one of their rounds): with it, the others' updates are at most
  about ``1 / (1 - max_fraction)`` times as stale as without the flood.

A device's claimed sample count (``fedmqtt.num_samples``, the weight of its update in sample-weighted
averages: synchronous FedAvg, FedBuff with ``weight_by_samples``) cannot be checked, so it is capped at
``sample_cap`` times the median of the last ``window`` accepted claims (once ``min_count`` are known): one
liar claiming 10^18 weighs no more than a device with twice the typical data set. The cost is that a
device that truly holds more than ``sample_cap`` times the median is under-weighted; raise the cap where
data sets are that uneven.

Only updates that would be accepted count. Memory is bounded by ``window`` (buckets are kept for the
devices in the window only; a device that left it starts again with a full bucket).

>>> lim = AdmissionLimits(max_rate=None, max_share=2.0, max_fraction=None, window=8, min_count=2)
>>> a = Admission()
>>> for agent in "aaaab":
...     a = record(a, agent, None, lim)
>>> check(a, "a", None, lim), check(a, "b", None, lim)  # 2 devices in 5: bound max(2, 2 x 5 / 2) = 5
(None, None)
>>> for agent in "cdef":
...     a = record(a, agent, None, lim)
>>> a.recent, check(a, "a", None, lim)  # 6 devices in 8: bound max(2, 2 x 8 / 6) = 2.7; "a" holds 3
(('a', 'a', 'a', 'b', 'c', 'd', 'e', 'f'), 'share_exceeded')
>>> lim = AdmissionLimits(max_rate=None, max_share=None, max_fraction=0.75, majority_min=2)
>>> a = record(record(record(Admission(), "a", None, lim), "a", None, lim), "a", None, lim)
>>> check(a, "a", None, lim)  # alone in the window: the whole federation
>>> a = record(a, "b", None, lim)
>>> check(a, "a", None, lim), check(record(a, "b", None, lim), "a", None, lim)  # 3 of 4: bound 3; of 5: 3.75
('share_exceeded', None)
>>> check(a, "a", None, lim._replace(exempt=frozenset({"a"})))  # a site aggregator: no bound
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class AdmissionLimits(NamedTuple):
    max_rate: float | None = 50.0  # accepted updates per second per device, sustained (None: no limit)
    max_burst: float = 50.0  # ... at once, after a pause
    max_share: float | None = 10.0  # times a device's fair share of the window (None: no limit)
    max_fraction: float | None = 0.75  # of the window, while another device is in it (None: no limit) ...
    majority_min: int = 32  # ... and never fewer than this: a device that starts before the others is not refused
    window: int = 200  # the last accepted updates the share is counted over
    min_count: int = 8  # a device may always hold this many of the window
    sample_cap: float | None = 2.0  # times the median recent claim: the most samples an update may claim
    # agents the rate and share bounds do not apply to: site aggregators, whose combined updates carry many
    # devices' work and may rightly be most of the root's updates (their sample claims are still capped)
    exempt: frozenset[str] = frozenset()


class Admission(NamedTuple):
    recent: tuple[str, ...] = ()  # devices of the last ``window`` accepted updates, oldest first
    buckets: Mapping[str, tuple[float, float]] = {}  # device -> (tokens, time), for devices in ``recent``
    claims: tuple[int, ...] = ()  # sample counts claimed by the last ``window`` accepted updates


def samples(adm: Admission, claimed: int, lim: AdmissionLimits) -> int:
    """The sample count an update may weigh: its claim, capped at ``sample_cap`` x the median recent claim.

    >>> lim = AdmissionLimits(min_count=3)
    >>> samples(Admission(claims=(100, 120, 90)), 10**18, lim), samples(Admission(claims=(100, 120, 90)), 150, lim)
    (200, 150)
    """
    if lim.sample_cap is None or len(adm.claims) < lim.min_count:
        return claimed
    ordered = sorted(adm.claims)
    return min(claimed, max(1, int(lim.sample_cap * ordered[len(ordered) // 2])))


def check(adm: Admission, agent: str, now: float | None, lim: AdmissionLimits) -> str | None:
    """The reason ``agent``'s next update must be refused (``rate_limited``, ``share_exceeded``), or None."""
    if agent in lim.exempt:
        return None
    if lim.max_rate is not None and now is not None and _tokens(adm, agent, now, lim) < 1.0:
        return "rate_limited"
    held = adm.recent.count(agent)
    if lim.max_fraction is not None and held >= max(lim.majority_min, lim.max_fraction * len(adm.recent)) \
            and held < len(adm.recent):
        return "share_exceeded"
    if lim.max_share is not None and len(adm.recent) >= lim.window // 2:
        devices = len(set(adm.recent))
        bound = max(lim.min_count, lim.max_share * len(adm.recent) / max(devices, 1))
        if held >= bound:
            return "share_exceeded"
    return None


def record(adm: Admission, agent: str, now: float | None, lim: AdmissionLimits, claimed: int = 1) -> Admission:
    """``adm`` after an accepted update from ``agent`` that claimed ``claimed`` samples."""
    recent = (*adm.recent, agent)[-lim.window :]
    buckets = dict(adm.buckets)
    if len(adm.recent) == lim.window and adm.recent[0] not in recent:  # the oldest left the window for good
        buckets.pop(adm.recent[0], None)
    if now is not None and lim.max_rate is not None:
        buckets[agent] = (_tokens(adm, agent, now, lim) - 1.0, now)
    return Admission(recent, buckets, (*adm.claims, claimed)[-lim.window :])


def _tokens(adm: Admission, agent: str, now: float, lim: AdmissionLimits) -> float:
    assert lim.max_rate is not None
    tokens, at = adm.buckets.get(agent, (lim.max_burst, now))
    return min(lim.max_burst, tokens + (now - at) * lim.max_rate)

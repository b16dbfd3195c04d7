"""What a device can do, as it advertises in its retained status (protocol 1.1, docs/protocol.md 10).

Plain values only (the wire form and its checks are in schemas.py): measured compute throughput (a short
probe of the device's own jitted training step, then its real rounds), memory, power state, a link estimate
fed from its own publish times, its number of local examples and the tasks it holds data for, and a few
free-form tags. Nothing about the data beyond counts (and, optionally, the mean training loss of its last
local round, a single number that the utility policy uses).

The probes read the platform where it tells (``/proc/meminfo``, ``/sys/class/power_supply``) and say
``None`` / ``"unknown"`` where it does not; none of them raises.

>>> est = LinkEstimator(alpha=0.5)
>>> est.observe(100_000, 1.0); est.observe(300_000, 1.0); round(est.uplink or 0)
200000
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

PowerSource = Literal["mains", "battery", "charging", "unknown"]
POWER_SOURCES: tuple[str, ...] = ("mains", "battery", "charging", "unknown")
MAX_TAGS = 16  # tags per device
MAX_TAG_LEN = 64  # characters in a tag's key or value
MAX_TASKS = 16
MAX_STEPS_PER_S = 1e9  # the protocol's bounds on what a device advertises (docs/protocol.md 10.1)
MAX_UPLINK = 1e12
MAX_LOSS = 1e6
TASK_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
TAG_KEY_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"


def check_task_name(name: str) -> str:
    """``name`` if it is a task name of the protocol (1-64 of ``A-Z a-z 0-9 . _ -``), else ValueError."""
    if not isinstance(name, str) or not re.fullmatch(TASK_PATTERN, name):
        raise ValueError(f"task {str(name)[:80]!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    return name


def check_tags(tags: Mapping[str, str]) -> Mapping[str, str]:
    """``tags`` if they keep the protocol's rules (at most 16; key 1-64 of ``A-Z a-z 0-9 . _ : -``, value at
    most 64 printable characters), else ValueError."""
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags, got {len(tags)}")
    for key, value in tags.items():
        if not isinstance(key, str) or not re.fullmatch(TAG_KEY_PATTERN, key):
            raise ValueError(f"tag key {str(key)[:80]!r} must be 1-{MAX_TAG_LEN} of A-Z a-z 0-9 . _ : -")
        if not isinstance(value, str) or len(value) > MAX_TAG_LEN or not value.isprintable():
            raise ValueError(f"tag {key!r}: the value must be at most {MAX_TAG_LEN} printable characters")
    return tags


@dataclass(frozen=True)
class Compute:
    """Local training throughput: optimizer steps per second at ``batch_size`` examples per step."""

    steps_per_s: float
    batch_size: int


@dataclass(frozen=True)
class Memory:
    total: int | None = None  # bytes; None where the platform does not say
    available: int | None = None


@dataclass(frozen=True)
class Power:
    source: PowerSource = "unknown"
    battery_percent: float | None = None  # 0..100 where /sys/class/power_supply tells


@dataclass(frozen=True)
class Link:
    """The device's own estimate of its uplink (bytes/s) and round trip to the broker (seconds)."""

    uplink: float | None = None
    rtt: float | None = None


@dataclass(frozen=True)
class Capabilities:
    """One device's advertisement. ``tasks`` are the tasks it holds data for: a coordinator assigns it only
    to a federation running one of them."""

    compute: Compute | None = None
    memory: Memory = field(default_factory=Memory)
    power: Power = field(default_factory=Power)
    link: Link = field(default_factory=Link)
    examples: int = 0
    tasks: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    loss: float | None = None  # mean training loss of the last local round, if the device reports it

    def __hash__(self) -> int:  # tags is a dict: hash by value so that equal advertisements compare cheaply
        return hash((self.compute, self.memory, self.power, self.link, self.examples, self.tasks,
                     tuple(sorted(self.tags.items())), self.loss))


class LinkEstimator:
    """An EWMA of the uplink, fed from the device's own publishes: ``observe(bytes, seconds)`` after each
    QoS 1 publish completes (seconds from the call to the PUBACK). A publish of under ``small`` bytes says
    more about latency than throughput: it updates the RTT estimate instead (``rtt`` is the EWMA of those).
    The uplink is bytes over (seconds - rtt), so the handshake does not count against the bandwidth."""

    def __init__(self, alpha: float = 0.3, small: int = 4096) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.small = small
        self.uplink: float | None = None
        self.rtt: float | None = None
        self.observed = 0

    def observe(self, nbytes: int, seconds: float) -> None:
        """One publish of ``nbytes`` that took ``seconds``; nonsense (negative, NaN) is ignored."""
        if not (nbytes >= 0 and math.isfinite(seconds) and seconds > 0):
            return
        self.observed += 1
        if nbytes < self.small:
            self.rtt = self._mix(self.rtt, seconds)
            return
        transfer = max(seconds - (self.rtt or 0.0), seconds / 10)  # never more than 10x the raw rate
        self.uplink = self._mix(self.uplink, nbytes / transfer)

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def estimate(self) -> Link:
        return Link(self.uplink, self.rtt)


class ComputeEstimator:
    """An EWMA of training throughput from real local rounds: ``observe(steps, seconds)`` after each one.
    Starts from the probe's value, so a device's advertisement follows its load (thermal throttling,
    other work) without a new probe."""

    def __init__(self, start: Compute, alpha: float = 0.3) -> None:
        self.current = start
        self.alpha = alpha

    def observe(self, steps: int, seconds: float, batch_size: int | None = None) -> Compute:
        if steps > 0 and math.isfinite(seconds) and seconds > 0:
            rate = (1 - self.alpha) * self.current.steps_per_s + self.alpha * steps / seconds
            self.current = Compute(rate, batch_size or self.current.batch_size)
        return self.current


def probe_compute(run_round: Callable[[], object], steps: int, batch_size: int, repeats: int = 3,
                  clock: Callable[[], float] = time.perf_counter) -> Compute:
    """Time ``run_round`` (one local round of ``steps`` steps, e.g. ``lambda: trainer.train(params,
    batches)``): once to compile it, then ``repeats`` times; the median gives steps per second. Blocking:
    call it in a worker thread (``asyncio.to_thread``) from a service.

    >>> ticks = iter([0.0, 1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 2.5])
    >>> probe_compute(lambda: None, steps=10, batch_size=32, clock=lambda: next(ticks))
    Compute(steps_per_s=20.0, batch_size=32)
    """
    if steps < 1 or repeats < 1:
        raise ValueError("the probe needs at least one step and one repeat")
    run_round()  # compile (and warm caches): not part of the device's speed
    times = []
    for _ in range(repeats):
        started = clock()
        run_round()
        times.append(clock() - started)
    seconds = max(statistics.median(times), 1e-9)
    return Compute(steps / seconds, batch_size)


def read_memory(meminfo: Path = Path("/proc/meminfo")) -> Memory:
    """Total and available memory in bytes from ``/proc/meminfo`` (Linux), else from ``os.sysconf`` where it
    knows, else unknown."""
    try:
        fields = {}
        for line in meminfo.read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
        if "MemTotal" in fields:
            return Memory(fields["MemTotal"], fields.get("MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return Memory(page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return Memory()


def read_power(supplies: Path = Path("/sys/class/power_supply")) -> Power:
    """Mains, battery or charging, and the battery's charge, from Linux's ``/sys/class/power_supply``; a
    machine without one of its entries (a server, a container, another OS) says ``unknown``."""
    try:
        entries = sorted(supplies.iterdir())
    except OSError:
        return Power()
    online_mains: bool | None = None  # None: no mains adapter listed
    battery_status, percent = None, None
    for entry in entries:
        kind, online = _read(entry / "type"), _read(entry / "online")
        if kind in ("Mains", "USB", "USB_C") and online is not None:
            online_mains = bool(online_mains) or online == "1"
        elif kind == "Battery" and battery_status is None:
            battery_status = _read(entry / "status")
            capacity = _read(entry / "capacity")
            if capacity is not None and capacity.isdigit():
                percent = min(float(capacity), 100.0)
    if battery_status is None:
        return Power("mains" if online_mains else "unknown")
    if battery_status == "Charging":
        return Power("charging", percent)
    if battery_status == "Discharging" or online_mains is False:
        return Power("battery", percent)
    return Power("mains", percent)  # Full / Not charging: on mains


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def measure(compute: Compute | None, link: LinkEstimator | None, examples: int, tasks: tuple[str, ...],
            tags: Mapping[str, str] | None = None, loss: float | None = None,
            power: Power | None = None) -> Capabilities:
    """A fresh advertisement: the given compute and link estimates, memory and (unless given) power read now.
    Estimates beyond the protocol's bounds (a publish timed at a microsecond on a local broker, a diverging
    loss) are capped at them, and a loss that is not a finite non-negative number is left out, so the
    advertisement is always one a coordinator accepts."""
    if compute is not None and compute.steps_per_s > MAX_STEPS_PER_S:
        compute = Compute(MAX_STEPS_PER_S, compute.batch_size)
    est = link.estimate() if link is not None else Link()
    if est.uplink is not None and est.uplink > MAX_UPLINK:
        est = Link(MAX_UPLINK, est.rtt)
    return Capabilities(compute=compute, memory=read_memory(), power=power if power is not None else read_power(),
                        link=est, examples=examples, tasks=tasks,
                        tags=dict(tags or {}),
                        loss=min(loss, MAX_LOSS) if loss is not None and math.isfinite(loss) and loss >= 0 else None)

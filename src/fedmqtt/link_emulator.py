"""An emulated IoT network on one Linux machine: every device behind its own slow, delayed, lossy link.

Two network namespaces: ``<name>-hub`` (the broker and the aggregator, with loopback between them, as in a
data centre) and ``<name>-fleet`` (the devices). Device i reaches the hub only through its own link: a pair
of TUN interfaces, one in each namespace, joined by this process, which moves every IP packet between them
and applies, per direction, what ``tc netem`` and ``tbf`` would: a bandwidth (packets are serialised at that
rate behind a drop-tail queue), a one-way delay and a random loss. The TCP stacks at both ends are the
kernel's, so loss means real retransmissions and real congestion control. This is the approach of Mahimahi
(userspace link shells over TUN); it needs root and ``/dev/net/tun`` but no kernel module (``sch_netem`` is
missing from many container and micro-VM kernels).

In the fleet namespace device i connects to ``hub_address(i)``, a hub address routed over its own link; the
broker in the hub namespace listens on all of that namespace's addresses (there is no other way in).

    net = EmulatedNetwork([CELLULAR] * 30, name="fq")
    async with net:
        subprocess.Popen(net.exec_in("hub", ["mosquitto", "-c", conf]))
        ...  # device i: mqtt://{net.hub_address(i)}:{port}, a process started with net.exec_in("fleet", ...)
    net.stats()  # bytes and packets per link and direction, drops by cause
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import random
import shutil
import struct
import subprocess
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Self

from fedmqtt.errors import ConfigError

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_CLONE_NEWNET = 0x40000000


class LinkClass(NamedTuple):
    """One kind of device link. Rates in kbit/s, delay in ms (one way, each direction), loss per packet."""

    name: str
    down_kbit: float
    up_kbit: float
    delay_ms: float
    loss: float = 0.0
    queue_ms: float = 500.0  # a packet that would wait longer than this for the link is dropped (drop-tail)


#: Link classes of IoT fleets: LTE-M-like cellular, an NB-IoT-like narrowband link, a Wi-Fi site.
CELLULAR = LinkClass("cellular", down_kbit=1000, up_kbit=256, delay_ms=100, loss=0.01)
NARROWBAND = LinkClass("narrowband", down_kbit=256, up_kbit=64, delay_ms=200, loss=0.02)
WIFI = LinkClass("wifi", down_kbit=20_000, up_kbit=5_000, delay_ms=10, loss=0.001)
CLASSES = {c.name: c for c in (CELLULAR, NARROWBAND, WIFI)}


def link_mix(n: int, mix: dict[str, float], seed: int = 0) -> list[LinkClass]:
    """``n`` links in the given proportions (e.g. ``{"cellular": 0.6, "narrowband": 0.2, "wifi": 0.2}``),
    shuffled with ``seed`` so that link class and device speed are independent."""
    unknown = set(mix) - CLASSES.keys()
    if unknown:
        raise ConfigError(f"unknown link classes {sorted(unknown)}; known: {', '.join(CLASSES)}")
    total = sum(mix.values())
    if total <= 0 or any(v < 0 for v in mix.values()):
        raise ConfigError(f"link shares must be non-negative and not all zero: {mix}")
    exact = {k: n * v / total for k, v in mix.items()}
    counts = {k: int(x) for k, x in exact.items()}  # then the largest remainders get the links left over
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    links = [CLASSES[k] for k, c in counts.items() for _ in range(c)]
    random.Random(seed).shuffle(links)
    return links


@dataclass
class PipeStats:
    packets: int = 0  # delivered
    bytes: int = 0  # delivered IP bytes (headers, retransmissions and all)
    lost: int = 0  # dropped at random
    overflow: int = 0  # dropped because the queue was full


class _Pipe:
    """One direction of one link: loss, then a rate-limited drop-tail queue, then a fixed delay."""

    def __init__(self, loop: asyncio.AbstractEventLoop, out_fd: int, kbit: float, delay_ms: float, loss: float,
                 queue_ms: float, rng: random.Random) -> None:
        self._loop, self._out = loop, out_fd
        self._byte_s = kbit * 1000 / 8
        self._delay, self._loss, self._queue = delay_ms / 1000, loss, queue_ms / 1000
        self._rng = rng
        self._free_at = 0.0  # when the link has sent everything queued so far
        self._due: deque[tuple[float, bytes]] = deque()  # (delivery time, packet), in time order
        self._timer: asyncio.TimerHandle | None = None
        self.stats = PipeStats()

    def offer(self, packet: bytes, now: float) -> None:
        if self._loss and self._rng.random() < self._loss:
            self.stats.lost += 1
            return
        start = max(now, self._free_at)
        if start - now > self._queue:
            self.stats.overflow += 1
            return
        self._free_at = start + len(packet) / self._byte_s
        self._due.append((self._free_at + self._delay, packet))
        if self._timer is None:
            self._timer = self._loop.call_at(self._due[0][0], self._deliver)

    def _deliver(self) -> None:
        self._timer = None
        now = self._loop.time()
        while self._due and self._due[0][0] <= now:
            _, packet = self._due.popleft()
            with contextlib.suppress(BlockingIOError, OSError):  # an interface going down at teardown
                os.write(self._out, packet)
                self.stats.packets += 1
                self.stats.bytes += len(packet)
        if self._due:
            self._timer = self._loop.call_at(self._due[0][0], self._deliver)


@dataclass
class _Link:
    cls: LinkClass
    fleet_fd: int
    hub_fd: int
    up: _Pipe | None = None
    down: _Pipe | None = None


@dataclass
class EmulatedNetwork:
    """The namespaces and links; ``async with`` builds them and pumps packets until the block ends."""

    links: list[LinkClass]
    name: str = field(default_factory=lambda: f"fq{uuid.uuid4().hex[:6]}")
    seed: int = 0
    _links: list[_Link] = field(default_factory=list, init=False)
    _started: float = field(default=0.0, init=False)

    @property
    def hub(self) -> str:
        return f"{self.name}-hub"

    @property
    def fleet(self) -> str:
        return f"{self.name}-fleet"

    @staticmethod
    def hub_address(i: int) -> str:
        """Where device ``i`` reaches the hub (over its own link)."""
        j = i + 1
        return f"10.77.{j >> 8}.{j & 255}"

    @staticmethod
    def device_address(i: int) -> str:
        j = i + 1
        return f"10.78.{j >> 8}.{j & 255}"

    def exec_in(self, side: str, argv: list[str]) -> list[str]:
        """``argv`` run inside the ``hub`` or ``fleet`` namespace (for subprocess)."""
        return ["ip", "netns", "exec", self.hub if side == "hub" else self.fleet, *argv]

    @staticmethod
    def available() -> str | None:
        """None when this machine can build the network, else why not."""
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return "needs root (network namespaces and TUN interfaces)"
        if not os.path.exists("/dev/net/tun"):
            return "no /dev/net/tun"
        if shutil.which("ip") is None:
            return "no `ip` command (iproute2)"
        return None

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        why = self.available()
        if why:
            raise ConfigError(f"cannot emulate links: {why}")
        if len(self.links) > 60_000:
            raise ConfigError("at most 60,000 links")
        loop = asyncio.get_running_loop()
        try:
            self._build()
            rng = random.Random(self.seed)
            for link in self._links:
                c = link.cls
                link.up = _Pipe(loop, link.hub_fd, c.up_kbit, c.delay_ms, c.loss, c.queue_ms,
                                random.Random(rng.random()))
                link.down = _Pipe(loop, link.fleet_fd, c.down_kbit, c.delay_ms, c.loss, c.queue_ms,
                                  random.Random(rng.random()))
                loop.add_reader(link.fleet_fd, self._pump, link.fleet_fd, link.up)
                loop.add_reader(link.hub_fd, self._pump, link.hub_fd, link.down)
        except BaseException:
            self._teardown(loop)
            raise
        self._started = time.monotonic()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._teardown(asyncio.get_running_loop())

    def _pump(self, fd: int, pipe: _Pipe) -> None:
        now = asyncio.get_running_loop().time()
        for _ in range(64):  # a burst at most, then let the other links and the timers run
            try:
                packet = os.read(fd, 65536)
            except (BlockingIOError, OSError):
                return
            pipe.offer(packet, now)

    def _build(self) -> None:
        for ns in (self.hub, self.fleet):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        fds: dict[str, list[int]] = {}
        for ns in (self.fleet, self.hub):
            with _in_netns(ns):
                fds[ns] = [_open_tun(f"fq{i}") for i in range(len(self.links))]
        for i, cls in enumerate(self.links):
            self._links.append(_Link(cls, fds[self.fleet][i], fds[self.hub][i]))
        fleet_cmds, hub_cmds = [], []
        for i in range(len(self.links)):
            dev, hub = self.device_address(i), self.hub_address(i)
            fleet_cmds += [f"addr add {dev}/32 peer {hub}/32 dev fq{i}", f"link set fq{i} up"]
            hub_cmds += [f"addr add {hub}/32 peer {dev}/32 dev fq{i}", f"link set fq{i} up"]
        _ip_batch(self.fleet, fleet_cmds)
        _ip_batch(self.hub, hub_cmds)

    def _teardown(self, loop: asyncio.AbstractEventLoop) -> None:
        for link in self._links:
            for fd in (link.fleet_fd, link.hub_fd):
                loop.remove_reader(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        for ns in (self.hub, self.fleet):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    # ---- what crossed ---------------------------------------------------------------------------------
    def stats(self) -> list[dict[str, Any]]:
        """Per link: its class and, per direction, delivered packets and bytes and drops by cause."""
        return [{"link": link.cls.name, "up": asdict(link.up.stats) if link.up else None,
                 "down": asdict(link.down.stats) if link.down else None} for link in self._links]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise ConfigError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _ip_batch(ns: str, commands: list[str]) -> None:
    done = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise ConfigError(f"ip -n {ns} -batch: {done.stderr.strip()}")


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _in_netns(name: str) -> Any:
    """Run the block in network namespace ``name`` (this thread only), then come back."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/ns/net") as own, open(f"/var/run/netns/{name}") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            raise ConfigError(f"setns({name}): {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            libc.setns(own.fileno(), _CLONE_NEWNET)

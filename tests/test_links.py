"""The protocol completes over emulated lossy links: `fedmqtt broker run` and `fedmqtt aggregator` in one
network namespace, two `fedmqtt edge` processes in another, each behind its own slow link that drops 5 % of
its packets (link_emulator.py). Needs root and /dev/net/tun; in CI a missing one fails the test."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from fedmqtt.broker import free_port, has_mosquitto
from fedmqtt.link_emulator import EmulatedNetwork, LinkClass

LOSSY = LinkClass("lossy", down_kbit=1000, up_kbit=256, delay_ms=50, loss=0.05)
ACCEPTED = re.compile(r"accepted (\d+), rejected (\d+)")


def _needs(why: str | None) -> None:
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the link emulator cannot run: {why}", pytrace=False)
    pytest.skip(why)


async def _lines(proc: asyncio.subprocess.Process, into: list[str]) -> None:
    assert proc.stderr is not None
    async for raw in proc.stderr:
        into.append(raw.decode(errors="replace").rstrip())


def _accepted(lines: list[str]) -> tuple[int, int]:
    found = [ACCEPTED.search(line) for line in lines]
    last = [m for m in found if m]
    return (int(last[-1][1]), int(last[-1][2])) if last else (0, 0)


@pytest.mark.broker
@pytest.mark.slow
async def test_updates_and_models_cross_lossy_slow_links(tmp_path: Path) -> None:
    _needs(EmulatedNetwork.available())
    if not has_mosquitto():
        _needs("no mosquitto binary")
    port = free_port()
    fed = ["--federation", "lossy", "--status-every", "1"]
    fedmqtt = [sys.executable, "-m", "fedmqtt"]
    net = EmulatedNetwork([LOSSY, LOSSY], seed=3)
    procs: list[asyncio.subprocess.Process] = []
    logs: dict[str, list[str]] = {}

    async def start(name: str, side: str, argv: list[str]) -> None:
        proc = await asyncio.create_subprocess_exec(*net.exec_in(side, argv), stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        procs.append(proc)
        logs[name] = []
        readers.append(asyncio.create_task(_lines(proc, logs[name])))

    readers: list[asyncio.Task[None]] = []
    async with net:
        try:
            await start("broker", "hub", [*fedmqtt, "broker", "run", "--bind", "0.0.0.0", "--port", str(port),
                                          "--data-dir", str(tmp_path / "broker")])
            await start("aggregator", "hub", [*fedmqtt, "aggregator", "--broker", f"mqtt://127.0.0.1:{port}",
                                              "--strategy", "fedbuff", "--buffer-size", "2", *fed])
            for i, compression in enumerate(("topk:10%", "int8")):
                await start(f"edge-{i}", "fleet", [
                    *fedmqtt, "edge", "--broker", f"mqtt://{net.hub_address(i)}:{port}", "--agent-id", f"edge-{i}",
                    "--compression", compression, "--round-seconds", "0.5", *fed])
            async with asyncio.timeout(240):
                while min(_accepted(logs[f"edge-{i}"])[0] for i in range(2)) < 4:
                    await asyncio.sleep(0.5)
                    dead = [n for n, p in zip(logs, procs, strict=True) if p.returncode is not None]
                    assert not dead, {n: logs[n][-5:] for n in dead}
        finally:
            for p in procs:
                if p.returncode is None:
                    p.terminate()
            await asyncio.gather(*(p.wait() for p in procs))
            for r in readers:
                r.cancel()
        stats = net.stats()
    for i in range(2):
        accepted, rejected = _accepted(logs[f"edge-{i}"])
        assert accepted >= 4 and rejected == 0, logs[f"edge-{i}"][-3:]
    # every link carried traffic both ways and lost packets on the way: TCP and MQTT recovered from it
    assert all(s["up"]["bytes"] > 0 and s["down"]["bytes"] > 0 for s in stats)
    assert sum(s["up"]["lost"] + s["down"]["lost"] for s in stats) > 0


# ---- the link's arithmetic, without root: what each packet's delivery time and fate would be ---------------
def test_a_link_serialises_at_its_rate_delays_and_drops_when_its_queue_is_full() -> None:
    import random as _random

    from fedmqtt.link_emulator import _Pipe

    loop = asyncio.new_event_loop()
    try:
        read_fd, write_fd = os.pipe()
        pipe = _Pipe(loop, write_fd, kbit=80, delay_ms=100, loss=0.0, queue_ms=500, rng=_random.Random(0))
        for _ in range(8):  # 8 × 1,000 bytes at once on a 10,000 byte/s link
            pipe.offer(b"x" * 1000, now=10.0)
        due = [t for t, _ in pipe._due]
        assert due == pytest.approx([10.0 + 0.1 * (i + 1) + 0.1 for i in range(6)])  # 0.1 s each, then 100 ms
        assert pipe.stats.overflow == 2  # the 7th would wait 0.6 s > 500 ms
        pipe.offer(b"y" * 1000, now=11.0)  # once the queue has drained, a packet goes straight through
        assert pipe._due[-1][0] == pytest.approx(11.2)
        lossy = _Pipe(loop, write_fd, kbit=1e6, delay_ms=0, loss=0.25, queue_ms=500, rng=_random.Random(1))
        for i in range(4000):
            lossy.offer(b"z", now=float(i))
        assert 900 < lossy.stats.lost < 1100 and len(lossy._due) == 4000 - lossy.stats.lost
        os.close(read_fd)
        os.close(write_fd)
    finally:
        loop.close()


def test_a_link_mix_has_exactly_the_devices_asked_for_in_proportion() -> None:
    from fedmqtt.link_emulator import link_mix

    for n in (1, 2, 7, 30, 101):
        for mix in ({"cellular": 0.5, "narrowband": 0.5}, {"wifi": 0.01, "cellular": 0.33, "narrowband": 0.66}):
            links = link_mix(n, mix, seed=n)
            assert len(links) == n
            for name, share in mix.items():
                assert abs(sum(link.name == name for link in links) - n * share / sum(mix.values())) < 1

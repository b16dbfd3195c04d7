"""Attacks by one device with valid credentials (and one operator's restore), run against a Mosquitto of its
own, and what the federation does about each. Behaviour only, through public APIs, so that the same drills
run against an older release on ``PYTHONPATH`` too (the compatibility lines are marked).

    python benchmarks/integrity_drills.py            # all seven drills, about 2 minutes
    python benchmarks/integrity_drills.py --only 3,6
    PYTHONPATH=/path/to/older/src python benchmarks/integrity_drills.py

Drills: a retained model forged (in the aggregator's epoch) with its weights at version 10^17, and with NaN
weights at version + 1000; the aggregator's state directory restored from an older backup; one device
flooding 1,000 valid zero-change updates; two updates from one device in a synchronous round of 2; a
sample count of 10^17 in a synchronous round of 3; a 1.08 MB header listing 15,500 tensors (publish-to-ack
time next to the same number of bytes refused at their first byte, so the broker's share is visible).
Prints PASS/FAIL with the figure behind it and writes results/integrity-drills-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedmqtt import codec
from fedmqtt.agent import AgentConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.broker import MosquittoProcess
from fedmqtt.schemas import Ack
from fedmqtt.strategies import fedasync, fedavg
from fedmqtt.tasks import get_task
from fedmqtt.topics import Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Message, mqtt_connector

ROOT = Path(__file__).resolve().parents[1]
TASK = get_task("digits", num_clients=2, seed=0)
Outcome = tuple[bool, str]


def round_of(size: int) -> dict[str, Any]:
    """The AggregatorConfig fields for synchronous rounds of ``size`` updates."""
    try:
        from fedmqtt.core import Timing
    except ImportError:  # compatibility: older releases had a flat ``round_size`` field
        return {"round_size": size}
    return {"timing": Timing(round_size=size)}


class Inbox:  # compatibility: older releases have no fedmqtt.transport.Inbox
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()

    def __call__(self, msg: Message) -> None:
        self.queue.put_nowait(msg)

    async def get(self, timeout: float) -> Message:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def until(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


@contextlib.asynccontextmanager
async def fleet(connect: Any, topics: Topics, accepted: list[Ack], refused: list[Ack]) -> AsyncIterator[None]:
    """Two honest agents on the digits task."""
    def on_ack(ack: Ack) -> None:
        if ack.status == "accepted":
            accepted.append(ack)
        elif ack.reason != "duplicate":
            refused.append(ack)

    cfg = AgentConfig(topics=topics, local_steps=5, round_seconds=0.05, ack_timeout=2.0, backoff_max=0.5)
    async with contextlib.AsyncExitStack() as stack:
        for i in range(2):
            await stack.enter_async_context(EdgeAgent(connect, f"i-{i}", TASK.trainer(0), TASK.data_for(i, 0), cfg,
                                                      on_ack=on_ack))
        yield


async def more(accepted: list[Ack], n: int = 10, within: float = 30.0) -> tuple[bool, int]:
    """Whether ``n`` more honest updates are accepted within ``within`` seconds, and how many were."""
    count = len(accepted)
    ok = await until(lambda: len(accepted) >= count + n, within)
    return ok, len(accepted) - count


def aggregator(connect: Any, topics: Topics, params: Any = None, strategy: Any = None, **cfg: Any) -> Aggregator:
    return Aggregator(connect, TASK.trainer(0).initial if params is None else params, strategy or fedasync(),
                      AggregatorConfig(topics=topics, client_id=f"agg-{topics.federation}", **cfg))


def forged(agg: Aggregator, version: int, nan: bool) -> bytes:
    """The aggregator's model in its own epoch, re-labelled ``version``, its values NaN if ``nan``."""
    decoded = codec.decode(agg.model_payload())
    epoch = decoded.metadata.get("fedmqtt.epoch", "")
    tensors = {k: (np.full_like(v, np.nan) if nan else v) for k, v in decoded.tensors.items()}
    return codec.encode_model(tensors, version, extra={"fedmqtt.epoch": epoch})


async def drill_forged(broker: BrokerConfig, topics: Topics, nan: bool) -> Outcome:
    connect = mqtt_connector(broker)
    accepted: list[Ack] = []
    agg = aggregator(connect, topics)
    async with agg, fleet(connect, topics, accepted, []):
        await more(accepted)
        payload = forged(agg, agg.version + 1000, nan=True) if nan else forged(agg, 10**17, nan=False)
        async with connect(ConnectOptions(f"forger-{topics.federation}")) as forger:
            await forger.publish(topics.model, payload, qos=1, retain=True)
        ok, n = await more(accepted)
    return ok, f"{n} honest updates accepted in the 30 s after the forgery"


async def drill_restore(broker: BrokerConfig, topics: Topics) -> Outcome:
    connect = mqtt_connector(broker)
    accepted: list[Ack] = []
    tmp = Path(tempfile.mkdtemp())
    state, backup = tmp / "state", tmp / "backup"
    try:
        async with fleet(connect, topics, accepted, []):
            async with aggregator(connect, topics, state_dir=state):
                await more(accepted)
            shutil.copytree(state, backup)
            async with aggregator(connect, topics, state_dir=state):
                await more(accepted, 20)
            shutil.rmtree(state)
            shutil.copytree(backup, state)
            async with aggregator(connect, topics, state_dir=state):
                ok, n = await more(accepted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ok, f"{n} honest updates accepted in the 30 s after the restore"


async def drill_flood(broker: BrokerConfig, topics: Topics) -> Outcome:
    connect = mqtt_connector(broker)
    accepted: list[Ack] = []
    refused: list[Ack] = []
    agg = aggregator(connect, topics)
    zero = {k: np.zeros_like(v) for k, v in TASK.trainer(0).initial.items()}
    fp = codec.fingerprint(zero)
    acks = Inbox()
    async with agg, fleet(connect, topics, accepted, refused), connect(
            ConnectOptions(f"flood-{topics.federation}", on_message=acks)) as flood:
        await more(accepted, 4)
        await flood.subscribe(topics.acks("flooder"))
        v0, t0 = agg.version, time.monotonic()
        refused.clear()
        for start in range(0, 1000, 100):  # 100 in flight at a time
            payloads = [codec.encode_update(zero, agent="flooder", update_id=f"f{i}", base_version=agg.version,
                                            num_samples=1, model_fingerprint=fp) for i in range(start, start + 100)]
            await asyncio.gather(*(flood.publish(topics.update("flooder"), p, qos=1) for p in payloads))
        statuses = [Ack.model_validate_json((await acks.get(timeout=30)).payload).status for _ in range(1000)]
        seconds = time.monotonic() - t0
        versions = agg.version - v0
    taken = statuses.count("accepted")
    ok = taken <= 50 + 50 * seconds and not refused
    return ok, (f"the flooder got {taken} of 1,000 accepted in {seconds:.1f} s (version +{versions}); honest "
                f"updates refused meanwhile: {len(refused)} {sorted({str(r.reason) for r in refused})}")


def update(agent: str, uid: str, value: float, samples: int = 10, base: int = 0) -> bytes:
    return codec.encode_update({"w": np.full(4, value, np.float32)}, agent=agent, update_id=uid, base_version=base,
                               num_samples=samples)


async def drill_one_vote(broker: BrokerConfig, topics: Topics) -> Outcome:
    connect = mqtt_connector(broker)
    agg = aggregator(connect, topics, {"w": np.zeros(4, np.float32)}, fedavg(), **round_of(2))
    async with agg, connect(ConnectOptions(f"voter-{topics.federation}")) as t:
        await agg.wait_connected()
        await t.publish(topics.update("liar"), update("liar", "v1", 1.0))
        await t.publish(topics.update("liar"), update("liar", "v2", 1.0))
        await asyncio.sleep(1.0)
        version = agg.version
    return version == 0, f"version after two updates from one device in a round of 2: {version} (0: round still open)"


async def drill_liar(broker: BrokerConfig, topics: Topics) -> Outcome:
    connect = mqtt_connector(broker)
    agg = aggregator(connect, topics, {"w": np.zeros(4, np.float32)}, fedavg(), **round_of(3))
    async with agg, connect(ConnectOptions(f"voter-{topics.federation}")) as t:
        await agg.wait_connected()
        for v in range(3):  # honest rounds: 10 samples each, value 0
            for a in ("h1", "h2", "h3"):
                await t.publish(topics.update(a), update(a, f"{a}-{v}", 0.0, 10, v))
            await agg.wait_version(v + 1, 10)
        await t.publish(topics.update("h1"), update("h1", "h1-3", 0.0, 10, 3))
        await t.publish(topics.update("h2"), update("h2", "h2-3", 0.0, 10, 3))
        await t.publish(topics.update("liar"), update("liar", "lie", 10.0, 10**17, 3))
        await agg.wait_version(4, 10)
    w = float(agg.numpy_params()["w"][0])
    return w <= 5.0 + 1e-4, f"model after the liar's round: {w:.3f} (equal weights 3.33, capped claim 5, the whole round 10)"


async def drill_tensors(broker: BrokerConfig, topics: Topics) -> Outcome:
    connect = mqtt_connector(broker)
    big = codec.encode_update({f"t{i:05d}": np.zeros(1, np.float32) for i in range(15_500)}, agent="h",
                              update_id="big", base_version=0, num_samples=1)
    timed: dict[str, list[float]] = {"big": [], "junk": []}
    reason = None
    for kind, payload in (("big", big), ("junk", b"\xff" * len(big))):
        acks = Inbox()
        async with aggregator(connect, topics) as agg, connect(
                ConnectOptions(f"h-{topics.federation}", on_message=acks)) as t:
            await agg.wait_connected()
            await t.subscribe(topics.acks("h"))
            for _ in range(5):
                t0 = time.perf_counter()
                await t.publish(topics.update("h"), payload, qos=1)
                ack = Ack.model_validate_json((await acks.get(timeout=30)).payload)
                timed[kind].append((time.perf_counter() - t0) * 1000)
                reason = ack.reason if kind == "big" else reason
    big_ms, junk_ms = (sorted(v)[2] for v in timed.values())
    return big_ms - junk_ms < 10, (f"{len(big) / 1e6:.2f} MB, 15,500 tensors: rejected as {reason} in a median "
                                   f"{big_ms:.1f} ms from publish to ack; the same bytes refused at their first "
                                   f"byte: {junk_ms:.1f} ms")


DRILLS: list[tuple[str, Callable[[BrokerConfig, Topics], Awaitable[Outcome]]]] = [
    ("the real weights forged at version 10^17", lambda b, t: drill_forged(b, t, nan=False)),
    ("NaN weights forged at version + 1000", lambda b, t: drill_forged(b, t, nan=True)),
    ("state restored from an older backup", drill_restore),
    ("one device flooding 1,000 updates", drill_flood),
    ("two updates from one device in a sync round of 2", drill_one_vote),
    ("10^17 samples claimed in a sync round of 3", drill_liar),
    ("a header listing 15,500 tensors", drill_tensors),
]


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated drill numbers (0-6)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args()
    chosen = {int(i) for i in args.only.split(",") if i} or set(range(len(DRILLS)))
    proc = MosquittoProcess.prepare()
    await proc.start()
    results = []
    try:
        for i, (name, drill) in enumerate(DRILLS):
            if i not in chosen:
                continue
            try:
                ok, what = await drill(proc.config, Topics(federation=f"drill{i}-{time.time_ns()}"))
            except Exception as exc:  # a drill that breaks the code under test is a failed drill
                ok, what = False, f"{type(exc).__name__}: {exc}"
            results.append({"drill": name, "passed": ok, "figure": what})
            print(f"{'PASS' if ok else 'FAIL'} {i} {name}: {what}", flush=True)
    finally:
        proc.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"integrity-drills-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                "fedmqtt": codec.__file__, "results": results}, indent=1))
    print(f"saved {path}")


if __name__ == "__main__":
    asyncio.run(main())

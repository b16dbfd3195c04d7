"""How long a device waits for a new assignment after its capabilities change (it goes on battery).

    python benchmarks/assignment_latency.py                  # 5 repeats, the defaults of agent and coordinator

Per repeat: a Mosquitto of its own, `fedmqtt`'s aggregator (digits, FedAsync), a coordinator (speed-aware
policy) and one EdgeAgent with allocation on, all with their default timings (the agent reads its power
source every ``AllocationConfig.power_poll`` seconds; the coordinator plans at most every ``debounce``
seconds). Once the agent follows its first assignment, its power reading switches to battery; the time
until the agent holds the new assignment (fewer local steps) is the figure. Prints each repeat and the
median, writes results/assignment-latency-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from fedmqtt.agent import AgentConfig, AllocationConfig, EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.allocation import PolicyConfig, make
from fedmqtt.broker import MosquittoProcess, free_port
from fedmqtt.capabilities import Power
from fedmqtt.coordinator import Coordinator, CoordinatorConfig
from fedmqtt.strategies import fedasync
from fedmqtt.tasks import digits_task
from fedmqtt.topics import Topics
from fedmqtt.transport import mqtt_connector

ROOT = Path(__file__).resolve().parents[1]


async def one(repeat: int) -> dict[str, float]:
    broker = MosquittoProcess.prepare(free_port())
    await broker.start()
    try:
        connect, task, prefix = mqtt_connector(broker.config), digits_task(num_clients=2), f"lat{repeat}"
        trainer = task.trainer(0)
        agg = Aggregator(connect, trainer.initial, fedasync(), AggregatorConfig(topics=Topics(prefix, "fed")))
        power = [Power("mains")]
        alloc = AllocationConfig("digits", read_power=lambda: power[0])  # default refresh
        cfg = AgentConfig(topics=Topics(prefix, "fed"), local_steps=16, round_seconds=0.5, allocation=alloc)
        coord = Coordinator(connect, make("speed-aware"), CoordinatorConfig(PolicyConfig({"fed": "digits"},
                                                                                         reference_steps=16),
                                                                            prefix=prefix))
        async with agg, coord, EdgeAgent(connect, "phone-1", trainer, task.data_for(0), cfg) as agent:
            a = agent.alloc
            assert a is not None
            await agent.wait_until(lambda: a.settings.local_steps == 16 and coord.assignment("phone-1") is not None,
                                   60, lambda: f"first assignment {a.settings}")
            first = coord.assignment("phone-1")
            assert first is not None
            await asyncio.sleep(float(repeat) * 0.7 % 5)  # a different phase of the power poll each repeat
            changed = time.monotonic()
            power[0] = Power("battery", 80.0)
            await agent.wait_until(lambda: a.settings.local_steps < 16, 60, lambda: f"new assignment {a.settings}")
            seconds = time.monotonic() - changed
        return {"repeat": repeat, "seconds": seconds, "power_poll": alloc.power_poll,
                "debounce": CoordinatorConfig(PolicyConfig({"fed": "digits"})).debounce}
    finally:
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for r in range(a.repeats):
        runs.append(asyncio.run(one(r)))
        print(f"  repeat {r}: new assignment {runs[-1]['seconds']:.2f} s after going on battery", flush=True)
    med = statistics.median(r["seconds"] for r in runs)
    print(f"median {med:.2f} s, max {max(r['seconds'] for r in runs):.2f} s (agent power poll {runs[0]['power_poll']} s, "
          f"coordinator debounce {runs[0]['debounce']} s)")
    path = a.out / f"assignment-latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"argv": sys.argv, "runs": runs}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

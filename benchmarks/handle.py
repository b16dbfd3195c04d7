"""Cost of Aggregator.handle alone (decode, validate, apply: the path every received update takes), in-process,
no broker.

    python benchmarks/handle.py                 # 100k float32 parameters, FedBuff K=10 and FedAsync

Each pre-encoded delta is based on the version the aggregator will be at when it arrives (staleness 0, as
for a fast device), with the default limits but the per-device admission bounds off (one sender stands in
for a fleet), and glibc's malloc tuned as `fedmqtt aggregator` tunes it. Prints the mean wall time per
update over ``--updates`` updates after 100 of warm-up, for each of ``--repeats`` fresh aggregators, and
their median; saves the runs in ``results/handle-*.json``.

    python benchmarks/handle.py --params 1000000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import uuid
from pathlib import Path

import numpy as np

from fedmqtt import allocator, codec
from fedmqtt.admission import AdmissionLimits
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.core import Limits
from fedmqtt.memory_broker import MemoryBroker
from fedmqtt.strategies.registry import make


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=100_000)
    p.add_argument("--updates", type=int, default=1400)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds alone (`fedmqtt aggregator` tunes them: fedmqtt.allocator)")
    args = p.parse_args()
    if not args.default_malloc:
        allocator.tune()
    rows = max(1, (args.params - 100) // 100)
    params = {"dense/bias": np.zeros(100, np.float32), "dense/kernel": np.zeros((rows, 100), np.float32)}
    rng = np.random.default_rng(0)
    delta = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in params.items()}
    fp = codec.fingerprint(params)
    limits = Limits(admission=AdmissionLimits(max_rate=None, max_share=None))
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, per_version in (("fedbuff", 10), ("fedasync", 1)):
            agg = Aggregator(MemoryBroker().connect, params, make(name), AggregatorConfig(limits=limits))
            total = 100 + args.updates
            payloads = [codec.encode_update(delta, agent="a", update_id=uuid.uuid4().hex,
                                            base_version=i // per_version, num_samples=10, model_fingerprint=fp)
                        for i in range(total)]
            for payload in payloads[:100]:
                agg.handle("a", payload)
            started = time.perf_counter()
            for payload in payloads[100:]:
                agg.handle("a", payload)
            per = (time.perf_counter() - started) / args.updates
            assert agg.state.counters.accepted == total
            runs.setdefault(name, []).append(per * 1e3)
            print(f"{name:10s} {args.params} params: {per * 1e3:.3f} ms per update", flush=True)
    for name, ms in runs.items():
        print(f"{name:10s} median {statistics.median(ms):.3f} ms per update (runs {', '.join(f'{m:.3f}' for m in ms)})")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"handle-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"benchmark": "handle", "params": args.params, "updates": args.updates,
                                "default_malloc": args.default_malloc, "ms_per_update": runs,
                                "median_ms": {k: statistics.median(v) for k, v in runs.items()},
                                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Cost of Aggregator.handle alone (decode, validate, apply: the path every received update takes), in-process,
no broker.

    python benchmarks/handle.py                 # 100k float32 parameters, FedBuff K=10 and FedAsync

Each pre-encoded delta is based on the version the aggregator will be at when it arrives (staleness 0, as
for a fast device), with the default limits but the per-device admission bounds off (one sender stands in
for a fleet), and glibc's malloc tuned as `fedmqtt aggregator` tunes it. Prints the mean wall time per
update over ``--updates`` updates after 100 of warm-up.
"""

from __future__ import annotations

import argparse
import time
import uuid

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
    for name, per_version in (("fedbuff", 10), ("fedasync", 1)):
        agg = Aggregator(MemoryBroker().connect, params, make(name), AggregatorConfig(limits=limits))
        total = 100 + args.updates
        payloads = [codec.encode_update(delta, agent="a", update_id=uuid.uuid4().hex, base_version=i // per_version,
                                        num_samples=10, model_fingerprint=fp) for i in range(total)]
        for payload in payloads[:100]:
            agg.handle("a", payload)
        started = time.perf_counter()
        for payload in payloads[100:]:
            agg.handle("a", payload)
        per = (time.perf_counter() - started) / args.updates
        print(f"{name:10s} {args.params} params: {per * 1e3:.3f} ms per update "
              f"({agg.state.counters.accepted} accepted)")


if __name__ == "__main__":
    main()

"""Cost of Aggregator.handle alone (decode, validate, apply), in-process, no broker.

    python benchmarks/handle.py                 # 100k float32 parameters, FedBuff K=10 and FedAsync

Prints the mean wall time per update over 1,400 pre-encoded deltas (after 100 warm-up updates).
"""

from __future__ import annotations

import argparse
import time
import uuid

import numpy as np

from fedmqtt import codec
from fedmqtt.admission import AdmissionLimits
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.core import Limits
from fedmqtt.strategies.registry import make
from fedmqtt.transport import MemoryBroker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=100_000)
    p.add_argument("--updates", type=int, default=1500)
    args = p.parse_args()
    rows = max(1, (args.params - 100) // 100)
    params = {"dense/bias": np.zeros(100, np.float32), "dense/kernel": np.zeros((rows, 100), np.float32)}
    rng = np.random.default_rng(0)
    delta = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in params.items()}
    fp = codec.fingerprint(params)
    for name in ("fedbuff", "fedasync"):
        agg = Aggregator(MemoryBroker().connect, params, make(name), AggregatorConfig(
            limits=Limits(max_staleness=10**9, admission=AdmissionLimits(max_rate=None, max_share=None))))
        payloads = [codec.encode_update(delta, agent="a", update_id=uuid.uuid4().hex, base_version=0,
                                        num_samples=10, model_fingerprint=fp) for _ in range(args.updates)]
        for payload in payloads[:100]:
            agg.handle("a", payload)
        started = time.perf_counter()
        for payload in payloads[100:]:
            agg.handle("a", payload)
        per = (time.perf_counter() - started) / (len(payloads) - 100)
        print(f"{name:10s} {args.params} params: {per * 1e3:.3f} ms per update ({agg.state.counters.accepted} accepted)")


if __name__ == "__main__":
    main()

"""What refusing a hostile update costs the aggregator, against what reading its bytes costs.

    python benchmarks/hostile_cost.py           # 100k-parameter model; medians of 200 runs each

Payloads: an honest update (checked and accepted up to the strategy), a header listing 15,500 tensors
(about 1 MB), a header at the largest size the model allows stuffed with metadata, a payload whose tensor
names are all wrong, and a payload whose byte ranges lie. Each is timed through ``validation.check_update``
(the aggregator's check, before the strategy), next to ``hashlib.sha256`` of the same bytes (reading them
once) and ``codec.decode`` (loading every tensor first, as a decoder that checks afterwards would). Prints a table and writes results/hostile-cost-<stamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import statistics
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedmqtt import codec, dedup
from fedmqtt.errors import CodecError, InvalidUpdate
from fedmqtt.validation import Reference, check_update

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def decode_all(payload: bytes) -> None:
    with contextlib.suppress(CodecError):
        codec.decode(payload)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args()
    rows = max(1, (args.params - 100) // 100)
    params = {"dense/bias": np.zeros(100, np.float32), "dense/kernel": np.zeros((rows, 100), np.float32)}
    fp = codec.fingerprint(params)
    ref = Reference.of(params)

    def update(tensors: dict[str, np.ndarray], **extra: str) -> bytes:
        return codec.encode_update(tensors, agent="a", update_id="u1", base_version=0, num_samples=1,
                                   model_fingerprint=fp, extra=extra or None)

    honest = update({k: np.full_like(v, 1e-3) for k, v in params.items()})
    many = update({f"t{i:05d}": np.zeros(1, np.float32) for i in range(15_500)})
    stuffed = update({k: np.zeros_like(v) for k, v in params.items()},
                     **{"x.pad": "y" * (ref.max_header - 1200)})
    names = update({f"other/{k}": np.zeros_like(v) for k, v in params.items()})
    (n,) = struct.unpack("<Q", honest[:8])
    lying = honest[: 8 + n] + honest[8 + n : -4]  # the last tensor's bytes run short
    payloads = {"honest (accepted)": honest, "15,500-tensor header": many, "header at the size limit": stuffed,
                "wrong tensor names": names, "byte ranges that lie": lying}

    def check(payload: bytes) -> str:
        try:
            check_update(payload, "a", reference=ref, version=0, max_staleness=10, seen=dedup.Seen())
        except InvalidUpdate as exc:
            return exc.reason.value
        return "passed"

    results = []
    print(f"{args.params} float32 parameters; model header limit {ref.max_header} bytes; median of {args.runs}\n")
    print("| payload | bytes | outcome | check (ms) | sha256 of the bytes (ms) | ratio | decode everything (ms) |\n"
          "|---|---|---|---|---|---|---|")
    for label, payload in payloads.items():
        outcome = check(payload)
        checked = median_ms(lambda payload=payload: check(payload), args.runs)
        read = median_ms(lambda payload=payload: hashlib.sha256(payload).digest(), args.runs)
        decoded = median_ms(lambda payload=payload: decode_all(payload), max(args.runs // 10, 5))
        results.append({"payload": label, "bytes": len(payload), "outcome": outcome, "check_ms": checked,
                        "read_ms": read, "decode_ms": decoded})
        print(f"| {label} | {len(payload):,} | {outcome} | {checked:.3f} | {read:.3f} | {checked / read:.2f} "
              f"| {decoded:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"hostile-cost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                "params": args.params, "runs": args.runs, "results": results}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

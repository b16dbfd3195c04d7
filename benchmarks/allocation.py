"""Time to accuracy of allocation policies against uniform FedBuff, FedAsync and synchronous FedAvg, on a
virtual clock.

    python benchmarks/allocation.py                                   # HAPT 30 devices, sigma 1.0 and 1.5, 3 seeds
    python benchmarks/allocation.py --seeds 1 --sigmas 1.0 --configs fedbuff,fedbuff+speed-aware

Why a virtual clock: the question is what a policy does to the order and the size of the updates, and the
answer must not depend on whether 30 simulated devices got the host's two cores when they needed them. So
the devices' time is simulated (as in ``fedmqtt.simulation``) while everything else is real: each device
trains the task's model on its own data for the number of local steps its assignment says, its update is
encoded as on the wire and goes through the aggregator's core (``core.receive``: validation, staleness
bound, the strategy), and the coordinator's policy (``fedmqtt.allocation``, the same functions
``fedmqtt coordinator`` runs) is called every ``--replan`` seconds with each device's capabilities
(its speed, examples, last training loss) and history (updates sent).

Device i does a round of E local steps in ``base · fᵢ`` seconds, fᵢ ~ lognormal(0, sigma) (its speed,
steps/s = E / (base · fᵢ)), times U(1, 1.1) per round; a round of Eᵢ steps takes Eᵢ / speedᵢ. A device
whose assignment says participation p draws before each round and, with probability 1 - p, sits out as
long as its last round took (as the agent does). The clock starts with every device holding the initial
model. Without ``--links`` models and updates travel at once. With ``--links cellular=1,narrowband=1,wifi=1``
each device sits behind a link of that class (fedmqtt.link_emulator's rates and one-way delays d; loss is
not modelled), and a round is: the model peek (2d, then the model's bytes on the downlink; ``--download
int8`` takes the int8 model), the local work, the update's bytes on the uplink plus d, and the PUBACK (d)
before the next round. The update is encoded in its wire form (its time on the uplink from the form's size
relative to float32: fedmqtt.allocation.bandwidth's ratios): ``float32``, or the compression the device's
assignment names (``bandwidth`` policy part) or every device uses (``enc=FORM``), with top-k's
error feedback kept per device as the agent does; the policy sees each device's uplink.

Configurations: ``<strategy>[+<policy parts>][+enc=FORM]``: ``fedasync``, ``fedbuff`` (K = 10), ``fedavg`` (a round
of every device), ``fedavg@0.5`` (a round closes at the first half of the cohort, the way a user tunes
synchronous FedAvg against stragglers), and FedBuff/FedAsync with policy parts (``speed-aware``,
``utility``, ``bandwidth``), e.g. ``fedbuff+utility+speed-aware``; ``+enc=int8`` sends every update in one
form (the uniform choice a user would make for slow links). Reported per run: the time to each target, the final
accuracy (mean of the last 4 evaluations), uplink bytes, updates, and participation across devices (Jain's
fairness index of updates per device, and the share of devices with fewer than a quarter of the mean).
Medians over seeds; results/allocation-<stamp>.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedmqtt import codec, core
from fedmqtt.allocation.bandwidth import size_ratio
from fedmqtt.allocation.base import AgentView, History, PolicyConfig
from fedmqtt.allocation.registry import make as make_policy
from fedmqtt.capabilities import Capabilities, Compute, Link
from fedmqtt.compression import Compression, Compressor
from fedmqtt.core import Limits
from fedmqtt.link_emulator import link_mix
from fedmqtt.strategies.registry import make as make_strategy
from fedmqtt.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("fedasync", "fedbuff", "fedavg", "fedavg@0.5", "fedbuff+speed-aware", "fedbuff+utility",
           "fedbuff+utility+speed-aware", "fedasync+speed-aware")


def parse(config: str) -> tuple[str, float, str | None, str | None]:
    """(strategy, share of the cohort per sync round, policy parts or None, every device's form or None)."""
    head, _, rest = config.partition("+")
    strategy, _, share = head.partition("@")
    parts = [p for p in rest.split("+") if p]
    form = next((p[4:] for p in parts if p.startswith("enc=")), None)
    policy = "+".join(p for p in parts if not p.startswith("enc="))
    return strategy, float(share or 1.0), policy or None, form


def run(config: str, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    name, share, parts, uniform_form = parse(config)
    task = get_task(a.task, seed=seed, **({"num_clients": a.clients} if a.clients else {}))
    n, e_ref = task.num_clients, task.local_steps
    rng = np.random.default_rng(seed)
    factors = rng.lognormal(0.0, a.sigma, n)
    speed = e_ref / (a.base_seconds * factors)  # local steps per second
    trainer = task.trainer(seed)
    evaluate = task.evaluate_fn(trainer)
    strategy = make_strategy(name, **({"buffer_size": 10} if name == "fedbuff" else {}))
    rules = core.rules(strategy, trainer.initial, Limits(max_staleness=a.max_staleness, max_update_norm=None))
    state = core.init(rules, trainer.initial, epoch="alloc")
    data = [task.data_for(i, seed) for i in range(n)]
    policy = make_policy(parts) if parts else None
    fed = "fed"
    zero = {k: np.zeros_like(np.asarray(v)) for k, v in trainer.initial.items()}
    model_bytes = len(codec.encode_update(zero, agent="d0", update_id="u", base_version=0, num_samples=1))
    pconfig = PolicyConfig({fed: a.task}, local_steps=e_ref, model_bytes={fed: model_bytes},
                           upload_budget=a.upload_budget)
    links = link_mix(n, dict((k, float(v)) for k, _, v in (x.partition("=") for x in a.links.split(","))), seed
                     ) if a.links else None
    up = [c.up_kbit * 125 if links else float("inf") for c in (links or [None] * n)]  # bytes/s
    down = [c.down_kbit * 125 if links else float("inf") for c in (links or [None] * n)]
    delay = [c.delay_ms / 1000 if links else 0.0 for c in (links or [None] * n)]
    download = model_bytes * (size_ratio("int8") if a.download == "int8" else 1.0)
    compressors: dict[int, Compressor] = {}
    forms = [uniform_form or "none"] * n  # each device's wire form, as its assignment says
    steps = [e_ref] * n
    participation = [1.0] * n
    last_round = [a.base_seconds * f for f in factors]
    loss: list[float | None] = [None] * n
    sent = [0] * n
    sync = strategy.mode == "sync"
    round_size = max(1, round(share * n))
    base: list[tuple[int, dict[str, Any]]] = [(0, trainer.initial)] * n
    draw = np.random.default_rng([seed, 7])

    def round_time(i: int) -> float:
        """The next round of device i: its local work, and over its link the update's upload, the PUBACK,
        the next model's peek and download."""
        work = float(steps[i] / speed[i] * draw.uniform(1.0, 1.1))
        link = model_bytes * size_ratio(forms[i]) / up[i] + 4 * delay[i] + download / down[i] if links else 0.0
        return work + link

    round_steps = list(steps)  # what each device's round under way was given
    round_forms = list(forms)
    queue = [(round_time(i), i) for i in range(n)]
    heapq.heapify(queue)
    waiting: list[int] = []
    curve: list[tuple[float, float]] = []
    next_eval, next_plan = 0.0, 0.0
    uplink = arrivals = 0

    def accuracy() -> float:
        return float(evaluate({k: np.asarray(v) for k, v in state.params.items()})["accuracy"])

    def replan(now: float) -> None:
        views = {f"d{i}": AgentView(Capabilities(Compute(float(speed[i]), 32), examples=data[i].num_samples,
                                                 tasks=(pconfig.federations[fed],), loss=loss[i],
                                                 link=Link(up[i], 2 * delay[i]) if links else Link()),
                                    History(updates_sent=sent[i]))
                 for i in range(n)}
        assert policy is not None
        for agent, plan in policy.assign(views, now, pconfig).items():
            i = int(agent[1:])
            steps[i] = plan.local_steps or e_ref
            participation[i] = plan.participation
            forms[i] = uniform_form or plan.compression or "none"

    while queue:
        now, i = heapq.heappop(queue)
        while next_eval <= now and next_eval <= a.seconds:
            curve.append((next_eval, accuracy()))
            next_eval += a.eval_every
        if now > a.seconds:
            break
        if policy is not None and now >= next_plan:
            replan(now)
            next_plan = now + a.replan
        if participation[i] < 1.0 and draw.uniform() >= participation[i]:  # sits this round out
            round_steps[i], round_forms[i] = steps[i], forms[i]
            heapq.heappush(queue, (now + last_round[i], i))
            continue
        base_version, base_params = base[i]
        new, loss[i] = trainer.train(base_params, data[i].batches(round_steps[i]))
        delta: dict[str, Any] = {k: np.asarray(new[k] - base_params[k], dtype=base_params[k].dtype) for k in new}
        extra: dict[str, str] = {}
        if round_forms[i] != "none":
            if i not in compressors or str(compressors[i].setting) != str(Compression.parse(round_forms[i])):
                compressors[i] = Compressor(Compression.parse(round_forms[i]), np.random.default_rng([seed, i]))
            packed = compressors[i](delta)
            delta, extra = packed.tensors, packed.metadata
        payload = codec.encode_update(delta, agent=f"d{i}", update_id=f"u{arrivals}", base_version=base_version,
                                      num_samples=data[i].num_samples, model_fingerprint=rules.reference.fingerprint,
                                      extra=extra)
        uplink += len(payload)
        arrivals += 1
        state, effects = core.receive(state, f"d{i}", payload, rules)
        sent[i] += sum(r.accepted for r in effects.replies)
        if sync:
            waiting.append(i)
            if state.counters.since_step >= round_size or len(waiting) == n:
                state, _ = core.flush(state, rules)
                params = {k: np.asarray(v) for k, v in state.params.items()}
                for j in waiting:  # the new version is out: the round's devices start on it
                    base[j] = (state.version, params)
                    round_steps[j], round_forms[j] = steps[j], forms[j]
                    last_round[j] = round_time(j)
                    heapq.heappush(queue, (now + last_round[j], j))
                waiting.clear()
        else:
            base[i] = (state.version, {k: np.asarray(v) for k, v in state.params.items()})
            round_steps[i], round_forms[i] = steps[i], forms[i]
            last_round[i] = round_time(i)
            heapq.heappush(queue, (now + last_round[i], i))
        if sync and not queue and waiting:  # everyone waits for a round that cannot fill: close it
            state, _ = core.flush(state, rules)
    while next_eval <= a.seconds:
        curve.append((next_eval, accuracy()))
        next_eval += a.eval_every
    per_device = np.array(sent, dtype=float)
    mean = per_device.mean()
    return {
        "config": config, "seed": seed, "sigma": a.sigma, "curve": curve,
        "final_accuracy": statistics.mean(acc for _, acc in curve[-4:]),
        **{f"t_{t:g}": next((s for s, acc in curve if acc >= t), None) for t in a.target_list},
        "accepted": int(per_device.sum()), "arrivals": arrivals, "uplink_bytes": uplink,
        "jain": float(mean ** 2 / (per_device ** 2).mean()) if mean > 0 else 0.0,
        "starved": float((per_device < mean / 4).mean()),
        "steps": steps, "participation": participation, "factors": factors.tolist(), "forms": forms,
        "links": [c.name for c in links] if links else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="hapt")
    ap.add_argument("--clients", type=int, default=0, help="digits: this many devices (IID shards)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sigmas", default="1.0,1.5")
    ap.add_argument("--base-seconds", type=float, default=20.0, help="median device time for E local steps")
    ap.add_argument("--seconds", type=float, default=300.0, help="virtual seconds per run")
    ap.add_argument("--eval-every", type=float, default=10.0)
    ap.add_argument("--replan", type=float, default=10.0, help="virtual seconds between policy calls")
    ap.add_argument("--max-staleness", type=int, default=64)
    ap.add_argument("--targets", default="0.85,0.9")
    ap.add_argument("--links", default="", help="link classes and shares, e.g. cellular=1,narrowband=1,wifi=1")
    ap.add_argument("--download", choices=("float32", "int8"), default="float32", help="--links: model form")
    ap.add_argument("--upload-budget", type=float, default=PolicyConfig({"f": "digits"}).upload_budget,
                    help="bandwidth part: seconds an update may take on a device's uplink")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    a = ap.parse_args()
    a.target_list = [float(t) for t in a.targets.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"allocation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    print(f"# {' '.join(sys.argv)}\n# {platform.machine()}, Python {platform.python_version()}; {a.task}, "
          f"base {a.base_seconds} s per E steps, {a.seconds:.0f} virtual s per run", flush=True)
    results: list[dict[str, Any]] = []
    for sigma in (float(s) for s in a.sigmas.split(",")):
        a.sigma = sigma
        for config in a.configs.split(","):
            for seed in range(a.seeds):
                started = time.process_time()
                r = run(config, seed, a)
                r["cpu_seconds"] = time.process_time() - started
                results.append(r)
                print(f"  sigma {sigma} {config} seed {seed}: final {r['final_accuracy']:.3f}, "
                      + ", ".join(f"t({t:g}) {r[f't_{t:g}']}" for t in a.target_list)
                      + f", accepted {r['accepted']}, Jain {r['jain']:.2f}, CPU {r['cpu_seconds']:.0f} s", flush=True)
                path.write_text(json.dumps({"argv": sys.argv, "results": results}))
        print(f"\nsigma {sigma}\n\n| configuration | final accuracy | "
              + " | ".join(f"time to {t:g} (s)" for t in a.target_list)
              + " | accepted | uplink MB | Jain index | devices below 1/4 of the mean |\n|" + "---|" * (6 + len(a.target_list)))
        for config in a.configs.split(","):
            rows = [r for r in results if r["config"] == config and r["sigma"] == sigma]

            def med(key: str, rows: list[dict[str, Any]] = rows) -> float | None:
                vals = [r[key] for r in rows]
                return None if any(v is None for v in vals) else statistics.median(vals)

            times = " | ".join(f"{v:.0f}" if (v := med(f"t_{t:g}")) is not None else "not reached"
                               for t in a.target_list)
            print(f"| {config} | {med('final_accuracy'):.3f} | {times} | {med('accepted'):.0f} | "
                  f"{(med('uplink_bytes') or 0) / 1e6:.1f} | {med('jain'):.2f} | {med('starved'):.0%} |", flush=True)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

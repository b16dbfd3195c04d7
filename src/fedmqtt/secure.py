"""Secure aggregation as a service beside the aggregator: it forms cohorts of agents that have an update
ready, runs each cohort's step through the broker (secagg/ holds the maths and the two sides' sessions), and
hands the unmasked mean to the aggregator as one update, so that the aggregator sees the sum only.

Run it with an aggregator whose strategy takes one server step per update (``fedbuff(1,
weighting=constant())``, what ``fedmqtt aggregator --secure`` sets): a cohort of K is a FedBuff buffer, its
members' staleness weights are applied by the members themselves before masking (the cohort message tells
each its weight), and the step is θ ← θ + server_optimizer(Σ wᵢΔᵢ / n). The synthetic update carries the
agent id ``secagg`` and the step id as its update id: the journal records it like any update, and a step is
never applied twice. Members get their ordinary ack once the step is durable; members left out (they
dropped, or the step was abandoned) get ``abort`` and offer their update to a later cohort.

Loops: ``connection`` (subscribes to ``{base}/secagg/+/+``) and ``steps`` (one cohort at a time).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmqtt import codec, dedup
from fedmqtt.aggregator import Aggregator
from fedmqtt.errors import SecAggAbort, TransportError
from fedmqtt.privacy import CentralDP, epsilon
from fedmqtt.schemas import Ack, dump
from fedmqtt.secagg import Cohort, Server, default_threshold
from fedmqtt.secagg import field as fieldmath
from fedmqtt.secagg import messages as m
from fedmqtt.service import Loop, Service
from fedmqtt.strategies.staleness import StalenessFn, polynomial
from fedmqtt.transport import ConnectOptions, Connector, Message, Transport

log = logging.getLogger("fedmqtt.secure")
AGENT = "secagg"  # the agent id of the unmasked updates handed to the aggregator


@dataclass(frozen=True)
class SecureConfig:
    cohort_size: int = 10  # K members per step: the FedBuff buffer
    min_cohort: int = 3  # after ``cohort_wait`` a smaller cohort forms, down to this many
    cohort_wait: float = 30.0  # seconds since the oldest offer before a cohort smaller than K forms
    phase_timeout: float = 10.0  # seconds a phase waits for members that have not answered
    degree: int | None = None  # neighbours per member (SecAgg+ graph, even); None: every other member
    threshold: int | None = None  # holders needed per secret; None: more than half (default_threshold)
    clip: float = 1.0  # coordinates of wᵢΔᵢ clipped to [-clip, clip] ...
    bits: int = 16  # ... and encoded with this many bits
    staleness: StalenessFn = field(default_factory=lambda: polynomial(0.5))
    # central DP: members clip wᵢΔᵢ to dp.clip (L2), the service adds N(0, (dp.noise·dp.clip)²) to each
    # unmasked sum before anything else sees it; ε is accounted at sensitivity 2·clip (docs/security.md)
    dp: CentralDP | None = None
    client_id: str | None = None
    # where the members of each step are recorded (default: ``secagg.jsonl`` in the aggregator's state
    # directory; None without one): an ack lost in a crash is answered again, never summed twice
    ledger: str | Path | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.min_cohort <= self.cohort_size:
            raise ValueError("a cohort needs at least 2 members and min_cohort <= cohort_size")
        fieldmath.check(self.clip, self.bits, self.cohort_size)
        if self.dp is not None:
            self.dp.check()


class SecureAggregation(Service):
    def __init__(self, connect: Connector, aggregator: Aggregator, config: SecureConfig | None = None) -> None:
        self.config = config or SecureConfig()
        self.agg = aggregator
        self.topics = aggregator.topics
        super().__init__(f"secagg-{self.topics.federation}", connect)
        self.dim = sum(int(np.size(v)) for v in aggregator.numpy_params().values())
        self.offers: dict[str, tuple[m.Ready, float]] = {}  # agent -> its offer and when it came
        self._applied: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()  # -> version
        self._acks: asyncio.Queue[tuple[str, Ack]] = asyncio.Queue(maxsize=1000)  # acks owed outside a step
        self._server: Server | None = None
        self._expected: set[str] = set()
        self._answered = asyncio.Event()
        self._offered = asyncio.Event()
        self.steps = 0  # steps applied
        self.aborted: collections.Counter[str] = collections.Counter()  # abandoned steps, by reason
        self.refused: collections.Counter[str] = collections.Counter()  # members' refusals, by reason
        self.bad_messages = 0  # messages that broke the protocol (ignored)
        self.ignored: collections.Counter[str] = collections.Counter()  # those, by reason (bad_message, phase)
        self.last_step: dict[str, float] = {}  # members, survivors, seconds of the last applied step
        ledger = self.config.ledger or (Path(aggregator.config.state_dir) / "secagg.jsonl"
                                        if aggregator.config.state_dir is not None else None)
        self.ledger = Path(ledger) if ledger is not None else None
        dp = self.config.dp
        self._noise = np.random.default_rng(dp.seed if dp is not None and dp.seed else None)
        self.dp_steps = 0  # noisy sums released

    def privacy(self) -> dict[str, float | int]:
        """The metrics' DP fields (as a DP strategy's ``report``): ε after the noisy steps so far."""
        dp = self.config.dp
        if dp is None:
            return {}
        # sensitivity 2C: removing a device can also move another member into each later cohort
        return {"dp_epsilon": epsilon(dp.noise / 2, self.dp_steps, dp.delta), "dp_delta": dp.delta,
                "dp_noise_multiplier": dp.noise, "dp_steps": self.dp_steps}

    async def starting(self) -> None:
        self._load_ledger()

    def _load_ledger(self) -> None:
        """The members of every step the aggregator applied. A step is recorded before it goes to the
        aggregator; only the last one can be unresolved (steps run one at a time): it was applied iff the
        aggregator's de-duplication window holds its id."""
        if self.ledger is None or not self.ledger.exists():
            return
        self.agg.recover()
        records = [json.loads(line) for line in self.ledger.read_text().splitlines() if line.strip()]
        refused = {r["refused"] for r in records if "refused" in r}
        steps = [r for r in records if "members" in r and r["step"] not in refused]
        for i, r in enumerate(steps):
            last = i == len(steps) - 1
            if last and not dedup.contains(self.agg.state.seen, dedup.key(AGENT, r["step"]), r["base"]):
                continue  # the crash came before the aggregator applied it: the members offer again
            for agent, update_id in r["members"].items():
                self._applied[(agent, update_id)] = int(r.get("version") or self.agg.version)
        while len(self._applied) > 10_000:
            self._applied.popitem(last=False)
        log.info("%s: %d summed updates known from %s", self.name, len(self._applied), self.ledger)

    def _record(self, record: dict[str, object]) -> None:
        if self.ledger is None:
            return
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        with self.ledger.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def loops(self) -> dict[str, Loop]:
        opts = ConnectOptions(self.config.client_id or f"fedmqtt-{self.topics.federation}-secagg",
                              on_message=self._on_message)
        return {"connection": self.connection(opts, self._subscribe), "steps": self._steps(),
                "acks": self._ack_sender()}

    def _owe(self, agent: str, ack: Ack) -> None:
        try:
            self._acks.put_nowait((agent, ack))
        except asyncio.QueueFull:
            self.bad_messages += 1  # the agent offers again after its ack timeout

    async def _ack_sender(self) -> None:
        while True:
            agent, ack = await self._acks.get()
            await self._ack(agent, ack)

    async def _subscribe(self, t: Transport) -> None:
        await t.subscribe(f"{self.topics.base}/secagg/+/+", qos=1)

    # ---- what members send ------------------------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        parts = msg.topic.rsplit("/", 2)
        if len(parts) != 3 or msg.retain:
            return
        agent, kind = parts[1], parts[2]
        try:
            if kind == "masked":
                self._masked(agent, msg.payload)
            else:
                self._json(agent, kind, msg.payload)
        except SecAggAbort as exc:
            self.bad_messages += 1
            self.ignored[exc.reason] += 1
            log.warning("%s: secure aggregation message from %s ignored: %s", self.name, agent, exc)
            return
        if self._server is not None and self._expected <= self._answers():
            self._answered.set()

    def _json(self, agent: str, kind: str, payload: bytes) -> None:
        msg = m.parse_from_agent(payload)
        if msg.type != kind:
            raise SecAggAbort("bad_message", f"a {msg.type} message on the {kind} topic")
        if isinstance(msg, m.Ready):
            if msg.dim != self.dim:
                raise SecAggAbort("bad_message", f"an update of {msg.dim} coordinates; the model has {self.dim}")
            applied = self._applied.get((agent, msg.update_id))
            if applied is not None:  # summed already, and the ack was lost: the same ack again
                self._owe(agent, Ack(update_id=msg.update_id, status="accepted", version=applied))
            elif self.agg.version - msg.base_version > self.agg.rules.max_staleness:
                self._owe(agent, Ack(update_id=msg.update_id, status="rejected", version=self.agg.version,
                                     reason="stale", detail=f"base version {msg.base_version}"))
            else:
                self.offers.setdefault(agent, (msg, time.monotonic()))
                self._offered.set()
            return
        s = self._current(agent, msg.step)
        if isinstance(msg, m.Keys):
            s.add_keys(agent, m.unb64(msg.c_pk, 32), m.unb64(msg.s_pk, 32))
        elif isinstance(msg, m.Shares):
            s.add_shares(agent, {v: m.unb64(box) for v, box in msg.shares.items()})
        elif isinstance(msg, m.Reveal):
            s.add_reveal(agent, {v: int(x, 16) for v, x in msg.b.items()}, {v: int(x, 16) for v, x in msg.s.items()})
        else:
            self.refused[msg.reason] += 1
            log.warning("%s: %s refused step %s: %s %s", self.name, agent, msg.step, msg.reason, msg.detail)
            self._expected.discard(agent)

    def _masked(self, agent: str, payload: bytes) -> None:
        step, y = m.decode_masked(payload, self.dim)
        self._current(agent, step).add_masked(agent, y)

    def _current(self, agent: str, step: str) -> Server:
        if self._server is None or step != self._server.cohort.step:
            raise SecAggAbort("phase", f"step {step} is not the step in progress")
        return self._server

    def _answers(self) -> set[str]:
        s = self._server
        assert s is not None
        got: dict[str, object] = {"keys": s.keys, "shares": s.shares, "masked": s.masked,
                                  "reveal": s.reveals}.get(s.phase, {})  # type: ignore[assignment]
        return set(got)

    # ---- steps ------------------------------------------------------------------------------------------
    async def _steps(self) -> None:
        cfg = self.config
        while True:
            await self._offered.wait()
            self._offered.clear()
            if len(self.offers) < cfg.min_cohort:
                continue
            oldest = min(at for _, at in self.offers.values())
            wait = oldest + cfg.cohort_wait - time.monotonic()
            if len(self.offers) < cfg.cohort_size and wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full(), wait)
            members = sorted(self.offers, key=lambda a: self.offers[a][1])[: cfg.cohort_size]
            offers = {a: self.offers.pop(a)[0] for a in sorted(members)}
            await self._step(offers)
            if self.offers:
                self._offered.set()

    async def _full(self) -> None:
        while len(self.offers) < self.config.cohort_size:
            self._offered.clear()
            await self._offered.wait()

    async def _step(self, offers: dict[str, m.Ready]) -> None:
        cfg, started = self.config, time.monotonic()
        version = self.agg.version
        members = tuple(offers)
        holders = len(members) if cfg.degree is None or cfg.degree >= len(members) - 1 else cfg.degree + 1
        weights = {a: min(1.0, float(cfg.staleness(max(0, version - o.base_version)))) for a, o in offers.items()}
        step = f"{self.agg.committed.epoch}-{version}-{secrets.token_hex(4)}"  # unique across restarts too
        cohort = Cohort(step, version, members, cfg.threshold or default_threshold(holders), cfg.degree,
                        cfg.clip, cfg.bits, self.dim, weights, cfg.dp.clip if cfg.dp is not None else None)
        self._server = server = Server(cohort)
        try:
            cohort.check()
            for a, o in offers.items():
                await self._send(a, m.CohortMsg(step=step, update_id=o.update_id, version=version,
                                                members=list(members), threshold=cohort.threshold,
                                                degree=cfg.degree, clip=cfg.clip, bits=cfg.bits, dim=self.dim,
                                                weight=weights[a], norm=cohort.norm))
            roster = await self._phase(set(members), server.roster)
            for a in roster:
                await self._send(a, m.Roster(step=step, keys={v: (m.b64(c), m.b64(s)) for v, (c, s) in roster.items()}))
            forward = await self._phase(set(roster), server.forward)
            for a, boxes in forward.items():
                await self._send(a, m.Forward(step=step, shares={u: m.b64(b) for u, b in boxes.items()}))
            survivors = await self._phase(set(forward), server.survivors)
            for a in survivors:
                await self._send(a, m.Unmask(step=step, survivors=list(survivors)))
            total, survivors = await self._phase(set(survivors), server.unmask)
            version = await self._apply(cohort, total, survivors, offers)
        except SecAggAbort as exc:
            self.aborted[exc.reason] += 1
            log.warning("%s: step %s abandoned: %s", self.name, step, exc)
            for a in members:
                await self._send(a, m.End(step=step, type="abort", reason=exc.reason, detail=exc.detail))
            self.changed()
            return
        finally:
            self._server = None
        for a in members:
            if a in survivors:
                await self._send(a, m.End(step=step, type="done"))
                await self._ack(a, Ack(update_id=offers[a].update_id, status="accepted", version=version))
            else:
                await self._send(a, m.End(step=step, type="abort", reason="dropped",
                                          detail="not in the survivors; offer the update again"))
        self.steps += 1
        self.last_step = {"members": len(members), "survivors": len(survivors),
                          "seconds": time.monotonic() - started}
        self.changed()

    async def _phase(self, expected: set[str], close):  # type: ignore[no-untyped-def]
        """Wait until every expected member answered (or ``phase_timeout``), then close the phase."""
        self._expected = expected
        self._answered.clear()
        if not expected <= self._answers():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), self.config.phase_timeout)
        return close()

    async def _apply(self, cohort: Cohort, total: np.ndarray, survivors: tuple[str, ...],
                     offers: dict[str, m.Ready]) -> int:
        """The mean Σ wᵢΔᵢ / n to the aggregator as one update; the version once it is durable."""
        n = len(survivors)
        flat = fieldmath.decode_sum(total, n, cohort.clip, cohort.bits)
        if self.config.dp is not None:  # before the sum is stored, journaled or published
            dp = self.config.dp
            flat = flat + self._noise.normal(0.0, dp.noise * dp.clip, flat.shape).astype(np.float32)
            self.dp_steps += 1
        flat = flat / np.float32(n)
        params = self.agg.numpy_params()
        tensors, at = {}, 0
        for name in sorted(params):
            size = int(np.size(params[name]))
            tensors[name] = flat[at : at + size].reshape(np.shape(params[name])).astype(np.float32)
            at += size
        payload = codec.encode_update(tensors, agent=AGENT, update_id=cohort.step, base_version=cohort.version,
                                      num_samples=sum(offers[a].num_samples for a in survivors),
                                      model_fingerprint=codec.fingerprint(params))
        before = self.agg.state.counters
        members = {a: offers[a].update_id for a in survivors}
        self._record({"step": cohort.step, "base": cohort.version, "members": members})  # before it is applied
        self.agg.handle(AGENT, payload)
        after = self.agg.state.counters
        if after.accepted == before.accepted:
            self._record({"refused": cohort.step})
            reasons = {r: c - before.rejected.get(r, 0) for r, c in after.rejected.items()
                       if c != before.rejected.get(r, 0)}
            raise SecAggAbort("refused", f"the aggregator refused the unmasked update: {reasons}")
        version = self.agg.version
        for a in survivors:  # applied: from now on an offer of these updates is answered, never summed again
            self._applied[(a, offers[a].update_id)] = version
        while len(self._applied) > 10_000:
            self._applied.popitem(last=False)
        while True:  # the members' acks wait until the step is durable (as the aggregator's own acks do)
            try:
                await self.agg.wait_until(lambda: self.agg.committed_version >= version, 30.0,
                                          lambda: f"version {version} not durable")
                return version
            except TimeoutError as exc:
                log.warning("%s: %s; still waiting", self.name, exc)

    async def _send(self, agent: str, msg: m.CohortMsg | m.Roster | m.Forward | m.Unmask | m.End) -> None:
        await self._publish(f"{self.topics.base}/agents/{agent}/secagg", m.dump(msg))

    async def _ack(self, agent: str, ack: Ack) -> None:
        await self._publish(self.topics.acks(agent), dump(ack))

    async def _publish(self, topic: str, payload: bytes) -> None:
        """A message lost with the connection is not an error of the step: a member that misses one stays
        silent, the phase times out without it, and its update is offered again."""
        t = self.transport
        if t is None:
            return
        try:
            await t.publish(topic, payload, qos=1)
        except TransportError as exc:
            log.warning("%s: %s", self.name, exc)


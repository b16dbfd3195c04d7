"""The coordinator: one service, one broker connection, for every federation under a prefix. It reads every
agent's retained status (``{prefix}/+/agents/+/status``), runs an allocation policy (allocation/) when one
changes, at most every ``debounce`` seconds, and retains an assignment per agent on
``{prefix}/coordinator/agents/{agent_id}/assignment`` only when that agent's plan changed (docs/protocol.md 10).

:class:`Book` is the sans-I/O core: statuses and retained assignments in, the assignments to publish out; it
keeps the per-agent history the policies need (first and last seen, updates sent and when they last grew,
the current plan). All of it comes from the statuses and the coordinator's own retained assignments, not
from the aggregators: an agent's status carries its ``updates_sent`` and, in its capabilities, its last
training loss. A restarted coordinator reads its retained assignments back first, so it neither re-issues
an unchanged plan nor reuses a sequence number (sequences are also at least the issue time in
milliseconds, so they grow even when nothing was retained).

Lifecycle (service.py): ``async with Coordinator(connect, config) as c: ...`` or ``await c.run()``; named loops
``connection`` and ``planner``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from fedmqtt.allocation.base import AgentView, Assignment, History, Policy, PolicyConfig
from fedmqtt.allocation_schemas import MAX_INT, MAX_MESSAGE, assignment_payload, parse_assignment, parse_capabilities
from fedmqtt.capabilities import Capabilities
from fedmqtt.errors import InvalidMessage, TransportError
from fedmqtt.schemas import Status
from fedmqtt.service import Loop, Service
from fedmqtt.topics import CoordinatorTopics
from fedmqtt.transport import ConnectOptions, Connector, Message, Transport
from fedmqtt.types import is_id

log = logging.getLogger("fedmqtt.coordinator")


class _Seen(NamedTuple):
    """An agent's latest status in one federation."""

    online: bool
    capabilities: Capabilities | None
    updates_sent: int
    order: int  # arrival order: the newest status across federations is the agent's


class Book:
    """What the coordinator knows: each agent's statuses (per federation: an agent that moved leaves an
    offline status behind), its history and its retained assignment. No I/O, no clock: ``now`` comes in."""

    def __init__(self, max_agents: int = 100_000) -> None:
        self.max_agents = max_agents
        self.seen: dict[str, dict[str, _Seen]] = {}
        self.history: dict[str, History] = {}
        self.issued: dict[str, Assignment] = {}  # the assignment retained for each agent
        self.sequences: dict[str, int] = {}  # the highest sequence issued to each agent (kept after a withdrawal)
        self.unpublished: dict[str, Assignment | None] = {}  # to publish (None: withdraw)
        self.invalid = 0  # statuses or capabilities refused
        self.last_error: str | None = None
        self._order = 0

    def status(self, federation: str, agent: str, payload: bytes, now: float) -> bool:
        """One retained status; True when what a policy sees may have changed."""
        if not is_id(agent) or (agent not in self.seen and len(self.seen) >= self.max_agents):
            return False
        caps: Capabilities | None = None
        try:
            if len(payload) > MAX_MESSAGE:
                raise InvalidMessage(f"status of {len(payload)} bytes, more than {MAX_MESSAGE}")
            s = Status.model_validate_json(payload) if payload else None
            if s is not None and not 0 <= s.updates_sent <= MAX_INT:  # a float of it would overflow a policy
                raise InvalidMessage(f"updates_sent {str(s.updates_sent)[:40]} is not in 0..{MAX_INT}")
            if s is not None and s.capabilities is not None:
                caps = parse_capabilities(s.capabilities)
        except ValueError as exc:  # pydantic's ValidationError and InvalidMessage
            self.invalid += 1
            self.last_error = f"{agent} in {federation}: {str(exc)[:300]}"
            log.warning("status refused: %s", self.last_error)
            return False
        self._order += 1
        online = s is not None and s.state != "offline"
        sent = s.updates_sent if s is not None else 0
        self.seen.setdefault(agent, {})[federation] = _Seen(online, caps, sent, self._order)
        h = self.history.get(agent) or History(first_seen=now)
        progress = now if sent > h.updates_sent else h.last_progress
        self.history[agent] = replace(h, last_seen=now, updates_sent=max(sent, h.updates_sent),
                                      last_progress=progress)
        return True

    def retained(self, agent: str, payload: bytes) -> None:
        """A retained assignment (ours, from before a restart, or our own publish coming back)."""
        if not payload:
            if agent not in self.unpublished:
                self.issued.pop(agent, None)
            return
        try:
            a = parse_assignment(payload, agent)
        except InvalidMessage as exc:
            self.invalid += 1
            self.last_error = str(exc)
            return
        held = self.issued.get(agent)
        if held is None or a.sequence > held.sequence:
            self.issued[agent] = a
        self.sequences[agent] = max(a.sequence, self.sequences.get(agent, -1))

    def views(self) -> dict[str, AgentView]:
        """Online agents that advertise capabilities, as the policies see them."""
        out = {}
        for agent, feds in self.seen.items():
            online = [s for s in feds.values() if s.online]
            with_caps = [s for s in online if s.capabilities is not None]
            if not with_caps:
                continue
            newest = max(with_caps, key=lambda s: s.order)
            assert newest.capabilities is not None
            held = self.issued.get(agent)
            history = replace(self.history[agent], plan=held.plan if held is not None else None)
            out[agent] = AgentView(newest.capabilities, history)
        return out

    def plan(self, policy: Policy, config: PolicyConfig, now: float, wall: float) -> list[str]:
        """Run ``policy``; the agents whose assignment changed (queued in ``unpublished``)."""
        views = self.views()
        plans = policy.assign(views, now, config)
        changed = []
        for agent in sorted(views):
            plan, held = plans.get(agent), self.issued.get(agent)
            if plan is None:
                if held is not None:  # nowhere to go (its tasks changed): back to its own settings
                    del self.issued[agent]
                    self.unpublished[agent] = None
                    changed.append(agent)
                continue
            if held is not None and held.plan == plan:
                continue
            # above every sequence this agent was sent, withdrawn ones too: the wall clock may have gone back
            sequence = max(self.sequences.get(agent, -1) + 1, int(wall * 1000))
            self.sequences[agent] = sequence
            self.issued[agent] = self.unpublished[agent] = Assignment(agent, plan, sequence, wall, policy.name)
            changed.append(agent)
        return changed


@dataclass(frozen=True)
class CoordinatorConfig:
    policy: PolicyConfig
    prefix: str = "fedmqtt"
    debounce: float = 0.5  # at most one policy run per this many seconds
    settle: float = 0.5  # after connecting, wait this long for the retained statuses and assignments
    client_id: str = "fedmqtt-coordinator"
    backoff_max: float = 10.0
    max_agents: int = 100_000
    topics: CoordinatorTopics = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "topics", CoordinatorTopics(self.prefix))


class Coordinator(Service):
    """Serves every federation of ``config.policy.federations`` under ``config.prefix`` with ``policy``."""

    def __init__(self, connect: Connector, policy: Policy, config: CoordinatorConfig) -> None:
        super().__init__("coordinator", connect, config.backoff_max)
        self.config = config
        self.topics = config.topics
        self.policy = policy
        self.book = Book(config.max_agents)
        self.runs = 0  # policy runs
        self.published = 0  # assignments published (withdrawals included)
        self._dirty = asyncio.Event()

    # ---- reading ----------------------------------------------------------------------------------------
    def assignment(self, agent: str) -> Assignment | None:
        return self.book.issued.get(agent)

    def status(self) -> str:
        per_fed: dict[str, int] = {}
        for a in self.book.issued.values():
            per_fed[a.plan.federation] = per_fed.get(a.plan.federation, 0) + 1
        feds = ", ".join(f"{f} {n}" for f, n in sorted(per_fed.items())) or "none"
        return (f"policy {self.policy.name}, {len(self.book.views())} agents with capabilities online, "
                f"assigned: {feds}; {self.published} assignments published, {self.book.invalid} messages refused")

    async def wait_assignment(self, agent: str, done: Callable[[Assignment], bool], timeout: float) -> Assignment:
        """Wait until ``agent``'s published assignment satisfies ``done``."""
        def ok() -> bool:
            a = self.book.issued.get(agent)
            return a is not None and agent not in self.book.unpublished and done(a)

        await self.wait_until(ok, timeout, lambda: f"{agent}: assignment {self.book.issued.get(agent)}")
        return self.book.issued[agent]

    # ---- lifecycle --------------------------------------------------------------------------------------
    def loops(self) -> dict[str, Loop]:
        opts = ConnectOptions(self.config.client_id, on_message=self._on_message)
        return {"connection": self.connection(opts, self._subscribe), "planner": self._planner()}

    async def _subscribe(self, t: Transport) -> None:
        await t.subscribe(self.topics.assignments, qos=1)  # first: our own retained assignments
        await t.subscribe(self.topics.statuses, qos=1)

    def _on_message(self, msg: Message) -> None:
        agent = self.topics.agent_of_assignment(msg.topic)
        if agent is not None:
            self.book.retained(agent, msg.payload)
            return
        where = self.topics.status_of(msg.topic)
        if (where is not None and where[0] in self.config.policy.federations
                and self.book.status(where[0], where[1], msg.payload, time.monotonic())):
            self._dirty.set()

    async def _planner(self) -> None:
        """Plan when a status changed, at most every ``debounce`` s; publish what changed."""
        await self.connected.wait()
        await asyncio.sleep(self.config.settle)
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self.runs += 1
            changed = self.book.plan(self.policy, self.config.policy, time.monotonic(), time.time())
            if changed:
                log.info("new assignments: %s", ", ".join(
                    f"{a} -> {_describe(self.book.issued.get(a))}" for a in changed[:20]))
            await self._publish()
            self.changed()
            await asyncio.sleep(self.config.debounce)

    async def _publish(self) -> None:
        while self.book.unpublished:
            t = self.transport
            if t is None or not self.connected.is_set():
                await self.connected.wait()
                continue
            agent, a = next(iter(self.book.unpublished.items()))
            try:
                payload = assignment_payload(a) if a else b""
            except InvalidMessage as exc:  # e.g. a sequence past 2^53-1 (a foreign retained copy): skip that agent
                self.book.invalid += 1
                self.book.last_error = f"not publishing {agent}'s assignment: {exc}"
                log.error("%s", self.book.last_error)
                del self.book.unpublished[agent]
                continue
            try:
                await t.publish(self.topics.assignment(agent), payload, qos=1, retain=True)
            except TransportError as exc:
                log.warning("publishing %s's assignment: %s", agent, exc)
                await asyncio.sleep(0.5)
                continue
            if self.book.unpublished.get(agent) is a:  # not replaced meanwhile
                del self.book.unpublished[agent]
            self.published += 1


def _describe(a: Assignment | None) -> str:
    if a is None:
        return "withdrawn"
    p = a.plan
    return json.dumps({"federation": p.federation, "steps": p.local_steps, "p": p.participation,
                       "compression": p.compression})

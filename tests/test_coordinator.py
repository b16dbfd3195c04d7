"""The coordinator: its sans-I/O book (statuses of several federations, history, sequence numbers) and the
service on a real Mosquitto: agents with different tasks go to their own federations, and an agent whose
capabilities change (it goes on battery) gets a new assignment."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from fedmqtt.allocation import Assignment, Plan, PolicyConfig, make
from fedmqtt.allocation_schemas import assignment_payload, capabilities_json
from fedmqtt.assignment import AssignmentFollower, Defaults, Settings
from fedmqtt.capabilities import Capabilities, Compute, Power
from fedmqtt.coordinator import Book, Coordinator, CoordinatorConfig
from fedmqtt.schemas import Status, dump
from fedmqtt.topics import CoordinatorTopics, Topics
from fedmqtt.transport import BrokerConfig, ConnectOptions, Inbox, mqtt_connector

FEDS = {"hapt-fed": "hapt", "digits-fed": "digits"}


def status(agent: str, state: str = "online", sent: int = 0, **caps: Any) -> bytes:
    c = Capabilities(**caps) if caps else None
    return dump(Status(agent=agent, state=state, updates_sent=sent,  # type: ignore[arg-type]
                       capabilities=capabilities_json(c) if c is not None else None))


def test_the_reserved_federation_and_coordinator_topics() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Topics("fedmqtt", "coordinator")
    t = CoordinatorTopics("p")
    assert t.statuses == "p/+/agents/+/status" and t.assignment("e-1") == "p/coordinator/agents/e-1/assignment"
    assert t.status_of("p/hapt/agents/e-1/status") == ("hapt", "e-1")
    assert t.status_of("p/coordinator/agents/e-1/status") is None and t.status_of("q/hapt/agents/e/status") is None
    assert t.agent_of_assignment("p/coordinator/agents/e-1/assignment") == "e-1"


def test_book_assigns_changes_only_and_continues_sequences() -> None:
    cfg, policy = PolicyConfig(FEDS), make("speed-aware")
    book = Book()
    book.retained("a", assignment_payload(Assignment("a", Plan("old-fed", "digits"), 5000, 1.0, "uniform")))
    assert book.status("digits-fed", "a", status("a", compute=Compute(10.0, 32), tasks=("digits",)), now=1.0)
    assert book.status("hapt-fed", "b", status("b", compute=Compute(10.0, 32), tasks=("hapt",)), now=1.0)
    assert not book.status("hapt-fed", "c", b'{"schema": 1, "agent": "c", "state": "online", "capabilities": '
                                           b'{"examples": -1}}', now=1.0)
    assert book.invalid == 1 and "examples" in (book.last_error or "")
    assert book.plan(policy, cfg, now=2.0, wall=3.0) == ["a", "b"]
    a, b = book.issued["a"], book.issued["b"]
    assert (a.plan.federation, b.plan.federation) == ("digits-fed", "hapt-fed")
    assert a.sequence == 5001 and b.sequence == 3000  # above what was retained; at least the time in ms
    assert book.plan(policy, cfg, now=3.0, wall=4.0) == []  # nothing changed: nothing to publish
    book.status("digits-fed", "a", status("a", compute=Compute(10.0, 32), power=Power("battery"),
                                          tasks=("digits",)), now=4.0)
    assert book.plan(policy, cfg, now=4.0, wall=4.0) == ["a"]
    assert book.issued["a"].sequence == 5002 and book.issued["a"].plan.local_steps == 10


def test_book_follows_an_agent_across_federations_and_keeps_its_history() -> None:
    book = Book()
    caps = {"compute": Compute(10.0, 32), "tasks": ("digits", "hapt")}
    book.status("digits-fed", "a", status("a", sent=3, **caps), now=1.0)
    book.status("hapt-fed", "a", status("a", sent=5, **caps), now=2.0)  # it moved ...
    book.status("digits-fed", "a", status("a", state="offline", sent=3, **caps), now=3.0)  # ... and said so
    assert set(book.views()) == {"a"}
    h = book.views()["a"].history
    assert (h.first_seen, h.last_seen, h.updates_sent, h.last_progress) == (1.0, 3.0, 5, 2.0)
    book.status("hapt-fed", "a", b"", now=4.0)  # cleared: offline everywhere
    assert book.views() == {}
    book.status("hapt-fed", "old", status("old"), now=4.0)  # a 1.0 agent (no capabilities): not planned
    assert "old" not in book.views()


def test_hostile_statuses_are_refused_and_cannot_stop_the_policy() -> None:
    """A 500-digit ``updates_sent`` would overflow the utility policy's float maths and stop the coordinator;
    ``capabilities`` that are not an object are the coordinator's to refuse, while presence still reads them."""
    book = Book()
    caps = capabilities_json(Capabilities(Compute(10.0, 32), tasks=("digits",), loss=1.0))
    huge = json.dumps({"schema": 1, "agent": "h", "state": "online", "capabilities": caps})
    huge = huge.replace('"state"', '"updates_sent": ' + "9" * 500 + ', "state"')
    assert not book.status("digits-fed", "h", huge.encode(), now=1.0)
    listed = b'{"schema": 1, "agent": "l", "state": "online", "capabilities": [1, 2]}'
    assert Status.model_validate_json(listed).state == "online"  # an aggregator's presence still reads it
    assert not book.status("digits-fed", "l", listed, now=1.0)
    assert book.invalid == 2 and "capabilities" in (book.last_error or "")
    assert book.status("digits-fed", "ok", status("ok", sent=3, compute=Compute(10.0, 32), tasks=("digits",),
                                                  loss=1.0), now=1.0)
    assert book.plan(make("utility+speed-aware"), PolicyConfig(FEDS), now=2.0, wall=3.0) == ["ok"]


def test_a_reissued_assignment_outranks_a_withdrawn_one_even_when_the_clock_went_back() -> None:
    cfg, policy, book = PolicyConfig(FEDS), make("uniform"), Book()
    book.status("digits-fed", "a", status("a", compute=Compute(10.0, 32), tasks=("digits",)), now=1.0)
    assert book.plan(policy, cfg, now=1.0, wall=100.0) == ["a"] and book.issued["a"].sequence == 100_000
    book.status("digits-fed", "a", status("a", compute=Compute(10.0, 32), tasks=("vision",)), now=2.0)
    assert book.plan(policy, cfg, now=2.0, wall=101.0) == ["a"] and "a" not in book.issued  # withdrawn
    book.status("digits-fed", "a", status("a", compute=Compute(10.0, 32), tasks=("digits",)), now=3.0)
    assert book.plan(policy, cfg, now=3.0, wall=50.0) == ["a"]  # NTP stepped the clock back
    follower = AssignmentFollower("a", Defaults("x", "digits"), tasks=("digits",))
    follower.offer(assignment_payload(Assignment("a", Plan("digits-fed", "digits"), 100_000, 100.0, "uniform")))
    assert book.issued["a"].sequence > 100_000  # else the agent would ignore it by the sequence rule
    follower.offer(assignment_payload(book.issued["a"]))
    assert follower.stale == 0 and follower.highest == book.issued["a"].sequence


# ---- on a real broker -------------------------------------------------------------------------------------
class FakeAgent:
    """An agent's wire behaviour only: its retained status with capabilities, and its assignment."""

    def __init__(self, broker: BrokerConfig, prefix: str, agent: str, tasks: tuple[str, ...]) -> None:
        self.connect = mqtt_connector(broker)
        self.prefix, self.agent, self.tasks = prefix, agent, tasks
        self.inbox = Inbox()
        self.follower = AssignmentFollower(agent, Defaults("nowhere", tasks[0]), tasks=tasks, prefix=prefix)

    async def publish_status(self, t: Any, federation: str, **caps: Any) -> None:
        topic = Topics(self.prefix, federation).status(self.agent)
        await t.publish(topic, status(self.agent, tasks=self.tasks, **caps), qos=1, retain=True)

    async def until(self, done: Callable[[Settings], bool], timeout: float = 60.0) -> Settings:
        async def follow() -> Settings:
            while not done(self.follower.settings):
                self.follower.offer((await self.inbox.get()).payload)
            return self.follower.settings

        return await asyncio.wait_for(follow(), timeout)


@pytest.mark.broker
async def test_two_federations_and_a_device_that_goes_on_battery(broker: BrokerConfig, federation: str) -> None:
    prefix = federation  # unique to this test
    config = CoordinatorConfig(PolicyConfig(FEDS, reference_steps=16), prefix=prefix, debounce=0.2,
                               client_id=f"coord-{prefix}")
    hapt = FakeAgent(broker, prefix, "phone-1", ("hapt",))
    digits = FakeAgent(broker, prefix, "board-1", ("digits",))
    opts = [ConnectOptions(f"{a.agent}-{prefix}", on_message=a.inbox) for a in (hapt, digits)]
    async with Coordinator(mqtt_connector(broker), make("utility+speed-aware+bandwidth"), config) as coord, \
            hapt.connect(opts[0]) as th, digits.connect(opts[1]) as td:
        for a, t in ((hapt, th), (digits, td)):
            await t.subscribe(a.follower.topic, qos=1)
        await hapt.publish_status(th, "hapt-fed", compute=Compute(40.0, 32), power=Power("mains"), examples=300)
        await digits.publish_status(td, "digits-fed", compute=Compute(40.0, 32), examples=200)
        first = await hapt.until(lambda s: s.assigned)
        other = await digits.until(lambda s: s.assigned)
        assert (first.federation, first.task) == ("hapt-fed", "hapt")
        assert (other.federation, other.task) == ("digits-fed", "digits")
        assert first.local_steps == 16  # the only device of its federation: the reference

        # The phone goes on battery, low: it gets a new assignment, with a higher sequence, less work.
        await hapt.publish_status(th, "hapt-fed", compute=Compute(40.0, 32), power=Power("battery", 12.0),
                                  examples=300)
        after = await hapt.until(lambda s: s.sequence != first.sequence)
        assert first.sequence is not None and after.sequence is not None and after.sequence > first.sequence
        assert after.federation == "hapt-fed"
        assert after.local_steps is not None and after.local_steps < 16
        assert after.participation == config.policy.participation_floor < first.participation
        assert coord.assignment("phone-1") is not None and coord.book.invalid == 0
        # The other device's assignment did not change: it was not sent again.
        assert coord.assignment("board-1").sequence == other.sequence  # type: ignore[union-attr]
    # What stays retained is what a reader sees: the newest assignment, valid by the documented rules.
    async with hapt.connect(ConnectOptions(f"reader-{prefix}", on_message=(box := Inbox()))) as t:
        await t.subscribe(hapt.follower.topic, qos=1)
        body = json.loads((await box.get(timeout=30)).payload)
        assert body["sequence"] == after.sequence and body["agent"] == "phone-1"
        for a in (hapt, digits):  # tidy the shared broker
            await t.publish(a.follower.topic, b"", qos=1, retain=True)


@pytest.mark.parametrize(("argv", "says"), [
    (["--policy", "oort"], "unknown allocation policy part 'oort'"),
    (["--federations", "coordinator=hapt"], "reserved"),
    (["--federations", "a=hapt,a=digits"], "given twice"),
])
def test_the_coordinator_command_refuses_bad_settings_in_one_line(argv: list[str], says: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from fedmqtt.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["coordinator", *argv])
    assert exit_.value.code == 1
    assert says in capsys.readouterr().err


def test_the_secure_profile_acl_lets_each_agent_read_only_its_own_assignment() -> None:
    from fedmqtt.security import acl_text, agent_acl

    assert "topic read fedmqtt/coordinator/agents/a1/assignment" in agent_acl("fedmqtt/default", "a1")
    acl = acl_text(Topics("fedmqtt", "default"), ["a1"], coordinator="coordinator")
    block = acl.split("user coordinator\n")[1].split("\n\n")[0].splitlines()
    assert block == ["topic read fedmqtt/+/agents/+/status",
                     "topic readwrite fedmqtt/coordinator/agents/+/assignment"]
    assert "coordinator" not in acl_text(Topics("fedmqtt", "default"), ["a1"]).split("user a1")[0]

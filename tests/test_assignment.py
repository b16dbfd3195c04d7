"""The agent's follower: the sequence rule, refusals that keep what it had, withdrawal back to defaults."""

from __future__ import annotations

import json
import random
from typing import Any

from fedmqtt.assignment import AssignmentFollower, Defaults
from fedmqtt.compression import Compression


def payload(sequence: int, **over: Any) -> bytes:
    body = {"schema": 1, "agent": "edge-1", "federation": "hapt-a", "task": "hapt", "local_steps": 5,
            "participation": 0.5, "compression": "int8", "sequence": sequence, "issued_at": 1.0,
            "policy": "speed-aware"} | over
    return json.dumps(body).encode()


def follower(**kw: Any) -> AssignmentFollower:
    defaults = Defaults("default", "digits", local_steps=20, batch_size=32, compression=Compression.parse("float16"))
    return AssignmentFollower("edge-1", defaults, tasks=("digits", "hapt"), **kw)


def test_without_an_assignment_the_agent_keeps_its_own_settings() -> None:
    f = follower()
    s = f.settings
    assert (s.federation, s.task, s.local_steps, s.batch_size, s.participation, str(s.compression), s.assigned) == (
        "default", "digits", 20, 32, 1.0, "float16", False)
    assert f.topic == "fedmqtt/coordinator/agents/edge-1/assignment"


def test_only_a_higher_sequence_replaces_the_assignment() -> None:
    f = follower()
    assert f.offer(payload(10))
    assert (f.settings.federation, f.settings.local_steps, f.settings.sequence) == ("hapt-a", 5, 10)
    assert not f.offer(payload(10, local_steps=7))  # the same sequence: a duplicate delivery, not news
    assert not f.offer(payload(9, federation="old"))  # an older retained copy
    assert (f.settings.local_steps, f.stale) == (5, 2)
    assert f.offer(payload(11, local_steps=None, compression=None))  # unset: the agent's own settings
    assert (f.settings.local_steps, str(f.settings.compression), f.settings.batch_size) == (20, "float16", 32)
    assert not f.offer(payload(12, local_steps=None, compression=None))  # newer, but nothing changed
    assert f.highest == 12


def test_refused_payloads_keep_the_current_assignment_and_say_why() -> None:
    f = follower()
    f.offer(payload(3))
    assert not f.offer(payload(4, compression="gzip"))
    assert not f.offer(payload(5, task="vision"))  # no data for it
    assert not f.offer(payload(6, agent="edge-2"))  # someone else's
    assert f.refused == 3 and f.last_error is not None and "edge-2" in f.last_error
    assert f.settings.sequence == 3 and f.highest == 3


def test_a_withdrawn_assignment_falls_back_to_defaults_and_the_sequence_is_remembered() -> None:
    f = follower()
    f.offer(payload(3))
    assert f.offer(b"")
    assert not f.settings.assigned and f.settings.federation == "default"
    assert not f.offer(payload(2))  # an older copy after the withdrawal still does not count
    assert f.offer(payload(4))


def test_participation_is_a_per_round_draw() -> None:
    f = follower(rng=random.Random(0))
    assert all(f.participate() for _ in range(100))  # no assignment: always
    f.offer(payload(1, participation=0.25))
    share = sum(f.participate() for _ in range(4000)) / 4000
    assert 0.2 < share < 0.3

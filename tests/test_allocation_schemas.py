"""The wire form of capabilities and assignments: what is malformed is refused with an error that names
the field and the rule; what is well-formed round-trips."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedmqtt.allocation.base import Assignment, Plan
from fedmqtt.allocation_schemas import MAX_MESSAGE, assignment_payload, parse_assignment, parse_capabilities
from fedmqtt.capabilities import Capabilities, Compute, Link, Power
from fedmqtt.errors import InvalidMessage
from fedmqtt.schemas import Status


def caps(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"compute": {"steps_per_s": 50.0, "batch_size": 32},
                            "memory": {"total": 8 << 30, "available": 2 << 30},
                            "power": {"source": "battery", "battery_percent": 55.0},
                            "link": {"uplink": 1.5e5, "rtt": 0.04}, "examples": 900, "tasks": ["hapt"],
                            "tags": {"hw": "rpi4", "site": "plant-3"}, "loss": 0.7}
    return base | over


def test_well_formed_capabilities_become_plain_values() -> None:
    c = parse_capabilities(caps())
    assert c == Capabilities(Compute(50.0, 32), c.memory, Power("battery", 55.0), Link(1.5e5, 0.04), 900,
                             ("hapt",), {"hw": "rpi4", "site": "plant-3"}, 0.7)
    assert parse_capabilities({}) == Capabilities()  # every part optional
    assert parse_capabilities(caps(future={"x": 1})).examples == 900  # unknown keys: ignored (extensions)


@pytest.mark.parametrize(
    ("over", "match"),
    [({"compute": {"steps_per_s": float("nan"), "batch_size": 32}}, "compute.steps_per_s: .*finite"),
     ({"compute": {"steps_per_s": -1.0, "batch_size": 32}}, "compute.steps_per_s: .*greater than 0"),
     ({"compute": {"steps_per_s": 5.0, "batch_size": 0}}, "compute.batch_size"),
     ({"examples": -3}, "examples: .*greater than or equal to 0"),
     ({"examples": "12"}, "examples: .*valid integer"),
     ({"examples": True}, "examples"),
     ({"power": {"source": "solar"}}, "power.source: .*'mains', 'battery', 'charging' or 'unknown'"),
     ({"power": {"source": "battery", "battery_percent": 140}}, "power.battery_percent"),
     ({"link": {"uplink": float("inf")}}, "link.uplink: .*finite"),
     ({"memory": {"total": 10, "available": 20}}, "memory: available memory exceeds total"),
     ({"tags": {f"k{i}": "v" for i in range(17)}}, "tags: at most 16 tags"),
     ({"tags": {"hw": "x" * 65}}, "tags: tag 'hw': the value must be at most 64"),
     ({"tags": {"bad key": "v"}}, "tags: tag key 'bad key'"),
     ({"tasks": ["digits", "digits"]}, "tasks: tasks must not repeat"),
     ({"tasks": ["a/b"]}, "tasks: task 'a/b'"),
     ({"tasks": [f"t{i}" for i in range(17)]}, "tasks: .*at most 16"),
     ({"loss": float("nan")}, "loss: .*finite")],
)
def test_malformed_capabilities_are_refused_naming_the_field(over: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidMessage, match=f"^capabilities: {match}"):
        parse_capabilities(caps(**over))


def test_a_status_with_bad_capabilities_still_counts_for_presence() -> None:
    """The aggregator's presence reads only the status; the capabilities are the coordinator's to check."""
    raw = json.dumps({"schema": 1, "agent": "e", "state": "online", "capabilities": caps(examples=-1)})
    s = Status.model_validate_json(raw)
    assert s.state == "online" and s.capabilities is not None
    with pytest.raises(InvalidMessage):
        parse_capabilities(s.capabilities)
    assert Status.model_validate_json('{"schema": 1, "agent": "e", "state": "online"}').capabilities is None


def assignment(**over: Any) -> bytes:
    body = {"schema": 1, "agent": "edge-1", "federation": "hapt", "task": "hapt", "local_steps": 8,
            "batch_size": 16, "participation": 0.5, "compression": "topk:1%", "sequence": 12,
            "issued_at": 1795612345.25, "policy": "utility+speed-aware"} | over
    return json.dumps(body).encode()


def test_an_assignment_round_trips_with_its_compression_form_made_canonical() -> None:
    a = parse_assignment(assignment(), "edge-1")
    assert a == Assignment("edge-1", Plan("hapt", "hapt", 8, 16, 0.5, "topk:0.01"), 12, 1795612345.25,
                           "utility+speed-aware")
    assert parse_assignment(assignment_payload(a)) == a
    minimal = parse_assignment(json.dumps({"schema": 1, "agent": "e", "federation": "f", "task": "t",
                                           "sequence": 0, "issued_at": 0}).encode())
    assert minimal.plan == Plan("f", "t")  # the rest: the agent's own settings, participation 1
    assert parse_assignment(assignment(policy=""), "edge-1").policy == ""  # "or empty" (protocol.md 10.2)


@pytest.mark.parametrize(
    ("payload", "match"),
    [(assignment(compression="zip"), "compression: unknown compression 'zip'"),
     (assignment(compression="topk:2"), "compression: topk needs a fraction"),
     (assignment(participation=0), "participation: .*greater than 0"),
     (assignment(participation=1.5), "participation: .*less than or equal to 1"),
     (assignment(participation=float("nan")), "participation"),
     (assignment(local_steps=-2), "local_steps"),
     (assignment(local_steps=2.5), "local_steps"),
     (assignment(sequence=-1), "sequence"),
     (assignment(sequence=2**60), "sequence"),
     (assignment(federation="coordinator"), "federation: .*reserved"),
     (assignment(federation="a/b"), "federation"),
     (assignment(agent="not an id"), "agent"),
     (assignment(schema=2), "schema"),
     (b"not json", "Invalid JSON"),
     (assignment(policy="x" * (MAX_MESSAGE + 1)), f"more than {MAX_MESSAGE}"),
     (assignment(agent="edge-2"), "for agent 'edge-2', not 'edge-1'")],
)
def test_malformed_assignments_are_refused_naming_the_field(payload: bytes, match: str) -> None:
    with pytest.raises(InvalidMessage, match=f"^assignment: .*{match}"):
        parse_assignment(payload, "edge-1")


def test_the_protocol_vectors_parse_and_the_invalid_ones_are_refused() -> None:
    from pathlib import Path

    vectors = Path(__file__).parent / "vectors"
    status = Status.model_validate_json((vectors / "status_with_capabilities.json").read_bytes())
    assert status.capabilities is not None
    c = parse_capabilities(status.capabilities)
    assert (c.power.source, c.tasks, c.examples) == ("battery", ("hapt",), 1200)
    a = parse_assignment((vectors / "assignment.json").read_bytes().strip(), "edge-3")
    assert a.plan == Plan("hapt", "hapt", 10, None, 0.5, "topk:0.01")
    for case in json.loads((vectors / "assignment_invalid.json").read_text()):
        with pytest.raises(InvalidMessage, match=case["field"]):
            parse_assignment(json.dumps(case["payload"]).encode())

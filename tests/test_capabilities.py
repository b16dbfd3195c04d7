"""What a device advertises: the link and compute estimators, and the platform probes (on fake /proc and
/sys trees, so that the test says the same on every machine)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedmqtt.capabilities import (
    Compute,
    ComputeEstimator,
    LinkEstimator,
    Memory,
    measure,
    probe_compute,
    read_memory,
    read_power,
)


def test_link_estimator_is_an_ewma_of_uplink_that_discounts_the_round_trip() -> None:
    est = LinkEstimator(alpha=0.5, small=1000)
    assert est.estimate().uplink is None and est.estimate().rtt is None
    est.observe(100, 0.1)  # small: a round trip, not a transfer
    assert est.rtt == pytest.approx(0.1) and est.uplink is None
    est.observe(100_000, 1.1)  # 1.1 s of which 0.1 s is the round trip: 100 kB/s
    assert est.uplink == pytest.approx(100_000)
    est.observe(100_000, 0.35)  # 400 kB/s; EWMA with alpha 0.5
    assert est.uplink == pytest.approx(250_000)
    for bad in (math.nan, -1.0, 0.0, math.inf):
        est.observe(100_000, bad)
    est.observe(-5, 1.0)
    assert est.uplink == pytest.approx(250_000) and est.observed == 3
    with pytest.raises(ValueError, match="alpha"):
        LinkEstimator(alpha=0.0)


def test_a_transfer_faster_than_the_rtt_says_is_not_taken_as_infinite() -> None:
    est = LinkEstimator(alpha=1.0, small=10)
    est.observe(1, 1.0)  # rtt 1 s
    est.observe(1000, 0.5)  # less than the rtt: counted as at most 10x the raw rate
    assert est.uplink == pytest.approx(1000 / 0.05)


def test_compute_probe_times_the_round_after_compiling_it() -> None:
    calls = []
    ticks = iter([0.0, 2.0, 10.0, 11.0, 20.0, 21.0])  # the first run (compile) is not timed
    c = probe_compute(lambda: calls.append(1), steps=5, batch_size=16, clock=lambda: next(ticks))
    assert len(calls) == 4 and c == Compute(5 / 1.0, 16)  # median of 2, 1, 1 seconds
    est = ComputeEstimator(c, alpha=0.5)
    assert est.observe(10, 1.0).steps_per_s == pytest.approx(7.5)
    assert est.observe(10, math.nan).steps_per_s == pytest.approx(7.5)


def test_memory_from_meminfo_and_fallback(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:        8000 kB\nMemFree:  100 kB\nMemAvailable:    3000 kB\n")
    assert read_memory(info) == Memory(8000 * 1024, 3000 * 1024)
    m = read_memory(tmp_path / "missing")  # os.sysconf where it knows, else unknown; never an error
    assert m.total is None or m.total > 0


def _supply(root: Path, name: str, **files: str) -> None:
    (root / name).mkdir(parents=True)
    for k, v in files.items():
        (root / name / k).write_text(v + "\n")


@pytest.mark.parametrize(
    ("supplies", "expected"),
    [({}, ("unknown", None)),
     ({"AC": {"type": "Mains", "online": "1"}}, ("mains", None)),
     ({"AC": {"type": "Mains", "online": "0"}, "BAT0": {"type": "Battery", "status": "Discharging",
                                                        "capacity": "42"}}, ("battery", 42.0)),
     ({"AC": {"type": "Mains", "online": "1"}, "BAT0": {"type": "Battery", "status": "Charging",
                                                        "capacity": "80"}}, ("charging", 80.0)),
     ({"AC": {"type": "Mains", "online": "1"}, "BAT0": {"type": "Battery", "status": "Full",
                                                        "capacity": "100"}}, ("mains", 100.0))],
)
def test_power_from_sys_class_power_supply(tmp_path: Path, supplies: dict[str, dict[str, str]],
                                           expected: tuple[str, float | None]) -> None:
    root = tmp_path / "power_supply"
    root.mkdir()
    for name, files in supplies.items():
        _supply(root, name, **files)
    p = read_power(root)
    assert (p.source, p.battery_percent) == expected
    assert read_power(tmp_path / "none").source == "unknown"


def test_measure_assembles_an_advertisement_the_wire_accepts() -> None:
    from fedmqtt.allocation_schemas import capabilities_json, parse_capabilities

    link = LinkEstimator()
    link.observe(50_000, 0.5)
    c = measure(Compute(30.0, 32), link, examples=500, tasks=("digits",), tags={"site": "lab"}, loss=math.nan)
    assert c.loss is None and c.link.uplink == pytest.approx(100_000) and c.tasks == ("digits",)
    assert parse_capabilities(capabilities_json(c)) == c


@pytest.mark.parametrize("loss", [5e7, -0.3])
def test_measure_caps_estimates_beyond_the_protocols_bounds(loss: float) -> None:
    """A 10 MB publish timed at a microsecond (an in-process broker), a trivially fast round, a diverging or
    negative loss: the advertisement stays one the wire accepts, rather than one that stops the agent."""
    from fedmqtt.allocation_schemas import capabilities_json

    link = LinkEstimator()
    link.observe(10_000_000, 1e-6)
    c = measure(Compute(5e10, 32), link, examples=1, tasks=("digits",), loss=loss)
    assert c.link.uplink == 1e12 and c.compute is not None and c.compute.steps_per_s == 1e9
    assert c.loss == (1e6 if loss > 0 else None)
    assert capabilities_json(c)["link"]["uplink"] == 1e12

"""The allocation policies (allocation/): pure functions from capabilities and history to plans. Contract
(a plan for exactly the agents that can have one, settings in range, same output for the same input) and
hand-computed cases for each part."""

from __future__ import annotations

import math

import pytest

from fedmqtt.allocation import AgentView, History, Plan, PolicyConfig, make
from fedmqtt.allocation.bandwidth import choose
from fedmqtt.allocation.registry import NAMES
from fedmqtt.allocation.speed_aware import effective_speed
from fedmqtt.capabilities import Capabilities, Compute, Link, Power

FEDS = {"hapt": "hapt", "digits": "digits"}


def dev(tasks: tuple[str, ...] = ("digits",), speed: float | None = 40.0, power: str = "mains",
        percent: float | None = None, uplink: float | None = None, loss: float | None = None, examples: int = 100,
        history: History | None = None) -> AgentView:
    caps = Capabilities(compute=Compute(speed, 32) if speed is not None else None,
                        power=Power(power, percent), link=Link(uplink), examples=examples, tasks=tasks,
                        loss=loss)
    return AgentView(caps, history or History())


def fleet() -> dict[str, AgentView]:
    return {"a": dev(speed=5.0, uplink=2e4, loss=1.5), "b": dev(speed=80.0, uplink=1e7, loss=0.1),
            "c": dev(("hapt",), speed=20.0, power="battery", percent=50.0, loss=0.8),
            "d": dev(("hapt", "digits"), speed=None), "e": dev(("other",))}


@pytest.mark.parametrize("name", [*NAMES, "utility+speed-aware+bandwidth"])
def test_every_policy_keeps_the_contract(name: str) -> None:
    cfg = PolicyConfig(FEDS, model_bytes={"digits": 200_000, "hapt": 400_000})
    policy = make(name)
    agents = fleet()
    plans = policy.assign(agents, 10.0, cfg)
    assert set(plans) == {"a", "b", "c", "d"}  # e holds no federation's task
    for agent, p in plans.items():
        assert FEDS[p.federation] == p.task and p.task in agents[agent].capabilities.tasks
        assert 0 < p.participation <= 1
        assert p.local_steps is None or cfg.min_steps <= p.local_steps <= cfg.max_steps
        assert p.compression in (None, "none", "float16", "int8", "topk:0.1", "topk:0.01")
    assert policy.assign(agents, 10.0, cfg) == plans  # a function of its inputs


def test_uniform_is_todays_behaviour_and_placement_is_sticky_and_balanced() -> None:
    cfg = PolicyConfig(FEDS)
    both = ("hapt", "digits")
    agents = {"a": dev(both), "b": dev(both), "c": dev(both), "d": dev(both)}
    plans = make("uniform").assign(agents, 0.0, cfg)
    assert all(p == Plan(p.federation, p.task) for p in plans.values())  # everything else: the agent's own
    assert sorted(p.federation for p in plans.values()) == ["digits", "digits", "hapt", "hapt"]
    # an agent already assigned stays, even where that leaves the other federation with fewer
    agents = {a: dev(both, history=History(plan=Plan("hapt", "hapt"))) for a in "abc"} | {"d": dev(both)}
    plans = make("uniform").assign(agents, 0.0, cfg)
    assert [plans[a].federation for a in "abcd"] == ["hapt", "hapt", "hapt", "digits"]
    # ... but not where it no longer holds that task
    agents["a"] = dev(("digits",), history=History(plan=Plan("hapt", "hapt")))
    assert make("uniform").assign(agents, 0.0, cfg)["a"].federation == "digits"


def test_speed_aware_matches_a_hand_computation_per_federation() -> None:
    cfg = PolicyConfig(FEDS, reference_steps=16, battery_factor=0.5)
    agents = {"slow": dev(speed=2.0), "mid": dev(speed=8.0), "fast": dev(speed=32.0),
              "h1": dev(("hapt",), speed=100.0), "h2": dev(("hapt",), speed=100.0, power="battery"),
              "unknown": dev(speed=None)}
    plans = make("speed-aware").assign(agents, 0.0, cfg)
    # digits: median speed of (2, 8, 32) is 8 -> T = 16 / 8 = 2 s; E = 2 s x speed
    assert {a: plans[a].local_steps for a in ("slow", "mid", "fast", "unknown")} == {
        "slow": 4, "mid": 16, "fast": 64, "unknown": 16}
    # hapt: its own median, at full power (100): the device on battery counts as 50 steps/s -> 8 steps
    assert (plans["h1"].local_steps, plans["h2"].local_steps) == (16, 8)
    assert effective_speed(agents["h2"], cfg) == 50.0


def test_speed_aware_keeps_local_work_within_its_range() -> None:
    """A device 100x faster than the median does not get 100x the local steps (its model would drift far
    from the population's); a very slow one still does a share of E."""
    agents = {"slow": dev(speed=0.1), "mid": dev(speed=10.0), "mid2": dev(speed=10.0), "fast": dev(speed=1000.0)}
    plans = make("speed-aware").assign(agents, 0.0, PolicyConfig(FEDS, reference_steps=16))
    assert (plans["slow"].local_steps, plans["mid"].local_steps, plans["fast"].local_steps) == (4, 16, 64)
    flat = make("speed-aware").assign(agents, 0.0, PolicyConfig(FEDS, reference_steps=16, step_range=1.0))
    assert {p.local_steps for p in flat.values()} == {16}
    with pytest.raises(ValueError, match="step_range"):
        PolicyConfig(FEDS, step_range=0.5)


def test_going_on_battery_changes_the_plan() -> None:
    cfg = PolicyConfig(FEDS)
    policy = make("utility+speed-aware")
    mains = {"x": dev(speed=40.0, loss=1.0), "y": dev(speed=40.0, loss=1.0)}
    battery = dict(mains, x=dev(speed=40.0, power="battery", percent=10.0, loss=1.0))
    before, after = policy.assign(mains, 0.0, cfg), policy.assign(battery, 0.0, cfg)
    assert after["x"].local_steps is not None and before["x"].local_steps is not None
    assert after["x"].local_steps < before["x"].local_steps
    assert after["x"].participation == cfg.participation_floor < before["x"].participation
    assert after["y"] == before["y"]


def test_utility_prefers_high_loss_and_fast_devices_and_keeps_a_floor() -> None:
    cfg = PolicyConfig(FEDS, local_steps=10, participation_target=0.5, exploration=0.0)
    agents = {"hard": dev(loss=2.0), "easy": dev(loss=0.2), "fresh": dev(loss=None),
              "straggler": dev(loss=2.0, speed=4.0), "zero": dev(loss=0.0)}
    p = {a: plan.participation for a, plan in make("utility").assign(agents, 0.0, cfg).items()}
    # k = 0.5 x 5 = 2.5; times 0.25 s (x3), 2.5 s; T = median of them = 0.25 s; the straggler's utility is
    # 200 x (0.25 / 2.5)^2 = 2. Scores: hard 200, easy 20, straggler 2, zero 0 (sum 222).
    assert p["fresh"] == 1.0  # unexplored: trains until it has reported a loss
    assert p["hard"] == 1.0  # 2.5 x 200 / 222 > 1
    assert p["easy"] == round(2.5 * 20 / 222 * 20) / 20 == 0.25
    assert p["straggler"] == p["zero"] == cfg.participation_floor  # the fairness floor


def test_an_empty_battery_is_low_and_an_unknown_charge_is_not() -> None:
    cfg = PolicyConfig(FEDS, local_steps=10, exploration=0.0)
    agents = {"empty": dev(power="battery", percent=0.0, loss=1.0), "unknown": dev(power="battery", loss=1.0),
              "mains": dev(loss=1.0)}
    p = {a: plan.participation for a, plan in make("utility").assign(agents, 0.0, cfg).items()}
    assert p["empty"] == cfg.participation_floor < p["unknown"] == p["mains"]


def test_a_policy_config_that_would_make_unpublishable_assignments_is_refused() -> None:
    for bad in ({"local_steps": 200_000}, {"batch_size": 0}, {"max_steps": 10**6}):
        with pytest.raises(ValueError, match="must be in"):
            PolicyConfig(FEDS, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserved"):
        PolicyConfig({"coordinator": "digits"})
    with pytest.raises(ValueError, match="task 'my task'"):
        PolicyConfig({"f": "my task"})


def test_utility_exploration_favours_agents_that_took_part_little() -> None:
    cfg = PolicyConfig(FEDS, local_steps=10, participation_target=0.5, exploration=1.0)
    veteran = dev(loss=1.0, history=History(updates_sent=1000))
    newcomer = dev(loss=1.0, history=History(updates_sent=0))
    p = make("utility").assign({"veteran": veteran, "newcomer": newcomer}, 0.0, cfg)
    assert p["newcomer"].participation > p["veteran"].participation


def test_bandwidth_picks_the_lightest_loss_form_that_fits_the_budget() -> None:
    size, budget = 1_000_000, 1.0
    assert choose(size, 2e6, budget) == "none"
    assert choose(size, 6e5, budget) == "float16"  # 0.5 MB in 0.83 s
    assert choose(size, 2.6e5, budget) == "int8"  # ~0.252 MB in 0.97 s
    assert choose(size, 2.1e5, budget) == "topk:0.1"
    assert choose(size, 1e3, budget) == "topk:0.01"  # nothing fits: the smallest
    cfg = PolicyConfig(FEDS, model_bytes={"digits": size}, upload_budget=budget)
    plans = make("bandwidth").assign({"slow": dev(uplink=2e4), "unknown": dev(uplink=None)}, 0.0, cfg)
    assert (plans["slow"].compression, plans["unknown"].compression) == ("topk:0.01", None)


def test_policy_names_and_config_are_checked() -> None:
    assert make("bandwidth+utility+speed-aware").name == "speed-aware+bandwidth+utility"
    with pytest.raises(ValueError, match="unknown allocation policy part 'oort'"):
        make("oort")
    with pytest.raises(ValueError, match="at least one federation"):
        PolicyConfig({})
    with pytest.raises(ValueError, match="participation_floor"):
        PolicyConfig(FEDS, participation_floor=0.0)
    assert math.isclose(PolicyConfig(FEDS).participation_floor, 0.05)

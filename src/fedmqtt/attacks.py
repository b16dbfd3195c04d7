"""What a device with valid credentials can do to the model: the attacks the robustness benchmark and tests
run, so that defences are measured against the attacks that defeat them in the literature, not one loud one.

An :class:`Attack` acts in one or two places of an attacker's local round:

* ``data`` (data poisoning): the attacker trains on altered examples (label flipping, a backdoor trigger);
* ``poison`` (model poisoning): the delta it publishes is replaced, just before encoding, by one computed
  from its honest delta and from what the attackers share (:class:`Collusion`).

Model-poisoning attacks (Δ the honest deltas the attackers hold, μ and σ their coordinate-wise mean and
standard deviation):

    sign flip   -scale · Δᵢ                                      (loud; each attacker alone)
    ALIE        μ - z · σ ⊙ sign(μ)                              (Baruch et al. 2019, "a little is enough")
    IPM         -ε · μ                                           (Xie et al. 2020, inner-product manipulation)
    adaptive    μ - γ* · σ ⊙ sign(μ),  γ* = the γ whose delta, sent by every attacker into a buffer it
                simulates with the defence's own rule, pushes the combined delta furthest against μ
                (the defence-aware attack of Shejwalkar and Houmansadr 2021, on ALIE's direction)

Attackers collude: they pool their honest deltas (the only view of the benign updates a device has), as in
the papers. A backdoor is judged by its attack success rate (:func:`attack_success`): the fraction of
test examples of another class that the model puts in the target class once the trigger is added.

>>> import numpy as np
>>> c = Collusion()
>>> send = ipm(0.5).attacker(0, c)
>>> send({"w": np.array([2.0, -4.0], np.float32)})["w"].tolist()
[-1.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

Delta = dict[str, np.ndarray]
Examples = tuple[np.ndarray, np.ndarray]
Defence = Callable[[Delta, np.ndarray], Delta]  # (deltas stacked on axis 0, weights (K,)) -> combined delta


@dataclass
class Collusion:
    """What the attackers of one run share: each attacker's latest honest delta."""

    honest: dict[int, Delta] = field(default_factory=dict)

    def record(self, attacker: int, delta: Delta) -> None:
        self.honest[attacker] = {k: np.asarray(v, np.float32) for k, v in delta.items()}

    def stacked(self) -> Delta:
        """The honest deltas held, stacked on a leading axis."""
        held = list(self.honest.values())
        return {k: np.stack([d[k] for d in held]) for k in held[0]}

    def moments(self) -> tuple[Delta, Delta]:
        """Coordinate-wise mean and standard deviation of the honest deltas held (σ = 0 with one)."""
        s = self.stacked()
        return {k: v.mean(axis=0) for k, v in s.items()}, {k: v.std(axis=0) for k, v in s.items()}


Poison = Callable[[Delta, Collusion], Delta]


@dataclass(frozen=True)
class Attack:
    """An attack: ``poison`` replaces the attacker's delta, ``data`` alters its training examples, and a
    backdoor's ``trigger`` and ``target`` say how its success is measured."""

    name: str
    poison: Poison | None = None
    data: Callable[[np.ndarray, np.ndarray], Examples] | None = None
    trigger: Callable[[np.ndarray], np.ndarray] | None = None
    target: int | None = None

    def attacker(self, index: int, collusion: Collusion) -> Callable[[Delta], Delta]:
        """Attacker ``index``'s hook on its outgoing delta (where client DP would act): records the honest
        delta with its colluders, returns what it sends (the honest delta when the attack poisons data)."""
        poison = self.poison

        def send(delta: Delta) -> Delta:
            honest = {k: np.asarray(v) for k, v in delta.items()}
            collusion.record(index, honest)
            if poison is None:
                return honest
            out = poison(honest, collusion)
            return {k: np.asarray(v, honest[k].dtype) for k, v in out.items()}

        return send

    def examples(self, x: np.ndarray, y: np.ndarray) -> Examples:
        """The attacker's training examples (unchanged unless the attack poisons data)."""
        return self.data(x, y) if self.data is not None else (x, y)


def sign_flip(scale: float = 5.0) -> Attack:
    """-scale × the honest delta."""
    return Attack(f"sign flip ×{scale:g}", lambda d, _: {k: -scale * v for k, v in d.items()})


def alie_z(clients: int, attackers: int) -> float:
    """ALIE's z for n clients of which m attack: the largest shift that keeps the attackers inside the
    majority's range, z = Φ⁻¹((n - s) / n) with s = ⌊n/2 + 1⌋ - m (Baruch et al. 2019).

    >>> round(alie_z(30, 6), 3)
    0.431
    """
    s = clients // 2 + 1 - attackers
    return NormalDist().inv_cdf((clients - s) / clients)


def _against(mu: Delta, sigma: Delta, z: float) -> Delta:
    return {k: mu[k] - z * sigma[k] * np.sign(mu[k]) for k in mu}


def alie(z: float) -> Attack:
    """"A little is enough": μ - z·σ⊙sign(μ), every attacker the same delta."""
    return Attack(f"ALIE z={z:.2f}", lambda _, c: _against(*c.moments(), z))


def ipm(epsilon: float = 0.5) -> Attack:
    """Inner-product manipulation: -ε·μ, so that the combined delta's inner product with μ shrinks."""
    return Attack(f"IPM ε={epsilon:g}", lambda _, c: {k: -epsilon * v for k, v in c.moments()[0].items()})


def label_flip(classes: int) -> Attack:
    """Data poisoning: the attacker trains on label c → classes - 1 - c."""
    return Attack("label flip", data=lambda x, y: (x, (classes - 1 - y).astype(y.dtype)))


def trigger_for(task: str) -> Callable[[np.ndarray], np.ndarray]:
    """A fixed trigger pattern: digits, the bottom-right 2×2 pixels at full ink; HAPT, the first 16 of 128
    time steps of every channel at +3 standard deviations (a short jolt)."""
    if task == "digits":
        def stamp(x: np.ndarray) -> np.ndarray:
            x = np.array(x, copy=True)
            x[..., [54, 55, 62, 63]] = 1.0
            return x
        return stamp
    if task.startswith("hapt"):
        def jolt(x: np.ndarray) -> np.ndarray:
            x = np.array(x, copy=True)
            x[..., :16, :] = 3.0
            return x
        return jolt
    raise ValueError(f"no backdoor trigger for task {task!r}")


def backdoor(task: str, target: int = 0, fraction: float = 0.5, boost: float = 1.0, seed: int = 0) -> Attack:
    """Backdoor: ``fraction`` of the attacker's examples get the trigger and label ``target`` (the rest stay
    clean, so that its updates look honest); with ``boost`` > 1 the delta is scaled up (model replacement,
    Bagdasaryan et al. 2020)."""
    stamp = trigger_for(task)

    def data(x: np.ndarray, y: np.ndarray) -> Examples:
        rng = np.random.default_rng(seed)
        chosen = rng.random(len(y)) < fraction
        x, y = np.array(x, copy=True), np.array(y, copy=True)
        x[chosen] = stamp(x[chosen])
        y[chosen] = target
        return x, y

    poison: Poison | None = None if boost == 1.0 else (lambda d, _: {k: boost * v for k, v in d.items()})
    return Attack(f"backdoor{f' ×{boost:g}' if boost != 1.0 else ''}", poison, data, stamp, target)


def adaptive(defence: Defence | None, buffer: int, attackers_per_buffer: int,
             scales: tuple[float, ...] = tuple(np.geomspace(0.1, 100.0, 19).tolist())) -> Attack:
    """The defence-aware attacker: it knows the combine rule (``defence``; None is the plain mean) and the
    buffer size, simulates a buffer of its colluders' honest deltas plus ``attackers_per_buffer`` copies of
    μ - γ·σ⊙sign(μ), and sends the γ that drags the combined delta furthest against μ."""
    m = max(attackers_per_buffer, 1)
    if buffer <= m:
        raise ValueError(f"a buffer of {buffer} with {m} attackers has no honest slot")

    def poison(_: Delta, c: Collusion) -> Delta:
        honest = c.stacked()
        mu, sigma = c.moments()
        held = next(iter(honest.values())).shape[0]
        slots = np.arange(buffer - m) % held  # the honest slots, from the deltas the attackers hold
        direction = _unit(mu)
        best, best_push = _against(mu, sigma, scales[0]), -np.inf
        for g in scales:
            mal = _against(mu, sigma, g)
            stacked = {k: np.concatenate([honest[k][slots], np.repeat(mal[k][None], m, 0)]) for k in mu}
            combined = (defence(stacked, np.ones(buffer, np.float32)) if defence is not None
                        else {k: v.mean(axis=0) for k, v in stacked.items()})
            push = -sum(float(np.vdot(np.asarray(combined[k]) - mu[k], direction[k])) for k in mu)
            if push > best_push:
                best, best_push = mal, push
        return best

    return Attack("adaptive", poison)


def _unit(tree: Delta) -> Delta:
    norm = float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in tree.values())))
    return {k: v / max(norm, 1e-12) for k, v in tree.items()}


def attack_success(trainer: Any, params: dict[str, Any], test: Examples, attack: Attack) -> float | None:
    """A backdoor's success rate: of the test examples not already of the target class, the fraction the
    model classifies as the target once the trigger is added (None for attacks without a trigger)."""
    if attack.trigger is None or attack.target is None:
        return None
    x, y = test
    others = y != attack.target
    batch = {"x": attack.trigger(x[others]), "y": np.full(int(others.sum()), attack.target, y.dtype)}
    return float(trainer.evaluate(params, batch)["accuracy"])

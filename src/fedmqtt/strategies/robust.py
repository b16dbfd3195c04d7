"""Robust FedBuff: keep the K buffered deltas themselves and combine them with a rule that a few poisoned
updates cannot drag far, then take the usual server optimizer step.

    Δᵢ ← w(sᵢ)·Δᵢ                                       (staleness weighting, as in FedBuff)
    mean:      Δ̄ = Σ Δᵢ / K                             (no defence; equals FedBuff)
    norm:      Δ̄ = Σ clip(Δᵢ, B) / K                    (norm bounding; B fixed, or the buffer's median ‖Δᵢ‖)
    median:    Δ̄ⱼ = median_i Δᵢⱼ                        (coordinate-wise median, Yin et al. 2018)
    trimmed:   Δ̄ⱼ = mean of Δᵢⱼ without the ⌊βK⌋ lowest and highest  (coordinate-wise trimmed mean)
    θ ← θ + optax_step(g = -Δ̄)

Each rule tolerates a minority of attackers per buffer: the median up to half, the trimmed mean up to β·K,
norm bounding only limits how much each can pull. Memory is K copies of the model.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import Array

from fedmqtt.privacy import l2_norm
from fedmqtt.strategies.base import ClientUpdate, Params, Strategy, no_flush
from fedmqtt.strategies.staleness import StalenessFn, polynomial

Rule = Literal["mean", "norm", "median", "trimmed"]
RULES: tuple[Rule, ...] = ("mean", "norm", "median", "trimmed")
#: Registry names (fedmqtt.strategies.registry) of the defended rules.
BY_NAME: dict[str, Rule] = {"fedbuff-median": "median", "fedbuff-trimmed": "trimmed", "fedbuff-norm": "norm"}


class RobustState(NamedTuple):
    deltas: Params  # each leaf stacked: (K, *shape), float32; slot i holds w(sᵢ)·Δᵢ
    filled: Array  # slots filled so far
    opt_state: optax.OptState


def combine(deltas: Params, rule: Rule, trim: float = 0.2, max_norm: float | None = None) -> Params:
    """Combine stacked deltas (leading axis K) into one with ``rule``; pure and jittable.

    >>> import jax.numpy as jnp
    >>> d = {"w": jnp.array([[1.0], [2.0], [100.0]])}
    >>> float(combine(d, "median")["w"][0]), float(combine(d, "mean")["w"][0])
    (2.0, 34.333...)
    """
    if rule == "mean":
        return jax.tree.map(lambda d: jnp.mean(d, axis=0), deltas)
    if rule == "median":
        return jax.tree.map(lambda d: jnp.median(d, axis=0), deltas)
    if rule == "trimmed":
        k = jax.tree.leaves(deltas)[0].shape[0]
        cut = int(trim * k)
        if 2 * cut >= k:
            raise ValueError(f"trim {trim} leaves nothing of a buffer of {k}")
        return jax.tree.map(lambda d: jnp.mean(jnp.sort(d, axis=0)[cut : k - cut], axis=0), deltas)
    if rule == "norm":
        norms = jax.vmap(l2_norm)(deltas)
        bound = jnp.median(norms) if max_norm is None else jnp.float32(max_norm)
        scale = jnp.minimum(1.0, bound / jnp.maximum(norms, 1e-12))
        return jax.tree.map(lambda d: jnp.mean(d * scale.reshape((-1,) + (1,) * (d.ndim - 1)), axis=0),
                            deltas)
    raise ValueError(f"unknown robust rule {rule!r}; choose one of {', '.join(RULES)}")


def robust_fedbuff(
    buffer_size: int = 10,
    rule: Rule = "median",
    trim: float = 0.2,
    max_norm: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
    weighting: StalenessFn | None = None,
    name: str | None = None,
) -> Strategy:
    """FedBuff over a buffer of K deltas combined by ``rule`` (mean, norm, median, trimmed).

    ``trim`` is β of the trimmed mean (fraction cut at each end); ``max_norm`` is the norm bound B (None: the
    buffer's median norm, which adapts to the model and the learning rate).
    """
    if buffer_size < 1:
        raise ValueError("FedBuff buffer size K must be >= 1")
    if rule not in RULES:
        raise ValueError(f"unknown robust rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "trimmed" and not 0 <= 2 * int(trim * buffer_size) < buffer_size:
        raise ValueError(f"trim {trim} leaves nothing of a buffer of {buffer_size}")
    opt = optimizer or optax.sgd(1.0)
    w = weighting or polynomial(0.5)

    def init(params: Params) -> RobustState:
        slots = jax.tree.map(lambda x: jnp.zeros((buffer_size, *jnp.shape(x)), jnp.float32), params)
        return RobustState(slots, jnp.zeros((), jnp.int32), opt.init(params))

    def apply(params: Params, update: ClientUpdate, state: RobustState) -> tuple[Params, RobustState, Array]:
        weight = w(update.staleness)
        deltas = jax.tree.map(lambda s, d: s.at[state.filled].set(weight * jnp.asarray(d, jnp.float32)),
                              state.deltas, update.params)
        state = state._replace(deltas=deltas, filled=state.filled + 1)
        stepped = state.filled >= buffer_size
        params, state = jax.lax.cond(stepped, _step, lambda p, s: (p, s), params, state)
        return params, state, stepped

    def _step(params: Params, state: RobustState) -> tuple[Params, RobustState]:
        agg = combine(state.deltas, rule, trim, max_norm)
        grads = jax.tree.map(lambda d, p: (-d).astype(p.dtype), agg, params)
        updates, opt_state = opt.update(grads, state.opt_state, params)
        return optax.apply_updates(params, updates), state._replace(filled=jnp.zeros_like(state.filled),
                                                                    opt_state=opt_state)

    return Strategy(name or f"fedbuff-{rule}", "delta", "async", init, jax.jit(apply), no_flush)

"""Robust FedBuff: keep the K buffered deltas themselves and combine them with a rule that a few poisoned
updates cannot drag far, then take the usual server optimizer step.

    wᵢ = w(sᵢ)                                          (staleness weight, as in FedBuff)
    mean:      Δ̄ = Σ wᵢΔᵢ / K                           (no defence; equals FedBuff)
    norm:      Δ̄ = Σ clip(wᵢΔᵢ, B) / K                  (norm bounding; B fixed, or the buffer's median norm)
    median:    Δ̄ⱼ = median_i wᵢΔᵢⱼ                      (coordinate-wise median, Yin et al. 2018)
    trimmed:   Δ̄ⱼ = mean of wᵢΔᵢⱼ without the ⌊βK⌋ lowest and highest  (coordinate-wise trimmed mean)
    krum:      S = the K - f deltas with the lowest Krum scores, f = ⌊βK⌋, score = Σ ‖Δᵢ - Δⱼ‖² over i's
               K - f - 2 nearest neighbours (Multi-Krum, Blanchard et al. 2017);  Δ̄ = Σ_S wᵢΔᵢ / |S|
    outlier:   m = coordinate-wise median of the Δᵢ, d̃ = median ‖Δᵢ - m‖;
               S = {i : ‖Δᵢ - m‖ <= spread·d̃};  Δ̄ = Σ_S wᵢΔᵢ / |S|
    θ ← θ + optax_step(g = -Δ̄)

Multi-Krum and the outlier filter choose on the deltas as sent (before weighting, which would shrink a
stale attacker into the honest range) and average the chosen ones with their weights. Each rule tolerates a
minority of attackers per buffer: the median and the outlier filter up to half, the trimmed mean β·K,
Multi-Krum f (K >= 2f + 3); norm bounding only limits how much each can pull. The median and Multi-Krum pay
a bias on non-IID data (they prefer the typical honest deltas and lose the unusual ones); the outlier filter
drops only what stands out, so it keeps nearly all of FedBuff's accuracy (docs/benchmarks.md). Memory is
K copies of the model.
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

Rule = Literal["mean", "norm", "median", "trimmed", "krum", "outlier"]
RULES: tuple[Rule, ...] = ("mean", "norm", "median", "trimmed", "krum", "outlier")
#: Registry names (fedmqtt.strategies.registry) of the defended rules.
BY_NAME: dict[str, Rule] = {"fedbuff-median": "median", "fedbuff-trimmed": "trimmed", "fedbuff-norm": "norm",
                            "fedbuff-krum": "krum", "fedbuff-outlier": "outlier"}


class RobustState(NamedTuple):
    deltas: Params  # each leaf stacked: (K, *shape), float32; slot i holds Δᵢ as its agent sent it
    weights: Array  # (K,): slot i's staleness weight w(sᵢ)
    filled: Array  # slots filled so far
    opt_state: optax.OptState


def combine(deltas: Params, rule: Rule, trim: float = 0.2, max_norm: float | None = None,
            weights: Array | None = None, spread: float = 3.0) -> Params:
    """Combine stacked deltas (leading axis K) into one with ``rule``; pure and jittable.

    ``weights`` (shape (K,), default all 1) are the staleness weights; every rule combines the weighted
    deltas wᵢ·Δᵢ, and the outlier filter decides what to drop on the deltas as sent, before weighting.

    >>> import jax.numpy as jnp
    >>> d = {"w": jnp.array([[1.0], [2.0], [100.0]])}
    >>> float(combine(d, "median")["w"][0]), float(combine(d, "mean")["w"][0])
    (2.0, 34.333...)
    """
    k = jax.tree.leaves(deltas)[0].shape[0]
    w = jnp.ones((k,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if rule == "outlier":
        return _outlier_filter(deltas, w, spread)
    if rule == "krum":
        return _multi_krum(deltas, w, int(trim * k))
    deltas = jax.tree.map(lambda d: d * w.reshape((-1,) + (1,) * (d.ndim - 1)), deltas)
    if rule == "mean":
        return jax.tree.map(lambda d: jnp.mean(d, axis=0), deltas)
    if rule == "median":
        return jax.tree.map(lambda d: jnp.median(d, axis=0), deltas)
    if rule == "trimmed":
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


def _mean_of(deltas: Params, weights: Array, chosen: Array) -> Params:
    """Σ wᵢΔᵢ / |chosen| over the chosen slots (a boolean mask of shape (K,))."""
    w = jnp.where(chosen, weights, 0.0)
    return jax.tree.map(lambda d: jnp.tensordot(w, d, axes=1) / jnp.maximum(jnp.sum(chosen), 1), deltas)


def _gram(a: Params, b: Params) -> Array:
    """⟨aᵢ, bⱼ⟩ over every leaf, for stacked pytrees a (K, ...) and b (M, ...): a (K, M) matrix."""
    return sum((jnp.reshape(x, (x.shape[0], -1)) @ jnp.reshape(y, (y.shape[0], -1)).T
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)),
               start=jnp.zeros(()))


def _multi_krum(deltas: Params, weights: Array, f: int) -> Params:
    k = jax.tree.leaves(deltas)[0].shape[0]
    if k < 2 * f + 3:
        raise ValueError(f"Multi-Krum needs K >= 2f + 3 (K = {k}, f = {f})")
    # centred first: pairwise distances are unchanged, and ‖a‖² + ‖b‖² - 2⟨a, b⟩ loses less to rounding
    centred = jax.tree.map(lambda d: d - jnp.mean(d, axis=0, keepdims=True), deltas)
    g = _gram(centred, centred)
    sq = jnp.diag(g)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2 * g, 0.0) + jnp.diag(jnp.full((k,), jnp.inf))
    scores = jnp.sum(jnp.sort(dist, axis=1)[:, : k - f - 2], axis=1)
    chosen = jnp.zeros((k,), bool).at[jnp.argsort(scores)[: k - f]].set(True)
    return _mean_of(deltas, weights, chosen)


def _outlier_filter(deltas: Params, weights: Array, spread: float) -> Params:
    center = jax.tree.map(lambda d: jnp.median(d, axis=0)[None], deltas)
    dist = jax.vmap(l2_norm)(jax.tree.map(jnp.subtract, deltas, center))  # ‖Δᵢ - m‖, computed directly
    keep = dist <= spread * jnp.median(dist)  # spread >= 1: the median-distance delta itself always stays
    return _mean_of(deltas, weights, keep)


def robust_fedbuff(
    buffer_size: int = 10,
    rule: Rule = "median",
    trim: float = 0.2,
    max_norm: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
    weighting: StalenessFn | None = None,
    name: str | None = None,
    spread: float = 3.0,
) -> Strategy:
    """FedBuff over a buffer of K deltas combined by ``rule`` (mean, norm, median, trimmed, krum, outlier).

    ``trim`` is β of the trimmed mean (fraction cut at each end) and of Multi-Krum (f = ⌊βK⌋); ``max_norm``
    is the norm bound B (None: the buffer's median norm, which adapts to the model and the learning rate);
    ``spread`` (>= 1) is the outlier filter's cut, in median distances from the coordinate-wise median.
    """
    if buffer_size < 1:
        raise ValueError("FedBuff buffer size K must be >= 1")
    if rule not in RULES:
        raise ValueError(f"unknown robust rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "trimmed" and not 0 <= 2 * int(trim * buffer_size) < buffer_size:
        raise ValueError(f"trim {trim} leaves nothing of a buffer of {buffer_size}")
    if rule == "krum" and buffer_size < 2 * int(trim * buffer_size) + 3:
        raise ValueError(f"Multi-Krum needs K >= 2f + 3 (K = {buffer_size}, f = {int(trim * buffer_size)})")
    if rule == "outlier" and not spread >= 1.0:
        raise ValueError(f"the outlier filter's spread must be >= 1 (got {spread}): below 1 it can keep nothing")
    opt = optimizer or optax.sgd(1.0)
    w = weighting or polynomial(0.5)

    def init(params: Params) -> RobustState:
        slots = jax.tree.map(lambda x: jnp.zeros((buffer_size, *jnp.shape(x)), jnp.float32), params)
        return RobustState(slots, jnp.zeros((buffer_size,), jnp.float32), jnp.zeros((), jnp.int32),
                           opt.init(params))

    def apply(params: Params, update: ClientUpdate, state: RobustState) -> tuple[Params, RobustState, Array]:
        deltas = jax.tree.map(lambda s, d: s.at[state.filled].set(jnp.asarray(d, jnp.float32)),
                              state.deltas, update.params)
        weights = state.weights.at[state.filled].set(w(update.staleness))
        state = state._replace(deltas=deltas, weights=weights, filled=state.filled + 1)
        stepped = state.filled >= buffer_size
        params, state = jax.lax.cond(stepped, _step, lambda p, s: (p, s), params, state)
        return params, state, stepped

    def _step(params: Params, state: RobustState) -> tuple[Params, RobustState]:
        agg = combine(state.deltas, rule, trim, max_norm, state.weights, spread)
        grads = jax.tree.map(lambda d, p: (-d).astype(p.dtype), agg, params)
        updates, opt_state = opt.update(grads, state.opt_state, params)
        return optax.apply_updates(params, updates), state._replace(filled=jnp.zeros_like(state.filled),
                                                                    opt_state=opt_state)

    return Strategy(name or f"fedbuff-{rule}", "delta", "async", init, jax.jit(apply), no_flush)

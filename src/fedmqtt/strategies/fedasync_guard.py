"""FedAsync with a guard: each arriving delta is judged against a window of the last W deltas it accepted,
clipped, and then mixed in (the staleness-aware rule of :func:`fedmqtt.strategies.combine.guard`, for a
strategy that has no buffer to compare an update with).

    s = version - base,  w = w(s),  α_t = α·w
    window: the last W accepted deltas as sent, m their coordinate-wise median, d̃ the median of their
            distances to m, ñ the median of their norms, w̃ the median of their weights;  r = w̃ / w
    accept  ‖Δ - m‖ <= spread·d̃·max(r, 1/spread)      (every update while the window holds fewer than 3)
    Δ'    = clip(Δ, ñ·r), then each coordinate held within mⱼ ± spread·MADⱼ (the window's median absolute
            deviation)
    x ← x + α_t · Δ'

It works on deltas, so an accepted update moves the current model by α_t·Δ: for an update on the current
version this is FedAsync's mix x + α(x_new - x); a stale one's delta is added to the current model
instead of pulling it back towards its old base. A refused delta takes no step (no new version) and does
not enter the window, so poisoned deltas cannot drag the reference. The window is state (W copies of the
model), so the strategy stays a pure function.

>>> import jax.numpy as jnp
>>> s = fedasync_guard(alpha=0.5, window=4)
>>> st = s.init({"w": jnp.zeros(2)})
>>> x, st, stepped = s.apply({"w": jnp.zeros(2)}, ClientUpdate({"w": jnp.ones(2)}, 0, 1), st)
>>> bool(stepped), x["w"].tolist()
(True, [0.5, 0.5])
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from fedmqtt.strategies.base import ClientUpdate, Params, Strategy, no_flush
from fedmqtt.strategies.combine import guard_bounds, reference
from fedmqtt.strategies.staleness import StalenessFn, polynomial

WARM_UP = 3  # deltas accepted unjudged while the window fills


class GuardState(NamedTuple):
    window: Params  # each leaf (W, *shape): the last accepted deltas, as sent
    weights: Array  # (W,) their staleness weights
    filled: Array  # (W,) bool
    next: Array  # slot the next accepted delta goes to
    refused: Array  # deltas refused so far


def fedasync_guard(alpha: float = 0.6, weighting: StalenessFn | None = None, window: int = 20,
                   spread: float = 3.0, name: str = "fedasync-guard") -> Strategy:
    """FedAsync on deltas with a window of ``window`` accepted deltas to judge each new one against."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError("FedAsync alpha must be in (0, 1]")
    if window < WARM_UP or not spread >= 1.0:
        raise ValueError(f"the guard needs a window of at least {WARM_UP} and a spread >= 1")
    w = weighting or polynomial(0.5)

    def init(params: Params) -> GuardState:
        slots = jax.tree.map(lambda x: jnp.zeros((window, *jnp.shape(x)), jnp.float32), params)
        return GuardState(slots, jnp.ones((window,), jnp.float32), jnp.zeros((window,), bool),
                          jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def apply(params: Params, update: ClientUpdate, state: GuardState) -> tuple[Params, GuardState, Array]:
        delta = jax.tree.map(lambda d: jnp.asarray(d, jnp.float32), update.params)
        weight = w(update.staleness)
        held = state.filled
        nan_out = jnp.where(held, 0.0, jnp.nan)  # empty slots are NaN, so that the medians skip them
        recent = jax.tree.map(lambda s: s + nan_out.reshape((-1,) + (1,) * (s.ndim - 1)), state.window)
        ref = reference(recent, state.weights + nan_out)
        keep, bounded = guard_bounds(jax.tree.map(lambda d: d[None], delta), weight[None], ref, spread)
        judged = jnp.sum(held) >= WARM_UP
        accept = ~judged | keep[0]
        applied = jax.tree.map(lambda b, d: jnp.where(judged, b[0], d), bounded, delta)
        rate = jnp.where(accept, alpha * weight, 0.0)
        params = jax.tree.map(lambda x, d: (x + rate * d).astype(x.dtype), params, applied)
        slot = state.next
        window_ = jax.tree.map(lambda s, d: jnp.where(accept, s.at[slot].set(d), s), state.window, delta)
        state = GuardState(window_, jnp.where(accept, state.weights.at[slot].set(weight), state.weights),
                           jnp.where(accept, held.at[slot].set(True), held),
                           jnp.where(accept, (slot + 1) % window, slot), state.refused + (~accept))
        return params, state, accept

    return Strategy(name, "delta", "async", init, jax.jit(apply), no_flush)

"""Synchronous FedAvg (McMahan et al., 2017), the baseline: one cohort per round, then one average.

The aggregator owns the round (publish, wait for the cohort or the deadline, flush); this module only
accumulates and averages:

    weights form:  θ = Σ nᵢ θᵢ / Σ nᵢ
    delta form:    θ ← θ + η · mean Δᵢ
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from fedmqtt.strategies.base import ClientUpdate, Params, Strategy


class FedAvgState(NamedTuple):
    total: Params  # Σ nᵢ θᵢ (weights form) or Σ Δᵢ (delta form)
    weight_sum: Array
    n: Array  # updates this round (not `count`: that would shadow tuple.count)


def fedavg(form: str = "weights", server_lr: float = 1.0, name: str = "fedavg") -> Strategy:
    """Synchronous FedAvg; ``form`` is ``weights`` (sample-weighted average) or ``delta`` (server lr η).

    >>> import jax.numpy as jnp
    >>> s = fedavg()
    >>> p = {"w": jnp.zeros(1)}
    >>> _, st, _ = s.apply(p, ClientUpdate({"w": jnp.ones(1)}, 0, 1), s.init(p))
    >>> _, st, _ = s.apply(p, ClientUpdate({"w": jnp.full(1, 4.0)}, 0, 3), st)
    >>> s.flush(p, st)[0]["w"].tolist()  # (1*1 + 3*4) / 4
    [3.25]
    """
    if form not in ("weights", "delta"):
        raise ValueError("fedavg form must be 'weights' or 'delta'")
    by_samples = form == "weights"

    def init(params: Params) -> FedAvgState:
        zeros = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), params)
        return FedAvgState(zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

    def apply(params: Params, update: ClientUpdate, state: FedAvgState) -> tuple[Params, FedAvgState, Array]:
        weight = jnp.asarray(update.num_samples, jnp.float32) if by_samples else jnp.float32(1.0)
        total = jax.tree.map(lambda t, u: t + weight * u, state.total, update.params)
        return params, FedAvgState(total, state.weight_sum + weight, state.n + 1), jnp.bool_(False)

    def flush(params: Params, state: FedAvgState) -> tuple[Params, FedAvgState, Array]:
        def step(p: Params, s: FedAvgState) -> Params:
            mean = jax.tree.map(lambda t: t / jnp.maximum(s.weight_sum, 1e-12), s.total)
            if by_samples:
                return jax.tree.map(lambda m, x: m.astype(x.dtype), mean, p)
            return jax.tree.map(lambda x, m: (x + server_lr * m).astype(x.dtype), p, mean)

        stepped = state.n > 0
        params = jax.lax.cond(stepped, step, lambda p, s: p, params, state)
        return params, init(params), stepped

    return Strategy(name, "weights" if by_samples else "delta", "sync", init, jax.jit(apply), jax.jit(flush))

"""FedAsync (Xie, Koyejo, Gupta 2019): mix every arriving model into the global one at once.

    s = version - base_version,  α_t = α · w(s),  x ← (1 - α_t) · x + α_t · x_new
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedmqtt.strategies.base import ClientUpdate, EmptyState, Params, Strategy, no_flush
from fedmqtt.strategies.staleness import StalenessFn, polynomial


def fedasync(alpha: float = 0.6, weighting: StalenessFn | None = None, name: str = "fedasync") -> Strategy:
    """FedAsync with mixing rate ``alpha`` (paper default 0.6) and staleness weighting (default (s+1)^-0.5).

    >>> import jax.numpy as jnp
    >>> s = fedasync(alpha=0.5)
    >>> x, _, _ = s.apply({"w": jnp.zeros(2)}, ClientUpdate({"w": jnp.ones(2)}, 0, 1), s.init(None))
    >>> x["w"].tolist()
    [0.5, 0.5]
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError("FedAsync alpha must be in (0, 1]")
    w = weighting or polynomial(0.5)

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def apply(params: Params, update: ClientUpdate, state: EmptyState) -> tuple[Params, EmptyState, bool]:
        a = alpha * w(update.staleness)
        new = jax.tree.map(lambda x, y: ((1.0 - a) * x + a * y).astype(x.dtype), params, update.params)
        return new, state, True

    return Strategy(name, "weights", "async", init, jax.jit(apply), no_flush)


def mixing_rate(alpha: float, weighting: StalenessFn, staleness: int) -> float:
    """α_t for one staleness; handy for reports and tests."""
    return float(alpha * jnp.asarray(weighting(staleness)))

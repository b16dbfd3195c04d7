"""FedAsync (Xie, Koyejo, Gupta 2019): mix every arriving model into the global one at once.

    s = version - base_version,  α_t = α · w(s),  x ← (1 - α_t) · x + α_t · x_new

``apply`` runs on the host in numpy, not as a jitted JAX call: one mix of two arrays is a memory-bound loop
that numpy finishes in the time JAX needs to dispatch the call and hand its result back (about 30 µs
against 130 µs at 100k parameters). It is still a pure function: every call returns new arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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

    @functools.lru_cache(maxsize=1024)
    def rate(staleness: int) -> float:
        return float(alpha * w(staleness))

    def apply(params: Params, update: ClientUpdate, state: EmptyState) -> tuple[Params, EmptyState, bool]:
        a = rate(int(np.asarray(update.staleness)))
        return jax.tree.map(lambda x, y: mix(x, y, a, update.owned), params, update.params), state, True

    return Strategy(name, "weights", "async", init, apply, no_flush)


def mix(x: Any, y: Any, a: float, reuse_y: bool = False) -> np.ndarray:
    """(1 - a) · x + a · y as a new array of x's dtype, computed as x + a · (y - x) in two passes; into y
    itself when ``reuse_y`` (y is the server's scratch, of x's dtype and writeable), saving an allocation
    and a pass over the model."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind != "f":
        mixed: np.ndarray = ((1.0 - a) * x + a * y).astype(x.dtype)
        return mixed
    if reuse_y and y.dtype == x.dtype and y.flags.writeable and y.shape == x.shape:
        reused: np.ndarray = y
        reused -= x
        reused *= x.dtype.type(a)
        reused += x
        return reused
    out: np.ndarray = np.subtract(y, x, dtype=x.dtype)
    out *= x.dtype.type(a)
    out += x
    return out


def mixing_rate(alpha: float, weighting: StalenessFn, staleness: int) -> float:
    """α_t for one staleness; handy for reports and tests."""
    return float(alpha * jnp.asarray(weighting(staleness)))

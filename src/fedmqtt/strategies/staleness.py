"""Staleness weightings w(s) from FedAsync (Xie et al., 2019), as pure functions of s = version - base.

>>> float(polynomial(0.5)(3))
0.5
>>> float(hinge(a=10.0, b=4)(6))  # 1 / (10 * (6 - 4) + 1)
0.047619...
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

StalenessFn = Callable[[ArrayLike], Array]


def constant() -> StalenessFn:
    """w(s) = 1: every update counts fully, however stale."""

    def w(s: ArrayLike) -> Array:
        return jnp.ones_like(jnp.asarray(s, jnp.float32))

    return w


def polynomial(a: float = 0.5) -> StalenessFn:
    """w(s) = (s + 1)^-a; the FedAsync paper's default is a = 0.5."""
    if a < 0:
        raise ValueError("polynomial staleness exponent a must be >= 0")

    def w(s: ArrayLike) -> Array:
        return jnp.power(jnp.asarray(s, jnp.float32) + 1.0, -a)

    return w


def hinge(a: float = 10.0, b: int = 4) -> StalenessFn:
    """w(s) = 1 if s <= b else 1 / (a (s - b) + 1); the paper uses a = 10, b = 4."""
    if a < 0 or b < 0:
        raise ValueError("hinge parameters a and b must be >= 0")

    def w(s: ArrayLike) -> Array:
        s = jnp.asarray(s, jnp.float32)
        return jnp.where(s <= b, 1.0, 1.0 / (a * (s - b) + 1.0))

    return w


def by_name(name: str, a: float | None = None, b: int | None = None) -> StalenessFn:
    """Look a weighting up by name: ``constant``, ``polynomial`` or ``hinge``."""
    if name == "constant":
        return constant()
    if name == "polynomial":
        return polynomial(0.5 if a is None else a)
    if name == "hinge":
        return hinge(10.0 if a is None else a, 4 if b is None else b)
    raise ValueError(f"unknown staleness weighting {name!r}; choose constant, polynomial or hinge")

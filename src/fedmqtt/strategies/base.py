"""The strategy interface: a NamedTuple of pure functions on pytrees (compare optax's GradientTransformation).

A strategy never sees MQTT, time or I/O. The aggregator converts each accepted update into a
:class:`ClientUpdate` holding what the strategy ``wants`` (new weights or a delta against the base),
calls ``apply``, and bumps the global version whenever ``apply`` or ``flush`` reports a step.
State is a NamedTuple pytree, so it can be checkpointed, compared in tests and jitted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from jax import Array
from jax.typing import ArrayLike

from fedmqtt.types import Encoding, Mode

Params = Any  # a pytree of arrays; the aggregator uses a flat dict name -> array
State = Any  # a NamedTuple pytree


class ClientUpdate(NamedTuple):
    """One accepted update, in the form the strategy asked for."""

    params: Params  # new weights (wants="weights") or new-minus-base delta (wants="delta")
    staleness: ArrayLike  # s = current version - base version, >= 0
    num_samples: ArrayLike  # local examples behind the update
    owned: bool = False  # params were made for this call (the server's scratch): the strategy may write into them
    updates: int = 1  # updates this one stands for: k for a worker's combined update (strategies with ``sums``)


class Strategy(NamedTuple):
    """``apply`` returns (params, state, stepped); a step means a new global version.

    ``one_update_per_step``: the strategy's guarantees assume no agent has two updates in one step (central
    DP); the server then holds an agent's second update until the next step (fedmqtt.gate). ``sums``: ``apply``
    takes a worker's combined update (``ClientUpdate.updates`` > 1: the staleness-weighted mean of ``count``
    deltas, weighted already), as if its members had come one by one. ``report`` turns
    the state into extra metrics (central DP: ε from the accountant); the server calls it as
    ``report(state, participations)``, the most steps one device contributed to (None when not counted).
    ``sampling``: the strategy steps only on the server's clock (``flush``), and the server includes each
    arriving update with this probability (central DP with participation sampling)."""

    name: str
    wants: Encoding
    mode: Mode
    init: Callable[[Params], State]
    apply: Callable[[Params, ClientUpdate, State], tuple[Params, State, Array | bool]]
    flush: Callable[[Params, State], tuple[Params, State, Array | bool]]
    one_update_per_step: bool = False
    report: Callable[..., Mapping[str, Any]] | None = None
    sums: bool = False
    sampling: float | None = None


class EmptyState(NamedTuple):
    """State of a strategy that keeps none."""


def no_flush(params: Params, state: State) -> tuple[Params, State, bool]:
    """``flush`` for strategies that never hold updates back."""
    return params, state, False

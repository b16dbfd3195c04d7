"""When the service should call :func:`fedmqtt.core.flush`: a sync round is full or past its deadline,
updates have been held too long (central DP's gate), or a clocked step is due (participation sampling). The
core has no clock: the service passes the seconds since the last step and the agents online.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from fedmqtt.core import Rules, ServerState


class Timing(NamedTuple):
    """When a step is due before a full buffer: sync rounds, and partial steps while updates are held."""

    round_size: int | None = None  # sync: updates per round (None: agents online)
    round_fraction: float | None = None  # sync: round = the first ceil(fraction × agents online) updates
    round_deadline: float | None = 30.0  # sync: close a round after this many seconds with >= 1 update
    step_deadline: float | None = 30.0  # one update per step: with updates held, a partial step after this
    step_every: float = 10.0  # participation sampling: a step every this many seconds, whatever it holds


def flush_due(state: ServerState, r: Rules, timing: Timing, online: int, waited: float) -> bool:
    """Whether :func:`fedmqtt.core.flush` is due, ``waited`` seconds after the last step with ``online`` agents present.

    >>> import numpy as np
    >>> from fedmqtt.core import Counters, init, rules
    >>> from fedmqtt.strategies import fedavg
    >>> r = rules(fedavg(), {"w": np.zeros(1, np.float32)})
    >>> s = init(r, {"w": np.zeros(1, np.float32)}, "e")
    >>> flush_due(s._replace(counters=Counters(since_step=3)), r, Timing(round_fraction=0.5), online=6, waited=0)
    True
    """
    count = state.counters.since_step
    if r.strategy.mode == "sync":
        if count >= round_target(online, timing.round_size, timing.round_fraction):
            return True
        return bool(timing.round_deadline is not None and waited > timing.round_deadline and count)
    if r.strategy.sampling is not None:
        return waited >= timing.step_every
    deadline = timing.step_deadline
    return bool(r.gated and deadline is not None and state.gate.held and waited > deadline)


def round_target(online: int, size: int | None = None, fraction: float | None = None) -> int:
    """Sync mode: updates that close a round: ``size``, else ``ceil(fraction × online)``, else ``online``.

    >>> round_target(6, fraction=0.5), round_target(6), round_target(6, size=2)
    (3, 6, 2)
    """
    online = max(online, 1)
    if size:
        return size
    if fraction:
        return max(1, -(-int(fraction * online * 1000) // 1000))  # ceil, float-safe
    return online

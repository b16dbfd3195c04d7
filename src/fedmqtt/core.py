"""The aggregator's decisions, sans I/O: server state in, an event in, new state and effects out.

No asyncio, MQTT, clocks or files here (compare h11's ``Connection``; optax's state-as-a-pytree). The service
(aggregator.py) feeds every received update to :func:`receive`, calls :func:`flush` when a round or a step
is due, writes the ``records`` of the returned :class:`Effects` to its journal and, once they are durable,
sends the ``replies`` and publishes the new version. Recovery is :func:`replay` of those records on the
last snapshot of the state (snapshot.py); tests and the benchmark simulation drive the same functions.

An update, from bytes to a new version (:func:`receive`):

1. the topic's agent id must be an id (else it is counted as ``bad_topic``: no reply topic exists);
2. ``check_update`` decodes and checks it against the model's shape, the version and the de-duplication
   window (validation.py; each failure has its own :class:`~fedmqtt.errors.Reason`);
3. with a one-update-per-step strategy (central DP), an agent's second update in a step is held (gate.py);
   In a sync round, an agent's second update is refused (``one_per_round``): one device, one vote. A device
   over its rate or its share of the recent accepted updates is refused (admission.py).
4. it becomes what the strategy wants (weights or a delta against its base; non-finite values and the
   norm bound are checked here) and the strategy applies it;
5. the journal record, the counters and the de-duplication window follow; a step makes a new version,
   trims the history and the window, and lets held updates in.

A worker's combined update (``receive(..., combined=True)``, fedmqtt.worker) is checked the same way, then
its members (fedmqtt.members): none may have been applied before (``duplicate_member``) nor be older than the
de-duplication window; the strategy takes it as k updates (``ClientUpdate.updates``), each member enters the window, and
the per-device admission bounds do not apply (the worker, not a device, sent it).

>>> import numpy as np
>>> from fedmqtt import codec
>>> from fedmqtt.strategies import fedasync
>>> params = {"w": np.zeros(2, np.float32)}
>>> r = rules(fedasync(alpha=0.5), params)
>>> s = init(r, params, epoch="e1")
>>> up = codec.encode_update({"w": np.ones(2, np.float32)}, agent="a", update_id="u1", base_version=0,
...                          num_samples=1)
>>> s, fx = receive(s, "a", up, r)
>>> s.version, fx.replies[0].accepted, [e.kind for e in fx.records], s.params["w"].tolist()
(1, True, ['update'], [0.5, 0.5])
>>> s, fx = receive(s, "a", up, r)  # the same update again
>>> fx.replies[0].reason, fx.records
('duplicate', ())
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax.numpy as jnp
import numpy as np

from fedmqtt import admission, codec, dedup, gate, members
from fedmqtt.admission import Admission, AdmissionLimits
from fedmqtt.errors import ConfigError, InvalidUpdate, Reason, StateError
from fedmqtt.gate import Gate, GateLimits, Held
from fedmqtt.sampling import sampled
from fedmqtt.strategies.base import ClientUpdate, Strategy
from fedmqtt.timing import Timing as Timing  # when flush is due (re-exported: the service asks the core)
from fedmqtt.timing import flush_due as flush_due
from fedmqtt.timing import round_target as round_target
from fedmqtt.types import Array, is_id
from fedmqtt.validation import Checked, Reference, check_norm, check_update

Params = dict[str, Any]  # name -> jax array
_UNBOUNDED = 1 << 62


class Limits(NamedTuple):
    """What the server accepts."""

    max_staleness: int = 64  # async only; sync rounds accept base == version alone
    max_update_norm: float | None = 1e3  # bound on ‖Δ‖₂; None disables
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    dedup_capacity: int = 100_000
    one_update_per_step: bool = False  # also on when the strategy asks for it (central DP)
    max_participations: int | None = None  # central DP: steps one device may take part in (its privacy budget)
    held: GateLimits = GateLimits()  # bounds on updates held for the next step
    admission: AdmissionLimits = AdmissionLimits()  # per device: rate and share of accepted updates


class Rules(NamedTuple):
    """Everything fixed for a server's life: the strategy, the model's shape, the limits. Build with
    :func:`rules`."""

    strategy: Strategy
    reference: Reference
    limits: Limits
    max_staleness: int  # 0 in sync mode
    history_len: int  # past versions kept to turn deltas into weights (FedAsync, FedAvg), else 1
    gated: bool  # one update per agent per step
    sampling_key: bytes = b""  # participation sampling: the secret the server's coins are drawn from


def rules(strategy: Strategy, initial: Mapping[str, Array], limits: Limits | None = None,
          sampling_key: bytes | None = None) -> Rules:
    """The rules for ``strategy`` on a model shaped like ``initial``; ``sampling_key``: the secret a strategy
    with participation sampling draws its coins from (default: 32 bytes from the OS)."""
    lim = limits or Limits()
    sync = strategy.mode == "sync"
    gated = lim.one_update_per_step or strategy.one_update_per_step
    if lim.max_participations is not None and not gated:
        raise ConfigError("a budget of steps per device (max_participations, --dp-max-steps) counts the steps of "
                          "a gated server: use it with central DP (or one update per step)")
    if lim.max_participations is not None and strategy.sampling is not None:
        raise ConfigError("with participation sampling every step is charged to every device: a budget of steps "
                          "per device (--dp-max-steps) would not bound ε; leave it out")
    if gated and sync:
        raise ConfigError("one update per step is for asynchronous strategies; a sync round takes one update "
                          "per agent already")
    max_staleness = 0 if sync else lim.max_staleness
    ref = Reference.of({k: np.asarray(v) for k, v in initial.items()})
    changed = [k for k, (_, dtype) in ref.spec.items() if jnp.asarray(np.zeros((), dtype)).dtype != dtype]
    if changed:  # e.g. float64 without jax_enable_x64: the published model would not match its fingerprint
        raise ConfigError(f"JAX cannot hold parameters {changed[:3]} in their dtype "
                          f"({ref.spec[changed[0]][1]}); convert the model (e.g. to float32) first")
    if strategy.sampling is not None and sampling_key is None:
        sampling_key = secrets.token_bytes(32)
    return Rules(strategy, ref, lim, max_staleness, max_staleness + 1 if strategy.wants == "weights" else 1,
                 gated, sampling_key or b"")


class Counters(NamedTuple):
    accepted: int = 0
    rejected: Mapping[str, int] = {}  # by reason; never mutated: each change builds a new mapping
    staleness: Mapping[int, int] = {}  # histogram of accepted updates' staleness
    since_step: int = 0  # updates applied since the last step (a sync round's size so far)


class ServerState(NamedTuple):
    """The whole server state: a pytree of arrays and plain immutable values. A snapshot is this, serialised."""

    params: Params
    version: int
    epoch: str  # names this run of versions; kept across restarts with the state
    strategy: Any  # the strategy's state pytree
    history: Mapping[int, Params]  # versions a stale update may be based on
    seen: dedup.Seen
    gate: Gate
    counters: Counters
    admission: Admission = Admission()  # recent devices and claims (only the claims are kept in snapshots)


class Reply(NamedTuple):
    """The acknowledgement owed to an update's sender."""

    agent: str
    update_id: str  # empty when the update was too broken to carry one
    accepted: bool
    version: int
    reason: str | None = None
    detail: str | None = None
    members: tuple[str, ...] = ()  # duplicate_member: the members applied before


class Entry(NamedTuple):
    """A journal record: an accepted update as received (a device's, or a worker's combined one), or a
    flushed step."""

    kind: Literal["update", "combined", "flush"]
    agent: str = ""
    payload: bytes = b""


class Effects(NamedTuple):
    """What the service must do, in order: make ``records`` durable, then send ``replies`` and, when
    ``stepped``, publish the new version. Nothing here may be visible before its records are on disk."""

    records: tuple[Entry, ...] = ()
    replies: tuple[Reply, ...] = ()
    stepped: bool = False


def init(r: Rules, params: Mapping[str, Array], epoch: str, version: int = 0) -> ServerState:
    p = {k: jnp.asarray(v) for k, v in params.items()}
    return ServerState(p, version, epoch, r.strategy.init(p), {version: p}, dedup.Seen(), Gate(), Counters())


class _Out:
    """Effects being collected inside one call (local to the call; never part of the state)."""

    def __init__(self) -> None:
        self.records: list[Entry] = []
        self.replies: list[Reply] = []
        self.stepped = self.opened = False

    def effects(self) -> Effects:
        return Effects(tuple(self.records), tuple(self.replies), self.stepped)


# ---- events ---------------------------------------------------------------------------------------------
def receive(state: ServerState, agent: str, payload: bytes, r: Rules, now: float | None = None,
            combined: bool = False) -> tuple[ServerState, Effects]:
    """One update from ``agent`` (the id in its topic), arrived at ``now`` (seconds on any monotonic clock;
    None: the rate is not checked); ``combined``: a worker's combined update (it came on a worker's topic).
    Never raises for bad input: every rejection is a reply with a reason, counted in
    ``state.counters.rejected``."""
    if not is_id(agent):  # e.g. "$x" or 200 characters: no ack topic can be built for it
        return _count_rejection(state, Reason.BAD_TOPIC), Effects()
    out = _Out()
    state = _take(state, agent, payload, r, out, now=now, combined=combined)
    return _release(state, r, out), out.effects()


def flush(state: ServerState, r: Rules) -> tuple[ServerState, Effects]:
    """Close a sync round, take an overdue partial step, or a clocked step (participation sampling, even an
    empty one): the strategy's ``flush``."""
    params, strategy_state, stepped = r.strategy.flush(state.params, state.strategy)
    if not bool(stepped):
        return state, Effects()
    out = _Out()
    out.records.append(Entry("flush"))
    state = _advance(state._replace(strategy=strategy_state), params, r, out)
    return _release(state, r, out), out.effects()


def replay(state: ServerState, entry: Entry, r: Rules) -> ServerState:
    """Re-apply a journal record after a restart. The structural checks run again, but not the policy bounds
    (staleness, norm, size) that accepted it, so a changed limit cannot drop an acknowledged update; a record
    that no longer applies (another model or strategy) raises StateError."""
    if entry.kind == "flush":
        return flush(state, r)[0]
    out = _Out()
    state = _take(state, entry.agent, entry.payload, r, out, replaying=True, combined=entry.kind == "combined")
    bad = [x for x in out.replies if not x.accepted]
    if bad:
        raise StateError(f"a journal record of {entry.agent!r} cannot be replayed ({bad[0].reason}: "
                         f"{bad[0].detail}); was the aggregator's model or strategy changed?")
    return state


# ---- the steps of one update ----------------------------------------------------------------------------
def _take(state: ServerState, agent: str, payload: bytes, r: Rules, out: _Out, arrived: int | None = None,
          replaying: bool = False, now: float | None = None, combined: bool = False) -> ServerState:
    """Check, hold or apply one update. ``arrived``: the version at which a held update arrived (its
    staleness is judged as of then)."""
    lim = r.limits
    waited = state.version - arrived if arrived is not None else 0
    checked: Checked | None = None
    try:
        checked = check_update(payload, agent, reference=r.reference, version=state.version,
                               max_staleness=_UNBOUNDED if replaying else r.max_staleness + waited,
                               seen=state.seen, max_payload=_UNBOUNDED if replaying else lim.max_payload)
        info = checked.info
        sync = r.strategy.mode == "sync"
        carried = _members(state, checked, r) if combined else ()
        if sync and not replaying and not gate.admits(state.gate, agent):  # one device, one vote per round
            raise InvalidUpdate(Reason.ONE_PER_ROUND, f"{agent!r} already has an update in round {state.version}")
        refused = None if replaying or arrived is not None or combined else admission.check(
            state.admission, agent, now, lim.admission)
        if refused is not None:
            raise InvalidUpdate(Reason(refused), f"{agent!r} is over its {refused.split('_')[0]} bound")
        if r.gated and not replaying and not gate.admits(state.gate, agent):
            held = Held(dedup.key(agent, info.update_id), agent, payload, state.version if arrived is None
                        else arrived)
            return state._replace(gate=gate.hold(state.gate, held, lim.held))  # replied to once applied
        q = r.strategy.sampling
        if q is not None and not replaying and not sampled(r.sampling_key, state.epoch, state.version, agent, q):
            raise InvalidUpdate(Reason.NOT_SAMPLED, f"{agent!r} was not drawn for step {state.version + 1} (each "
                                                    f"device is taken with probability {q:g} per step)")
        if (r.gated and not replaying and lim.max_participations is not None
                and state.gate.taken.get(agent, 0) >= lim.max_participations):
            raise InvalidUpdate(Reason.PRIVACY_BUDGET, f"{agent!r} took part in {lim.max_participations} steps, "
                                                       "its privacy budget")
        # the maths of the update, so replayed exactly too (the recent claims are part of the snapshot)
        weight = admission.samples(state.admission, info.num_samples, lim.admission)
        update = _client_update(checked, state.history, r.strategy, None if replaying else lim.max_update_norm,
                                weight, len(carried))
        params, strategy_state, stepped = r.strategy.apply(state.params, update, state.strategy)
    except InvalidUpdate as exc:
        update_id = exc.update_id or (checked.info.update_id if checked is not None else "")
        out.replies.append(Reply(agent, update_id, False, state.version, exc.reason.value, exc.detail[:300],
                                 exc.members))
        return _count_rejection(state, exc.reason)
    # write-ahead: the record comes before any effect
    out.records.append(Entry("combined" if combined else "update", agent, payload))
    c = state.counters
    seen = dedup.add(state.seen, dedup.key(agent, info.update_id), info.base_version, lim.dedup_capacity)
    for member, update_id, base in carried:
        seen = dedup.add(seen, dedup.key(member, update_id), base, lim.dedup_capacity)
    staleness = _plus(c.staleness, [state.version - base for *_, base in carried] if combined
                      else [checked.staleness])
    count = len(carried) or 1
    state = state._replace(
        strategy=strategy_state, seen=seen,
        gate=gate.admit(state.gate, agent) if r.gated or sync else state.gate,
        admission=state.admission if combined else admission.record(state.admission, agent, now, lim.admission,
                                                                    info.num_samples),
        counters=c._replace(accepted=c.accepted + count, staleness=staleness, since_step=c.since_step + count))
    if bool(stepped):
        state = _advance(state, params, r, out)
    out.replies.append(Reply(agent, info.update_id, True, state.version))
    return state


def _members(state: ServerState, checked: Checked, r: Rules) -> tuple[members.Member, ...]:
    """A combined update's members, each new and within the de-duplication window; raises InvalidUpdate."""
    if not r.strategy.sums or r.gated or r.strategy.mode == "sync":
        raise InvalidUpdate(Reason.BAD_METADATA, f"{r.strategy.name} takes no combined updates (workers need "
                                                 "FedBuff with the mean)")
    carried = members.parse(checked.metadata, checked.info.base_version)
    old = [m for m in carried if m[2] <= state.seen.floor]
    if old:
        raise InvalidUpdate(Reason.STALE, f"member {old[0][0]}/{old[0][1]} (base {old[0][2]}) predates the "
                                          "de-duplication window")
    applied = [m for m in carried if dedup.contains(state.seen, dedup.key(m[0], m[1]), m[2])]
    if applied:
        raise InvalidUpdate(Reason.DUPLICATE_MEMBER, f"{len(applied)} of {len(carried)} members were applied "
                                                     f"before, e.g. {applied[0][0]}/{applied[0][1]}",
                            members=tuple(dedup.key(a, u) for a, u, _ in applied))
    return carried


def _client_update(checked: Checked, history: Mapping[int, Params], strategy: Strategy,
                   max_norm: float | None, num_samples: int, count: int = 0) -> ClientUpdate:
    """What the strategy wants from a checked update; raises InvalidUpdate (base_unavailable, non_finite,
    norm). numpy throughout: the strategies take numpy arrays (FedAsync and FedBuff's running sum stay on
    the host), and element-wise work here costs less than JAX dispatches."""
    info = checked.info
    base = history.get(info.base_version)
    wants_weights = strategy.wants == "weights"
    if base is None and (info.encoding == "weights" or wants_weights):
        raise InvalidUpdate(Reason.BASE_UNAVAILABLE, f"base version {info.base_version} no longer held")
    tensors = checked.tensors
    owned = False  # True when value's arrays are made here: the strategy may reuse them
    if info.encoding == "delta":
        check_norm(tensors, max_norm)
        value = tensors
        if wants_weights:
            assert base is not None
            value, owned = {k: np.add(np.asarray(base[k]), v) for k, v in tensors.items()}, True
    else:
        assert base is not None
        delta = {k: np.subtract(v, np.asarray(base[k])) for k, v in tensors.items()}
        check_norm(delta, max_norm)
        value = tensors if wants_weights else delta
    if count:  # a combined update: its members were weighed by their staleness at the worker
        return ClientUpdate(value, np.int32(0), np.float32(num_samples), owned, count)
    return ClientUpdate(value, np.int32(checked.staleness), np.float32(num_samples), owned)


def _advance(state: ServerState, params: Params, r: Rules, out: _Out) -> ServerState:
    """A step: a new version; older history and de-duplication entries go; held updates may go in."""
    version = state.version + 1
    history = dict(state.history)
    history.pop(version - r.history_len, None)  # versions are consecutive: one leaves per step
    if len(history) >= r.history_len:  # more than that (history_len changed since the snapshot)
        history = {v: p for v, p in history.items() if v > version - r.history_len}
    history[version] = params
    out.stepped = out.opened = True
    return state._replace(params=params, version=version, history=history,
                          seen=dedup.expire(state.seen, version - r.max_staleness),
                          gate=gate.advance(state.gate),
                          counters=state.counters._replace(since_step=0))


def _release(state: ServerState, r: Rules, out: _Out) -> ServerState:
    """After a step, held updates go in first, one per agent per step, oldest first."""
    while r.gated and out.opened:
        out.opened = False
        g, ready = gate.take_ready(state.gate)
        state = state._replace(gate=g)
        for h in ready:
            state = _take(state, h.agent, h.payload, r, out, arrived=h.version)
    return state


def _count_rejection(state: ServerState, reason: Reason) -> ServerState:
    c = state.counters
    rejected = dict(c.rejected)
    rejected[reason.value] = rejected.get(reason.value, 0) + 1
    return state._replace(counters=c._replace(rejected=rejected))


def _plus(hist: Mapping[int, int], keys: list[int]) -> dict[int, int]:
    """``hist`` with one more count for each of ``keys`` (one copy, however many)."""
    out = dict(hist)
    for key in keys:
        out[key] = out.get(key, 0) + 1
    return out

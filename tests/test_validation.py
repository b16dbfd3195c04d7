"""Every validation rule, through the aggregator's sans-I/O core (no broker, no asyncio)."""

from __future__ import annotations

import struct

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedmqtt import codec, core
from fedmqtt.agent import EdgeAgent
from fedmqtt.aggregator import Aggregator, AggregatorConfig
from fedmqtt.core import Entry, Limits, Reply, Rules, ServerState
from fedmqtt.errors import Reason
from fedmqtt.memory_broker import MemoryBroker
from fedmqtt.strategies import fedasync, fedbuff
from fedmqtt.strategies.base import Strategy
from fedmqtt.topics import Topics
from fedmqtt.training import Trainer
from fedmqtt.types import check_id, is_id

PARAMS = {"l/kernel": np.ones((3, 2), np.float32), "l/bias": np.zeros(2, np.float32)}
FP = codec.fingerprint(PARAMS)


class Server:
    """A core state and its rules; ``send`` feeds one update through ``core.receive``."""

    def __init__(self, max_staleness: int = 4, max_norm: float | None = 100.0, max_payload: int = 1 << 20,
                 strategy: Strategy | None = None) -> None:
        limits = Limits(max_staleness=max_staleness, max_update_norm=max_norm, max_payload=max_payload)
        self.rules: Rules = core.rules(strategy or fedasync(), PARAMS, limits)
        self.state: ServerState = core.init(self.rules, PARAMS, epoch="t")

    def receive(self, payload: bytes, agent: str = "a1") -> core.Effects:
        self.state, effects = core.receive(self.state, agent, payload, self.rules)
        return effects

    def send(self, payload: bytes, agent: str = "a1") -> Reply:
        """One update that must get exactly one reply (no gate here)."""
        effects = self.receive(payload, agent)
        assert len(effects.replies) == 1, effects
        reply = effects.replies[0]
        assert reply.agent == agent
        # write-ahead: an accepted update has its journal record, a rejected one has none
        assert effects.records == ((Entry("update", agent, payload),) if reply.accepted else ())
        return reply

    def params(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v).copy() for k, v in self.state.params.items()}


def update(tensors: dict[str, np.ndarray] | None = None, **meta: object) -> bytes:
    args: dict[str, object] = {"agent": "a1", "update_id": "u1", "base_version": 0, "num_samples": 10,
                               "encoding": "delta", "model_fingerprint": FP}
    args.update(meta)
    t = tensors if tensors is not None else {k: np.full_like(v, 0.1) for k, v in PARAMS.items()}
    return codec.encode_update(t, **args)  # type: ignore[arg-type]


def rewrite_metadata(payload: bytes, **changes: str | None) -> bytes:
    """Change raw metadata strings (None deletes the key), bypassing the encoder's own typing."""
    d = codec.decode(payload)
    meta = {k: v for k, v in {**d.metadata, **changes}.items() if v is not None}
    import safetensors.numpy

    return safetensors.numpy.save(d.tensors, metadata=meta)  # type: ignore[arg-type]


def accept(srv: Server, payload: bytes, agent: str = "a1") -> Reply:
    version, accepted = srv.state.version, srv.state.counters.accepted
    reply = srv.send(payload, agent)
    assert reply.accepted, reply
    assert (reply.reason, reply.detail) == (None, None)
    assert srv.state.counters.accepted == accepted + 1
    assert reply.version == srv.state.version == version + 1  # FedAsync: every update is a step
    return reply


def reject(srv: Server, payload: bytes, reason: Reason, topic_agent: str = "a1") -> Reply:
    """The update is refused for ``reason``, counted once under that reason alone, and changes nothing else."""
    before_params, before = srv.params(), srv.state
    reply = srv.send(payload, topic_agent)
    assert not reply.accepted
    assert reply.reason == reason.value, reply.detail
    assert reply.detail, "a rejection says how the rule was broken"
    assert reply.version == before.version
    after = srv.state
    assert dict(after.counters.rejected) == {**before.counters.rejected,
                                             reason.value: before.counters.rejected.get(reason.value, 0) + 1}
    assert (after.version, after.counters.accepted) == (before.version, before.counters.accepted)
    assert after.seen == before.seen  # a refused update is not remembered as applied
    for k, v in after.params.items():
        np.testing.assert_array_equal(np.asarray(v), before_params[k])
    return reply


def test_good_delta_is_applied_and_version_advances() -> None:
    srv = Server()
    reply = accept(srv, update())
    assert (reply.update_id, reply.version) == ("u1", 1)
    # FedAsync, s = 0: x <- 0.4 x + 0.6 (x + delta) = x + 0.6 delta
    np.testing.assert_allclose(np.asarray(srv.state.params["l/kernel"]), 1.0 + 0.06, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(srv.state.params["l/bias"]), 0.06, rtol=1e-6)
    assert srv.state.counters.rejected == {}


def test_weights_encoding_is_mixed_directly() -> None:
    srv = Server()
    weights = {k: np.full_like(v, 2.0) for k, v in PARAMS.items()}
    accept(srv, update(weights, encoding="weights"))
    np.testing.assert_allclose(np.asarray(srv.state.params["l/bias"]), 0.6 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(srv.state.params["l/kernel"]), 0.4 + 0.6 * 2.0, rtol=1e-6)


def test_oversized_payload() -> None:
    reject(Server(max_payload=100), update(), Reason.PAYLOAD_TOO_LARGE)


@pytest.mark.parametrize("payload", [b"", b"garbage" * 10, struct.pack("<Q", 1 << 62) + b"{}"])
def test_unparseable(payload: bytes) -> None:
    reply = reject(Server(), payload, Reason.MALFORMED)
    assert reply.update_id == ""  # nothing to name it by


def test_schema_version() -> None:
    reject(Server(), rewrite_metadata(update(), **{"fedmqtt.schema": "2"}), Reason.SCHEMA)


def test_kind_model_sent_as_update() -> None:
    reject(Server(), codec.encode_model(PARAMS, 0), Reason.KIND)


@pytest.mark.parametrize(
    "change",
    [{"fedmqtt.num_samples": "-3"}, {"fedmqtt.num_samples": "0"}, {"fedmqtt.base_version": "1.5"},
     {"fedmqtt.encoding": "gzip"}, {"fedmqtt.update_id": None}, {"fedmqtt.update_id": "x" * 200},
     {"fedmqtt.fingerprint": "short"}, {"fedmqtt.agent": "dev ice"}],
)
def test_bad_metadata(change: dict[str, str | None]) -> None:
    reject(Server(), rewrite_metadata(update(), **change), Reason.BAD_METADATA)


def test_spoofed_agent_id() -> None:
    reply = reject(Server(), update(agent="a2"), Reason.AGENT_MISMATCH, topic_agent="a1")
    assert reply.update_id == "u1"


def test_replayed_update_id() -> None:
    srv = Server()
    accept(srv, update())
    reject(srv, update(), Reason.DUPLICATE)
    reject(srv, update(), Reason.DUPLICATE)  # every re-send is answered, and counted, again
    # the same id from another agent is a different update
    accept(srv, update(agent="a2"), agent="a2")


def test_base_version_from_the_future() -> None:
    reject(Server(), update(base_version=5), Reason.FUTURE_BASE)
    srv = Server()
    accept(srv, update())
    accept(srv, update(update_id="u2", base_version=1))  # the current version itself is fine
    reject(srv, update(update_id="u3", base_version=3), Reason.FUTURE_BASE)  # version is 2


def test_too_stale() -> None:
    srv = Server(max_staleness=2)
    for i in range(3):
        accept(srv, update(update_id=f"g{i}", base_version=srv.state.version))
    reject(srv, update(update_id="old", base_version=0), Reason.STALE)  # staleness 3 > 2
    accept(srv, update(update_id="ok", base_version=1))  # staleness 2
    assert srv.state.counters.staleness == {0: 3, 2: 1}


def test_fingerprint_mismatch() -> None:
    reject(Server(), update(model_fingerprint="0" * 64), Reason.FINGERPRINT)


def test_missing_and_extra_tensors() -> None:
    srv = Server()
    missing = {"l/kernel": np.zeros((3, 2), np.float32)}
    reject(srv, update(missing), Reason.TENSOR_NAMES)
    extra = {**{k: np.zeros_like(v) for k, v in PARAMS.items()}, "evil": np.zeros(1, np.float32)}
    reject(srv, update(extra, update_id="u2"), Reason.TENSOR_NAMES)


def test_wrong_shape() -> None:
    t = {"l/kernel": np.zeros((2, 3), np.float32), "l/bias": np.zeros(2, np.float32)}
    reject(Server(), update(t), Reason.SHAPE)


def test_wrong_dtype() -> None:
    t = {"l/kernel": np.zeros((3, 2), np.float64), "l/bias": np.zeros(2, np.float32)}
    reject(Server(), update(t), Reason.DTYPE)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(bad: float) -> None:
    t = {k: np.zeros_like(v) for k, v in PARAMS.items()}
    t["l/kernel"][1, 1] = bad
    reject(Server(), update(t), Reason.NON_FINITE)


@pytest.mark.parametrize("max_norm", [100.0, None])
def test_non_finite_weights_encoding(max_norm: float | None) -> None:
    t = {k: np.ones_like(v) for k, v in PARAMS.items()}
    t["l/bias"][0] = np.nan
    reject(Server(max_norm=max_norm), update(t, encoding="weights"), Reason.NON_FINITE)


def test_enormous_norm() -> None:
    t = {k: np.full_like(v, 1e30) for k, v in PARAMS.items()}
    reject(Server(max_norm=100.0), update(t), Reason.NORM)
    t = {k: np.full_like(v, 50.0) for k, v in PARAMS.items()}  # finite but ‖Δ‖ ≈ 141 > 100
    reject(Server(max_norm=100.0), update(t), Reason.NORM)
    t = {k: np.full_like(v, 35.0) for k, v in PARAMS.items()}  # ‖Δ‖ = 35·√8 ≈ 99 <= 100
    accept(Server(max_norm=100.0), update(t))


def test_norm_of_weights_is_measured_against_the_base() -> None:
    # weights far from zero but close to the base (ones for the kernel, zeros for the bias): a small delta
    t = {"l/kernel": np.full((3, 2), 1.5, np.float32), "l/bias": np.full(2, 0.5, np.float32)}
    accept(Server(max_norm=2.0), update(t, encoding="weights"))
    t = {"l/kernel": np.full((3, 2), 10.0, np.float32), "l/bias": np.zeros(2, np.float32)}  # ‖Δ‖ ≈ 22
    reject(Server(max_norm=2.0), update(t, encoding="weights"), Reason.NORM)


def test_weights_on_a_base_no_longer_held() -> None:
    # FedBuff wants deltas and keeps only the current version: weights on an older base cannot be turned
    # into a delta
    srv = Server(strategy=fedbuff(1))
    srv.send(update())
    assert srv.state.version == 1
    weights = {k: np.full_like(v, 2.0) for k, v in PARAMS.items()}
    reject(srv, update(weights, update_id="w", encoding="weights", base_version=0), Reason.BASE_UNAVAILABLE)
    # a delta on the same base needs no base weights, and is applied
    assert srv.send(update(update_id="d", base_version=0)).accepted


def test_good_update_still_applied_after_rejections_and_model_finite() -> None:
    srv = Server()
    for payload in (b"junk", update(agent="zz"), update(base_version=99)):
        assert not srv.send(payload).accepted
    accept(srv, update())
    assert all(np.isfinite(np.asarray(v)).all() for v in srv.state.params.values())
    c = srv.state.counters
    assert (c.accepted, srv.state.version) == (1, 1)
    assert c.rejected == {"malformed": 1, "agent_mismatch": 1, "future_base": 1}


def test_aggregator_metrics_mirror_the_core_counters() -> None:
    agg = Aggregator(MemoryBroker().connect, PARAMS, fedasync(), AggregatorConfig(limits=Limits(max_staleness=4)))
    for payload in (b"junk", update(agent="zz"), update(base_version=99), update(), update()):
        agg.handle("a1", payload)
    m = agg.metrics()
    assert (m.accepted, m.rejected, m.version) == (1, 4, 1)
    assert m.rejected_by_reason == {"malformed": 1, "agent_mismatch": 1, "future_base": 1, "duplicate": 1}
    assert m.rejected_by_reason == dict(agg.state.counters.rejected)


def test_ack_names_the_update_when_only_its_metadata_is_bad() -> None:
    reply = reject(Server(), rewrite_metadata(update(update_id="named-1"), **{"fedmqtt.schema": "9"}), Reason.SCHEMA)
    assert reply.update_id == "named-1"
    # an id that is itself invalid is not echoed back
    reply = reject(Server(), rewrite_metadata(update(), **{"fedmqtt.update_id": "a b"}), Reason.BAD_METADATA)
    assert reply.update_id == ""


@pytest.mark.parametrize("agent", ["$evil", "x" * 200, "dev ice", ""])
def test_invalid_agent_id_in_the_topic_is_counted_not_fatal(agent: str) -> None:
    srv = Server()
    before = srv.state
    effects = srv.receive(update(agent=agent if agent else "a1"), agent)
    assert effects == core.Effects()  # no reply (no ack topic can be built), no record
    assert srv.state.counters.rejected == {"bad_topic": 1}
    assert (srv.state.version, srv.state.counters.accepted, srv.state.seen) == (0, 0, before.seen)
    srv.receive(update(agent="a1"), agent)
    assert srv.state.counters.rejected == {"bad_topic": 2}
    accept(srv, update())  # still serving
    assert srv.state.counters.rejected == {"bad_topic": 2}


def _tiny_trainer() -> Trainer:
    return Trainer(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2),
                   optax.sgd(0.1))


@pytest.mark.parametrize("bad", ["dev ice", "$evil", "a/b", "a+b", "#", "", "x" * 129, "é"])
def test_an_invalid_agent_id_is_refused_where_the_agent_is_created(bad: str) -> None:
    # Such an id once passed the topic check, and then every one of its updates failed metadata validation.
    assert not is_id(bad)
    with pytest.raises(ValueError, match="agent id"):
        check_id(bad)
    with pytest.raises(ValueError, match="agent id"):
        Topics().update(bad)
    data = (np.zeros((4, 2), np.float32), np.zeros((4, 1), np.float32))
    with pytest.raises(ValueError, match="agent id"):
        EdgeAgent(MemoryBroker().connect, bad, _tiny_trainer(), data)
    # the valid ids that are close to them are fine, end to end
    for good in ("dev-ice", "dev_ice", "x" * 128, "edge-7:a@b.c"):
        assert check_id(good) == good
        assert Topics().update(good).endswith("/" + good)
        assert EdgeAgent(MemoryBroker().connect, good, _tiny_trainer(), data).agent_id == good
        srv = Server()
        accept(srv, update(agent=good), agent=good)

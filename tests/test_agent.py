"""Agent-side handling of the retained model (no broker): versions only grow within an epoch."""

from __future__ import annotations

import numpy as np

from fedmqtt import codec
from fedmqtt.agent import EdgeAgent
from fedmqtt.memory_broker import MemoryBroker
from fedmqtt.tasks import get_task


def make_agent() -> tuple[EdgeAgent, dict[str, np.ndarray]]:
    task = get_task("digits", num_clients=2)
    trainer = task.trainer(0)
    return EdgeAgent(MemoryBroker().connect, "a-0", trainer, task.data_for(0)), trainer.initial


def model(params: dict[str, np.ndarray], version: int, epoch: str) -> bytes:
    return codec.encode_model(params, version, extra={"fedmqtt.epoch": epoch})


def test_older_retained_copy_of_the_same_epoch_is_ignored() -> None:
    agent, params = make_agent()
    agent._on_model(model(params, 5, "aaaa"))
    agent._on_model(model(params, 3, "aaaa"))
    assert agent.model is not None and agent.model.info.version == 5


def test_a_new_epoch_is_taken_even_with_a_lower_version() -> None:
    agent, params = make_agent()
    agent._on_model(model(params, 5, "aaaa"))
    agent._on_model(model(params, 0, "bbbb"))
    assert agent.model is not None and (agent.model.info.version, agent.model.info.epoch) == (0, "bbbb")


def test_incompatible_model_is_refused_with_an_error() -> None:
    agent, params = make_agent()
    other = {**params, "extra/bias": np.zeros(3, np.float32)}
    agent._on_model(model(other, 1, "aaaa"))
    assert agent.model is None
    assert agent.error is not None and "differs" in agent.error


def test_tensors_that_do_not_match_the_claimed_fingerprint_are_refused() -> None:
    agent, params = make_agent()
    name = next(iter(params))
    wrong = {**params, name: np.zeros(params[name].size + 1, params[name].dtype)}
    payload = codec.encode_model(wrong, 4, extra={"fedmqtt.fingerprint": codec.fingerprint(params)})
    agent._on_model(payload)
    assert agent.model is None and agent.error is not None


def test_acks_with_unknown_keys_still_settle_the_update() -> None:
    from fedmqtt.agent import Pending

    agent, _ = make_agent()
    agent.outbox["u-1"] = Pending(b"payload", 0.0)
    agent._on_ack_message(b'{"schema": 1, "update_id": "u-1", "status": "accepted", "version": 3, "future": [1]}')
    assert "u-1" not in agent.outbox and agent.acks["accepted"] == 1

"""The HAPT loader: where it finds the file, the per-volunteer time-ordered split, normalisation, model."""

from __future__ import annotations

import numpy as np
import pytest

from fedmqtt.errors import ConfigError
from fedmqtt.tasks import get_task
from fedmqtt.tasks.hapt import CNN1D, find_data, load_split

try:
    DATA = find_data()
except ConfigError:
    DATA = None
needs_data = pytest.mark.skipif(DATA is None, reason="HAPT data file not found (set FEDMQTT_HAPT)")


def test_missing_file_is_a_config_error(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQTT_HAPT", "/nonexistent/hapt.npz")
    with pytest.raises(ConfigError, match="HAPT data not found"):
        find_data()


@needs_data
def test_env_variable_and_option_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQTT_HAPT", str(DATA))
    assert find_data() == DATA
    monkeypatch.setenv("FEDMQTT_HAPT", "/nonexistent/hapt.npz")
    assert find_data(DATA) == DATA  # an explicit path wins over the environment


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    if DATA is None:
        pytest.skip("HAPT data file not found")
    with np.load(DATA, allow_pickle=False) as f:
        return {k: f[k] for k in ("X", "y", "client")}


@needs_data
@pytest.mark.parametrize("classes", [6, 12])
def test_split_is_per_volunteer_time_ordered_80_20(raw: dict[str, np.ndarray], classes: int) -> None:
    split = load_split(DATA, classes)
    assert len(split.train) == len(split.test) == 30
    keep = raw["y"] < classes
    x, y, client = raw["X"][keep], raw["y"][keep].astype(np.int32), raw["client"][keep]
    for v in (1, 17, 30):
        idx = np.flatnonzero(client == v)
        cut = round(len(idx) * 0.8)
        (xtr, ytr), (xte, yte) = split.train[v - 1], split.test[v - 1]
        assert len(xtr) == cut and len(xte) == len(idx) - cut
        np.testing.assert_array_equal(ytr, y[idx[:cut]])  # the first 80 % in recording order ...
        np.testing.assert_array_equal(yte, y[idx[cut:]])  # ... and the last 20 %
        np.testing.assert_allclose(xte * split.std + split.mean, x[idx[cut:]], atol=1e-4)
    assert sum(len(t[1]) for t in split.train) + sum(len(t[1]) for t in split.test) == int(keep.sum())
    labels = np.concatenate([t[1] for t in split.train])
    assert labels.max() == classes - 1 and labels.min() == 0


@needs_data
def test_normalisation_uses_training_parts_only() -> None:
    split = load_split(DATA, 6)
    train = np.concatenate([x for x, _ in split.train])
    np.testing.assert_allclose(train.mean(axis=(0, 1)), 0.0, atol=1e-3)
    np.testing.assert_allclose(train.std(axis=(0, 1)), 1.0, atol=1e-3)
    assert split.mean.shape == split.std.shape == (6,)


@needs_data
def test_task_shapes_and_model_forward() -> None:
    task = get_task("hapt")
    assert task.name == "hapt6" and task.num_clients == 30
    x, _ = task.client_data(0)
    assert x.shape[1:] == (128, 6) and x.dtype == np.float32
    trainer = task.trainer(0)
    assert sum(v.size for v in trainer.initial.values()) < 20_000  # small enough for 30 agents on 2 cores
    metrics = task.evaluate_fn(trainer)(trainer.initial)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert get_task("hapt12").name == "hapt12"


@needs_data
def test_local_training_learns_one_volunteer() -> None:
    import asyncio

    task = get_task("hapt")
    trainer = task.trainer(0)
    data = task.data_for(0)
    params = trainer.initial
    x, y = task.client_data(0)
    before = trainer.evaluate(params, {"x": x, "y": y})["loss"]
    for _ in range(5):
        params, _ = trainer.train(params, asyncio.run(data.take(10)))
    assert trainer.evaluate(params, {"x": x, "y": y})["loss"] < before


def test_cnn_output_shape() -> None:
    import jax.numpy as jnp
    from flax import nnx

    out = CNN1D(classes=12, rngs=nnx.Rngs(0))(jnp.zeros((4, 128, 6)))
    assert out.shape == (4, 12)

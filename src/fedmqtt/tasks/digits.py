"""The default task: the 8x8 digits bundled with fedmqtt (1,797 images, no download; ``fedmqtt/data``) with
a small MLP."""

from __future__ import annotations

from importlib import resources

import numpy as np
from flax import nnx
from jax import Array as JaxArray

from fedmqtt.data import dirichlet_partition, iid_partition
from fedmqtt.tasks.base import Task, classification_loss, classification_metrics


class MLP(nnx.Module):
    """64 -> hidden -> hidden -> 10 with ReLU."""

    def __init__(self, din: int = 64, hidden: int = 64, classes: int = 10, *, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: JaxArray) -> JaxArray:
        return self.out(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


class Softmax(nnx.Module):
    """64 -> 10: multinomial logistic regression (650 parameters)."""

    def __init__(self, din: int = 64, classes: int = 10, *, rngs: nnx.Rngs) -> None:
        self.out = nnx.Linear(din, classes, rngs=rngs)

    def __call__(self, x: JaxArray) -> JaxArray:
        return self.out(x)


def stratified_test(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A mask choosing ``fraction`` of each class at random (the held-out test set).

    >>> int(stratified_test(np.repeat(np.arange(3), 10), 0.2, 0).sum())
    6
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        mask[rng.choice(idx, round(fraction * len(idx)), replace=False)] = True
    return mask


def digits_task(num_clients: int = 8, partition: str = "iid", alpha: float = 0.5, seed: int = 0,
                hidden: int = 64) -> Task:
    """Digits split 80/20 (stratified); the 80 % is sharded across ``num_clients`` IID or Dirichlet(alpha).
    ``hidden`` is the MLP's width; 0 makes the model a logistic regression (a smaller model needs less DP
    noise for the same signal)."""
    with resources.files("fedmqtt").joinpath("data/digits.npz").open("rb") as f, np.load(f) as d:
        x = (d["x"] / 16.0).astype(np.float32)
        y = d["y"].astype(np.int32)
    test = stratified_test(y, 0.2, seed)
    x_tr, x_te, y_tr, y_te = x[~test], x[test], y[~test], y[test]
    if partition == "iid":
        shards = iid_partition(len(y_tr), num_clients, seed)
    elif partition == "dirichlet":
        shards = dirichlet_partition(y_tr, num_clients, alpha, seed)
    else:
        raise ValueError(f"unknown partition {partition!r}; choose iid or dirichlet")

    return Task(
        name="digits" if hidden else "digits-linear",
        make_model=lambda s: MLP(hidden=hidden, rngs=nnx.Rngs(s)) if hidden else Softmax(rngs=nnx.Rngs(s)),
        loss_fn=classification_loss,
        metrics_fn=classification_metrics,
        client_data=lambda i: (x_tr[shards[i % num_clients]], y_tr[shards[i % num_clients]]),
        test_data=(x_te, y_te),
        num_clients=num_clients,
    )

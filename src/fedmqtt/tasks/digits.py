"""The default task: scikit-learn's bundled 8x8 digits (1,797 images, no download) with a small MLP."""

from __future__ import annotations

import numpy as np
from flax import nnx
from jax import Array as JaxArray
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

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


def digits_task(num_clients: int = 8, partition: str = "iid", alpha: float = 0.5, seed: int = 0) -> Task:
    """Digits split 80/20 (stratified); the 80 % is sharded across ``num_clients`` IID or Dirichlet(alpha)."""
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    if partition == "iid":
        shards = iid_partition(len(y_tr), num_clients, seed)
    elif partition == "dirichlet":
        shards = dirichlet_partition(y_tr, num_clients, alpha, seed)
    else:
        raise ValueError(f"unknown partition {partition!r}; choose iid or dirichlet")

    return Task(
        name="digits",
        make_model=lambda s: MLP(rngs=nnx.Rngs(s)),
        loss_fn=classification_loss,
        metrics_fn=classification_metrics,
        client_data=lambda i: (x_tr[shards[i % num_clients]], y_tr[shards[i % num_clients]]),
        test_data=(x_te, y_te),
        num_clients=num_clients,
    )

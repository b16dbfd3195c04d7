"""Local training and evaluation of a Flax NNX model, and its parameters as flat named arrays.

The graph definition stays on each node; only ``nnx.Param`` leaves cross the wire, flattened to
``{"path/to/leaf": array}`` (``nnx.state(model, nnx.Param)`` → ``nnx.to_pure_dict`` → joined by "/").
One local round (E optimizer steps on E stacked batches) is a single jitted ``lax.scan``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedmqtt.errors import IncompatibleModel
from fedmqtt.types import Array, FlatParams

Batch = Any  # a pytree of arrays with a leading batch axis
LossFn = Callable[[nnx.Module, Batch], jax.Array]
MetricsFn = Callable[[nnx.Module, Batch], Mapping[str, jax.Array]]


def _key_name(key: object) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten(tree: Any) -> dict[str, Array]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (as numpy arrays)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): np.asarray(leaf) for path, leaf in leaves}


def model_params(model: nnx.Module) -> dict[str, Array]:
    """A model's trainable parameters as flat named numpy arrays."""
    return flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


class Trainer:
    """Trains copies of one model architecture from given flat parameters.

    ``prox_rho`` adds FedAsync's proximal term ρ/2·‖x − x_base‖² to the local loss (0 turns it off).
    ``compiler_options`` go to XLA when the local round and the metrics are compiled (``jax.jit``); where this
    JAX's XLA does not know one of them, both are compiled without any.
    """

    def __init__(
        self,
        model: nnx.Module,
        loss_fn: LossFn,
        optimizer: optax.GradientTransformation,
        metrics_fn: MetricsFn | None = None,
        prox_rho: float = 0.0,
        compiler_options: Mapping[str, Any] | None = None,
    ) -> None:
        parts: tuple[Any, ...] = nnx.split(model, nnx.Param, ...)
        self.graphdef: Any = parts[0]
        self.rest: Any = parts[2]
        params = parts[1]
        self.initial = flatten(nnx.to_pure_dict(params))
        self.names = frozenset(self.initial)
        # nnx.State flattens to its arrays in the same (sorted-path) order as its pure dict.
        self._order = list(self.initial)
        self._treedef = jax.tree_util.tree_structure(params)
        self.optimizer = optimizer
        graphdef, rest = self.graphdef, self.rest

        def loss_of(p: Any, base: Any, batch: Batch) -> jax.Array:
            m = nnx.merge(graphdef, p, rest)
            loss = loss_fn(m, batch)
            if prox_rho:
                sq = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(base),
                                                                strict=True))
                loss = loss + 0.5 * prox_rho * sq
            return loss

        def local_round(p: Any, batches: Batch) -> tuple[Any, jax.Array]:
            base = p
            opt_state = optimizer.init(p)

            def step(carry: tuple[Any, Any], batch: Batch) -> tuple[tuple[Any, Any], jax.Array]:
                params, state = carry
                loss, grads = jax.value_and_grad(loss_of)(params, base, batch)
                updates, state = optimizer.update(grads, state, params)
                return (optax.apply_updates(params, updates), state), loss

            (p, _), losses = jax.lax.scan(step, (p, opt_state), batches)
            return p, jnp.mean(losses)

        self._round = _jit(local_round, compiler_options)
        self._metrics = None
        if metrics_fn is not None:
            def evaluate(p: Any, batch: Batch) -> Mapping[str, jax.Array]:
                return metrics_fn(nnx.merge(graphdef, p, rest), batch)

            self._metrics = _jit(evaluate, compiler_options)

    def _state_of(self, flat: FlatParams) -> Any:
        missing = self.names.symmetric_difference(flat)
        if missing:
            raise IncompatibleModel(f"parameter names differ from the local model: {sorted(missing)[:5]}")
        # device_put, not jnp.asarray: the latter compiles a copy kernel per tensor shape on first use
        return jax.tree_util.tree_unflatten(self._treedef, [jax.device_put(flat[n]) for n in self._order])

    def _flat_of(self, state: Any) -> dict[str, Array]:
        return dict(zip(self._order, (np.asarray(x) for x in jax.tree_util.tree_leaves(state)), strict=True))

    def train(self, flat: FlatParams, batches: Batch) -> tuple[dict[str, Array], float]:
        """Run one local round (one step per leading slice of ``batches``); returns new params and mean loss."""
        new, loss = self._round(self._state_of(flat), batches)
        return self._flat_of(new), float(loss)

    def evaluate(self, flat: FlatParams, batch: Batch) -> dict[str, float]:
        """Metrics of ``flat`` on one (large) batch, e.g. the held-out test set."""
        if self._metrics is None:
            raise ValueError("this Trainer has no metrics_fn")
        out = self._metrics(self._state_of(flat), batch)
        return {k: float(v) for k, v in out.items()}

    def to_model(self, flat: FlatParams) -> nnx.Module:
        """A fresh module holding ``flat``, for inference on the device."""
        module: nnx.Module = nnx.merge(self.graphdef, self._state_of(flat), self.rest)
        return module


def _jit(fn: Callable[..., Any], options: Mapping[str, Any] | None) -> Callable[..., Any]:
    """``jax.jit(fn)`` with XLA ``options``; without them if the first compilation refuses one (an older XLA)."""
    plain = jax.jit(fn)
    if not options:
        return plain
    tuned = [jax.jit(fn, compiler_options=dict(options))]

    def call(*args: Any) -> Any:
        if tuned:
            try:
                return tuned[0](*args)
            except Exception as exc:  # JaxRuntimeError (XlaRuntimeError before JAX 0.4.36): not importable by one name
                if "compile option" not in str(exc):
                    raise
                tuned.clear()
        return plain(*args)

    return call


def zero_model(make: Callable[[], nnx.Module]) -> nnx.Module:
    """The module ``make()`` builds, with zeros for its parameters; nothing is computed or compiled.

    For a device that only ever trains the aggregator's model: its own initial values would never be used,
    and initialising them eagerly compiles a kernel per random-number operation and shape (14 for the
    digits MLP, about 30 MB of a device's memory). A module that holds state other than parameters (batch
    statistics, counters) is built by ``make()`` as it is, since zeros may not be a valid value there.

    >>> model = zero_model(lambda: nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> float(abs(model.kernel[...]).sum()), model.kernel.shape
    (0.0, (3, 2))
    """
    parts: tuple[Any, ...] = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    graphdef, params, rest = parts
    if jax.tree_util.tree_leaves(rest):
        return make()
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), params)
    model: nnx.Module = nnx.merge(graphdef, zeros, rest)
    return model


def delta_of(new: dict[str, Array], base: dict[str, Array]) -> dict[str, Array]:
    """new - base, per tensor, in the base dtype."""
    return {k: np.subtract(new[k], base[k], dtype=base[k].dtype) for k in new}

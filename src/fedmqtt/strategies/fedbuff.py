"""FedBuff (Nguyen et al., 2022): buffer K staleness-weighted deltas, then take one server optimizer step.

    Δ̄ = Σ w(sᵢ)·Δᵢ / K          (or Σ nᵢ·w(sᵢ)·Δᵢ / Σ nᵢ with ``weight_by_samples``)
    θ ← θ + optax_step(g = -Δ̄)  (sgd: θ + η·Δ̄; FedAvgM, FedAdam, FedYogi: momentum / Adam / Yogi on g)

Central differential privacy (``dp_clip=C``, ``dp_noise=sigma``; see fedmqtt.privacy): each Δᵢ is clipped to
‖Δᵢ‖ ≤ C and N(0, (sigmaC)²) noise is added to the buffered sum before dividing by K; the PRNG key and the
count of noisy steps live in the state, so the strategy stays pure.

``flush`` takes a step with a partly filled buffer (the mean over the n < K deltas held); the aggregator
calls it when a step is overdue (``AggregatorConfig.step_deadline``). With central DP each device still adds
at most one clipped delta and the noise on the sum is the same, so a partial step costs no extra privacy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import Array

from fedmqtt.privacy import clip_by_l2, gaussian_noise
from fedmqtt.strategies.base import ClientUpdate, Params, Strategy
from fedmqtt.strategies.staleness import StalenessFn, polynomial


class FedBuffState(NamedTuple):
    buffer: Params  # running Σ weight·Δ
    weight_sum: Array  # Σ nᵢ (weight_by_samples) or K
    n: Array  # deltas buffered so far (not `count`: that would shadow tuple.count)
    opt_state: optax.OptState
    key: Array | None = None  # central DP only: raw PRNG key for the noise
    dp_steps: Array | None = None  # central DP only: noisy steps taken (for the accountant)


def server_optimizer(name: str = "sgd", lr: float = 1.0, momentum: float = 0.9) -> optax.GradientTransformation:
    """The server step on the pseudo-gradient -Δ̄, by name (Reddi et al. 2021 for adam/yogi: eps 1e-3)."""
    if name == "sgd":
        return optax.sgd(lr)
    if name in ("fedavgm", "momentum"):
        return optax.sgd(lr, momentum=momentum)
    if name in ("fedadam", "adam"):
        return optax.adam(lr, b1=0.9, b2=0.99, eps=1e-3)
    if name in ("fedyogi", "yogi"):
        return optax.yogi(lr, b1=0.9, b2=0.99, eps=1e-3)
    raise ValueError(f"unknown server optimizer {name!r}; choose sgd, fedavgm, fedadam or fedyogi")


def fedbuff(
    buffer_size: int = 10,
    optimizer: optax.GradientTransformation | None = None,
    weighting: StalenessFn | None = None,
    weight_by_samples: bool = False,
    name: str = "fedbuff",
    dp_clip: float | None = None,
    dp_noise: float = 0.0,
    seed: int = 0,
) -> Strategy:
    """FedBuff with buffer size K, server optimizer (default SGD, lr 1) and weighting (default (1+s)^-0.5);
    ``dp_clip``/``dp_noise`` turn on central DP (clip norm C, noise multiplier sigma, noise PRNG ``seed``)."""
    if buffer_size < 1:
        raise ValueError("FedBuff buffer size K must be >= 1")
    dp = dp_clip is not None
    if dp and (dp_clip is None or dp_clip <= 0 or dp_noise < 0 or weight_by_samples):
        raise ValueError("central DP needs dp_clip > 0, dp_noise >= 0 and no weight_by_samples")
    clip = float(dp_clip) if dp_clip is not None else 0.0
    opt = optimizer or optax.sgd(1.0)
    w = weighting or polynomial(0.5)

    def init(params: Params) -> FedBuffState:
        zeros = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), params)
        key, steps = (jax.random.PRNGKey(seed), jnp.zeros((), jnp.int32)) if dp else (None, None)
        return FedBuffState(zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), opt.init(params),
                            key, steps)

    def apply(params: Params, update: ClientUpdate, state: FedBuffState) -> tuple[Params, FedBuffState, Array]:
        n = jnp.asarray(update.num_samples, jnp.float32)
        weight = w(update.staleness) * (n if weight_by_samples else 1.0)
        delta = clip_by_l2(update.params, clip) if dp else update.params
        buffer = jax.tree.map(lambda b, d: b + weight * d, state.buffer, delta)
        state = state._replace(buffer=buffer, weight_sum=state.weight_sum + (n if weight_by_samples else 1.0),
                               n=state.n + 1)
        stepped = state.n >= buffer_size
        params, state = jax.lax.cond(stepped, _step, lambda p, s: (p, s), params, state)
        return params, state, stepped

    def _step(params: Params, state: FedBuffState) -> tuple[Params, FedBuffState]:
        total = state.buffer
        if dp:
            assert state.key is not None
            assert state.dp_steps is not None
            key, sub = jax.random.split(state.key)
            total = jax.tree.map(jnp.add, total, gaussian_noise(total, sub, dp_noise * clip))
            state = state._replace(key=key, dp_steps=state.dp_steps + 1)
        mean_delta = jax.tree.map(lambda b: b / jnp.maximum(state.weight_sum, 1e-12), total)
        grads = jax.tree.map(lambda d, p: (-d).astype(p.dtype), mean_delta, params)
        updates, opt_state = opt.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        zeros = jax.tree.map(jnp.zeros_like, state.buffer)
        return params, state._replace(buffer=zeros, weight_sum=jnp.zeros_like(state.weight_sum),
                                      n=jnp.zeros_like(state.n), opt_state=opt_state)

    def flush(params: Params, state: FedBuffState) -> tuple[Params, FedBuffState, Array]:
        stepped = state.n > 0
        params, state = jax.lax.cond(stepped, _step, lambda p, s: (p, s), params, state)
        return params, state, stepped

    return Strategy(name, "delta", "async", init, jax.jit(apply), jax.jit(flush))

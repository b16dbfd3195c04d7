"""FedBuff (Nguyen et al., 2022): buffer K staleness-weighted deltas, combine them, take one server step.

    Δ̄ = combine(w(sᵢ)·Δᵢ)       mean (default): Σ w(sᵢ)·Δᵢ / K, or Σ nᵢ·w(sᵢ)·Δᵢ / Σ nᵢ with
                                 ``weight_by_samples``; robust rules in fedmqtt.strategies.combine
    θ ← θ + optax_step(g = -Δ̄)  (sgd: θ + η·Δ̄; FedAvgM, FedAdam, FedYogi: momentum / Adam / Yogi on g)

The parts compose like optax transforms: ``fedbuff(10, combine=outlier(3.0), optimizer=optax.adam(0.1))``.
Central differential privacy is one more part, ``dp=CentralDP(clip=C, noise=sigma)`` (fedmqtt.privacy): each
Δᵢ is clipped to ‖Δᵢ‖ ≤ C and N(0, (sigma C)²) noise is added to the buffered sum before dividing by K; the
PRNG key, the count of noisy steps and the clip (adaptive clipping moves it) live in the state, so the
strategy stays pure. The noise is calibrated to a sum, so DP composes with the mean only, and the strategy
asks the server for one update per agent per step (``one_update_per_step``) and reports ε from the
accountant (``report``).

With ``CentralDP(sampling=q)`` the strategy steps only when the server's clock calls ``flush``: every
step, even an empty one, adds the noise and divides the sum by K (the expected count, fixed), so a step's
shape does not depend on who took part; the server includes each arriving update with probability q
(``Strategy.sampling``, fedmqtt.core).

``flush`` takes a step with a partly filled buffer (the mean over the n < K deltas held); the aggregator
calls it when a step is overdue (``step_deadline``). With central DP each device still adds at most one
clipped delta and the noise on the sum is the same, so a partial step costs no extra privacy. Robust rules
need the full buffer and take no partial step.

>>> import jax.numpy as jnp
>>> s = fedbuff(2)
>>> p = {"w": jnp.zeros(1)}
>>> p, st, _ = s.apply(p, ClientUpdate({"w": jnp.ones(1)}, 0, 1), s.init(p))
>>> p, st, stepped = s.apply(p, ClientUpdate({"w": jnp.full(1, 3.0)}, 0, 1), st)
>>> bool(stepped), p["w"].tolist()  # θ + (1 + 3) / 2
(True, [2.0])
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array

from fedmqtt.privacy import CentralDP, central_accountant, clip_by_l2, gaussian_noise, l2_norm
from fedmqtt.strategies.base import ClientUpdate, Params, Strategy
from fedmqtt.strategies.combine import Combine, mean
from fedmqtt.strategies.staleness import StalenessFn, polynomial


class FedBuffState(NamedTuple):
    buffer: Params  # mean: running Σ weight·Δ; other rules: each leaf stacked (K, *shape), slot i = Δᵢ as sent
    weights: Array  # mean: Σ nᵢ (weight_by_samples) or n; other rules: (K,) staleness weights w(sᵢ)
    n: Array  # deltas buffered so far (not `count`: that would shadow tuple.count)
    opt_state: optax.OptState
    key: Array | None = None  # central DP only: raw PRNG key for the noise
    dp_steps: Array | None = None  # central DP only: noisy steps taken (for the accountant)
    clip: Array | None = None  # central DP only: the clip C (moves with adaptive clipping)
    within: Array | None = None  # central DP only: buffered deltas with norm <= C


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
    name: str | None = None,
    combine: Combine | None = None,
    dp: CentralDP | None = None,
) -> Strategy:
    """FedBuff with buffer size K, server optimizer (default SGD, lr 1), staleness weighting (default
    (1+s)^-0.5), combine rule (default the mean) and optional central DP."""
    if buffer_size < 1:
        raise ValueError("FedBuff buffer size K must be >= 1")
    rule = combine or mean()
    rule.check(buffer_size)
    stacked = rule.fn is not None
    if stacked and weight_by_samples:
        raise ValueError(f"weight_by_samples weighs the mean; the {rule.name} rule takes no sample weights")
    if dp is not None and (stacked or weight_by_samples):
        raise ValueError("central DP noise is calibrated to a sum of clipped deltas: it needs the mean rule "
                         "without weight_by_samples")
    if dp is not None:
        dp.check()
    opt = optimizer or optax.sgd(1.0)
    w = weighting or polynomial(0.5)
    adaptive = dp is not None and dp.quantile is not None
    clocked = dp is not None and dp.sampling is not None  # steps on the server's clock, sum / K

    def init(params: Params) -> FedBuffState:
        if stacked:
            slots = jax.tree.map(lambda x: jnp.zeros((buffer_size, *jnp.shape(x)), jnp.float32), params)
            return FedBuffState(slots, jnp.zeros((buffer_size,), jnp.float32), jnp.zeros((), jnp.int32),
                                opt.init(params))
        zeros = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), params)
        if dp is None:
            return FedBuffState(zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), opt.init(params))
        return FedBuffState(zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), opt.init(params),
                            jax.random.PRNGKey(dp.seed), jnp.zeros((), jnp.int32), jnp.float32(dp.clip),
                            jnp.zeros((), jnp.float32))

    def add(state: FedBuffState, update: ClientUpdate) -> FedBuffState:
        sw = w(update.staleness)
        if stacked:
            buffer = jax.tree.map(lambda s, d: s.at[state.n].set(jnp.asarray(d, jnp.float32)),
                                  state.buffer, update.params)
            return state._replace(buffer=buffer, weights=state.weights.at[state.n].set(sw), n=state.n + 1)
        n = jnp.asarray(update.num_samples, jnp.float32)
        weight = sw * (n if weight_by_samples else 1.0)
        delta = update.params
        if dp is not None:
            clip, within = state.clip, state.within
            assert clip is not None
            assert within is not None
            state = state._replace(within=within + (l2_norm(delta) <= clip))
            delta = clip_by_l2(delta, clip)
        buffer = jax.tree.map(lambda b, d: b + weight * d, state.buffer, delta)
        return state._replace(buffer=buffer, weights=state.weights + (n if weight_by_samples else 1.0),
                              n=state.n + 1)

    def combined(state: FedBuffState) -> tuple[Params, FedBuffState]:
        if rule.fn is not None:
            return rule.fn(state.buffer, state.weights), state
        total = state.buffer
        if dp is not None:
            assert state.key is not None
            assert state.dp_steps is not None
            assert state.clip is not None
            assert state.within is not None
            key, sub = jax.random.split(state.key)
            total = jax.tree.map(jnp.add, total, gaussian_noise(total, sub, dp.noise * state.clip))
            clip = state.clip
            if adaptive:  # the fraction within the clip, noised, moves the clip towards the quantile
                assert dp.quantile is not None
                count_noise = dp.count_noise * jax.random.normal(jax.random.fold_in(sub, 1))
                # clocked steps: over the expected count K, so that the clip does not reveal how many came
                noisy = (state.within + count_noise) / (buffer_size if clocked else jnp.maximum(state.n, 1))
                clip = clip * jnp.exp(-dp.clip_lr * (noisy - dp.quantile))
            state = state._replace(key=key, dp_steps=state.dp_steps + 1, clip=clip.astype(jnp.float32),
                                   within=jnp.zeros_like(state.within))
        denominator = jnp.float32(buffer_size) if clocked else jnp.maximum(state.weights, 1e-12)
        return jax.tree.map(lambda b: b / denominator, total), state

    def step(params: Params, state: FedBuffState) -> tuple[Params, FedBuffState]:
        mean_delta, state = combined(state)
        grads = jax.tree.map(lambda d, p: (-d).astype(p.dtype), mean_delta, params)
        updates, opt_state = opt.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        if stacked:  # the slots are overwritten before they are read again
            return params, state._replace(n=jnp.zeros_like(state.n), opt_state=opt_state)
        return params, state._replace(buffer=jax.tree.map(jnp.zeros_like, state.buffer),
                                      weights=jnp.zeros_like(state.weights), n=jnp.zeros_like(state.n),
                                      opt_state=opt_state)

    def apply(params: Params, update: ClientUpdate, state: FedBuffState) -> tuple[Params, FedBuffState, Array]:
        state = add(state, update)
        stepped = (state.n >= buffer_size) & (not clocked)
        params, state = jax.lax.cond(stepped, step, lambda p, s: (p, s), params, state)
        return params, state, stepped

    @functools.lru_cache(maxsize=1024)
    def rate(staleness: int) -> float:
        return float(w(staleness))

    jit_step = jax.jit(step)

    def apply_on_host(params: Params, update: ClientUpdate, state: FedBuffState
                      ) -> tuple[Params, FedBuffState, bool]:
        """``apply`` for the mean without DP: the running sum in numpy (new arrays every call), the
        server step jitted once per K updates. Adding one delta is a memory-bound loop that numpy runs in
        less time than JAX takes to dispatch it."""
        n_samples, k = float(np.asarray(update.num_samples)), int(update.updates)
        if k > 1 and weight_by_samples:
            raise ValueError("a combined update's mean is not weighted by samples")
        weight = rate(int(np.asarray(update.staleness))) * (n_samples if weight_by_samples else float(k))
        buffer = jax.tree.map(lambda b, d: _accumulate(b, d, weight), state.buffer, update.params)
        n = int(np.asarray(state.n)) + k  # a combined update stands for k: its mean counts k times
        weights = float(np.asarray(state.weights)) + (n_samples if weight_by_samples else float(k))
        # numpy leaves where the jitted path has jax arrays: either works as a leaf of the state pytree
        state = state._replace(buffer=buffer, n=cast(Array, np.asarray(n, np.int32)),
                               weights=cast(Array, np.asarray(weights, np.float32)))
        if n < buffer_size:
            return params, state, False
        params, state = jax.tree.map(np.asarray, jit_step(params, state))  # one sync per step
        return params, state, True

    def flush(params: Params, state: FedBuffState) -> tuple[Params, FedBuffState, Array]:
        stepped = ((state.n > 0) | clocked) & (not stacked)
        params, state = jax.lax.cond(stepped, step, lambda p, s: (p, s), params, state)
        return params, state, stepped

    default_name = "fedbuff" if rule.name == "mean" else f"fedbuff-{rule.name}"
    host = rule.fn is None and dp is None
    return Strategy(name or default_name, "delta", "async", init, apply_on_host if host else jax.jit(apply),
                    jax.jit(flush),
                    one_update_per_step=dp is not None,
                    report=central_accountant(dp) if dp is not None else None,
                    sums=host and not weight_by_samples, sampling=dp.sampling if dp is not None else None)


def _accumulate(total: Any, delta: Any, weight: float) -> np.ndarray:
    """total + weight · delta as a new float32 array."""
    out: np.ndarray = np.multiply(delta, np.float32(weight), dtype=np.float32)
    out += np.asarray(total)
    return out

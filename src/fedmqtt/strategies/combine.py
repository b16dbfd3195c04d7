"""How FedBuff combines the K deltas of a buffer: the mean, or a rule that a few poisoned deltas cannot drag
far. Each rule is a part for :func:`fedmqtt.strategies.fedbuff` (``fedbuff(10, combine=outlier(3.0))``).

    wᵢ = w(sᵢ)                                          (staleness weight, as in FedBuff)
    mean:      Δ̄ = Σ wᵢΔᵢ / K                           (no defence; kept as a running sum, no K copies)
    norm:      Δ̄ = Σ clip(wᵢΔᵢ, B) / K                  (norm bounding; B fixed, or the buffer's median norm)
    median:    Δ̄ⱼ = median_i wᵢΔᵢⱼ                      (coordinate-wise median, Yin et al. 2018)
    trimmed:   Δ̄ⱼ = mean of wᵢΔᵢⱼ without the ⌊βK⌋ lowest and highest  (coordinate-wise trimmed mean)
    krum:      S = the K - f deltas with the lowest Krum scores, f = ⌊βK⌋, score = Σ ‖Δᵢ - Δⱼ‖² over i's
               K - f - 2 nearest neighbours (Multi-Krum, Blanchard et al. 2017);  Δ̄ = Σ_S wᵢΔᵢ / |S|
    outlier:   m = coordinate-wise median of the Δᵢ, d̃ = median ‖Δᵢ - m‖;
               S = {i : ‖Δᵢ - m‖ <= spread·d̃};  Δ̄ = Σ_S wᵢΔᵢ / |S|
    guard:     the outlier filter and norm bounding, both scaled by staleness, and each coordinate held
               within spread median absolute deviations of the median: with rᵢ = w̃ / wᵢ (w̃ the buffer's
               median weight), S = {i : ‖Δᵢ - m‖ <= spread·d̃·rᵢ},  Δ'ᵢ = clip(Δᵢ, ñ·rᵢ) (ñ the median
               ‖Δᵢ‖),  Δ''ᵢⱼ = mⱼ + clamp(Δ'ᵢⱼ - mⱼ, ±spread·MADⱼ),  Δ̄ = Σ_S wᵢ·Δ''ᵢ / |S|

Multi-Krum and the outlier filter choose on the deltas as sent (before weighting, which would shrink a
stale attacker into the honest range) and average the chosen ones with their weights. Each rule tolerates a
minority of attackers per buffer: the median and the outlier filter up to half, the trimmed mean β·K,
Multi-Krum f (K >= 2f + 3); norm bounding only limits how much each can pull. The median and Multi-Krum pay
a bias on non-IID data (they prefer the typical honest deltas and lose the unusual ones); the outlier filter
drops only what stands out, so it keeps nearly all of FedBuff's accuracy (docs/benchmarks.md). Every rule but
the mean keeps K copies of the model.

The guard is the staleness-aware rule. An honest stale delta was computed on an older model, so it lies
farther from the buffer's centre and gets a smaller weight; a device chooses the staleness it claims
(its base version). A fixed threshold must be wide enough for honest stale deltas, which lets an attacker
that claims to be fresh pull with full weight from as far away. The guard widens the threshold and the norm
bound by the same factor rᵢ = w̃ / wᵢ that the weight shrinks, so the most that any accepted delta can pull,
wᵢ·ñ·rᵢ = w̃·ñ, is the same at every staleness: claiming to be fresh or stale buys an attacker nothing,
and a delta far out of the honest range is dropped at any staleness. The coordinate bound catches what
hides in the L2 norm: a backdoor moves weights that honest deltas leave alone (a trigger's pixels), a
few coordinates far outside their honest spread in a delta of ordinary length.

>>> import jax.numpy as jnp
>>> d = {"w": jnp.array([[1.0], [2.0], [100.0]])}
>>> w = jnp.ones(3)
>>> float(median().fn(d, w)["w"][0]), float(trimmed(0.34).fn(d, w)["w"][0])
(2.0, 2.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from fedmqtt.privacy import l2_norm
from fedmqtt.strategies.base import Params


class Combine(NamedTuple):
    """A combine rule: ``fn(deltas stacked on a leading axis K, weights (K,)) -> Δ̄``; ``fn`` None is the
    weighted mean, which FedBuff keeps as a running sum. ``check(K)`` raises ValueError when the rule cannot
    work on a buffer of K."""

    name: str
    fn: Callable[[Params, Array], Params] | None
    check: Callable[[int], None]


def _any_k(k: int) -> None:
    del k


def _weighted(deltas: Params, w: Array) -> Params:
    return jax.tree.map(lambda d: d * w.reshape((-1,) + (1,) * (d.ndim - 1)), deltas)


def mean() -> Combine:
    """Σ wᵢΔᵢ / K: FedBuff itself, no defence."""
    return Combine("mean", None, _any_k)


def median() -> Combine:
    """Coordinate-wise median of the weighted deltas."""
    return Combine("median", lambda d, w: jax.tree.map(lambda x: jnp.median(x, axis=0), _weighted(d, w)), _any_k)


def trimmed(beta: float = 0.2) -> Combine:
    """Coordinate-wise mean without the ⌊βK⌋ lowest and highest weighted values."""

    def check(k: int) -> None:
        if not 0 <= 2 * int(beta * k) < k:
            raise ValueError(f"trim {beta} leaves nothing of a buffer of {k}")

    def fn(deltas: Params, w: Array) -> Params:
        k = w.shape[0]
        cut = int(beta * k)
        return jax.tree.map(lambda d: jnp.mean(jnp.sort(d, axis=0)[cut : k - cut], axis=0), _weighted(deltas, w))

    return Combine("trimmed", fn, check)


def norm_bound(max_norm: float | None = None) -> Combine:
    """Σ clip(wᵢΔᵢ, B) / K with B = ``max_norm``, or the buffer's median norm when None."""

    def fn(deltas: Params, w: Array) -> Params:
        deltas = _weighted(deltas, w)
        norms = jax.vmap(l2_norm)(deltas)
        bound = jnp.median(norms) if max_norm is None else jnp.float32(max_norm)
        scale = jnp.minimum(1.0, bound / jnp.maximum(norms, 1e-12))
        return jax.tree.map(lambda d: jnp.mean(d * scale.reshape((-1,) + (1,) * (d.ndim - 1)), axis=0), deltas)

    return Combine("norm", fn, _any_k)


def multi_krum(beta: float = 0.2) -> Combine:
    """Multi-Krum with f = ⌊βK⌋ attackers assumed per buffer (needs K >= 2f + 3)."""

    def check(k: int) -> None:
        if k < 2 * int(beta * k) + 3:
            raise ValueError(f"Multi-Krum needs K >= 2f + 3 (K = {k}, f = {int(beta * k)})")

    return Combine("krum", lambda d, w: _multi_krum(d, w, int(beta * w.shape[0])), check)


def outlier(spread: float = 3.0) -> Combine:
    """Drop deltas farther than ``spread`` median distances from the coordinate-wise median (spread >= 1)."""
    if not spread >= 1.0:
        raise ValueError(f"the outlier filter's spread must be >= 1 (got {spread}): below 1 it can keep nothing")
    return Combine("outlier", lambda d, w: _outlier_filter(d, w, spread), _any_k)


def guard(spread: float = 3.0) -> Combine:
    """The staleness-aware outlier filter with norm bounding (see the module's docstring)."""
    if not spread >= 1.0:
        raise ValueError(f"the guard's spread must be >= 1 (got {spread}): below 1 it can keep nothing")
    return Combine("guard", lambda d, w: _guard(d, w, spread), _any_k)


def _guard(deltas: Params, weights: Array, spread: float) -> Params:
    keep, bounded = guard_bounds(deltas, weights, reference(deltas, weights), spread)
    return _mean_of(bounded, weights, keep)


class Reference(NamedTuple):
    """What the guard judges deltas against, from a stack of deltas as sent (rows of NaN are ignored: the
    empty slots of a window that is still filling)."""

    center: Params  # coordinate-wise median m (leading axis 1)
    mad: Params  # coordinate-wise median absolute deviation from m (leading axis 1)
    distance: Array  # median ‖Δᵢ - m‖
    norm: Array  # median ‖Δᵢ‖
    weight: Array  # median staleness weight


def reference(deltas: Params, weights: Array) -> Reference:
    center = jax.tree.map(lambda d: jnp.nanmedian(d, axis=0, keepdims=True), deltas)
    mad = jax.tree.map(lambda d, c: jnp.nanmedian(jnp.abs(d - c), axis=0, keepdims=True), deltas, center)
    dist = jax.vmap(l2_norm)(jax.tree.map(jnp.subtract, deltas, center))
    return Reference(center, mad, jnp.nanmedian(dist), jnp.nanmedian(jax.vmap(l2_norm)(deltas)),
                     jnp.nanmedian(weights))


def guard_bounds(deltas: Params, weights: Array, ref: Reference, spread: float) -> tuple[Array, Params]:
    """For stacked ``deltas`` with staleness ``weights``: which pass the guard's distance test, and each
    clipped to the scaled median norm with every coordinate held within m ± spread·MAD."""
    dist = jax.vmap(l2_norm)(jax.tree.map(jnp.subtract, deltas, ref.center))
    norms = jax.vmap(l2_norm)(deltas)
    r = ref.weight / jnp.maximum(weights, 1e-12)  # 1 at the median staleness, > 1 when staler
    keep = dist <= spread * ref.distance * jnp.maximum(r, 1.0 / spread)
    scale = jnp.minimum(1.0, ref.norm * r / jnp.maximum(norms, 1e-12))
    bounded = jax.tree.map(lambda d, c, m: c + jnp.clip(d * scale.reshape((-1,) + (1,) * (d.ndim - 1)) - c,
                                                        -spread * m, spread * m), deltas, ref.center, ref.mad)
    return keep, bounded


def _mean_of(deltas: Params, weights: Array, chosen: Array) -> Params:
    """Σ wᵢΔᵢ / |chosen| over the chosen slots (a boolean mask of shape (K,))."""
    w = jnp.where(chosen, weights, 0.0)
    return jax.tree.map(lambda d: jnp.tensordot(w, d, axes=1) / jnp.maximum(jnp.sum(chosen), 1), deltas)


def _gram(a: Params, b: Params) -> Array:
    """⟨aᵢ, bⱼ⟩ over every leaf, for stacked pytrees a (K, ...) and b (M, ...): a (K, M) matrix."""
    return sum((jnp.reshape(x, (x.shape[0], -1)) @ jnp.reshape(y, (y.shape[0], -1)).T
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)),
               start=jnp.zeros(()))


def _multi_krum(deltas: Params, weights: Array, f: int) -> Params:
    k = jax.tree.leaves(deltas)[0].shape[0]
    if k < 2 * f + 3:
        raise ValueError(f"Multi-Krum needs K >= 2f + 3 (K = {k}, f = {f})")
    # centred first: pairwise distances are unchanged, and ‖a‖² + ‖b‖² - 2⟨a, b⟩ loses less to rounding
    centred = jax.tree.map(lambda d: d - jnp.mean(d, axis=0, keepdims=True), deltas)
    g = _gram(centred, centred)
    sq = jnp.diag(g)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2 * g, 0.0) + jnp.diag(jnp.full((k,), jnp.inf))
    scores = jnp.sum(jnp.sort(dist, axis=1)[:, : k - f - 2], axis=1)
    chosen = jnp.zeros((k,), bool).at[jnp.argsort(scores)[: k - f]].set(True)
    return _mean_of(deltas, weights, chosen)


def _outlier_filter(deltas: Params, weights: Array, spread: float) -> Params:
    center = jax.tree.map(lambda d: jnp.median(d, axis=0)[None], deltas)
    dist = jax.vmap(l2_norm)(jax.tree.map(jnp.subtract, deltas, center))  # ‖Δᵢ - m‖, computed directly
    keep = dist <= spread * jnp.median(dist)  # spread >= 1: the median-distance delta itself always stays
    return _mean_of(deltas, weights, keep)



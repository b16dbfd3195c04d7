"""Differential privacy: clip an update's L2 norm, add Gaussian noise, and count the privacy spent.

Two places use it (docs/security.md explains which to pick):

* **on the agent** (``AgentConfig(dp=ClientDP(clip_norm=1.0, noise_multiplier=1.0))``): every delta the device
  publishes is clipped to ``C`` and gets N(0, (sigmaC)²) noise, so the aggregator and the broker only ever see
  noisy updates. Guarantee per device, against an untrusted aggregator.
* **at the aggregator, FedBuff** (``fedbuff(dp=CentralDP(clip=C, noise=sigma))``): each buffered delta is clipped to
  ``C`` and N(0, (sigma C)²) noise is added once to the buffered sum before the server step. Guarantee per
  device for whoever sees the published models (other devices, observers), with a trusted aggregator.

ε at a given δ comes from Google's dp-accounting (Rényi DP accountant, Gaussian mechanism composed over the
releases). Sampling assumptions, stated because they decide the numbers:

* No privacy amplification by sampling is claimed by default: arrivals in an asynchronous federation are
  not a random sample (fast devices arrive more often), so each release is charged as if every device took
  part in it. ``sampling_rate=q`` gives the Poisson-subsampled figure for deployments that do sample
  devices at random with probability q; it is not valid otherwise.
* Central DP assumes one update per device per buffer (staleness weights w(s) <= 1); the neighbouring data
  sets and the sensitivity per mode are argued in docs/security.md. A device with m updates in one buffer
  has sensitivity mC. With ``CentralDP(sampling=q)`` the server steps on a clock with a fixed denominator
  and takes each arriving update with probability q: then add/remove adjacency holds and the accountant
  charges the Poisson-subsampled Gaussian.
* Client (local) DP protects a device's whole data set: any two data sets give clipped deltas at most 2C
  apart, so each release is a Gaussian mechanism with noise multiplier sigma/2.

The maths here is pure (jax pytrees, explicit PRNG keys); :class:`ClientPrivacy` is the agent's stateful
wrapper (its own RNG, a count of releases).

>>> import jax, jax.numpy as jnp
>>> clipped = clip_by_l2({"w": jnp.array([3.0, 4.0])}, 1.0)
>>> [round(float(v), 3) for v in clipped["w"]]
[0.6, 0.8]
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedmqtt.types import Array

Tree = Any
DELTA = 1e-5


def l2_norm(tree: Tree) -> jax.Array:
    """Global L2 norm over every leaf of a pytree."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_l2(tree: Tree, max_norm: float | jax.Array) -> Tree:
    """Scale ``tree`` so that its global L2 norm is at most ``max_norm`` (unchanged when already within)."""
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(l2_norm(tree), 1e-12))
    return jax.tree.map(lambda x: (x * scale).astype(x.dtype), tree)


def gaussian_noise(tree: Tree, key: jax.Array, std: float | jax.Array) -> Tree:
    """A pytree like ``tree`` of independent N(0, std²) draws (float32), one subkey per leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    noise = [std * jax.random.normal(k, jnp.shape(x), jnp.float32)
             for k, x in zip(keys, leaves, strict=False)]
    return jax.tree.unflatten(treedef, noise)


def privatize(tree: Tree, key: jax.Array, clip_norm: float, noise_multiplier: float) -> Tree:
    """The Gaussian mechanism on one update: clip to ``clip_norm``, add N(0, (noise_multiplier * clip_norm)²)
    to every coordinate."""
    clipped = clip_by_l2(tree, clip_norm)
    noise = gaussian_noise(clipped, key, noise_multiplier * clip_norm)
    return jax.tree.map(lambda x, n: (x + n).astype(x.dtype), clipped, noise)


# ---- accounting (dp-accounting) -------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, releases: int, delta: float = DELTA, sampling_rate: float = 1.0,
            relation: str = "add-remove") -> float:
    """ε(δ) of ``releases`` Gaussian mechanisms with the given noise multiplier (sigma = std / sensitivity),
    from dp-accounting's RDP accountant; Poisson subsampling with ``sampling_rate`` < 1 when assumed, for
    neighbours that differ by adding or removing one device (``add-remove``) or by zeroing its data
    (``zero-out``, dp-accounting's REPLACE_SPECIAL).

    >>> round(epsilon(5.0, 100), 2)
    10.73
    >>> round(epsilon(1.0, 100, sampling_rate=0.01), 2)
    1.21
    """
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    import dp_accounting
    from dp_accounting import rdp

    event: Any = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    neighbours = dp_accounting.NeighboringRelation
    accountant = rdp.RdpAccountant(neighboring_relation=neighbours.REPLACE_SPECIAL if relation == "zero-out"
                                   else neighbours.ADD_OR_REMOVE_ONE)
    absl = logging.getLogger("absl")  # it warns, once per order and call, that a few fractional orders
    level = absl.level                # below 2 did not converge; those orders are left out of the minimum
    absl.setLevel(logging.ERROR)
    try:
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, releases))
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def noise_for_epsilon(target: float, releases: int, delta: float = DELTA, sampling_rate: float = 1.0,
                      relation: str = "add-remove") -> float:
    """The smallest noise multiplier (to 0.1 %) whose ε after ``releases`` is at most ``target``."""
    lo, hi = 1e-2, 1.0
    while epsilon(hi, releases, delta, sampling_rate, relation) > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches ε={target} in {releases} releases")
    while hi - lo > 1e-3 * hi:
        mid = round((lo + hi) / 2, 6)
        lo, hi = (lo, mid) if epsilon(mid, releases, delta, sampling_rate, relation) <= target else (mid, hi)
    return hi


class CentralDP(NamedTuple):
    """Central DP for FedBuff (``fedbuff(dp=CentralDP(1.0, 4.0))``): clip each delta to ``clip``, add
    N(0, (noise·clip)²) to each buffered sum; ``seed`` seeds the noise, ε is reported at ``delta``.

    ``adjacency`` names the neighbouring data sets ε is stated for (docs/security.md): ``replace`` (one
    device's data replaced by any other; sensitivity 2C per step it takes part in) or ``zero-out`` (one
    device's deltas replaced by zeros; sensitivity C). ``quantile`` turns on adaptive clipping (Andrew et
    al. 2021): after each step the clip moves towards the ``quantile`` of the deltas' norms,
    C ← C·exp(-clip_lr·(b̃ - quantile)), b̃ the fraction of the buffer within C plus N(0, count_noise²)/K;
    the noisy count costs privacy too, and the accountant's noise multiplier accounts for both.

    ``sampling=q`` takes steps on the server's clock instead of after K deltas: each arriving update is
    included with probability q (a coin the server draws from a secret key, the same for every update of a
    device in one step), the step's sum is divided by K whatever it holds, and a step is taken even when
    it holds nothing. Removing a device then changes no step but the ones that included it, so
    ``add-remove`` adjacency holds (sensitivity C), and each step is a Poisson-subsampled Gaussian charged
    to every device (q = 1: clocked steps without sampling)."""

    clip: float
    noise: float = 0.0
    seed: int = 0
    delta: float = DELTA
    adjacency: str = "replace"
    quantile: float | None = None
    clip_lr: float = 0.2
    count_noise: float = 0.0
    sampling: float | None = None

    def check(self) -> CentralDP:
        if not (self.clip > 0 and self.noise >= 0):  # also refuses NaN
            raise ValueError("central DP needs clip > 0 and noise >= 0")
        if self.adjacency not in ADJACENCY:
            raise ValueError(f"adjacency must be one of {', '.join(ADJACENCY)} (got {self.adjacency!r})")
        if self.quantile is not None and not (0 < self.quantile < 1 and self.clip_lr > 0 and self.count_noise > 0):
            raise ValueError("adaptive clipping needs 0 < quantile < 1, clip_lr > 0 and count_noise > 0 (the "
                             "count of deltas within the clip is released, so it is noised as well)")
        if self.sampling is not None and not 0 < self.sampling <= 1:
            raise ValueError(f"the sampling probability must be in (0, 1] (got {self.sampling})")
        if self.sampling is None and self.adjacency == "add-remove":
            raise ValueError("add-remove adjacency holds only for steps on a clock (give a sampling probability, "
                             "1 for none): a buffer that closes after K deltas shifts when a device is removed")
        if self.sampling is not None and self.adjacency == "replace":
            raise ValueError("with sampling, state ε for add-remove or zero-out neighbours: the subsampled "
                             "Gaussian's accounting covers those (add-remove is the stronger)")
        return self

    def multiplier(self) -> float:
        """The noise multiplier the accountant charges per step a device takes part in: noise / sensitivity
        in units of C (2 under ``replace``, 1 under ``zero-out``); with adaptive clipping the sum and the
        count (sensitivity 1, noise ``count_noise``) are one Gaussian mechanism,
        z = (sensitivity²/noise² + 1/count_noise²)^-½.

        >>> CentralDP(1.0, 4.0).multiplier(), CentralDP(1.0, 4.0, adjacency="zero-out").multiplier()
        (2.0, 4.0)
        """
        base = self.noise / ADJACENCY[self.adjacency]
        if self.quantile is None or base == 0:
            return base
        return float((base ** -2 + self.count_noise ** -2) ** -0.5)


ADJACENCY = {"replace": 2.0, "zero-out": 1.0, "add-remove": 1.0}  # a step sum's sensitivity, in units of C


def central_accountant(dp: CentralDP) -> Callable[..., Mapping[str, Any]]:
    """A DP FedBuff strategy's ``report`` (set by ``fedbuff(dp=...)``): ``report(state, participations)``
    reads the number of noisy steps from the state and charges the most-charged device: ``participations``
    (the most steps any one device contributed to, from the server's gate) when known, every step
    otherwise; with sampling, every step (a Poisson-subsampled Gaussian) to every device. Returns the
    metrics fields ``dp_epsilon``, ``dp_delta``, ``dp_noise_multiplier``, ``dp_steps``,
    ``dp_participations``, ``dp_adjacency``, with sampling ``dp_sampling`` and, with adaptive clipping,
    ``dp_clip``."""
    z = dp.multiplier()
    q = dp.sampling

    def report(state: Any, participations: int | None = None) -> Mapping[str, Any]:
        steps = int(getattr(state, "dp_steps", 0) or 0)
        charged = steps if participations is None or q is not None else min(participations, steps)
        eps = epsilon(z, charged, dp.delta, 1.0 if q is None else q, dp.adjacency)
        out: dict[str, Any] = {"dp_epsilon": eps, "dp_delta": dp.delta,
                               "dp_noise_multiplier": z, "dp_steps": steps, "dp_participations": charged,
                               "dp_adjacency": dp.adjacency}
        if q is not None:
            out["dp_sampling"] = q
        if dp.quantile is not None and getattr(state, "clip", None) is not None:
            out["dp_clip"] = float(np.asarray(state.clip))
        return out

    return report


# ---- the agent's side -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientDP:
    """Client-level DP settings for :class:`fedmqtt.agent.AgentConfig` (``dp=``).

    ``seed=None`` (the default, and the only choice for real devices) draws the noise seed from the OS.
    """

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    seed: int | None = None
    delta: float = DELTA

    def __post_init__(self) -> None:
        if self.clip_norm <= 0 or self.noise_multiplier < 0:
            raise ValueError("client DP needs clip_norm > 0 and noise_multiplier >= 0")


class ClientPrivacy:
    """One agent's Gaussian mechanism: privatizes each delta it publishes and counts the releases."""

    def __init__(self, config: ClientDP, salt: str = "") -> None:
        self.config = config
        seed = config.seed if config.seed is not None else secrets.randbits(128)  # OS entropy
        words = np.random.SeedSequence([seed, *salt.encode()]).generate_state(2)
        self._key = jnp.asarray(words, jnp.uint32)  # a raw threefry key
        self.releases = 0
        self._privatize = jax.jit(privatize, static_argnums=(2, 3))

    def __call__(self, delta: Mapping[str, Array]) -> dict[str, Array]:
        """Clip and noise one delta (numpy in, numpy out, dtypes kept)."""
        self._key, key = jax.random.split(self._key)
        out = self._privatize(dict(delta), key, self.config.clip_norm, self.config.noise_multiplier)
        self.releases += 1
        return {k: np.asarray(v) for k, v in out.items()}

    def epsilon(self) -> float:
        """ε at the configured δ for the releases so far (local DP: noise multiplier sigma/2, see above)."""
        return epsilon(self.config.noise_multiplier / 2, self.releases, self.config.delta)

"""Strategies by name, for the CLI and benchmarks: ``make("fedbuff", buffer_size=5)``."""

from __future__ import annotations

from typing import Any

from fedmqtt.strategies.base import Strategy
from fedmqtt.strategies.fedasync import fedasync
from fedmqtt.strategies.fedavg import fedavg
from fedmqtt.strategies.fedbuff import fedbuff, server_optimizer
from fedmqtt.strategies.robust import BY_NAME as ROBUST
from fedmqtt.strategies.robust import robust_fedbuff
from fedmqtt.strategies.staleness import by_name as weighting_by_name

NAMES = ("fedasync", "fedasync-constant", "fedasync-polynomial", "fedasync-hinge", "fedbuff", "fedavg",
         "fedavg-delta", "fedbuff-median", "fedbuff-trimmed", "fedbuff-norm", "fedbuff-krum", "fedbuff-outlier")


def make(name: str, *, alpha: float = 0.6, staleness_a: float | None = None, staleness_b: int | None = None,
         buffer_size: int = 10, server_opt: str = "sgd", server_lr: float = 1.0,
         weight_by_samples: bool = False, dp_clip: float | None = None, dp_noise: float = 0.0, seed: int = 0,
         trim: float = 0.2, max_norm: float | None = None, spread: float = 3.0, **_: Any) -> Strategy:
    """Build a strategy by name with the usual knobs (see each factory for defaults)."""
    if dp_clip is not None and name != "fedbuff":
        raise ValueError("central DP (dp_clip) is implemented for fedbuff only")
    if name in ("fedasync", "fedasync-polynomial"):
        return fedasync(alpha, weighting_by_name("polynomial", staleness_a), name=name)
    if name == "fedasync-constant":
        return fedasync(alpha, weighting_by_name("constant"), name=name)
    if name == "fedasync-hinge":
        return fedasync(alpha, weighting_by_name("hinge", staleness_a, staleness_b), name=name)
    if name == "fedbuff":
        return fedbuff(buffer_size, server_optimizer(server_opt, server_lr),
                       weighting_by_name("polynomial", staleness_a), weight_by_samples,
                       dp_clip=dp_clip, dp_noise=dp_noise, seed=seed)
    if name in ROBUST:
        return robust_fedbuff(buffer_size, ROBUST[name], trim, max_norm,
                              server_optimizer(server_opt, server_lr),
                              weighting_by_name("polynomial", staleness_a), spread=spread)
    if name == "fedavg":
        return fedavg("weights", name=name)
    if name == "fedavg-delta":
        return fedavg("delta", server_lr, name=name)
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(NAMES)}")

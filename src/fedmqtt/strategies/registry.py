"""Strategies by name, for the CLI and benchmarks: ``make("fedbuff", buffer_size=5)``.

Each name accepts its own options and refuses the rest, so a misspelt or misplaced option is an error,
not a silent default:

>>> make("fedasync", alpha=0.5).name
'fedasync'
>>> make("fedasync", buffer_size=5)
Traceback (most recent call last):
...
ValueError: fedasync takes no option buffer_size; it takes alpha, staleness_a
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedmqtt.privacy import CentralDP
from fedmqtt.strategies import combine as rules
from fedmqtt.strategies.base import Strategy
from fedmqtt.strategies.fedasync import fedasync
from fedmqtt.strategies.fedasync_guard import fedasync_guard
from fedmqtt.strategies.fedavg import fedavg
from fedmqtt.strategies.fedbuff import fedbuff, server_optimizer
from fedmqtt.strategies.staleness import by_name as weighting_by_name

_FEDBUFF = ("buffer_size", "server_opt", "server_lr", "staleness_a")
_DP = ("dp_clip", "dp_noise", "seed", "dp_adjacency", "dp_quantile", "dp_count_noise", "dp_sampling")


def _fedasync(name: str, weighting: str, extra: tuple[str, ...] = ()
              ) -> tuple[Callable[..., Strategy], tuple[str, ...]]:
    def build(alpha: float = 0.6, staleness_a: float | None = None, staleness_b: int | None = None) -> Strategy:
        return fedasync(alpha, weighting_by_name(weighting, staleness_a, staleness_b), name=name)

    return build, ("alpha", "staleness_a", *extra)


def _fedbuff(name: str, rule: Callable[..., rules.Combine] | None, rule_options: tuple[str, ...] = ()
             ) -> tuple[Callable[..., Strategy], tuple[str, ...]]:
    def build(buffer_size: int = 10, server_opt: str = "sgd", server_lr: float = 1.0,
              staleness_a: float | None = None, weight_by_samples: bool = False, dp_clip: float | None = None,
              dp_noise: float | None = None, seed: int | None = None, dp_adjacency: str | None = None,
              dp_quantile: float | None = None, dp_count_noise: float | None = None,
              dp_sampling: float | None = None, **rule_args: Any) -> Strategy:
        dp_options = (dp_noise, seed, dp_adjacency, dp_quantile, dp_count_noise, dp_sampling)
        if dp_clip is None and any(o is not None for o in dp_options):
            raise ValueError("dp_noise, seed, dp_adjacency, dp_quantile, dp_count_noise and dp_sampling are "
                             "central DP options: give dp_clip as well")
        adjacency = dp_adjacency or ("replace" if dp_sampling is None else "add-remove")
        dp = CentralDP(dp_clip, dp_noise or 0.0, seed or 0, adjacency=adjacency, quantile=dp_quantile,
                       count_noise=dp_count_noise or 0.0, sampling=dp_sampling) if dp_clip is not None else None
        return fedbuff(buffer_size, server_optimizer(server_opt, server_lr),
                       weighting_by_name("polynomial", staleness_a), weight_by_samples, name=name,
                       combine=rule(**rule_args) if rule is not None else None, dp=dp)

    extra = ("weight_by_samples", *_DP) if rule is None else rule_options
    return build, (*_FEDBUFF, *extra)


REGISTRY: dict[str, tuple[Callable[..., Strategy], tuple[str, ...]]] = {
    "fedasync": _fedasync("fedasync", "polynomial"),
    "fedasync-polynomial": _fedasync("fedasync-polynomial", "polynomial"),
    "fedasync-constant": (lambda alpha=0.6: fedasync(alpha, weighting_by_name("constant"),
                                                     name="fedasync-constant"), ("alpha",)),
    "fedasync-hinge": _fedasync("fedasync-hinge", "hinge", ("staleness_b",)),
    "fedasync-guard": (lambda alpha=0.6, staleness_a=None, window=20, spread=3.0: fedasync_guard(
        alpha, weighting_by_name("polynomial", staleness_a), int(window), spread),
        ("alpha", "staleness_a", "window", "spread")),
    "fedbuff": _fedbuff("fedbuff", None),
    "fedbuff-median": _fedbuff("fedbuff-median", lambda: rules.median()),
    "fedbuff-trimmed": _fedbuff("fedbuff-trimmed", lambda trim=0.2: rules.trimmed(trim), ("trim",)),
    "fedbuff-norm": _fedbuff("fedbuff-norm", lambda max_norm=None: rules.norm_bound(max_norm), ("max_norm",)),
    "fedbuff-krum": _fedbuff("fedbuff-krum", lambda trim=0.2: rules.multi_krum(trim), ("trim",)),
    "fedbuff-outlier": _fedbuff("fedbuff-outlier", lambda spread=3.0: rules.outlier(spread), ("spread",)),
    "fedbuff-guard": _fedbuff("fedbuff-guard", lambda spread=3.0: rules.guard(spread), ("spread",)),
    "fedavg": (lambda: fedavg("weights", name="fedavg"), ()),
    "fedavg-delta": (lambda server_lr=1.0: fedavg("delta", server_lr, name="fedavg-delta"), ("server_lr",)),
}
NAMES = tuple(REGISTRY)


def options(name: str) -> tuple[str, ...]:
    """The options that strategy ``name`` takes."""
    return _lookup(name)[1]


def applicable(name: str, **opts: Any) -> dict[str, Any]:
    """The options among ``opts`` that strategy ``name`` takes: for sweeps that share knobs across
    strategies (``make(name, **applicable(name, alpha=0.6, buffer_size=10))``).

    >>> applicable("fedavg-delta", alpha=0.6, server_lr=0.5)
    {'server_lr': 0.5}
    """
    accepted = set(options(name))
    return {k: v for k, v in opts.items() if k in accepted}


def _lookup(name: str) -> tuple[Callable[..., Strategy], tuple[str, ...]]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(NAMES)}") from None


def make(name: str, **opts: Any) -> Strategy:
    """Build strategy ``name`` with ``opts`` (see each factory for defaults); options that ``name`` does not
    take raise ValueError. Options set to None mean "the default"."""
    build, accepted = _lookup(name)
    given = {k: v for k, v in opts.items() if v is not None}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        if "dp_clip" in unknown:
            raise ValueError("central DP (dp_clip) is implemented for fedbuff only: its noise is calibrated to "
                             "the mean of the buffer, not to a robust rule or a single update")
        raise ValueError(f"{name} takes no option {', '.join(unknown)}; it takes {', '.join(accepted) or 'none'}")
    return build(**given)

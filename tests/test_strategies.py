"""FedBuff and synchronous FedAvg against hand computations, plus contract checks for every strategy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedmqtt.privacy import CentralDP
from fedmqtt.strategies import (
    ClientUpdate,
    constant,
    fedavg,
    fedbuff,
    median,
    multi_krum,
    norm_bound,
    outlier,
    polynomial,
    server_optimizer,
    trimmed,
)
from fedmqtt.strategies.registry import NAMES, make, options


def _p(*values: float) -> dict[str, jax.Array]:
    return {"w": jnp.asarray(values, jnp.float32)}


def _w(params: dict[str, jax.Array]) -> list[float]:
    return np.asarray(params["w"]).tolist()


# ---- FedAvg --------------------------------------------------------------------------------------
def test_fedavg_weights_is_sample_weighted_mean() -> None:
    s, p = fedavg("weights"), _p(0.0, 0.0)
    st = s.init(p)
    for new, n in (((1.0, 2.0), 10), ((4.0, -1.0), 30), ((0.0, 6.0), 60)):
        p2, st, stepped = s.apply(p, ClientUpdate(_p(*new), 0, n), st)
        assert not bool(stepped)
        assert _w(p2) == _w(p)  # nothing moves until the round closes
    out, st, stepped = s.flush(p, st)
    assert bool(stepped)
    # (10*1 + 30*4 + 60*0) / 100 = 1.3 ; (10*2 + 30*-1 + 60*6) / 100 = 3.5
    assert _w(out) == pytest.approx([1.3, 3.5], rel=1e-6)
    assert int(st.n) == 0 and float(st.weight_sum) == 0.0  # the round's sums are reset


def test_fedavg_delta_form_uses_server_lr_and_plain_mean() -> None:
    s, p = fedavg("delta", server_lr=0.5), _p(1.0, 1.0)
    st = s.init(p)
    for d, n in (((2.0, 0.0), 1), ((0.0, 4.0), 99)):  # the delta form ignores sample counts
        _, st, _ = s.apply(p, ClientUpdate(_p(*d), 0, n), st)
    out, _, stepped = s.flush(p, st)
    assert bool(stepped)
    # θ + η · mean Δ = 1 + 0.5 * (2 + 0) / 2 = 1.5 ; 1 + 0.5 * (0 + 4) / 2 = 2
    assert _w(out) == pytest.approx([1.5, 2.0])


def test_fedavg_empty_round_does_not_step() -> None:
    s, p = fedavg(), _p(3.0)
    out, _, stepped = s.flush(p, s.init(p))
    assert not bool(stepped)
    assert _w(out) == [3.0]


# ---- FedBuff -------------------------------------------------------------------------------------
def test_fedbuff_steps_every_k_with_staleness_weights() -> None:
    s, p = fedbuff(buffer_size=3, optimizer=optax.sgd(1.0), weighting=polynomial(0.5)), _p(0.0)
    st = s.init(p)
    steps = []
    for d, stale in ((3.0, 0), (6.0, 3), (9.0, 8)):
        p, st, stepped = s.apply(p, ClientUpdate(_p(d), stale, 1), st)
        steps.append(bool(stepped))
    assert steps == [False, False, True]
    # weights (s+1)^-0.5: 1, 1/2, 1/3 -> (3*1 + 6/2 + 9/3) / K=3 = 3
    assert _w(p) == pytest.approx([3.0], rel=1e-6)
    assert int(st.n) == 0 and float(np.asarray(st.buffer["w"])[0]) == 0.0


def test_fedbuff_server_lr_and_sample_weighting() -> None:
    s = fedbuff(buffer_size=2, optimizer=optax.sgd(0.5), weighting=constant(), weight_by_samples=True)
    p = _p(1.0)
    st = s.init(p)
    p, st, _ = s.apply(p, ClientUpdate(_p(2.0), 5, 1), st)
    p, st, stepped = s.apply(p, ClientUpdate(_p(-2.0), 0, 3), st)
    assert bool(stepped)
    # Δ̄ = (1*2 + 3*-2) / 4 = -1 ; θ = 1 + 0.5 * -1 = 0.5
    assert _w(p) == pytest.approx([0.5])


def test_fedbuff_momentum_server_step_by_hand() -> None:
    opt = server_optimizer("fedavgm", lr=1.0, momentum=0.5)
    s = fedbuff(buffer_size=1, optimizer=opt, weighting=constant())
    p = _p(0.0)
    st = s.init(p)
    p, st, _ = s.apply(p, ClientUpdate(_p(1.0), 0, 1), st)  # v = 1, θ = 1
    p, st, _ = s.apply(p, ClientUpdate(_p(1.0), 0, 1), st)  # v = 0.5*1 + 1 = 1.5, θ = 2.5
    assert _w(p) == pytest.approx([2.5])


def test_fedbuff_adam_first_step_moves_by_lr() -> None:
    # Adam's first bias-corrected step is lr * g / (|g| + eps'): about lr in the direction of Δ.
    s = fedbuff(buffer_size=1, optimizer=server_optimizer("fedadam", lr=0.1), weighting=constant())
    p, _, _ = s.apply(_p(0.0), ClientUpdate(_p(5.0), 0, 1), s.init(_p(0.0)))
    assert _w(p)[0] == pytest.approx(0.1, rel=1e-3)


# ---- contracts for every registered strategy ------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_keeps_tree_and_finite(name: str) -> None:
    s = make(name, buffer_size=3) if "buffer_size" in options(name) else make(name)  # Multi-Krum needs K >= 3
    params = {"a": jnp.ones((2, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    st = s.init(params)
    value = jax.tree.map(lambda x: x + 0.1, params) if s.wants == "weights" else jax.tree.map(
        lambda x: jnp.full_like(x, 0.1), params)
    out = params
    steps = 0
    for _ in range(3):
        out, st, stepped = s.apply(out, ClientUpdate(value, 1, 10), st)
        steps += int(bool(stepped))
    out, st, stepped = s.flush(out, st)
    steps += int(bool(stepped))
    assert steps >= 1
    assert jax.tree.structure(out) == jax.tree.structure(params)
    for k in params:
        assert out[k].shape == params[k].shape and out[k].dtype == params[k].dtype
        assert bool(jnp.all(jnp.isfinite(out[k])))
        moved = np.asarray(out[k]) - np.asarray(params[k])
        # every update is +0.1 on every coordinate: every strategy moves every coordinate up, by at most the
        # sum of the three updates (FedAsync mixes each one in at most once, FedBuff and FedAvg average them)
        assert np.all(moved > 0) and np.all(moved <= 0.3 + 1e-6), (k, moved)


# ---- the registry -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "opts"), [
    ("fedasync", {"buffer_size": 3}), ("fedasync-constant", {"staleness_a": 0.5}), ("fedbuff", {"trim": 0.1}),
    ("fedbuff", {"spread": 2.0}), ("fedbuff-median", {"trim": 0.1}), ("fedbuff-trimmed", {"spread": 2.0}),
    ("fedbuff-median", {"weight_by_samples": True}), ("fedavg", {"server_lr": 0.5}), ("fedavg", {"alpha": 0.5}),
    ("fedbuff", {"buffer_sise": 3}),
])
def test_make_refuses_options_a_strategy_does_not_take(name: str, opts: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=f"{name} takes no option {next(iter(opts))}"):
        make(name, **opts)


def test_make_refuses_unknown_names_and_dp_outside_fedbuff() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        make("fedprox")
    for name in ("fedasync", "fedavg", "fedbuff-median", "fedbuff-krum"):
        with pytest.raises(ValueError, match="fedbuff only"):
            make(name, dp_clip=1.0)


def test_make_passes_its_options_on() -> None:
    assert make("fedasync", buffer_size=None).name == "fedasync"  # None means "the default"
    assert make("fedbuff-trimmed", trim=0.4).name == "fedbuff-trimmed"
    with pytest.raises(ValueError, match="trim"):
        make("fedbuff-trimmed", buffer_size=4, trim=0.5)  # reached the rule's check: nothing left of K = 4
    plain = make("fedbuff")
    assert (plain.one_update_per_step, plain.report) == (False, None)
    dp = make("fedbuff", buffer_size=2, dp_clip=1.0, dp_noise=1.5, seed=3)
    assert dp.one_update_per_step
    assert dp.report is not None
    assert dp.report(dp.init({"w": jnp.zeros(2)}))["dp_noise_multiplier"] == 1.5 / 2  # replace-one: 2C
    zero_out = make("fedbuff", buffer_size=2, dp_clip=1.0, dp_noise=1.5, dp_adjacency="zero-out")
    assert zero_out.report is not None
    assert zero_out.report(zero_out.init({"w": jnp.zeros(2)}))["dp_noise_multiplier"] == 1.5
    with pytest.raises(ValueError, match="dp_clip"):
        make("fedbuff", dp_quantile=0.5)


@pytest.mark.parametrize("rule", [median(), trimmed(0.2), norm_bound(1.0), multi_krum(0.2), outlier()],
                         ids=lambda r: r.name)
def test_central_dp_refuses_a_robust_combine_rule(rule: object) -> None:
    with pytest.raises(ValueError, match="mean rule"):
        fedbuff(10, combine=rule, dp=CentralDP(1.0, 1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mean rule"):
        fedbuff(10, dp=CentralDP(1.0, 1.0), weight_by_samples=True)
    s = fedbuff(10, dp=CentralDP(1.0, 1.0))  # the mean is fine
    assert s.one_update_per_step and s.report is not None


def test_central_dp_refuses_bad_settings() -> None:
    for bad in (CentralDP(0.0, 1.0), CentralDP(-1.0), CentralDP(1.0, -0.5)):
        with pytest.raises(ValueError, match="clip > 0 and noise >= 0"):
            fedbuff(2, dp=bad)

"""The secure-aggregation maths and sessions, without a broker: the unmasked sum is the plain sum within the
quantisation bound, a masked input looks uniform, dropouts are survived, and no member reveals both kinds
of shares of another."""

from __future__ import annotations

import numpy as np
import pytest

from fedmqtt.errors import SecAggAbort
from fedmqtt.secagg import Client, Cohort, Server, default_threshold, field, shamir

DIM = 20_000


def cohort(k: int, degree: int | None = None, threshold: int | None = None, dim: int = DIM) -> Cohort:
    members = tuple(f"d{i:03d}" for i in range(k))
    holders = k if degree is None or degree >= k - 1 else degree + 1
    return Cohort("epoch-1", 3, members, threshold or default_threshold(holders), degree, 1.0, 16, dim)


def through_sharing(c: Cohort, inputs: dict[str, np.ndarray]
                    ) -> tuple[dict[str, Client], Server, dict[str, dict[str, bytes]]]:
    """Every member's client, and the server, through keys, roster and shares: the boxes forwarded to each."""
    clients = {m: Client(m, c, inputs[m], np.random.default_rng(i)) for i, m in enumerate(c.members)}
    server = Server(c)
    for m, cl in clients.items():
        server.add_keys(m, *cl.public_keys())
    roster = server.roster()
    for m in roster:
        server.add_shares(m, clients[m].share_keys(roster))
    return clients, server, server.forward()


def zeros(c: Cohort) -> dict[str, np.ndarray]:
    return {m: np.zeros(c.dim, np.float32) for m in c.members}


def run(c: Cohort, inputs: dict[str, np.ndarray], drop_before_mask: set[str] = frozenset(),  # type: ignore[assignment]
        drop_after_mask: set[str] = frozenset()) -> tuple[np.ndarray, tuple[str, ...]]:  # type: ignore[assignment]
    clients, server, forwarded = through_sharing(c, inputs)
    for m, boxes in forwarded.items():
        if m not in drop_before_mask:
            server.add_masked(m, clients[m].masked_input(boxes))
    survivors = server.survivors()
    for m in survivors:
        if m not in drop_after_mask:
            server.add_reveal(m, *clients[m].reveal(survivors))
    return server.unmask()


def inputs_for(c: Cohort, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: rng.normal(0.0, 0.3, c.dim).astype(np.float32) for m in c.members}


@pytest.mark.parametrize(("k", "degree"), [(5, None), (12, None), (12, 4)])
def test_the_unmasked_sum_is_the_plain_sum_within_the_quantisation_bound(k: int, degree: int | None) -> None:
    c = cohort(k, degree)
    xs = inputs_for(c)
    total, survivors = run(c, xs)
    assert survivors == c.members
    got = field.decode_sum(total, len(survivors), c.clip, c.bits)
    want = np.sum([np.clip(x, -1, 1) for x in xs.values()], axis=0)
    step = 2 * c.clip / (2**c.bits - 1)
    assert np.abs(got - want).max() <= k * step  # each input is off by less than one step
    assert abs(float(np.mean(got - want))) < 0.01 * step * k  # and unbiased: the errors average out


def test_weights_scale_each_input_before_it_is_masked() -> None:
    c = cohort(4)._replace(weights={"d000": 0.5, "d001": 0.25})
    xs = inputs_for(c)
    total, _ = run(c, xs)
    want = sum(np.clip(x * c.weight(m), -1, 1) for m, x in xs.items())
    np.testing.assert_allclose(field.decode_sum(total, 4, 1.0, 16), want, atol=4 * 2 / 65535)


def chi_square_uniform(values: np.ndarray, buckets: int = 256) -> float:
    """The chi-square statistic of the values' top 8 bits against the uniform distribution."""
    counts = np.bincount((values >> 24).astype(np.int64), minlength=buckets)
    expected = len(values) / buckets
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_single_masked_input_is_indistinguishable_from_uniform_noise() -> None:
    c = cohort(6, dim=200_000)
    xs = inputs_for(c)
    xs["d000"] = np.full(c.dim, 0.7, np.float32)  # as far from noise as an input gets
    clients, _, forwarded = through_sharing(c, xs)
    masked = clients["d000"].masked_input(forwarded["d000"])
    # 255 degrees of freedom: the 99.9th percentile of chi-square is 330; the plain encoding is at ~10^7
    assert chi_square_uniform(masked) < 330
    plain = field.encode(xs["d000"], 1.0, 16, np.random.default_rng(0)) << np.uint32(16)
    assert chi_square_uniform(plain) > 10_000  # the same test tells the unmasked input apart at once
    assert abs(np.corrcoef(masked.astype(np.float64), np.arange(c.dim))[0, 1]) < 0.02


@pytest.mark.parametrize("degree", [None, 6])
def test_a_third_of_the_cohort_dropping_after_masking_does_not_stop_the_step(degree: int | None) -> None:
    c = cohort(12, degree)  # thresholds: 7 of 12 holders; 4 of 7 (no 7 neighbours on the ring lose 4 here)
    xs = inputs_for(c)
    gone = {"d001", "d005", "d009", "d010"}  # a third, after their masked inputs arrived
    total, survivors = run(c, xs, drop_after_mask=gone)
    assert set(gone) <= set(survivors)  # their inputs are in the sum: they were sent
    want = np.sum([np.clip(xs[m], -1, 1) for m in survivors], axis=0)
    np.testing.assert_allclose(field.decode_sum(total, len(survivors), 1.0, 16), want, atol=12 * 2 / 65535)


def test_members_that_drop_before_masking_are_left_out_and_their_masks_removed() -> None:
    c = cohort(9)
    xs = inputs_for(c)
    total, survivors = run(c, xs, drop_before_mask={"d002", "d007"})
    assert set(survivors) == set(c.members) - {"d002", "d007"}
    want = np.sum([np.clip(xs[m], -1, 1) for m in survivors], axis=0)
    np.testing.assert_allclose(field.decode_sum(total, 7, 1.0, 16), want, atol=9 * 2 / 65535)


def test_below_the_threshold_the_step_is_abandoned_and_nothing_is_unmasked() -> None:
    c = cohort(6)  # threshold 4
    with pytest.raises(SecAggAbort) as err:
        run(c, inputs_for(c), drop_before_mask={"d000", "d001", "d002"})
    assert err.value.reason == "too_few"
    with pytest.raises(SecAggAbort, match="reveal phase") as err:  # inputs sent, too few reveals to unmask
        run(c, inputs_for(c), drop_after_mask={"d000", "d001", "d002"})
    assert err.value.reason == "too_few"


def test_a_member_never_reveals_both_kinds_of_shares_of_another() -> None:
    c = cohort(6)
    clients, _, forwarded = through_sharing(c, zeros(c))
    for m, boxes in forwarded.items():
        clients[m].masked_input(boxes)
    me = clients["d000"]
    everyone = list(c.members)
    b, s = me.reveal(everyone)  # b shares of all: d003's input is protected by its pairwise masks only ...
    assert set(b) == set(everyone) and s == {}
    assert me.reveal(everyone) == (b, s)  # a lost reply asked again: the same answer
    with pytest.raises(SecAggAbort) as err:  # ... now claim d003 dropped, to get its mask key as well
        me.reveal([m for m in everyone if m != "d003"])
    assert err.value.reason == "double_reveal"
    assert me.revealed["d003"] == "b"
    fresh = clients["d001"]
    with pytest.raises(SecAggAbort, match="threshold"):  # too few survivors: no reveal at all
        fresh.reveal(["d001", "d002"])
    with pytest.raises(SecAggAbort, match="include this member"):
        fresh.reveal(["d002", "d003", "d004", "d005"])
    assert fresh.revealed == {}


def test_a_server_takes_no_reveal_with_both_kinds_for_one_member() -> None:
    c = cohort(4, threshold=3)
    server = Server(c)
    server.phase, server._u3 = "reveal", c.members  # type: ignore[attr-defined]
    with pytest.raises(SecAggAbort, match="both kinds"):
        server.add_reveal("d000", {"d001": 1}, {"d001": 2})


def test_a_tampered_share_is_refused() -> None:
    c = cohort(4, threshold=3)
    clients, _, forwarded = through_sharing(c, zeros(c))
    boxes = dict(forwarded["d000"])
    boxes["d001"] = boxes["d001"][:-1] + bytes([boxes["d001"][-1] ^ 1])
    with pytest.raises(SecAggAbort, match="does not decrypt"):
        clients["d000"].masked_input(boxes)


def test_shamir_needs_the_threshold() -> None:
    secret = bytes(range(1, 33))
    shares = shamir.split(secret, list(range(1, 8)), 4)
    assert shamir.combine({x: shares[x] for x in (7, 2, 5, 1)}, 4) == secret
    three = {x: shares[x] for x in (1, 2, 3)}
    with pytest.raises(ValueError, match="do not belong"):  # 3 of a threshold-4 sharing: a random point
        shamir.combine(three, 3)
    with pytest.raises(ValueError, match="cannot recover"):
        shamir.combine(three, 4)


def test_a_cohort_too_large_for_the_field_is_refused() -> None:
    assert field.max_cohort(16) == 65537
    with pytest.raises(ValueError, match="wrap around"):
        field.check(1.0, 20, field.max_cohort(20) + 1)
    with pytest.raises(SecAggAbort, match="more than half"):
        cohort(6, threshold=3).check()


def test_with_dp_each_member_clips_its_weighted_update_to_the_norm() -> None:
    c = cohort(5)._replace(norm=0.5, weights={"d000": 0.5})
    xs = inputs_for(c)  # norms about 0.3 * sqrt(20000) = 42: every input is clipped
    total, survivors = run(c, xs)
    got = field.decode_sum(total, 5, 1.0, 16)
    want = sum(x * c.weight(m) * 0.5 / np.linalg.norm(x * c.weight(m)) for m, x in xs.items())
    np.testing.assert_allclose(got, want, atol=5 * 2 / 65535)
    assert np.linalg.norm(got) <= 5 * 0.5 + 5 * 2 / 65535 * np.sqrt(c.dim)


def test_a_wrong_share_in_a_reveal_abandons_the_step_instead_of_failing_the_server() -> None:
    c = cohort(4, threshold=3)
    clients, server, forwarded = through_sharing(c, zeros(c))
    for m, boxes in forwarded.items():
        server.add_masked(m, clients[m].masked_input(boxes))
    survivors = server.survivors()
    for m in survivors:
        b, s = clients[m].reveal(survivors)
        server.add_reveal(m, {**b, "d001": b["d001"] + 1} if m == "d000" else b, s)  # one lie
    with pytest.raises(SecAggAbort) as err:
        server.unmask()
    assert err.value.reason == "bad_message"


def test_nan_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="NaN"):
        field.encode(np.array([0.0, np.nan], np.float32), 1.0, 16, np.random.default_rng(0))


def test_malformed_wire_messages_are_refused_with_a_reason() -> None:
    from fedmqtt.secagg import messages as m

    bad = [b"{", b'{"type": "keys", "step": "s", "c_pk": "abc", "s_pk": "abc"}',
           b'{"type": "reveal", "step": "s", "b": {"x": "zz"}, "s": {}}', b'{"type": "nope", "step": "s"}',
           b'{"type": "ready", "update_id": "u", "base_version": -1, "num_samples": 1, "dim": 3}']
    def parse_and_decode(payload: bytes) -> None:
        msg = m.parse_from_agent(payload)
        if isinstance(msg, m.Keys):
            m.unb64(msg.c_pk, 32)  # "abc" is not valid base64 (padding)

    for payload in bad:
        with pytest.raises(SecAggAbort) as err:
            parse_and_decode(payload)
        assert err.value.reason == "bad_message"
    with pytest.raises(SecAggAbort, match="masked input"):
        m.decode_masked(m.encode_masked("s", np.zeros(4, np.uint32)), 5)

"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret is the constant term of a random polynomial of degree t - 1; holder x gets the polynomial at x
(x ≥ 1). Any t shares give the secret back by Lagrange interpolation at 0; fewer reveal nothing about it.

>>> shares = split(bytes(range(32)), holders=[1, 2, 3, 4, 5], threshold=3)
>>> combine({x: shares[x] for x in (2, 4, 5)}, threshold=3) == bytes(range(32))
True
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1  # a Mersenne prime: every 32-byte secret is an element of the field
SHARE_BYTES = 66  # 521 bits


def split(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` for the holders at x = ``holders`` (distinct, ≥ 1); any ``threshold`` recover it."""
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(holders)} holders")
    if len(set(holders)) != len(holders) or min(holders) < 1:
        raise ValueError("holders are distinct positive points")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in holders}


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (any of them; the first ``threshold`` are used)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares cannot recover a secret shared with threshold {threshold}")
    secret = _interpolate(sorted(shares.items())[:threshold], 0)
    if secret >= 2**256:
        raise ValueError("the shares do not belong to one 32-byte secret")
    return secret.to_bytes(32, "big")


def consistent(shares: Mapping[int, int], threshold: int) -> bool:
    """True when one more share lies on the polynomial through the first ``threshold`` (sorted by x), or
    there is no more. A wrong share among those :func:`combine` uses is then detected (a lone liar); a wrong
    extra share makes this False too, though the secret would have come out right."""
    points = sorted(shares.items())
    if len(points) <= threshold:
        return True
    x, y = points[threshold]
    return _interpolate(points[:threshold], x) == y


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    value = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        value = (value + yi * num * pow(den, -1, PRIME)) % PRIME
    return value


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y

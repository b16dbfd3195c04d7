"""A secure-aggregation cohort: who takes part in one step, the sharing graph, and the key derivations both
sides use. Pure values and functions; no I/O.

The graph is SecAgg+'s (Bell et al. 2020): members sorted, each one's neighbours the ``degree`` nearest on a
ring (a Harary graph), or everyone when ``degree`` is None. A member masks its input pairwise with its
neighbours and shares its two secrets among its *holders*: its neighbours and itself, ``threshold`` of whom
recover them. Holder ``v`` is the point x = index of ``v`` + 1 of the Shamir polynomials.

>>> c = Cohort("e-1", 7, ("a", "b", "c", "d", "e"), threshold=2, degree=2, clip=1.0, bits=16, dim=3)
>>> c.neighbours("a"), c.holders("c")
(('b', 'e'), ('b', 'c', 'd'))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmqtt.errors import SecAggAbort
from fedmqtt.secagg import field


class Cohort(NamedTuple):
    step: str  # unique per step (the aggregator's epoch and a counter): keys and masks never repeat
    version: int  # the global version when the cohort formed
    members: tuple[str, ...]  # sorted agent ids
    threshold: int  # holders needed to recover a member's secrets
    degree: int | None  # neighbours per member (even; None: everyone)
    clip: float  # coordinates are clipped to [-clip, clip] ...
    bits: int  # ... and encoded with this many bits
    dim: int  # coordinates in the flattened update
    weights: Mapping[str, float] = {}  # member -> staleness weight it multiplies its update by (default 1)
    norm: float | None = None  # with DP: members clip their weighted update to this L2 norm before encoding

    def check(self) -> None:
        n = len(self.members)
        if list(self.members) != sorted(set(self.members)):
            raise SecAggAbort("bad_message", "cohort members must be sorted and distinct")
        try:
            field.check(self.clip, self.bits, n)
        except ValueError as exc:  # a cohort the aggregator should never have formed: a protocol error
            raise SecAggAbort("bad_message", str(exc)) from exc
        if self.norm is not None and not 0.0 < self.norm < float("inf"):
            raise SecAggAbort("bad_message", f"the L2 clip norm must be positive and finite, not {self.norm}")
        if self.degree is not None and (self.degree < 2 or self.degree % 2):
            raise SecAggAbort("bad_message", f"the degree must be even and at least 2, not {self.degree}")
        smallest = min(len(self.holders(m)) for m in self.members) if n else 0
        if not smallest // 2 < self.threshold <= smallest:
            raise SecAggAbort("bad_message", f"threshold {self.threshold} must be more than half of the "
                              f"{smallest} holders of each secret and at most all of them")

    def position(self, agent: str) -> int:
        return self.members.index(agent)

    def neighbours(self, agent: str) -> tuple[str, ...]:
        n, i = len(self.members), self.position(agent)
        if self.degree is None or self.degree >= n - 1:
            return tuple(m for m in self.members if m != agent)
        near = {(i + d) % n for d in range(1, self.degree // 2 + 1)} | {(i - d) % n for d in
                                                                      range(1, self.degree // 2 + 1)}
        return tuple(self.members[j] for j in sorted(near))

    def holders(self, agent: str) -> tuple[str, ...]:
        return tuple(sorted((*self.neighbours(agent), agent)))

    def x(self, agent: str) -> int:
        return self.position(agent) + 1

    def weight(self, agent: str) -> float:
        return float(self.weights.get(agent, 1.0))


def default_threshold(holders: int) -> int:
    """More than half of a secret's holders: fewer than half may vanish, and no minority can unmask."""
    return holders // 2 + 1


def agree(private: X25519PrivateKey, public: bytes, purpose: str, step: str) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 of the X25519 shared secret, bound to purpose and step."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise SecAggAbort("bad_message", f"not an X25519 public key ({exc})") from exc
    info = f"fedmqtt-secagg/{purpose}/{step}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def sign(me: str, other: str) -> int:
    """A member adds the pairwise mask it shares with a member after it in order, and subtracts the other."""
    return 1 if me < other else -1

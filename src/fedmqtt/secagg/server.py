"""The aggregator's side of one secure-aggregation step: sans-I/O, it collects each phase's messages and,
when the service closes the phase (all members answered, or a deadline), says what to send next.

Members that answer a phase form the next phase's set: U1 (keys) ⊇ U2 (shares) ⊇ U3 (masked inputs, the
survivors whose updates are summed) ⊇ U4 (reveals). Every set must hold at least ``threshold`` members and
every secret needed must reach ``threshold`` shares, else the step is abandoned (``SecAggAbort``): nothing
is unmasked and the members' updates go to a later cohort. What the aggregator learns is the sum of the U3
inputs: each masked input is uniform on its own (the self mask b), and the pairwise masks of the dropped
members are removed with their s keys, never a survivor's. A wrong share in a reveal is detected when more
than ``threshold`` shares of that secret arrive (they must all lie on one polynomial), and the step is
abandoned; with exactly ``threshold`` it cannot be, and the sum comes out wrong (members are trusted to
follow the protocol, docs/security.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmqtt.errors import SecAggAbort
from fedmqtt.secagg import field, shamir
from fedmqtt.secagg.client import Shares
from fedmqtt.secagg.cohort import Cohort, agree, sign

Roster = dict[str, tuple[bytes, bytes]]


class Server:
    def __init__(self, cohort: Cohort) -> None:
        cohort.check()
        self.cohort = cohort
        self.keys: Roster = {}
        self.shares: dict[str, Mapping[str, bytes]] = {}  # sender -> receiver -> ciphertext
        self.masked: dict[str, np.ndarray] = {}
        self.reveals: dict[str, tuple[Shares, Shares]] = {}
        self.phase = "keys"
        self._u1: Roster = {}
        self._u2: frozenset[str] = frozenset()
        self._u3: tuple[str, ...] = ()

    # ---- what members send -----------------------------------------------------------------------------
    def add_keys(self, agent: str, c_pk: bytes, s_pk: bytes) -> None:
        self._expect("keys", agent, self.cohort.members)
        if len(c_pk) != 32 or len(s_pk) != 32:
            raise SecAggAbort("bad_message", f"{agent}: X25519 public keys have 32 bytes")
        self.keys[agent] = (c_pk, s_pk)

    def add_shares(self, agent: str, boxes: Mapping[str, bytes]) -> None:
        self._expect("shares", agent, self._u1)
        allowed = set(self.cohort.holders(agent)) & set(self._u1) - {agent}
        if set(boxes) != allowed:
            raise SecAggAbort("bad_message", f"{agent}: shares for {sorted(boxes)}, expected {sorted(allowed)}")
        self.shares[agent] = dict(boxes)

    def add_masked(self, agent: str, y: np.ndarray) -> None:
        self._expect("masked", agent, self._u2)
        if y.dtype != np.uint32 or y.shape != (self.cohort.dim,):
            raise SecAggAbort("bad_message", f"{agent}: a masked input is uint32 of shape ({self.cohort.dim},)")
        self.masked[agent] = y

    def add_reveal(self, agent: str, b: Shares, s: Shares) -> None:
        self._expect("reveal", agent, self._u3)
        if set(b) & set(s):
            raise SecAggAbort("bad_message", f"{agent} revealed both kinds of shares of one member")
        if set(b) - set(self._u3) or set(s) & set(self._u3):
            raise SecAggAbort("bad_message", f"{agent}: b shares are for survivors, s shares for the others")
        self.reveals[agent] = (dict(b), dict(s))

    def _expect(self, phase: str, agent: str, allowed: Mapping[str, object] | frozenset[str] | tuple[str, ...]
                ) -> None:
        if self.phase != phase:
            raise SecAggAbort("phase", f"{agent} sent a {phase} message in the {self.phase} phase")
        if agent not in allowed:
            raise SecAggAbort("bad_message", f"{agent} is not in this phase's set")

    # ---- closing each phase: what to send next ----------------------------------------------------------
    def roster(self) -> Roster:
        """Closes the keys phase: U1's keys, sent to every member of U1."""
        self._close("keys", "shares", len(self.keys))
        self._u1 = dict(self.keys)
        return self._u1

    def forward(self) -> dict[str, dict[str, bytes]]:
        """Closes the shares phase: for each member of U2, the ciphertexts addressed to it."""
        self._close("shares", "masked", len(self.shares))
        self._u2 = frozenset(self.shares)
        out: dict[str, dict[str, bytes]] = {v: {} for v in self._u2}
        for u, boxes in self.shares.items():
            for v, box in boxes.items():
                if v in self._u2:
                    out[v][u] = box
        return out

    def survivors(self) -> tuple[str, ...]:
        """Closes the masked phase: U3, whose inputs are summed; sent to each of them."""
        self._close("masked", "reveal", len(self.masked))
        self._u3 = tuple(sorted(self.masked))
        return self._u3

    def unmask(self) -> tuple[np.ndarray, tuple[str, ...]]:
        """Closes the reveal phase: (the uint32 sum of the survivors' encoded inputs, the survivors)."""
        self._close("reveal", "done", len(self.reveals))
        c, dim = self.cohort, self.cohort.dim
        total = np.zeros(dim, np.uint32)
        for y in self.masked.values():
            total += y
        for u in self._u3:  # every survivor's self mask
            total -= field.prg(self._secret(u, 0), dim)
        for v in self._u2 - set(self._u3):  # the pairwise masks survivors added with members that dropped
            s_key = X25519PrivateKey.from_private_bytes(self._secret(v, 1))
            for u in c.neighbours(v):
                if u in self._u3:
                    mask = field.prg(agree(s_key, self._u1[u][1], "mask", c.step), dim)
                    total = total - mask if sign(u, v) > 0 else total + mask
        return total, self._u3

    def _secret(self, member: str, kind: int) -> bytes:
        """member's b seed (kind 0: from the b shares) or s private key (kind 1), from the reveals."""
        c = self.cohort
        got = {c.x(h): pair[kind][member] for h, pair in self.reveals.items() if member in pair[kind]}
        if len(got) < c.threshold:
            what = "self-mask seed" if kind == 0 else "mask key"
            raise SecAggAbort("too_few", f"{len(got)} shares of {member}'s {what}, threshold {c.threshold}")
        if not shamir.consistent(got, c.threshold):
            raise SecAggAbort("bad_message", f"the shares of {member}'s secret do not agree: a member lied")
        try:
            return shamir.combine(got, c.threshold)
        except ValueError as exc:  # a member revealed a wrong share
            raise SecAggAbort("bad_message", f"the shares of {member}'s secret do not agree: {exc}") from exc

    def _close(self, phase: str, following: str, answered: int) -> None:
        if self.phase != phase:
            raise SecAggAbort("phase", f"closing {phase} in the {self.phase} phase")
        if answered < self.cohort.threshold:
            self.phase = "aborted"
            raise SecAggAbort("too_few", f"{answered} members answered the {phase} phase, "
                              f"threshold {self.cohort.threshold}")
        self.phase = following

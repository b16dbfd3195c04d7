"""A member's side of one secure-aggregation step (Bonawitz et al. 2017, with SecAgg+'s sparse graph):
sans-I/O, one call per message from the aggregator, each returning what to send back.

1. ``public_keys``: two fresh X25519 key pairs, c (to encrypt shares) and s (to derive pairwise masks).
2. ``share_keys(roster)``: the self-mask seed b and the s private key, each split into Shamir shares among
   the member's holders in the roster, and each holder's two shares encrypted to it (AES-256-GCM under the
   key agreed from the c keys, the step and both ids as associated data).
3. ``masked_input(received)``: the shares addressed to this member, checked and kept; the update times
   its weight (clipped to the cohort's L2 ``norm`` when DP is on), encoded (field.py), plus PRG(b), plus
   ±PRG(s_uv) for every neighbour v whose shares arrived (cohort.sign).
4. ``reveal(survivors)``: for each member whose shares it holds, the b share if that member is a survivor
   and the s share if not. **Never both**: the kind revealed for each member is remembered for the step,
   and a request that would reveal the other kind (a second survivor list that differs) is refused, as is a
   survivor list shorter than the threshold or one without this member. Either reveal alone tells the
   aggregator nothing about an input; both would unmask a survivor's input alone.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fedmqtt.errors import SecAggAbort
from fedmqtt.secagg import field, shamir
from fedmqtt.secagg.cohort import Cohort, agree, sign

Shares = dict[str, int]  # member -> share (of that member's secret), as revealed to the aggregator


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def aad(step: str, sender: str, receiver: str) -> bytes:
    return f"{step}\n{sender}\n{receiver}".encode()


class Client:
    """One member's state for one step. ``values`` is its flattened update, already times its weight."""

    def __init__(self, agent: str, cohort: Cohort, values: np.ndarray, rng: np.random.Generator | None = None):
        cohort.check()
        if agent not in cohort.members:
            raise SecAggAbort("bad_message", f"{agent} is not a member of cohort {cohort.step}")
        if np.shape(values) != (cohort.dim,):
            raise SecAggAbort("bad_message", f"the update has shape {np.shape(values)}, the cohort ({cohort.dim},)")
        self.agent, self.cohort = agent, cohort
        self._values = np.asarray(values, np.float32)
        self._rng = rng or np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
        self._c, self._s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._b = secrets.token_bytes(32)
        self._held: dict[str, tuple[int, int]] = {}  # member -> (its s share, its b share) held by us
        self._roster: Mapping[str, tuple[bytes, bytes]] = {}
        self.revealed: dict[str, str] = {}  # member -> "b" or "s": the one kind ever revealed for it
        self._answer: tuple[tuple[str, ...], tuple[Shares, Shares]] | None = None

    def public_keys(self) -> tuple[bytes, bytes]:
        return raw_public(self._c), raw_public(self._s)

    def share_keys(self, roster: Mapping[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
        """Encrypted shares for each holder in ``roster`` (members whose keys the aggregator collected)."""
        c = self.cohort
        if roster.get(self.agent) != self.public_keys():
            raise SecAggAbort("bad_message", "the roster does not carry this member's own keys")
        if not set(roster) <= set(c.members):
            raise SecAggAbort("bad_message", "the roster names agents outside the cohort")
        if len({k for pair in roster.values() for k in pair}) != 2 * len(roster):
            raise SecAggAbort("bad_message", "two roster entries share a key")
        holders = [v for v in c.holders(self.agent) if v in roster]
        if len(holders) < c.threshold:
            raise SecAggAbort("too_few", f"{len(holders)} holders in the roster, threshold {c.threshold}")
        self._roster = dict(roster)
        xs = [c.x(v) for v in holders]
        s_shares = shamir.split(raw_private(self._s), xs, c.threshold)
        b_shares = shamir.split(self._b, xs, c.threshold)
        out: dict[str, bytes] = {}
        for v in holders:
            pair = (s_shares[c.x(v)], b_shares[c.x(v)])
            if v == self.agent:
                self._held[v] = pair
                continue
            key = agree(self._c, roster[v][0], "share", c.step)
            plain = b"".join(s.to_bytes(shamir.SHARE_BYTES, "big") for s in pair)
            nonce = os.urandom(12)
            out[v] = nonce + AESGCM(key).encrypt(nonce, plain, aad(c.step, self.agent, v))
        return out

    def masked_input(self, received: Mapping[str, bytes]) -> np.ndarray:
        """The masked update, given the shares the aggregator forwarded to this member."""
        c = self.cohort
        if not self._roster:
            raise SecAggAbort("phase", "shares came before the roster")
        for u, box in received.items():
            if u not in self._roster or u == self.agent or self.agent not in c.holders(u):
                raise SecAggAbort("bad_message", f"a share from {u}, who does not share with this member")
            key = agree(self._c, self._roster[u][0], "share", c.step)
            try:
                plain = AESGCM(key).decrypt(box[:12], box[12:], aad(c.step, u, self.agent))
            except (InvalidTag, ValueError) as exc:
                raise SecAggAbort("bad_message", f"the share from {u} does not decrypt") from exc
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecAggAbort("bad_message", f"the share from {u} has {len(plain)} bytes")
            self._held[u] = (int.from_bytes(plain[: shamir.SHARE_BYTES], "big"),
                             int.from_bytes(plain[shamir.SHARE_BYTES :], "big"))
        if len(self._held) < c.threshold:
            raise SecAggAbort("too_few", f"shares from {len(self._held)} members, threshold {c.threshold}")
        x = self._values * np.float32(c.weight(self.agent))
        if c.norm is not None:  # central DP: the sum's sensitivity to one member is the norm
            x = x * np.float32(min(1.0, c.norm / max(float(np.linalg.norm(x)), 1e-30)))
        y = field.encode(x, c.clip, c.bits, self._rng)
        y += field.prg(self._b, c.dim)
        for v in c.neighbours(self.agent):
            if v in self._held:  # v reached the sharing phase: the aggregator can remove our mask if v drops
                mask = field.prg(agree(self._s, self._roster[v][1], "mask", c.step), c.dim)
                y = y + mask if sign(self.agent, v) > 0 else y - mask
        return y

    def reveal(self, survivors: Sequence[str]) -> tuple[Shares, Shares]:
        """(b shares of the survivors, s shares of the others) among the members whose shares we hold."""
        c, alive = self.cohort, tuple(sorted(set(survivors)))
        if self._answer is not None:
            if self._answer[0] == alive:
                return self._answer[1]  # the same request again (a lost reply): the same answer
            raise SecAggAbort("double_reveal", "a second, different survivor list for this step")
        if self.agent not in alive or not set(alive) <= set(c.members):
            raise SecAggAbort("bad_message", "the survivors must be cohort members and include this member")
        if len(alive) < c.threshold:
            raise SecAggAbort("too_few", f"{len(alive)} survivors, threshold {c.threshold}")
        b = {v: pair[1] for v, pair in self._held.items() if v in alive}
        s = {v: pair[0] for v, pair in self._held.items() if v not in alive}
        self.revealed = {**dict.fromkeys(b, "b"), **dict.fromkeys(s, "s")}
        self._answer = (alive, (b, s))
        return b, s

"""Participation sampling's coin (central DP with ``CentralDP(sampling=q)``, docs/security.md): whether the
server takes a device's update in a step. Pure; the key is the server's secret (``core.Rules.sampling_key``).
"""

from __future__ import annotations

import hashlib
import hmac


def sampled(key: bytes, epoch: str, step: int, agent: str, q: float) -> bool:
    """The server's coin for ``agent`` in step ``step``: True with probability ``q``. A keyed hash, so every
    update of a device in one step gets the same answer (re-sending does not buy another draw), coins of
    different steps and devices are independent, and nobody without the key can predict them.

    >>> [sampled(b"k", "e", 3, "a", q) for q in (0.0, 1.0)]
    [False, True]
    >>> sum(sampled(b"k", "e", 3, f"a{i}", 0.25) for i in range(4000))  # about 1,000
    997
    """
    digest = hmac.new(key, f"{epoch}/{step}/{agent}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") < q * 2.0 ** 64

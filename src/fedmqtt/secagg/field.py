"""Fixed-point encoding of updates into Z_(2^32), and the PRG that expands a 32-byte seed into a mask.

Every coordinate x (already multiplied by its staleness weight, ≤ 1) is clipped to [-c, c] and mapped to an
integer in [0, 2^b - 1] by stochastic rounding, which is unbiased:

    q = floor((x + c) / (2c) · (2^b - 1) + u),   u ~ U[0, 1)

Masked values and masks live in Z_(2^32) (numpy ``uint32`` arithmetic wraps, which is the modular
reduction). A sum of n encoded values is at most n·(2^b - 1), below 2^32 for n ≤ 2^(32-b) + 1, so the sum
of a cohort is exact in the field; ``decode_sum`` maps it back: Σx ≈ S·2c/(2^b - 1) - n·c. Each encoded
coordinate is off by less than one step 2c/(2^b - 1) (3.1e-5 for c = 1, b = 16), with mean zero.

>>> import numpy as np
>>> x = np.array([-2.0, -0.5, 0.0, 0.25, 2.0], np.float32)
>>> q = encode(x, clip=1.0, bits=16, rng=np.random.default_rng(0))
>>> (np.round(decode_sum(q, 1, clip=1.0, bits=16), 4) + 0.0).tolist()  # clipped at ±1
[-1.0, -0.5, 0.0, 0.25, 1.0]
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MODULUS_BITS = 32


def max_cohort(bits: int) -> int:
    """The largest cohort whose sum of ``bits``-bit values cannot wrap around 2^32."""
    return int((2**MODULUS_BITS - 1) // (2**bits - 1))


def check(clip: float, bits: int, cohort: int) -> None:
    if not 0.0 < clip < float("inf"):
        raise ValueError(f"the clip range must be positive and finite, not {clip}")
    if not 2 <= bits <= 24:
        raise ValueError(f"encode with 2 to 24 bits per coordinate, not {bits}")
    if cohort > max_cohort(bits):
        raise ValueError(f"a cohort of {cohort} at {bits} bits can wrap around 2^32 (at most {max_cohort(bits)})")


def encode(x: np.ndarray, clip: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Flat float values -> uint32 in [0, 2^bits - 1], clipped to [-clip, clip], stochastically rounded."""
    if not np.isfinite(x).all():
        raise ValueError("cannot encode NaN or infinite values")
    levels = float(2**bits - 1)
    y = (np.clip(np.asarray(x, np.float64), -clip, clip) + clip) * (levels / (2 * clip))
    q = np.floor(y + rng.random(y.shape))
    return np.minimum(q, levels).astype(np.uint32)


def decode_sum(total: np.ndarray, count: int, clip: float, bits: int) -> np.ndarray:
    """The sum of ``count`` encoded vectors (uint32, exact) -> the float32 sum of what they encoded."""
    step = 2 * clip / float(2**bits - 1)
    return (np.asarray(total, np.float64) * step - count * clip).astype(np.float32)


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random uint32 from a 32-byte seed: the AES-256-CTR keystream (zero nonce; each seed is
    used for one mask only)."""
    if len(seed) != 32:
        raise ValueError("a mask seed has 32 bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(4 * n)) + enc.finalize(), dtype="<u4").astype(np.uint32)

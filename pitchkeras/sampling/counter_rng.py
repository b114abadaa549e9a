"""Counter-based random numbers: one uniform number per (row key, position), independent of the batch.

A request's randomness depends only on its own seed and the position being
sampled, so its text is the same alone or batched with other requests.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def row_keys(seeds: Sequence[int]) -> np.ndarray:
    """Per-row random keys: (batch, 2) uint32 from 64-bit seeds (splitmix64)."""
    keys = np.empty((len(seeds), 2), dtype=np.uint32)
    for i, seed in enumerate(seeds):
        z = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
        keys[i] = (z >> 32, z & 0xFFFFFFFF)
    return keys


def _uint32(value: int):
    from keras import ops

    return ops.convert_to_tensor(np.uint32(value), dtype="uint32")


def _fmix32(x):
    """MurmurHash3's 32-bit finaliser: a cheap, well-mixed bijection on uint32."""
    from keras import ops

    def shift_xor(x, n):
        return ops.bitwise_xor(x, ops.right_shift(x, _uint32(n)))

    x = ops.multiply(shift_xor(x, 16), _uint32(0x85EBCA6B))
    x = ops.multiply(shift_xor(x, 13), _uint32(0xC2B2AE35))
    return shift_xor(x, 16)


def counter_uniform(keys, position):
    """One uniform number in [0, 1) per row from (row key, position): stateless, per row.

    Args:
        keys: uint32 tensor of shape (batch, 2), from `row_keys`.
        position: int tensor. The sequence position being sampled.
    """
    from keras import ops

    keys = ops.convert_to_tensor(keys, dtype="uint32")
    counter = ops.multiply(ops.cast(position, "uint32"), _uint32(0x9E3779B9))
    x = _fmix32(ops.bitwise_xor(keys[:, 0], counter))
    x = _fmix32(ops.bitwise_xor(x, keys[:, 1]))
    # The top 24 bits fill a float32 mantissa exactly: u in [0, 1 - 2**-24].
    return ops.cast(ops.right_shift(x, _uint32(8)), "float32") * (1.0 / (1 << 24))

"""Binary hash codes: sign binarisation, bit packing and Hamming distance on packed codes.

A B-bit code is B/8 bytes (np.packbits order: the first bit is the high bit of byte 0). Bit 1 means +1, bit 0
means -1; a pre-sign value of exactly 0 counts as +1, so every value has one code. The score the model ranks by is
the inner product of the +-1 codes, B - 2 * Hamming.
"""

from __future__ import annotations

import numpy as np


class CodeError(ValueError):
    """Codes of the wrong dtype, width or bit count."""


def pack_signs(values) -> np.ndarray:
    """Pack the signs of pre-sign values [..., B] (numpy or torch) into uint8 codes [..., B/8]."""
    array = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
    if array.shape[-1] % 8:
        raise CodeError(f"code length must be a multiple of 8 bits, got {array.shape[-1]}")
    return np.packbits(array >= 0, axis=-1)


def unpack_signs(codes: np.ndarray, bits: int | None = None) -> np.ndarray:
    """The +-1 float32 codes [..., B] of packed codes [..., B/8]."""
    codes = _as_codes(codes)
    unpacked = np.unpackbits(codes, axis=-1, count=bits).astype(np.float32)
    return unpacked * 2.0 - 1.0


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances [N, M] (int32) between packed codes a [N, W] and b [M, W]."""
    a, b = _as_codes(a), _as_codes(b)
    if a.shape[-1] != b.shape[-1]:
        raise CodeError(f"codes of {a.shape[-1] * 8} and {b.shape[-1] * 8} bits cannot be compared")
    words_a, words_b = as_words(a), as_words(b)
    xor = words_a[:, None, :] ^ words_b[None, :, :]
    return np.bitwise_count(xor).sum(axis=-1, dtype=np.int32)


def as_words(codes: np.ndarray) -> np.ndarray:
    """View packed codes [N, W] as the widest unsigned words that divide W, for fewer XOR/popcount operations."""
    codes = np.ascontiguousarray(_as_codes(codes)).reshape(-1, codes.shape[-1])
    width = codes.shape[-1]
    for dtype, size in ((np.uint64, 8), (np.uint32, 4), (np.uint16, 2)):
        if width % size == 0:
            return codes.view(dtype)
    return codes


def score(distance: np.ndarray, bits: int) -> np.ndarray:
    """The +-1 inner product b_s . b_v from a Hamming distance."""
    return bits - 2 * np.asarray(distance, dtype=np.int32)


def _as_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise CodeError(f"packed codes must be uint8, got {codes.dtype}")
    return codes

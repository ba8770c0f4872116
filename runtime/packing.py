"""The runtime's one numpy copy of MatMulNBits code packing (torch-free; the compress side's copy is
edgellm/quant/packing.py, tested against this one in tests/test_packing.py): a byte holds one 8-bit
code, or two 4-bit codes, low nibble first (column 2j in bits 0-3, column 2j+1 in bits 4-7)."""

from __future__ import annotations

import numpy as np


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 (..., m) -> codes uint8 (..., m) for 8 bits, (..., 2m) for 4 bits."""
    if bits == 8:
        return packed
    return np.stack((packed & 15, packed >> 4), -1).reshape(*packed.shape[:-1], -1)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes uint8 (..., c) -> packed uint8 (..., c) for 8 bits, (..., c/2) for 4 bits (c even)."""
    if bits == 8:
        return codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def zero_points(zp: np.ndarray, n: int, nb: int, bits: int) -> np.ndarray:
    """MatMulNBits zero points -> float32 (n, nb): packed uint8 codes (n, ceil(nb*bits/8)), or
    float16 values (n*nb,) (`zero="float"` formats, exported as fp16 and Cast like the scales)."""
    if zp.dtype == np.float16:
        return zp.reshape(n, nb).astype(np.float32)
    return unpack_codes(zp.reshape(n, -1), bits)[:, :nb].astype(np.float32)

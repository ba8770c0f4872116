"""Quantized weight formats as data, and the one copy of their packing (gguf-py `quants.py` style).

A packed linear (out n, in k) is MatMulNBits' layout, exactly what ONNX Runtime reads:

    P.qweight  uint8 (n, n_blocks, block * bits / 8)   codes, two 4-bit codes a byte, low nibble first
                                                       (column 2j in bits 0-3, column 2j+1 in bits 4-7)
    P.scales   float16 (n * n_blocks,)                 one scale per (row, block); fp32 in older exports
    P.qzeros   asymmetric formats only: uint8 (n * ceil(n_blocks * bits / 8),) packed integer zero
               points, or float16 (n * n_blocks,) float zero points (`zero="float"`, Q4_1 style)

    w[r, c] = (code[r, c] - zero[r, c // block]) * scale[r, c // block]

Symmetric formats have no stored zero points: the zero point is 2**(bits-1). When k is not a
multiple of the block, the last block is padded (its padding codes decode to 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = (4, 8)  # codes a byte: 2 or 1
ZERO_KINDS = ("none", "int", "float")  # symmetric | packed uint8 codes | fp16 values
MIN_BLOCK = 16  # blocks are powers of two >= 16 (the kernels' lanes and ONNX Runtime's MatMulNBits)


@dataclass(frozen=True)
class BlockFormat:
    """One quantized format: `bits` per code, `block` columns per scale, the zero-point kind."""

    bits: int
    block: int
    zero: str = "none"

    @property
    def blob(self) -> int:
        """Bytes of codes per block (MatMulNBits' blob size)."""
        return self.block * self.bits // 8

    @property
    def zero_bits(self) -> int:
        return {"none": 0, "int": self.bits, "float": 16}[self.zero]

    @property
    def bits_per_weight(self) -> float:
        """Codes + the fp16 scale + the zero point, per weight."""
        return (self.blob * 8 + 16 + self.zero_bits) / self.block

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def n_blocks(self, k: int) -> int:
        return -(-k // self.block)

    def problem(self) -> str | None:
        """Why this is not a valid format (None when it is)."""
        if self.bits not in BITS:
            return f"{self.bits}-bit codes (supported: {', '.join(map(str, BITS))})"
        if self.block < MIN_BLOCK or self.block & (self.block - 1):
            return f"blocks of {self.block} columns (blocks are powers of two >= {MIN_BLOCK})"
        if self.zero not in ZERO_KINDS:
            return f"zero points {self.zero!r} (supported: {', '.join(ZERO_KINDS)})"
        return None


def from_blob(bits: int, blob: int, zero: str = "none") -> BlockFormat:
    """The format of a packed weight whose last dimension holds `blob` bytes a block."""
    return BlockFormat(bits, blob * 8 // bits, zero)


# ----------------------------------------------------------------------------- packing (the one copy)
def pack_codes(codes: np.ndarray, bits: int, pad_odd: bool = False) -> np.ndarray:
    """uint8 codes (..., c) -> packed uint8 (..., c) for 8 bits, (..., c/2) for 4 bits.
    An odd c is an error unless `pad_odd` (then a zero code is appended, as MatMulNBits' packed
    zero points do)."""
    if bits not in BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: 4, 8")
    c = np.asarray(codes).astype(np.uint8, copy=False)
    if bits == 8:
        return c.copy()
    if c.shape[-1] % 2:
        if not pad_odd:
            raise ValueError(f"4-bit packing needs an even number of codes per row, got {c.shape[-1]}")
        c = np.concatenate([c, np.zeros((*c.shape[:-1], 1), np.uint8)], -1)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_codes: packed uint8 (..., m) -> codes uint8 (..., m * 8 // bits)."""
    if bits not in BITS:
        raise ValueError(f"cannot unpack {bits}-bit codes; supported: 4, 8")
    if bits == 8:
        return packed
    return np.stack((packed & 15, packed >> 4), -1).reshape(*packed.shape[:-1], -1)


def zero_points(zp: np.ndarray, n: int, nb: int, bits: int) -> np.ndarray:
    """Stored MatMulNBits zero points -> float32 (n, nb): packed uint8 codes (n, ceil(nb*bits/8)),
    or float16 values (n*nb,) (`zero="float"` formats)."""
    if zp.dtype == np.float16:
        return zp.reshape(n, nb).astype(np.float32)
    return unpack_codes(zp.reshape(n, -1), bits)[:, :nb].astype(np.float32)


def zero_kind(zp: np.ndarray | None) -> str:
    """The zero-point kind of a stored `qzeros` tensor (None: symmetric)."""
    return "none" if zp is None else "float" if zp.dtype == np.float16 else "int"


# ----------------------------------------------------------------------------- numpy reference
def dequantize(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, k: int) -> np.ndarray:
    """Packed weights (n, nb, blob) + scales (n*nb) + unpacked zero points (n, nb) or None ->
    float32 (n, k): (code - zero) * scale, padding dropped."""
    n, nb, _ = qweight.shape
    codes = unpack_codes(qweight, bits).reshape(n, nb, -1)
    z = (1 << (bits - 1)) if zeros is None else zeros.reshape(n, nb, 1).astype(np.float32)
    w = (codes.astype(np.float32) - z) * scales.reshape(n, nb, 1).astype(np.float32)
    return w.reshape(n, -1)[:, :k]

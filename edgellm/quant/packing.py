"""Packing of unsigned codes into bytes, in ONNX Runtime MatMulNBits' layout.

4-bit: two codes per byte, the even column in the low nibble:  byte = q[2i] | q[2i+1] << 4.
8-bit: one code per byte. A packed weight has shape (out, n_groups, group_size * bits / 8),
exactly MatMulNBits' input B, so the exporter writes it without touching the values.
"""

from __future__ import annotations

import torch


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., gs) -> packed uint8 (..., gs * bits // 8)."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits != 4:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: 4, 8")
    if codes.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even number of codes per row, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack: packed uint8 (..., nbytes) -> codes uint8 (..., nbytes * 8 // bits)."""
    if bits == 8:
        return packed
    if bits != 4:
        raise ValueError(f"cannot unpack {bits}-bit codes; supported: 4, 8")
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)

"""Packing of unsigned codes into bytes, in ONNX Runtime MatMulNBits' layout: the one copy for
the torch side (quantize, save, load) and the exporter, which calls it on numpy arrays. The
torch-free runtime keeps its own numpy copy (runtime/packing.py; tests/test_packing.py checks they agree).

4-bit: two codes per byte, the even column in the low nibble:  byte = q[2i] | q[2i+1] << 4.
8-bit: one code per byte. A packed weight has shape (out, n_groups, group_size * bits / 8),
exactly MatMulNBits' input B, so the exporter writes it without touching the values.
Both functions take a torch.Tensor or a numpy array and return the same kind.
"""

from __future__ import annotations


def _is_numpy(a) -> bool:
    return type(a).__module__ == "numpy"


def _u8(a):
    if _is_numpy(a):
        import numpy as np

        return a.astype(np.uint8, copy=False)
    import torch

    return a.to(torch.uint8)


def pack(codes, bits: int, pad_odd: bool = False):
    """uint8 codes (..., gs) -> packed uint8 (..., gs * bits // 8). An odd last dimension is an
    error unless `pad_odd` (then a zero code is appended, as MatMulNBits' packed zero points do)."""
    if bits == 8:
        c = _u8(codes)
        return c.copy() if _is_numpy(c) else c.contiguous()
    if bits != 4:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: 4, 8")
    c = _u8(codes)
    if c.shape[-1] % 2:
        if not pad_odd:
            raise ValueError(f"4-bit packing needs an even number of codes per row, got {c.shape[-1]}")
        if _is_numpy(c):
            import numpy as np

            c = np.concatenate([c, np.zeros((*c.shape[:-1], 1), np.uint8)], -1)
        else:
            import torch

            c = torch.cat([c, torch.zeros((*c.shape[:-1], 1), dtype=torch.uint8)], -1)
    out = c[..., 0::2] | (c[..., 1::2] << 4)
    return _u8(out) if _is_numpy(out) else out.contiguous()


def unpack(packed, bits: int):
    """Inverse of pack: packed uint8 (..., nbytes) -> codes uint8 (..., nbytes * 8 // bits)."""
    if bits == 8:
        return packed
    if bits != 4:
        raise ValueError(f"cannot unpack {bits}-bit codes; supported: 4, 8")
    lo = packed & 0x0F
    hi = packed >> 4
    if _is_numpy(packed):
        import numpy as np

        return np.stack((lo, hi), axis=-1).reshape(*packed.shape[:-1], -1)
    import torch

    return torch.stack((lo, hi), dim=-1).flatten(-2)

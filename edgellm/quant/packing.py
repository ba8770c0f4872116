"""Code packing for the torch side: torch tensors through the one copy of the packing maths,
edgellm.runtime.format.blocks (MatMulNBits' layout: two 4-bit codes a byte, the even column in
the low nibble; a packed weight is (out, n_groups, group_size * bits / 8), MatMulNBits' input B).

Both functions take a torch.Tensor or a numpy array and return the same kind.
"""

from __future__ import annotations

from edgellm.runtime.format.blocks import pack_codes, unpack_codes


def _is_numpy(a) -> bool:
    return type(a).__module__ == "numpy"


def _through_numpy(fn, a, *args, **kw):
    if _is_numpy(a):
        return fn(a, *args, **kw)
    import torch

    return torch.from_numpy(fn(a.detach().cpu().contiguous().numpy(), *args, **kw).copy())


def pack(codes, bits: int, pad_odd: bool = False):
    """uint8 codes (..., gs) -> packed uint8 (..., gs * bits // 8); see format.blocks.pack_codes."""
    if not _is_numpy(codes):
        import torch

        codes = codes.to(torch.uint8)
    return _through_numpy(pack_codes, codes, bits, pad_odd=pad_odd)


def unpack(packed, bits: int):
    """Inverse of pack: packed uint8 (..., nbytes) -> codes uint8 (..., nbytes * 8 // bits)."""
    return _through_numpy(unpack_codes, packed, bits)

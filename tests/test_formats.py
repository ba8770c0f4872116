"""Contract 4: quantize/dequantize round trips and int4 packing are bit-exact against a reference."""

import numpy as np
import pytest
import torch

from edgellm.errors import EdgeLLMError
from edgellm.quant.formats import QuantFormat, dequantize_codes, quantize_rtn
from edgellm.quant.modules import QuantEmbedding, QuantLinear
from edgellm.quant.packing import pack, unpack


def reference_pack4(codes: np.ndarray) -> np.ndarray:
    """Plain-python MatMulNBits packing: byte i holds code 2i in its low nibble, 2i+1 in its high."""
    flat = codes.reshape(-1, codes.shape[-1])
    out = np.zeros((flat.shape[0], flat.shape[1] // 2), dtype=np.uint8)
    for r in range(flat.shape[0]):
        for i in range(0, flat.shape[1], 2):
            out[r, i // 2] = int(flat[r, i]) | (int(flat[r, i + 1]) << 4)
    return out.reshape(*codes.shape[:-1], codes.shape[-1] // 2)


def reference_rtn(w: np.ndarray, bits: int, gs: int, sym: bool):
    """Straight-line numpy version of the group formula in formats.py (for one matrix)."""
    out_f, in_f = w.shape
    ng = -(-in_f // gs)
    wp = np.zeros((out_f, ng * gs), np.float32)
    wp[:, :in_f] = w
    codes = np.zeros((out_f, ng, gs), np.uint8)
    maxq = 2**bits - 1
    for o in range(out_f):
        for g in range(ng):
            grp = wp[o, g * gs : (g + 1) * gs]
            if sym:
                m = grp[np.argmax(np.abs(grp))]
                scale = np.float32(np.float16(m / -(2 ** (bits - 1))))
                zero = 2 ** (bits - 1)
            else:
                lo, hi = min(grp.min(), 0), max(grp.max(), 0)
                scale = np.float32(np.float16((hi - lo) / maxq))
            if scale == 0:
                scale = np.float32(1)
            if not sym:
                zero = np.clip(np.round(-lo / scale), 0, maxq)
            codes[o, g] = np.clip(np.round(grp / scale) + zero, 0, maxq)
    return codes


@pytest.mark.parametrize("shape", [(3, 32), (5, 64), (2, 128)])
def test_pack4_bit_exact(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack(codes, 4)
    np.testing.assert_array_equal(packed.numpy(), reference_pack4(codes.numpy()))
    assert torch.equal(unpack(packed, 4), codes)


@pytest.mark.parametrize("bits,gs,sym", [(4, 32, True), (4, 128, False), (8, 16, True), (8, 64, False), (4, -1, True)])
@pytest.mark.parametrize("in_f", [96, 100])  # 100: last group padded
def test_rtn_matches_reference(bits, gs, sym, in_f):
    w = torch.randn(7, in_f, generator=torch.Generator().manual_seed(2))
    fmt = QuantFormat(bits=bits, group_size=gs, sym=sym)
    codes, scales, zeros = quantize_rtn(w, fmt)
    np.testing.assert_array_equal(codes.numpy(), reference_rtn(w.numpy(), bits, fmt.group_for(in_f), sym))
    deq = dequantize_codes(codes, scales, zeros).reshape(7, -1)
    assert torch.all(deq[:, in_f:] == 0), "padding must encode exactly 0.0"
    step = scales.max().item()
    assert (deq[:, :in_f] - w).abs().max().item() <= step * (1 if sym else 0.5) + 1e-6


def test_module_round_trip_is_exact():
    fmt = QuantFormat(bits=4, group_size=32, sym=False)
    w = torch.randn(9, 80)
    codes, scales, zeros = quantize_rtn(w, fmt)
    lin = QuantLinear(80, 9, bias=False, fmt=fmt)
    lin.set_codes(codes, scales, zeros)
    expected = dequantize_codes(codes, scales, zeros).reshape(9, -1)[:, :80]
    assert torch.equal(lin.dequantize(), expected)
    x = torch.randn(4, 80)
    torch.testing.assert_close(lin(x), x @ expected.t())
    emb = QuantEmbedding(9, 80, fmt)
    emb.set_codes(codes, scales, zeros)
    ids = torch.tensor([[3, 0, 8]])
    assert torch.equal(emb(ids), expected[ids])


def test_symmetric_keeps_zeros_zero():
    w = torch.randn(4, 64)
    w[:, ::3] = 0
    fmt = QuantFormat(bits=4, group_size=32, sym=True)
    codes, scales, zeros = quantize_rtn(w, fmt)
    deq = dequantize_codes(codes, scales, zeros).reshape(4, -1)
    assert torch.all(deq[w == 0] == 0)


@pytest.mark.parametrize("kw", [dict(bits=3), dict(group_size=48), dict(group_size=8), dict(group_size=0)])
def test_bad_formats_are_refused(kw):
    with pytest.raises(EdgeLLMError):
        QuantFormat(**kw)

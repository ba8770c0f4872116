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


@pytest.mark.parametrize("shape", [(3, 32), (5, 64), (2, 128)])
def test_pack4_bit_exact(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack(codes, 4)
    np.testing.assert_array_equal(packed.numpy(), reference_pack4(codes.numpy()))
    assert torch.equal(unpack(packed, 4), codes)


@pytest.mark.parametrize("bits,gs,sym", [(4, 32, True), (4, 128, False), (8, 16, True), (8, 64, False), (4, -1, True)])
@pytest.mark.parametrize("in_f", [96, 100])  # 100: last group padded
def test_rtn_error_bounds(bits, gs, sym, in_f):
    w = torch.randn(7, in_f, generator=torch.Generator().manual_seed(2))
    fmt = QuantFormat(bits=bits, group_size=gs, sym=sym)
    codes, scales, zeros = quantize_rtn(w, fmt)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= fmt.maxq
    assert torch.equal(scales, scales.half().float()), "scales must be exactly representable in fp16 (as stored)"
    deq = dequantize_codes(codes, scales, zeros).reshape(7, -1)
    assert torch.all(deq[:, in_f:] == 0), "padding must encode exactly 0.0"
    err = (deq[:, :in_f] - w).abs().reshape(7, -1)
    step = scales.abs().repeat_interleave(fmt.group_for(in_f), 1)[:, :in_f]
    # round to nearest; symmetric formats clip the far side at +(2**(bits-1) - 1) steps (as Q4_0 does)
    assert torch.all(err <= step * (1.0 if sym else 0.5) + 1e-6)
    if sym:  # the largest-magnitude value of every group is exact (it sits on the most negative code)
        g = fmt.group_for(in_f)
        wg = torch.nn.functional.pad(w, (0, fmt.padded(in_f) - in_f)).reshape(7, -1, g)
        idx = wg.abs().argmax(-1)
        assert torch.all(torch.gather(codes, -1, idx.unsqueeze(-1)) == 0)


# ----- against an external reference: gguf-py's Q4_0 / Q8_0 (llama.cpp's formats) -------------
# Where the formats coincide: 4-bit symmetric with 32-column groups *is* Q4_0 (d = the block's
# largest-magnitude value / -8, fp16, code = round(w / d) + 8, value = (code - 8) * d). Q8_0 takes
# d = max|w| / 127 (edgellm: largest-magnitude / -128, all 256 levels), so only its decoding,
# value = int8 * d, coincides; its rounding error is the yardstick for ours.


def _as_q4_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """edgellm codes (rows, blocks, 32) + scales (rows, blocks) as Q4_0 bytes: fp16 d, then 16
    bytes whose low nibbles are elements 0..15 and high nibbles 16..31 (ggml's layout)."""
    c = codes.reshape(-1, 32)
    qs = c[:, :16] | (c[:, 16:] << 4)
    d = scales.reshape(-1, 1).astype(np.float16).view(np.uint8)
    return np.concatenate([d, qs.astype(np.uint8)], axis=1)


def test_q4_0_against_gguf():
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as T

    w = (torch.randn(64, 1024, generator=torch.Generator().manual_seed(3)) * 0.05).float()
    codes, scales, zeros = quantize_rtn(w, QuantFormat(bits=4, group_size=32, sym=True))
    ref = gguf.quantize(w.numpy(), T.Q4_0).reshape(-1, 18)
    ref_d = ref[:, :2].copy().view(np.float16).astype(np.float32).reshape(64, -1)
    np.testing.assert_array_equal(scales.numpy(), ref_d)  # same scale, bit for bit
    ref_codes = np.concatenate([ref[:, 2:] & 15, ref[:, 2:] >> 4], axis=1).reshape(codes.shape)
    differ = ref_codes != codes.numpy()
    assert differ.mean() < 0.01, differ.mean()
    # ...and only at near-ties: gguf rounds w / d with d unrounded (fp32), edgellm with the stored fp16 d
    wg = w.numpy().reshape(codes.shape)  # (rows, blocks, 32)
    m = np.take_along_axis(wg, np.abs(wg).argmax(-1)[..., None], -1)  # largest-magnitude value per block
    t = wg / (m / -8)  # w / d in fp32, before any rounding
    frac = np.abs(t - np.floor(t) - 0.5)  # 0 = exactly halfway between two codes
    assert np.all(np.abs(ref_codes[differ].astype(int) - codes.numpy()[differ]) == 1)
    assert np.all(frac[differ] < 0.01), frac[differ].max()
    # gguf decodes edgellm's codes and scales to exactly edgellm's values
    ours = dequantize_codes(codes, scales, zeros).reshape(64, -1).numpy()
    np.testing.assert_array_equal(
        gguf.dequantize(_as_q4_0(codes.numpy(), scales.numpy()), T.Q4_0).reshape(64, -1), ours
    )


def test_q8_0_against_gguf():
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as T

    w = (torch.randn(64, 1024, generator=torch.Generator().manual_seed(4)) * 0.05).float()
    codes, scales, zeros = quantize_rtn(w, QuantFormat(bits=8, group_size=32, sym=True))
    ours = dequantize_codes(codes, scales, zeros).reshape(64, -1).numpy()
    blocks = np.concatenate(
        [
            scales.numpy().reshape(-1, 1).astype(np.float16).view(np.uint8),
            (codes.numpy().reshape(-1, 32).astype(np.int16) - 128).astype(np.int8).view(np.uint8),
        ],
        axis=1,
    )
    np.testing.assert_array_equal(gguf.dequantize(blocks, T.Q8_0).reshape(64, -1), ours)  # same decoding
    theirs = gguf.dequantize(gguf.quantize(w.numpy(), T.Q8_0), T.Q8_0).reshape(64, -1)
    rms = lambda x: float(np.sqrt(np.mean((x - w.numpy()) ** 2)))  # noqa: E731
    # 256 levels over the same range as Q8_0's 255: a step 127/128 as large, so a little less error
    assert rms(ours) < rms(theirs) < 1.05 * rms(ours), (rms(ours), rms(theirs))


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

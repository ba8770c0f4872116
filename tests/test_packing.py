"""MatMulNBits code packing has one copy (edgellm.runtime.format.blocks); the torch side
(edgellm/quant/packing.py) goes through it: same bytes for torch and numpy inputs, the even
column in the low nibble, and unpack inverts pack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.quant import packing as torch_side
from edgellm.runtime.format import blocks


@pytest.mark.parametrize("bits", [4, 8])
def test_torch_and_numpy_pack_alike(bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << bits, (3, 5, 32)).astype(np.uint8)
    packed = blocks.pack_codes(codes, bits)
    assert np.array_equal(packed, torch_side.pack(codes, bits))
    assert np.array_equal(torch_side.pack(torch.from_numpy(codes), bits).numpy(), packed)
    assert np.array_equal(blocks.unpack_codes(packed, bits), codes)
    assert np.array_equal(torch_side.unpack(torch.from_numpy(packed), bits).numpy(), codes)
    if bits == 4:
        assert packed[0, 0, 0] == codes[0, 0, 0] | (codes[0, 0, 1] << 4)
        assert packed.shape == (3, 5, 16)


def test_odd_rows_pad_only_when_asked():
    codes = np.arange(5, dtype=np.uint8).reshape(1, 5)
    with pytest.raises(ValueError, match="even number"):
        blocks.pack_codes(codes, 4)
    assert blocks.pack_codes(codes, 4, pad_odd=True).tolist() == [[0 | 1 << 4, 2 | 3 << 4, 4]]


def test_format_as_data():
    f = blocks.BlockFormat(4, 32)
    assert (f.blob, f.sym_zero, f.maxq, f.bits_per_weight) == (16, 8, 15, 4.5)
    assert blocks.BlockFormat(4, 32, "float").bits_per_weight == 5.0
    assert blocks.BlockFormat(4, 24).problem() is not None and blocks.BlockFormat(8, 128).problem() is None
    assert blocks.from_blob(8, 64) == blocks.BlockFormat(8, 64)

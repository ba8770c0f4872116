"""The two copies of MatMulNBits code packing (issue 13: one per side): the compress side's
edgellm/quant/packing.py and the torch-free runtime's runtime/packing.py give the same bytes and
codes, with the even column in the low nibble."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.quant import packing as compress_side
from edgellm.runtime import packing as runtime_side


@pytest.mark.parametrize("bits", [4, 8])
def test_both_sides_pack_alike(bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << bits, (3, 5, 32)).astype(np.uint8)
    packed = runtime_side.pack_codes(codes, bits)
    assert np.array_equal(packed, compress_side.pack(codes, bits))
    assert np.array_equal(runtime_side.unpack_codes(packed, bits), codes)
    assert np.array_equal(compress_side.unpack(packed, bits), codes)
    if bits == 4:
        assert packed[0, 0, 0] == codes[0, 0, 0] | (codes[0, 0, 1] << 4)

"""The kernels that run several rows at once, against the decode kernel and numpy, on every tier;
torch-free, so that scripts/test-arm64.sh runs them on the emulated NEON tiers as well.

- a speculative verify pass's linears (`quant.linear_few`, up to model.FEW_TOKENS tokens) and a
  batched step's (`slots.linear_rows`, up to slots.ROWS_VEC rows of different sequences) give
  every row bit for bit what the decode kernel `linear_vec` gives it alone: the contract that
  makes speculation return plain decoding's tokens and a slot's logits equal its run alone;
- the batched step's attention (`slots.attention_rows`) and the attention kernels reading a
  sliding layer's ring buffer (`layers.attention`, `layers.attention_mat`) against numpy.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.runtime.format.blocks import pack_codes
from edgellm.runtime.kernels import layers as Lk
from edgellm.runtime.kernels import quant as Q
from edgellm.runtime.kernels import slots, tiers
from edgellm.runtime.model import FEW_TOKENS

TIERS = tiers.supported()


def _linear(rng, bits, gs, sym, n, k, keep):
    """A packed linear (n, k) with a tail block; asymmetric ones get a bias too. (desc, reference
    arguments)."""
    nb = -(-k // gs)
    codes = rng.integers(0, 1 << bits, (n, nb * gs)).astype(np.uint8)
    codes[:, k:] = 1 << (bits - 1)
    qw = pack_codes(codes, bits).reshape(n, nb, -1)
    scales = (rng.random(n * nb) * 0.1 + 1e-3).astype(np.float16).astype(np.float32)
    zeros = None if sym else rng.integers(0, 1 << bits, (n, nb)).astype(np.uint8)
    bias = None if sym else rng.standard_normal(n).astype(np.float32)
    return Q.make_desc(qw, scales, zeros, bits, k, gs, keep, bias=bias), (qw, scales, zeros, bits, k, gs, bias)


@pytest.mark.parametrize("kernels", TIERS)
def test_few_and_batched_rows_equal_decode_rows(kernels):
    """4-bit symmetric g32 with rows past the 32-row blocks and a k tail; 8-bit asymmetric g16 with
    a bias (the zero-point correction); 2 rows and the most each path takes."""
    tier = tiers.resolve(kernels)
    rng = np.random.default_rng(7)
    for bits, gs, sym, n, k in ((4, 32, True, 75, 200), (8, 16, False, 40, 72)):
        keep: list = []
        d, ref_args = _linear(rng, bits, gs, sym, n, k, keep)
        x = rng.standard_normal((FEW_TOKENS, k)).astype(np.float32)
        one = np.zeros((FEW_TOKENS, n), np.float32)
        for i in range(FEW_TOKENS):
            Q.linear_vec(d, x[i], one[i], *[b[0] for b in Q.act_buffers(d, 1)], tier)
        ref = Q.ref_linear_q8act(x, *ref_args)
        assert np.abs(one - ref).max() <= 1e-4 * np.abs(ref).max()
        for name, fn, most in (
            ("linear_few", Q.linear_few, FEW_TOKENS),
            ("linear_rows", slots.linear_rows, slots.ROWS_VEC),
        ):
            for t in (2, most):
                out = np.zeros((t, n), np.float32)
                fn(d, x[:t], out, *Q.act_buffers(d, t), tier)
                for i in range(t):
                    assert np.array_equal(out[i], one[i]), (name, bits, t, i, np.abs(out[i] - one[i]).max())


@pytest.mark.parametrize("fp16,window", [(False, 0), (True, 0), (False, 5)])
def test_attention_rows_matches_reference(fp16, window):
    rng = np.random.default_rng(0)
    S, L, NKV, ctx, HD, NH = 3, 2, 2, 40, 16, 4
    dtype = np.uint16 if fp16 else np.float32
    kc = Lk.kv_layout(Lk.kv_cast(rng.standard_normal((S, L, NKV, ctx, HD)).astype(np.float32), np.empty(0, dtype)), 16)
    vc = Lk.kv_layout(Lk.kv_cast(rng.standard_normal((S, L, NKV, ctx, HD)).astype(np.float32), np.empty(0, dtype)), 16)
    slot, pos = np.array([2, 0, 1, 0], np.int64), np.array([7, 0, 33, 12], np.int64)
    q = rng.standard_normal((4, NH * HD)).astype(np.float32)
    out = np.zeros_like(q)
    rows = np.array([0, 1, 3], np.int64)  # row 2 is not a decode row: left alone
    scores = np.empty((rows.size * NH, ctx), np.float32)
    slots.attention_rows(q, rows, kc, vc, slot, pos, 1, NH, NKV, HD, out, scores, window, 0.0, 0.0)
    ref = slots.ref_attention_rows(q.reshape(4, NH, HD), kc, vc, slot, pos, 1, window).reshape(4, -1)
    np.testing.assert_allclose(out[rows], ref[rows], atol=2e-5, rtol=1e-4)
    assert not out[2].any()


@pytest.mark.parametrize("t,pos0", [(1, 0), (1, 30), (5, 9), (7, 40)])
def test_ring_attention_against_reference(t, pos0):
    """The attention kernels reading a ring buffer (rows window + t - 1 + 2) against
    ref_attention on the linear cache."""
    rng = np.random.default_rng(t + pos0)
    nh, nkv, hd, window = 4, 2, 8, 6
    rows = window + t - 1 + 2
    n = pos0 + t
    q = rng.standard_normal((t, nh * hd)).astype(np.float32)
    k, v = (rng.standard_normal((nkv, n, hd)).astype(np.float32) for _ in range(2))
    kr, vr = np.zeros((nkv, rows, hd), np.float32), np.zeros((nkv, rows, hd), np.float32)
    for p in range(n):  # the ring after writing positions 0..n-1
        kr[:, p % rows], vr[:, p % rows] = k[:, p], v[:, p]
    want = Lk.ref_attention(q.reshape(t, nh, hd), k, v, pos0, window, 0.3, 5.0).reshape(t, -1)
    for fn in (Lk.attention, Lk.attention_mat):
        o = np.zeros((t, nh * hd), np.float32)
        kt, vt = Lk.kv_layout(kr, 5), Lk.kv_layout(vr, 5)  # the ring in blocks of 5 (its rows: not a multiple)
        fn(q, kt, vt, pos0, nh, nkv, hd, o, np.zeros((t * nh, n), np.float32), window, 0.3, 5.0, rows)
        np.testing.assert_allclose(o, want, rtol=1e-4, atol=1e-5)

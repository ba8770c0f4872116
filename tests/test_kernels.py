"""Contract 3: every Numba kernel of edgellm.runtime against its numpy reference, on odd shapes."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from edgellm.runtime.format.records import KIND_F16, KIND_F32, LINEAR, record
from edgellm.runtime.kernels import layers as Lk
from edgellm.runtime.kernels import quant as Q
from edgellm.runtime.kernels import tiers

rng = np.random.default_rng(0)


def _packed(n, k, bits, gs, sym):
    """Random MatMulNBits weights whose padded columns encode 0, with exactly-fp16 scales."""
    nb = -(-k // gs)
    codes = rng.integers(0, 1 << bits, (n, nb, gs)).astype(np.uint8)
    zeros = None if sym else rng.integers(0, 1 << bits, (n, nb)).astype(np.uint8)
    if nb * gs > k:
        codes.reshape(n, -1)[:, k:] = (1 << (bits - 1)) if sym else np.repeat(zeros[:, -1:], nb * gs - k, 1)
    qweight = codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = (rng.random(n * nb) * 0.1 + 1e-3).astype(np.float16).astype(np.float32)
    return qweight, scales, zeros


def _desc(kind, n, k, keep, w=None, qweight=None, scales=None, zeros=None, gs=0, bias=None):
    d = record(LINEAR)
    d.kind, d.n, d.k = kind, n, k
    if qweight is None:
        keep.append(w)
        d.w_addr, d.row_bytes = w.ctypes.data, k * w.itemsize
    else:
        nb, bb = qweight.shape[1:]
        s16 = np.zeros(n * nb + 16, np.float16)
        s16[: n * nb] = scales
        s16 = s16.view(np.uint16)
        keep += [qweight, s16]
        d.w_addr, d.s_addr, d.block, d.nb, d.row_bytes = qweight.ctypes.data, s16.ctypes.data, gs, nb, nb * bb
        d.sym, d.zero = zeros is None, 1 << (kind - 1)
        if zeros is not None:
            zs = zeros.reshape(-1).astype(np.float32) * scales
            keep.append(zs)
            d.z_addr = zs.ctypes.data
    if bias is not None:
        keep.append(bias)
        d.b_addr = bias.ctypes.data
    return d


def _bufs(d, t):
    cap, nbc = Q.act_caps(d)
    return (
        np.zeros((t, cap), np.int8),
        np.zeros((t, cap), np.int8),
        np.zeros((t, cap // 4), np.int32),
        np.zeros((t, cap // 4), np.float32),
        np.zeros((t, nbc), np.float32),
        np.zeros((t, nbc), np.float32),
    )


TIERS = tiers.supported()  # every kernel tier the CPU numba compiles for has (here: all x86 ones)
ID = {name: tiers.BY_NAME[name].id for name in TIERS}
BEST = ID[TIERS[0]]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [16, 32, 128, 256])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("n,k", [(7, 50), (33, 576), (5, 1000)])
def test_quantized_linear(bits, gs, sym, n, k):
    qweight, scales, zeros = _packed(n, k, bits, gs, sym)
    bias = rng.standard_normal(n).astype(np.float32) if n != 33 else None
    keep = []
    d = _desc(bits, n, k, keep, qweight=qweight, scales=scales, zeros=zeros, gs=gs, bias=bias)
    x = rng.standard_normal((3, k)).astype(np.float32)
    ref = Q.ref_linear_q8act(x, qweight, scales, zeros, bits, k, gs, bias)
    scale = np.abs(ref).max()
    for tier in TIERS:
        out = np.zeros((3, n), np.float32)
        Q.linear_mat(d, x, out, *_bufs(d, 3), ID[tier])  # prompt path (GEMM)
        assert np.abs(out - ref).max() <= 1e-5 * scale, tier
        o1 = np.zeros(n, np.float32)
        Q.linear_vec(d, x[1], o1, *[b[0] for b in _bufs(d, 1)], ID[tier])  # decode path (GEMV)
        assert np.abs(o1 - ref[1]).max() <= 1e-5 * scale, tier
    # int8 activations: close to the float product (a few 1e-3 relative; see test_runtime)
    reff = Q.ref_linear(x, Q.dequantize(qweight, scales, zeros, bits, k), bias)
    assert np.abs(out - reff).max() <= 3e-2 * np.abs(reff).max()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("n,k,t", [(7, 50, 8), (37, 576, 19), (5, 1000, 17), (18, 130, 27), (11, 77, 9)])
def test_quantized_gemm(bits, gs, sym, n, k, t):
    """The prompt GEMM (simd.RB rows x simd.TB tokens tiles, plus leftover rows and tokens) equals
    the reference of the int8-activation product, and row by row the decode GEMV."""
    qweight, scales, zeros = _packed(n, k, bits, gs, sym)
    bias = rng.standard_normal(n).astype(np.float32) if n % 2 else None
    keep = []
    d = _desc(bits, n, k, keep, qweight=qweight, scales=scales, zeros=zeros, gs=gs, bias=bias)
    x = rng.standard_normal((t, k)).astype(np.float32)
    ref = Q.ref_linear_q8act(x, qweight, scales, zeros, bits, k, gs, bias)
    for tier in TIERS:
        out = np.full((t, n), np.nan, np.float32)
        Q.linear_mat(d, x, out, *_bufs(d, t), ID[tier])
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), tier
        vec = np.zeros((t, n), np.float32)
        for i in range(t):
            Q.linear_vec(d, x[i], vec[i], *[b[0] for b in _bufs(d, 1)], ID[tier])
        assert np.abs(vec - out).max() <= 1e-6 * np.abs(ref).max(), tier  # same integer sums, same scaling


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [32, 256])  # blocks within a chunk; blocks over several (int32 sums, simd._chunk_loop)
def test_dot_extremes(bits, sym, gs):
    """No int16 saturation or int32 overflow on any tier: every row holds one extreme code (0,
    15 / 255, or alternating), every token's activations quantize to exactly +-127 (one sign,
    the other, or alternating), so each pair sum hits the largest |code x 127| products; the
    kernels must equal the exact reference (AVX2's vpmaddubsw saturates at 32767 unless 8-bit
    codes are re-centred)."""
    top = (1 << bits) - 1
    k = 512
    nb = k // gs
    pattern = np.tile(np.array([0, top], np.uint8), k // 2)
    codes = np.stack(
        [
            np.zeros(k, np.uint8),
            np.full(k, top, np.uint8),
            pattern,
            pattern[::-1],
            np.full(k, 1 << (bits - 1), np.uint8),
        ]
    ).reshape(5, nb, gs)
    n = codes.shape[0]
    qweight = codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = np.full(n * nb, 0.25, np.float32)
    zeros = None if sym else np.full((n, nb), 3, np.uint8)
    keep = []
    d = _desc(bits, n, k, keep, qweight=qweight, scales=scales, zeros=zeros, gs=gs)
    sign = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)
    x = np.stack([np.ones(k), -np.ones(k), sign, -sign, np.where(np.arange(k) % 4 < 2, 1.0, -1.0)]).astype(np.float32)
    ref = Q.ref_linear_q8act(x, qweight, scales, zeros, bits, k, gs)
    for tier in TIERS:
        out = np.zeros((5, n), np.float32)
        Q.linear_mat(d, x, out, *_bufs(d, 5), ID[tier])
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-3, err_msg=tier)
        for i in range(5):
            o1 = np.zeros(n, np.float32)
            Q.linear_vec(d, x[i], o1, *[b[0] for b in _bufs(d, 1)], ID[tier])
            np.testing.assert_allclose(o1, ref[i], rtol=1e-6, atol=1e-3, err_msg=tier)


@pytest.mark.parametrize("tier", TIERS)
def test_self_check(tier):
    """The load-time self-check of each tier passes (and measures: a NaN-writing tier fails)."""
    assert Q.self_check(ID[tier]) <= Q.SELF_CHECK_TOL


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n,k", [(1, 1), (9, 15), (13, 17), (31, 131), (3, 576)])
def test_float_linear(dtype, n, k):
    w = rng.standard_normal((n, k)).astype(dtype)
    bias = rng.standard_normal(n).astype(np.float32)
    keep = []
    d = _desc(
        KIND_F32 if dtype == np.float32 else KIND_F16,
        n,
        k,
        keep,
        w=w.view(np.uint16) if dtype == np.float16 else w,
        bias=bias,
    )
    x = rng.standard_normal((4, k)).astype(np.float32)
    ref = Q.ref_linear(x, w.astype(np.float32), bias)
    out = np.zeros((4, n), np.float32)
    Q.linear_mat(d, x, out, *_bufs(d, 4), BEST)
    np.testing.assert_allclose(out, ref, atol=1e-4 * max(1, k**0.5))
    o1 = np.zeros(n, np.float32)
    Q.linear_vec(d, x[2], o1, *[b[0] for b in _bufs(d, 1)], BEST)
    np.testing.assert_allclose(o1, ref[2], atol=1e-4 * max(1, k**0.5))


@pytest.mark.parametrize("h", [1, 7, 64, 577])
def test_norms(h):
    x = rng.standard_normal((3, h)).astype(np.float32) * 3
    w = rng.standard_normal(h).astype(np.float32)
    b = rng.standard_normal(h).astype(np.float32)
    out = np.empty_like(x)
    Lk.rms_norm(x, w.ctypes.data, np.float32(1e-5), out)
    np.testing.assert_allclose(out, Lk.ref_rms_norm(x, w, 1e-5), rtol=1e-4, atol=1e-5)
    Lk.layer_norm(x, w.ctypes.data, b.ctypes.data, np.float32(1e-5), out)
    np.testing.assert_allclose(out, Lk.ref_layer_norm(x, w, b, 1e-5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope(scaling):
    nh, nkv, hd, t, pos0 = 3, 1, 10, 5, 7
    cos, sin = Lk.rope_tables(32, Lk.rope_inv_freq(hd, 10000.0, scaling))
    x = rng.standard_normal((t, (nh + nkv) * hd)).astype(np.float32)
    ref_q = Lk.ref_rope(x[:, : nh * hd].reshape(t, nh, hd), np.arange(pos0, pos0 + t), cos, sin)
    ref_k = Lk.ref_rope(x[:, nh * hd :].reshape(t, nkv, hd), np.arange(pos0, pos0 + t), cos, sin)
    Lk.rope(x, 0, nh, hd, pos0, cos, sin)
    Lk.rope(x, nh * hd, nkv, hd, pos0, cos, sin)
    np.testing.assert_allclose(x[:, : nh * hd].reshape(t, nh, hd), ref_q, atol=1e-5)
    np.testing.assert_allclose(x[:, nh * hd :].reshape(t, nkv, hd), ref_k, atol=1e-5)


@pytest.mark.parametrize(
    "nh,nkv,hd,t,pos0,window",
    [(4, 2, 8, 1, 0, 0), (4, 2, 8, 1, 9, 0), (6, 3, 5, 7, 4, 0), (3, 3, 16, 6, 0, 0), (4, 1, 8, 5, 6, 4)],
)
@pytest.mark.parametrize("fp16", [False, True])
def test_attention(nh, nkv, hd, t, pos0, window, fp16):
    ctx = 20
    q = rng.standard_normal((t, nh * hd)).astype(np.float32)
    kc = np.zeros((nkv, ctx, hd), np.float32)
    vc = np.zeros((nkv, ctx, hd), np.float32)
    kc[:, : pos0 + t] = rng.standard_normal((nkv, pos0 + t, hd))
    vc[:, : pos0 + t] = rng.standard_normal((nkv, pos0 + t, hd))
    kc, vc, kref, vref = _kv(kc, vc, fp16)
    out = np.zeros((t, nh * hd), np.float32)
    Lk.attention(q, kc, vc, pos0, nh, nkv, hd, out, np.zeros((t * nh, pos0 + t), np.float32), window)
    ref = Lk.ref_attention(q.reshape(t, nh, hd), kref[:, : pos0 + t], vref[:, : pos0 + t], pos0, window)
    np.testing.assert_allclose(out.reshape(t, nh, hd), ref, atol=1e-5)
    out2 = np.full((t, nh * hd), np.nan, np.float32)
    Lk.attention_mat(q, kc, vc, pos0, nh, nkv, hd, out2, np.zeros((t * nh, pos0 + t), np.float32), window)
    np.testing.assert_allclose(out2.reshape(t, nh, hd), ref, atol=1e-5)


def _kv(kc, vc, fp16, bs=8):
    """The cache as the kernels get it (blocks of bs positions, (n_kv, nblk, hd, bs); fp16:
    uint16 bits) and the float values it holds, by position (n_kv, ctx, hd) as ref_attention
    reads them. bs 8: the contexts here cross blocks."""
    if not fp16:
        return Lk.kv_layout(kc, bs), Lk.kv_layout(vc, bs), kc, vc
    like = np.empty(0, np.uint16)
    k16, v16 = Lk.kv_cast(kc, like), Lk.kv_cast(vc, like)
    return Lk.kv_layout(k16, bs), Lk.kv_layout(v16, bs), Lk.kv_get(k16), Lk.kv_get(v16)


@pytest.mark.parametrize("nh,nkv,hd", [(12, 2, 5), (8, 1, 16), (16, 2, 8), (6, 1, 12)])
@pytest.mark.parametrize("fp16", [False, True])
def test_attention_head_groups_match_decode(nh, nkv, hd, fp16):
    """Groups of 4+ query heads per KV head (four at a time, then one by one; odd head dims): a
    pass of t queries equals t decode steps bit for bit (the verify pass's contract), and numpy."""
    pos0, t, ctx = 21, 5, 30
    q = rng.standard_normal((t, nh * hd)).astype(np.float32)
    kc, vc, kref, vref = _kv(*(rng.standard_normal((nkv, ctx, hd)).astype(np.float32) for _ in range(2)), fp16)
    out = np.zeros((t, nh * hd), np.float32)
    Lk.attention(q, kc, vc, pos0, nh, nkv, hd, out, np.zeros((t * nh, pos0 + t), np.float32), 0)
    for i in range(t):
        one = np.zeros((1, nh * hd), np.float32)
        Lk.attention(q[i : i + 1], kc, vc, pos0 + i, nh, nkv, hd, one, np.zeros((nh, pos0 + i + 1), np.float32), 0)
        assert np.array_equal(one[0], out[i]), (i, np.abs(one[0] - out[i]).max())
    ref = Lk.ref_attention(q.reshape(t, nh, hd), kref[:, : pos0 + t], vref[:, : pos0 + t], pos0)
    np.testing.assert_allclose(out.reshape(t, nh, hd), ref, atol=1e-5)


@pytest.mark.parametrize(
    "nh,nkv,hd,t,pos0,window", [(9, 3, 64, 37, 0, 0), (6, 2, 7, 23, 5, 0), (4, 4, 9, 35, 3, 11), (2, 1, 16, 17, 40, 0)]
)
@pytest.mark.parametrize("fp16", [False, True])
def test_attention_mat(nh, nkv, hd, t, pos0, window, fp16):
    """The prompt attention over several query tiles (odd head dims, sliding window, a cached past)."""
    ctx = pos0 + t + 3
    q = rng.standard_normal((t, nh * hd)).astype(np.float32)
    kc = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    vc = rng.standard_normal((nkv, ctx, hd)).astype(np.float32)
    kc, vc, kref, vref = _kv(kc, vc, fp16)
    out = np.full((t, nh * hd), np.nan, np.float32)
    Lk.attention_mat(q, kc, vc, pos0, nh, nkv, hd, out, np.zeros((t * nh, pos0 + t), np.float32), window)
    ref = Lk.ref_attention(q.reshape(t, nh, hd), kref[:, : pos0 + t], vref[:, : pos0 + t], pos0, window)
    np.testing.assert_allclose(out.reshape(t, nh, hd), ref, atol=2e-5)


def test_activations():
    gu = rng.standard_normal((3, 2 * 37)).astype(np.float32) * 4
    out = np.empty((3, 37), np.float32)
    Lk.swiglu(gu, 37, out)
    np.testing.assert_allclose(out, Lk.ref_swiglu(gu, 37), rtol=1e-5, atol=1e-6)
    out1 = np.empty((1, 37), np.float32)
    Lk.swiglu(gu[1:2], 37, out1)  # the decode path (one row)
    np.testing.assert_allclose(out1, Lk.ref_swiglu(gu[1:2], 37), rtol=1e-5, atol=1e-6)
    out2 = np.empty_like(gu)
    Lk.gelu_new(gu, out2)
    np.testing.assert_allclose(out2, Lk.ref_gelu_new(gu), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["f32", "f16", "q4", "q4a", "q8", "q8a"])
def test_embedding_rows(kind):
    n, k, keep = 11, 50, []
    ids = np.array([0, 10, 3, 3], np.int64)
    if kind in ("f32", "f16"):
        w = rng.standard_normal((n, k)).astype(np.float32 if kind == "f32" else np.float16)
        d = _desc(KIND_F32 if kind == "f32" else KIND_F16, n, k, keep, w=w if kind == "f32" else w.view(np.uint16))
        ref = w.astype(np.float32)[ids]
    else:
        bits, sym = int(kind[1]), not kind.endswith("a")
        qweight, scales, zeros = _packed(n, k, bits, 16, sym)
        d = _desc(bits, n, k, keep, qweight=qweight, scales=scales, zeros=zeros, gs=16)
        ref = Q.dequantize(qweight, scales, zeros, bits, k)[ids]
    out = np.zeros((ids.size, k), np.float32)
    Lk.embed_rows(d, ids, out)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@njit(fastmath=True)
def exp_rows(x, out):
    """out = fast_exp(x) elementwise over a 1-d array: the test's handle on the inlined fast_exp."""
    for i in range(x.shape[0]):
        out[i] = Lk.fast_exp(x[i])


def test_fast_exp():
    """The vectorizable exp of softmax and silu against float64 exp: relative error < 3e-7 over
    the float32 range it serves, exactly 1 at 0, tiny and finite far below (the clamp)."""
    x = np.concatenate([np.linspace(-87, 88, 200001), rng.standard_normal(1001) * 10, [0.0, -1e4, -np.inf]]).astype(
        np.float32
    )
    out = np.empty_like(x)
    exp_rows(x, out)
    ref = np.exp(x.astype(np.float64))
    ok = x >= -87
    assert np.max(np.abs(out[ok] - ref[ok]) / ref[ok]) < 3e-7
    assert out[x == 0][0] == 1.0
    assert np.all(out[~ok] >= 0) and np.all(out[~ok] < 1.7e-38) and np.all(np.isfinite(out))


def test_half_conversion_without_f16c():
    """The integer fp16 <-> fp32 conversions that targets without F16C compile (irutil), against
    numpy over every fp16 bit pattern (subnormals, inf, nan) and floats around every rounding
    boundary, ties to even included."""
    from numba import njit, types
    from numba.extending import intrinsic

    from edgellm.runtime.kernels import irutil

    @intrinsic
    def h2f(typingctx, v):
        return types.float32(types.uint16), lambda ctx, b, sig, args: irutil.half_to_float(
            b, b.bitcast(args[0], irutil.F16), False
        )

    @intrinsic
    def f2h(typingctx, v):
        return types.uint16(types.float32), lambda ctx, b, sig, args: irutil.float_to_half_bits(b, args[0], False)

    @njit
    def run(bits, fl, out_f, out_h):
        for i in range(bits.size):
            out_f[i] = h2f(bits[i])
        for i in range(fl.size):
            out_h[i] = f2h(fl[i])

    bits = np.arange(65536, dtype=np.uint16)
    ref_f = bits.view(np.float16).astype(np.float32)
    finite = ref_f[np.isfinite(ref_f)]
    mids = (finite[:-1].astype(np.float64) + np.diff(finite.astype(np.float64)) / 2).astype(np.float32)  # exact ties
    fl = np.concatenate(
        [
            finite,
            mids,
            np.nextafter(mids, np.float32(np.inf)),
            np.nextafter(mids, np.float32(-np.inf)),
            rng.standard_normal(10000).astype(np.float32) * 1e3,
            np.float32([np.inf, -np.inf, np.nan, 1e10, -1e-30]),
        ]
    )
    out_f, out_h = np.empty(65536, np.float32), np.empty(fl.size, np.uint16)
    run(bits, fl, out_f, out_h)
    nan = np.isnan(ref_f)
    np.testing.assert_array_equal(out_f[~nan].view(np.uint32), ref_f[~nan].view(np.uint32))
    assert np.isnan(out_f[nan]).all()
    with np.errstate(over="ignore"):
        ref_h = fl.astype(np.float16)
    ok = ~np.isnan(fl)
    np.testing.assert_array_equal(out_h[ok], ref_h[ok].view(np.uint16))
    assert np.isnan(out_h[~ok].view(np.float16)).all()

"""Linear layers y = x W^T + b over every weight format the exporter writes, Numba + numpy reference.

A linear is described by one `LINEAR` record (`d`, format/records.py; llama2.c style: weights are
found by address, so one compiled decode step serves every layer without Python in between):
`d.kind` (fp32, fp16, 4- or 8-bit), `d.n` / `d.k` (out and in features), `d.w_addr` / `d.s_addr` /
`d.z_addr` / `d.b_addr` (weights, fp16 scales padded by 16, float32 zero*scale, bias; 0 = none),
`d.block`, `d.nb`, `d.row_bytes`, `d.sym` and `d.zero` (the symmetric zero point).

Quantized layers multiply by int8-quantized activations (one scale per weight group, like
llama.cpp's Q8_0 next to Q4_0): `quantize_act` writes them in the layout the SIMD microkernel reads
(see simd.py). Every kernel takes `tier`, the id of the kernel tier to run (tiers.py); there is
no scalar path: the generic tier is the portable one. The int8 rounding of activations is the
only deviation from the float product; the numpy reference `ref_linear_q8act` reproduces it
exactly, `ref_linear` is the float product.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from ..errors import EdgeLLMError
from ..format.blocks import dequantize, pack_codes
from ..format.records import KIND_F16, KIND_F32, KIND_Q4, LINEAR, record
from . import tiers
from .jitcache import stamp
from .simd import RB, TB, as_voidptr, qdot_1x1, qdot_1xt, qdot_few, qdot_rows, qdot_rxt, rowdot_f16, rowdot_f32

# RECENTRE[tier id, bits]: the offset the tier's tile subtracts from `bits`-bit codes (hook.py
# `recentre`), 0 where it keeps them unsigned; quantize_act folds it into each lane's start value.
RECENTRE = np.zeros((max(tiers.BY_ID) + 1, 9), np.int64)
# ZERO_INIT[tier id, bits]: the tier's tile has a copy for all-zero lane start values (hook.py
# `zero_init`), chosen by passing it a null `init` address.
ZERO_INIT = np.zeros((max(tiers.BY_ID) + 1, 9), np.int64)
for _t in tiers.TIERS:
    for _b in _t.recentre:
        RECENTRE[_t.id, _b] = 1 << (_b - 1)
    for _b in _t.zero_init:
        ZERO_INIT[_t.id, _b] = 1


def act_caps(desc: np.ndarray) -> tuple[int, int]:
    """(bytes per token of quantized activations, blocks) needed by the linear `desc`."""
    if desc.kind in (KIND_F32, KIND_F16):
        return 64, 1
    return int(-(-desc.row_bytes // 64) * 64), int(desc.nb)


# ----------------------------------------------------------------------------- activations
@njit(cache=True)  # exact IEEE arithmetic: codes match the numpy reference bit for bit
def quantize_act(x, d, xa, xb, init, xsl, xzb, xs, off):
    """One token x (k,) -> int8 codes per group of d's weights, in the SIMD layout; `off` is the
    tier's re-centring of the codes (RECENTRE).

    4-bit: byte j of a weight row holds columns 2j (low nibble) and 2j+1, so xa[j] = q[2j],
    xb[j] = q[2j+1]. 8-bit: xa[j] = q[j]. Lane g (4 weight bytes) covers 8 (4-bit) or 4 (8-bit)
    columns: xsl[g] = its activation scale, init[g] = (off - zero) * sum of its codes, zero = the
    symmetric zero point (0 for asymmetric formats): the tile's dot of re-centred codes plus init
    is the dot of (code - zero).
    xzb[b] = scale_b * sum of block b's codes (asymmetric correction)."""
    k, gs, nb, bits = d.k, d.block, d.nb, d.kind
    nch = (d.row_bytes + 63) // 64
    nbytes = nch * 64
    for j in range(nbytes):
        xa[j] = 0
        xb[j] = 0
    for b in range(nb):
        lo, hi = b * gs, min(k, (b + 1) * gs)
        # every loop below runs from 0 over slices: from a variable start, numba's negative-index
        # wraparound stays in the loop and LLVM leaves it scalar (the amax loop was)
        xg, m = x[lo:hi], hi - lo
        amax = np.float32(0.0)
        for c in range(m):
            amax = max(amax, abs(xg[c]))
        s = amax / np.float32(127.0)
        inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
        xs[b] = s
        tot = np.int32(0)
        if bits == 4:  # column pairs (lo is even), straight-line so that LLVM vectorizes it
            ag, bg = xa[lo >> 1 :], xb[lo >> 1 :]
            for c2 in range(m >> 1):
                q0 = np.int32(max(np.float32(-127.0), min(np.float32(127.0), np.rint(xg[2 * c2] * inv))))
                q1 = np.int32(max(np.float32(-127.0), min(np.float32(127.0), np.rint(xg[2 * c2 + 1] * inv))))
                ag[c2] = q0
                bg[c2] = q1
                tot += q0 + q1
            if m & 1:
                q0 = np.int32(max(np.float32(-127.0), min(np.float32(127.0), np.rint(xg[m - 1] * inv))))
                ag[m >> 1] = q0
                tot += q0
        else:
            ag = xa[lo:]
            for c in range(m):
                q0 = np.int32(max(np.float32(-127.0), min(np.float32(127.0), np.rint(xg[c] * inv))))
                ag[c] = q0
                tot += q0
        xzb[b] = s * np.float32(tot)
    zero = d.zero if d.sym else 0
    shift = lane_shift(d)  # lane g is in block g >> shift (a division here cost more than the codes)
    for g in range(nch * 16):
        blk = g >> shift
        xsl[g] = xs[blk] if blk < nb else np.float32(0.0)
        tot = 0
        for j in range(4 * g, 4 * g + 4):
            tot += np.int32(xa[j])
            if bits == 4:
                tot += np.int32(xb[j])
        init[g] = (off - zero) * tot


# ----------------------------------------------------------------------------- tiles and rows
@njit(cache=True)
def lane_shift(d):
    """log2 of the 4-byte lanes per weight block (group/8 for 4-bit, group/4 for 8-bit; a power of
    two), the microkernel's `shift`: worked out once per linear, not per tile."""
    lpb = d.block // (8 if d.kind == KIND_Q4 else 4)
    shift = 0
    while (1 << shift) < lpb:
        shift += 1
    return shift


@njit(cache=True)
def _init_addr(d, addr, tier):
    """The lane start values' address for the tile, or 0 (null) when every one of them,
    (off - zero) * sum, is zero and the tier has a copy of its tile without them (ZERO_INIT)."""
    bits = d.kind
    if ZERO_INIT[tier, bits] and RECENTRE[tier, bits] == (d.zero if d.sym else 0):
        return 0
    return addr


@njit(cache=True, fastmath=True)
def _qrows_mat(d, shift, r0, r1, xa, xb, init, xsl, i0, o, so, tier):
    """Prompt: raw dots of rows [r0, r1) with the TB tokens i0.. of the activation buffers (2-d:
    one row per token) at o + u*so + r*4: RB x TB tiles, then the leftover rows as 1 x TB."""
    rb, ss = d.row_bytes, d.nb * 2
    sa, sl = xa.strides[0], init.strides[0]
    a, b = xa.ctypes.data + i0 * sa, xb.ctypes.data + i0 * sa
    i, x = _init_addr(d, init.ctypes.data + i0 * sl, tier), xsl.ctypes.data + i0 * sl
    bits = d.kind
    r = r0
    while r + RB <= r1:
        qdot_rxt(tier, bits, d.w_addr + r * rb, rb, a, b, i, x, sa, sl, d.s_addr + r * ss, ss, shift, o + r * 4, so)
        r += RB
    while r < r1:
        qdot_1xt(tier, bits, d.w_addr + r * rb, rb, a, b, i, x, sa, sl, d.s_addr + r * ss, ss, shift, o + r * 4, so)
        r += 1


@njit(cache=True, fastmath=True)
def _qrows_vec(d, shift, r0, r1, xa, xb, init, xsl, o, tier):
    """Decode: raw dots of rows [r0, r1) with one token (1-d activation buffers) at o + r*4: the
    RB-row tiles in one microkernel call (`qdot_rows`), then the leftover rows one by one."""
    rb, ss, nt = d.row_bytes, d.nb * 2, (r1 - r0) // RB
    i = _init_addr(d, init.ctypes.data, tier)
    a, b, x = xa.ctypes.data, xb.ctypes.data, xsl.ctypes.data
    w, s = d.w_addr + r0 * rb, d.s_addr + r0 * ss
    qdot_rows(tier, d.kind, w, rb, a, b, i, x, s, ss, shift, o + r0 * 4, nt)
    for r in range(r0 + nt * RB, r1):
        qdot_1x1(tier, d.kind, d.w_addr + r * rb, rb, a, b, i, x, 0, 0, d.s_addr + r * ss, ss, shift, o + r * 4, 0)


@njit(cache=True, fastmath=True)
def _qrows_few(d, shift, r0, r1, xa, xb, init, xsl, t, o, so, tier):
    """A few tokens: raw dots of rows [r0, r1) with the t tokens of the activation buffers (2-d)
    at o + u*so + r*4, each token's bit for bit `_qrows_vec`'s: the RB-row tiles in one
    `qdot_few` call (every weight chunk unpacked once per TB tokens), then the leftover rows one
    token at a time, as decode runs them."""
    rb, ss, nt = d.row_bytes, d.nb * 2, (r1 - r0) // RB
    sa, sl = xa.strides[0], init.strides[0]
    i = _init_addr(d, init.ctypes.data, tier)
    a, b, x = xa.ctypes.data, xb.ctypes.data, xsl.ctypes.data
    w, s = d.w_addr + r0 * rb, d.s_addr + r0 * ss
    qdot_few(tier, d.kind, w, rb, a, b, i, x, sa, sl, s, ss, shift, o + r0 * 4, so, nt, t)
    for r in range(r0 + nt * RB, r1):
        w, s = d.w_addr + r * rb, d.s_addr + r * ss
        for u in range(t):
            iu = i + u * sl if i != 0 else 0
            au, bu, xu = a + u * sa, b + u * sa, x + u * sl
            qdot_1x1(tier, d.kind, w, rb, au, bu, iu, xu, 0, 0, s, ss, shift, o + u * so + r * 4, 0)


@njit(cache=True, fastmath=True)
def _zero_rows(d, r):
    """Row r's float32 zero*scale per block (asymmetric formats)."""
    return carray(as_voidptr(d.z_addr + r * d.nb * 4), (d.nb,), np.float32)


@njit(cache=True, fastmath=True)
def _corrected(v, zs, xz):
    """v - sum_b zs[b] * xz[b]: the asymmetric correction, zero*scale_w times scale_x*sum(x codes)
    per block, summed in float64 (it cancels most of v, whatever order fastmath picks)."""
    corr = 0.0
    for b in range(zs.shape[0]):
        corr += np.float64(zs[b]) * np.float64(xz[b])
    return np.float32(v - corr)


@njit(cache=True, fastmath=True)
def _bias(d, r):
    return carray(as_voidptr(d.b_addr), (d.n,), np.float32)[r] if d.b_addr != 0 else np.float32(0.0)


@njit(cache=True, fastmath=True)
def _finish(d, r, v, xzb):
    """Decode: row r's raw dot v -> its output (zero-point correction, bias)."""
    if d.z_addr != 0:
        v = _corrected(v, _zero_rows(d, r), xzb)
    return v + _bias(d, r)


@njit(cache=True, fastmath=True)
def _finish_mat(d, r0, r1, out, xzb, t):
    """Prompt: `_finish` for rows [r0, r1) of all t tokens of out (t, n), each row's zero*scale
    values and bias read once for every token. Called per (token, row), `_finish` made an
    asymmetric 3072 x 576 g32 linear on 512 tokens take 16.0 ms against the symmetric 5.1 ms."""
    for r in range(r0, r1):
        b = _bias(d, r)
        if d.z_addr == 0:
            for i in range(t):
                out[i, r] += b
            continue
        zs = _zero_rows(d, r)
        for i in range(t):
            out[i, r] = _corrected(out[i, r], zs, xzb[i]) + b


@njit(cache=True, fastmath=True)
def _frow(d, r, x):
    w = d.w_addr + r * d.row_bytes
    if d.kind == KIND_F16:
        v = rowdot_f16(w, x.ctypes.data, d.k)
    else:
        v = rowdot_f32(w, x.ctypes.data, d.k)
    if d.b_addr != 0:
        v += carray(as_voidptr(d.b_addr), (d.n,), np.float32)[r]
    return v


# ----------------------------------------------------------------------------- matrix kernels
# Decode tiles per microkernel call (`qdot_rows`) and per unit of the row split between threads:
# enough to amortize the call, few enough that prange splits SmolLM2's 576 rows evenly (18 units).
VEC_TILES = 8


@njit(cache=True)
def _held(d):
    """A one-record array holding a copy of the LINEAR record d. numba 0.68 cannot hand a record
    argument to a prange body (its parfor passes the record by value where the gufunc takes a
    pointer: "Type of #N arg mismatch: [96 x i8]* != [96 x i8]"); an array of records it can."""
    dv = np.empty(1, LINEAR)
    dv[0] = d
    return dv


@njit(cache=True, parallel=True, fastmath=True)
def linear_vec(d, x, out, xa, xb, init, xsl, xzb, xs, tier):
    """One token: out (n,) = x (k,) W^T + b. Rows split across threads, VEC_TILES * RB at a time.
    The model's step decodes through `linear_few` (t = 1, the same rows); this is the 1-d API."""
    n = d.n
    dv = _held(d)  # prange bodies read the record through this array (numba passes a record argument badly)
    if d.kind == KIND_F32 or d.kind == KIND_F16:
        for r in prange(n):
            out[r] = _frow(dv[0], r, x)
        return
    quantize_act(x, d, xa, xb, init, xsl, xzb, xs, RECENTRE[tier, d.kind])
    plain = d.z_addr == 0 and d.b_addr == 0
    shift = lane_shift(d)
    o = out.ctypes.data
    rows = VEC_TILES * RB
    for blk in prange((n + rows - 1) // rows):  # VEC_TILES tiles per microkernel call
        r0 = blk * rows
        r1 = min(n, r0 + rows)
        _qrows_vec(dv[0], shift, r0, r1, xa, xb, init, xsl, o, tier)
        if not plain:
            for r in range(r0, r1):
                out[r] = _finish(dv[0], r, out[r], xzb)


@njit(cache=True, parallel=True, fastmath=True)
def linear_few(d, x, out, xa, xb, init, xsl, xzb, xs, tier):
    """A few tokens (speculative verification): out (t, n) = x (t, k) W^T + b, each token's row
    bit for bit what `linear_vec` gives it (the decode tile's operations in its order, `qdot_few`;
    the same finish), so that a verify pass equals t decode steps exactly. Each weight chunk is
    read from memory and unpacked once per TB tokens (`_qrows_few`), so the pass costs about one
    decode step's weight traffic plus the extra tokens' dot products."""
    t, n = x.shape[0], d.n
    dv = _held(d)  # prange bodies read the record through this array (numba passes a record argument badly)
    rows = VEC_TILES * RB
    if d.kind == KIND_F32 or d.kind == KIND_F16:
        for blk in prange((n + rows - 1) // rows):
            for i in range(t):
                for r in range(blk * rows, min(n, (blk + 1) * rows)):
                    out[i, r] = _frow(dv[0], r, x[i])
        return
    off = RECENTRE[tier, d.kind]
    for i in range(t):
        quantize_act(x[i], dv[0], xa[i], xb[i], init[i], xsl[i], xzb[i], xs[i], off)
    plain = d.z_addr == 0 and d.b_addr == 0
    shift = lane_shift(d)
    so, o = out.strides[0], out.ctypes.data
    for blk in prange((n + rows - 1) // rows):
        r0 = blk * rows
        r1 = min(n, r0 + rows)
        _qrows_few(dv[0], shift, r0, r1, xa, xb, init, xsl, t, o, so, tier)
        if not plain:
            for i in range(t):
                for r in range(r0, r1):
                    out[i, r] = _finish(dv[0], r, out[i, r], xzb[i])


ROW_TILE = 32  # weight rows kept in L1 while every token group passes over them
TOK_TILE = 64


@njit(cache=True, parallel=True, fastmath=True)
def linear_mat(d, x, out, xa, xb, init, xsl, xzb, xs, tier):
    """Prompt (t tokens): out (t, n) = x (t, k) W^T + b. Quantized: a real GEMM of RB x TB
    microkernel tiles (`_qrows_mat`), tiles of ROW_TILE output rows in parallel, the token
    groups streaming over a tile while it sits in L1. Float: row dots, TOK_TILE tokens per pass."""
    t, n = x.shape[0], d.n
    dv = _held(d)  # prange bodies read the record through this array (numba passes a record argument badly)
    ntile = (n + ROW_TILE - 1) // ROW_TILE
    if d.kind == KIND_F32 or d.kind == KIND_F16:
        for tile in prange(ntile):
            r0, r1 = tile * ROW_TILE, min(n, (tile + 1) * ROW_TILE)
            for t0 in range(0, t, TOK_TILE):
                for r in range(r0, r1):
                    for i in range(t0, min(t, t0 + TOK_TILE)):
                        out[i, r] = _frow(dv[0], r, x[i])
        return
    off = RECENTRE[tier, d.kind]
    for i in prange(t):
        quantize_act(x[i], dv[0], xa[i], xb[i], init[i], xsl[i], xzb[i], xs[i], off)
    tfull = t - t % TB
    so, o = out.strides[0], out.ctypes.data
    shift = lane_shift(d)
    # leftover tokens (t % TB): one more tile, padded with zero rows, so that every token's sums are
    # the tile's whatever t is (a prompt read in pieces gives the logits of it read at once; the
    # decode kernel's order differs from the tile's in the last bits on some tiers)
    m = TB if tfull < t else 0  # no padded tile (and no allocation) when t is a multiple of TB
    pa, pb = np.zeros((m, xa.shape[1]), np.int8), np.zeros((m, xb.shape[1]), np.int8)  # (m, cap)
    pi, pl = np.zeros((m, init.shape[1]), np.int32), np.zeros((m, xsl.shape[1]), np.float32)
    pout = np.empty((m, n), np.float32)
    for i in range(tfull, t):
        pa[i - tfull], pb[i - tfull], pi[i - tfull], pl[i - tfull] = xa[i], xb[i], init[i], xsl[i]
    for tile in prange(ntile):
        r0, r1 = tile * ROW_TILE, min(n, (tile + 1) * ROW_TILE)
        for i0 in range(0, tfull, TB):
            _qrows_mat(dv[0], shift, r0, r1, xa, xb, init, xsl, i0, o + i0 * so, so, tier)
        if tfull < t:
            _qrows_mat(dv[0], shift, r0, r1, pa, pb, pi, pl, 0, pout.ctypes.data, pout.strides[0], tier)
            for i in range(tfull, t):
                for r in range(r0, r1):
                    out[i, r] = pout[i - tfull, r]
        if dv[0].z_addr != 0 or dv[0].b_addr != 0:
            _finish_mat(dv[0], r0, r1, out, xzb, t)


# ----------------------------------------------------------------------------- numpy references
def ref_linear(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Float reference: x (..., k) @ w (n, k)^T + bias, in float64."""
    y = x.astype(np.float64) @ w.astype(np.float64).T
    return y if bias is None else y + bias


def ref_quantize_act(x: np.ndarray, gs: int) -> np.ndarray:
    """Activations as the kernels see them: per group of gs columns, int8 codes times max|x|/127."""
    k = x.shape[-1]
    nb = -(-k // gs)
    xp = np.zeros((*x.shape[:-1], nb * gs), np.float32)
    xp[..., :k] = x
    g = xp.reshape(*x.shape[:-1], nb, gs)
    s = (np.abs(g).max(-1, keepdims=True) / np.float32(127.0)).astype(np.float32)
    q = np.clip(np.rint(g * np.where(s > 0, np.float32(1.0) / np.where(s > 0, s, 1), 0)), -127, 127)
    return (q * s).reshape(*x.shape[:-1], -1)[..., :k]


def ref_linear_q8act(x, qweight, scales, zeros, bits, k, gs, bias=None):
    """Reference of the quantized kernels: int8-rounded activations times dequantized weights."""
    return ref_linear(ref_quantize_act(x, gs), dequantize(qweight, scales, zeros, bits, k), bias)


# ----------------------------------------------------------------------------- tier self-check
def make_desc(qweight, scales, zeros, bits, k, gs, keep, bias=None) -> np.ndarray:
    """The descriptor of a packed linear held in numpy arrays (appended to `keep`, which must
    outlive every call with the descriptor): scales padded to fp16 as the loader stores them."""
    n, nb, bb = qweight.shape
    d = record(LINEAR)
    s16 = np.zeros(n * nb + 16, np.float16)
    s16[: n * nb] = scales.reshape(-1)
    s16 = s16.view(np.uint16)
    qweight = np.ascontiguousarray(qweight)
    keep += [qweight, s16]
    d.kind, d.n, d.k, d.w_addr, d.s_addr = bits, n, k, qweight.ctypes.data, s16.ctypes.data
    d.block, d.nb, d.row_bytes, d.sym, d.zero = gs, nb, nb * bb, zeros is None, 1 << (bits - 1)
    if zeros is not None:
        zs = np.ascontiguousarray(zeros.reshape(-1).astype(np.float32) * scales.reshape(-1).astype(np.float32))
        keep.append(zs)
        d.z_addr = zs.ctypes.data
    if bias is not None:
        bias = np.ascontiguousarray(bias, np.float32)
        keep.append(bias)
        d.b_addr = bias.ctypes.data
    return d


def act_buffers(d, t: int):
    """Scratch of quantize_act for t tokens: (xa, xb, init, xsl, xzb, xs)."""
    cap, nbc = act_caps(d)
    return (
        np.zeros((t, cap), np.int8),
        np.zeros((t, cap), np.int8),
        np.zeros((t, cap // 4), np.int32),
        np.zeros((t, cap // 4), np.float32),
        np.zeros((t, nbc), np.float32),
        np.zeros((t, nbc), np.float32),
    )


def check_calls(tier_id: int):
    """The self-check's kernel calls, one (reference, (linear_mat args), (linear_few args)) per
    linear: 4-bit sym g32 with a row tail, 8-bit asym g16 (cachepack.py compiles the same types)."""
    rng = np.random.default_rng(1)
    tier = tiers.BY_ID[tier_id]  # the Tier, not its id: the specialization the model runs (tiers.py)
    for bits, gs, sym, n, k in ((4, 32, True, 9, 200), (8, 16, False, 6, 72)):
        nb = -(-k // gs)
        codes = rng.integers(0, 1 << bits, (n, nb * gs)).astype(np.uint8)
        codes[:, k:] = 1 << (bits - 1)
        qw = pack_codes(codes, bits)
        qw = qw.reshape(n, nb, -1)
        scales = (rng.random(n * nb) * 0.1 + 1e-3).astype(np.float16).astype(np.float32)
        zeros = None if sym else rng.integers(0, 1 << bits, (n, nb)).astype(np.uint8)
        keep: list = []
        d = make_desc(qw, scales, zeros, bits, k, gs, keep)
        x = rng.standard_normal((5, k)).astype(np.float32)  # (5 tokens, k)
        ref = ref_linear_q8act(x, qw, scales, zeros, bits, k, gs)  # (5, n)
        mat = (d, x, np.zeros((5, n), np.float32), *act_buffers(d, 5), tier)
        few = (d, x[2:3], np.zeros((1, n), np.float32), *act_buffers(d, 1), tier)  # decode, as the step runs it
        yield ref, mat, few, keep


def self_check(tier_id: int) -> float:
    """Worst error, relative to the output scale, of the tier's decode and prompt kernels against
    the numpy reference on small random linears (`check_calls`): a miscompiled or mis-detected
    tier shows here at load instead of as wrong text."""
    worst = 0.0
    for ref, mat, few, _keep in check_calls(tier_id):
        linear_mat(*mat)
        linear_few(*few)
        out, o1 = mat[2], few[2]
        err = max(np.abs(out - ref).max(), np.abs(o1 - ref[2]).max()) / np.abs(ref).max()
        worst = max(worst, float(err) if np.isfinite(err) else np.inf)
    return worst


SELF_CHECK_TOL = 1e-4


def checked_tier(kernels: str | None):
    """(tier, warning or None): the tier `kernels` names (tiers.resolve), or, if its self-check
    fails, the next one down its fallback chain that passes, with a one-line warning saying so."""
    tier = tiers.resolve(kernels)
    warning = None
    while True:
        err = self_check(tier.id)
        if err <= SELF_CHECK_TOL:
            return tier, warning
        if tier.fallback is None:
            raise EdgeLLMError(f"kernel tier {tier.name} failed its self-check (error {err:.2g}) and has no fallback")
        note = (
            f"kernel tier {tier.name} failed its self-check (error {err:.2g} > {SELF_CHECK_TOL:g}); using "
            f"{tier.fallback}"
        )
        warning = note if warning is None else f"{warning}; {note}"
        tier = tiers.BY_NAME[tier.fallback]


# numba's cache of this module's kernels keys on all their sources, not only this file (jitcache.py)
stamp(globals())

"""Linear layers y = x W^T + b over every weight format the exporter writes, Numba + numpy reference.

A linear is described by one int64 row (`desc`, llama2.c style: weights are found by address, so
one compiled decode step serves every layer without Python in between):

    kind  0 fp32 | 1 fp16 | 4 4-bit | 8 8-bit       n, k   out and in features
    w     address of the weights: float (n, k) or packed uint8 (n, n_blocks, group*bits/8)
    s     address of the fp16 scales (n*n_blocks + 16 padding; exact: the exporter stored fp16 values)
    z     address of float32 zero*scale (n*n_blocks), asymmetric only, else 0
    b     address of the float32 bias (n,), or 0
    gs, nb, rb   group size, blocks per row, bytes per weight row;  sym, zero   symmetric, its zero point

Quantized layers multiply by int8-quantized activations (one scale per weight group, like
llama.cpp's Q8_0 next to Q4_0): `quantize_act` writes them in the layout the SIMD microkernel reads
(see simd.py). The int8 rounding of activations is the only deviation from the float product; the
numpy reference `ref_linear_q8act` reproduces it exactly, `ref_linear` is the float product.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from .simd import HAVE_VNNI, RB, TB, as_voidptr, half_to_float, qdot_1x1, qdot_1xt, qdot_rx1, qdot_rxt, rowdot_f16, rowdot_f32

K_F32, K_F16, K_Q4, K_Q8 = 0, 1, 4, 8
D_KIND, D_N, D_K, D_W, D_S, D_Z, D_B, D_GS, D_NB, D_RB, D_SYM, D_ZERO = range(12)
DESC_LEN = 12


def act_caps(desc: np.ndarray) -> tuple[int, int]:
    """(bytes per token of quantized activations, blocks) needed by the linear `desc`."""
    if desc[D_KIND] in (K_F32, K_F16):
        return 64, 1
    return int(-(-desc[D_RB] // 64) * 64), int(desc[D_NB])


# ----------------------------------------------------------------------------- activations
@njit(cache=True)  # exact IEEE arithmetic: codes match the numpy reference bit for bit
def quantize_act(x, d, xa, xb, init, xsl, xzb, xs):
    """One token x (k,) -> int8 codes per group of d's weights, in the SIMD layout.

    4-bit: byte j of a weight row holds columns 2j (low nibble) and 2j+1, so xa[j] = q[2j],
    xb[j] = q[2j+1]. 8-bit: xa[j] = q[j]. Lane g (4 weight bytes) covers 8 (4-bit) or 4 (8-bit)
    columns: xsl[g] = its activation scale, init[g] = -zero * sum of its codes (symmetric).
    xzb[b] = scale_b * sum of block b's codes (asymmetric correction)."""
    k, gs, nb, bits = d[D_K], d[D_GS], d[D_NB], d[D_KIND]
    nch = (d[D_RB] + 63) // 64
    nbytes = nch * 64
    for j in range(nbytes):
        xa[j] = 0
        xb[j] = 0
    for b in range(nb):
        lo, hi = b * gs, min(k, (b + 1) * gs)
        amax = np.float32(0.0)
        for c in range(lo, hi):
            amax = max(amax, abs(x[c]))
        s = amax / np.float32(127.0)
        inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
        xs[b] = s
        tot = np.int32(0)
        if bits == 4:  # column pairs (lo is even), straight-line so that LLVM vectorizes it
            for c2 in range(lo >> 1, hi >> 1):
                q0 = np.int32(max(np.float32(-127.0), min(np.float32(127.0), np.rint(x[2 * c2] * inv))))
                q1 = np.int32(max(np.float32(-127.0), min(np.float32(127.0), np.rint(x[2 * c2 + 1] * inv))))
                xa[c2] = q0
                xb[c2] = q1
                tot += q0 + q1
            if hi & 1:
                q0 = np.int32(max(np.float32(-127.0), min(np.float32(127.0), np.rint(x[hi - 1] * inv))))
                xa[hi >> 1] = q0
                tot += q0
        else:
            for c in range(lo, hi):
                q0 = np.int32(max(np.float32(-127.0), min(np.float32(127.0), np.rint(x[c] * inv))))
                xa[c] = q0
                tot += q0
        xzb[b] = s * np.float32(tot)
    cols = 8 if bits == 4 else 4
    zero = d[D_ZERO] if d[D_SYM] else 0
    for g in range(nch * 16):
        blk = (g * cols) // gs
        xsl[g] = xs[blk] if blk < nb else np.float32(0.0)
        tot = 0
        for j in range(4 * g, 4 * g + 4):
            tot += np.int32(xa[j])
            if bits == 4:
                tot += np.int32(xb[j])
        init[g] = -zero * tot


# ----------------------------------------------------------------------------- tiles and rows
@njit(cache=True)
def lane_shift(d):
    """log2 of the 4-byte lanes per weight block (group/8 for 4-bit, group/4 for 8-bit; a power of
    two), the microkernel's `shift`: worked out once per linear, not per tile."""
    lpb = d[D_GS] // (8 if d[D_KIND] == K_Q4 else 4)
    shift = 0
    while (1 << shift) < lpb:
        shift += 1
    return shift


@njit(cache=True, fastmath=True)
def _qdot_simd(d, shift, r, nrows, xa, xb, init, xsl, i0, ntok, out, so):
    """Raw dots of weight rows r..r+nrows (1 or RB) with tokens i0..i0+ntok (1 or TB) of the
    activation buffers (2-d: one row per token), stored at address out + u*so + j*4."""
    rb, ss = d[D_RB], d[D_NB] * 2
    w, s = d[D_W] + r * rb, d[D_S] + r * ss
    sa, sl = xa.strides[0], init.strides[0]
    a, b = xa.ctypes.data + i0 * sa, xb.ctypes.data + i0 * sa
    i, x = init.ctypes.data + i0 * sl, xsl.ctypes.data + i0 * sl
    bits = d[D_KIND]
    if nrows == 1 and ntok == 1:
        qdot_1x1(bits, w, rb, a, b, i, x, sa, sl, s, ss, shift, out, so)
    elif ntok == 1:
        qdot_rx1(bits, w, rb, a, b, i, x, sa, sl, s, ss, shift, out, so)
    elif nrows == 1:
        qdot_1xt(bits, w, rb, a, b, i, x, sa, sl, s, ss, shift, out, so)
    else:
        qdot_rxt(bits, w, rb, a, b, i, x, sa, sl, s, ss, shift, out, so)


@njit(cache=True, fastmath=True)
def _qrows_simd(d, shift, r0, r1, xa, xb, init, xsl, i0, ntok, o, so):
    """Raw dots of rows [r0, r1) with tokens i0..i0+ntok at o + u*so + r*4: RB-row tiles, then
    the leftover rows one by one."""
    r = r0
    while r + RB <= r1:
        _qdot_simd(d, shift, r, RB, xa, xb, init, xsl, i0, ntok, o + r * 4, so)
        r += RB
    while r < r1:
        _qdot_simd(d, shift, r, 1, xa, xb, init, xsl, i0, ntok, o + r * 4, so)
        r += 1


@njit(cache=True, fastmath=True)
def _qrow_portable(d, r, xa, xb, init, xsl):
    """The same integer arithmetic as the SIMD kernel in plain loops (any CPU)."""
    rb, nb, bits = d[D_RB], d[D_NB], d[D_KIND]
    w = carray(as_voidptr(d[D_W] + r * rb), (rb,), np.uint8)
    s = carray(as_voidptr(d[D_S] + r * nb * 2), (nb,), np.uint16)
    cols = 8 if bits == 4 else 4
    acc = np.float32(0.0)
    for g in range((rb + 3) // 4):
        isum = init[g]
        for j in range(4 * g, min(rb, 4 * g + 4)):
            v = np.int32(w[j])
            if bits == 4:
                isum += (v & 15) * np.int32(xa[j]) + (v >> 4) * np.int32(xb[j])
            else:
                isum += v * np.int32(xa[j])
        blk = (g * cols) // d[D_GS]
        acc += np.float32(isum) * half_to_float(s[blk]) * xsl[g]
    return acc


@njit(cache=True, fastmath=True)
def _finish(d, r, v, xzb):
    if d[D_Z] != 0:  # asymmetric: subtract sum_b zero*scale_w * scale_x*sum(x codes)
        nb = d[D_NB]
        zs = carray(as_voidptr(d[D_Z] + r * nb * 4), (nb,), np.float32)
        corr = 0.0  # float64: the correction cancels most of v, whatever order fastmath picks
        for b in range(nb):
            corr += np.float64(zs[b]) * np.float64(xzb[b])
        v = np.float32(v - corr)
    if d[D_B] != 0:
        v += carray(as_voidptr(d[D_B]), (d[D_N],), np.float32)[r]
    return v


@njit(cache=True, fastmath=True)
def _frow(d, r, x):
    w = d[D_W] + r * d[D_RB]
    if d[D_KIND] == K_F16:
        v = rowdot_f16(w, x.ctypes.data, d[D_K])
    else:
        v = rowdot_f32(w, x.ctypes.data, d[D_K])
    if d[D_B] != 0:
        v += carray(as_voidptr(d[D_B]), (d[D_N],), np.float32)[r]
    return v


# ----------------------------------------------------------------------------- matrix kernels
@njit(cache=True, parallel=True, fastmath=True)
def linear_vec(d, x, out, xa, xb, init, xsl, xzb, xs, simd):
    """Decode (one token): out (n,) = x (k,) W^T + b. Rows split across threads."""
    n = d[D_N]
    if d[D_KIND] == K_F32 or d[D_KIND] == K_F16:
        for r in prange(n):
            out[r] = _frow(d, r, x)
        return
    quantize_act(x, d, xa, xb, init, xsl, xzb, xs)
    if simd and HAVE_VNNI:
        plain = d[D_Z] == 0 and d[D_B] == 0
        shift = lane_shift(d)
        xa2, xb2, init2, xsl2 = xa.reshape(1, -1), xb.reshape(1, -1), init.reshape(1, -1), xsl.reshape(1, -1)
        o = out.ctypes.data
        for blk in prange((n + RB - 1) // RB):
            r0 = blk * RB
            _qrows_simd(d, shift, r0, min(n, r0 + RB), xa2, xb2, init2, xsl2, 0, 1, o, 0)
            if not plain:
                for r in range(r0, min(n, r0 + RB)):
                    out[r] = _finish(d, r, out[r], xzb)
    else:
        for r in prange(n):
            out[r] = _finish(d, r, _qrow_portable(d, r, xa, xb, init, xsl), xzb)


ROW_TILE = 32  # weight rows kept in L1 while every token group passes over them
TOK_TILE = 64


@njit(cache=True, parallel=True, fastmath=True)
def linear_mat(d, x, out, xa, xb, init, xsl, xzb, xs, simd):
    """Prompt (t tokens): out (t, n) = x (t, k) W^T + b. Quantized + VNNI: a real GEMM of RB x TB
    microkernel tiles (`_qdot_simd`), tiles of ROW_TILE output rows in parallel, the token
    groups streaming over a tile while it sits in L1."""
    t, n = x.shape[0], d[D_N]
    quant = not (d[D_KIND] == K_F32 or d[D_KIND] == K_F16)
    if quant:
        for i in prange(t):
            quantize_act(x[i], d, xa[i], xb[i], init[i], xsl[i], xzb[i], xs[i])
    ntile = (n + ROW_TILE - 1) // ROW_TILE
    if quant and simd and HAVE_VNNI:
        tfull = t - t % TB
        so, o = out.strides[0], out.ctypes.data
        shift = lane_shift(d)
        for tile in prange(ntile):
            r0, r1 = tile * ROW_TILE, min(n, (tile + 1) * ROW_TILE)
            for i0 in range(0, tfull, TB):
                _qrows_simd(d, shift, r0, r1, xa, xb, init, xsl, i0, TB, o + i0 * so, so)
            for i in range(tfull, t):  # leftover tokens one by one
                _qrows_simd(d, shift, r0, r1, xa, xb, init, xsl, i, 1, o + i * so, so)
            if d[D_Z] != 0 or d[D_B] != 0:
                for i in range(t):
                    for r in range(r0, r1):
                        out[i, r] = _finish(d, r, out[i, r], xzb[i])
        return
    for tile in prange(ntile):
        r0, r1 = tile * ROW_TILE, min(n, (tile + 1) * ROW_TILE)
        for t0 in range(0, t, TOK_TILE):
            for r in range(r0, r1):
                for i in range(t0, min(t, t0 + TOK_TILE)):
                    if not quant:
                        out[i, r] = _frow(d, r, x[i])
                    else:
                        out[i, r] = _finish(d, r, _qrow_portable(d, r, xa[i], xb[i], init[i], xsl[i]), xzb[i])


# ----------------------------------------------------------------------------- numpy references
def dequantize(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, k: int) -> np.ndarray:
    """Packed MatMulNBits weights -> float32 (n, k): (code - zero) * scale, padding dropped."""
    n, nb, _ = qweight.shape
    codes = qweight if bits == 8 else np.stack((qweight & 15, qweight >> 4), -1).reshape(n, nb, -1)
    z = (1 << (bits - 1)) if zeros is None else zeros.reshape(n, nb, 1).astype(np.float32)
    w = (codes.astype(np.float32) - z) * scales.reshape(n, nb, 1).astype(np.float32)
    return w.reshape(n, -1)[:, :k]


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

"""Element-wise and attention kernels, each beside its numpy reference (`ref_*`).

Shapes: x (t, h) for t tokens; q (t, n_heads*hd); KV cache (n_kv, nblk, hd, B) per layer: keys
and values in blocks of B positions, each block transposed (a row of B positions per head dim), so
that attention's loops run along positions (see `_attn_group`); position p (p % ring in a sliding
layer's ring buffer) sits in block p // B, column p % B. B comes from the array (kvcache.py picks
it); blocks keep the cache's pages resident as positions fill them, as rows (ctx, hd) did.
"""

from __future__ import annotations

import math

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import overload

from ..format.records import KIND_F16, KIND_F32, KIND_Q4
from .jitcache import stamp
from .simd import as_voidptr, float_from_bits, float_to_half, half_to_float

# ----------------------------------------------------------------------------- exp
_LOG2E, _LN2_HI, _LN2_LO = np.float32(1.44269504), np.float32(0.693359375), np.float32(-2.12194440e-4)


@njit(cache=True, fastmath=True, inline="always")
def fast_exp(x):
    """float32 exp that LLVM vectorizes (np.exp is a scalar libm call per element): x = n ln2 + r,
    |r| <= ln2/2, exp(r) by the Cephes expf polynomial, times 2**n built from its exponent bits.
    Relative error < 3e-7 on [-87, 88]; inputs are clamped to that range (below it: exp(-87), a
    normal float ~1.6e-38; softmax and silu never need subnormals)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.float32(np.floor(x * _LOG2E + np.float32(0.5)))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


# ----------------------------------------------------------------------------- KV cache elements
# The KV cache is float32, or fp16 held as uint16 bits (numba has no CPU float16 arithmetic); the
# kernels read and write it through these two, resolved at compile time by the cache's dtype.
def kv_get(x):
    """float32 value(s) of KV cache element(s): the numpy reference of the compiled overload."""
    x = np.asarray(x)
    return x.view(np.float16).astype(np.float32) if x.dtype == np.uint16 else x.astype(np.float32)


def kv_cast(value, cache):
    """`value` (float32) in the element type of the array `cache` (fp16 bits when uint16): the
    numpy reference of the compiled overload."""
    v = np.asarray(value, np.float32)
    return v.astype(np.float16).view(np.uint16) if cache.dtype == np.uint16 else v


@overload(kv_get, inline="always")
def _kv_get(x):
    if x == types.uint16:
        return lambda x: half_to_float(x)
    return lambda x: np.float32(x)


@overload(kv_cast, inline="always")
def _kv_cast(value, cache):
    if cache.dtype == types.uint16:
        return lambda value, cache: float_to_half(np.float32(value))
    return lambda value, cache: np.float32(value)


# ----------------------------------------------------------------------------- copies
@njit(cache=True)
def copy_rows(src, dst):
    """dst (t, n) := src (t, n), as plain loops. numba's `dst[:] = src` compiles a shape check
    whose error message (string formatting, repr of the shapes): 2.7 s of CPU of a first
    compile of the step on Zen 5, for `_residual`'s copy alone; the callers' shapes are equal."""
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[i, j] = src[i, j]


# ----------------------------------------------------------------------------- norms
@njit(cache=True, fastmath=True)
def rms_norm(x, w_addr, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * w, per row of x (t, h)."""
    t, h = x.shape
    w = carray(as_voidptr(w_addr), (h,), np.float32)
    for i in range(t):
        ss = np.float32(0.0)
        for j in range(h):
            ss += x[i, j] * x[i, j]
        inv = np.float32(1.0) / np.sqrt(ss / h + eps)
        for j in range(h):
            out[i, j] = x[i, j] * inv * w[j]


@njit(cache=True, fastmath=True)
def layer_norm(x, w_addr, b_addr, eps, out):
    """out = (x - mean) / sqrt(var + eps) * w + b, per row of x (t, h)."""
    t, h = x.shape
    w = carray(as_voidptr(w_addr), (h,), np.float32)
    b = carray(as_voidptr(b_addr), (h,), np.float32)
    for i in range(t):
        mu = np.float32(0.0)
        for j in range(h):
            mu += x[i, j]
        mu /= h
        var = np.float32(0.0)
        for j in range(h):
            var += (x[i, j] - mu) * (x[i, j] - mu)
        inv = np.float32(1.0) / np.sqrt(var / h + eps)
        for j in range(h):
            out[i, j] = (x[i, j] - mu) * inv * w[j] + b[j]


def ref_rms_norm(x, w, eps):
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * w


def ref_layer_norm(x, w, b, eps):
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    return (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


# ----------------------------------------------------------------------------- rope
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """HF's inverse frequencies, with `linear` or llama3-style `rope_scaling` applied."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        f, lo, hi = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
        scaled = (1 - smooth) * inv / f + smooth * inv
        return np.where(wavelen > old / lo, inv / f, np.where(wavelen < old / hi, inv, scaled))
    raise ValueError(f"rope_scaling type '{kind}'")


def rope_tables(n_ctx: int, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ang = np.arange(n_ctx, dtype=np.float64)[:, None] * inv_freq[None, :]  # (ctx, hd/2)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@njit(cache=True, fastmath=True)
def rope(x, col0, n_heads, hd, pos0, cos, sin, rot=0):
    """Rotate heads [col0 + h*hd, ...) of x (t, *) in place, HF rotate_half pairing (i, i + rot/2)
    over each head's first `rot` dims (0: all hd; fewer: partial rotary, the rest pass through);
    cos, sin (ctx, rot/2)."""
    half = (rot if rot > 0 else hd) // 2
    for i in range(x.shape[0]):
        p = pos0 + i
        for h in range(n_heads):
            base = col0 + h * hd
            for j in range(half):
                a, b = x[i, base + j], x[i, base + j + half]
                c, s = cos[p, j], sin[p, j]
                x[i, base + j] = a * c - b * s
                x[i, base + j + half] = b * c + a * s


def ref_rope(x, pos, cos, sin):
    """x (t, n_heads, hd), positions (t,) -> rotated copy."""
    half = x.shape[-1] // 2
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)


# ----------------------------------------------------------------------------- attention
@njit(cache=True)
def head_split(jobs, group):
    """(parts, heads per part) to split each group of query heads that share a KV head into, so
    that `jobs` groups (queries x KV heads) give at least four parallel jobs (two per thread on two
    cores, one per core on four): each part reads the group's keys and values for its heads, so
    the fewer parts, the fewer reads. A part holds a multiple of four heads (but the group's last):
    `_attn_group` takes heads four at a time from the group's first, so which way a head is summed
    does not depend on the number of queries (a verify pass sums as the decode step).
    (numba.get_num_threads() in compiled code would stop numba caching it.)"""
    parts = min(group, max(1, (4 + jobs - 1) // jobs))
    per = (group + parts - 1) // parts
    if group >= 4:
        per = (per + 3) // 4 * 4
    return (group + per - 1) // per, per


@njit(cache=True, parallel=True, fastmath=True)
def attention(q, kc, vc, pos0, n_heads, n_kv, hd, out, scores, window, scale=0.0, softcap=0.0, ring=0):
    """Causal GQA attention of t new queries over the cache (decode, and a verify pass of drafted
    tokens). q (t, n_heads*hd); kc, vc (n_kv, nblk, hd, B), float32 or fp16 bits (kv_get),
    already hold positions [0, pos0 + t); out (t, n_heads*hd); scores (threads-independent
    scratch (t*n_heads, ctx)); window > 0: see only the last `window` positions; scale: of q.k
    (0: 1/sqrt(hd)); softcap > 0: scores -> softcap * tanh(scores / softcap); ring > 0: kc, vc
    are ring buffers of `ring` columns (a sliding-window layer's), position p in column p % ring,
    holding at least the window + t - 1 positions the queries see. One job per (query, KV head,
    part of its query heads): `_attn_group`."""
    t = q.shape[0]
    group = n_heads // n_kv
    scale = np.float32(scale if scale > 0 else 1.0 / np.sqrt(hd))
    softcap = np.float32(softcap)
    parts, per = head_split(t * n_kv, group)
    for job in prange(t * n_kv * parts):
        i, kv, part = job // (n_kv * parts), (job // parts) % n_kv, job % parts
        h0 = kv * group + part * per
        h1 = min(h0 + per, (kv + 1) * group)
        n = pos0 + i + 1  # this query sees keys [p0, n)
        p0 = max(0, n - window) if window > 0 else 0
        _attn_group(q[i], h0, h1, kc[kv], vc[kv], scores, i * n_heads, out[i], p0, n, scale, softcap, ring)


@njit(cache=True, inline="always")
def _segment(p, b, ring, bs):
    """Where positions [p, b) start in a blocked cache of blocks of `bs` columns (a ring buffer of
    `ring` columns when ring > 0): (block, column in it, n) for the first n positions, which sit
    side by side in one block (a run ends at b, at the block's end, and where the ring wraps)."""
    c = p % ring if ring > 0 else p
    blk, off = c // bs, c % bs
    n = min(b - p, bs - off)
    if ring > 0:
        n = min(n, ring - c)
    return blk, off, n


@njit(cache=True, fastmath=True)
def _attn_group(qi, h0, h1, kt, vt, scores, srow0, oi, a, b, scale, softcap, ring):
    """Query heads [h0, h1) of one query, which share the KV head kt, vt (nblk, hd, B), over keys
    [a, b): qi (n_heads*hd,) the query row, scores row srow0 + h head h's, oi (n_heads*hd,) the
    output row. Block by block, each head's scores are sums along the block's positions
    (vectorized over them: no horizontal sum per position), and each output dim one dot along
    them; the group's heads take each block in turn while its keys (then values) are in L1/L2,
    four at a time from the group's first head, the rest one by one. Which way a head is summed
    is fixed by its place in its group (`head_split` cuts groups at fours), so `attention` and
    the batched `attention_rows`, and a verify pass and the decode steps, agree bit for bit.
    (Rows (ctx, hd) with one dot over hd per position and head, every head reading the cache
    again: 1.5x the time at 4,096 positions, TinyLlama shape, fp16.)"""
    hd, bs = kt.shape[1], kt.shape[2]
    h4 = h0 + (h1 - h0) // 4 * 4  # heads [h0, h4) four at a time (each key load serves four), then one by one
    p = a
    while p < b:
        blk, off, n = _segment(p, b, ring, bs)
        for h in range(h0, h4, 4):
            s0, s1, s2, s3 = scores[srow0 + h], scores[srow0 + h + 1], scores[srow0 + h + 2], scores[srow0 + h + 3]
            q0, q1 = qi[h * hd : (h + 1) * hd], qi[(h + 1) * hd : (h + 2) * hd]
            q2, q3 = qi[(h + 2) * hd : (h + 3) * hd], qi[(h + 3) * hd : (h + 4) * hd]
            e = p + n
            _scores_four(q0, q1, q2, q3, kt[blk], s0[p:e], s1[p:e], s2[p:e], s3[p:e], off, scale)
        for h in range(h4, h1):
            _scores_cols(qi[h * hd : (h + 1) * hd], kt[blk], scores[srow0 + h][p : p + n], off, scale)
        p += n
    inv = np.empty(h1 - h0, np.float32)  # 1/sum of each head's weights
    for h in range(h0, h1):
        inv[h - h0] = _softmax(scores[srow0 + h], a, b, softcap)
        acc = oi[h * hd : (h + 1) * hd]
        for j in range(hd):
            acc[j] = 0.0
    p = a
    while p < b:
        blk, off, n = _segment(p, b, ring, bs)
        e = p + n
        for h in range(h0, h4, 4):
            w0, w1, w2, w3 = (
                scores[srow0 + h][p:e],
                scores[srow0 + h + 1][p:e],
                scores[srow0 + h + 2][p:e],
                scores[srow0 + h + 3][p:e],
            )
            _pv_cols_four(w0, w1, w2, w3, vt[blk], oi[h * hd : (h + 4) * hd], off)
        for h in range(h4, h1):
            _pv_cols(scores[srow0 + h][p:e], vt[blk], oi[h * hd : (h + 1) * hd], off)
        p += n
    for h in range(h0, h1):
        acc = oi[h * hd : (h + 1) * hd]
        for j in range(hd):
            acc[j] *= inv[h - h0]


@njit(cache=True, fastmath=True)
def _scores_cols(qh, kt, s, c, scale):
    """s (n,) = scale * q . k over key columns [c, c + n) of kt (hd, cols): four dims at a time,
    each a pass along the n positions."""
    hd, n = kt.shape[0], s.shape[0]
    for r in range(n):
        s[r] = 0.0
    j = 0
    while j + 4 <= hd:
        q0, q1, q2, q3 = qh[j] * scale, qh[j + 1] * scale, qh[j + 2] * scale, qh[j + 3] * scale
        k0, k1, k2, k3 = kt[j][c : c + n], kt[j + 1][c : c + n], kt[j + 2][c : c + n], kt[j + 3][c : c + n]
        for r in range(n):
            s[r] += q0 * kv_get(k0[r]) + q1 * kv_get(k1[r]) + q2 * kv_get(k2[r]) + q3 * kv_get(k3[r])
        j += 4
    while j < hd:
        q0 = qh[j] * scale
        k0 = kt[j][c : c + n]
        for r in range(n):
            s[r] += q0 * kv_get(k0[r])
        j += 1


@njit(cache=True, fastmath=True)
def _pv_cols_four(w0, w1, w2, w3, vt, acc, c):
    """`_pv_cols` for four heads at once: acc (4*hd,) the four heads' outputs side by side, w0..w3
    their weights over columns [c, c + n); each value conversion serves the four."""
    hd, n = vt.shape[0], w0.shape[0]
    for j in range(0, hd - 3, 4):  # hd a multiple of 4 (a model's head dim; the rest below)
        v0, v1, v2, v3 = vt[j][c : c + n], vt[j + 1][c : c + n], vt[j + 2][c : c + n], vt[j + 3][c : c + n]
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
        c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
        for r in range(n):
            x0, x1, x2, x3 = kv_get(v0[r]), kv_get(v1[r]), kv_get(v2[r]), kv_get(v3[r])
            y0, y1, y2, y3 = w0[r], w1[r], w2[r], w3[r]
            a0 += y0 * x0
            a1 += y0 * x1
            a2 += y0 * x2
            a3 += y0 * x3
            b0 += y1 * x0
            b1 += y1 * x1
            b2 += y1 * x2
            b3 += y1 * x3
            c0 += y2 * x0
            c1 += y2 * x1
            c2 += y2 * x2
            c3 += y2 * x3
            d0 += y3 * x0
            d1 += y3 * x1
            d2 += y3 * x2
            d3 += y3 * x3
        acc[j] += a0
        acc[j + 1] += a1
        acc[j + 2] += a2
        acc[j + 3] += a3
        acc[hd + j] += b0
        acc[hd + j + 1] += b1
        acc[hd + j + 2] += b2
        acc[hd + j + 3] += b3
        acc[2 * hd + j] += c0
        acc[2 * hd + j + 1] += c1
        acc[2 * hd + j + 2] += c2
        acc[2 * hd + j + 3] += c3
        acc[3 * hd + j] += d0
        acc[3 * hd + j + 1] += d1
        acc[3 * hd + j + 2] += d2
        acc[3 * hd + j + 3] += d3
    for j in range(hd // 4 * 4, hd):
        v0 = vt[j][c : c + n]
        for k in range(4):
            w = w0 if k == 0 else (w1 if k == 1 else (w2 if k == 2 else w3))
            s0 = np.float32(0.0)
            for r in range(n):
                s0 += w[r] * kv_get(v0[r])
            acc[k * hd + j] += s0


@njit(cache=True, fastmath=True)
def _pv_cols(w, vt, acc, c):
    """acc (hd,) += sum over r of w[r] vt[:, c + r]: each output dim one dot along the positions,
    four dims per pass."""
    hd, n = vt.shape[0], w.shape[0]
    j = 0
    while j + 4 <= hd:
        v0, v1, v2, v3 = vt[j][c : c + n], vt[j + 1][c : c + n], vt[j + 2][c : c + n], vt[j + 3][c : c + n]
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for r in range(n):
            x = w[r]
            s0 += x * kv_get(v0[r])
            s1 += x * kv_get(v1[r])
            s2 += x * kv_get(v2[r])
            s3 += x * kv_get(v3[r])
        acc[j] += s0
        acc[j + 1] += s1
        acc[j + 2] += s2
        acc[j + 3] += s3
        j += 4
    while j < hd:
        v0 = vt[j][c : c + n]
        s0 = np.float32(0.0)
        for r in range(n):
            s0 += w[r] * kv_get(v0[r])
        acc[j] += s0
        j += 1


QT = 16  # queries per attention tile of the prompt path


@njit(cache=True, parallel=True, fastmath=True)
def attention_mat(q, kc, vc, pos0, n_heads, n_kv, hd, out, scores, window, scale=0.0, softcap=0.0, ring=0):
    """`attention` for many queries (the prompt): per (head, tile of QT queries) job, four
    queries at a time where no window cuts them (`_attn_four`, each summed as alone): scores
    S = Q K^T vectorized over key positions against a float32 copy of the keys (each key load
    shared by four query dims and four queries), softmax per row, then O = P V four positions at
    a time against a copy of the values by position (each value converted once for the four
    queries). Same arguments and results as `attention`; scores row i*n_heads + h is query i's."""
    t = q.shape[0]
    group = n_heads // n_kv
    scale = np.float32(scale if scale > 0 else 1.0 / np.sqrt(hd))
    softcap = np.float32(softcap)
    ntile = (t + QT - 1) // QT
    nk = pos0 + t
    lo = max(0, pos0 + 1 - window) if window > 0 else 0  # the first position any query sees
    kt = np.empty((n_kv, hd, nk - lo), np.float32)  # keys [lo, nk) as float32, by head dim
    vr = np.empty((n_kv, nk - lo, hd), vc.dtype)  # values [lo, nk) by position, as the cache holds them
    for job in prange(n_kv * hd):
        kv, j = job // hd, job % hd
        dst = kt[kv, j]
        p = lo
        while p < nk:
            blk, off, n = _segment(p, nk, ring, kc.shape[3])
            d, src, vs = dst[p - lo : p - lo + n], kc[kv, blk, j][off : off + n], vc[kv, blk, j][off : off + n]
            for r in range(n):  # from 0 (a variable start stops LLVM vectorizing it)
                d[r] = kv_get(src[r])
            for r in range(n):
                vr[kv, p - lo + r, j] = vs[r]
            p += n
    for job in prange(n_heads * ntile):
        # tiles zig-zag (0, last, 1, last-1, ...): a causal tile costs its end position, and
        # prange hands each thread one contiguous run of jobs, so plain order gave one thread
        # all the long rows
        h, z = job % n_heads, job // n_heads
        tile = z // 2 if z % 2 == 0 else ntile - 1 - z // 2
        kv = h // group
        i, end = tile * QT, min(t, (tile + 1) * QT)
        while i < end:
            if i + 4 <= end:
                if _attn_four(q, kt[kv], vr[kv], scores, out, i, h, n_heads, pos0, lo, window, scale, softcap):
                    i += 4
                    continue
            n = pos0 + i + 1
            a = max(0, n - window) if window > 0 else 0
            srow = scores[i * n_heads + h]
            _scores_cols(q[i, h * hd : (h + 1) * hd], kt[kv], srow[a:n], a - lo, scale)
            inv = _softmax(srow, a, n, softcap)
            acc = out[i, h * hd : (h + 1) * hd]
            for j in range(hd):
                acc[j] = 0.0
            _pv_rows(srow[a:n], vr[kv, a - lo : n - lo], acc)
            for j in range(hd):
                acc[j] *= inv
            i += 1


@njit(cache=True, fastmath=True)
def _attn_four(q, kt, vr, scores, out, i, h, n_heads, pos0, lo, window, scale, softcap):
    """Head h of queries i..i+3 of the prompt when all four see from position 0 (no window cuts
    them): the positions all four see, [0, N) (N: the first query's end), through the four-query
    loops, the rest of each row alone; False (nothing done) otherwise. Each query's sums come out
    as the one-query path's, in the same order (scores: one sum per position; values: fours of
    positions from 0, the four-query part first), so a prompt read in pieces, whose tiles group
    its queries differently, gives the logits of the whole prompt bit for bit. kt (hd, positions
    from lo) float32 keys, vr (positions from lo, hd) values."""
    hd = kt.shape[0]
    n0, n3 = pos0 + i + 1, pos0 + i + 4
    if (window > 0 and n3 > window) or n0 < 4:
        return False
    c0, c1 = h * hd, (h + 1) * hd
    q0, q1, q2, q3 = q[i, c0:c1], q[i + 1, c0:c1], q[i + 2, c0:c1], q[i + 3, c0:c1]
    r = i * n_heads + h
    s0, s1, s2, s3 = scores[r], scores[r + n_heads], scores[r + 2 * n_heads], scores[r + 3 * n_heads]
    o0, o1, o2, o3 = out[i, c0:c1], out[i + 1, c0:c1], out[i + 2, c0:c1], out[i + 3, c0:c1]
    _scores_four(q0, q1, q2, q3, kt, s0[:n0], s1[:n0], s2[:n0], s3[:n0], -lo, scale)
    i0 = _open(q0, kt, s0, o0, n0, n0, lo, scale, softcap)
    i1 = _open(q1, kt, s1, o1, n0 + 1, n0, lo, scale, softcap)
    i2 = _open(q2, kt, s2, o2, n0 + 2, n0, lo, scale, softcap)
    i3 = _open(q3, kt, s3, o3, n0 + 3, n0, lo, scale, softcap)
    mid = n0 // 4 * 4  # values [0, mid) four queries at a time, then each row's rest alone
    _pv_four(s0[:mid], s1[:mid], s2[:mid], s3[:mid], vr[: mid - lo], o0, o1, o2, o3)
    _close(s0, vr, o0, mid, n0, lo, i0)
    _close(s1, vr, o1, mid, n0 + 1, lo, i1)
    _close(s2, vr, o2, mid, n0 + 2, lo, i2)
    _close(s3, vr, o3, mid, n0 + 3, lo, i3)
    return True


@njit(cache=True, fastmath=True)
def _open(qk, kt, srow, acc, n, nn, lo, scale, softcap):
    """One of `_attn_four`'s queries, which sees [0, n): its scores past the shared [0, nn), its
    softmax, acc zeroed; returns 1/sum of its weights."""
    _scores_cols(qk, kt, srow[nn:n], nn - lo, scale)
    inv = _softmax(srow, 0, n, softcap)
    for j in range(acc.shape[0]):
        acc[j] = 0.0
    return inv


@njit(cache=True, fastmath=True)
def _close(srow, vr, acc, mid, n, lo, inv):
    """acc += the values of [mid, n) (fours then ones, as `_pv_rows` continues), then * inv."""
    _pv_rows(srow[mid:n], vr[mid - lo : n - lo], acc)
    for j in range(acc.shape[0]):
        acc[j] *= inv


@njit(cache=True, fastmath=True)
def _scores_four(q0, q1, q2, q3, kt, s0, s1, s2, s3, c, scale):
    """`_scores_cols` for four queries (the prompt's) or four heads (a decode step's) over the same
    key columns [c, c + n): each key load serves the four."""
    hd, n = kt.shape[0], s0.shape[0]
    for r in range(n):
        s0[r] = 0.0
        s1[r] = 0.0
        s2[r] = 0.0
        s3[r] = 0.0
    j = 0
    while j + 4 <= hd:
        a0, a1, a2, a3 = q0[j] * scale, q0[j + 1] * scale, q0[j + 2] * scale, q0[j + 3] * scale
        b0, b1, b2, b3 = q1[j] * scale, q1[j + 1] * scale, q1[j + 2] * scale, q1[j + 3] * scale
        c0, c1, c2, c3 = q2[j] * scale, q2[j + 1] * scale, q2[j + 2] * scale, q2[j + 3] * scale
        d0, d1, d2, d3 = q3[j] * scale, q3[j + 1] * scale, q3[j + 2] * scale, q3[j + 3] * scale
        k0, k1, k2, k3 = kt[j][c : c + n], kt[j + 1][c : c + n], kt[j + 2][c : c + n], kt[j + 3][c : c + n]
        for r in range(n):
            x0, x1, x2, x3 = kv_get(k0[r]), kv_get(k1[r]), kv_get(k2[r]), kv_get(k3[r])
            s0[r] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
            s1[r] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
            s2[r] += c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3
            s3[r] += d0 * x0 + d1 * x1 + d2 * x2 + d3 * x3
        j += 4
    while j < hd:
        k0 = kt[j][c : c + n]
        a0, b0, c0, d0 = q0[j] * scale, q1[j] * scale, q2[j] * scale, q3[j] * scale
        for r in range(n):
            x0 = kv_get(k0[r])
            s0[r] += a0 * x0
            s1[r] += b0 * x0
            s2[r] += c0 * x0
            s3[r] += d0 * x0
        j += 1


@njit(cache=True, fastmath=True)
def _pv_four(w0, w1, w2, w3, vr, o0, o1, o2, o3):
    """o_k (hd,) += sum over r of w_k[r] vr[r] for four queries k, four positions at a time (n a
    multiple of 4): each value converted once for the four."""
    hd, n = o0.shape[0], w0.shape[0]
    for p in range(0, n - 3, 4):
        v0, v1, v2, v3 = vr[p], vr[p + 1], vr[p + 2], vr[p + 3]
        a0, a1, a2, a3 = w0[p], w0[p + 1], w0[p + 2], w0[p + 3]
        b0, b1, b2, b3 = w1[p], w1[p + 1], w1[p + 2], w1[p + 3]
        c0, c1, c2, c3 = w2[p], w2[p + 1], w2[p + 2], w2[p + 3]
        d0, d1, d2, d3 = w3[p], w3[p + 1], w3[p + 2], w3[p + 3]
        for j in range(hd):
            x0, x1, x2, x3 = kv_get(v0[j]), kv_get(v1[j]), kv_get(v2[j]), kv_get(v3[j])
            o0[j] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
            o1[j] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
            o2[j] += c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3
            o3[j] += d0 * x0 + d1 * x1 + d2 * x2 + d3 * x3


@njit(cache=True, fastmath=True)
def _pv_rows(w, vr, acc):
    """acc (hd,) += sum over r of w[r] vr[r]: vr (n, hd) values by position, four at a time."""
    hd, n = acc.shape[0], w.shape[0]
    p = 0
    while p + 4 <= n:
        w0, w1, w2, w3 = w[p], w[p + 1], w[p + 2], w[p + 3]
        v0, v1, v2, v3 = vr[p], vr[p + 1], vr[p + 2], vr[p + 3]
        for j in range(hd):
            acc[j] += w0 * kv_get(v0[j]) + w1 * kv_get(v1[j]) + w2 * kv_get(v2[j]) + w3 * kv_get(v3[j])
        p += 4
    while p < n:
        w0, v0 = w[p], vr[p]
        for j in range(hd):
            acc[j] += w0 * kv_get(v0[j])
        p += 1


@njit(cache=True, fastmath=True)
def _softmax(srow, a, b, softcap):
    """srow[a:b] (scores; soft-capped first when softcap > 0) -> exp(s - max) in place; returns
    1 / their sum, which the caller applies to the hd outputs once (not to every weight: a
    pass over the row less)."""
    s = srow[a:b]  # loops from 0 (a variable start stops LLVM vectorizing them)
    nk = b - a
    if softcap > 0:
        for p in range(nk):
            s[p] = softcap * np.tanh(s[p] / softcap)
    m = np.float32(-np.inf)
    for p in range(nk):
        m = max(m, s[p])
    tot = np.float32(0.0)
    for p in range(nk):
        e = fast_exp(s[p] - m)
        s[p] = e
        tot += e
    return np.float32(1.0) / tot


def ref_attention(q, k, v, pos0, window=0, scale=0.0, softcap=0.0):
    """q (t, nh, hd); k, v (n_kv, pos0+t, hd) -> (t, nh, hd), causal (sliding `window`), float64.
    (Positions by row here; the kernels' caches are blocked: `kv_layout` turns one into the
    other.)"""
    t, nh, hd = q.shape
    group = nh // k.shape[0]
    out = np.zeros((t, nh, hd))
    for i in range(t):
        for h in range(nh):
            lo = max(0, pos0 + i + 1 - window) if window else 0
            s = k[h // group, lo : pos0 + i + 1].astype(np.float64) @ q[i, h] * (scale or 1 / np.sqrt(hd))
            if softcap:
                s = softcap * np.tanh(s / softcap)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[h // group, lo : pos0 + i + 1]
    return out


def kv_layout(x, bs):
    """(..., positions, hd) keys or values -> the cache layout (..., nblk, hd, bs): blocks of bs
    positions, each transposed (positions past the end of the last block: zeros)."""
    *lead, n, hd = x.shape
    nblk = -(-n // bs)
    pad = np.zeros((*lead, nblk * bs, hd), x.dtype)
    pad[..., :n, :] = x
    return np.ascontiguousarray(np.swapaxes(pad.reshape(*lead, nblk, bs, hd), -1, -2))


def kv_positions(c):
    """The cache layout (..., nblk, hd, bs) -> (..., nblk*bs, hd), positions by row (kv_layout's
    inverse, padding kept)."""
    *lead, nblk, hd, bs = c.shape
    return np.swapaxes(c, -1, -2).reshape(*lead, nblk * bs, hd)


# ----------------------------------------------------------------------------- activations
@njit(cache=True, fastmath=True, inline="always")
def _swiglu_row(g, inter, o):
    for j in range(inter):
        o[j] = g[j] / (np.float32(1.0) + fast_exp(-g[j])) * g[inter + j]


# error_model="numpy" (here, where _swiglu_row is inlined): numba's default ("python") guards
# every float division with a ZeroDivisionError branch, which kept the row loop scalar (3.2 us for
# SmolLM2's 1536-wide row on AVX-512; 0.43 us vectorized).
#
@njit(cache=True, parallel=True, fastmath=True, error_model="numpy")
def swiglu(gu, inter, out):
    """gate/up rows fused (t, 2*inter): out = silu(gate) * up. Token rows split across threads
    when there are several (the prompt); one row (decode) runs without a parallel region, whose
    start would cost more than the row. (One thread throughout saved 0.9 s of a first start's
    compile but cost 5% of pp512 on SmolLM2, Zen 5, 2026-12-07.)"""
    t = gu.shape[0]
    if t == 1:
        _swiglu_row(gu[0], inter, out[0])
        return
    for i in prange(t):
        _swiglu_row(gu[i], inter, out[i])


@njit(cache=True, fastmath=True)
def gelu_new(x, out):
    """GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[i, j]
            out[i, j] = np.float32(0.5) * v * (np.float32(1.0) + np.tanh(c * (v + np.float32(0.044715) * v * v * v)))


def ref_swiglu(gu, inter):
    g = gu[:, :inter].astype(np.float64)
    return g / (1 + np.exp(-g)) * gu[:, inter:]


def ref_gelu_new(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


# ----------------------------------------------------------------------------- embeddings
@njit(cache=True, fastmath=True)
def embed_rows(d, ids, out):
    """out (t, k) = rows `ids` of the table described by `d` (float or packed, dequantized)."""
    k, kind = d.k, d.kind
    for i in range(ids.shape[0]):
        r = ids[i]
        if kind == KIND_F32:
            w = carray(as_voidptr(d.w_addr + r * d.row_bytes), (k,), np.float32)
            for j in range(k):
                out[i, j] = w[j]
        elif kind == KIND_F16:
            wh = carray(as_voidptr(d.w_addr + r * d.row_bytes), (k,), np.uint16)
            for j in range(k):
                out[i, j] = half_to_float(wh[j])
        else:
            gs, nb, rb = d.block, d.nb, d.row_bytes
            wq = carray(as_voidptr(d.w_addr + r * rb), (rb,), np.uint8)
            sc = carray(as_voidptr(d.s_addr + r * nb * 2), (nb,), np.uint16)
            zs = carray(
                as_voidptr(d.z_addr + r * nb * 4 if d.z_addr != 0 else d.s_addr), (nb,), np.float32
            )  # read only if asym
            for j in range(k):
                if kind == KIND_Q4:
                    byte = wq[j >> 1]
                    code = (byte >> 4) if j & 1 else (byte & 15)
                else:
                    code = wq[j]
                s = half_to_float(sc[j // gs])
                if d.sym:
                    out[i, j] = (np.float32(code) - np.float32(d.zero)) * s
                else:
                    out[i, j] = np.float32(code) * s - zs[j // gs]


# numba's cache of this module's kernels keys on all their sources, not only this file (jitcache.py)
stamp(globals())

"""Element-wise and attention kernels, each beside its numpy reference (`ref_*`).

Shapes: x (t, h) for t tokens; KV cache (n_kv, ctx, hd) per layer; q (t, n_heads*hd).
"""

from __future__ import annotations

import math

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import overload

from ..format.records import KIND_F16, KIND_F32, KIND_Q4
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
@njit(cache=True, inline="always")
def _next_slot(slot, ring):
    """The cache row after `slot`: +1, wrapping to 0 in a ring buffer of `ring` rows (0: no ring)."""
    n = slot + 1
    return 0 if n == ring else n


@njit(cache=True, parallel=True, fastmath=True)
def attention(q, kc, vc, pos0, n_heads, n_kv, hd, out, scores, window, scale=0.0, softcap=0.0, ring=0):
    """Causal GQA attention of t new queries over the cache. q (t, n_heads*hd); kc, vc
    (n_kv, ctx, hd), float32 or fp16 bits (kv_get), already hold positions [0, pos0 + t); out
    (t, n_heads*hd); scores (threads-
    independent scratch (t*n_heads, ctx)); window > 0: see only the last `window` positions;
    scale: of q.k (0: 1/sqrt(hd)); softcap > 0: scores -> softcap * tanh(scores / softcap);
    ring > 0: kc, vc are ring buffers of `ring` rows (a sliding-window layer's), position p in row
    p % ring, holding at least the window + t - 1 positions the queries see."""
    t = q.shape[0]
    group = n_heads // n_kv
    scale = np.float32(scale if scale > 0 else 1.0 / np.sqrt(hd))
    softcap = np.float32(softcap)
    for job in prange(t * n_heads):
        i, h = job // n_heads, job % n_heads
        n = pos0 + i + 1  # this query sees keys [p0, n)
        p0 = max(0, n - window) if window > 0 else 0
        qh = q[i, h * hd : (h + 1) * hd]
        _attn_query_rows(
            qh, kc[h // group], vc[h // group], scores[job], out[i, h * hd : (h + 1) * hd], p0, n, scale, softcap, ring
        )


@njit(cache=True, fastmath=True)
def _attn_query_rows(qh, kc, vc, srow, acc, a, b, scale, softcap, ring):
    """One query of one head over keys [a, b) of kc (ctx or ring, hd): each score a vectorized dot."""
    hd = qh.shape[0]
    slot = a % ring if ring > 0 else a
    for p in range(a, b):
        kp = kc[slot]
        s = np.float32(0.0)
        for j in range(hd):
            s += qh[j] * kv_get(kp[j])
        srow[p] = s * scale
        slot = _next_slot(slot, ring)
    _softmax_pv(srow, vc, acc, a, b, softcap, ring)


QT = 16  # queries per attention tile of the prompt path


@njit(cache=True, parallel=True, fastmath=True)
def attention_mat(q, kc, vc, pos0, n_heads, n_kv, hd, out, scores, window, scale=0.0, softcap=0.0, ring=0):
    """`attention` for many queries (the prompt): per (head, tile of QT queries) job, scores
    S = Q K^T vectorized over key positions against a transposed copy of the keys (each key
    load shared by four query dims), softmax per row, then O = P V four positions at a time.
    Same arguments and results as `attention`; scores row i*n_heads + h is query i's."""
    t = q.shape[0]
    group = n_heads // n_kv
    scale = np.float32(scale if scale > 0 else 1.0 / np.sqrt(hd))
    softcap = np.float32(softcap)
    ntile = (t + QT - 1) // QT
    nk = pos0 + t
    lo = max(0, pos0 + 1 - window) if window > 0 else 0  # the first position any query sees
    kt = np.empty((n_kv, hd, nk - lo), np.float32)  # keys [lo, nk) transposed: S rows vectorize over positions
    for job in prange(n_kv * hd):
        kv, j = job // hd, job % hd
        if ring > 0:  # a ring buffer: rows wrap
            slot = lo % ring
            for p in range(nk - lo):
                kt[kv, j, p] = kv_get(kc[kv, slot, j])
                slot = _next_slot(slot, ring)
        else:  # plain positions: with the wrapping walk here and in _softmax_pv, prompt attention was 5x slower
            for p in range(nk - lo):
                kt[kv, j, p] = kv_get(kc[kv, lo + p, j])
    for job in prange(n_heads * ntile):
        # tiles zig-zag (0, last, 1, last-1, ...): a causal tile costs its end position, and
        # prange hands each thread one contiguous run of jobs, so plain order gave one thread
        # all the long rows
        h, z = job % n_heads, job // n_heads
        tile = z // 2 if z % 2 == 0 else ntile - 1 - z // 2
        kv = h // group
        acc = np.empty(hd, np.float32)
        for i in range(tile * QT, min(t, (tile + 1) * QT)):
            n = pos0 + i + 1
            _attn_query(
                q[i, h * hd : (h + 1) * hd],
                kt[kv],
                vc[kv],
                scores[i * n_heads + h],
                acc,
                max(0, n - window) if window > 0 else 0,
                n,
                scale,
                softcap,
                lo,
                ring,
            )
            for j in range(hd):  # a loop, not a slice assignment (copy_rows says why)
                out[i, h * hd + j] = acc[j]


@njit(cache=True, fastmath=True)
def _attn_query(qh, kt, vc, srow, acc, a, b, scale, softcap, lo, ring):
    """One query of one head over keys [a, b): kt (hd, positions from lo) transposed keys, vc
    (ctx or ring, hd)."""
    hd = qh.shape[0]
    s = srow[a:b]  # loops from 0 (a variable start stops LLVM vectorizing them)
    nk = b - a
    ka, kb = a - lo, b - lo
    for p in range(nk):
        s[p] = 0.0
    j = 0
    while j + 4 <= hd:
        q0, q1, q2, q3 = qh[j] * scale, qh[j + 1] * scale, qh[j + 2] * scale, qh[j + 3] * scale
        k0, k1, k2, k3 = kt[j][ka:kb], kt[j + 1][ka:kb], kt[j + 2][ka:kb], kt[j + 3][ka:kb]
        for p in range(nk):
            s[p] += q0 * k0[p] + q1 * k1[p] + q2 * k2[p] + q3 * k3[p]
        j += 4
    while j < hd:
        q0 = qh[j] * scale
        k0 = kt[j][ka:kb]
        for p in range(nk):
            s[p] += q0 * k0[p]
        j += 1
    _softmax_pv(srow, vc, acc, a, b, softcap, ring)


@njit(cache=True, fastmath=True)
def _softmax_pv(srow, vc, acc, a, b, softcap, ring):
    """srow[a:b] (scores; soft-capped first when softcap > 0) -> softmax in place; acc (hd,) =
    sum_p srow[p] vc[row of p] (row p % ring in a ring buffer, else p)."""
    hd = acc.shape[0]
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
    inv = np.float32(1.0) / tot
    for jj in range(hd):
        acc[jj] = 0.0
    p = a
    if ring == 0:  # rows are positions (the loop LLVM vectorizes best, see attention_mat)
        while p + 4 <= b:
            w0, w1, w2, w3 = srow[p] * inv, srow[p + 1] * inv, srow[p + 2] * inv, srow[p + 3] * inv
            v0, v1, v2, v3 = vc[p], vc[p + 1], vc[p + 2], vc[p + 3]
            for jj in range(hd):
                acc[jj] += w0 * kv_get(v0[jj]) + w1 * kv_get(v1[jj]) + w2 * kv_get(v2[jj]) + w3 * kv_get(v3[jj])
            p += 4
    r0 = a % ring if ring > 0 else p
    while p + 4 <= b:
        w0, w1, w2, w3 = srow[p] * inv, srow[p + 1] * inv, srow[p + 2] * inv, srow[p + 3] * inv
        r1 = _next_slot(r0, ring)
        r2 = _next_slot(r1, ring)
        r3 = _next_slot(r2, ring)
        v0, v1, v2, v3 = vc[r0], vc[r1], vc[r2], vc[r3]
        for jj in range(hd):
            acc[jj] += w0 * kv_get(v0[jj]) + w1 * kv_get(v1[jj]) + w2 * kv_get(v2[jj]) + w3 * kv_get(v3[jj])
        r0 = _next_slot(r3, ring)
        p += 4
    while p < b:
        w0 = srow[p] * inv
        v0 = vc[r0]
        for jj in range(hd):
            acc[jj] += w0 * kv_get(v0[jj])
        r0 = _next_slot(r0, ring)
        p += 1


def ref_attention(q, k, v, pos0, window=0, scale=0.0, softcap=0.0):
    """q (t, nh, hd); k, v (n_kv, pos0+t, hd) -> (t, nh, hd), causal (sliding `window`), float64."""
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

"""Norms, RoPE + KV cache writes, attention and activations on the GPU (numpy references beside).

Shapes: token rows x (t, h) fp32 (the residual stream stays fp32); qkv (t, (nh + 2 nkv) hd) fp32
(GEMV outputs); KV cache (L, nkv, ctx, hd) fp16, preallocated; attention output and every other
GEMV input fp16. The CPU runtime's references (runtime/kernels/layers.py ref_*) are the float
references; `ref_*` here add the fp16 rounding points of this path.

Block reductions go through shared memory (`red`, MAX_THREADS + 1 floats) with barriers only:
numba's CUDA simulator has no warp shuffles, and one code path must run on both.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from ..kernels.layers import ref_attention, ref_layer_norm, ref_rms_norm, ref_rope  # noqa: F401  (references re-used)
from .linear import MAX_THREADS, f16, gelu, pure

RED = 2 * MAX_THREADS + 1  # shared floats: reductions (MAX_THREADS + 1) or attention's P.V partials (<= 2 * MAX_THREADS)
NEG = np.float32(-3.0e38)
SUM, MAX = 0, 1


@pure
def combine(a, b, op):
    """a + b (op SUM) or the larger of the two (op MAX); no min/max builtins in device code
    (they do not compile for a CUDA target chosen by `compile_ptx` without a GPU)."""
    if op == SUM:
        return a + b
    return a if a >= b else b


@cuda.jit(device=True)
def block_reduce(v, red, op):
    """Sum (op 0) or max (op 1) of `v` over the block, returned to every thread (4 barriers)."""
    tid, bd = cuda.threadIdx.x, cuda.blockDim.x
    red[tid] = v
    cuda.syncthreads()
    if tid < 32:
        a = red[tid]
        for u in range(tid + 32, bd, 32):
            a = combine(a, red[u], op)
        red[tid] = a
    cuda.syncthreads()
    if tid == 0:
        a = red[0]
        for u in range(1, 32 if bd > 32 else bd):
            a = combine(a, red[u], op)
        red[MAX_THREADS] = a
    cuda.syncthreads()
    out = red[MAX_THREADS]
    cuda.syncthreads()
    return out


# ----------------------------------------------------------------------------- norms
@cuda.jit(device=True)
def row_stats(x, i, h, layer, eps, red):
    """(mean, 1/sqrt(var + eps)) of row i of x (t, h) for LayerNorm (layer = 1), or
    (0, 1/sqrt(mean(x^2) + eps)) for RMSNorm; block-wide, every thread gets them."""
    tid, bd = cuda.threadIdx.x, cuda.blockDim.x
    mu = np.float32(0.0)
    if layer == 1:
        s = np.float32(0.0)
        for c in range(tid, h, bd):
            s += x[i, c]
        mu = block_reduce(s, red, SUM) / np.float32(h)
    ss = np.float32(0.0)
    for c in range(tid, h, bd):
        dv = x[i, c] - mu
        ss += dv * dv
    var = block_reduce(ss, red, SUM) / np.float32(h)
    return mu, np.float32(1.0) / math.sqrt(var + eps)


@cuda.jit
def norm_rows_kernel(x, t, h, layer, eps, pf, nw, nb, out):
    """out (t, h) fp16 = norm(x (t, h)) * w (+ b); one block per row (grid-stride)."""
    red = cuda.shared.array(RED, float32)
    for i in range(cuda.blockIdx.x, t, cuda.gridDim.x):
        mu, inv = row_stats(x, i, h, layer, eps, red)
        for c in range(cuda.threadIdx.x, h, cuda.blockDim.x):
            v = (x[i, c] - mu) * inv * pf[nw + c]
            if nb >= 0:
                v += pf[nb + c]
            out[i, c] = v


# ----------------------------------------------------------------------------- rope + KV cache
@cuda.jit(device=True)
def rope_kv(qkv, t, pos0, l, nh, nkv, hd, rope, cos, sin, kc, vc):
    """Rotate q and k heads of qkv (t, (nh + 2 nkv) hd) by their positions pos0.. (HF
    rotate_half pairs (j, j + hd/2); rope = 0: learned positions, no rotation), write k and v
    into the fp16 cache at layer l, positions pos0..pos0+t; q stays in qkv (fp32). Grid-stride
    over pairs, one thread per pair (in place, no race)."""
    half = hd // 2
    nq = (nh + nkv) * half
    npair, nv = t * nq, t * nkv * hd
    start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for e in range(start, npair + nv, cuda.gridDim.x * cuda.blockDim.x):
        if e < npair:
            i, rem = e // nq, e % nq
            hh, j = rem // half, rem % half
            col = hh * hd + j
            a, b = qkv[i, col], qkv[i, col + half]
            if rope == 1:
                c, s = cos[pos0 + i, j], sin[pos0 + i, j]
                a, b = a * c - b * s, b * c + a * s
            if hh < nh:
                qkv[i, col] = a
                qkv[i, col + half] = b
            else:
                kc[l, hh - nh, pos0 + i, j] = a
                kc[l, hh - nh, pos0 + i, j + half] = b
        else:
            e2 = e - npair
            i, rem = e2 // (nkv * hd), e2 % (nkv * hd)
            vc[l, rem // hd, pos0 + i, rem % hd] = qkv[i, (nh + nkv) * hd + rem]


@cuda.jit
def rope_kv_kernel(qkv, t, pos0, l, nh, nkv, hd, rope, cos, sin, kc, vc):
    rope_kv(qkv, t, pos0, l, nh, nkv, hd, rope, cos, sin, kc, vc)


# ----------------------------------------------------------------------------- attention
@cuda.jit(device=True)
def attend(item, qkv, kc, vc, l, pos0, nh, nkv, hd, window, scores, out, red):
    """Query row i = item // nh, head h = item % nh over cached keys [p0, pos0 + i] (causal,
    GQA, sliding `window` > 0), by the whole block: scores one position per thread (fp32 dot of
    the fp32 query with fp16 keys), block max, exp and sum, then P.V with the block split into
    hd columns x (blockDim / hd) position strides, partials met in `red`. out[i, h] fp16."""
    tid, bd = cuda.threadIdx.x, cuda.blockDim.x
    i, h = item // nh, item % nh
    kvh = h // (nh // nkv)
    n = pos0 + i + 1
    p0 = n - window if window > 0 and n > window else 0
    qo = h * hd
    scale = np.float32(1.0) / math.sqrt(np.float32(hd))
    m = NEG
    for p in range(p0 + tid, n, bd):
        s = np.float32(0.0)
        for j in range(hd):
            s += qkv[i, qo + j] * np.float32(kc[l, kvh, p, j])
        s *= scale
        scores[item, p] = s
        m = m if m >= s else s
    m = block_reduce(m, red, MAX)
    tot = np.float32(0.0)
    for p in range(p0 + tid, n, bd):
        e = math.exp(scores[item, p] - m)
        scores[item, p] = e
        tot += e
    tot = block_reduce(tot, red, SUM)  # its barriers also publish every thread's scores
    nparts = bd // hd if bd >= hd else 1
    for e in range(tid, hd * nparts, bd):
        j, part = e % hd, e // hd
        a = np.float32(0.0)
        for p in range(p0 + part, n, nparts):
            a += scores[item, p] * np.float32(vc[l, kvh, p, j])
        red[e] = a
    cuda.syncthreads()
    for j in range(tid, hd, bd):
        o = np.float32(0.0)
        for part in range(nparts):
            o += red[part * hd + j]
        out[i, qo + j] = o / tot
    cuda.syncthreads()


@cuda.jit
def attention_kernel(qkv, kc, vc, l, pos0, t, nh, nkv, hd, window, scores, out):
    """Every (query row, head) of t new tokens, one block each (grid-stride)."""
    red = cuda.shared.array(RED, float32)
    for item in range(cuda.blockIdx.x, t * nh, cuda.gridDim.x):
        attend(item, qkv, kc, vc, l, pos0, nh, nkv, hd, window, scores, out, red)


# ----------------------------------------------------------------------------- activations (prompt path)
@cuda.jit
def act_kernel(up, t, inter, gated, out):
    """out (t, inter) fp16 = silu(gate) * up from the fused gate|up rows (gated), or gelu(up)."""
    start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for e in range(start, t * inter, cuda.gridDim.x * cuda.blockDim.x):
        i, c = e // inter, e % inter
        g = up[i, c]
        if gated == 1:
            out[i, c] = g / (np.float32(1.0) + math.exp(-g)) * up[i, inter + c]
        else:
            out[i, c] = gelu(g)


# ----------------------------------------------------------------------------- numpy references (fp16 points)
def ref_norm_f16(x, w, b, eps, layer: bool):
    """norm_rows_kernel: the CPU references, rounded to fp16."""
    return f16(ref_layer_norm(x, w, b, eps) if layer else ref_rms_norm(x, w, eps))


def ref_rope_kv(qkv, pos0, nh, nkv, hd, cos, sin, rope: bool = True):
    """(q rotated (t, nh, hd) fp32, k rotated fp16 (nkv, t, hd), v fp16 (nkv, t, hd))."""
    t = qkv.shape[0]
    q = qkv[:, : nh * hd].reshape(t, nh, hd)
    k = qkv[:, nh * hd:(nh + nkv) * hd].reshape(t, nkv, hd)
    v = qkv[:, (nh + nkv) * hd:].reshape(t, nkv, hd)
    if rope:
        pos = np.arange(pos0, pos0 + t)
        q, k = ref_rope(q, pos, cos, sin), ref_rope(k, pos, cos, sin)
    return q, f16(k.transpose(1, 0, 2)), f16(v.transpose(1, 0, 2))


def ref_swiglu_f16(up, inter):
    g = up[:, :inter].astype(np.float64)
    return f16(g / (1 + np.exp(-g)) * up[:, inter:])

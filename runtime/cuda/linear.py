"""Linear layers on the GPU, straight from the export's packed weights, each beside its numpy reference.

Device layout (model.py uploads it once): every linear's weights are stored *transposed*, word j
of row r at `base + j*n + r`, so the 32 threads of a warp, which own 32 consecutive output rows,
read 32 consecutive words (one 128-byte transaction) per step:

    wq  uint32   packed codes: a word holds 8 4-bit codes (columns 8j..8j+7, low nibble first,
                 exactly the export's MatMulNBits bytes) or 4 8-bit codes
    fw  float16  float weights (fp32 exports are computed in fp16 too): column c of row r at c*n + r
    sc  float16  scales, block g of row r at g*n + r (exact: the exporter stored fp16 values)
    zs  float32  zero*scale of asymmetric formats, same layout (symmetric: zero is a constant)
    pf  float32  biases, norm weights, learned positions

A linear is one int64 descriptor row (`desc`), the way the CPU runtime's kernels find weights:

    kind 0 float | 4 | 8     n, k         out and in features
    w, s, z, b               offsets into wq/fw, sc, zs, pf (-1: none)
    gs, nb, words, zero      group size, blocks and uint32 words per row, symmetric zero point

Numerics: inputs are fp16 (a buffer, or computed on the fly and rounded to fp16 as a buffer
would hold them), weights are code*scale, every product is accumulated in fp32.

Napkin math, decode (one token, SmolLM2-135M 4-bit): 30 layers x (960 + 576 + 3072 + 576 rows)
x 576..1536 columns / 2 bytes ~ 55 MB of codes + 3.5 MB of scales per token, ~12 us at the H200's
4.8 TB/s: the step is bound by latency and synchronisation, not bandwidth (see step.py).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32
from numba.core import config


def pure(fn):
    """A device function that uses no CUDA intrinsics (arithmetic on its arguments only). Under
    numba's CUDA simulator it stays a plain Python function: the simulator swaps module globals
    around every device-function call (~10 us), which made per-element helpers the bulk of a
    simulated decode step. On a GPU it is an ordinary `cuda.jit(device=True)` function."""
    return fn if config.ENABLE_CUDASIM else cuda.jit(device=True)(fn)

K_FLOAT, K_Q4, K_Q8 = 0, 4, 8
D_KIND, D_N, D_K, D_W, D_S, D_Z, D_B, D_GS, D_NB, D_WORDS, D_ZERO = range(11)
DESC_LEN = 11

ROWS = 32  # output rows per tile: one per lane of a warp
MAX_THREADS = 256  # threads per block the shared buffers are sized for (a multiple of ROWS)
IN_H16, IN_NORM, IN_SWIGLU, IN_GELU = range(4)  # where a GEMV's input comes from
OUT_SET, OUT_ADD = 0, 1  # out = y, or out += y (the residual add, fused)
GELU_C = np.float32(math.sqrt(2.0 / math.pi))


# ----------------------------------------------------------------------------- element access
@pure
def gelu(v):
    """GPT-2's tanh approximation (the CPU runtime's gelu_new)."""
    return np.float32(0.5) * v * (np.float32(1.0) + math.tanh(GELU_C * (v + np.float32(0.044715) * v * v * v)))


@pure
def in_val(src, i, c, mode, half, pf, nw, nbias, mu, inv):
    """Input column c of token row i as the GEMV sees it, fp16-rounded:
    IN_H16 src (t, k) fp16 | IN_NORM (src - mu) * inv * w (+ b), src the fp32 residual |
    IN_SWIGLU silu(src[c]) * src[half + c] | IN_GELU gelu(src[c])."""
    if mode == IN_H16:
        return np.float32(src[i, c])
    if mode == IN_NORM:
        v = (np.float32(src[i, c]) - mu) * inv * pf[nw + c]
        if nbias >= 0:
            v += pf[nbias + c]
    elif mode == IN_SWIGLU:
        g = np.float32(src[i, c])
        v = g / (np.float32(1.0) + math.exp(-g)) * np.float32(src[i, half + c])
    else:
        v = gelu(np.float32(src[i, c]))
    return np.float32(np.float16(v))


@pure
def weight(d, wq, fw, sc, zs, r, c):
    """Dequantized weight (row r, column c) of the linear `d` (a descriptor row): fp32."""
    n, kind = d[D_N], d[D_KIND]
    if kind == K_FLOAT:
        return np.float32(fw[d[D_W] + c * n + r])
    cpw = 32 // kind
    word = wq[d[D_W] + (c // cpw) * n + r]
    code = np.float32((word >> (kind * (c % cpw))) & ((1 << kind) - 1))
    g = c // d[D_GS]
    scale = np.float32(sc[d[D_S] + g * n + r])
    if d[D_Z] >= 0:
        return code * scale - zs[d[D_Z] + g * n + r]
    return (code - np.float32(d[D_ZERO])) * scale


# ----------------------------------------------------------------------------- decode: fused dequantize + GEMV
@cuda.jit(device=True)
def gemv_tile(d, wq, fw, sc, zs, pf, src, i, mode, half, nw, nbias, mu, inv, out, oi, omode, part, tile):
    """Rows [tile*32, tile*32 + 32) of y = in(src row i) W^T + b into out[oi] (= or +=).

    Thread t owns row tile*32 + t % 32 and every (blockDim/32)-th word of it: each warp reads
    one word of 32 consecutive rows at a time (coalesced), unpacks its 8 (or 4) codes, and
    accumulates sum(code*x) and sum(x) per block (the zero point is applied once per word). The
    block's partial sums meet in shared memory `part` (one barrier), lane by lane."""
    tid = cuda.threadIdx.x
    lane, s, nsplit = tid % ROWS, tid // ROWS, cuda.blockDim.x // ROWS
    n, k, kind = d[D_N], d[D_K], d[D_KIND]
    r = tile * ROWS + lane
    acc = np.float32(0.0)
    if r < n:
        if kind == K_FLOAT:
            w0 = d[D_W]
            for c in range(s, k, nsplit):
                acc += np.float32(fw[w0 + c * n + r]) * in_val(src, i, c, mode, half, pf, nw, nbias, mu, inv)
        else:
            w0, s0, z0, gs, words = d[D_W], d[D_S], d[D_Z], d[D_GS], d[D_WORDS]
            zero = np.float32(d[D_ZERO])
            cpw = 32 // kind
            mask = (1 << kind) - 1
            for j in range(s, words, nsplit):
                wv = wq[w0 + j * n + r]
                c0 = j * cpw
                dot = np.float32(0.0)
                xs = np.float32(0.0)
                for u in range(cpw):
                    c = c0 + u
                    if c < k:
                        xv = in_val(src, i, c, mode, half, pf, nw, nbias, mu, inv)
                        dot += np.float32((wv >> (kind * u)) & mask) * xv
                        xs += xv
                g = c0 // gs
                scale = np.float32(sc[s0 + g * n + r])
                zsv = zs[z0 + g * n + r] if z0 >= 0 else zero * scale
                acc += dot * scale - zsv * xs
    part[tid] = acc
    cuda.syncthreads()
    if s == 0 and r < n:
        tot = part[lane]
        for u in range(1, nsplit):
            tot += part[u * ROWS + lane]
        if d[D_B] >= 0:
            tot += pf[d[D_B] + r]
        if omode == OUT_ADD:
            out[oi, r] += tot
        else:
            out[oi, r] = tot
    cuda.syncthreads()


@cuda.jit(device=True)
def gemv(d, wq, fw, sc, zs, pf, src, i, mode, half, nw, nbias, mu, inv, out, oi, omode, part):
    """All row tiles of one GEMV, spread over the grid (grid-stride: any grid size works)."""
    ntile = (d[D_N] + ROWS - 1) // ROWS
    for tile in range(cuda.blockIdx.x, ntile, cuda.gridDim.x):
        gemv_tile(d, wq, fw, sc, zs, pf, src, i, mode, half, nw, nbias, mu, inv, out, oi, omode, part, tile)


@cuda.jit
def gemv_kernel(d, wq, fw, sc, zs, pf, src, i, mode, half, nw, nbias, mu, inv, out, oi, omode):
    """`gemv` as a launch of its own (tests; `mu`, `inv`: the IN_NORM row statistics)."""
    part = cuda.shared.array(MAX_THREADS, float32)
    gemv(d, wq, fw, sc, zs, pf, src, i, mode, half, nw, nbias, mu, inv, out, oi, omode, part)


# ----------------------------------------------------------------------------- prompt: tiled dequantize + GEMM
TM, TN, KT = 32, 32, 32  # tokens x rows per block tile, columns per K step
KTP = KT + 1  # padded row of the activation tile: no bank conflicts on its column reads
MAX_ACC = TM * TN // ROWS  # outputs per thread at the smallest block (32 threads)


@cuda.jit
def gemm_kernel(d, wq, fw, sc, zs, pf, x, t, out, omode):
    """out (t, n) (= or +=) x (t, k) fp16 @ W^T + b. Block (bx, by) computes rows bx*32.. of
    tokens by*32..: per K step of 32 columns it stages the activations (fp16 -> fp32) and the
    dequantized weight tile in shared memory, then every thread accumulates its TM*TN/blockDim
    outputs (same row, tokens blockDim/32 apart: the weight value is loaded once per column)."""
    xs = cuda.shared.array((TM, KTP), float32)
    ws = cuda.shared.array((KT, TN), float32)
    acc = cuda.local.array(MAX_ACC, float32)
    tid, bd = cuda.threadIdx.x, cuda.blockDim.x
    n, k = d[D_N], d[D_K]
    r0, t0 = cuda.blockIdx.x * TN, cuda.blockIdx.y * TM
    nacc, step = TM * TN // bd, bd // TN
    ri, ti0 = tid % TN, tid // TN
    nu = 0  # outputs of this thread that hold a real token (short prompts fill few rows of the tile)
    while nu < nacc and t0 + ti0 + nu * step < t:
        nu += 1
    for u in range(nacc):
        acc[u] = 0.0
    for k0 in range(0, k, KT):
        for e in range(tid, TM * KT, bd):
            ti, kk = e // KT, e % KT
            xs[ti, kk] = np.float32(x[t0 + ti, k0 + kk]) if t0 + ti < t and k0 + kk < k else np.float32(0.0)
        for e in range(tid, KT * TN, bd):
            kk, rr = e // TN, e % TN
            ws[kk, rr] = weight(d, wq, fw, sc, zs, r0 + rr, k0 + kk) if r0 + rr < n and k0 + kk < k else np.float32(0.0)
        cuda.syncthreads()
        for kk in range(KT):
            wv = ws[kk, ri]
            for u in range(nu):
                acc[u] += xs[ti0 + u * step, kk] * wv
        cuda.syncthreads()
    r = r0 + ri
    if r < n:
        b = pf[d[D_B] + r] if d[D_B] >= 0 else np.float32(0.0)
        for u in range(nu):
            tok = t0 + ti0 + u * step
            if tok < t:
                if omode == OUT_ADD:
                    out[tok, r] += acc[u] + b
                else:
                    out[tok, r] = acc[u] + b


def gemm_grid(n: int, t: int) -> tuple:
    return ((n + TN - 1) // TN, (t + TM - 1) // TM)


# ----------------------------------------------------------------------------- embeddings
@cuda.jit(device=True)
def embed_row(d, wq, fw, sc, zs, pf, tok, i, pos, h, wpe, x):
    """x[i] = row `tok` of the embedding table (+ learned position `pos` when wpe >= 0),
    spread over the whole grid."""
    start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for c in range(start, h, cuda.gridDim.x * cuda.blockDim.x):
        v = weight(d, wq, fw, sc, zs, tok, c)
        if wpe >= 0:
            v += pf[wpe + pos * h + c]
        x[i, c] = v


@cuda.jit
def embed_kernel(d, wq, fw, sc, zs, pf, ids, pos0, h, wpe, x):
    """Rows of the prompt: x (t, h) = table[ids] (+ positions pos0..)."""
    for i in range(ids.shape[0]):
        embed_row(d, wq, fw, sc, zs, pf, ids[i], i, pos0 + i, h, wpe, x)


# ----------------------------------------------------------------------------- layout (load time)
@cuda.jit
def transpose_into(src, dst, off):
    """dst[off + j*n + r] = src[r, j] for src (n, m), cast to dst's type (fp32 -> fp16 etc.):
    the export's row-major tensors into the transposed device layout, on the device."""
    n, m = src.shape[0], src.shape[1]
    start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for e in range(start, n * m, cuda.gridDim.x * cuda.blockDim.x):
        j, r = e // n, e % n
        dst[off + e] = src[r, j]


# ----------------------------------------------------------------------------- numpy references
def f16(x) -> np.ndarray:
    """x rounded to fp16 and back (what an fp16 buffer holds), float64."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)


def ref_gemv(x16: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Reference of gemv/gemm: fp16 inputs x (..., k) times the dequantized weights w (n, k), float64.
    (w from runtime.kernels.quant.dequantize, the CPU runtime's reference of the packed formats.)"""
    y = f16(x16) @ w.astype(np.float64).T
    return y if bias is None else y + bias


def ref_transposed(a: np.ndarray) -> np.ndarray:
    """The device layout of a row-major (n, m) tensor: flat, column j of all rows together."""
    return np.ascontiguousarray(a.T).reshape(-1)

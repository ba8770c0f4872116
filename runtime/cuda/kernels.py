"""Every CUDA kernel of the GPU path (numba's CUDA target), in the order of a layer; the numpy
reference of each is in references.py, its tests in tests/cuda_suite.py.

One module on purpose: numba's CUDA simulator swaps a module's `cuda` global around each
device-function call, and two threads inside device functions of a module other than the
launching kernel's race on that swap; kernels and device functions sharing one module are safe.

## Linear layers, straight from the export's packed weights

Device layout (model.py uploads it once): every linear's weights are stored *transposed*, word j
of row r at `base + j*n + r`, so the 32 threads of a warp, which own 32 consecutive output rows,
read 32 consecutive words (one 128-byte transaction) per step:

    wq  uint32   packed codes: a word holds 8 4-bit codes (columns 8j..8j+7, low nibble first,
                 exactly the export's MatMulNBits bytes) or 4 8-bit codes
    fw  float16  float weights (fp32 exports are computed in fp16 too): column c of row r at c*n + r
    sc  float16  scales, block g of row r at g*n + r (exact: the exporter stored fp16 values)
    zs  float32  zero*scale of asymmetric formats, same layout (symmetric: zero is a constant)
    pf  float32  biases, norm weights, learned positions

The five arrays travel together as one `Weights` tuple. A linear is one `CUDA_LINEAR` record
(runtime/format/records.py: kind, n, k, w_off / s_off / z_off / b_off into the arrays above
(-1: none), block, nb, words, zero), a layer one `CUDA_LAYER` (its four linears by role, its norms'
offsets, its window), and the model-wide parts `CUDA_MODEL` (embeddings, head, final norm, learned
positions) and `CUDA_CONFIG` (dims, flags, eps): device arrays of records, read by field name.

Records on numba's CUDA target: kernels take device arrays of records (one-record arrays for a
single linear, the config and the model), uploaded once, the same argument type on a GPU and in
the simulator; `arr[i]` is a reference to the record in device memory, and device functions take
it (and its nested records, `layer.qkv`) as an argument; the Weights / State named tuples of
device arrays are flattened into kernel parameters by numba (tests/cuda_ptx.py compiles all of it
for sm_90). Under the simulator a record field read goes through FakeWithinKernelCUDAArray's
`__getattr__`, which calls `dir()` on the numpy record each time (17 us a read, 30x an int array's
index, measured here): `_sim_record_field` below answers field names first (2 us). Hot loops
read a record's fields into locals once (gemv_tile), as they would read descriptor slots.

Numerics: inputs are fp16 (a buffer, or computed on the fly and rounded to fp16 as a buffer
would hold them), weights are code*scale, every product is accumulated in fp32. A linear's
output goes through `epilogue` (x mult, soft-cap: Granite's multipliers, Gemma's final cap).

Napkin math, decode (one token, SmolLM2-135M 4-bit): 30 layers x (960 + 576 + 3072 + 576 rows)
x 576..1536 columns / 2 bytes ~ 55 MB of codes + 3.5 MB of scales per token, ~12 us at the H200's
4.8 TB/s: the step is bound by latency and synchronisation, not bandwidth (the decode step below).

## Norms, RoPE + KV cache, attention, activations

Shapes: token rows x (t, h) fp32 (the residual stream stays fp32); qkv (t, (nh + 2 nkv) hd) fp32
(GEMV outputs); KV cache (L, nkv, ctx, hd) fp16, preallocated; attention output and every other
GEMV input fp16. references.py adds this path's fp16 rounding points to the CPU runtime's float
references (runtime/kernels/layers.py ref_*).

Block reductions go through shared memory (`red`, MAX_THREADS + 1 floats) with barriers only:
numba's CUDA simulator has no warp shuffles, and one code path must run on both.

## The decode step: every layer of one token in ONE launch (the hot loop)

numba's CUDA target has no CUDA-graph capture, so the step is fused instead: `decode_coop` is
a cooperative kernel (all blocks resident) that walks the phases below and meets at a grid-wide
barrier (`cuda.cg.this_grid().sync()`) between them; every phase is a grid-stride loop, so any
grid size is correct. Per layer, 6 phases (and 6 barriers), and up to 3 more where the layer's
family has them (`has_phase`: the skip is the same for every block, barrier included):

    QKV    rms/layer norm fused into the GEMV input (each block recomputes the row statistics;
           no norm where the family has none before attention: OLMo 2), fused q|k|v rows -> qkv fp32
    QKNORM RMSNorm of each q/k head (Qwen3, Gemma 3) or of the whole q, k projections
           (OLMo 2), one block per segment                                   -> qkv fp32
    ROPE   rotate q, k with the layer's table (global, local: Gemma 3's sliding layers, none:
           SmolLM3's NoPE layers; the first rope_dims of a head: Phi-3); write k, v into the
           fp16 cache                                                        -> KV cache
    ATTN   one block per head over the cache (the family's scale, soft-cap, the layer's
           window: a mask over the full cache, no ring buffer)               -> att fp16
    O      GEMV of att, residual add fused (x res_mult: Granite), or into s.res -> x += ...
    O_POST the post-norm of s.res (OLMo 2, Gemma 3), x res_mult, residual add -> x += ...
    UP     norm fused into the GEMV input, fused gate|up rows                -> up fp32
    DOWN   SwiGLU, GeGLU (Gemma) or GELU fused into the GEMV input, as O     -> x += ...
    DOWN_POST  as O_POST                                                     -> x += ...

plus EMBED before the layers (x emb_mult: Granite, Gemma's sqrt(H)) and HEAD (final norm fused,
logits x logit_mult: Granite, then the final soft-cap: Gemma) after them. The family is data:
the CUDA_CONFIG / CUDA_LAYER fields model.py fills from runtime/features.py's description, as
the CPU runtime's forward reads its CONFIG / LAYER. Where a
cooperative launch is refused (a driver without it, a grid that cannot be resident),
`phase_kernel` runs the same phases as one launch each (model.py falls back to it and says so).
"""

from __future__ import annotations

import math
import sys
import threading
from typing import NamedTuple

import numpy as np
from numba import cuda, float32
from numba.core import config, types

from ..format.records import KIND_F32, KIND_Q4, KIND_Q8  # noqa: F401  (the kinds a CUDA_LINEAR holds)
from ..kernels.jitcache import stamp

_SHARED_LOCK = threading.Lock()  # tests swap it for a no-op to show the race is real
_sim_alloc = np.empty  # tests slow it down to widen the race window


def _sim_shared_array(self, shape, dtype):
    """numba 0.68's simulated `cuda.shared.array` with its get-or-allocate made atomic.

    The simulator runs a block's threads as Python threads and finds a block's shared array by
    the caller's (file, line): `get`, and on a miss `np.empty` then `set`. Two threads that miss
    at once each allocate their own array, so a thread can read another's never-written
    np.empty memory: the CI failure of 2026-12-01 (test_gemm[3-q8-g32-sym], values of 4e15 in
    three output rows) and the intermittent NaN of the phases-vs-cooperative decode test."""
    from numba.np import numpy_support

    if isinstance(dtype, types.Type):
        dtype = numpy_support.as_dtype(dtype)
    if shape == 0:  # dynamic shared memory: one buffer, no lookup
        return _SIM_ORIGINAL_ARRAY(self, shape, dtype)
    frame = sys._getframe(1)
    caller = (frame.f_code.co_filename, frame.f_lineno)
    with _SHARED_LOCK:
        res = self._allocations.get(caller)
        if res is None:
            res = self._allocations[caller] = _sim_alloc(shape, dtype)
    return res


def _sim_record_field(self, name):
    """numba 0.68's simulated in-kernel array attribute lookup, record fields first (see above)."""
    item = self.__dict__["_item"]
    names = item._ary.dtype.names
    if names is not None and name in names:
        v = item.__getitem__(name)
        return FakeWithinKernelCUDAArray(v) if isinstance(v, FakeCUDAArray) else v
    return _SIM_ORIGINAL_GETATTR(self, name)


if config.ENABLE_CUDASIM:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray, FakeWithinKernelCUDAArray
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    _SIM_ORIGINAL_ARRAY = FakeCUDAShared.array
    FakeCUDAShared.array = _sim_shared_array
    _SIM_ORIGINAL_GETATTR = FakeWithinKernelCUDAArray.__getattr__
    FakeWithinKernelCUDAArray.__getattr__ = _sim_record_field


def pure(fn):
    """A device function that uses no CUDA intrinsics (arithmetic on its arguments only). Under
    numba's CUDA simulator it stays a plain Python function: the simulator swaps module globals
    around every device-function call (~10 us), which made per-element helpers the bulk of a
    simulated decode step. On a GPU it is an ordinary `cuda.jit(device=True)` function."""
    return fn if config.ENABLE_CUDASIM else cuda.jit(device=True)(fn)


class Weights(NamedTuple):
    """The device arrays every linear points into (layout above): one kernel argument."""

    wq: object  # uint32 (words,) packed codes
    fw: object  # float16 float weights
    sc: object  # float16 scales
    zs: object  # float32 zero * scale
    pf: object  # float32 biases, norms, learned positions


class State(NamedTuple):
    """The decode step's tables, KV cache and scratch (model.py sizes them): one kernel argument."""

    cos: object  # float32 (ctx, HD/2) rope tables (a (1, 1) dummy with learned positions)
    sin: object
    kc: object  # float16 (L, NKV, ctx, HD) KV cache
    vc: object
    x: object  # float32 (chunk, H) residual stream
    qkv: object  # float32 (chunk, (NH + 2 NKV) HD)
    att: object  # float16 (chunk, max(H, NH HD, I)) attention output / GEMV inputs
    up: object  # float32 (chunk, 2 I or I)
    scores: object  # float32 (chunk NH, ctx)
    logits: object  # float32 (chunk, V)
    res: object  # float32 (chunk, H) a block's output before its post-norm (families with post-norms)


ROWS = 32  # output rows per tile: one per lane of a warp
MAX_THREADS = 256  # threads per block the shared buffers are sized for (a multiple of ROWS)
IN_H16, IN_NORM, IN_SWIGLU, IN_GELU, IN_GEGLU = range(5)  # where a GEMV's input comes from (and act_kernel's modes)
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
    IN_H16 src (t, k) fp16 | IN_NORM (src - mu) * inv * w (+ b), src the fp32 residual (nw -1:
    no norm weights, and mu 0, inv 1: the residual itself, OLMo 2's layers) |
    IN_SWIGLU silu(src[c]) * src[half + c] | IN_GEGLU gelu(src[c]) * src[half + c] | IN_GELU gelu(src[c])."""
    if mode == IN_H16:
        return np.float32(src[i, c])
    if mode == IN_NORM:
        v = (np.float32(src[i, c]) - mu) * inv
        if nw >= 0:
            v = v * pf[nw + c]
        if nbias >= 0:
            v += pf[nbias + c]
    elif mode == IN_SWIGLU:
        g = np.float32(src[i, c])
        v = g / (np.float32(1.0) + math.exp(-g)) * np.float32(src[i, half + c])
    elif mode == IN_GEGLU:
        v = gelu(np.float32(src[i, c])) * np.float32(src[i, half + c])
    else:
        v = gelu(np.float32(src[i, c]))
    return np.float32(np.float16(v))


@pure
def epilogue(v, mult, cap):
    """A linear's output element v times `mult` (Granite's residual multiplier, 1/logits_scaling),
    then soft-capped cap * tanh(v / cap) when cap > 0 (Gemma's final logits)."""
    if mult != np.float32(1.0):
        v = v * mult
    if cap > np.float32(0.0):
        v = cap * math.tanh(v / cap)
    return v


@pure
def weight(d, w, r, c):
    """Dequantized weight (row r, column c) of the linear `d` (a CUDA_LINEAR record): fp32."""
    n, kind = d.n, d.kind
    if kind == KIND_F32:
        return np.float32(w.fw[d.w_off + c * n + r])
    cpw = 32 // kind
    word = w.wq[d.w_off + (c // cpw) * n + r]
    code = np.float32((word >> (kind * (c % cpw))) & ((1 << kind) - 1))
    g = c // d.block
    scale = np.float32(w.sc[d.s_off + g * n + r])
    if d.z_off >= 0:
        return code * scale - w.zs[d.z_off + g * n + r]
    return (code - np.float32(d.zero)) * scale


# ----------------------------------------------------------------------------- decode: fused dequantize + GEMV
@cuda.jit(device=True)
def gemv_tile(d, w, src, i, mode, half, nw, nbias, mu, inv, out, oi, omode, mult, cap, part, tile):
    """Rows [tile*32, tile*32 + 32) of y = epilogue(in(src row i) W^T + b, mult, cap) into
    out[oi] (= or +=).

    Thread t owns row tile*32 + t % 32 and every (blockDim/32)-th word of it: each warp reads
    one word of 32 consecutive rows at a time (coalesced), unpacks its 8 (or 4) codes, and
    accumulates sum(code*x) and sum(x) per block (the zero point is applied once per word). The
    block's partial sums meet in shared memory `part` (one barrier), lane by lane."""
    tid = cuda.threadIdx.x
    lane, s, nsplit = tid % ROWS, tid // ROWS, cuda.blockDim.x // ROWS
    n, k, kind = d.n, d.k, d.kind
    wq, fw, sc, zs, pf = w.wq, w.fw, w.sc, w.zs, w.pf
    r = tile * ROWS + lane
    acc = np.float32(0.0)
    if r < n:
        if kind == KIND_F32:
            w0 = d.w_off
            for c in range(s, k, nsplit):
                acc += np.float32(fw[w0 + c * n + r]) * in_val(src, i, c, mode, half, pf, nw, nbias, mu, inv)
        else:
            w0, s0, z0, gs, words = d.w_off, d.s_off, d.z_off, d.block, d.words
            zero = np.float32(d.zero)
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
        if d.b_off >= 0:
            tot += pf[d.b_off + r]
        tot = epilogue(tot, mult, cap)
        if omode == OUT_ADD:
            out[oi, r] += tot
        else:
            out[oi, r] = tot
    cuda.syncthreads()


@cuda.jit(device=True)
def gemv(d, w, src, i, mode, half, nw, nbias, mu, inv, out, oi, omode, mult, cap, part):
    """All row tiles of one GEMV, spread over the grid (grid-stride: any grid size works)."""
    ntile = (d.n + ROWS - 1) // ROWS
    for tile in range(cuda.blockIdx.x, ntile, cuda.gridDim.x):
        gemv_tile(d, w, src, i, mode, half, nw, nbias, mu, inv, out, oi, omode, mult, cap, part, tile)


@cuda.jit(cache=True)
def gemv_kernel(lin, w, src, i, mode, half, nw, nbias, mu, inv, out, oi, omode, mult, cap):
    """`gemv` of the linear lin[0] (a one-record CUDA_LINEAR array) as a launch of its own
    (tests; `mu`, `inv`: the IN_NORM row statistics; `mult`, `cap`: the epilogue)."""
    part = cuda.shared.array(MAX_THREADS, float32)
    gemv(lin[0], w, src, i, mode, half, nw, nbias, mu, inv, out, oi, omode, mult, cap, part)


# ----------------------------------------------------------------------------- prompt: tiled dequantize + GEMM
TM, TN, KT = 32, 32, 32  # tokens x rows per block tile, columns per K step
KTP = KT + 1  # padded row of the activation tile: no bank conflicts on its column reads
MAX_ACC = TM * TN // ROWS  # outputs per thread at the smallest block (32 threads)


@cuda.jit(cache=True)
def gemm_kernel(lin, w, x, t, out, omode, mult, cap):
    """out (t, n) (= or +=) epilogue(x (t, k) fp16 @ W^T + b, mult, cap), W the linear lin[0] (a
    one-record CUDA_LINEAR array). Block (bx, by) computes rows bx*32.. of
    tokens by*32..: per K step of 32 columns it stages the activations (fp16 -> fp32) and the
    dequantized weight tile in shared memory, then every thread accumulates its TM*TN/blockDim
    outputs (same row, tokens blockDim/32 apart: the weight value is loaded once per column)."""
    xs = cuda.shared.array((TM, KTP), float32)
    ws = cuda.shared.array((KT, TN), float32)
    acc = cuda.local.array(MAX_ACC, float32)
    tid, bd = cuda.threadIdx.x, cuda.blockDim.x
    d = lin[0]
    n, k = d.n, d.k
    r0, t0 = cuda.blockIdx.x * TN, cuda.blockIdx.y * TM
    nacc, step = TM * TN // bd, bd // TN
    ri, ti0 = tid % TN, tid // TN
    rows = t - t0 if t - t0 < TM else TM
    nu = 0  # outputs of this thread that hold a real token (short prompts fill few rows of the tile)
    while nu < nacc and t0 + ti0 + nu * step < t:
        nu += 1
    for u in range(nacc):
        acc[u] = 0.0
    for k0 in range(0, k, KT):
        for e in range(tid, rows * KT, bd):  # only the tile's real tokens: no thread reads past them (nu)
            ti, kk = e // KT, e % KT
            xs[ti, kk] = np.float32(x[t0 + ti, k0 + kk]) if k0 + kk < k else np.float32(0.0)
        for e in range(tid, KT * TN, bd):
            kk, rr = e // TN, e % TN
            ws[kk, rr] = weight(d, w, r0 + rr, k0 + kk) if r0 + rr < n and k0 + kk < k else np.float32(0.0)
        cuda.syncthreads()
        for kk in range(KT):
            wv = ws[kk, ri]
            for u in range(nu):
                acc[u] += xs[ti0 + u * step, kk] * wv
        cuda.syncthreads()
    r = r0 + ri
    if r < n:
        b = w.pf[d.b_off + r] if d.b_off >= 0 else np.float32(0.0)
        for u in range(nu):
            tok = t0 + ti0 + u * step
            if tok < t:
                v = epilogue(acc[u] + b, mult, cap)
                if omode == OUT_ADD:
                    out[tok, r] += v
                else:
                    out[tok, r] = v


def gemm_grid(n: int, t: int) -> tuple:
    return ((n + TN - 1) // TN, (t + TM - 1) // TM)


# ----------------------------------------------------------------------------- embeddings
@cuda.jit(device=True)
def embed_row(d, w, tok, i, pos, h, wpe, mult, x):
    """x[i] = row `tok` of the embedding table x mult (Granite's embedding multiplier, Gemma's
    sqrt(H)) (+ learned position `pos` when wpe >= 0), spread over the whole grid."""
    start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for c in range(start, h, cuda.gridDim.x * cuda.blockDim.x):
        v = weight(d, w, tok, c)
        if mult != np.float32(1.0):
            v = v * mult
        if wpe >= 0:
            v += w.pf[wpe + pos * h + c]
        x[i, c] = v


@cuda.jit(cache=True)
def embed_kernel(lin, w, ids, pos0, h, wpe, mult, x):
    """Rows of the prompt: x (t, h) = table lin[0] at ids x mult (+ positions pos0.. at pf[wpe];
    wpe -1: none)."""
    for i in range(ids.shape[0]):
        embed_row(lin[0], w, ids[i], i, pos0 + i, h, wpe, mult, x)


# ----------------------------------------------------------------------------- layout (load time)
@cuda.jit(cache=True)
def transpose_into(src, dst, off):
    """dst[off + j*n + r] = src[r, j] for src (n, m), cast to dst's type (fp32 -> fp16 etc.):
    the export's row-major tensors into the transposed device layout, on the device."""
    n, m = src.shape[0], src.shape[1]
    start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for e in range(start, n * m, cuda.gridDim.x * cuda.blockDim.x):
        j, r = e // n, e % n
        dst[off + e] = src[r, j]


# ============================================================================= layers
RED = (
    2 * MAX_THREADS + 1
)  # shared floats: reductions (MAX_THREADS + 1) or attention's P.V partials (<= 2 * MAX_THREADS)
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


@cuda.jit(cache=True)
def norm_rows_kernel(x, t, h, layer, eps, pf, nw, nb, out):
    """out (t, h) fp16 = norm(x (t, h)) * w (+ b); nw -1: no norm, out = x (OLMo 2's layers have
    no norm before attention and the MLP); one block per row (grid-stride)."""
    red = cuda.shared.array(RED, float32)
    for i in range(cuda.blockIdx.x, t, cuda.gridDim.x):
        if nw < 0:
            for c in range(cuda.threadIdx.x, h, cuda.blockDim.x):
                out[i, c] = x[i, c]
            continue
        mu, inv = row_stats(x, i, h, layer, eps, red)
        for c in range(cuda.threadIdx.x, h, cuda.blockDim.x):
            v = (x[i, c] - mu) * inv * pf[nw + c]
            if nb >= 0:
                v += pf[nb + c]
            out[i, c] = v


@cuda.jit(device=True)
def qk_norm_rows(qkv, t, nh, nkv, hd, width, qw, kw, eps, pf, red):
    """In place over q and k of qkv (t, (nh + 2 nkv) hd): RMSNorm (weights pf[qw..], pf[kw..]) of
    each head (width = hd: Qwen3, Gemma 3) or of the whole q and k projections (width = nh hd:
    OLMo 2, k then spans nkv hd). One block per (token, segment), grid-stride; fp32 in and out."""
    tid, bd = cuda.threadIdx.x, cuda.blockDim.x
    per_head = width == hd
    nq = nh if per_head else 1
    nseg = nq + (nkv if per_head else 1)
    kwidth = hd if per_head else nkv * hd
    for item in range(cuda.blockIdx.x, t * nseg, cuda.gridDim.x):
        i, sg = item // nseg, item % nseg
        if sg < nq:
            base, wd, wo = sg * width, width, qw
        else:
            base, wd, wo = nh * hd + (sg - nq) * kwidth, kwidth, kw
        ss = np.float32(0.0)
        for j in range(tid, wd, bd):
            v = qkv[i, base + j]
            ss += v * v
        inv = np.float32(1.0) / math.sqrt(block_reduce(ss, red, SUM) / np.float32(wd) + eps)
        for j in range(tid, wd, bd):
            qkv[i, base + j] = qkv[i, base + j] * inv * pf[wo + j]


@cuda.jit(cache=True)
def qk_norm_kernel(qkv, t, nh, nkv, hd, width, qw, kw, eps, pf):
    red = cuda.shared.array(RED, float32)
    qk_norm_rows(qkv, t, nh, nkv, hd, width, qw, kw, eps, pf, red)


@cuda.jit(device=True)
def residual_norm(x, res, i0, t, h, eps, pf, nw, mult, red):
    """x[i] += mult * rms_norm(res[i]) * w for rows i0..i0+t: a block's output through its
    post-norm (OLMo 2, Gemma 3), then Granite's residual multiplier, then the residual add. One
    block per row (grid-stride); fp32."""
    for i in range(i0 + cuda.blockIdx.x, i0 + t, cuda.gridDim.x):
        mu, inv = row_stats(res, i, h, 0, eps, red)
        for c in range(cuda.threadIdx.x, h, cuda.blockDim.x):
            v = res[i, c] * inv * pf[nw + c]
            if mult != np.float32(1.0):
                v = v * mult
            x[i, c] += v


@cuda.jit(cache=True)
def residual_norm_kernel(x, res, t, h, eps, pf, nw, mult):
    red = cuda.shared.array(RED, float32)
    residual_norm(x, res, 0, t, h, eps, pf, nw, mult, red)


# ----------------------------------------------------------------------------- rope + KV cache
@cuda.jit(device=True)
def rope_kv(qkv, t, pos0, l, nh, nkv, hd, rot, rope, cos, sin, kc, vc):
    """Rotate q and k heads of qkv (t, (nh + 2 nkv) hd) by their positions pos0.. (HF
    rotate_half pairs (j, j + rot/2) over each head's first `rot` dims: rot < hd is partial
    rotary (Phi-3), the other dims pass through), with table rope - 1 of cos, sin (2, ctx, rot/2)
    (rope: the layer's ROPE_GLOBAL 1 | ROPE_LOCAL 2; ROPE_NONE 0: no rotation: learned positions,
    NoPE layers), write k and v into the fp16 cache at layer l, positions pos0..pos0+t; q stays
    in qkv (fp32). Grid-stride over column pairs, hd/2 per head, one thread per pair (in place,
    no race): pair j < rot/2 is (j, j + rot/2), a later one two pass-through columns."""
    half, rh = hd // 2, rot // 2
    nq = (nh + nkv) * half
    npair, nv = t * nq, t * nkv * hd
    start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for e in range(start, npair + nv, cuda.gridDim.x * cuda.blockDim.x):
        if e < npair:
            i, rem = e // nq, e % nq
            hh, j = rem // half, rem % half
            if j < rh:
                j0, j1 = j, j + rh
            else:
                j0 = rot + 2 * (j - rh)
                j1 = j0 + 1
            col = hh * hd
            a, b = qkv[i, col + j0], qkv[i, col + j1]
            if rope > 0 and j < rh:
                c, s = cos[rope - 1, pos0 + i, j], sin[rope - 1, pos0 + i, j]
                a, b = a * c - b * s, b * c + a * s
            if hh < nh:
                qkv[i, col + j0] = a
                qkv[i, col + j1] = b
            else:
                kc[l, hh - nh, pos0 + i, j0] = a
                kc[l, hh - nh, pos0 + i, j1] = b
        else:
            e2 = e - npair
            i, rem = e2 // (nkv * hd), e2 % (nkv * hd)
            vc[l, rem // hd, pos0 + i, rem % hd] = qkv[i, (nh + nkv) * hd + rem]


@cuda.jit(cache=True)
def rope_kv_kernel(qkv, t, pos0, l, nh, nkv, hd, rot, rope, cos, sin, kc, vc):
    rope_kv(qkv, t, pos0, l, nh, nkv, hd, rot, rope, cos, sin, kc, vc)


# ----------------------------------------------------------------------------- attention
@cuda.jit(device=True)
def attend(item, qkv, kc, vc, l, pos0, nh, nkv, hd, window, scale, cap, scores, out, red):
    """Query row i = item // nh, head h = item % nh over cached keys [p0, pos0 + i] (causal,
    GQA, sliding `window` > 0), by the whole block: scores one position per thread (fp32 dot of
    the fp32 query with fp16 keys) times `scale` (0: 1/sqrt(hd)), soft-capped cap * tanh(s / cap)
    when cap > 0 (Gemma), block max, exp and sum, then P.V with the block split into
    hd columns x (blockDim / hd) position strides, partials met in `red`. out[i, h] fp16."""
    tid, bd = cuda.threadIdx.x, cuda.blockDim.x
    i, h = item // nh, item % nh
    kvh = h // (nh // nkv)
    n = pos0 + i + 1
    p0 = n - window if window > 0 and n > window else 0
    qo = h * hd
    if scale <= np.float32(0.0):
        scale = np.float32(1.0) / math.sqrt(np.float32(hd))
    m = NEG
    for p in range(p0 + tid, n, bd):
        s = np.float32(0.0)
        for j in range(hd):
            s += qkv[i, qo + j] * np.float32(kc[l, kvh, p, j])
        s *= scale
        if cap > np.float32(0.0):
            s = cap * math.tanh(s / cap)
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


@cuda.jit(cache=True)
def attention_kernel(qkv, kc, vc, l, pos0, t, nh, nkv, hd, window, scale, cap, scores, out):
    """Every (query row, head) of t new tokens, one block each (grid-stride)."""
    red = cuda.shared.array(RED, float32)
    for item in range(cuda.blockIdx.x, t * nh, cuda.gridDim.x):
        attend(item, qkv, kc, vc, l, pos0, nh, nkv, hd, window, scale, cap, scores, out, red)


# ----------------------------------------------------------------------------- activations (prompt path)
@cuda.jit(cache=True)
def act_kernel(up, t, inter, mode, out):
    """out (t, inter) fp16 = the MLP activation `mode` of up: IN_SWIGLU silu(gate) * up or
    IN_GEGLU gelu(gate) * up from the fused gate|up rows, IN_GELU gelu(up)."""
    start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for e in range(start, t * inter, cuda.gridDim.x * cuda.blockDim.x):
        i, c = e // inter, e % inter
        g = up[i, c]
        if mode == IN_SWIGLU:
            out[i, c] = g / (np.float32(1.0) + math.exp(-g)) * up[i, inter + c]
        elif mode == IN_GEGLU:
            out[i, c] = gelu(g) * up[i, inter + c]
        else:
            out[i, c] = gelu(g)


# ============================================================================= the decode step
PH_EMBED, PH_QKV, PH_QKNORM, PH_ROPE, PH_ATTN, PH_O, PH_O_POST, PH_UP, PH_DOWN, PH_DOWN_POST, PH_HEAD = range(11)
LAYER_PHASES = (PH_QKV, PH_QKNORM, PH_ROPE, PH_ATTN, PH_O, PH_O_POST, PH_UP, PH_DOWN, PH_DOWN_POST)
ZERO, ONE = np.float32(0.0), np.float32(1.0)


def has_phase(ph, ly):
    """Whether layer `ly` (a CUDA_LAYER record) has phase `ph`: q/k norm and the post-norms only
    where its family's description has them. The same for every block, so the cooperative step
    skips a phase and its grid barrier together (`phase_on`, its device function; the host's
    phase-by-phase fallback calls this one)."""
    if ph == PH_QKNORM:
        return ly.q_norm_w >= 0
    if ph == PH_O_POST:
        return ly.attn_out_norm_w >= 0
    if ph == PH_DOWN_POST:
        return ly.mlp_out_norm_w >= 0
    return True


phase_on = pure(has_phase)


@cuda.jit(device=True)
def norm_in(x, row, h, layer, eps, nw, red):
    """(mu, inv) of residual row `row` for a GEMV's IN_NORM input; (0, 1) when the layer has no
    norm there (nw -1: OLMo 2)."""
    if nw < 0:
        return ZERO, ONE
    return row_stats(x, row, h, layer, eps, red)


@pure
def mlp_mode(c):
    """The DOWN GEMV's input mode (the MLP's activation) of the CUDA_CONFIG record c."""
    if c.gated == 0:
        return IN_GELU
    return IN_GEGLU if c.gelu_gate == 1 else IN_SWIGLU


@cuda.jit(device=True)
def block_out(d, w, src, mode, half, out_norm, c, s, row, part):
    """A block's output linear (O or DOWN) for token row `row`: straight into the residual
    (x += res_mult * y), or, where the layer has a post-norm, into s.res for PH_*_POST."""
    if out_norm >= 0:
        gemv(d, w, src, 0, mode, half, 0, -1, ZERO, ONE, s.res, row, OUT_SET, ONE, ZERO, part)
    else:
        gemv(d, w, src, 0, mode, half, 0, -1, ZERO, ONE, s.x, row, OUT_ADD, c.res_mult, ZERO, part)


@cuda.jit(device=True)
def run_phase(ph, l, row, tok, pos, c, m, layers, w, s, part, red):
    """Phase `ph` of layer `l` for one token at position `pos` (its residual row `row` of s.x).
    c: the CUDA_CONFIG record, m: the CUDA_MODEL record, layers: CUDA_LAYER records (the
    family's per-layer description: norms and their placement, q/k norm, rope table, window),
    w: Weights, s: State."""
    H, NH, NKV, HD = c.hidden, c.heads, c.kv_heads, c.head_dim
    layer, eps = c.layer_norm, c.eps
    if ph == PH_EMBED:
        embed_row(m.embed, w, tok, row, pos, H, m.positions_off, c.emb_mult, s.x)
    elif ph == PH_QKV:
        ly = layers[l]
        mu, inv = norm_in(s.x, row, H, layer, eps, ly.attn_norm_w, red)
        gemv(
            ly.qkv, w, s.x, row, IN_NORM, 0, ly.attn_norm_w, ly.attn_norm_b, mu, inv, s.qkv, 0, OUT_SET, ONE, ZERO, part
        )
    elif ph == PH_QKNORM:
        ly = layers[l]
        qk_norm_rows(s.qkv, 1, NH, NKV, HD, ly.qk_width, ly.q_norm_w, ly.k_norm_w, eps, w.pf, red)
    elif ph == PH_ROPE:
        rope_kv(s.qkv, 1, pos, l, NH, NKV, HD, c.rope_dims, layers[l].rope, s.cos, s.sin, s.kc, s.vc)
    elif ph == PH_ATTN:
        window = layers[l].window
        for item in range(cuda.blockIdx.x, NH, cuda.gridDim.x):
            attend(item, s.qkv, s.kc, s.vc, l, pos, NH, NKV, HD, window, c.attn_scale, c.attn_cap, s.scores, s.att, red)
    elif ph == PH_O:
        ly = layers[l]
        block_out(ly.o, w, s.att, IN_H16, 0, ly.attn_out_norm_w, c, s, row, part)
    elif ph == PH_O_POST:
        residual_norm(s.x, s.res, row, 1, H, eps, w.pf, layers[l].attn_out_norm_w, c.res_mult, red)
    elif ph == PH_UP:
        ly = layers[l]
        mu, inv = norm_in(s.x, row, H, layer, eps, ly.mlp_norm_w, red)
        gemv(ly.up, w, s.x, row, IN_NORM, 0, ly.mlp_norm_w, ly.mlp_norm_b, mu, inv, s.up, 0, OUT_SET, ONE, ZERO, part)
    elif ph == PH_DOWN:
        ly = layers[l]
        block_out(ly.down, w, s.up, mlp_mode(c), c.intermediate, ly.mlp_out_norm_w, c, s, row, part)
    elif ph == PH_DOWN_POST:
        residual_norm(s.x, s.res, row, 1, H, eps, w.pf, layers[l].mlp_out_norm_w, c.res_mult, red)
    else:  # PH_HEAD: final norm fused, then Granite's logits scaling and Gemma's final soft-cap
        mu, inv = row_stats(s.x, row, H, layer, eps, red)
        fnw, fnb = m.final_norm_w, m.final_norm_b
        gemv(m.head, w, s.x, row, IN_NORM, 0, fnw, fnb, mu, inv, s.logits, 0, OUT_SET, c.logit_mult, c.final_cap, part)


@cuda.jit(cache=True)
def decode_coop(tok, pos, cfg, model, layers, w, s):
    """One decode step, the whole model, one launch: s.logits[0] for token `tok` at `pos`.
    cfg, model: one-record CUDA_CONFIG / CUDA_MODEL arrays; layers: CUDA_LAYER records."""
    part = cuda.shared.array(MAX_THREADS, float32)
    red = cuda.shared.array(RED, float32)
    grid = cuda.cg.this_grid()
    c, m = cfg[0], model[0]
    run_phase(PH_EMBED, 0, 0, tok, pos, c, m, layers, w, s, part, red)
    grid.sync()
    for l in range(c.layers):
        for ph in range(PH_QKV, PH_DOWN_POST + 1):
            if phase_on(ph, layers[l]):
                run_phase(ph, l, 0, tok, pos, c, m, layers, w, s, part, red)
                grid.sync()
    run_phase(PH_HEAD, 0, 0, tok, pos, c, m, layers, w, s, part, red)


@cuda.jit(cache=True)
def phase_kernel(ph, l, row, tok, pos, cfg, model, layers, w, s):
    """One phase as a launch of its own (the fallback of decode_coop, and the prompt's head)."""
    part = cuda.shared.array(MAX_THREADS, float32)
    red = cuda.shared.array(RED, float32)
    run_phase(ph, l, row, tok, pos, cfg[0], model[0], layers, w, s, part, red)


# numba's cache of this module's kernels keys on all their sources, not only this file (jitcache.py)
stamp(globals())

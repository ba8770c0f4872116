"""The kernels a family's per-layer description adds to Llama's layer (runtime/features.py), each
beside its numpy reference (`ref_*`): q/k RMSNorm over column segments, GeGLU, scaling and
soft-capping rows in place.

Shapes: x (t, cols) for t tokens.
"""

from __future__ import annotations

import math

import numpy as np
from numba import carray, njit, prange

from .jitcache import stamp
from .layers import fast_exp
from .simd import as_voidptr


@njit(cache=True, fastmath=True)
def rms_norm_cols(x, col0, n_seg, width, w_addr, eps):
    """In place: each of the n_seg segments [col0 + s*width, +width) of every row of x (t, *)
    becomes seg / sqrt(mean(seg^2) + eps) * w, w float32 (width,). q/k norm per head (width =
    head_dim, n_seg = heads) or over the whole projection (width = heads*head_dim, n_seg = 1)."""
    w = carray(as_voidptr(w_addr), (width,), np.float32)
    for i in range(x.shape[0]):
        for sg in range(n_seg):
            base = col0 + sg * width
            ss = np.float32(0.0)
            for j in range(width):
                ss += x[i, base + j] * x[i, base + j]
            inv = np.float32(1.0) / np.sqrt(ss / width + eps)
            for j in range(width):
                x[i, base + j] = x[i, base + j] * inv * w[j]


def ref_rms_norm_cols(x, col0, n_seg, width, w, eps):
    out = x.astype(np.float64).copy()
    seg = out[:, col0 : col0 + n_seg * width].reshape(x.shape[0], n_seg, width)
    seg = seg / np.sqrt((seg * seg).mean(-1, keepdims=True) + eps) * w
    out[:, col0 : col0 + n_seg * width] = seg.reshape(x.shape[0], -1)
    return out


_C = np.float32(math.sqrt(2.0 / math.pi))


@njit(cache=True, fastmath=True, inline="always")
def _geglu_row(g, inter, o):
    for j in range(inter):
        v = g[j]
        # 0.5 v (1 + tanh(u)) = v / (1 + exp(-2u)): tanh through the vectorizing exp
        u = _C * (v + np.float32(0.044715) * v * v * v)
        o[j] = v / (np.float32(1.0) + fast_exp(np.float32(-2.0) * u)) * g[inter + j]


@njit(cache=True, parallel=True, fastmath=True, error_model="numpy")  # threads as layers.swiglu
def geglu(gu, inter, out):
    """gate/up rows fused (t, 2*inter): out = gelu_tanh(gate) * up (Gemma's GeGLU)."""
    t = gu.shape[0]
    if t == 1:
        _geglu_row(gu[0], inter, out[0])
        return
    for i in prange(t):
        _geglu_row(gu[i], inter, out[i])


def ref_geglu(gu, inter):
    g = gu[:, :inter].astype(np.float64)
    return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * gu[:, inter:]


@njit(cache=True, fastmath=True)
def scale_cap(x, mult, cap):
    """In place over x (t, n): x * mult, then soft-capped cap * tanh(x / cap) when cap > 0."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[i, j] * mult
            if cap > 0:
                v = cap * np.tanh(v / cap)
            x[i, j] = v


def ref_scale_cap(x, mult, cap):
    v = x.astype(np.float64) * mult
    return cap * np.tanh(v / cap) if cap > 0 else v


def ref_rope_partial(x, pos, cos, sin):
    """x (t, n_heads, hd), cos/sin (ctx, rot/2): the first rot dims rotate (rotate_half pairing
    within them), the rest pass through."""
    rot = 2 * cos.shape[1]
    half = rot // 2
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    a, b = x[..., :half], x[..., half:rot]
    return np.concatenate([a * c - b * s, b * c + a * s, x[..., rot:]], -1)


# numba's cache of this module's kernels keys on all their sources, not only this file (jitcache.py)
stamp(globals())

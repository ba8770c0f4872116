"""numpy references of the CUDA kernels (kernels.py): the CPU runtime's float references
(runtime/kernels/*.py ref_*, dequantize) with this path's fp16 rounding points added."""

from __future__ import annotations

import numpy as np

from ..kernels.family import ref_geglu, ref_rms_norm_cols, ref_rope_partial, ref_scale_cap
from ..kernels.layers import ref_layer_norm, ref_rms_norm, ref_rope


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


def ref_norm_f16(x, w, b, eps, layer: bool):
    """norm_rows_kernel: the CPU references, rounded to fp16."""
    return f16(ref_layer_norm(x, w, b, eps) if layer else ref_rms_norm(x, w, eps))


def ref_rope_kv(qkv, pos0, nh, nkv, hd, cos, sin, rope: bool = True):
    """(q rotated (t, nh, hd) fp32, k rotated fp16 (nkv, t, hd), v fp16 (nkv, t, hd)); cos, sin
    (ctx, rot/2) the layer's table: rot < hd rotates each head's first rot dims (partial rotary)."""
    t = qkv.shape[0]
    q = qkv[:, : nh * hd].reshape(t, nh, hd)
    k = qkv[:, nh * hd : (nh + nkv) * hd].reshape(t, nkv, hd)
    v = qkv[:, (nh + nkv) * hd :].reshape(t, nkv, hd)
    if rope:
        pos = np.arange(pos0, pos0 + t)
        turn = ref_rope if 2 * cos.shape[1] == hd else ref_rope_partial
        q, k = turn(q, pos, cos, sin), turn(k, pos, cos, sin)
    return q, f16(k.transpose(1, 0, 2)), f16(v.transpose(1, 0, 2))


def ref_qk_norm(qkv, nh, nkv, hd, width, wq, wk, eps):
    """qk_norm_rows: q and k of qkv (t, (nh + 2 nkv) hd) RMS-normed per head (width = hd) or over
    each projection (width = nh hd), float64; v untouched."""
    per_head = width == hd
    out = ref_rms_norm_cols(qkv, 0, nh if per_head else 1, width, wq, eps)
    kw = hd if per_head else nkv * hd
    k = ref_rms_norm_cols(qkv, nh * hd, nkv if per_head else 1, kw, wk, eps)
    out[:, nh * hd : (nh + nkv) * hd] = k[:, nh * hd : (nh + nkv) * hd]
    return out


def ref_residual_norm(x, res, w, eps, mult):
    """residual_norm: x + mult * rms_norm(res) * w, float64."""
    return x.astype(np.float64) + mult * ref_rms_norm(res, w, eps)


def ref_epilogue(y, mult, cap):
    """kernels.epilogue: y * mult, soft-capped when cap > 0 (the CPU runtime's scale_cap)."""
    return ref_scale_cap(np.asarray(y, np.float64), mult, cap)


def ref_swiglu_f16(up, inter):
    g = up[:, :inter].astype(np.float64)
    return f16(g / (1 + np.exp(-g)) * up[:, inter:])


def ref_geglu_f16(up, inter):
    return f16(ref_geglu(up, inter))

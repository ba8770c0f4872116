"""The named records the compiled kernels read (llama2.c's Config / TransformerWeights, as numpy
structured dtypes that numba compiles to field loads): one compiled step serves every layer, and
a reader sees what each argument is without counting slots.

Addresses (`*_addr`) point into the memory-mapped export or into small arrays the plan keeps
alive (runtime/plan.py); 0 means "absent". Shapes are given per field.
"""

from __future__ import annotations

import numpy as np

I8, F4 = np.int64, np.float32

# The family's scalars, the same fields in the CPU and the CUDA config records.
SCALARS = [
    ("eps", F4),  # norm epsilon
    ("emb_mult", F4),  # embeddings x this (Granite; Gemma sqrt(H))
    ("res_mult", F4),  # block outputs x this before the residual add (Granite)
    ("attn_scale", F4),  # softmax scale of q.k (1/sqrt(HD) unless the family says otherwise)
    ("logit_mult", F4),  # logits x this (1 / Granite's logits_scaling)
    ("attn_cap", F4),  # attention logit soft-cap, 0 = none
    ("final_cap", F4),  # final logit soft-cap, 0 = none
]

# linear kinds: the float formats, or the bits of a packed one
KIND_F32, KIND_F16, KIND_Q4, KIND_Q8 = 0, 1, 4, 8

# a layer's rotary table (LAYER.rope): none (NoPE layers), the global one, the local one (Gemma 3)
ROPE_NONE, ROPE_GLOBAL, ROPE_LOCAL = 0, 1, 2
ROPE_KINDS = {"none": ROPE_NONE, "global": ROPE_GLOBAL, "local": ROPE_LOCAL}

# ----------------------------------------------------------------------------- CPU (numba) layout
LINEAR = np.dtype(
    [
        ("kind", I8),  # KIND_*
        ("n", I8),  # output features
        ("k", I8),  # input features
        ("w_addr", I8),  # float (n, k), or packed uint8 (n, nb, block * bits / 8)
        ("s_addr", I8),  # fp16 scales (n * nb + 16 padding for 16-lane loads)
        ("z_addr", I8),  # float32 zero * scale (n, nb), asymmetric formats only
        ("b_addr", I8),  # float32 bias (n,)
        ("block", I8),  # columns per scale
        ("nb", I8),  # blocks per row
        ("row_bytes", I8),  # bytes of one weight row
        ("sym", I8),  # 1: symmetric (fixed zero point `zero`), 0: stored zero points
        ("zero", I8),  # the symmetric zero point, 2**(bits - 1)
    ],
    align=True,
)

LAYER = np.dtype(
    [
        ("qkv", LINEAR),  # (NH + 2 NKV) * HD <- H
        ("o", LINEAR),  # H <- NH * HD
        ("up", LINEAR),  # 2 I (gated: gate | up) or I <- H
        ("down", LINEAR),  # H <- I
        ("attn_norm_w", I8),  # float32 (H,), 0: no norm before attention (post-norm families)
        ("attn_norm_b", I8),  # float32 (H,), LayerNorm only
        ("mlp_norm_w", I8),
        ("mlp_norm_b", I8),
        ("attn_out_norm_w", I8),  # float32 (H,) on the attention output before the residual add, or 0
        ("mlp_out_norm_w", I8),  # float32 (H,) on the MLP output before the residual add, or 0
        ("q_norm_w", I8),  # float32 (qk_width,) RMSNorm of q (per head or over the projection), or 0
        ("k_norm_w", I8),
        ("qk_width", I8),  # columns one q/k norm spans: HD (per head) or NH*HD / NKV*HD (projection)
        ("window", I8),  # sliding-window size, 0 = full attention
        ("rope", I8),  # rotary table: ROPE_NONE, ROPE_GLOBAL, ROPE_LOCAL
        ("kv", I8),  # this layer's index in its KV array: the full-context one, or the rings (ring > 0)
        ("ring", I8),  # rows of its ring buffer (a sliding-window layer: position p in row p % ring), 0: full
    ],
    align=True,
)

MODEL = np.dtype(
    [
        ("embed", LINEAR),  # (V, H) table, float or packed
        ("head", LINEAR),  # V <- H (a copy of `embed` when tied)
        ("final_norm_w", I8),  # float32 (H,)
        ("final_norm_b", I8),
        ("positions_addr", I8),  # float32 (ctx, H) learned positions (gpt2), else 0
    ],
    align=True,
)

CONFIG = np.dtype(
    [
        ("hidden", I8),  # H
        ("intermediate", I8),  # I
        ("layers", I8),  # L
        ("heads", I8),  # NH
        ("kv_heads", I8),  # NKV
        ("head_dim", I8),  # HD
        ("ctx", I8),  # positions the KV cache holds
        ("layer_norm", I8),  # 1: LayerNorm with bias, 0: RMSNorm
        ("learned_pos", I8),  # 1: learned position table (gpt2), 0: rotary
        ("gated", I8),  # 1: gated MLP (gate | up), 0: plain GELU MLP
        ("gelu_gate", I8),  # gated: 1: GeGLU (tanh GELU of the gate, Gemma), 0: SwiGLU
        ("rope_dims", I8),  # leading dims of each head that rotate (HD, or fewer: partial rotary)
        ("act_cap", I8),  # bytes per token of int8 activations the widest linear needs
        ("block_cap", I8),  # blocks per token of the linear with the most blocks
        *SCALARS,
    ],
    align=True,
)


def record(dtype: np.dtype):
    """One zeroed record of `dtype`, fields readable and writable by name (`d.kind = 4`); numba
    reads the same fields in compiled code."""
    return np.zeros(1, dtype).view(np.recarray)[0]


def records(dtype: np.dtype, n: int) -> np.ndarray:
    """n zeroed records (a plain array numba compiles; write fields through `.view(np.recarray)`)."""
    return np.zeros(n, dtype)


# ----------------------------------------------------------------------------- CUDA layout
# runtime/cuda/kernels.py reads these from device arrays of records (numba's CUDA target compiles
# field loads; its simulator reads them as numpy records). The same field names as the CPU layout
# where the meaning is the same; weights live in five device arrays (kernels.Weights: wq, fw, sc,
# zs, pf), so a linear names offsets (`*_off`, in elements of that array; -1: absent) instead of
# addresses. Weights are stored transposed there (kernels.py: word j of row r at off + j*n + r).
CUDA_LINEAR = np.dtype(
    [
        ("kind", I8),  # KIND_F32 (float weights, held as fp16 on the device) | KIND_Q4 | KIND_Q8
        ("n", I8),  # output features
        ("k", I8),  # input features
        ("w_off", I8),  # packed codes in wq (uint32 words), or float weights in fw
        ("s_off", I8),  # fp16 scales in sc, (nb, n) transposed
        ("z_off", I8),  # float32 zero * scale in zs, (nb, n) transposed; -1: symmetric
        ("b_off", I8),  # float32 bias in pf; -1: none
        ("block", I8),  # columns per scale
        ("nb", I8),  # blocks per row
        ("words", I8),  # uint32 words of codes per row (nb * block * bits / 32)
        ("zero", I8),  # the symmetric zero point, 2**(bits - 1)
    ],
    align=True,
)

CUDA_LAYER = np.dtype(
    [
        ("qkv", CUDA_LINEAR),  # (NH + 2 NKV) * HD <- H
        ("o", CUDA_LINEAR),  # H <- NH * HD
        ("up", CUDA_LINEAR),  # 2 I (gated: gate | up) or I <- H
        ("down", CUDA_LINEAR),  # H <- I
        ("attn_norm_w", I8),  # offsets into pf: float32 (H,)
        ("attn_norm_b", I8),  # LayerNorm only; -1: none
        ("mlp_norm_w", I8),
        ("mlp_norm_b", I8),
        ("attn_out_norm_w", I8),  # float32 (H,) RMSNorm of the attention output before the residual add; -1: none
        ("mlp_out_norm_w", I8),  # float32 (H,) the same after the MLP (OLMo 2, Gemma 3); -1: none
        ("q_norm_w", I8),  # float32 (qk_width,) RMSNorm of q, per head or over the projection; -1: none
        ("k_norm_w", I8),
        ("qk_width", I8),  # columns one q/k norm spans: HD (per head) or NH*HD / NKV*HD (projection: OLMo 2)
        ("window", I8),  # sliding-window size, 0 = full attention
        ("rope", I8),  # rotary table: ROPE_NONE, ROPE_GLOBAL, ROPE_LOCAL (the tables' index + 1)
    ],
    align=True,
)

CUDA_MODEL = np.dtype(
    [
        ("embed", CUDA_LINEAR),  # (V, H) table, float or packed
        ("head", CUDA_LINEAR),  # V <- H (the same offsets as `embed` when tied: one copy on the GPU)
        ("final_norm_w", I8),  # offsets into pf
        ("final_norm_b", I8),  # -1: none
        ("positions_off", I8),  # float32 (ctx, H) learned positions in pf (gpt2); -1: rotary
    ],
    align=True,
)

CUDA_CONFIG = np.dtype(
    [
        ("hidden", I8),  # H
        ("intermediate", I8),  # I
        ("layers", I8),  # L
        ("heads", I8),  # NH
        ("kv_heads", I8),  # NKV
        ("head_dim", I8),  # HD
        ("vocab", I8),  # V
        ("ctx", I8),  # positions the KV cache holds
        ("layer_norm", I8),  # 1: LayerNorm with bias, 0: RMSNorm
        ("learned_pos", I8),  # 1: learned position table (gpt2), 0: rotary
        ("gated", I8),  # 1: gated MLP (gate | up), 0: plain GELU MLP
        ("gelu_gate", I8),  # gated: 1: GeGLU (tanh GELU of the gate, Gemma), 0: SwiGLU
        ("rope_dims", I8),  # leading dims of each head that rotate (HD, or fewer: partial rotary)
        *SCALARS,
    ],
    align=True,
)

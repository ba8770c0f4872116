"""The decode step: every layer of one token in ONE kernel launch (the hot loop).

numba's CUDA target has no CUDA-graph capture, so the step is fused instead: `decode_coop` is
a cooperative kernel (all blocks resident) that walks the phases below and meets at a grid-wide
barrier (`cuda.cg.this_grid().sync()`) between them; every phase is a grid-stride loop, so any
grid size is correct. Per layer, 6 phases (and 6 barriers):

    QKV   rms/layer norm fused into the GEMV input (each block recomputes the row statistics),
          fused q|k|v rows                                               -> qkv fp32
    ROPE  rotate q, k; write k, v into the fp16 cache                    -> KV cache
    ATTN  one block per head over the cache                              -> att fp16
    O     GEMV of att, residual add fused                                -> x += ...
    UP    norm fused into the GEMV input, fused gate|up rows             -> up fp32
    DOWN  SwiGLU (or GELU) fused into the GEMV input, residual add fused -> x += ...

plus EMBED before the layers and HEAD (final norm fused, logits) after them. Where a
cooperative launch is refused (a driver without it, a grid that cannot be resident),
`phase_kernel` runs the same phases as one launch each (model.py falls back to it and says so).
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32

from .layers import RED, attend, rope_kv, row_stats
from .linear import IN_GELU, IN_H16, IN_NORM, IN_SWIGLU, MAX_THREADS, OUT_ADD, OUT_SET, embed_row, gemv

# integer config (ci) of the step
C_H, C_I, C_L, C_NH, C_NKV, C_HD, C_V, C_LAYER, C_ROPE, C_GATED, C_WPE, C_FNW, C_FNB = range(13)
C_LEN = 13
R_QKV, R_O, R_UP, R_DOWN = range(4)  # linear roles: desc row l*4 + role; L*4 = embeddings, L*4 + 1 = head
N_LN1W, N_LN1B, N_LN2W, N_LN2B = range(4)  # norms[l]: offsets into pf (-1: none)
PH_EMBED, PH_QKV, PH_ROPE, PH_ATTN, PH_O, PH_UP, PH_DOWN, PH_HEAD = range(8)
LAYER_PHASES = (PH_QKV, PH_ROPE, PH_ATTN, PH_O, PH_UP, PH_DOWN)


@cuda.jit(device=True)
def run_phase(ph, l, row, tok, pos, eps, ci, desc, norms, window, wq, fw, sc, zs, pf, cos, sin, kc, vc,
              x, qkv, att, up, scores, logits, part, red):
    """Phase `ph` of layer `l` for one token at position `pos` (its residual row `row` of x)."""
    H, NH, NKV, HD, L = ci[C_H], ci[C_NH], ci[C_NKV], ci[C_HD], ci[C_L]
    layer = ci[C_LAYER]
    if ph == PH_EMBED:
        embed_row(desc[L * 4], wq, fw, sc, zs, pf, tok, row, pos, H, ci[C_WPE], x)
    elif ph == PH_QKV:
        mu, inv = row_stats(x, row, H, layer, eps, red)
        gemv(desc[l * 4 + R_QKV], wq, fw, sc, zs, pf, x, row, IN_NORM, 0, norms[l, N_LN1W], norms[l, N_LN1B], mu, inv,
             qkv, 0, OUT_SET, part)
    elif ph == PH_ROPE:
        rope_kv(qkv, 1, pos, l, NH, NKV, HD, ci[C_ROPE], cos, sin, kc, vc)
    elif ph == PH_ATTN:
        for item in range(cuda.blockIdx.x, NH, cuda.gridDim.x):
            attend(item, qkv, kc, vc, l, pos, NH, NKV, HD, window[l], scores, att, red)
    elif ph == PH_O:
        gemv(desc[l * 4 + R_O], wq, fw, sc, zs, pf, att, 0, IN_H16, 0, 0, -1, np.float32(0.0), np.float32(1.0), x, row, OUT_ADD, part)
    elif ph == PH_UP:
        mu, inv = row_stats(x, row, H, layer, eps, red)
        gemv(desc[l * 4 + R_UP], wq, fw, sc, zs, pf, x, row, IN_NORM, 0, norms[l, N_LN2W], norms[l, N_LN2B], mu, inv,
             up, 0, OUT_SET, part)
    elif ph == PH_DOWN:
        mode = IN_SWIGLU if ci[C_GATED] == 1 else IN_GELU
        gemv(desc[l * 4 + R_DOWN], wq, fw, sc, zs, pf, up, 0, mode, ci[C_I], 0, -1, np.float32(0.0), np.float32(1.0), x, row, OUT_ADD, part)
    else:  # PH_HEAD
        mu, inv = row_stats(x, row, H, layer, eps, red)
        gemv(desc[L * 4 + 1], wq, fw, sc, zs, pf, x, row, IN_NORM, 0, ci[C_FNW], ci[C_FNB], mu, inv, logits, 0, OUT_SET, part)


@cuda.jit
def decode_coop(tok, pos, eps, ci, desc, norms, window, wq, fw, sc, zs, pf, cos, sin, kc, vc, x, qkv, att, up, scores, logits):
    """One decode step, the whole model, one launch: logits[0] for token `tok` at `pos`."""
    part = cuda.shared.array(MAX_THREADS, float32)
    red = cuda.shared.array(RED, float32)
    grid = cuda.cg.this_grid()
    run_phase(PH_EMBED, 0, 0, tok, pos, eps, ci, desc, norms, window, wq, fw, sc, zs, pf, cos, sin, kc, vc, x, qkv, att, up,
              scores, logits, part, red)
    grid.sync()
    for l in range(ci[C_L]):
        for ph in range(PH_QKV, PH_DOWN + 1):
            run_phase(ph, l, 0, tok, pos, eps, ci, desc, norms, window, wq, fw, sc, zs, pf, cos, sin, kc, vc, x, qkv, att, up,
                      scores, logits, part, red)
            grid.sync()
    run_phase(PH_HEAD, 0, 0, tok, pos, eps, ci, desc, norms, window, wq, fw, sc, zs, pf, cos, sin, kc, vc, x, qkv, att, up,
              scores, logits, part, red)


@cuda.jit
def phase_kernel(ph, l, row, tok, pos, eps, ci, desc, norms, window, wq, fw, sc, zs, pf, cos, sin, kc, vc, x, qkv, att, up,
                 scores, logits):
    """One phase as a launch of its own (the fallback of decode_coop, and the prompt's head)."""
    part = cuda.shared.array(MAX_THREADS, float32)
    red = cuda.shared.array(RED, float32)
    run_phase(ph, l, row, tok, pos, eps, ci, desc, norms, window, wq, fw, sc, zs, pf, cos, sin, kc, vc, x, qkv, att, up,
              scores, logits, part, red)

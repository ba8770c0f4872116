"""GPTQ (Frantar et al., 2022): quantize one column at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the
layer's calibration inputs (the sweep itself is edgellm/hessian.py, shared with SparseGPT).

Options: damping (a fraction of mean(diag H) added to the diagonal), act-order (columns in
decreasing diag(H), i.e. most-activated inputs first), groups, and the clipping search: each
group's scale is the clipping range (100% .. 70% of its max) whose rounding error, weighted by
diag H, is smallest (formats.mse_group_params), instead of the plain max. With act-order the
groups' scales are fixed up front on contiguous column ranges ("static groups"), so the stored
layout stays plain contiguous groups that ONNX Runtime's MatMulNBits reads without a g_idx;
without act-order each group's scale is chosen when the sweep reaches it, from the updated
weights.
"""

from __future__ import annotations

import torch

from ..hessian import BLOCK, inverse_cholesky, lazy_sweep, permute_symmetric, prepare_hessian
from .formats import QuantFormat, group_params, mse_group_params, pad_columns

CLIP_ROWS = 512  # weight rows per step of the clipping search (its temporaries: ~8 x rows x in x 4 bytes)


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    fmt: QuantFormat,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    clip_search: bool = True,
    overwrite_h: bool = False,
):
    """W (out, in), H (in, in) -> codes (out, ng, gs) uint8, scales, zeros (out, ng).
    `overwrite_h`: H is a scratch fp32 copy the sweep may overwrite (saves two (in, in) copies)."""
    W = w.detach().float().clone()
    out_f, in_f = W.shape
    g = fmt.group_for(in_f)
    ng = fmt.padded(in_f) // g
    pruned = W == 0  # exact zeros (e.g. from `edgellm prune`) are quantized to exactly 0.0
    H, _ = prepare_hessian(W, H, damp, overwrite=overwrite_h)
    hdiag = pad_columns(torch.diag(H).unsqueeze(0), ng * g).reshape(ng, g)  # (ng, gs) column importance

    def params(wg: torch.Tensor, imp: torch.Tensor):  # wg (out, [ng,] gs) -> scales, zeros
        if not clip_search:
            return group_params(wg, fmt)
        # rows a chunk at a time: the search's temporaries are a few copies of what it is given
        found = [mse_group_params(wg[r : r + CLIP_ROWS], fmt, imp) for r in range(0, len(wg), CLIP_ROWS)]
        return torch.cat([s for s, _ in found]), torch.cat([z for _, z in found])

    scales = torch.empty(out_f, ng)
    zeros = torch.empty(out_f, ng)
    if act_order:  # static groups from the original weights, in natural column order
        scales, zeros = params(pad_columns(W, ng * g).reshape(out_f, ng, g), hdiag)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, pruned = W[:, perm], pruned[:, perm]
        H = permute_symmetric(H, perm)
    else:
        perm = torch.arange(in_f)
    U = inverse_cholesky(H, overwrite=True)  # H is this function's own (damped, permuted) copy now
    del H
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)

    def replace(j, W1, i, Wall):
        col = perm[j].item()
        grp = col // g
        if not act_order and col % g == 0:  # entering a new group: choose its parameters now
            i2 = j - i + W1.shape[1]
            ahead = torch.cat([W1[:, i:], Wall[:, i2:]], 1)[:, :g]  # the group's columns, updated so far
            s, z = params(pad_columns(ahead, g), hdiag[grp])
            scales[:, grp], zeros[:, grp] = s, z
        s, z = scales[:, grp], zeros[:, grp]
        if fmt.float_zero:  # no code decodes to exactly 0: pruned weights take the nearest one
            q = torch.clamp(torch.round(W1[:, i] / s + z), 0, fmt.maxq)
            q = torch.where(pruned[:, j], torch.clamp(torch.round(z), 0, fmt.maxq), q)
        else:
            q = torch.clamp(torch.round(W1[:, i] / s) + z, 0, fmt.maxq)
            q = torch.where(pruned[:, j], z, q)  # code z decodes to exactly 0; its error is compensated
        codes[:, col] = q.to(torch.uint8)
        return (q - z) * s

    lazy_sweep(W, U, replace, BLOCK)
    padded = torch.empty(out_f, ng * g, dtype=torch.uint8)
    pad_code = torch.clamp(torch.round(zeros), 0, fmt.maxq).to(torch.uint8)  # padding: 0.0 (nearest, float zeros)
    padded[:, in_f:] = pad_code.repeat_interleave(g, dim=1)[:, in_f:]
    padded[:, :in_f] = codes
    return padded.reshape(out_f, ng, g), scales, zeros

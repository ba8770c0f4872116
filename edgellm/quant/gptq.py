"""GPTQ (Frantar et al., 2022): quantize one column at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the
layer's calibration inputs.

Options: damping (a fraction of mean(diag H) added to the diagonal), act-order (columns in
decreasing diag(H), i.e. most-activated inputs first) and groups. With act-order the groups'
scales are fixed up front on contiguous column ranges ("static groups"), so the stored layout
stays plain contiguous groups that ONNX Runtime's MatMulNBits reads without a g_idx; without
act-order each group's scale is chosen when the sweep reaches it, from the updated weights.
"""

from __future__ import annotations

import torch

from .formats import QuantFormat, group_params, pad_columns

BLOCK = 128  # columns updated lazily together (the paper's batched "lazy" updates)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, fmt: QuantFormat, *, damp: float = 0.01,
                  act_order: bool = True):
    """W (out, in), H (in, in) -> codes (out, ng, gs) uint8, scales, zeros (out, ng)."""
    W = w.detach().float().clone()
    out_f, in_f = W.shape
    g = fmt.group_for(in_f)
    ng = fmt.padded(in_f) // g
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    pruned = W == 0  # exact zeros (e.g. from `edgellm prune`) are quantized to exactly 0.0

    scales = torch.empty(out_f, ng)
    zeros = torch.empty(out_f, ng)
    if act_order:  # static groups from the original weights, in natural column order
        wg = pad_columns(W, ng * g).reshape(out_f, ng, g)
        scales, zeros = group_params(wg, fmt)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        pruned = pruned[:, perm]
    else:
        perm = torch.arange(in_f)

    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    for i1 in range(0, in_f, BLOCK):
        i2 = min(i1 + BLOCK, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i].item()
            grp = col // g
            if not act_order and col % g == 0:  # entering a new group: choose its parameters now
                ahead = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :g]  # the group's columns, updated so far
                s, z = group_params(pad_columns(ahead, g), fmt)
                scales[:, grp], zeros[:, grp] = s, z
            s, z = scales[:, grp], zeros[:, grp]
            wcol = W1[:, i]
            q = torch.clamp(torch.round(wcol / s) + z, 0, fmt.maxq)
            q = torch.where(pruned[:, i1 + i], z, q)  # code z decodes to exactly 0; its error is compensated
            codes[:, col] = q.to(torch.uint8)
            deq = (q - z) * s
            err = (wcol - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    padded = torch.empty(out_f, ng * g, dtype=torch.uint8)
    padded[:, in_f:] = zeros.to(torch.uint8).repeat_interleave(g, dim=1)[:, in_f:]  # padding encodes 0.0
    padded[:, :in_f] = codes
    return padded.reshape(out_f, ng, g), scales, zeros

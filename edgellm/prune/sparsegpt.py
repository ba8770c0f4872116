"""SparseGPT (Frantar & Alistarh, 2023): prune one column at a time and update the remaining
weights to compensate, using the inverse Hessian H = 2 X^T X of the layer's calibration inputs
(optimal brain surgeon, made cheap by sweeping columns in order so one Cholesky factor serves all).

Per block of `blocksize` columns: choose the mask for the block by the OBS saliency
w^2 / [H^-1]_jj^2 (adaptive mask selection: later blocks see the updated weights), then for each
column zero the masked weights, and spread the error err = (w - q) / [H^-1]_jj over the
columns not yet visited through row j of the Cholesky factor of H^-1. N:M chooses the mask per
group of M columns when the sweep reaches the group, from the weights updated so far.
Damping: a fraction of mean(diag H) is added to the diagonal before inverting.
"""

from __future__ import annotations

import torch

from ..hessian import inverse_cholesky, lazy_sweep, prepare_hessian
from .masks import Pattern

BLOCK = 128  # columns whose mask is chosen together and whose updates are applied lazily


def sparsegpt_prune(
    w: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: Pattern | None = None,
    *,
    damp: float = 0.01,
    blocksize: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in), H (in, in) -> (pruned and updated W, mask of removed weights)."""
    W = w.detach().float().clone()
    out_f, in_f = W.shape
    H, dead = prepare_hessian(W, H, damp)  # dead inputs: never active on the calibration data, free to remove
    U = inverse_cholesky(H)

    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    if pattern is not None and blocksize % pattern.m:
        blocksize = pattern.m * max(1, blocksize // pattern.m)  # groups must not straddle blocks
    d_block: list[torch.Tensor] = []  # diag of the current block's U

    def start(i1, W1, U1):
        d = torch.diag(U1)  # (b,)
        d_block[:] = [d]
        if pattern is None:
            saliency = W1**2 / d.unsqueeze(0) ** 2  # (out, b)
            k = int(saliency.numel() * sparsity)
            if k:
                m1 = torch.zeros_like(W1, dtype=torch.bool)
                m1.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = True
                mask[:, i1 : i1 + W1.shape[1]] = m1

    def replace(j, W1, i, _W):
        if pattern is not None and i % pattern.m == 0:
            d = d_block[0]
            sal = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2  # (out, M)
            drop = torch.topk(sal, pattern.m - pattern.n, dim=1, largest=False).indices
            mask[:, j : j + pattern.m].scatter_(1, drop, True)
        col = W1[:, i]
        return torch.where(mask[:, j], torch.zeros_like(col), col)

    lazy_sweep(W, U, replace, blocksize, start)
    return W, mask | (W == 0) & dead.unsqueeze(0)

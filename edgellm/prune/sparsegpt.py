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

from .masks import Pattern

BLOCK = 128  # columns whose mask is chosen together and whose updates are applied lazily


def sparsegpt_prune(w: torch.Tensor, H: torch.Tensor, sparsity: float, pattern: Pattern | None = None, *,
                    damp: float = 0.01, blocksize: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in), H (in, in) -> (pruned and updated W, mask of removed weights)."""
    W = w.detach().float().clone()
    out_f, in_f = W.shape
    H = H.float().clone()
    dead = torch.diag(H) == 0  # inputs never active on the calibration data: free to remove
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    if pattern is not None and blocksize % pattern.m:
        blocksize = pattern.m * max(1, blocksize // pattern.m)  # groups must not straddle blocks
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # (b,)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern is None:
            saliency = W1**2 / d.unsqueeze(0) ** 2  # (out, b)
            k = int(saliency.numel() * sparsity)
            if k:
                mask1.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = True
        for i in range(i2 - i1):
            if pattern is not None and i % pattern.m == 0:
                sal = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2  # (out, M)
                drop = torch.topk(sal, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1[:, i : i + pattern.m].scatter_(1, drop, True)
            col = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, mask | (W == 0) & dead.unsqueeze(0)

"""The optimal-brain-surgeon machinery GPTQ and SparseGPT share (Frantar et al.).

Both sweep a weight matrix W (out, in) one input column at a time: the column is replaced
(rounded, or pruned) and its error err = (w - q) / [H^-1]_jj is spread over the columns not yet
visited through row j of the upper Cholesky factor U of H^-1 (H = 2 X^T X of the layer's
calibration inputs). Updates inside a block of columns are applied at once, those to the
columns after it lazily in one matrix product per block (the papers' "lazy batch" trick).
"""

from __future__ import annotations

from typing import Callable

import torch

BLOCK = 128  # columns updated together before the lazy update of the rest


def prepare_hessian(
    W: torch.Tensor, H: torch.Tensor, damp: float, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (diag H = 0) get H_jj = 1 and their W columns zeroed in place; then damping
    (`damp` x mean diag H on the diagonal). Returns (damped H (in, in), dead mask (in,)).
    `overwrite`: H (fp32) is the caller's scratch copy and is damped in place (no second (in, in)
    matrix: 127 MB at TinyLlama's 5632-wide down_proj)."""
    H = H.float() if overwrite else H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))  # = H + c * I exactly, without the (in, in) identity
    return H, dead


def permute_symmetric(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """H[perm][:, perm], written back into H (one (in, in) temporary instead of two)."""
    rows = H.index_select(0, perm)
    return torch.index_select(rows, 1, perm, out=H)


def inverse_cholesky(H: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """U, the upper Cholesky factor of H^-1 (in, in). `overwrite`: H is scratch and holds
    H^-1 afterwards; the factors reuse two buffers (2 (in, in) matrices at the peak, not 4)."""
    L = torch.linalg.cholesky(H)
    if not overwrite:
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    torch.cholesky_inverse(L, out=H)
    return torch.linalg.cholesky(H, upper=True, out=L)


# replace(j, W1, i, W) -> the new column (out,): j the global column, i its index in the block
# W1 (out, b) (updated so far), W the whole matrix (columns after the block not yet updated by it)
ReplaceFn = Callable[[int, torch.Tensor, int, torch.Tensor], torch.Tensor]
# start(i1, W1, U1) is called when a block begins (SparseGPT chooses the block's mask there)
StartFn = Callable[[int, torch.Tensor, torch.Tensor], None]


def lazy_sweep(
    W: torch.Tensor, U: torch.Tensor, replace: ReplaceFn, blocksize: int = BLOCK, start: StartFn | None = None
) -> torch.Tensor:
    """Sweep W (out, in) in place column by column with OBS error feedback; returns W."""
    in_f = W.shape[1]
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if start is not None:
            start(i1, W1, U1)
        for i in range(i2 - i1):
            col = W1[:, i].clone()
            q = replace(i1 + i, W1, i, W)
            err = (col - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W

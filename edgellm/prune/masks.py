"""Pruning masks from importance scores: unstructured and N:M, plus the checks that verify them.

A mask is a bool tensor shaped like the weight (out, in): True marks a weight to remove.

- magnitude: score |W|, compared across the whole layer (the classic per-layer baseline);
- wanda (Sun et al., 2023): score |W_ij| * ||x_j||, the weight times the norm of its input
  channel over the calibration tokens, compared within each output row (per-output comparison
  is what makes Wanda work on LLMs: rows have very different scales).
- N:M (e.g. 2:4, the pattern NVIDIA's sparse tensor cores run): at most N non-zeros in every M
  consecutive input weights of a row; the M - N lowest-scoring of each group are removed.

Counts are exact (top-k on indices, not a threshold), so ties never over- or under-prune.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EdgeLLMError


@dataclass(frozen=True)
class Pattern:
    """N:M semi-structured sparsity: at most `n` non-zeros in every `m` consecutive inputs."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(text: str) -> Pattern:
    """'2:4' -> Pattern(2, 4); anything else is a one-line EdgeLLMError."""
    n_s, sep, m_s = text.partition(":")
    try:
        n, m = int(n_s), int(m_s)
    except ValueError:
        n = m = -1
    if not sep or not 0 < n < m:
        raise EdgeLLMError(
            f"--pattern '{text}' is invalid; give N:M with 0 < N < M (N non-zeros kept in every M weights), e.g. 2:4"
        )
    return Pattern(n, m)


def check_sparsity(sparsity: float) -> float:
    if not 0 <= sparsity < 1:
        raise EdgeLLMError(f"--sparsity {sparsity} is outside [0, 1); give the fraction of weights to remove, e.g. 0.5")
    return float(sparsity)


def check_divides(pattern: Pattern, widths: dict[str, int]) -> None:
    """Every layer's input width must be a multiple of M (named layer in the error)."""
    for name, width in widths.items():
        if width % pattern.m:
            raise EdgeLLMError(
                f"--pattern {pattern} does not divide layer '{name}': its input width {width} is not a multiple of "
                f"{pattern.m}"
            )


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Remove the `sparsity` fraction of lowest scores, per output row or across the layer."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if per_row:
        k = int(score.shape[1] * sparsity)
        if k:
            mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    else:
        k = int(score.numel() * sparsity)
        if k:
            mask.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
    return mask


def nm_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Remove the M - N lowest scores in each group of M consecutive columns of each row."""
    out_f, in_f = score.shape
    groups = score.reshape(out_f, in_f // pattern.m, pattern.m)  # (out, in/M, M)
    drop = torch.topk(groups, pattern.m - pattern.n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(out_f, in_f)


def magnitude_score(w: torch.Tensor) -> torch.Tensor:
    return w.abs()


def wanda_score(w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """|W| * ||x_j|| with ||x_j||^2 = H_jj, H = X^T X of the layer's calibration inputs."""
    return w.abs() * torch.sqrt(torch.diag(H).clamp(min=0)).unsqueeze(0)  # (out, in)


def select_mask(score: torch.Tensor, sparsity: float, pattern: Pattern | None, per_row: bool) -> torch.Tensor:
    return nm_mask(score, pattern) if pattern is not None else unstructured_mask(score, sparsity, per_row)


def sparsity_of(w: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return 1 - torch.count_nonzero(w).item() / w.numel()


def follows_pattern(w: torch.Tensor, pattern: Pattern) -> bool:
    """True when every group of M consecutive inputs of every row has at most N non-zeros."""
    out_f, in_f = w.shape
    if in_f % pattern.m:
        return False
    nonzero = (w.reshape(out_f, in_f // pattern.m, pattern.m) != 0).sum(-1)  # (out, in/M)
    return bool((nonzero <= pattern.n).all())

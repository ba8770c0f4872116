"""Training batches: the training split packed into sequences, in an order fixed by seed + position.

The token stream's first 90% (edgellm.data's calibration split) is cut into non-overlapping
windows of `seq_len` tokens; the last 10% stays held out for perplexity. Window order is a
seeded permutation per epoch, and the sample at global position p is always
`perm(seed, p // n)[p % n]`, so a batch is a pure function of (seed, step, micro-step, rank):
resuming needs only the step number, and a 2-process run sees exactly the samples a 1-process
run with twice the batch sees.

Position of sample b of micro-step m of step s on rank r (W ranks, A micro-steps, B per rank):
    p = s·(A·W·B) + (m·W + r)·B + b
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..errors import EdgeLLMError


@dataclass
class PackedData:
    ids: object  # 1-D LongTensor: the training token stream
    seq_len: int
    seed: int = 0
    _perm_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.n_windows = len(self.ids) // self.seq_len
        if self.n_windows == 0:
            raise EdgeLLMError(
                f"the training split has {len(self.ids)} tokens, fewer than one sequence of --seq-len {self.seq_len}; "
                "give more text with --data or a smaller --seq-len"
            )

    def _perm(self, epoch: int):
        import torch

        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(self.n_windows, generator=g)}  # keep one epoch
        return self._perm_cache[epoch]

    def window(self, position: int):
        epoch, k = divmod(position, self.n_windows)
        start = int(self._perm(epoch)[k]) * self.seq_len
        return self.ids[start : start + self.seq_len]

    def batch(self, step: int, micro: int, *, batch_size: int, grad_accum: int, rank: int = 0, world: int = 1):
        """(batch_size, seq_len) token ids for one micro-step on one rank."""
        import torch

        base = step * grad_accum * world * batch_size + (micro * world + rank) * batch_size
        return torch.stack([self.window(base + b) for b in range(batch_size)])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()[:16]

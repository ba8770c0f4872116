"""The calibration pass shared by every data-aware compression method (GPTQ, AWQ, Wanda,
SparseGPT, structured pruning, the mixed-precision sensitivity pass).

GPTQ's "sequential" scheme: capture the inputs reaching decoder block 0 on the calibration
batch (`capture_block_inputs`); for each block, hook its linears and record their input
statistics (`collect_stats`: H = X^T X and, when asked, a sample of input rows), change the
block, then run it (`run_block`) to produce the next block's inputs, so later blocks are
calibrated on what the compressed model computes.
"""

from __future__ import annotations

import functools

import torch

from .arch import decoder_layers

MINI_BATCH = 4  # calibration sequences per forward pass

BlockInputs = list[tuple[torch.Tensor, dict]]  # (hidden (B, T, d), keyword arguments) per mini-batch


class _Stop(Exception):
    pass


def capture_block_inputs(model, calib: torch.Tensor, mini_batch: int = MINI_BATCH) -> BlockInputs:
    """Hidden states and keyword arguments reaching block 0, one entry per mini-batch of calib (n, T)."""
    first = decoder_layers(model)[0]
    captured = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hidden.detach(), kw))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(calib), mini_batch):
            try:
                model(input_ids=calib[i : i + mini_batch], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs on every captured mini-batch (the next block's inputs)."""
    outs = []
    for hidden, kw in inputs:
        out = block(hidden, **kw)
        outs.append(((out[0] if isinstance(out, tuple) else out).detach(), kw))
    return outs


class InputStats:
    """Accumulates H = X^T X (in, in), the row count n, and a sample of rows of one linear's input X."""

    def __init__(self, in_features: int, keep_rows: int):
        self.H = torch.zeros(in_features, in_features)
        self.n = 0
        self.keep_rows = keep_rows
        self.rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.H.addmm_(x.t(), x)  # in place: no (in, in) product beside H (822 MB at an 8B down_proj)
        self.n += x.shape[0]
        have = sum(r.shape[0] for r in self.rows)
        if have < self.keep_rows:
            step = max(1, x.shape[0] // max(1, (self.keep_rows // 4)))
            self.rows.append(x[::step][: self.keep_rows - have])

    @property
    def X(self) -> torch.Tensor:
        """The kept rows (k, in)."""
        return torch.cat(self.rows, 0)

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ/SparseGPT's H = 2 X^T X / n (in, in)."""
        return 2 * self.H / max(self.n, 1)


def collect_stats(block, inputs: BlockInputs, linears: dict, keep_rows: int = 0) -> dict[str, InputStats]:
    """Input statistics per linear; linears that read the same tensor (q/k/v, gate/up) share one."""
    stats: dict[str, InputStats] = {}
    seen: dict[int, tuple[torch.Tensor, InputStats]] = {}  # id(input) -> (input kept alive, stats)

    def hook(name, _module, args):
        x = args[0]
        if id(x) in seen:  # same tensor as a sibling linear: already accumulated for this call
            stats.setdefault(name, seen[id(x)][1])
            return
        st = stats.get(name) or InputStats(x.shape[-1], keep_rows)
        stats[name] = st
        st.add(x)
        seen[id(x)] = (x, st)

    handles = [m.register_forward_pre_hook(functools.partial(hook, name)) for name, m in linears.items()]
    try:
        for hidden, kw in inputs:
            seen.clear()
            block(hidden, **kw)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return stats

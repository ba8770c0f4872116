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
    return capture_layer_inputs(model, calib, mini_batch)[0]


class LayerKwargs:
    """The keyword arguments each decoder block receives, per captured forward: `table[j][i]` for
    entry j at block i. They differ by block where the family gives its layer types different masks
    and rotary tables (Gemma 3's sliding and global layers; Qwen3 / SmolLM3 with sliding layers), so
    a block is run with its own (`at`), never with block 0's."""

    def __init__(self, table: list[list[dict]]):
        self.table = table

    def at(self, states: BlockInputs, i: int) -> BlockInputs:
        """`states` (one per captured entry) with block i's keyword arguments."""
        return [(h, self.table[j][i]) for j, (h, _) in enumerate(states)]

    def __add__(self, other: LayerKwargs) -> LayerKwargs:
        return LayerKwargs(self.table + other.table)


def capture_layer_inputs(model, calib: torch.Tensor, mini_batch: int = MINI_BATCH) -> tuple[BlockInputs, LayerKwargs]:
    """(what reaches block 0 per mini-batch of calib (n, T), every block's keyword arguments), in one
    pass of the model's own forward with each block replaced by a recorder that returns its input
    (the blocks may be on the meta device: none of them runs); it stops at the final norm."""
    from .arch import family_of, get_path

    blocks = decoder_layers(model)
    norm = get_path(model, family_of(model.config).final_norm)
    captured, table = [], []

    def recorder(i):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == 0:
                captured.append((hidden.detach(), kw))
                table.append([])
            table[-1].append(kw)
            return hidden

        return forward

    def stop(_module, _args):
        raise _Stop

    for i, b in enumerate(blocks):
        b.forward = recorder(i)  # an instance attribute: the block's own attributes stay readable
    handle = norm.register_forward_pre_hook(stop)
    try:
        for i in range(0, len(calib), mini_batch):
            try:
                model(input_ids=calib[i : i + mini_batch], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for b in blocks:
            del b.forward
    return captured, LayerKwargs(table)


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

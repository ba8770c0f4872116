"""Structured pruning: remove whole decoder blocks, attention KV groups, or MLP channels, and
leave an ordinary smaller Hugging Face model (config updated, weights sliced).

Importance, measured on calibration data:
- layers: how little a block changes its input, 1 - cos(in, out) per token averaged
  ("block influence", ShortGPT): blocks that barely rotate the residual stream go first.
- heads: a KV group is one key/value head and the query heads that share it (grouped-query
  attention); its importance is the energy of its contribution to the residual stream,
  sum_h ||X_h W_o[:, h]^T||^2 = sum_h tr(W_o,h H_hh W_o,h^T) with H = X^T X of o_proj's input.
- mlp: channel j of the gated MLP writes x_j * W_down[:, j]; its importance is that
  contribution's energy, H_jj * ||W_down[:, j]||^2 with H = X^T X of down_proj's input.
The same number of groups/channels is removed from every block, so the config (one
num_key_value_heads, one intermediate_size) stays valid; which ones differ per block.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import decoder_layers
from ..errors import UnsupportedError

# Families whose blocks are Llama-shaped: self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj.
LLAMA_LIKE = ("llama", "mistral", "qwen2")
# The issue-25 families that slice the same way: per-head q/k norms (Qwen3, Gemma 3) have one
# weight per head dim, shared by the heads, so removing KV groups leaves them as they are.
HEADS = LLAMA_LIKE + ("qwen3", "smollm3", "granite", "gemma3_text")
MLP = HEADS + ("olmo2",)
REFUSED = {
    ("heads", "olmo2"): "its q/k RMSNorm spans the whole projection, so removing heads changes every kept head's "
    "normalization",
    ("heads", "phi3"): "its checkpoint fuses q, k and v into one projection",
    ("mlp", "phi3"): "its checkpoint fuses gate and up into one projection",
}


def check_supported(model, kind: str) -> None:
    mt = model.config.model_type
    families = {"heads": HEADS, "mlp": MLP}.get(kind)
    if families is not None and mt not in families:
        why = REFUSED.get((kind, mt), "its blocks are not Llama-shaped")
        raise UnsupportedError(
            f"--structured {kind} does not support '{mt}': {why} (supported: {', '.join(families)}); "
            "--structured layers works for every supported architecture"
        )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ----- layers -------------------------------------------------------------------------------


def block_influence(inputs, outputs) -> float:
    """Mean over tokens of 1 - cos(hidden in, hidden out)."""
    total, count = 0.0, 0
    for (x, _), (y, _) in zip(inputs, outputs):
        cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
        total += (1 - cos).sum().item()
        count += cos.numel()
    return total / max(count, 1)


def remove_layers(model, drop: list[int]) -> None:
    """Delete decoder blocks `drop`, renumber the rest, and update the config."""
    layers = decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, block in enumerate(kept):  # the KV cache is indexed by layer_idx
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    parent_path, _, leaf = _layers_path(model).rpartition(".")
    parent = model
    for part in parent_path.split("."):
        parent = getattr(parent, part)
    setattr(parent, leaf, kept)
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]


def _layers_path(model) -> str:
    from ..arch import family_of

    return family_of(model.config).layers


# ----- heads (KV groups) ----------------------------------------------------------------------


def group_importance(o_weight: torch.Tensor, H: torch.Tensor, n_heads: int, n_kv: int, hd: int) -> torch.Tensor:
    """Importance of each KV group from o_proj's weight (hidden, nh*hd) and input H -> (n_kv,)."""
    contrib = ((o_weight.float() @ H) * o_weight.float()).sum(0)  # (nh*hd,): per input column of o_proj
    per_head = contrib.reshape(n_heads, hd).sum(-1)  # (nh,)
    return per_head.reshape(n_kv, n_heads // n_kv).sum(-1)  # query heads of a group are contiguous


def remove_kv_groups(attn, keep: torch.Tensor, n_heads: int, n_kv: int, hd: int) -> None:
    """Slice q/k/v rows and o columns of one attention module down to the KV groups `keep`."""
    rep = n_heads // n_kv
    kv_idx = (keep.unsqueeze(1) * hd + torch.arange(hd)).flatten()  # rows of k/v
    q_heads = (keep.unsqueeze(1) * rep + torch.arange(rep)).flatten()
    q_idx = (q_heads.unsqueeze(1) * hd + torch.arange(hd)).flatten()  # rows of q, columns of o
    attn.q_proj = _slice_linear(attn.q_proj, rows=q_idx)
    attn.k_proj = _slice_linear(attn.k_proj, rows=kv_idx)
    attn.v_proj = _slice_linear(attn.v_proj, rows=kv_idx)
    attn.o_proj = _slice_linear(attn.o_proj, cols=q_idx)


def set_head_config(config, n_heads: int, n_kv: int, hd: int) -> None:
    config.head_dim = hd  # explicit: hidden_size // num_attention_heads no longer holds
    config.num_attention_heads = n_heads
    config.num_key_value_heads = n_kv


# ----- MLP channels ---------------------------------------------------------------------------


def channel_importance(down_weight: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """H_jj * ||W_down[:, j]||^2 -> (intermediate,)."""
    return torch.diag(H) * (down_weight.float() ** 2).sum(0)


def remove_channels(mlp, keep: torch.Tensor) -> None:
    mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=keep)
    mlp.up_proj = _slice_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = _slice_linear(mlp.down_proj, cols=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


# ----- helpers --------------------------------------------------------------------------------


def lowest(scores: torch.Tensor, n_remove: int) -> tuple[torch.Tensor, list[int]]:
    """(indices kept in their original order, indices removed) for the n_remove lowest scores."""
    order = torch.argsort(scores)
    removed = sorted(order[:n_remove].tolist())
    keep = torch.tensor(sorted(order[n_remove:].tolist()), dtype=torch.long)
    return keep, removed


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data[rows] if rows is not None else lin.bias.data)
    return new

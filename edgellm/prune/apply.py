"""Prune a whole model, one decoder block at a time (the calibration pass of edgellm/calibration.py).

Unstructured / N:M: capture block 0's inputs on the calibration batch; for each block, record
every linear's H = X^T X, prune its linears (magnitude needs no data), then run the pruned
block to produce the next block's inputs, so later blocks are pruned on what the pruned model
computes (as SparseGPT and Wanda do). Token embeddings, norms and lm_head are never pruned.

Structured: the same driver ranks layers, KV groups or MLP channels (see structured.py) and
slices the model down; the result is an ordinary, smaller transformers model.

Pruned weights are exact zeros in a dense fp32 tensor: unstructured sparsity saves nothing in
a dense runtime (same bytes, same FLOPs) until the weights are compressed or run by a sparse
kernel; structured pruning shrinks the matrices and so turns into measured speed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..arch import block_linears, decoder_layers, family_of, linear_weight, set_linear_weight
from ..calibration import capture_layer_inputs, collect_stats, run_block
from ..errors import EdgeLLMError
from ..progress import NULL
from . import structured as st
from .masks import Pattern, check_divides, magnitude_score, select_mask, sparsity_of, wanda_score
from .sparsegpt import sparsegpt_prune

METHODS = ("magnitude", "wanda", "sparsegpt")
STRUCTURED = ("layers", "heads", "mlp")


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float = 0.5  # fraction of each linear's weights removed (1 - N/M under a pattern)
    pattern: Pattern | None = None  # N:M semi-structured (e.g. 2:4) instead of unstructured
    damp: float = 0.01  # SparseGPT: fraction of mean(diag H) added to H's diagonal
    blocksize: int = 128  # SparseGPT: columns per lazy-update / mask-selection block

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pattern"] = str(self.pattern) if self.pattern else None
        if self.method != "sparsegpt":
            d.pop("damp"), d.pop("blocksize")
        return d


def linear_widths(model) -> dict[str, int]:
    """Input width of every prunable linear, by its path in the model."""
    layers_path = family_of(model.config).layers
    return {
        f"{layers_path}.{bi}.{name}": linear_weight(m).shape[1]
        for bi, block in enumerate(decoder_layers(model))
        for name, m in block_linears(block).items()
    }


def check_unstructured(model, cfg: PruneConfig) -> None:
    if cfg.method not in METHODS:
        raise EdgeLLMError(f"unknown pruning method '{cfg.method}'; choose one of {', '.join(METHODS)}")
    if cfg.pattern is not None:
        check_divides(cfg.pattern, linear_widths(model))


def prune_unstructured(model, cfg: PruneConfig, calib: torch.Tensor | None, progress=NULL) -> tuple[list[dict], dict]:
    """Prune `model`'s decoder linears in place. Returns a per-linear report and a summary."""
    check_unstructured(model, cfg)
    blocks = decoder_layers(model)
    layers_path = family_of(model.config).layers
    needs_data = cfg.method != "magnitude"
    if needs_data and calib is None:
        raise EdgeLLMError(f"--method {cfg.method} needs calibration data")
    report = []
    with torch.no_grad():
        inputs, layer_kw = capture_layer_inputs(model, calib) if needs_data else (None, None)
        for bi in progress.track(range(len(blocks)), label(cfg), total=len(blocks)):
            if needs_data:
                inputs = layer_kw.at(inputs, bi)  # this block's own mask and rotary table
            report += prune_block(blocks[bi], f"{layers_path}.{bi}", bi, inputs, cfg)
            if needs_data and bi + 1 < len(blocks):
                inputs = run_block(blocks[bi], inputs)
    return report, summary(cfg, report)


def label(cfg: PruneConfig) -> str:
    return f"{cfg.method} {cfg.pattern or f'{cfg.sparsity:.0%}'}"


def prune_block(block, prefix: str, bi: int, inputs, cfg: PruneConfig) -> list[dict]:
    """Prune one decoder block's linears in place (`inputs`: what reaches it, for Wanda and
    SparseGPT); the per-linear report. The resident and the layer-streaming prune both call it."""
    linears = block_linears(block)
    stats = collect_stats(block, inputs, linears, 0) if cfg.method != "magnitude" else {}
    report = []
    for name, lin in linears.items():
        t0 = time.perf_counter()
        w = linear_weight(lin).detach().float()  # (out, in)
        if cfg.method == "sparsegpt":
            H = stats[name].hessian
            new, _ = sparsegpt_prune(w, H, cfg.sparsity, cfg.pattern, damp=cfg.damp, blocksize=cfg.blocksize)
        else:
            score = magnitude_score(w) if cfg.method == "magnitude" else wanda_score(w, stats[name].H)
            mask = select_mask(score, cfg.sparsity, cfg.pattern, per_row=cfg.method == "wanda")
            new = w.masked_fill(mask, 0.0)
        set_linear_weight(lin, new.to(lin.weight.dtype))
        report.append(
            {
                "block": bi,
                "layer": f"{prefix}.{name}",
                "shape": list(w.shape),
                "sparsity": round(sparsity_of(new), 6),
                "time_s": round(time.perf_counter() - t0, 4),
            }
        )
    return report


def summary(cfg: PruneConfig, report: list[dict]) -> dict:
    total = sum(r["shape"][0] * r["shape"][1] for r in report)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in report)
    return {
        **cfg.to_dict(),
        "linears": len(report),
        "sparsity_reached": round(zeros / max(total, 1), 6),
        "pruned_weights": int(round(zeros)),
        "prunable_weights": total,
    }


# ----- structured ---------------------------------------------------------------------------


def plan_structured(model, kind: str, ratio: float) -> dict:
    """How many layers / KV groups / channels `ratio` removes; refuses to remove none or all."""
    if kind not in STRUCTURED:
        raise EdgeLLMError(f"unknown structured pruning '{kind}'; choose one of {', '.join(STRUCTURED)}")
    if not 0 < ratio < 1:
        raise EdgeLLMError(f"--ratio {ratio} is outside (0, 1); give the fraction of {kind} to remove, e.g. 0.25")
    st.check_supported(model, kind)
    cfg = model.config
    total, unit = {
        "layers": (len(decoder_layers(model)), "layers"),
        "heads": (getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", 0), "KV groups"),
        "mlp": (getattr(cfg, "intermediate_size", 0), "MLP channels"),
    }[kind]
    n_remove = int(round(ratio * total))
    if n_remove >= total:
        raise EdgeLLMError(
            f"--ratio {ratio} would remove every one of the model's {total} {unit}; give a smaller ratio"
        )
    if n_remove == 0:
        raise EdgeLLMError(
            f"--ratio {ratio} removes none of the model's {total} {unit} ({ratio} x {total} rounds to 0); give a "
            "larger ratio"
        )
    return {"kind": kind, "ratio": ratio, "unit": unit, "total": total, "remove": n_remove, "keep": total - n_remove}


CONFIG_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")


def config_view(cfg) -> dict:
    """The config fields structured pruning may change."""
    return {k: getattr(cfg, k, None) for k in CONFIG_KEYS}


def config_changes(before: dict, cfg) -> dict:
    after = config_view(cfg)
    return {k: [before[k], after[k]] for k in before if before[k] != after[k]}


def head_dims(cfg) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of the config."""
    return (
        cfg.num_attention_heads,
        getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        st.head_dim(cfg),
    )


def choose_layers(scores: list[float], plan: dict) -> list[int]:
    """The blocks to remove (the lowest block influence, measured on the unpruned flow); records
    them and the scores in `plan`."""
    _, removed = st.lowest(torch.tensor(scores), plan["remove"])
    plan.update(removed=removed, scores=[round(s, 6) for s in scores])
    return removed


def prune_structured_block(block, kind: str, inputs, n_remove: int, dims: tuple[int, int, int]) -> list[int]:
    """Rank one block's KV groups ("heads") or MLP channels ("mlp") on `inputs` (what reaches it) and
    slice the `n_remove` least important away in place; the removed indices. The resident and the
    layer-streaming structured prune both call it."""
    if kind == "heads":
        attn = block.self_attn
        H = collect_stats(block, inputs, {"o": attn.o_proj}, 0)["o"].H
        keep, removed = st.lowest(st.group_importance(attn.o_proj.weight, H, *dims), n_remove)
        st.remove_kv_groups(attn, keep, *dims)
    else:
        mlp = block.mlp
        H = collect_stats(block, inputs, {"down": mlp.down_proj}, 0)["down"].H
        keep, removed = st.lowest(st.channel_importance(mlp.down_proj.weight, H), n_remove)
        st.remove_channels(mlp, keep)
    return removed


def set_structured_config(cfg, kind: str, plan: dict, dims: tuple[int, int, int]) -> None:
    """The config after removing plan["remove"] KV groups or MLP channels from every block."""
    n_heads, n_kv, hd = dims
    if kind == "heads":
        kv = n_kv - plan["remove"]
        st.set_head_config(cfg, kv * (n_heads // n_kv), kv, hd)
    else:
        cfg.intermediate_size = plan["keep"]


def prune_structured(model, kind: str, ratio: float, calib: torch.Tensor, progress=NULL) -> dict:
    """Remove `ratio` of the model's layers / KV groups / MLP channels in place. Returns the plan,
    what was removed (per block), and the config changes. Layers are ranked on the unpruned model's
    flow; KV groups and channels block by block on the flow of the already-pruned blocks."""
    plan = plan_structured(model, kind, ratio)
    cfg = model.config
    before = config_view(cfg)
    with torch.no_grad():
        inputs, layer_kw = capture_layer_inputs(model, calib)
        blocks = decoder_layers(model)
        if kind == "layers":
            scores = []
            for bi in progress.track(range(len(blocks)), "scoring layers", total=len(blocks)):
                inputs = layer_kw.at(inputs, bi)
                outputs = run_block(blocks[bi], inputs)
                scores.append(st.block_influence(inputs, outputs))
                inputs = outputs
            st.remove_layers(model, choose_layers(scores, plan))
        else:
            removed_per_block, dims = [], head_dims(cfg)
            for bi in progress.track(range(len(blocks)), f"pruning {plan['unit']}", total=len(blocks)):
                inputs = layer_kw.at(inputs, bi)
                removed_per_block.append(prune_structured_block(blocks[bi], kind, inputs, plan["remove"], dims))
                if bi + 1 < len(blocks):
                    inputs = run_block(blocks[bi], inputs)
            set_structured_config(cfg, kind, plan, dims)
            plan["removed"] = removed_per_block
    plan["config"] = config_changes(before, cfg)
    return plan

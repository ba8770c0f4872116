"""Apply a quantization method to a whole model, one decoder block at a time, and store it.

The driver (GPTQ's "sequential" scheme): capture the inputs of block 0 on the calibration
batch; for each block, record every linear's input statistics (H = X^T X, and activation
samples for AWQ), quantize the block's linears, then run the quantized block to produce the
next block's inputs, so later blocks are calibrated on what the quantized model computes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..arch import block_linears, decoder_layers, family_of, get_path, is_linear, linear_weight, set_linear_weight
from .awq import apply_clip, search_clip, search_scales
from .formats import QuantFormat, quantize_rtn
from .gptq import gptq_quantize
from .modules import QuantEmbedding, QuantLinear, TiedQuantLinear

METHODS = ("rtn", "gptq", "awq")
AWQ_SAMPLE_ROWS = 2048  # activation rows kept per linear for AWQ's searches
CLIP_SAMPLE_ROWS = 512
MINI_BATCH = 4  # calibration sequences per forward pass
RTN_ERROR_SAMPLES = 4  # RTN needs no calibration; these sequences only measure each layer's error


@dataclass
class QuantConfig:
    fmt: QuantFormat
    method: str = "gptq"
    damp: float = 0.01  # GPTQ: fraction of mean(diag H) added to H's diagonal
    act_order: bool = True  # GPTQ: quantize most-activated input columns first
    quantize_embeddings: bool = False  # also 4/8-bit the token embeddings and lm_head (RTN)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("fmt"))
        return d


class _Stop(Exception):
    pass


def _capture_block_inputs(model, calib: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments reaching block 0, one entry per mini-batch."""
    first = decoder_layers(model)[0]
    captured = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hidden.detach(), kw))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(calib), MINI_BATCH):
            try:
                model(input_ids=calib[i : i + MINI_BATCH], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block, inputs):
    outs = []
    for hidden, kw in inputs:
        out = block(hidden, **kw)
        outs.append(((out[0] if isinstance(out, tuple) else out).detach(), kw))
    return outs


class _InputStats:
    """Accumulates H = X^T X and a sample of rows of one linear's input X."""

    def __init__(self, in_features: int, keep_rows: int):
        self.H = torch.zeros(in_features, in_features)
        self.n = 0
        self.keep_rows = keep_rows
        self.rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.H += x.t() @ x
        self.n += x.shape[0]
        have = sum(r.shape[0] for r in self.rows)
        if have < self.keep_rows:
            step = max(1, x.shape[0] // max(1, (self.keep_rows // 4)))
            self.rows.append(x[::step][: self.keep_rows - have])

    @property
    def X(self) -> torch.Tensor:
        return torch.cat(self.rows, 0)


def _collect(block, inputs, linears: dict, keep_rows: int) -> dict[str, _InputStats]:
    """Input statistics per linear; linears that read the same tensor (q/k/v, gate/up) share one."""
    stats: dict[str, _InputStats] = {}
    seen: dict[int, tuple[torch.Tensor, _InputStats]] = {}  # id(input) -> (input kept alive, stats)

    def hook(name, _module, args):
        x = args[0]
        if id(x) in seen:  # same tensor as a sibling linear: already accumulated for this call
            stats.setdefault(name, seen[id(x)][1])
            return
        st = stats.get(name) or _InputStats(x.shape[-1], keep_rows)
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


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, leaf, new)


def _awq_fold(block, family, stats: dict[str, _InputStats], fmt: QuantFormat) -> None:
    """Scale search per group, folded into the producing module (function unchanged)."""
    for prev_name, targets in family.scale_groups:
        prev = get_path(block, prev_name)
        mods = [get_path(block, t) for t in targets]
        in_f = linear_weight(mods[0]).shape[1]
        out_prev = linear_weight(prev).shape[0] if is_linear(prev) else prev.weight.shape[0]
        if out_prev != in_f:  # e.g. v_proj -> o_proj under grouped-query attention
            continue
        s = search_scales(stats[targets[0]].X, [linear_weight(m) for m in mods], fmt)  # (in,)
        with torch.no_grad():
            if is_linear(prev):
                set_linear_weight(prev, linear_weight(prev) / s.unsqueeze(1))
                if prev.bias is not None:
                    prev.bias.div_(s)
            else:  # a norm: its output is weight * normalized (+ bias)
                prev.weight.div_(s)
                if getattr(prev, "bias", None) is not None:
                    prev.bias.div_(s)
            for m in mods:
                set_linear_weight(m, linear_weight(m) * s.unsqueeze(0))
        for st in {id(stats[t]): stats[t] for t in targets}.values():  # shared stats: rescale once
            st.H = st.H / s.unsqueeze(0) / s.unsqueeze(1)
            st.rows = [r / s for r in st.rows]


def _rel_error(w: torch.Tensor, deq: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - Wq) X||^2 / ||W X||^2 from H = X^T X."""
    d = (w - deq).float()
    num = torch.einsum("oi,ij,oj->", d, H, d)
    den = torch.einsum("oi,ij,oj->", w.float(), H, w.float())
    return (num / den.clamp(min=1e-12)).item()


def quantize_model(model, cfg: QuantConfig, calib: torch.Tensor, progress=None) -> tuple[list[dict], dict]:
    """Quantize `model` in place on calibration batch (n, T). Returns per-layer report, info."""
    from ..progress import NULL

    progress = progress or NULL
    fmt = cfg.fmt
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}")
    report, names = [], []
    blocks = decoder_layers(model)
    family = family_of(model.config)
    keep = AWQ_SAMPLE_ROWS if cfg.method == "awq" else 0
    if cfg.method == "rtn":
        calib = calib[:RTN_ERROR_SAMPLES]
    with torch.no_grad():
        inputs = _capture_block_inputs(model, calib)
        for bi in progress.track(range(len(blocks)), f"{cfg.method} {fmt.bits}-bit", total=len(blocks)):
            block = blocks[bi]
            linears = block_linears(block)
            stats = _collect(block, inputs, linears, keep)
            if cfg.method == "awq":
                _awq_fold(block, family, stats, fmt)
            for name, lin in linears.items():
                t0 = time.perf_counter()
                w_ref = linear_weight(lin).detach().float()  # (out, in); after AWQ's exact rescaling
                H = stats[name].H
                if cfg.method == "gptq":
                    codes, scales, zeros = gptq_quantize(w_ref, 2 * H / max(stats[name].n, 1), fmt, damp=cfg.damp, act_order=cfg.act_order)
                else:
                    w = w_ref
                    if cfg.method == "awq" and name not in family.clip_skip:
                        rows = stats[name].X
                        rows = rows[torch.linspace(0, len(rows) - 1, min(CLIP_SAMPLE_ROWS, len(rows))).long()]
                        w = apply_clip(w, search_clip(rows, w, fmt), fmt)
                    codes, scales, zeros = quantize_rtn(w, fmt)
                q = QuantLinear(w_ref.shape[1], w_ref.shape[0], lin.bias is not None, fmt)
                q.set_codes(codes, scales, zeros)
                if lin.bias is not None:
                    q.bias.data.copy_(lin.bias.data)
                path = f"{family.layers}.{bi}.{name}"
                report.append({"layer": path, "shape": list(w_ref.shape), "rel_error": _rel_error(w_ref, q.dequantize(), H),
                               "time_s": time.perf_counter() - t0})
                _replace(block, name, q)
                names.append(path)
            inputs = _run_block(block, inputs)
        if cfg.quantize_embeddings:
            _quantize_embeddings(model, fmt, names)
    info = {**cfg.to_dict(), "modules": names, "embeddings": cfg.quantize_embeddings, "tied": _tied(model)}
    return report, info


def _tied(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _quantize_embeddings(model, fmt: QuantFormat, names: list[str]) -> None:
    emb = model.get_input_embeddings()
    qe = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, fmt)
    qe.set_codes(*quantize_rtn(emb.weight.detach(), fmt))
    model.set_input_embeddings(qe)
    if _tied(model):
        model.lm_head = TiedQuantLinear(qe)
    else:
        head = model.lm_head
        qh = QuantLinear(head.in_features, head.out_features, head.bias is not None, fmt)
        qh.set_codes(*quantize_rtn(head.weight.detach(), fmt))
        if head.bias is not None:
            qh.bias.data.copy_(head.bias.data)
        model.lm_head = qh


def _swap_for_loading(model, info: dict, dtype) -> None:
    fmt = QuantFormat(bits=info["bits"], group_size=info["group_size"], sym=info["sym"])
    for path in info["modules"]:
        lin = get_path(model, path)
        w = linear_weight(lin)
        _replace(model, path, QuantLinear(w.shape[1], w.shape[0], lin.bias is not None, fmt))
    if info.get("embeddings"):
        emb = model.get_input_embeddings()
        qe = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, fmt)
        model.set_input_embeddings(qe)
        if info.get("tied"):
            model.lm_head = TiedQuantLinear(qe)
        else:
            head = model.lm_head
            model.lm_head = QuantLinear(head.in_features, head.out_features, head.bias is not None, fmt)


def save_quantized(model, out_dir) -> None:
    from safetensors.torch import save_model

    model.config.save_pretrained(str(out_dir))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out_dir))
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt", "edgellm": "packed"})


def load_quantized(path, config, info: dict, dtype):
    """Rebuild the architecture, swap in packed modules, fill them from safetensors."""
    import transformers
    from safetensors.torch import load_model

    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    _swap_for_loading(model, info, dtype)
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        from ..errors import EdgeLLMError

        raise EdgeLLMError(f"a quantized edgellm model has one model.safetensors; '{path}' has {len(files)}")
    missing, unexpected = load_model(model, str(files[0]), strict=False)
    missing = [k for k in missing if not k.startswith("lm_head.") or not info.get("tied")]
    if missing or unexpected:
        from ..errors import EdgeLLMError

        raise EdgeLLMError(f"'{files[0]}' does not match its edgellm.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model

"""Apply a quantization method to a whole model, one decoder block at a time, and store it.

The driver is the shared calibration pass (edgellm/calibration.py): capture the inputs of
block 0 on the calibration batch; for each block, record every linear's input statistics
(H = X^T X, and activation samples for AWQ), quantize the block's linears, then run the
quantized block to produce the next block's inputs, so later blocks are calibrated on what the
quantized model computes.

Before it, optionally: rotation of the residual stream (rotation.py) and a per-linear plan of
formats (mixed.py, `--target-bpw`). After it, the token embeddings / lm_head (RTN with the
clipping search; 8-bit by default for 4-bit models, the tied matrix stored once).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..arch import block_linears, decoder_layers, family_of, get_path, is_linear, linear_weight, set_linear_weight
from ..calibration import InputStats, capture_layer_inputs, collect_stats, run_block
from ..errors import EdgeLLMError
from .awq import apply_clip, search_clip, search_scales
from .formats import QuantFormat, mse_group_params, pad_columns, quantize_codes, quantize_rtn
from .gptq import gptq_quantize
from .modules import PackedMatrix, QuantEmbedding, QuantLinear, TiedQuantLinear

METHODS = ("rtn", "gptq", "awq")
EMBEDDINGS = ("8", "4", "keep")
AWQ_SAMPLE_ROWS = 2048  # activation rows kept per linear for AWQ's searches
CLIP_SAMPLE_ROWS = 512
RTN_ERROR_SAMPLES = 4  # RTN needs no calibration; these sequences only measure each layer's error


@dataclass
class QuantConfig:
    fmt: QuantFormat
    method: str = "gptq"
    damp: float = 0.01  # GPTQ: fraction of mean(diag H) added to H's diagonal
    act_order: bool = True  # GPTQ: quantize most-activated input columns first
    clip_search: bool = True  # GPTQ: per-group clipping range minimising diag(H)-weighted error
    quantize_embeddings: bool = False  # legacy switch: embeddings in `fmt` (when `embeddings` is None)
    embeddings: str | None = None  # "8", "4" or "keep" (None: quantize_embeddings decides)
    rotate: bool = False  # rotate the residual stream first (rotation.py)
    seed: int = 0  # rotation's random signs / orthogonal factor
    plan: dict[str, QuantFormat] = field(default_factory=dict)  # per-linear formats; default fmt otherwise
    target_bpw: float | None = None  # plan the formats to this budget first (mixed.py)
    plan_sym: bool | None = None  # the plan's candidates: symmetric only, asymmetric only, or both (None)

    def __post_init__(self):
        if self.embeddings is not None and self.embeddings not in EMBEDDINGS:
            raise EdgeLLMError(f"--embeddings {self.embeddings!r} is invalid; choose one of {', '.join(EMBEDDINGS)}")
        if self.embeddings == "4" and self.fmt.bits == 8:
            raise EdgeLLMError(
                "--embeddings 4 with --bits 8 would store the most sensitive tensor below the rest; "
                "use --embeddings 8 or keep"
            )

    @property
    def embeddings_mode(self) -> str:
        if self.embeddings is not None:
            return self.embeddings
        return str(self.fmt.bits) if self.quantize_embeddings else "keep"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("fmt"))
        d.pop("quantize_embeddings")
        d["embeddings"] = self.embeddings_mode
        d["plan"] = bool(self.plan)
        return d


def embedding_format(bits: int, dim: int, sym: bool = True) -> QuantFormat:
    """Embeddings' format: groups of the largest power of two <= 128 (8 bits) or <= 32 (4 bits)
    dividing the width (576 -> 64 / 32), so no row is padded; 8-bit like llama.cpp's Q8_0 default
    for token_embd. 4-bit groups of 32 as in Q4_0: the tied lm_head's rounding error lands on the
    logits directly, and on SmolLM2-135M (RTN linears 4-bit g32, 4,088 tokens, 2026-12-01) 4-bit
    g64 embeddings measured perplexity 16.17 where g32 gave 13.19 (9.86 in fp32)."""
    return QuantFormat(bits=bits, group_size=128 if bits >= 8 else 32, sym=sym).fitted(dim)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, leaf, new)


def _awq_fold(block, family, stats: dict[str, InputStats], fmt: QuantFormat) -> None:
    """Scale search per group, folded into the producing module (function unchanged)."""
    for prev_name, targets in family.scale_groups:
        prev = get_path(block, prev_name)
        mods = [get_path(block, t) for t in targets]
        in_f = linear_weight(mods[0]).shape[1]
        out_prev = linear_weight(prev).shape[0] if is_linear(prev) else prev.weight.shape[0]
        if out_prev != in_f:  # e.g. v_proj -> o_proj under grouped-query attention
            continue
        s = search_scales(stats[targets[0]].X, [linear_weight(m) for m in mods], fmt.fitted(in_f))  # (in,)
        with torch.no_grad():
            if is_linear(prev):
                set_linear_weight(prev, linear_weight(prev) / s.unsqueeze(1))
                if prev.bias is not None:
                    prev.bias.div_(s)
            else:  # a norm: its output is (offset + weight) * normalized (+ bias); Gemma's offset is 1
                off = family.norm_offset
                prev.weight.add_(off).div_(s).sub_(off)
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


def quantize_block(block, prefix: str, inputs, cfg: QuantConfig, family) -> tuple[list[dict], dict]:
    """Quantize one decoder block in place on its calibration inputs (the one implementation
    both the resident and the layer-streaming drivers call). Returns its report rows and the
    formats that differ from the default."""
    fmt = cfg.fmt
    keep = AWQ_SAMPLE_ROWS if cfg.method == "awq" else 0
    report, formats = [], {}
    linears = block_linears(block)
    stats = collect_stats(block, inputs, linears, keep)
    if cfg.method == "awq":
        _awq_fold(block, family, stats, fmt)
    last_user = {id(st): name for name, st in stats.items()}  # q/k/v (and gate/up) share one
    for name in list(linears):
        lin = linears.pop(name)  # the fp32 original goes as soon as its packed twin replaces it
        path = f"{prefix}.{name}"
        w_ref = linear_weight(lin).detach().float()  # (out, in); after AWQ's exact rescaling
        lfmt = cfg.plan.get(path) or fmt.fitted(w_ref.shape[1])
        t0 = time.perf_counter()
        H = stats[name].H
        if cfg.method == "gptq":
            codes, scales, zeros = gptq_quantize(
                w_ref,
                stats[name].hessian,
                lfmt,
                damp=cfg.damp,
                act_order=cfg.act_order,
                clip_search=cfg.clip_search,
                overwrite_h=True,  # `hessian` is a fresh copy each call
            )
        else:
            w = w_ref
            if cfg.method == "awq" and name not in family.clip_skip:
                rows = stats[name].X
                rows = rows[torch.linspace(0, len(rows) - 1, min(CLIP_SAMPLE_ROWS, len(rows))).long()]
                w = apply_clip(w, search_clip(rows, w, lfmt), lfmt)
            codes, scales, zeros = quantize_rtn(w, lfmt)
            del w
        q = QuantLinear(w_ref.shape[1], w_ref.shape[0], lin.bias is not None, lfmt)
        q.set_codes(codes, scales, zeros)
        if lin.bias is not None:
            q.bias.data.copy_(lin.bias.data)
        report.append(
            {
                "layer": path,
                "shape": list(w_ref.shape),
                "bits": lfmt.bits,
                "group_size": lfmt.group_size,
                "sym": lfmt.sym,
                "zero": lfmt.zero,
                "rel_error": _rel_error(w_ref, q.dequantize(), H),
                "time_s": time.perf_counter() - t0,
                "bytes": packed_bytes(q),
            }
        )
        _replace(block, name, q)
        del w_ref, lin, H, codes, scales, zeros
        if last_user[id(stats[name])] == name:  # its statistics are done: free them before the next linear
            stats[name].H, stats[name].rows = None, []
        if cfg.plan or lfmt != fmt:
            formats[path] = {"bits": lfmt.bits, "group_size": lfmt.group_size, "sym": lfmt.sym}
            if lfmt.float_zero:
                formats[path]["zero"] = "float"
    return report, formats


def quantize_model(model, cfg: QuantConfig, calib: torch.Tensor, progress=None) -> tuple[list[dict], dict]:
    """Quantize `model` in place on calibration batch (n, T). Returns per-layer report, info."""
    from ..progress import NULL

    progress = progress or NULL
    fmt = cfg.fmt
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}")
    rotation = None
    if cfg.rotate:
        from .rotation import rotate_model

        rotation = rotate_model(model, cfg.seed)
    plan_info = None
    if cfg.target_bpw is not None:
        from .mixed import plan_formats

        with torch.no_grad():
            cfg.plan, plan_info = plan_formats(model, calib, cfg.target_bpw, cfg.plan_sym, progress)
    report, names, formats = [], [], {}
    blocks = decoder_layers(model)
    family = family_of(model.config)
    if cfg.method == "rtn":
        calib = calib[:RTN_ERROR_SAMPLES]
    with torch.no_grad():
        inputs, layer_kw = capture_layer_inputs(model, calib)
        for bi in progress.track(range(len(blocks)), f"{cfg.method} {fmt.bits}-bit", total=len(blocks)):
            block = blocks[bi]
            inputs = layer_kw.at(inputs, bi)  # this block's mask and rotary table (Gemma 3: by layer type)
            rows, fmts = quantize_block(block, f"{family.layers}.{bi}", inputs, cfg, family)
            report += rows
            names += [r["layer"] for r in rows]
            formats.update(fmts)
            inputs = run_block(block, inputs)
        emb_fmt = None
        if cfg.embeddings_mode != "keep":
            bits = int(cfg.embeddings_mode)
            emb_fmt = (  # integer zero points: ONNX's GatherBlockQuantized has no float ones
                replace(fmt, zero="int")
                if cfg.embeddings is None
                else embedding_format(bits, model.get_input_embeddings().embedding_dim)
            )
            _quantize_embeddings(model, emb_fmt)
    info = {
        **cfg.to_dict(),
        "modules": names,
        "embeddings": emb_fmt.to_dict() if emb_fmt else False,
        "tied": _tied(model),
    }
    if formats:
        info["formats"] = formats
    if rotation:
        info["rotation"] = rotation
    if plan_info:
        info["mixed"] = plan_info
    info["bits_per_weight"] = round(bits_per_weight(model), 4)
    return report, info


def bits_per_weight(model) -> float:
    """Bytes of the decoder blocks' quantized linears (codes, scales, zero points) x 8 / their
    parameter count (the issue's definition; padding of a last partial group counts)."""
    nbytes = params = 0
    for block in decoder_layers(model):
        for m in block.modules():
            if isinstance(m, PackedMatrix):
                nbytes += packed_bytes(m)
                params += m.out_features * m.in_features
    return 8 * nbytes / max(params, 1)


def packed_bytes(m: PackedMatrix) -> int:
    return (
        m.qweight.numel()
        + 2 * m.scales.numel()
        + (0 if m.qzeros is None else m.qzeros.numel() * m.qzeros.element_size())
    )


def _tied(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _rtn_clipped(w: torch.Tensor, fmt: QuantFormat):
    """RTN with each group's clipping range chosen by the MSE search: (out, in) -> codes, scales, zeros."""
    out_f, in_f = w.shape
    g = fmt.group_for(in_f)
    wg = pad_columns(w.float(), fmt.padded(in_f)).reshape(out_f, -1, g)
    codes, scales, zeros = [], [], []
    for r in range(0, out_f, 4096):  # row chunks bound the search's temporaries on big vocabularies
        s, z = mse_group_params(wg[r : r + 4096], fmt)
        codes.append(quantize_codes(wg[r : r + 4096], s, z, fmt.maxq, fmt.float_zero))
        scales.append(s)
        zeros.append(z)
    return torch.cat(codes), torch.cat(scales), torch.cat(zeros)


def _embedding_codes(w: torch.Tensor, fmt: QuantFormat):
    """Embedding/lm_head rows -> codes, scales, zeros. 8-bit: RTN with the MSE clipping search.
    Below 8 bits plain min/max RTN: clipping a tied lm_head's largest weights moves the top logits
    (SmolLM2-135M, 4-bit g32 embeddings: perplexity 13.94 with the search, 13.19 without)."""
    if fmt.bits >= 8:
        return _rtn_clipped(w, fmt)
    return quantize_rtn(w, fmt)


def _quantize_embeddings(model, fmt: QuantFormat) -> None:
    emb = model.get_input_embeddings()
    qe = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, fmt, getattr(emb, "scalar_embed_scale", 1.0))
    qe.set_codes(*_embedding_codes(emb.weight.detach(), fmt))
    model.set_input_embeddings(qe)
    if _tied(model):
        model.lm_head = TiedQuantLinear(qe)
    else:
        head = model.lm_head
        qh = QuantLinear(head.in_features, head.out_features, head.bias is not None, fmt)
        qh.set_codes(*_embedding_codes(head.weight.detach(), fmt))
        if head.bias is not None:
            qh.bias.data.copy_(head.bias.data)
        model.lm_head = qh


def _embedding_format_of(info: dict, fmt: QuantFormat) -> QuantFormat | None:
    e = info.get("embeddings")
    if not e:
        return None
    if e is True:  # edgellm.json written before per-tensor embedding formats
        return fmt
    return QuantFormat(e["bits"], e["group_size"], e["sym"], e.get("zero", "int"))


def swap_for_loading(model, info: dict, dtype) -> None:
    fmt = QuantFormat(info["bits"], info["group_size"], info["sym"], info.get("zero", "int"))
    formats = info.get("formats") or {}
    for path in info["modules"]:
        lin = get_path(model, path)
        w = linear_weight(lin)
        f = formats.get(path)
        lfmt = (
            fmt if f is None else QuantFormat(f["bits"], f["group_size"], f.get("sym", fmt.sym), f.get("zero", "int"))
        )
        _replace(model, path, QuantLinear(w.shape[1], w.shape[0], lin.bias is not None, lfmt))
    efmt = _embedding_format_of(info, fmt)
    if efmt is not None:
        emb = model.get_input_embeddings()
        qe = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, efmt, getattr(emb, "scalar_embed_scale", 1.0))
        model.set_input_embeddings(qe)
        if info.get("tied"):
            model.lm_head = TiedQuantLinear(qe)
        else:
            head = model.lm_head
            model.lm_head = QuantLinear(head.in_features, head.out_features, head.bias is not None, efmt)


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
    swap_for_loading(model, info, dtype)
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        from ..errors import EdgeLLMError

        raise EdgeLLMError(f"a quantized edgellm model has one model.safetensors; '{path}' has {len(files)}")
    missing, unexpected = load_model(model, str(files[0]), strict=False)
    missing = [k for k in missing if not k.startswith("lm_head.") or not info.get("tied")]
    if missing or unexpected:
        from ..errors import EdgeLLMError

        raise EdgeLLMError(
            f"'{files[0]}' does not match its edgellm.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model

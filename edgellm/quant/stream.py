"""Layer-streaming quantize: a checkpoint far larger than memory, one decoder layer at a time.

The model is never materialized. A meta-device skeleton (no memory) gives the modules; the
checkpoint (edgellm/checkpoint.py) gives each tensor, in its stored dtype, when it is needed:

1. the embeddings (and an untied lm_head) are quantized in row chunks and written out;
2. the calibration batch and the evaluation windows are embedded and captured at block 0
   (`capture_block_inputs` on the skeleton: the embedding and rotary table are real, block 0 is
   never run);
3. per block: its weights are read and widened to fp32, the evaluation's "before" states go
   through the original block, its linears are quantized by `apply.quantize_block` (the same
   code the resident driver calls), the calibration and "after" states go through the quantized
   block, its packed tensors are written to a part file, and the block is dropped. Hessians
   live inside `quantize_block`, for one block;
4. the final norm and head score the "before" and "after" states (perplexity as
   evaluate.evaluate computes it), and the parts are joined into one model.safetensors.

Activations are stored in fp32 when the plan fits the budget with them, otherwise bf16 (fp32
compute either way). After every block the work folder (`.NAME.partial` beside the output)
holds the parts and the states reaching the next block, so `--resume` continues from there;
its `state.json` records the options, and a resume with other options is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import decoder_layers, family_of, get_path, stream_refusal
from ..calibration import MINI_BATCH, capture_layer_inputs
from ..errors import EdgeLLMError
from ..memory import human, peak_rss, return_large_blocks, rss, trim
from ..progress import duration
from ..skeleton import final_logits
from . import rotation
from .apply import QuantConfig, _embedding_codes, _tied, embedding_format, quantize_block
from .formats import QuantFormat, dequantize_codes
from .mixed import SENS_SAMPLES, SENS_TOKENS
from .modules import QuantEmbedding, QuantLinear
from .packing import pack, unpack

ROW_CHUNK = 4096  # embedding / head rows quantized or multiplied at a time
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8", torch.int64: "I64"}
_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8}


def not_streamed(config, cfg: QuantConfig) -> str | None:
    """What in this request the streaming path does not do yet (None: it streams). Every family
    but those whose description says why not (arch.Family.stream_refusal), every method, --rotate
    (quant/stream_rotate.py) and --target-bpw (quant/mixed_stream.py) stream."""
    return stream_refusal(config)


def part_names(model) -> dict[str, str]:
    """The checkpoint prefixes of the parts outside the blocks, read off the skeleton (the family's
    own module names): "embedding", "norm" and "head" (the head's own matrix, when untied)."""
    from ..skeleton import module_names

    names = module_names(model)
    return {
        "embedding": names[id(model.get_input_embeddings())],
        "norm": family_of(model.config).final_norm,
        "head": names[id(model.get_output_embeddings())],
    }


# ---- the plan --------------------------------------------------------------------------------


@dataclass
class StreamPlan:
    need: int  # bytes at the peak stage
    parts: dict  # stage -> bytes
    act_dtype: torch.dtype
    budget: int
    spill: bool = False  # --target-bpw: the sensitivity pass's probe streams kept on disk, not in memory

    def describe(self) -> str:
        return ", ".join(f"{k} {human(v)}" for k, v in self.parts.items())


OVERHEAD = 1.10  # allocator slack and torch's own buffers over the tensors counted (measured; see _layer_peak)


def _layer_linears(ckpt, prefix: str, family) -> list[tuple[str, int, int, str]]:
    """(name, out, in, statistics key) of one block's linears in forward order, as the family
    describes them (Family.linears: q, k, v, o, gate, up, down; Phi-3's fused qkv_proj and
    gate_up_proj). The linears of one role read one input and share its statistics."""
    order = [m for _, mods in family.linears for m in mods]
    shared = {m: role for role, mods in family.linears if len(mods) > 1 for m in mods}
    found = []
    for n in ckpt.entries:
        path = n[len(prefix) : -len(".weight")] if n.endswith(".weight") else ""
        if n.startswith(prefix) and len(ckpt.shape(n)) == 2:
            out_f, in_f = ckpt.shape(n)
            found.append((path, n, out_f, in_f, shared.get(path, n)))
    found.sort(key=lambda t: order.index(t[0]) if t[0] in order else len(order))
    return [t[1:] for t in found]


def _layer_peak(linears, params: int, method: str) -> dict:
    """Bytes the layer's own tensors reach in quantize_block, the highest of: the statistics pass (the
    fp32 block and every input's H = X^T X, accumulated in place) and each linear's turn (the
    fp32 weights not packed yet, the statistics still to be used, GPTQ's scratch H and its
    Cholesky factor, ~3 weight-sized temporaries of the rounding / error measure)."""
    stats = {}
    for _, _, in_f, key in linears:
        stats[key] = 4 * in_f * in_f
    collect = 4 * params + sum(stats.values())
    turn = 0
    for j, (_, out_f, in_f, _) in enumerate(linears):
        fp32 = 4 * params - sum(4 * o * i for _, o, i, _ in linears[:j])
        alive = sum(stats[k] for k in {key for _, _, _, key in linears[j:]})
        scratch = 2 * 4 * in_f * in_f if method == "gptq" else 0
        turn = max(turn, fp32 + alive + scratch + 3 * 4 * out_f * in_f)
    return {"statistics pass": collect, "quantizing": turn}


def plan_stream(config, ckpt, cfg: QuantConfig, n_calib: int, seq_len: int, eval_tokens: int, budget: int):
    """The memory each stage needs (bytes), with the activation dtype chosen to fit `budget`;
    refuses (EdgeLLMError naming the need) when one layer does not fit. `eval_tokens`: 0 when
    there is no before/after evaluation."""
    from ..evaluate import DEFAULT_CTX

    d, i_f, V = config.hidden_size, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    family = family_of(config)
    prefix = f"{family.layers}.0."
    layer = [n for n in ckpt.entries if n.startswith(prefix)]
    params = sum(math.prod(ckpt.shape(n)) for n in layer)
    linears = _layer_linears(ckpt, prefix, family)
    n_all = n_calib  # the sensitivity pass reads the first SENS_SAMPLES of every calibration sequence
    if cfg.method == "rtn":
        from .apply import RTN_ERROR_SAMPLES

        n_calib = min(n_calib, RTN_ERROR_SAMPLES)
    B = min(MINI_BATCH, n_calib)
    forward = 4 * B * seq_len * (3 * i_f + 6 * d) + 2 * 4 * B * heads * seq_len * seq_len
    ctx = min(DEFAULT_CTX, eval_tokens) if eval_tokens else 0
    if ctx:
        forward = max(forward, 4 * ctx * (3 * i_f + 6 * d) + 2 * 4 * heads * ctx * ctx)
    evals = 4 * 2 * eval_tokens * d  # "before" and "after" states, fp32
    tied = _tied_config(config) and not cfg.rotate  # the rotation stores an untied head
    emb_bits = 8 if cfg.embeddings_mode == "keep" else int(cfg.embeddings_mode)
    packed_emb = (1 if tied else 2) * (V * d * emb_bits // 8 + V * (d // 32) * 3)
    from ..checkpoint import meta_model

    stored_emb = ckpt.stored_bytes(part_names(meta_model(config))["embedding"] + ".weight")
    base = rss()
    # --rotate: Q (float64) resident throughout; each rotated chunk of ROT_CHUNK rows (or columns)
    # passes through ~24 bytes per element (float64 copy, scaled copy, product, fp32 result)
    rot_q = 8 * d * d if cfg.rotate else 0
    rot_tmp = 24 * rotation.ROT_CHUNK * d if cfg.rotate else 0  # read at call time (tests shrink it)
    lookup = 4 * d * min(V, n_all * seq_len + eval_tokens) if cfg.rotate else 0
    if cfg.rotate and cfg.embeddings_mode == "keep":
        packed_emb = 0  # the rotated fp32 rows go to disk a chunk at a time
    largest = max(o * i for _, o, i, _ in linears)

    def stages(act_bytes, spill):
        acts = n_calib * seq_len * d * act_bytes
        moving = 2 * acts + 2 * evals  # a pass keeps its inputs while it writes its outputs
        layer_parts = _layer_peak(linears, params, cfg.method)
        if cfg.rotate:
            layer_parts["rotating"] = 4 * params + rot_tmp
        p = {
            "process": base + rot_q,
            "layer": max(layer_parts.values()),
            "activations": moving + forward,
            "embeddings": packed_emb + max(6 * 4 * ROW_CHUNK * d, rot_tmp) + lookup,
            "capture": stored_emb + packed_emb + lookup + 4 * n_calib * seq_len * d + 2 * evals,
            "head": packed_emb + 3 * 4 * ctx * V + evals if ctx else 0,
        }
        if cfg.target_bpw is not None:
            # mixed_stream: the reference state in and out, one probe stream per unit started so far
            # (all of them by the last block) or two in flight when spilled; a unit's saved weights
            # and _fake's temporaries (~8 weight-sized); at the end the embedding the capture used
            # (stored, or the rotated rows), the fp32 head, and 7 (B, T, V) fp32 arrays: the reference
            # log-probabilities and, per stream, _kl's logits, log-softmax, exp, difference and product
            # (measured: TinyLlama shape, 1.89 GB peak here against a plan of 1.68 GB with 4)
            Bs, Ts = min(SENS_SAMPLES, n_all), min(SENS_TOKENS, seq_len)
            st = 4 * Bs * Ts * d
            streams = 2 * st if spill else 4 * config.num_hidden_layers * st
            fwd = 4 * Bs * Ts * (3 * i_f + 6 * d) + 2 * 4 * Bs * heads * Ts * Ts
            p["sensitivity"] = 4 * params + max(rot_tmp, 4 * 2 * largest + 8 * 4 * largest) + streams + 2 * st + fwd
            held = lookup if cfg.rotate else stored_emb
            p["sensitivity head"] = held + 4 * V * d + streams + st + 7 * 4 * Bs * Ts * V
        return p

    def need(p):
        stage = max(
            p["layer"] + p["activations"],
            p["embeddings"],
            p["capture"],
            p["head"],
            p.get("sensitivity", 0),
            p.get("sensitivity head", 0),
        )
        return p["process"] + int(OVERHEAD * stage)

    for dtype, nbytes, spill in ((torch.float32, 4, False), (torch.float32, 4, True), (torch.bfloat16, 2, False)):
        p = stages(nbytes, spill)
        if need(p) <= budget:
            return StreamPlan(need(p), p, dtype, budget, spill)
    dtype, p = torch.bfloat16, stages(2, True)
    if need(p) <= budget:
        return StreamPlan(need(p), p, dtype, budget, True)
    raise EdgeLLMError(
        f"quantizing one decoder layer needs about {human(need(p))} ({StreamPlan(0, p, dtype, 0).describe()}), "
        f"more than the budget of {human(budget)}; raise --max-memory or lower --calib-samples / --seq-len"
    )


# ---- the work folder ---------------------------------------------------------------------------


def fingerprint(ckpt, cfg: QuantConfig, calib: torch.Tensor, eval_ids, act_dtype) -> dict:
    """What a resumed run must share with the interrupted one."""

    def sha(t):
        return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16] if t is not None else None

    return {
        "options": cfg.to_dict(),
        "calibration": [list(calib.shape), sha(calib)],
        "evaluation": None if eval_ids is None else [len(eval_ids), sha(eval_ids)],
        "activations": str(act_dtype).replace("torch.", ""),
        "source": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in ckpt.files],
    }


def work_dir(output: Path) -> Path:
    output = Path(os.path.abspath(output))
    return output.with_name(f".{output.name}.partial")


def open_work(work: Path, finger: dict, resume: bool) -> dict:
    """The state to continue from ({} for a fresh start); refuses a resume made with other options."""
    state_file = work / "state.json"
    if resume and state_file.is_file():
        state = json.loads(state_file.read_text())
        old = state.get("fingerprint", {})
        if old != finger:
            what = next((k for k in finger if old.get(k) != finger[k]), "options")
            raise EdgeLLMError(
                f"--resume: the interrupted quantize in '{work}' was made with other {what}; "
                "rerun with its options, or without --resume to start over"
            )
        return state
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return {}


def save_atomic(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def join_safetensors(parts: list[Path], out: Path, metadata: dict) -> None:
    """One safetensors file holding every tensor of `parts`, copied a tensor at a time."""
    from ..checkpoint import read_header

    entries, offset = [], 0
    for p in parts:
        header, start = read_header(p)
        for name, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = v["data_offsets"]
            entries.append((name, v["dtype"], v["shape"], p, start + a, b - a, offset))
            offset += b - a
    header = {"__metadata__": metadata}
    for name, dt, shape, _, _, n, off in entries:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out, "wb") as fo:
        fo.write(len(raw).to_bytes(8, "little"))
        fo.write(raw)
        for _, _, _, p, start, n, _ in entries:
            with open(p, "rb") as fi:
                fi.seek(start)
                while n:
                    chunk = fi.read(min(n, 64 << 20))
                    fo.write(chunk)
                    n -= len(chunk)


# ---- modules built from the checkpoint ---------------------------------------------------------


class StoredEmbedding(nn.Module):
    """A lookup into the embedding in its stored dtype, widened to fp32 per row (exactly the
    values an fp32 nn.Embedding of the same checkpoint holds), times the family's embedding scale
    when its embedding module has one (Gemma 3: the fp32 `embed_scale` it multiplies by)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.scale = weight, scale

    def forward(self, ids):  # (...) -> (..., dim)
        rows = self.weight[ids].float()
        return rows if self.scale is None else rows * self.scale


def fill_rows(module, r: int, w: torch.Tensor) -> None:
    """Rows [r, r + len(w)) of a PackedMatrix quantized from fp32 rows w (chunk, in)."""
    fmt = module.fmt
    codes, scales, zeros = _embedding_codes(w, fmt)
    module.qweight[r : r + len(w)] = pack(codes, fmt.bits)
    module.scales[r : r + len(w)] = scales.half()
    if module.qzeros is not None:
        module.qzeros[r : r + len(w)] = zeros.to(module.qzeros.dtype)


def _quantize_rows(ckpt, name: str, fmt: QuantFormat, module):
    """Fill a PackedMatrix from checkpoint tensor `name`, ROW_CHUNK rows at a time."""
    rows = ckpt.shape(name)[0]
    for r in range(0, rows, ROW_CHUNK):
        fill_rows(module, r, ckpt.rows(name, r, min(r + ROW_CHUNK, rows)).float())
    return module


def packed_rows(m, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of a PackedMatrix, dequantized to fp32."""
    if r0 == 0 and r1 == m.out_features:
        return m.dequantize()
    codes = unpack(m.qweight[r0:r1], m.fmt.bits)
    w = dequantize_codes(codes, m.scales[r0:r1], m.zeros_or_sym(torch.arange(r0, r1)))
    return w.reshape(r1 - r0, -1)[:, : m.in_features]


def head_logits(h: torch.Tensor, rows, V: int) -> torch.Tensor:
    """h (T, d) @ W.T with W's rows fetched ROW_CHUNK at a time by rows(r0, r1) -> (T, V)."""
    if V <= ROW_CHUNK:
        return F.linear(h, rows(0, V))
    return torch.cat([F.linear(h, rows(r, min(r + ROW_CHUNK, V))) for r in range(0, V, ROW_CHUNK)], -1)


def window_nll(logits: torch.Tensor, x: torch.Tensor, first: int) -> tuple[float, int]:
    """Summed negative log-likelihood of x[first+1:] under logits (T, V), as evaluate.evaluate scores it."""
    logp = F.log_softmax(logits[first:-1], dim=-1)
    target = x[first + 1 :]
    return -logp.gather(-1, target.unsqueeze(-1)).sum().item(), target.numel()


# ---- the driver ----------------------------------------------------------------------------------


def _note(progress, message: str) -> None:
    note = getattr(progress, "note", None)
    if note is not None:
        note(message)


def _shell(config, embedding: nn.Module | None = None):
    """The model on the meta device with its computed buffers real (skeleton.skeleton_model): with
    a real embedding set in, enough to capture what reaches every block (the blocks are
    materialized one at a time later)."""
    from ..skeleton import skeleton_model

    model = skeleton_model(config).eval()
    if embedding is not None:
        model.set_input_embeddings(embedding)
    return model


def _capture(shell, calib, windows):
    """(calibration inputs per mini-batch, their per-block kwargs, evaluation inputs per window,
    theirs) reaching block 0 (calibration.LayerKwargs: each block gets its own mask and rotary table)."""
    inputs, kw_calib = capture_layer_inputs(shell, calib)
    evals, kw_evals = [], None
    for x, _ in windows or []:
        (e,), kw = capture_layer_inputs(shell, x.unsqueeze(0), 1)
        evals.append(e)
        kw_evals = kw if kw_evals is None else kw_evals + kw
    return inputs, kw_calib, evals, kw_evals


def _load_block(shell, bi: int, ckpt, prefix: str):
    """Block `bi` materialized in fp32 from the checkpoint (stored dtype widened exactly)."""
    block = decoder_layers(shell)[bi].to_empty(device="cpu")
    with torch.no_grad():
        for k, t in block.state_dict(keep_vars=True).items():
            t.copy_(ckpt.get(f"{prefix}.{k}"))
    return block


def _run(block, states, dtype):
    """The block on every (hidden, kwargs), fp32 compute, outputs stored as `dtype`."""
    outs = []
    for hidden, kw in states:
        out = block(hidden.float(), **kw)
        outs.append(((out[0] if isinstance(out, tuple) else out).detach().to(dtype), kw))
    return outs


class _AsFloat:
    """Iterates (hidden widened to fp32, kwargs) without keeping the widened copies."""

    def __init__(self, states):
        self.states = states

    def __iter__(self):
        return ((h.float(), kw) for h, kw in self.states)


def quantize_streamed(
    ckpt,
    config,
    cfg: QuantConfig,
    calib: torch.Tensor,
    windows: list | None,
    work: Path,
    plan: StreamPlan,
    state: dict,
    finger: dict,
    progress=None,
):
    """Quantize the checkpoint into `work` one block at a time (continuing from `state`).
    `windows`: [(ids (T,), first scored position)] to score before and after, or None.
    With cfg.rotate each block is rotated as it is loaded (and the embedding and head as they are
    read: stream_rotate.py); with cfg.target_bpw a streamed sensitivity pass (mixed_stream.py)
    plans the formats first (cfg.plan is set, as quantize_model sets it).
    Returns (report, info, before, after, part files); before/after are (nll, tokens) or None."""
    from ..progress import NULL
    from . import stream_rotate as sr

    progress = progress or NULL
    return_large_blocks()
    family = family_of(config)
    n_layers = config.num_hidden_layers
    tied_in = _tied_config(config)
    rot = cfg.rotate
    tied = tied_in and not rot  # the rotation unties a tied head (rotation.py)
    dt = plan.act_dtype
    full_calib = calib
    if cfg.method == "rtn":
        from .apply import RTN_ERROR_SAMPLES

        calib = calib[:RTN_ERROR_SAMPLES]
    shell = _shell(config)
    names = part_names(shell)
    emb_pre, head_pre = names["embedding"], names["head"]
    emb_name, head_name, norm_name = f"{emb_pre}.weight", f"{head_pre}.weight", f"{names['norm']}.weight"
    head_src = sr.head_source(ckpt) if rot else head_name if not tied_in else emb_name
    emb_module = shell.get_input_embeddings()
    emb_scale = getattr(emb_module, "scalar_embed_scale", 1.0)  # Gemma 3: sqrt(hidden), as the resident path
    V, d = ckpt.shape(emb_name)
    Q = None
    if rot:
        from .rotation import rotation_matrix

        Q = rotation_matrix(d, cfg.seed)  # (d, d) float64
    sens_x = None
    if cfg.target_bpw is not None:
        from .mixed import check_tokens

        sens_x = check_tokens(full_calib)
    emb_fmt = None
    if cfg.embeddings_mode != "keep":
        # as apply.quantize_model: integer zero points (ONNX's GatherBlockQuantized has no float ones)
        bits = int(cfg.embeddings_mode)
        emb_fmt = replace(cfg.fmt, zero="int") if cfg.embeddings is None else embedding_format(bits, d)
    resumed = bool(state)
    with torch.no_grad():
        # 1. embeddings and head, quantized in row chunks (or kept in fp32 as the resident path keeps them);
        #    rotated as they are read with --rotate
        head_part = work / "embeddings.safetensors"
        lookup_part = work / "lookup.safetensors"
        qe = qh = lookup = None
        t0 = time.perf_counter()
        if rot:
            if resumed and head_part.is_file() and lookup_part.is_file():
                lookup = sr.load_lookup(lookup_part, V)
                if emb_fmt is not None:
                    qe, qh = _load_embeddings(head_part, V, d, emb_fmt, False, ckpt, head_src, names, emb_scale)
            else:
                ids = sr.needed_ids(calib, sens_x, *(x for x, _ in windows or []))
                lookup, qe, qh = sr.embed_pass(ckpt, Q, emb_fmt, ids, head_part, lookup_part, fill_rows)
                _note(progress, f"rotated the embedding and head in {time.perf_counter() - t0:.1f}s")
        elif emb_fmt is not None:
            if resumed and head_part.is_file():
                qe, qh = _load_embeddings(head_part, V, d, emb_fmt, tied, ckpt, head_name, names, emb_scale)
            else:
                qe = _quantize_rows(ckpt, emb_name, emb_fmt, QuantEmbedding(V, d, emb_fmt, emb_scale))
                tensors = {f"{emb_pre}.{k}": v for k, v in qe.state_dict().items()}
                if not tied:
                    qh = QuantLinear(d, ckpt.shape(head_name)[0], False, emb_fmt)
                    _quantize_rows(ckpt, head_name, emb_fmt, qh)
                    tensors.update({f"{head_pre}.{k}": v for k, v in qh.state_dict().items()})
                save_atomic(tensors, head_part)
        stored = StoredEmbedding(ckpt.get(emb_name), getattr(emb_module, "embed_scale", None))
        shell.set_input_embeddings(stored)
        layers = decoder_layers(shell)

        def load(bi):
            block = _load_block(shell, bi, ckpt, f"{family.layers}.{bi}")
            if rot:
                from .rotation import rotate_block

                rotate_block(block, Q)
            return block

        # 2. --target-bpw: the sensitivity pass over every block, then the allocation
        plan_info = None
        if cfg.target_bpw is not None:
            from .mixed import plan_from

            sens = state.get("sensitivity")
            if sens is None:
                sens = _sensitivity(shell, layers, load, sens_x, lookup, ckpt, Q, cfg, plan, work, progress)
                state = {"fingerprint": finger, "next": 0, "sensitivity": sens}
                _write_json(state, work / "state.json")
            else:
                _note(progress, f"resuming: the sensitivity pass is done (from '{work}')")
            cfg.plan, plan_info = plan_from(sens, cfg.target_bpw, cfg.plan_sym)
        # 3. what reaches block 0, and the keyword arguments of every block
        inputs, kw_calib, before, kw_evals = _capture(shell, calib, windows)
        if rot:  # calibration runs on the rotated stream; "before" scores the original model
            shell.set_input_embeddings(lookup)
            inputs, _, after, _ = _capture(shell, calib, windows)
        if qe is not None and windows:
            shell.set_input_embeddings(qe)
            _, _, after, _ = _capture(shell, calib, windows)
        elif not rot:
            after = [(h.clone(), kw) for h, kw in before]
        shell.set_input_embeddings(nn.Identity())
        del stored, lookup
        qe = qh = None  # on disk: read back for the final scoring (8B, 4-bit: 0.6 GB less per layer)
        inputs = [(h.to(dt), kw) for h, kw in inputs]
        start = state.get("next", 0)
        report, formats = state.get("report", []), state.get("formats", {})
        if start:
            acts = _load_acts(work / state["acts"])
            inputs = [(acts[f"calib.{j}"], kw) for j, (_, kw) in enumerate(inputs)]
            before = [(acts[f"before.{j}"], kw) for j, (_, kw) in enumerate(before)]
            after = [(acts[f"after.{j}"], kw) for j, (_, kw) in enumerate(after)]
            _note(progress, f"resuming at layer {start + 1}/{n_layers} from '{work}'")
        # 4. the blocks, one at a time
        t_start, done_here = time.perf_counter(), 0
        for bi in progress.track(range(start, n_layers), f"{cfg.method} {cfg.fmt.bits}-bit", total=n_layers - start):
            t0 = time.perf_counter()
            prefix = f"{family.layers}.{bi}"
            block = _load_block(shell, bi, ckpt, prefix)
            inputs = kw_calib.at(inputs, bi)  # this block's own mask and rotary table
            if windows:
                before, after = kw_evals.at(before, bi), kw_evals.at(after, bi)
            before = _run(block, before, torch.float32)
            if rot:
                from .rotation import rotate_block

                rotate_block(block, Q)
            rows, fmts = quantize_block(block, prefix, _AsFloat(inputs), cfg, family)
            report += rows
            formats.update(fmts)
            inputs = _run(block, inputs, dt)
            after = _run(block, after, torch.float32)
            packed = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
            save_atomic(packed, work / f"layer-{bi:05d}.safetensors")
            layers[bi] = nn.Module()  # drop the block (its packed tensors are on disk)
            del block
            trim()  # and give its memory back to the OS (glibc keeps freed heap otherwise)
            acts_name = f"acts-{bi + 1:05d}.safetensors"
            acts = {f"calib.{j}": h for j, (h, _) in enumerate(inputs)}
            acts.update({f"before.{j}": h for j, (h, _) in enumerate(before)})
            acts.update({f"after.{j}": h for j, (h, _) in enumerate(after)})
            save_atomic(acts, work / acts_name)
            old = state.get("acts")
            state = {
                **{k: v for k, v in state.items() if k == "sensitivity"},
                "fingerprint": finger,
                "next": bi + 1,
                "acts": acts_name,
                "report": report,
                "formats": formats,
            }
            _write_json(state, work / "state.json")
            if old and old != acts_name:
                (work / old).unlink(missing_ok=True)
            done_here += 1
            per = (time.perf_counter() - t_start) / done_here
            _note(
                progress,
                f"layer {bi + 1}/{n_layers} done in {time.perf_counter() - t0:.1f}s; "
                f"eta {duration(per * (n_layers - bi - 1))}; peak RSS {human(peak_rss())}",
            )
        # 5. the final norm and head: score, and write what is left
        norm = ckpt.get(norm_name)
        final = {norm_name: torch.ones(d) if rot else norm.float()}
        if emb_fmt is None and not rot:
            final[emb_name] = ckpt.get(emb_name).float()
            if not tied:
                final[head_name] = ckpt.get(head_name).float()
        save_atomic(final, work / "final.safetensors")
        scores = None
        if windows:
            norm_ref, norm_q = _final_norm(shell, norm), _final_norm(shell, final[norm_name])

            def ref_rows(r0, r1):
                return ckpt.rows(head_src, r0, r1).float()

            if emb_fmt is not None:
                qe, qh = _load_embeddings(head_part, V, d, emb_fmt, tied, ckpt, head_src, names, emb_scale)
            if qe is None:
                if rot:

                    def q_rows(r0, r1):
                        return sr.file_rows(head_part, head_name, r0, r1)
                else:
                    q_rows = ref_rows
            else:
                head = qe if tied else qh

                def q_rows(r0, r1):
                    return packed_rows(head, r0, r1)

            scores = []
            for states, rows_fn, norm_mod in ((before, ref_rows, norm_ref), (after, q_rows, norm_q)):
                nll = count = 0
                for (h, _), (x, first) in zip(states, windows):
                    logits = final_logits(shell, norm_mod(h)[0], lambda t, f=rows_fn: head_logits(t, f, V))
                    n, c = window_nll(logits.float(), x, first)
                    nll, count = nll + n, count + c
                scores.append((nll, count))
    parts = [work / f"layer-{bi:05d}.safetensors" for bi in range(n_layers)]
    parts = ([head_part] if emb_fmt is not None or rot else []) + parts + [work / "final.safetensors"]
    info = {
        **cfg.to_dict(),
        "modules": [r["layer"] for r in report],
        "embeddings": emb_fmt.to_dict() if emb_fmt else False,
        "tied": tied,
    }
    if formats:
        info["formats"] = formats
    if rot:
        from .rotation import record

        info["rotation"] = record(d, cfg.seed, tied_in)
    if plan_info:
        info["mixed"] = plan_info
    params = sum(r["shape"][0] * r["shape"][1] for r in report)
    info["bits_per_weight"] = round(8 * sum(r["bytes"] for r in report) / max(params, 1), 4)
    before_s, after_s = scores if scores else (None, None)
    return report, info, before_s, after_s, parts


def _sensitivity(shell, layers, load, x, lookup, ckpt, Q, cfg, plan, work, progress):
    """mixed_stream.sensitivity_streamed on this checkpoint: blocks loaded (and rotated) one at a
    time and put back on the meta device, the head resident only for the final KLs."""
    from .mixed_stream import Streams, sensitivity_streamed
    from .stream_rotate import rotated_head

    d = shell.config.hidden_size
    stored = shell.get_input_embeddings()
    if lookup is not None:
        shell.set_input_embeddings(lookup)
    streams = Streams(work / "sensitivity" if plan.spill else None)

    def drop(bi):
        layers[bi].to_empty(device="meta")

    def final():
        names = part_names(shell)
        norm = _final_norm(shell, torch.ones(d) if Q is not None else ckpt.get(names["norm"] + ".weight"))
        if Q is not None:
            W = rotated_head(ckpt, Q)  # (V, d)
        else:
            tied = _tied_config(shell.config) or names["head"] + ".weight" not in ckpt.entries
            W = ckpt.get(names["embedding" if tied else "head"] + ".weight").float()  # (V, d)
        return lambda h: final_logits(shell, norm(h), lambda t: F.linear(t, W))  # (B, T, V)

    t0 = time.perf_counter()
    sens = sensitivity_streamed(
        shell, load, drop, x, final, cfg.plan_sym, streams, lambda line: _note(progress, line), progress
    )
    if lookup is not None:
        shell.set_input_embeddings(stored)
    shutil.rmtree(work / "sensitivity", ignore_errors=True)
    _note(progress, f"sensitivity pass done in {duration(time.perf_counter() - t0)}; peak RSS {human(peak_rss())}")
    return sens


def _tied_config(config) -> bool:
    class _M:  # apply._tied reads model.config
        pass

    m = _M()
    m.config = config
    return _tied(m)


def _load_acts(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _load_embeddings(path: Path, V: int, d: int, fmt: QuantFormat, tied: bool, ckpt, head_name: str, names, scale):
    from safetensors.torch import load_file

    t = load_file(str(path))
    emb, head = names["embedding"] + ".", names["head"] + "."
    qe = QuantEmbedding(V, d, fmt, scale)
    qe.load_state_dict({k[len(emb) :]: v for k, v in t.items() if k.startswith(emb)})
    qh = None
    if not tied:
        qh = QuantLinear(d, ckpt.shape(head_name)[0], False, fmt)
        qh.load_state_dict({k[len(head) :]: v for k, v in t.items() if k.startswith(head)})
    return qe, qh


def _final_norm(shell, weight: torch.Tensor):
    """The skeleton's final norm (its own class and settings) holding `weight` in fp32."""
    import copy

    norm = copy.deepcopy(get_path(shell, family_of(shell.config).final_norm)).to_empty(device="cpu")
    norm.weight.data.copy_(weight)
    return norm

"""Quantize a model's linear weights to 4 or 8 bits (RTN, GPTQ or AWQ), stored packed."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import EdgeLLMError
from .common import SEED_MAX, calib_data, check_context, check_range, data_tokens, load_spec
from .options import option


class Embeddings(str, Enum):
    eight = "8"
    four = "4"
    keep = "keep"


class Method(str, Enum):
    rtn = "rtn"
    gptq = "gptq"
    awq = "awq"


@dataclass
class QuantizeOptions:
    bits: int = option(4, "--bits")
    method: Method = option(Method.gptq, "--method")  # the most accurate of the three at 4 bits
    group_size: int = option(128, "--group-size")  # -1: per channel
    sym: bool = option(True, "--sym")
    float_zero: bool = option(False, "--float-zero")  # with sym=False: fp16 zero points (Q4_1 style)
    embeddings: Embeddings = option(Embeddings.eight, "--embeddings")  # 8-bit, as llama.cpp's Q8_0
    quantize_embeddings: bool | None = option(None, "--quantize-embeddings")  # old spelling of `embeddings`
    rotate: bool = option(False, "--rotate")
    target_bpw: float | None = option(None, "--target-bpw")  # mixed precision to this many bits/weight
    clip_search: bool = option(True, "--clip-search")
    act_order: bool = option(True, "--act-order")
    damp: float = option(0.01, "--damp", min=0.0, max=1.0)  # GPTQ: fraction of mean(diag H)
    data: str | None = option(None, "--data")  # None: the built-in corpus
    calib_samples: int = option(32, "--calib-samples", min=1)
    seq_len: int = option(512, "--seq-len", min=8)
    evaluate: bool = option(True, "--eval")  # perplexity before and after
    eval_tokens: int = option(4096, "--eval-tokens", min=64)
    seed: int = option(0, "--seed")
    max_memory: str | None = option(None, "--max-memory")  # e.g. 6GB; None: a safe fraction of available RAM
    resume: bool = option(False, "--resume")  # continue an interrupted quantize from the layer it reached


@dataclass
class QuantizeResult:
    output: Path
    layers: list[dict]  # per linear: layer, shape, bits, group_size, sym, zero, rel_error
    info: dict  # edgellm.json's "quantization" entry
    seconds: float  # the quantization itself (without loading and evaluation)
    before: object | None  # evaluate.Quality of the input, when measured
    after: object | None


def quant_config(o: QuantizeOptions):
    """The QuantConfig the options describe (checked before any heavy work)."""
    from ..quant.apply import QuantConfig
    from ..quant.formats import QuantFormat

    if o.float_zero and o.sym:
        raise EdgeLLMError("--float-zero needs --asym (symmetric formats store no zero points)")
    fmt = QuantFormat(o.bits, o.group_size, o.sym, "float" if o.float_zero else "int")
    check_range("--damp", o.damp, 0.0, 1.0)
    check_range("--seed", o.seed, 0, SEED_MAX)
    if o.quantize_embeddings is None:
        emb = Embeddings(o.embeddings).value
    else:
        emb = str(o.bits) if o.quantize_embeddings else "keep"
    return QuantConfig(
        fmt=fmt,
        method=Method(o.method).value,
        damp=o.damp,
        act_order=o.act_order,
        embeddings=emb,
        rotate=o.rotate,
        target_bpw=o.target_bpw,
        clip_search=o.clip_search,
        seed=o.seed,
    )


def _check_model(loaded, spec: str, o: QuantizeOptions) -> None:
    """What the loaded model must allow: context, not quantized yet, rotation, the mixed budget."""
    check_context(loaded.model, "--seq-len", o.seq_len)
    if loaded.record.get("quantization"):
        raise EdgeLLMError(f"'{spec}' is already quantized; quantize the unquantized model instead")
    if o.rotate:
        from ..quant.rotation import check_rotatable

        check_rotatable(loaded.model)
    if o.target_bpw is not None:
        from ..quant.mixed import MIN_TOKENS, SENS_SAMPLES, SENS_TOKENS, check_budget

        check_budget(loaded.model, o.target_bpw)
        if min(o.calib_samples, SENS_SAMPLES) * min(o.seq_len, SENS_TOKENS) < MIN_TOKENS:
            raise EdgeLLMError(
                f"--calib-samples {o.calib_samples} x --seq-len {o.seq_len} is too small for the sensitivity pass "
                f"of --target-bpw; it needs at least {MIN_TOKENS} tokens"
            )


def run_quantize(
    model: str, output: Path, options: QuantizeOptions, progress=None, force: bool = False
) -> QuantizeResult:
    """Quantize `model` into the model directory `output` (written whole at the end).

    A local checkpoint (every family but GPT-2) streams one decoder layer at a time (quant/stream.py), with
    --rotate and --target-bpw too, within --max-memory; what does not stream yet (other
    families, GGUF files, hub ids) loads the model whole, and is refused when that cannot fit."""
    from ..memory import budget
    from ..modelio import load_config, resolve_spec
    from ..outputs import check_output_dir
    from ..progress import NULL
    from ..quant.stream import not_streamed

    o, progress = options, progress or NULL
    cfg = quant_config(o)
    check_output_dir(output, force, [model, o.data])
    limit, how = budget(o.max_memory)
    path = Path(resolve_spec(model))
    config = load_config(str(path))
    reason = not_streamed(config, cfg) if path.is_dir() else "a GGUF file or hub id"
    if reason is None:
        return _run_streamed(path, config, output, o, cfg, limit, how, progress, force)
    if o.resume:
        raise EdgeLLMError(f"--resume needs the layer-streaming path, which does not handle {reason} yet")
    if path.is_dir():
        _check_resident_fits(path, reason, limit, how)
    return _run_resident(model, output, o, cfg, progress, force)


def _check_resident_fits(path: Path, reason: str, limit: int, how: str) -> None:
    """The resident path holds the model in fp32 about twice over (weights, evaluation, calibration)."""
    from ..checkpoint import Checkpoint
    from ..memory import human, rss

    ckpt = Checkpoint(path)
    params = sum(math.prod(s) for _, _, s in ckpt.entries.values())
    need = rss() + 2 * 4 * params
    if need > limit:
        raise EdgeLLMError(
            f"{reason} is not streamed yet: quantizing it loads the whole model, about {human(need)}, "
            f"over the budget of {human(limit)} ({how})"
        )


def _quality(score):
    from ..evaluate import DEFAULT_CTX, DEFAULT_STRIDE, Quality

    nll, count = score
    return Quality(perplexity=math.exp(nll / count), tokens=count, ctx=DEFAULT_CTX, stride=DEFAULT_STRIDE)


def _run_streamed(path: Path, config, output: Path, o: QuantizeOptions, cfg, limit: int, how: str, progress, force):
    """The layer-streaming quantize: plan, then quant/stream.py, then the output renamed into place."""
    import shutil

    import torch
    import transformers

    from ..checkpoint import Checkpoint
    from ..data import calibration_batch, split_tokens
    from ..evaluate import DEFAULT_CTX, DEFAULT_STRIDE, windows
    from ..memory import human
    from ..outputs import atomic_output_dir
    from ..quant.stream import fingerprint, join_safetensors, open_work, plan_stream, quantize_streamed, work_dir
    from ..record import add_step, read_record, write_record

    ckpt = Checkpoint(path)
    ckpt.check_against(config)
    record = read_record(path)
    if record.get("quantization"):
        raise EdgeLLMError(f"'{path}' is already quantized; quantize the unquantized model instead")
    limit_pos = getattr(config, "max_position_embeddings", None)
    if limit_pos and o.seq_len > limit_pos:
        raise EdgeLLMError(f"--seq-len {o.seq_len} exceeds the model's {limit_pos} positions; give at most {limit_pos}")
    if o.target_bpw is not None:  # before the calibration set is cut (and warns about its size)
        from ..quant.mixed import MIN_TOKENS, SENS_SAMPLES, SENS_TOKENS

        if min(o.calib_samples, SENS_SAMPLES) * min(o.seq_len, SENS_TOKENS) < MIN_TOKENS:
            raise EdgeLLMError(
                f"--calib-samples {o.calib_samples} x --seq-len {o.seq_len} is too small for the sensitivity pass "
                f"of --target-bpw; it needs at least {MIN_TOKENS} tokens"
            )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    ids = data_tokens(tokenizer, o.data)
    calib = calibration_batch(ids, o.calib_samples, o.seq_len, seed=o.seed)
    wins, eval_ids = None, None
    if o.evaluate:
        eval_ids = split_tokens(ids, "eval")[: o.eval_tokens]
        wins = [(eval_ids[s:e], first) for s, e, first in windows(len(eval_ids), DEFAULT_CTX, DEFAULT_STRIDE)]
        if not wins:
            raise EdgeLLMError(f"the evaluation data has {len(eval_ids)} tokens, too few to score; give more text")
    _check_streamed_modes(config, cfg, calib)
    plan = plan_stream(config, ckpt, cfg, calib.shape[0], calib.shape[1], o.eval_tokens if wins else 0, limit)
    work = work_dir(output)
    finger = fingerprint(ckpt, cfg, calib, eval_ids, plan.act_dtype)
    state = open_work(work, finger, o.resume)
    note = getattr(progress, "note", None)
    if note:
        note(
            f"streaming {config.num_hidden_layers} layers: plan {human(plan.need)} of {human(limit)} ({how}); "
            f"activations {str(plan.act_dtype).replace('torch.', '')}"
            + (f"; sensitivity streams {'on disk' if plan.spill else 'in memory'}" if cfg.target_bpw else "")
            + "; an interrupted run continues with --resume"
        )
    t0 = time.perf_counter()
    report, info, before, after, parts = quantize_streamed(
        ckpt, config, cfg, calib, wins, work, plan, state, finger, progress
    )
    seconds = time.perf_counter() - t0
    before, after = (_quality(before), _quality(after)) if wins else (None, None)
    record = add_step(
        record,
        "quantize",
        params=cfg.to_dict(),
        time_s=round(seconds, 2),
        data=calib_data(o.data, calib, o.seed),
        quality={"before": before.to_dict(), "after": after.to_dict()} if wins else None,
    )
    record["quantization"] = info
    record.setdefault("source", {"kind": "directory", "path": str(path.resolve())})
    if cfg.rotate:
        config.tie_word_embeddings = False  # the rotation stores its own head (quant/rotation.py)
    config.dtype = torch.float32  # the norms (and kept embeddings) are stored in fp32, as the resident path does
    gen = (
        transformers.GenerationConfig.from_pretrained(str(path))
        if (path / "generation_config.json").is_file()
        else transformers.GenerationConfig.from_model_config(config)
    )
    with atomic_output_dir(output, force, [str(path), o.data]) as tmp:
        join_safetensors(parts, tmp / "model.safetensors", {"format": "pt", "edgellm": "packed"})
        config.save_pretrained(str(tmp))
        gen.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_record(tmp, record)
    ckpt.close()
    shutil.rmtree(work, ignore_errors=True)
    return QuantizeResult(output, report, info, seconds, before, after)


def _check_streamed_modes(config, cfg, calib) -> None:
    """--rotate and --target-bpw on a streamed checkpoint, checked on the meta skeleton before any work."""
    if cfg.rotate:
        from ..quant.rotation import rotatable_config

        rotatable_config(config)  # the resident path's refusal, word for word
    if cfg.target_bpw is not None:
        from ..checkpoint import meta_model
        from ..quant.mixed import check_budget, check_tokens

        check_budget(meta_model(config), cfg.target_bpw, cfg.plan_sym)
        check_tokens(calib)


def _run_resident(model: str, output: Path, o: QuantizeOptions, cfg, progress, force) -> QuantizeResult:
    """The whole model in memory (what does not stream yet)."""
    from ..data import calibration_batch, split_tokens
    from ..evaluate import evaluate as measure
    from ..modelio import save_model
    from ..outputs import atomic_output_dir
    from ..progress import NULL
    from ..quant.apply import quantize_model
    from ..record import add_step

    progress = progress or NULL
    inputs = [model, o.data]
    loaded = load_spec(model, progress=progress)
    _check_model(loaded, model, o)
    ids = data_tokens(loaded.tokenizer, o.data)
    calib = calibration_batch(ids, o.calib_samples, o.seq_len, seed=o.seed)
    eval_ids = split_tokens(ids, "eval")

    def quality():
        return measure(loaded.model, eval_ids, max_tokens=o.eval_tokens, progress=progress) if o.evaluate else None

    before = quality()
    t0 = time.perf_counter()
    layers, info = quantize_model(loaded.model, cfg, calib, progress=progress)
    seconds = time.perf_counter() - t0
    after = quality()
    record = add_step(
        loaded.record,
        "quantize",
        params=cfg.to_dict(),
        time_s=round(seconds, 2),
        data=calib_data(o.data, calib, o.seed),
        quality={"before": before.to_dict(), "after": after.to_dict()} if o.evaluate else None,
    )
    record["quantization"] = info
    with atomic_output_dir(output, force, inputs) as tmp:
        save_model(loaded.model, loaded.tokenizer, tmp, record)
    return QuantizeResult(output, layers, info, seconds, before, after)

"""Prune a model: unstructured or N:M sparsity (magnitude, Wanda, SparseGPT), or structured
removal of layers, attention heads or MLP channels that leaves a smaller ordinary model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import EdgeLLMError
from .common import SEED_MAX, calib_data, check_context, check_range, data_tokens, load_spec
from .options import option

STRUCTURED_NOTE = "same number removed in every block so the config stays uniform; config.json updated"


class Method(str, Enum):
    magnitude = "magnitude"
    wanda = "wanda"
    sparsegpt = "sparsegpt"


class Structure(str, Enum):
    layers = "layers"
    heads = "heads"
    mlp = "mlp"


@dataclass
class PruneOptions:
    method: Method | None = option(None, "--method")  # exactly one of method and structured
    sparsity: float | None = option(None, "--sparsity")  # None: 0.5, or 1 - N/M with a pattern
    pattern: str | None = option(None, "--pattern")  # N:M, e.g. "2:4"
    structured: Structure | None = option(None, "--structured")
    ratio: float | None = option(None, "--ratio")  # with structured: the fraction to remove
    damp: float = option(0.01, "--damp")  # SparseGPT: fraction of mean(diag H)
    data: str | None = option(None, "--data")  # None: the built-in corpus
    calib_samples: int = option(64, "--calib-samples", min=1)
    seq_len: int = option(512, "--seq-len", min=8)
    evaluate: bool = option(True, "--eval")  # perplexity before and after
    eval_tokens: int = option(4096, "--eval-tokens", min=64)
    seed: int = option(0, "--seed")
    max_memory: str | None = option(None, "--max-memory")  # e.g. 6GB; None: a safe fraction of available RAM


@dataclass
class PruneResult:
    output: Path
    layers: list[dict] | None  # per linear (unstructured / N:M); None for structured pruning
    result: dict  # edgellm.json's step "result": parameters before / after and what was removed
    seconds: float
    before: object | None  # evaluate.Quality, when measured
    after: object | None


def check_options(o: PruneOptions):
    """Every option, before any heavy work (nothing is loaded or written on bad input); the N:M pattern."""
    from ..prune.masks import check_sparsity, parse_pattern

    method, structured = o.method, o.structured
    if (method is None) == (structured is None):
        raise EdgeLLMError(
            "give either --method {magnitude,wanda,sparsegpt} (with --sparsity or --pattern) or --structured "
            "{layers,heads,mlp} with --ratio"
        )
    if structured is not None and (o.sparsity is not None or o.pattern is not None):
        raise EdgeLLMError("--sparsity and --pattern apply to --method; --structured takes --ratio")
    if method is not None and o.ratio is not None:
        raise EdgeLLMError("--ratio applies to --structured; --method takes --sparsity or --pattern")
    if structured is not None and o.ratio is None:
        raise EdgeLLMError(
            f"--structured {Structure(structured).value} needs --ratio, the fraction to remove (e.g. 0.25)"
        )
    nm = parse_pattern(o.pattern) if o.pattern is not None else None
    if o.sparsity is not None:
        check_sparsity(o.sparsity)
    if nm is not None and o.sparsity is not None and abs(o.sparsity - nm.sparsity) > 1e-9:
        raise EdgeLLMError(
            f"--sparsity {o.sparsity} contradicts --pattern {nm}, which removes {nm.sparsity:g} of the weights; drop "
            "--sparsity"
        )
    check_range("--damp", o.damp, 0.0, 1.0, hi_open=True)
    check_range("--sparsity", o.sparsity, 0.0, 1.0, hi_open=True)
    check_range("--seed", o.seed, 0, SEED_MAX)
    if o.ratio is not None and not (0 < o.ratio < 1):
        raise EdgeLLMError(f"--ratio {o.ratio} is outside (0, 1); give the fraction to remove, e.g. 0.25")
    return nm


def _plan(net, o: PruneOptions, nm):
    """The unstructured PruneConfig (None for structured pruning), checked against the model."""
    from ..prune import apply as P

    if o.method is None:
        P.plan_structured(net, Structure(o.structured).value, o.ratio)
        return None
    cfg = P.PruneConfig(
        method=Method(o.method).value,
        sparsity=nm.sparsity if nm else (0.5 if o.sparsity is None else o.sparsity),
        pattern=nm,
        damp=o.damp,
    )
    P.check_unstructured(net, cfg)
    return cfg


def _prune(net, o: PruneOptions, cfg, calib, progress):
    """(per-linear report or None, edgellm.json params, info) of pruning `net` in place."""
    from ..prune import apply as P

    if cfg is not None:
        report, info = P.prune_unstructured(net, cfg, calib, progress=progress)
        return report, cfg.to_dict(), info
    kind = Structure(o.structured).value
    info = P.prune_structured(net, kind, o.ratio, calib, progress=progress)
    return None, {"structured": kind, "ratio": o.ratio}, info


def run_prune(model: str, output: Path, options: PruneOptions, progress=None, force: bool = False) -> PruneResult:
    """Prune `model` into the model directory `output` (written whole at the end)."""
    from ..data import calibration_batch, split_tokens
    from ..evaluate import evaluate as measure
    from ..modelio import count_parameters, save_model
    from ..outputs import atomic_output_dir, check_output_dir
    from ..progress import NULL
    from ..record import add_step

    o, progress = options, progress or NULL
    nm = check_options(o)
    inputs = [model, o.data]
    check_output_dir(output, force, inputs)
    streamed = _run_streamed(model, output, o, nm, progress, force)
    if streamed is not None:
        return streamed
    loaded = load_spec(model, progress=progress)
    check_context(loaded.model, "--seq-len", o.seq_len)
    if loaded.record.get("quantization"):
        raise EdgeLLMError(f"'{model}' is quantized; prune the unquantized model, then quantize the pruned one")
    net = loaded.model
    cfg = _plan(net, o, nm)
    ids = data_tokens(loaded.tokenizer, o.data)
    needs_data = o.structured is not None or Method(o.method) != Method.magnitude
    calib = calibration_batch(ids, o.calib_samples, o.seq_len, seed=o.seed) if needs_data else None
    eval_ids = split_tokens(ids, "eval")

    def quality():
        return measure(net, eval_ids, max_tokens=o.eval_tokens, progress=progress) if o.evaluate else None

    before, params_before = quality(), count_parameters(net)
    t0 = time.perf_counter()
    report, params, info = _prune(net, o, cfg, calib, progress)
    seconds = time.perf_counter() - t0
    after = quality()
    result = {"parameters_before": params_before, "parameters_after": count_parameters(net), **info}
    if report is not None:
        result["per_layer"] = [{"layer": r["layer"], "sparsity": r["sparsity"]} for r in report]
    else:
        result["note"] = STRUCTURED_NOTE
    record = add_step(
        loaded.record,
        "prune",
        params=params,
        time_s=round(seconds, 2),
        data=None if calib is None else calib_data(o.data, calib, o.seed),
        result=result,
        quality={"before": before.to_dict(), "after": after.to_dict()} if o.evaluate else None,
    )
    with atomic_output_dir(output, force, inputs) as tmp:
        save_model(net, loaded.tokenizer, tmp, record)
    return PruneResult(output, report, result, seconds, before, after)


def _run_streamed(model: str, output: Path, o: PruneOptions, nm, progress, force: bool) -> PruneResult | None:
    """Pruning of a local checkpoint (every family but GPT-2; unstructured, N:M and structured), one
    decoder block at a time (prune/stream.py) within --max-memory; None where it does not stream
    (other families, GGUF files, hub ids: those load whole, and are refused when that cannot fit)."""
    import transformers

    from ..arch import stream_refusal
    from ..checkpoint import meta_model
    from ..data import calibration_batch, split_tokens
    from ..evaluate import DEFAULT_CTX, DEFAULT_STRIDE, windows
    from ..memory import budget
    from ..modelio import load_config, resolve_spec
    from ..outputs import atomic_output_dir
    from ..prune import apply as P
    from ..prune.stream import prune_streamed, prune_structured_streamed, quality
    from ..record import add_step, read_record, write_record

    limit, how = budget(o.max_memory)
    path = Path(resolve_spec(model))
    config = load_config(str(path))
    if not path.is_dir() or stream_refusal(config) is not None:
        if path.is_dir():
            _check_resident_fits(path, limit, how)
        return None
    record = read_record(path)
    if record.get("quantization"):
        raise EdgeLLMError(f"'{model}' is quantized; prune the unquantized model, then quantize the pruned one")
    limit_pos = getattr(config, "max_position_embeddings", None)
    if limit_pos and o.seq_len > limit_pos:
        raise EdgeLLMError(f"--seq-len {o.seq_len} exceeds the model's {limit_pos} positions; give at most {limit_pos}")
    kind = None if o.structured is None else Structure(o.structured).value
    if kind is not None:
        P.plan_structured(meta_model(config), kind, o.ratio)  # refusals and ratio limits, before any data
    _plan_streamed(config, o, limit, how)
    cfg = None
    if kind is None:
        cfg = P.PruneConfig(
            method=Method(o.method).value,
            sparsity=nm.sparsity if nm else (0.5 if o.sparsity is None else o.sparsity),
            pattern=nm,
            damp=o.damp,
        )
        P.check_unstructured(meta_model(config), cfg)  # an N:M pattern that fits no layer, before any data
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    ids = data_tokens(tokenizer, o.data)
    needs_data = cfg is None or cfg.method != "magnitude"
    calib = calibration_batch(ids, o.calib_samples, o.seq_len, seed=o.seed) if needs_data else None
    wins = None
    if o.evaluate:
        eval_ids = split_tokens(ids, "eval")[: o.eval_tokens]
        wins = [(eval_ids[s:e], first) for s, e, first in windows(len(eval_ids), DEFAULT_CTX, DEFAULT_STRIDE)]
        if not wins:
            raise EdgeLLMError(f"the evaluation data has {len(eval_ids)} tokens, too few to score; give more text")
    inputs = [model, o.data]
    with atomic_output_dir(output, force, inputs) as tmp:
        t0 = time.perf_counter()
        if cfg is not None:
            report, info, params, before, after = prune_streamed(path, config, tmp, cfg, calib, wins, progress)
            params_after, step_params = params, cfg.to_dict()
        else:
            report, step_params = None, {"structured": kind, "ratio": o.ratio}
            info, params, params_after, before, after = prune_structured_streamed(
                path, config, tmp, kind, o.ratio, calib, wins, progress
            )
        seconds = time.perf_counter() - t0
        before, after = (quality(before), quality(after)) if before else (None, None)
        result = {"parameters_before": params, "parameters_after": params_after, **info}
        if report is not None:
            result["per_layer"] = [{"layer": r["layer"], "sparsity": r["sparsity"]} for r in report]
        else:
            result["note"] = STRUCTURED_NOTE
        record.setdefault("source", {"kind": "directory", "path": str(path.resolve())})
        record = add_step(
            record,
            "prune",
            params=step_params,
            time_s=round(seconds, 2),
            data=None if calib is None else calib_data(o.data, calib, o.seed),
            result=result,
            quality={"before": before.to_dict(), "after": after.to_dict()} if o.evaluate else None,
        )
        try:
            gen = transformers.GenerationConfig.from_pretrained(str(path))
        except OSError:
            gen = transformers.GenerationConfig.from_model_config(config)
        gen.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_record(tmp, record)
    return PruneResult(output, report, result, seconds, before, after)


def _plan_streamed(config, o: PruneOptions, limit: int, how: str) -> None:
    """One block in fp32 with its statistics and the calibration / evaluation states must fit
    (structured: the block twice while it is sliced, and the input and output states of a block)."""
    from ..memory import human, rss

    d, i_f, V = config.hidden_size, config.intermediate_size, config.vocab_size
    layer = 4 * (4 * d * d + 3 * d * i_f)
    if o.structured is not None:
        layer, stats = 2 * layer, 4 * 2 * max(d, i_f) ** 2
    elif Method(o.method) == Method.sparsegpt:
        stats = 4 * 3 * max(d, i_f) ** 2
    else:
        stats = 4 * 2 * (d * d + i_f * i_f)
    acts = 4 * 2 * (o.calib_samples * o.seq_len + 2 * o.eval_tokens) * d
    need = rss() + int(1.2 * max(layer + stats + acts, 2 * V * d + acts))
    if need > limit:
        raise EdgeLLMError(
            f"pruning one decoder layer needs about {human(need)}, more than the budget of {human(limit)} ({how}); "
            "raise --max-memory or lower --calib-samples / --seq-len / --eval-tokens"
        )


def _check_resident_fits(path: Path, limit: int, how: str) -> None:
    """The resident prune holds the model in fp32 (and structured pruning a copy while it slices)."""
    import math

    from ..checkpoint import Checkpoint
    from ..memory import human, rss

    params = sum(math.prod(s) for _, _, s in Checkpoint(path).entries.values())
    need = rss() + 2 * 4 * params
    if need > limit:
        raise EdgeLLMError(
            f"this prune loads the whole model (it does not stream), about {human(need)}, over the budget of "
            f"{human(limit)} ({how}); raise --max-memory"
        )

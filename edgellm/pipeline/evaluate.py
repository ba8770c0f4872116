"""Perplexity on held-out text, and KL / top-1 agreement against a reference model."""

from __future__ import annotations

from dataclasses import dataclass

from .common import check_context, check_stride, data_tokens, load_spec
from .options import option


@dataclass
class EvalOptions:
    reference: str | None = option(None, "--reference")  # for KL divergence and top-1 agreement
    data: str | None = option(None, "--data")  # None: the built-in corpus (its last 10% is held out)
    ctx: int = option(512, "--ctx", min=8)
    stride: int | None = option(None, "--stride", min=1)  # None: = ctx, non-overlapping windows
    eval_tokens: int = option(16384, "--eval-tokens", min=64)
    max_memory: str | None = option(None, "--max-memory")  # e.g. 6GB; None: a safe fraction of available RAM


@dataclass
class EvalResult:
    model: str
    reference: str | None
    quality: object  # evaluate.Quality: perplexity, tokens, ctx, stride, and kl / top1 with a reference

    def to_dict(self) -> dict:
        return {"model": self.model, "reference": self.reference, **self.quality.to_dict()}


def run_eval(model: str, options: EvalOptions, progress=None) -> EvalResult:
    """Measure `model` on the held-out split of the data (deterministic).

    Local directories (every family but GPT-2) (the model, and the reference when given) stream one decoder
    layer at a time (evaluate_stream.py) within --max-memory; other inputs load whole, and are
    refused when that does not fit."""
    from ..data import split_tokens
    from ..evaluate import evaluate as measure
    from ..progress import NULL

    o, progress = options, progress or NULL
    stride = check_stride(o.ctx, o.stride)
    streamed = _run_streamed(model, o, stride, progress)
    if streamed is not None:
        return streamed
    loaded = load_spec(model, progress=progress)
    check_context(loaded.model, "--ctx", o.ctx)
    ref = load_spec(o.reference, "loading reference", progress=progress) if o.reference else None
    if ref is not None:
        check_context(ref.model, "--ctx", o.ctx)
    ids = split_tokens(data_tokens(loaded.tokenizer, o.data), "eval")
    q = measure(
        loaded.model,
        ids,
        reference=ref.model if ref else None,
        ctx=o.ctx,
        stride=stride,
        max_tokens=o.eval_tokens,
        progress=progress,
    )
    return EvalResult(model, o.reference, q)


def _run_streamed(model: str, o: EvalOptions, stride: int, progress) -> EvalResult | None:
    """The layer-by-layer evaluation, or None when the model or reference does not stream."""
    from pathlib import Path

    import transformers

    from ..data import split_tokens
    from ..errors import EdgeLLMError
    from ..evaluate_stream import evaluate_streamed, plan_eval, streamable
    from ..memory import budget
    from ..modelio import load_config, resolve_spec

    limit, how = budget(o.max_memory)
    path = Path(resolve_spec(model))
    config = load_config(str(path))
    ref_path = ref_config = None
    if o.reference:
        ref_path = Path(resolve_spec(o.reference))
        ref_config = load_config(str(ref_path))
    if not streamable(path, config) or (ref_path is not None and not streamable(ref_path, ref_config)):
        _check_resident_fits([p for p in (path, ref_path) if p is not None and p.is_dir()], limit, how)
        return None
    for c in filter(None, (config, ref_config)):
        limit_pos = getattr(c, "max_position_embeddings", None)
        if limit_pos and o.ctx > limit_pos:
            raise EdgeLLMError(f"--ctx {o.ctx} exceeds the model's {limit_pos} positions; give at most {limit_pos}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    ids = split_tokens(data_tokens(tokenizer, o.data), "eval")
    plan_eval(config, ref_config, min(len(ids), o.eval_tokens), o.ctx, limit, how)
    q = evaluate_streamed(
        path,
        config,
        ids,
        reference=ref_path,
        ref_config=ref_config,
        ctx=o.ctx,
        stride=stride,
        max_tokens=o.eval_tokens,
        progress=progress,
    )
    return EvalResult(model, o.reference, q)


def _check_resident_fits(paths: list, limit: int, how: str) -> None:
    """The resident evaluation holds each model in fp32."""
    import math

    from ..checkpoint import Checkpoint
    from ..errors import EdgeLLMError
    from ..memory import human, rss

    params = sum(math.prod(s) for p in paths for _, _, s in Checkpoint(p).entries.values())
    need = rss() + 4 * params
    if need > limit:
        raise EdgeLLMError(
            f"evaluating loads these models whole (they are not streamed yet), about {human(need)}, over the budget "
            f"of {human(limit)} ({how}); raise --max-memory"
        )

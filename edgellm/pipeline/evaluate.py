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


@dataclass
class EvalResult:
    model: str
    reference: str | None
    quality: object  # evaluate.Quality: perplexity, tokens, ctx, stride, and kl / top1 with a reference

    def to_dict(self) -> dict:
        return {"model": self.model, "reference": self.reference, **self.quality.to_dict()}


def run_eval(model: str, options: EvalOptions, progress=None) -> EvalResult:
    """Measure `model` on the held-out split of the data (deterministic)."""
    from ..data import split_tokens
    from ..evaluate import evaluate as measure
    from ..progress import NULL

    o, progress = options, progress or NULL
    stride = check_stride(o.ctx, o.stride)
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

"""`edgellm eval`: perplexity, and KL / top-1 agreement against a reference model."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .common import CtxOpt, DataOpt, EvalTokensOpt, ModelArg, StrideOpt, check_context, check_stride, data_tokens, load


def evaluate(
    model: ModelArg,
    reference: Annotated[
        Optional[str], typer.Option("--reference", "-r", help="Reference model for KL divergence and top-1 agreement.")
    ] = None,
    data: DataOpt = None,
    ctx: CtxOpt = 512,
    stride: StrideOpt = None,
    eval_tokens: EvalTokensOpt = 16384,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
):
    """Measure perplexity on held-out text (last 10% of the data), and with --reference the KL
    divergence of next-token distributions and top-1 agreement. Deterministic.

    Example: edgellm eval smol-q4/ --reference SmolLM2-135M-Instruct.Q4_1.gguf
    """
    from ..console import PROGRESS, console, out, show_warnings
    from ..data import split_tokens
    from ..evaluate import evaluate as measure

    stride = check_stride(ctx, stride)
    with show_warnings():
        loaded = load(model)
        check_context(loaded.model, "--ctx", ctx)
        ref = load(reference, "loading reference") if reference else None
        if ref is not None:
            check_context(ref.model, "--ctx", ctx)
        ids = split_tokens(data_tokens(loaded.tokenizer, data), "eval")
        q = measure(
            loaded.model,
            ids,
            reference=ref.model if ref else None,
            ctx=ctx,
            stride=stride,
            max_tokens=eval_tokens,
            progress=PROGRESS,
        )
    if as_json:
        out.print_json(json.dumps({"model": model, "reference": reference, **q.to_dict()}))
        return
    line = f"perplexity {q.perplexity:.4f} over {q.tokens} tokens (ctx {q.ctx}, stride {q.stride})"
    if ref:
        line += f"; KL {q.kl:.5f} nats/token, top-1 agreement {q.top1 * 100:.2f}% vs {reference}"
    console.print(line)

"""`edgellm eval`: perplexity, and KL / top-1 agreement against a reference model."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ..pipeline.evaluate import EvalOptions
from .common import CtxOpt, DataOpt, EvalTokensOpt, MaxMemoryOpt, ModelArg, StrideOpt


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
    max_memory: MaxMemoryOpt = None,
):
    """Measure perplexity on held-out text (last 10% of the data), and with --reference the KL
    divergence of next-token distributions and top-1 agreement. Deterministic.

    Example: edgellm eval smol-q4/ --reference SmolLM2-135M-Instruct.Q4_1.gguf
    """
    from ..console import PROGRESS, console, out, quiet_transformers, show_warnings
    from ..pipeline.common import check_stride
    from ..pipeline.evaluate import run_eval

    options = EvalOptions(
        reference=reference, data=data, ctx=ctx, stride=stride, eval_tokens=eval_tokens, max_memory=max_memory
    )
    check_stride(ctx, stride)  # before any heavy work
    with show_warnings():
        quiet_transformers()
        result = run_eval(model, options, progress=PROGRESS)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    q = result.quality
    line = f"perplexity {q.perplexity:.4f} over {q.tokens} tokens (ctx {q.ctx}, stride {q.stride})"
    if reference:
        line += f"; KL {q.kl:.5f} nats/token, top-1 agreement {q.top1 * 100:.2f}% vs {reference}"
    console.print(line)

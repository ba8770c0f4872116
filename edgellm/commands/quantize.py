"""`edgellm quantize`: calibrated 4/8-bit weight quantization, stored packed."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..pipeline.quantize import Embeddings, Method, QuantizeOptions, QuantizeResult
from .common import (
    DataOpt,
    EvalTokensOpt,
    ForceOpt,
    MaxMemoryOpt,
    ModelArg,
    OutOpt,
    SamplesOpt,
    SeqLenOpt,
    dir_size,
    human_bytes,
)


def quantize(
    model: ModelArg,
    output: OutOpt,
    bits: Annotated[int, typer.Option("--bits", "-b", help="Bits per weight: 4 or 8.")] = 4,
    method: Annotated[
        Method, typer.Option("--method", "-m", help="rtn (baseline), gptq (Hessian-based), awq (activation-aware).")
    ] = Method.gptq,
    group_size: Annotated[
        int, typer.Option("--group-size", "-g", help="Columns per scale: a power of two >= 16, or -1 for per-channel.")
    ] = 128,
    sym: Annotated[
        bool, typer.Option("--sym/--asym", help="Symmetric (no zero points) or asymmetric (a zero point per group).")
    ] = True,
    float_zero: Annotated[
        bool,
        typer.Option(
            "--float-zero",
            help="With --asym: fp16 zero points (Q4_1 style: each group's min and max land exactly on codes 0 and "
            "15) instead of integer ones; one more byte per group.",
        ),
    ] = False,
    embeddings: Annotated[
        Embeddings,
        typer.Option(
            "--embeddings",
            help="Token embeddings and lm_head (the tied matrix stored once): 8-bit (default, as llama.cpp's Q8_0), "
            "4-bit, or keep them in full precision.",
        ),
    ] = Embeddings.eight,
    quantize_embeddings: Annotated[
        Optional[bool],
        typer.Option(
            "--quantize-embeddings/--keep-embeddings",
            hidden=True,
            help="Old spelling of --embeddings BITS / --embeddings keep.",
        ),
    ] = None,
    rotate: Annotated[
        bool,
        typer.Option(
            "--rotate/--no-rotate",
            help="Rotate the residual stream first (QuaRot-style, folded into the weights; RMSNorm models; unties a "
            "tied head).",
        ),
    ] = False,
    target_bpw: Annotated[
        Optional[float],
        typer.Option(
            "--target-bpw",
            help="Mixed precision: choose bits, group size and sym/asym per layer from a per-layer sensitivity pass "
            "so the blocks' linears average this many bits/weight (e.g. 4.5). Overrides --bits/--group-size/--sym for "
            "them.",
        ),
    ] = None,
    clip_search: Annotated[
        bool,
        typer.Option("--clip-search/--no-clip-search", help="GPTQ: per-group clipping range chosen by weighted MSE."),
    ] = True,
    act_order: Annotated[
        bool, typer.Option("--act-order/--no-act-order", help="GPTQ: most-activated columns first.")
    ] = True,
    damp: Annotated[
        float, typer.Option("--damp", help="GPTQ: damping as a fraction of mean(diag H).", min=0.0, max=1.0)
    ] = 0.01,
    data: DataOpt = None,
    calib_samples: SamplesOpt = 32,
    seq_len: SeqLenOpt = 512,
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Measure perplexity before and after (recorded in edgellm.json).")
    ] = True,
    eval_tokens: EvalTokensOpt = 4096,
    seed: Annotated[int, typer.Option("--seed", help="Seed for choosing calibration windows.")] = 0,
    max_memory: MaxMemoryOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted quantize from the layer it reached.")
    ] = False,
    force: ForceOpt = False,
):
    """Quantize a model's linear weights to 4 or 8 bits (RTN, GPTQ or AWQ), stored packed.

    Example: edgellm quantize SmolLM2-135M-Instruct.Q4_1.gguf --bits 4 --method gptq -o smol-q4/
    """
    from ..console import PROGRESS, quiet_transformers, show_warnings
    from ..pipeline.quantize import quant_config, run_quantize

    options = QuantizeOptions(
        bits=bits,
        method=method,
        group_size=group_size,
        sym=sym,
        float_zero=float_zero,
        embeddings=embeddings,
        quantize_embeddings=quantize_embeddings,
        rotate=rotate,
        target_bpw=target_bpw,
        clip_search=clip_search,
        act_order=act_order,
        damp=damp,
        data=data,
        calib_samples=calib_samples,
        seq_len=seq_len,
        evaluate=evaluate,
        eval_tokens=eval_tokens,
        seed=seed,
        max_memory=max_memory,
        resume=resume,
    )
    quant_config(options)  # every option before any heavy work
    with show_warnings():
        quiet_transformers()
        result = run_quantize(model, output, options, progress=PROGRESS, force=force)
    show_result(result, model, options)


def show_result(result: QuantizeResult, model: str, o: QuantizeOptions) -> None:
    """The worst layers' errors, sizes, the mixed plan and perplexity before / after."""
    from ..console import console

    console.print(_layer_table(result.layers, o))
    output, info = result.output, result.info
    src = dir_size(model) if not model.endswith(".gguf") else None
    console.print(
        f"wrote {output} ({human_bytes(dir_size(output))}"
        + (f", source {human_bytes(src)}" if src else "")
        + f") in {result.seconds:.1f} s"
    )
    if info.get("mixed"):
        console.print(_plan_line(info["mixed"]))
    e = info["embeddings"]
    console.print(
        f"bits/weight (decoder linears): {info['bits_per_weight']:.3f}; embeddings: "
        + (f"{e['bits']}-bit g{e['group_size']}" if e else "kept")
        + f"; file {human_bytes(dir_size(output))}"
    )
    if o.evaluate:
        before, after = result.before, result.after
        console.print(
            f"perplexity: {before.perplexity:.3f} -> {after.perplexity:.3f} "
            f"({(after.perplexity / before.perplexity - 1) * 100:+.2f}%) on {after.tokens} held-out tokens"
        )


def _layer_table(report: list[dict], o: QuantizeOptions):
    from rich.table import Table

    from ..quant.formats import QuantFormat

    method = Method(o.method).value
    fmt_text = (
        f"mixed to {o.target_bpw} bits/weight" if o.target_bpw is not None else f"{o.bits}-bit, group {o.group_size}"
    )
    table = Table(title=f"{method} {fmt_text}, {'sym' if o.sym else 'asym'}" + (", rotated" if o.rotate else ""))
    table.add_column("layer")
    table.add_column("shape", justify="right")
    table.add_column("format", justify="right")
    table.add_column("rel. output error", justify="right")
    worst = sorted(report, key=lambda r: -r["rel_error"])
    for r in worst[:8]:
        table.add_row(
            r["layer"],
            "x".join(map(str, r["shape"])),
            QuantFormat(r["bits"], r["group_size"], r["sym"], r.get("zero", "int")).label(),
            f"{r['rel_error']:.2e}",
        )
    if len(report) > 8:
        table.add_row(
            f"... {len(report) - 8} more (mean {sum(r['rel_error'] for r in report) / len(report):.2e})", "", "", ""
        )
    return table


def _plan_line(mixed: dict) -> str:
    counts: dict = {}
    for u in mixed["units"]:
        k = f"{u['bits']}-bit g{u['group_size']}{'' if u.get('sym', True) else ' asym'}"
        k += " fp16-zero" if u.get("zero") == "float" else ""
        counts[k] = counts.get(k, 0) + 1
    return (
        "plan: "
        + ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))
        + " (layer groups; recorded in edgellm.json)"
    )

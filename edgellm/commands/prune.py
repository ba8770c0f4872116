"""`edgellm prune`: unstructured / N:M sparsity, or structured removal that shrinks the model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..pipeline.prune import Method, PruneOptions, PruneResult, Structure
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


def prune(
    model: ModelArg,
    output: OutOpt,
    method: Annotated[
        Optional[Method],
        typer.Option(
            "--method",
            "-m",
            help="Unstructured or N:M sparsity by magnitude (baseline), wanda (|W| x input norm), sparsegpt "
            "(second-order, updates weights).",
        ),
    ] = None,
    sparsity: Annotated[
        Optional[float],
        typer.Option(
            "--sparsity",
            "-s",
            help="Fraction of each linear's weights to remove, in [0, 1). Default 0.5, or 1 - N/M with --pattern.",
        ),
    ] = None,
    pattern: Annotated[
        Optional[str],
        typer.Option(
            "--pattern",
            "-p",
            help="N:M semi-structured sparsity: at most N non-zeros in every M consecutive weights of a row, e.g. 2:4.",
        ),
    ] = None,
    structured: Annotated[
        Optional[Structure],
        typer.Option(
            "--structured",
            help="Remove whole layers, attention heads (KV groups), or MLP channels: the model really shrinks.",
        ),
    ] = None,
    ratio: Annotated[
        Optional[float],
        typer.Option(
            "--ratio",
            "-r",
            help="With --structured: fraction of layers / KV groups / MLP channels to remove, in (0, 1).",
        ),
    ] = None,
    damp: Annotated[float, typer.Option("--damp", help="SparseGPT: damping as a fraction of mean(diag H).")] = 0.01,
    data: DataOpt = None,
    calib_samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 512,
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Measure perplexity before and after (recorded in edgellm.json).")
    ] = True,
    eval_tokens: EvalTokensOpt = 4096,
    seed: Annotated[int, typer.Option("--seed", help="Seed for choosing calibration windows.")] = 0,
    max_memory: MaxMemoryOpt = None,
    force: ForceOpt = False,
):
    """Prune a model: unstructured or N:M sparsity (magnitude, Wanda, SparseGPT), or structured
    removal of layers, attention heads or MLP channels that leaves a smaller ordinary model.

    Unstructured and N:M pruning write exact zeros into dense weights: the file and a dense
    runtime are no smaller or faster, but the zeros survive `edgellm quantize` exactly
    (symmetric and asymmetric: 0.0 always maps to a code that decodes to exactly 0.0).
    Structured pruning slices the matrices and updates config.json, so the model is smaller and
    faster everywhere and plain `transformers` loads it.

    Examples: edgellm prune smol/ --method sparsegpt --pattern 2:4 -o smol-24/
              edgellm prune smol/ --structured mlp --ratio 0.25 -o smol-mlp75/
    """
    from ..console import PROGRESS, quiet_transformers, show_warnings
    from ..pipeline.prune import check_options, run_prune

    options = PruneOptions(
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        structured=structured,
        ratio=ratio,
        damp=damp,
        data=data,
        calib_samples=calib_samples,
        seq_len=seq_len,
        evaluate=evaluate,
        eval_tokens=eval_tokens,
        seed=seed,
        max_memory=max_memory,
    )
    check_options(options)  # every option before any heavy work (nothing is loaded or written on bad input)
    with show_warnings():
        quiet_transformers()
        result = run_prune(model, output, options, progress=PROGRESS, force=force)
    show_result(result, model, options)


def show_result(res: PruneResult, model: str, o: PruneOptions) -> None:
    """Sparsity per block (or the config before / after), parameters, sizes and perplexity."""
    from rich.table import Table

    from ..console import console

    output, report, result, before, after, seconds = (
        res.output,
        res.layers,
        res.result,
        res.before,
        res.after,
        res.seconds,
    )
    method = None if o.method is None else Method(o.method)
    structured = None if o.structured is None else Structure(o.structured)

    if report is not None:
        table = Table(
            title=f"{method.value}: sparsity reached per block ({result['sparsity_reached']:.2%} of decoder linears)"
        )
        table.add_column("block", justify="right")
        table.add_column("linears", justify="right")
        table.add_column("sparsity", justify="right")
        table.add_column("min / max per linear", justify="right")
        blocks: dict[str, list[dict]] = {}
        for r in report:
            blocks.setdefault(r["block"], []).append(r)
        for name, rows in blocks.items():
            n = sum(r["shape"][0] * r["shape"][1] for r in rows)
            z = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in rows)
            table.add_row(
                str(name),
                str(len(rows)),
                f"{z / n:.2%}",
                f"{min(r['sparsity'] for r in rows):.2%} / {max(r['sparsity'] for r in rows):.2%}",
            )
        console.print(table)
        console.print(
            "note: zeros in dense weights; size and dense-runtime speed are unchanged (structured pruning shrinks the "
            "model)"
        )
    else:
        table = Table(
            title=f"structured {structured.value}: removed {result['remove']} of {result['total']} {result['unit']}"
        )
        table.add_column("config")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        for key, (b, a) in result["config"].items():
            table.add_row(key, str(b), str(a))
        console.print(table)
        if structured.value == "layers":
            console.print(f"removed layers: {', '.join(map(str, result['removed']))}")
    pb, pa = result["parameters_before"], result["parameters_after"]
    console.print(
        f"parameters: {pb:,} -> {pa:,} ({(pa / pb - 1) * 100:+.1f}%)"
        + (f"; non-zero in decoder linears: {1 - result['sparsity_reached']:.1%}" if report is not None else "")
    )
    src = dir_size(model) if not str(model).endswith(".gguf") else None
    console.print(
        f"wrote {output} ({human_bytes(dir_size(output))}"
        + (f", source {human_bytes(src)}" if src else "")
        + f") in {seconds:.1f} s"
    )
    if before is not None:
        console.print(
            f"perplexity: {before.perplexity:.3f} -> {after.perplexity:.3f} "
            f"({(after.perplexity / before.perplexity - 1) * 100:+.2f}%) on {after.tokens} held-out tokens"
        )

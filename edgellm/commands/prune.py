"""`edgellm prune`: unstructured / N:M sparsity, or structured removal that shrinks the model."""

from __future__ import annotations

import time
from enum import Enum
from typing import Annotated, Optional

import typer

from .common import (
    DataOpt,
    EvalTokensOpt,
    ForceOpt,
    ModelArg,
    OutOpt,
    SamplesOpt,
    SeqLenOpt,
    check_context,
    check_range,
    data_tokens,
    dir_size,
    human_bytes,
    load,
)


class Method(str, Enum):
    magnitude = "magnitude"
    wanda = "wanda"
    sparsegpt = "sparsegpt"


class Structure(str, Enum):
    layers = "layers"
    heads = "heads"
    mlp = "mlp"


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
    from ..errors import EdgeLLMError
    from ..prune.masks import check_sparsity, parse_pattern

    # Validate every option before any heavy work (nothing is loaded or written on bad input).
    if (method is None) == (structured is None):
        raise EdgeLLMError(
            "give either --method {magnitude,wanda,sparsegpt} (with --sparsity or --pattern) or --structured "
            "{layers,heads,mlp} with --ratio"
        )
    if structured is not None and (sparsity is not None or pattern is not None):
        raise EdgeLLMError("--sparsity and --pattern apply to --method; --structured takes --ratio")
    if method is not None and ratio is not None:
        raise EdgeLLMError("--ratio applies to --structured; --method takes --sparsity or --pattern")
    if structured is not None and ratio is None:
        raise EdgeLLMError(f"--structured {structured.value} needs --ratio, the fraction to remove (e.g. 0.25)")
    nm = parse_pattern(pattern) if pattern is not None else None
    if sparsity is not None:
        check_sparsity(sparsity)
    if nm is not None and sparsity is not None and abs(sparsity - nm.sparsity) > 1e-9:
        raise EdgeLLMError(
            f"--sparsity {sparsity} contradicts --pattern {nm}, which removes {nm.sparsity:g} of the weights; drop "
            "--sparsity"
        )
    check_range("--damp", damp, 0.0, 1.0, hi_open=True)
    check_range("--sparsity", sparsity, 0.0, 1.0, hi_open=True)
    check_range("--seed", seed, 0, 2**32 - 1)
    if ratio is not None and not (0 < ratio < 1):
        raise EdgeLLMError(f"--ratio {ratio} is outside (0, 1); give the fraction to remove, e.g. 0.25")

    from ..console import PROGRESS, show_warnings
    from ..data import calibration_batch, split_tokens
    from ..evaluate import evaluate as measure
    from ..modelio import count_parameters, save_model
    from ..outputs import atomic_output_dir, check_output_dir
    from ..prune import apply as P
    from ..record import add_step

    inputs = [model, data]
    check_output_dir(output, force, inputs)
    with show_warnings():
        loaded = load(model)
        check_context(loaded.model, "--seq-len", seq_len)
        if loaded.record.get("quantization"):
            raise EdgeLLMError(f"'{model}' is quantized; prune the unquantized model, then quantize the pruned one")
        net = loaded.model
        if method is not None:
            cfg = P.PruneConfig(
                method=method.value,
                sparsity=nm.sparsity if nm else (0.5 if sparsity is None else sparsity),
                pattern=nm,
                damp=damp,
            )
            P.check_unstructured(net, cfg)
        else:
            P.plan_structured(net, structured.value, ratio)
        ids = data_tokens(loaded.tokenizer, data)
        needs_data = structured is not None or method != Method.magnitude
        calib = calibration_batch(ids, calib_samples, seq_len, seed=seed) if needs_data else None
        eval_ids = split_tokens(ids, "eval")
        before = measure(net, eval_ids, max_tokens=eval_tokens, progress=PROGRESS) if evaluate else None
        params_before = count_parameters(net)
        t0 = time.perf_counter()
        if method is not None:
            report, info = P.prune_unstructured(net, cfg, calib, progress=PROGRESS)
            params = cfg.to_dict()
        else:
            report, info = None, P.prune_structured(net, structured.value, ratio, calib, progress=PROGRESS)
            params = {"structured": structured.value, "ratio": ratio}
        seconds = time.perf_counter() - t0
        after = measure(net, eval_ids, max_tokens=eval_tokens, progress=PROGRESS) if evaluate else None
        params_after = count_parameters(net)
        quality = {"before": before.to_dict(), "after": after.to_dict()} if evaluate else None
        result = {"parameters_before": params_before, "parameters_after": params_after, **info}
        if report is not None:
            result["per_layer"] = [{"layer": r["layer"], "sparsity": r["sparsity"]} for r in report]
        else:
            result["note"] = "same number removed in every block so the config stays uniform; config.json updated"
        record = add_step(
            loaded.record,
            "prune",
            params=params,
            time_s=round(seconds, 2),
            data=None
            if calib is None
            else {
                "spec": data or "builtin:pydoc",
                "calib_samples": int(calib.shape[0]),
                "seq_len": int(calib.shape[1]),
                "seed": seed,
            },
            result=result,
            quality=quality,
        )
        with atomic_output_dir(output, force, inputs) as tmp:
            save_model(net, loaded.tokenizer, tmp, record)

    _summary(model, output, report, result, before, after, seconds, method, structured)


def _summary(model, output, report, result, before, after, seconds, method, structured) -> None:
    from rich.table import Table

    from ..console import console

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

"""`edgellm quantize`: calibrated 4/8-bit weight quantization, stored packed."""

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


class Embeddings(str, Enum):
    eight = "8"
    four = "4"
    keep = "keep"


class Method(str, Enum):
    rtn = "rtn"
    gptq = "gptq"
    awq = "awq"


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
    force: ForceOpt = False,
):
    """Quantize a model's linear weights to 4 or 8 bits (RTN, GPTQ or AWQ), stored packed.

    Example: edgellm quantize SmolLM2-135M-Instruct.Q4_1.gguf --bits 4 --method gptq -o smol-q4/
    """
    from rich.table import Table

    from ..console import PROGRESS, console, show_warnings
    from ..data import calibration_batch, split_tokens
    from ..errors import EdgeLLMError
    from ..evaluate import evaluate as measure
    from ..modelio import save_model
    from ..outputs import atomic_output_dir, check_output_dir
    from ..quant.apply import QuantConfig, quantize_model
    from ..quant.formats import QuantFormat
    from ..record import add_step

    if float_zero and sym:
        raise EdgeLLMError("--float-zero needs --asym (symmetric formats store no zero points)")
    fmt = QuantFormat(bits, group_size, sym, "float" if float_zero else "int")  # validates before any heavy work
    check_range("--damp", damp, 0.0, 1.0)
    check_range("--seed", seed, 0, 2**32 - 1)
    emb = embeddings.value if quantize_embeddings is None else (str(bits) if quantize_embeddings else "keep")
    cfg = QuantConfig(
        fmt=fmt,
        method=method.value,
        damp=damp,
        act_order=act_order,
        embeddings=emb,
        rotate=rotate,
        target_bpw=target_bpw,
        clip_search=clip_search,
        seed=seed,
    )
    inputs = [model, data]
    check_output_dir(output, force, inputs)
    with show_warnings():
        loaded = load(model)
        check_context(loaded.model, "--seq-len", seq_len)
        if loaded.record.get("quantization"):
            raise EdgeLLMError(f"'{model}' is already quantized; quantize the unquantized model instead")
        if rotate:
            from ..quant.rotation import check_rotatable

            check_rotatable(loaded.model)
        if target_bpw is not None:
            from ..quant.mixed import MIN_TOKENS, SENS_SAMPLES, SENS_TOKENS, check_budget

            check_budget(loaded.model, target_bpw)
            if min(calib_samples, SENS_SAMPLES) * min(seq_len, SENS_TOKENS) < MIN_TOKENS:
                raise EdgeLLMError(
                    f"--calib-samples {calib_samples} x --seq-len {seq_len} is too small for the sensitivity pass "
                    f"of --target-bpw; it needs at least {MIN_TOKENS} tokens"
                )
        ids = data_tokens(loaded.tokenizer, data)
        calib = calibration_batch(ids, calib_samples, seq_len, seed=seed)
        eval_ids = split_tokens(ids, "eval")
        before = measure(loaded.model, eval_ids, max_tokens=eval_tokens, progress=PROGRESS) if evaluate else None
        t0 = time.perf_counter()
        report, info = quantize_model(loaded.model, cfg, calib, progress=PROGRESS)
        seconds = time.perf_counter() - t0
        after = measure(loaded.model, eval_ids, max_tokens=eval_tokens, progress=PROGRESS) if evaluate else None
        quality = {"before": before.to_dict(), "after": after.to_dict()} if evaluate else None
        record = add_step(
            loaded.record,
            "quantize",
            params=cfg.to_dict(),
            time_s=round(seconds, 2),
            data={
                "spec": data or "builtin:pydoc",
                "calib_samples": int(calib.shape[0]),
                "seq_len": int(calib.shape[1]),
                "seed": seed,
            },
            quality=quality,
        )
        record["quantization"] = info
        with atomic_output_dir(output, force, inputs) as tmp:
            save_model(loaded.model, loaded.tokenizer, tmp, record)

    fmt_text = f"mixed to {target_bpw} bits/weight" if target_bpw is not None else f"{bits}-bit, group {group_size}"
    table = Table(title=f"{method.value} {fmt_text}, {'sym' if sym else 'asym'}" + (", rotated" if rotate else ""))
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
    console.print(table)
    src = dir_size(model) if not model.endswith(".gguf") else None
    console.print(
        f"wrote {output} ({human_bytes(dir_size(output))}"
        + (f", source {human_bytes(src)}" if src else "")
        + f") in {seconds:.1f} s"
    )
    if info.get("mixed"):
        counts: dict = {}
        for u in info["mixed"]["units"]:
            k = f"{u['bits']}-bit g{u['group_size']}{'' if u.get('sym', True) else ' asym'}"
            k += " fp16-zero" if u.get("zero") == "float" else ""
            counts[k] = counts.get(k, 0) + 1
        console.print(
            "plan: "
            + ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))
            + " (layer groups; recorded in edgellm.json)"
        )
    e = info["embeddings"]
    console.print(
        f"bits/weight (decoder linears): {info['bits_per_weight']:.3f}; embeddings: "
        + (f"{e['bits']}-bit g{e['group_size']}" if e else "kept")
        + f"; file {human_bytes(dir_size(output))}"
    )
    if evaluate:
        console.print(
            f"perplexity: {before.perplexity:.3f} -> {after.perplexity:.3f} "
            f"({(after.perplexity / before.perplexity - 1) * 100:+.2f}%) on {after.tokens} held-out tokens"
        )

"""`edgellm export`: ONNX graph + external weights + tokenizer, parity-checked against PyTorch."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..pipeline.export import ExportOptions, Format
from .common import ForceOpt, ModelArg, OutOpt, dir_size, human_bytes


def export(
    model: ModelArg,
    output: OutOpt,
    format: Annotated[
        Format,
        typer.Option(
            "--format",
            "-f",
            help="Quantized layers as com.microsoft.MatMulNBits (ONNX Runtime, fastest) or standard blocked "
            "DequantizeLinear + MatMul (qdq).",
        ),
    ] = Format.matmulnbits,
    accuracy_level: Annotated[
        int,
        typer.Option(
            "--accuracy-level",
            help="MatMulNBits accuracy_level: 4 = int8 activations (fastest on CPU), 0 = fp32 activations.",
            min=0,
            max=4,
        ),
    ] = 4,
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check",
            help="Verify with onnx.checker and ONNX Runtime vs PyTorch logits (prompt + 8 cached decode steps).",
        ),
    ] = True,
    max_memory: Annotated[
        Optional[str],
        typer.Option(
            "--max-memory",
            help="Memory budget, e.g. 6GB (default: 75% of the available RAM); a model whose parity check does "
            "not fit it (or has over 512 MB of weights) is checked layer by layer.",
        ),
    ] = None,
    force: ForceOpt = False,
):
    """Export a model directory (float, pruned, distilled, or 4/8-bit quantized) to ONNX with a KV cache.

    Quantized layers keep exactly the packed values edgellm quantize chose.
    Example: edgellm export smol-q4/ -o smol-q4-onnx/
    """
    from ..console import PROGRESS, quiet_transformers, show_warnings
    from ..pipeline.export import run_export

    options = ExportOptions(format=format, accuracy_level=accuracy_level, check=check, max_memory=max_memory)
    with show_warnings():
        quiet_transformers()
        result = run_export(model, output, options, progress=PROGRESS, force=force)
    show_result(result, model, options)


def show_result(result, model: str, o: ExportOptions) -> None:
    """Sizes, time and the ONNX Runtime parity figures."""
    from ..console import console

    output = result.out
    q = result.quantization
    kind = (
        "float"
        if not q
        else f"{q['bits']}-bit g{q['group_size']} {'sym' if q['sym'] else 'asym'} ({Format(o.format).value})"
    )
    console.print(
        f"wrote {output} ({kind}, {human_bytes(dir_size(output))}; model.onnx.data "
        f"{human_bytes(result.sizes['model.onnx.data'])}) in {result.seconds:.1f} s"
    )
    if result.parity and result.parity.get("check") == "layer by layer":
        p = result.parity
        line = (
            f"parity, layer by layer: head max |Δlogit| "
            f"{p['max_abs_diff']:.2e} (max |logit| {p['max_abs_logit']:.1f}); worst layer "
            f"{p['layer_exact_max_rel_diff']:.2e}, through the cache {p['cache_vs_nocache_max_rel_diff']:.2e} "
            "(relative)"
        )
        console.print(line)
    elif result.parity:
        p = result.parity
        line = (
            f"parity: max |Δlogit| {p['max_abs_diff']:.2e} (max |logit| {p['max_abs_logit']:.1f}), cache vs no cache "
            f"{p['cache_vs_nocache_max_abs_diff']:.2e}"
        )
        if "accuracy_level_0_max_abs_diff" in p:
            line += f"; with fp32 activations {p['accuracy_level_0_max_abs_diff']:.2e}"
        console.print(line)

"""`edgellm export`: ONNX graph + external weights + tokenizer, parity-checked against PyTorch."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from .common import ForceOpt, ModelArg, OutOpt, dir_size, human_bytes, load


class Format(str, Enum):
    matmulnbits = "matmulnbits"
    qdq = "qdq"


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
    force: ForceOpt = False,
):
    """Export a model directory (float, pruned, distilled, or 4/8-bit quantized) to ONNX with a KV cache.

    Quantized layers keep exactly the packed values edgellm quantize chose.
    Example: edgellm export smol-q4/ -o smol-q4-onnx/
    """
    from ..console import console, show_warnings, status
    from ..outputs import check_output_dir

    check_output_dir(output, force, [model])  # before the (slow) load
    with show_warnings():
        loaded = load(model)
        from ..export.exporter import export_model
        from ..export.weights import Options

        with status(f"exporting to {output}" + (" and checking parity" if check else "")):
            result = export_model(
                loaded, output, Options(format=format.value, accuracy_level=accuracy_level), check=check, force=force
            )
    q = result.quantization
    kind = "float" if not q else f"{q['bits']}-bit g{q['group_size']} {'sym' if q['sym'] else 'asym'} ({format.value})"
    console.print(
        f"wrote {output} ({kind}, {human_bytes(dir_size(output))}; model.onnx.data "
        f"{human_bytes(result.sizes['model.onnx.data'])}) in {result.seconds:.1f} s"
    )
    if result.parity:
        p = result.parity
        line = (
            f"parity: max |Δlogit| {p['max_abs_diff']:.2e} (max |logit| {p['max_abs_logit']:.1f}), cache vs no cache "
            f"{p['cache_vs_nocache_max_abs_diff']:.2e}"
        )
        if "accuracy_level_0_max_abs_diff" in p:
            line += f"; with fp32 activations {p['accuracy_level_0_max_abs_diff']:.2e}"
        console.print(line)

"""Export a model directory (float, pruned, distilled, or 4/8-bit quantized) to ONNX with a KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from .common import load_spec, status
from .options import option


class Format(str, Enum):
    matmulnbits = "matmulnbits"
    qdq = "qdq"


@dataclass
class ExportOptions:
    format: Format = option(Format.matmulnbits, "--format")  # ONNX Runtime's fastest int4 / int8 op
    accuracy_level: int = option(4, "--accuracy-level", min=0, max=4)  # 4: int8 activations, fastest on CPU
    check: bool = option(True, "--check")  # onnx.checker and ONNX Runtime vs PyTorch logits


def run_export(model: str, output: Path, options: ExportOptions, progress=None, force: bool = False):
    """Export `model` to the directory `output`; returns edgellm.export.exporter.ExportResult."""
    from ..export.exporter import export_model
    from ..export.weights import Options
    from ..outputs import check_output_dir

    o = options
    check_output_dir(output, force, [model])  # before the (slow) load
    loaded = load_spec(model, progress=progress)
    with status(progress, f"exporting to {output}" + (" and checking parity" if o.check else "")):
        return export_model(
            loaded,
            output,
            Options(format=Format(o.format).value, accuracy_level=o.accuracy_level),
            check=o.check,
            force=force,
        )

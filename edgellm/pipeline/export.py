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
    max_memory: str | None = option(None, "--max-memory")  # e.g. 6GB; None: a safe fraction of available RAM


def run_export(model: str, output: Path, options: ExportOptions, progress=None, force: bool = False):
    """Export `model` to the directory `output`; returns edgellm.export.exporter.ExportResult.

    A local directory (every family but GPT-2) streams (export/stream.py): one part of the model in memory
    at a time, its weights written tensor by tensor, the parity check on the whole model when it
    fits --max-memory and FULL_CHECK_MAX_BYTES, else layer by layer. Other inputs load whole,
    and are refused when that does not fit the budget."""
    from ..export.exporter import export_model
    from ..export.stream import export_streamed, not_streamed
    from ..export.weights import Options, check_options
    from ..memory import budget
    from ..modelio import load_config, resolve_spec
    from ..outputs import check_output_dir

    o = options
    check_output_dir(output, force, [model])  # before the (slow) load
    limit, how = budget(o.max_memory)
    opts = Options(format=Format(o.format).value, accuracy_level=o.accuracy_level)
    check_options(opts)
    path = Path(resolve_spec(model))
    config = load_config(str(path))
    reason = not_streamed(path, config)
    if reason is None:
        with status(progress, f"exporting {model} to {output} part by part"):
            return export_streamed(path, config, output, opts, o.check, force, limit, how, progress)
    if path.is_dir():
        _check_resident_fits(path, reason, limit, how)
    loaded = load_spec(model, progress=progress)
    with status(progress, f"exporting to {output}" + (" and checking parity" if o.check else "")):
        return export_model(
            loaded,
            output,
            Options(format=Format(o.format).value, accuracy_level=o.accuracy_level),
            check=o.check,
            force=force,
        )


def _check_resident_fits(path: Path, reason: str, limit: int, how: str) -> None:
    """The resident export holds the model in fp32, and its check the export twice in ONNX Runtime."""
    import math

    from ..checkpoint import Checkpoint
    from ..errors import EdgeLLMError
    from ..memory import human, rss

    ckpt = Checkpoint(path)
    params = sum(math.prod(s) for _, _, s in ckpt.entries.values())
    need = rss() + 3 * 4 * params
    if need > limit:
        raise EdgeLLMError(
            f"{reason} is not streamed yet: exporting it loads the whole model, about {human(need)}, "
            f"over the budget of {human(limit)} ({how}); raise --max-memory"
        )

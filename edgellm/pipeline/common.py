"""Checks and loading shared by the workflows (no printing: a spinner goes through `progress`)."""

from __future__ import annotations

import contextlib
import math

from ..errors import EdgeLLMError

SEED_MAX = 2**32 - 1  # numpy's seed range


def status(progress, message: str):
    """`progress.status(message)` where the progress object shows one (the CLI's spinner), else nothing."""
    show = getattr(progress, "status", None)
    return show(message) if show is not None else contextlib.nullcontext()


def data_tokens(tokenizer, data: str | None):
    """The token ids of --data (or the built-in corpus); refuses text too short to measure anything."""
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


def load_spec(spec: str, message: str = "loading model", progress=None):
    """Load a model spec; a damaged or unloadable one is an EdgeLLMError naming it."""
    import json

    from ..modelio import load_model

    with status(progress, f"{message} {spec}"):
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


def calib_data(data: str | None, calib, seed: int) -> dict:
    """The `data` entry of an edgellm.json step for a calibration batch."""
    return {
        "spec": data or "builtin:pydoc",
        "calib_samples": int(calib.shape[0]),
        "seq_len": int(calib.shape[1]),
        "seed": seed,
    }

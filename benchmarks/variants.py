"""What to benchmark: `VARIANT[:BACKEND]` parsed into a path, a kind and a backend.

A variant is
- an export directory (`model.onnx` inside)  -> `numba` (default when edgellm.runtime is
  available), `onnxruntime`, `ort-genai` (ONNX Runtime GenAI on the same files, through the
  export's genai_config.json), `openvino` (OpenVINO on the same graph, converted to IR, in the
  python named by EDGELLM_OV_PYTHON: benchmarks/ov_backend.py), or `numba-cuda` (alias `cuda`:
  the runtime's GPU path);
- a model directory (`config.json` inside)    -> `torch` (transformers, the generate loop);
- a `.gguf` file                              -> `llama.cpp` (needs llama-cpp-python) or `torch`
  (transformers dequantizes it to fp32).

`EXPORT+lookup`, `EXPORT+DRAFT_EXPORT` and `EXPORT+DRAFT_EXPORT+lookup` (numba only) add a speculation
phase to the row: plain greedy vs prompt lookup / the draft export / both on copy tasks and free
generation (speculation.py), reported as acceptance, mean accepted length and speed-up.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

from edgellm.errors import EdgeLLMError

BACKENDS = ("numba", "onnxruntime", "torch", "llama.cpp", "numba-cuda", "ort-genai", "openvino")
ALIASES = {
    "ort": "onnxruntime",
    "onnxruntime-genai": "ort-genai",
    "onnxruntime_genai": "ort-genai",
    "ort_genai": "ort-genai",
    "genai": "ort-genai",
    "ov": "openvino",
    "llamacpp": "llama.cpp",
    "llama_cpp": "llama.cpp",
    "pytorch": "torch",
    "transformers": "torch",
    "cuda": "numba-cuda",
    "numba_cuda": "numba-cuda",
}
KIND_BACKENDS = {
    "export": ("numba", "onnxruntime", "numba-cuda", "ort-genai", "openvino"),
    "model": ("torch",),
    "gguf": ("llama.cpp", "torch"),
}
GENAI_CONFIG = "genai_config.json"  # export/interop.py writes it beside model.onnx

LLAMA_CPP_HINT = (
    "install it with the edgellm 'peers' extra: pip install 'edgellm[peers]' (this compiles "
    'llama.cpp; for a build tuned to this CPU set CMAKE_ARGS="-DGGML_NATIVE=on")'
)


@dataclass
class Variant:
    spec: str  # as the user wrote it
    path: str  # resolved path
    kind: str  # export | model | gguf
    backend: str  # one of BACKENDS
    label: str  # unique, short: "<name>:<backend>" ("<name>+lookup:numba", "<name>+<draft name>:numba")
    speculate: str | None = None  # "lookup", a draft export's resolved path, or None

    def to_dict(self) -> dict:
        return asdict(self)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def numba_runtime_available() -> bool:
    """True when edgellm.runtime exposes a generator the numba backend can drive."""
    return _has_module("edgellm.runtime.model")


def _kind(path: Path, spec: str) -> str:
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EdgeLLMError(f"GGUF file '{path}' in variant '{spec}' does not exist")
        return "gguf"
    if not path.exists():
        raise EdgeLLMError(
            f"variant '{spec}': '{path}' does not exist (expected an export directory, a model directory or a .gguf "
            "file)"
        )
    if path.is_dir() and (path / "model.onnx").is_file():
        return "export"
    if path.is_dir() and (path / "config.json").is_file():
        return "model"
    raise EdgeLLMError(
        f"variant '{spec}': '{path}' is neither an export directory (model.onnx), a model directory (config.json) nor "
        "a .gguf file"
    )


def parse(spec: str) -> Variant:
    """One `PATH[:BACKEND]` -> Variant, or an EdgeLLMError that says what is wrong."""
    raw = spec
    backend = None
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists():
        name = ALIASES.get(tail.lower(), tail.lower())
        if name not in BACKENDS:
            raise EdgeLLMError(f"unknown backend '{tail}' in variant '{raw}'; choose one of {', '.join(BACKENDS)}")
        backend, spec = name, head
    spec, with_ = split_speculation(spec, raw)
    path = Path(spec).expanduser()
    kind = _kind(path, raw)
    allowed = KIND_BACKENDS[kind]
    if backend is None:
        backend = allowed[0]
        if backend == "numba" and not numba_runtime_available():
            backend = "onnxruntime"
    elif backend not in allowed:
        raise EdgeLLMError(
            f"variant '{raw}': backend '{backend}' cannot run a{'n' if kind == 'export' else ''} {kind} "
            f"({'directory' if kind != 'gguf' else 'file'}); use one of {', '.join(allowed)}"
        )
    check_backend_installed(backend, raw)
    if backend == "ort-genai" and not (path / GENAI_CONFIG).is_file():
        raise EdgeLLMError(
            f"variant '{raw}': '{path}' has no {GENAI_CONFIG} (exported before edgellm wrote one); export the model "
            f"again (edgellm export MODEL -o {path.name}-new) to run it on ONNX Runtime GenAI"
        )
    name = path.name or str(path)
    if with_ is not None:
        if kind != "export" or backend != "numba":
            raise EdgeLLMError(
                f"variant '{raw}': speculation (+{'lookup' if with_ == 'lookup' else 'DRAFT'}) runs on an export "
                f"directory on the numba backend, not a{'n' if kind == 'export' else ''} {kind} on {backend}"
            )
        label = "lookup"
        if with_ != "lookup":
            draft_spec, both = split_lookup(with_)
            draft = Path(draft_spec).expanduser()
            if not (draft / "model.onnx").is_file():
                raise EdgeLLMError(
                    f"variant '{raw}': the draft '{draft}' is not an export directory (no model.onnx); give "
                    "EXPORT+lookup, EXPORT+DRAFT_EXPORT_DIR or EXPORT+DRAFT_EXPORT_DIR+lookup"
                )
            with_ = str(draft.resolve()) + (LOOKUP_TAIL if both else "")
            label = draft.name + (LOOKUP_TAIL if both else "")
        name += "+" + label
    return Variant(
        spec=raw, path=str(path.resolve()), kind=kind, backend=backend, label=f"{name}:{backend}", speculate=with_
    )


LOOKUP_TAIL = "+lookup"  # EXPORT+DRAFT+lookup: prompt lookup first, the draft elsewhere (run --lookup --draft)


def split_lookup(with_: str) -> tuple[str, bool]:
    """A speculation spec's draft part: 'DRAFT+lookup' (and no directory of that name) -> (DRAFT,
    True), lookup first and the draft elsewhere; 'DRAFT' -> (DRAFT, False)."""
    both = with_.lower().endswith(LOOKUP_TAIL) and not Path(with_).expanduser().exists()
    return (with_[: -len(LOOKUP_TAIL)] if both else with_), both


def split_speculation(spec: str, raw: str) -> tuple[str, str | None]:
    """`PATH+lookup` / `PATH+DRAFT` -> (PATH, "lookup" / DRAFT); a path that exists as written
    (even with a '+' in it) is not split."""
    if Path(spec).expanduser().exists():
        return spec, None
    head, sep, tail = spec.rpartition("+")
    while sep and head:
        if Path(head).expanduser().exists():
            if not tail:
                raise EdgeLLMError(f"variant '{raw}': nothing after '+'; give EXPORT+lookup or EXPORT+DRAFT_EXPORT_DIR")
            return head, ("lookup" if tail.lower() == "lookup" else tail)
        head, sep, _ = head.rpartition("+")
        tail = spec[len(head) + 1 :]
    return spec, None


def check_backend_installed(backend: str, spec: str) -> None:
    if backend == "llama.cpp" and not _has_module("llama_cpp"):
        raise EdgeLLMError(f"variant '{spec}' needs llama-cpp-python, which is not installed; {LLAMA_CPP_HINT}")
    if backend in ("numba", "numba-cuda") and not numba_runtime_available():
        raise EdgeLLMError(
            f"variant '{spec}': the numba runtime (edgellm.runtime) is not available in this install; use "
            "':onnxruntime'"
        )
    if backend == "ort-genai" and not _has_module("onnxruntime_genai"):
        raise EdgeLLMError(
            f"variant '{spec}' needs onnxruntime-genai, which is not installed; install it with: "
            "pip install onnxruntime-genai"
        )
    if backend == "openvino":
        from .ov_backend import ov_python

        try:
            ov_python()
        except EdgeLLMError as exc:
            raise EdgeLLMError(f"variant '{spec}': {exc}") from None
    if backend == "onnxruntime" and not _has_module("onnxruntime"):
        raise EdgeLLMError(f"variant '{spec}' needs onnxruntime; install it with: pip install 'edgellm[ort]'")
    if backend == "torch" and not (_has_module("torch") and _has_module("transformers")):
        raise EdgeLLMError(
            f"variant '{spec}' needs torch and transformers; install them with: pip install 'edgellm[compress]'"
        )


def parse_all(specs: list[str]) -> list[Variant]:
    """Parse every variant (all errors before any work) and make labels unique."""
    if not specs:
        raise EdgeLLMError("give at least one variant (an export directory, a model directory or a .gguf file)")
    variants = [parse(s) for s in specs]
    seen: dict[str, int] = {}
    for v in variants:
        n = seen.get(v.label, 0)
        seen[v.label] = n + 1
        if n:
            v.label = f"{v.label}#{n + 1}"
    return variants

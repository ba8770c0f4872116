"""Optional heavy dependencies, and the extra of pyproject.toml that provides each one.

The base install (`pip install edgellm`) is the device install: numpy, numba, tokenizers, typer,
rich. Everything else comes with an extra; a command that needs a module the install lacks exits
with code 2 and names the extra (`require` below, and the CLI's guard for imports deep inside a
command, via `missing_extra_message`).
"""

from __future__ import annotations

import importlib

from .errors import EdgeLLMError

# top-level import name -> extra (keep in step with [project.optional-dependencies])
EXTRA_OF = {
    "torch": "compress",
    "transformers": "compress",
    "safetensors": "compress",
    "accelerate": "compress",
    "gguf": "compress",
    "onnx": "compress",
    "onnxscript": "compress",
    "yaml": "compress",
    "onnxruntime": "ort",
    "jinja2": "chat",
    "matplotlib": "bench",
    "jsonschema": "bench",
    "psutil": "bench",
    "pynvml": "bench",
    "llama_cpp": "peers",
    "bitsandbytes": "gpu",
    "optimum": "gpu",
    "uvicorn": "serve",
    "starlette": "serve",
    "llguidance": "serve",
    "datasets": "data",
}


def install_hint(module: str) -> str:
    extra = EXTRA_OF.get(module.split(".")[0], "all")
    return f"pip install 'edgellm[{extra}]'"


def require(module: str, what: str = "this command"):
    """Import `module` or raise an EdgeLLMError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:  # a broken install of something else
            raise
        raise EdgeLLMError(
            f"{what} needs '{top}', which is not installed; install it with: {install_hint(top)}"
        ) from None


def missing_extra_message(exc: ImportError, what: str) -> str | None:
    """The one-line error for an ImportError of an optional dependency, or None when the missing
    module is not one of the extras' (then it is a bug and is reported as one)."""
    name = getattr(exc, "name", None)
    top = name.split(".")[0] if name else None
    if top not in EXTRA_OF:
        return None
    return f"{what} needs '{top}', which is not installed; install it with: {install_hint(top)}"

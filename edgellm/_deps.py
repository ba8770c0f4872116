"""Optional heavy dependencies, imported by the commands that need them.

The base install (`pip install edgellm`) is the device install: numpy, numba, onnx, tokenizers,
typer, rich. Everything that touches PyTorch comes with the `compress` extra.
"""

import importlib

from .errors import EdgeLLMError

_EXTRA_OF = {
    "torch": "compress",
    "transformers": "compress",
    "safetensors": "compress",
    "onnxruntime": "ort",
    "gguf": "compress",
    "matplotlib": "bench",
    "llama_cpp": "peers",
}


def require(module: str):
    """Import `module` or raise an EdgeLLMError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA_OF.get(module.split(".")[0], "compress")
        raise EdgeLLMError(
            f"this command needs '{module}', which is not installed ({exc}); "
            f"install it with: pip install 'edgellm[{extra}]'"
        ) from None

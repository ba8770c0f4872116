"""The commands that live in their own module (edgellm/commands/<name>.py). Until a command's
module exists it is listed in --help and says it is not yet available when run."""

import importlib
import importlib.util

from ..errors import EdgeLLMError

PENDING = {
    "export": "Export to ONNX with KV cache and packed low-bit weights. (not yet available)",
    "run": "Stream tokens from an exported model on the torch-free runtime. (not yet available)",
    "bench": "Latency, memory, energy and quality, side by side with peers. (not yet available)",
    "prune": "Unstructured, 2:4 or structured pruning. (not yet available)",
    "distill": "Train a smaller student on the teacher's logits. (not yet available)",
}


def load(name: str):
    """The command function `edgellm.commands.<name>.<name>`, or a placeholder that says it is missing."""
    if importlib.util.find_spec(f"{__package__}.{name}") is not None:
        return getattr(importlib.import_module(f"{__package__}.{name}"), name)

    def command():
        raise EdgeLLMError(f"'edgellm {name}' is not yet available in this version")

    command.__name__ = name
    command.__doc__ = PENDING[name]
    return command

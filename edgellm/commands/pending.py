"""Commands whose issue has not landed yet: listed in --help, and say so when run."""

from ..errors import EdgeLLMError

PENDING = {
    "distill": "Train a smaller student on the teacher's logits. (not yet available)",
    "prune": "Unstructured, 2:4 or structured pruning. (not yet available)",
    "export": "Export to ONNX with KV cache and packed low-bit weights. (not yet available)",
    "run": "Stream tokens from an exported model on the torch-free runtime. (not yet available)",
    "bench": "Latency, memory, energy and quality, side by side with peers. (not yet available)",
}


def make(name: str):
    def command():
        raise EdgeLLMError(f"'edgellm {name}' is not yet available in this version")

    command.__name__ = name
    command.__doc__ = PENDING[name]
    return command

"""Drive edgellm.runtime (NumbaModel, OrtModel: `reset()`, `forward(ids, all_logits)`) with the
benchmark's backend protocol (see backends.py). Only the runtime's public classes are used."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class RuntimeAdapter:
    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def prefill(self, ids) -> np.ndarray:
        self.model.reset()
        return self.model.forward(ids)

    def step(self, token: int) -> np.ndarray:
        return self.model.forward([token])

    def logits(self, ids) -> np.ndarray:
        self.model.reset()
        out = self.model.forward(ids, all_logits=True)
        self.model.reset()
        return out

    def traffic(self) -> dict | None:
        """Weights read and multiply-accumulates per decode token, from the numba model's own
        descriptors (every linear + the LM head; one embedding row is negligible). None on the
        ORT runner, which exposes no such count."""
        weights = getattr(self.model, "weights", None)
        if weights is None or not hasattr(weights, "bytes_per_token"):
            return None
        macs = sum(int(d.n) * int(d.k) for d in weights.linears())
        return {
            "bytes_per_token": int(weights.bytes_per_token),
            "macs_per_token": macs,
            "quantized": bool(weights.bits),
            "source": "numba runtime's weight descriptors (linears + LM head)",
        }

    def max_context(self) -> int:
        return self.model.n_ctx

    def close(self) -> None:
        close = getattr(self.model, "close", None)
        if close:
            close()
        self.model = None


def open_model(path: str, threads: int, engine: str = "numba", n_ctx: int | None = None) -> RuntimeAdapter:
    """Load an export directory on the runtime's numba kernels or its onnxruntime runner.

    `n_ctx` sizes the preallocated KV cache to what the benchmark needs (not the model's maximum),
    as a deployment would; the numba model is warmed up (JIT compile or cache load) by the worker's
    warm-up phase, not here, so the load time stays the load time."""
    from tokenizers import Tokenizer

    if engine == "numba":
        from edgellm.runtime.model import NumbaModel as Model
    elif engine == "numba-cuda":
        from edgellm.runtime.cuda.device import open_gpu
        from edgellm.runtime.cuda.model import CudaModel as Model

        open_gpu()
    else:
        from edgellm.runtime.ort_backend import OrtModel as Model
    model = Model(path, n_ctx=n_ctx, threads=threads)
    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    return RuntimeAdapter(model, tok)

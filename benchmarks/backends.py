"""One small protocol over every engine the benchmark drives, greedy and batch 1.

    b = make_backend(variant, threads)
    b.load()                      # read weights, build sessions (timed as load)
    b.encode(text) -> list[int]   # the variant's own tokenizer
    b.prefill(ids) -> logits[V]   # reset the KV cache, run the prompt, last position's logits
    b.step(token) -> logits[V]    # one decode step on the cache
    b.logits(ids) -> logits[T, V] # all positions, fresh context (quality)
    b.close()

Heavy libraries are imported inside load(), so a worker only pays for the engine it runs (an
onnxruntime or numba worker never imports torch: its peak RSS must not include it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeLLMError


class Backend:
    name = "?"

    def __init__(self, path: str, threads: int, n_ctx: int | None = None):
        self.path, self.threads, self.n_ctx_needed = path, threads, n_ctx

    def load(self) -> None: ...
    def encode(self, text: str) -> list[int]: ...
    def prefill(self, ids: list[int]) -> np.ndarray: ...
    def step(self, token: int) -> np.ndarray: ...
    def logits(self, ids: list[int]) -> np.ndarray: ...
    def max_context(self) -> int | None: return None
    def close(self) -> None: ...


class TorchBackend(Backend):
    """transformers model (HF directory, quantized edgellm directory, or .gguf dequantized)."""

    name = "torch"

    def load(self):
        import torch

        from edgellm.console import quiet_transformers
        from edgellm.modelio import load_model

        torch.set_num_threads(self.threads)
        quiet_transformers()
        loaded = load_model(self.path)
        self.torch, self.model, self.tok = torch, loaded.model, loaded.tokenizer
        self.past = None

    def encode(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _run(self, ids, past):
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), past_key_values=past, use_cache=True)
        return out

    def prefill(self, ids):
        out = self._run(ids, None)
        self.past = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def step(self, token):
        out = self._run([token], self.past)
        self.past = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def logits(self, ids):
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.tensor([ids]), use_cache=False).logits[0].float().numpy()

    def max_context(self):
        return getattr(self.model.config, "max_position_embeddings", None)

    def close(self):
        self.model = self.past = None


def _export_config(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "edgellm.config" not in meta:
        raise EdgeLLMError(f"'{path}/model.onnx' has no edgellm.config metadata; re-export it with 'edgellm export'")
    return json.loads(meta["edgellm.config"])


class OrtBackend(Backend):
    """A plain ONNX Runtime session over an export directory (docs/EXPORT_FORMAT.md I/O)."""

    name = "onnxruntime"

    def load(self):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = Path(self.path)
        self.cfg = _export_config(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.past, self.n_past = None, 0

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def _empty_past(self):
        c = self.cfg
        shape = (1, c["num_kv_heads"], 0, c["head_dim"])
        return {f"past_key_values.{i}.{kv}": np.zeros(shape, np.float32) for i in range(c["num_layers"]) for kv in ("key", "value")}

    def _run(self, ids, past, n_past):
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], np.int64),
                "attention_mask": np.ones((1, n_past + n), np.int64),
                "position_ids": np.arange(n_past, n_past + n, dtype=np.int64)[None]}
        feed.update(past)
        feed = {k: v for k, v in feed.items() if k in self.inputs}
        outs = dict(zip(self.outputs, self.sess.run(None, feed)))
        present = {k.replace("present.", "past_key_values.", 1): v for k, v in outs.items() if k.startswith("present.")}
        return outs["logits"][0], present

    def prefill(self, ids):
        logits, self.past = self._run(ids, self._empty_past(), 0)
        self.n_past = len(ids)
        return logits[-1]

    def step(self, token):
        logits, self.past = self._run([token], self.past, self.n_past)
        self.n_past += 1
        return logits[-1]

    def logits(self, ids):
        return self._run(ids, self._empty_past(), 0)[0]

    def max_context(self):
        return self.cfg.get("max_position_embeddings")

    def close(self):
        self.sess = self.past = None


class RuntimeBackend(Backend):
    """edgellm.runtime (numba kernels, or its onnxruntime runner) through its public API."""

    name = "numba"

    def load(self):
        from . import runtime_adapter

        self.impl = runtime_adapter.open_model(self.path, self.threads, engine=self.name, n_ctx=self.n_ctx_needed)

    def encode(self, text):
        return self.impl.encode(text)

    def prefill(self, ids):
        return self.impl.prefill(ids)

    def step(self, token):
        return self.impl.step(token)

    def logits(self, ids):
        return self.impl.logits(ids)

    def max_context(self):
        return self.impl.max_context()

    def close(self):
        self.impl = None


class LlamaCppBackend(Backend):
    """llama.cpp through llama-cpp-python on a .gguf file (the peer people would otherwise use)."""

    name = "llama.cpp"

    def load(self, logits_all: bool = False):
        try:
            import llama_cpp
        except ImportError:
            from .variants import LLAMA_CPP_HINT

            raise EdgeLLMError(f"llama-cpp-python is not installed; {LLAMA_CPP_HINT}") from None
        self.n_ctx = self.n_ctx_needed or 2048
        self.llm = llama_cpp.Llama(model_path=self.path, n_ctx=self.n_ctx, n_batch=512, n_ubatch=512,
                                   n_threads=self.threads, n_threads_batch=self.threads,
                                   logits_all=logits_all, verbose=False)
        self.logits_all = logits_all

    def encode(self, text):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _last(self) -> np.ndarray:
        # without logits_all llama-cpp-python keeps no scores: read the last row from the context
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).copy()

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return self._last()

    def step(self, token):
        self.llm.eval([token])
        return self._last()

    def logits(self, ids):
        if not self.logits_all:  # quality needs every position: reopen once with logits_all
            self.close()
            self.load(logits_all=True)
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], np.float32)

    def max_context(self):
        return self.n_ctx

    def close(self):
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None and hasattr(llm, "close"):
            llm.close()


class Slow(Backend):
    """Test-only wrapper (variant prefix `slow:`): sleeps `delay` before every model call."""

    def __init__(self, inner: Backend, delay: float):
        self.inner, self.delay, self.name = inner, delay, inner.name

    def load(self): self.inner.load()
    def encode(self, text): return self.inner.encode(text)
    def max_context(self): return self.inner.max_context()
    def close(self): self.inner.close()

    def prefill(self, ids):
        time.sleep(self.delay)
        return self.inner.prefill(ids)

    def step(self, token):
        time.sleep(self.delay)
        return self.inner.step(token)

    def logits(self, ids):
        return self.inner.logits(ids)


def make_backend(variant: dict, threads: int, n_ctx: int | None = None) -> Backend:
    """The backend for a parsed variant. `n_ctx`: the context the benchmark needs (KV cache size
    for engines that preallocate it). Export directories run on edgellm.runtime when it is
    installed (its numba model, or its onnxruntime runner); a plain ORT session otherwise."""
    from . import runtime_adapter
    from .variants import SLOW_DELAY_S

    backend = variant["backend"]
    if backend == "numba":
        cls = RuntimeBackend
    elif backend == "numba-cuda":
        cls = type("RuntimeCuda", (RuntimeBackend,), {"name": "numba-cuda"})
    elif backend == "onnxruntime":
        cls = type("RuntimeOrt", (RuntimeBackend,), {"name": "onnxruntime"}) if runtime_adapter.available("onnxruntime") else OrtBackend
    else:
        cls = {"torch": TorchBackend, "llama.cpp": LlamaCppBackend}[backend]
    b = cls(variant["path"], threads, n_ctx)
    return Slow(b, SLOW_DELAY_S) if variant.get("slow") else b

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
    def max_context(self) -> int | None:
        return None

    def close(self) -> None: ...

    def traffic(self) -> dict | None:
        """Work per decode token: {bytes_per_token, macs_per_token (or None), quantized, source},
        or None when the engine does not say (the worker then uses the file size)."""
        return None


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

    def traffic(self):
        """Every matrix the decode step multiplies by (Linear, GPT-2's Conv1D, edgellm's packed
        QuantLinear; embeddings excluded, a tied LM head counted once as the head)."""
        nbytes = macs = 0
        quantized = False
        for m in self.model.modules():
            if isinstance(m, self.torch.nn.Embedding) or "Embedding" in type(m).__name__:
                continue
            if hasattr(m, "in_features") and hasattr(m, "out_features"):
                macs += m.in_features * m.out_features
            elif type(m).__name__ == "Conv1D":
                macs += m.weight.numel()
            else:
                continue
            quantized |= hasattr(m, "fmt")
            nbytes += sum(
                t.numel() * t.element_size() for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            )
        return {
            "bytes_per_token": nbytes,
            "macs_per_token": macs,
            "quantized": quantized,
            "source": "torch modules (linears + LM head)",
        }

    def logits(self, ids):
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.tensor([ids]), use_cache=False).logits[0].float().numpy()

    def max_context(self):
        return getattr(self.model.config, "max_position_embeddings", None)

    def close(self):
        self.model = self.past = None


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

    def traffic(self):
        return self.impl.traffic()

    def close(self):
        self.impl = None


class OrtRuntimeBackend(RuntimeBackend):
    """edgellm.runtime's ONNX Runtime runner (runtime/ort_backend.py): the ORT peer."""

    name = "onnxruntime"


class OrtGenaiBackend(Backend):
    """ONNX Runtime GenAI (`onnxruntime-genai`) on an edgellm export, through the genai_config.json
    the export carries: what ONNX Runtime users run for LLMs, on the same graph and weights as the
    `onnxruntime` row. Greedy tokens are chosen here from its logits, as for every other row."""

    name = "ort-genai"

    def load(self):
        import onnxruntime_genai as og

        from .variants import GENAI_CONFIG

        with open(f"{self.path}/{GENAI_CONFIG}", encoding="utf-8") as fh:
            self.context = json.load(fh)["model"]["context_length"]
        config = og.Config(self.path)
        threads = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        self.og, self.model = og, og.Model(config)
        self.tok = og.Tokenizer(self.model)
        self.gen = None

    def encode(self, text):
        return [int(t) for t in self.tok.encode(text)]

    def _fresh(self, ids) -> np.ndarray:
        """An empty KV cache fed `ids`: the logits output (1, len(ids), V). The generator is made
        once (about 20 ms) and rewound, as the other engines reset their caches."""
        if self.gen is None:
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(max_length=min(self.context, (self.n_ctx_needed or self.context) + 1))
            self.gen = self.og.Generator(self.model, params)
        else:
            self.gen.rewind_to(0)
        self.gen.append_tokens(np.asarray(ids, np.int32))
        return self.gen.get_output("logits")

    def prefill(self, ids):
        return np.asarray(self._fresh(ids)[0, -1], np.float32)

    def step(self, token):
        self.gen.append_tokens(np.asarray([token], np.int32))
        return np.asarray(self.gen.get_output("logits")[0, -1], np.float32)

    def logits(self, ids):
        return np.asarray(self._fresh(ids)[0], np.float32)

    def max_context(self):
        return self.context

    def close(self):
        self.gen = self.tok = self.model = None


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
        self.llm = llama_cpp.Llama(
            model_path=self.path,
            n_ctx=self.n_ctx,
            n_batch=512,
            n_ubatch=512,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            logits_all=logits_all,
            verbose=False,
        )
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


def make_backend(variant: dict, threads: int, n_ctx: int | None = None) -> Backend:
    """The backend for a parsed variant. `n_ctx`: the context the benchmark needs (KV cache size
    for engines that preallocate it). Export directories run on edgellm.runtime: its numba model
    (`numba`) or its ONNX Runtime runner (`onnxruntime`), both behind the same interface."""
    backend = variant["backend"]
    if backend == "onnxruntime":
        return OrtRuntimeBackend(variant["path"], threads, n_ctx)
    if backend == "openvino":  # in OpenVINO's python (run.run_worker)
        from .ov_backend import OpenVinoBackend

        return OpenVinoBackend(variant["path"], threads, n_ctx)
    if backend == "numba-cuda":
        return type("RuntimeCuda", (RuntimeBackend,), {"name": "numba-cuda"})(variant["path"], threads, n_ctx)
    return {"numba": RuntimeBackend, "torch": TorchBackend, "llama.cpp": LlamaCppBackend, "ort-genai": OrtGenaiBackend}[
        backend
    ](variant["path"], threads, n_ctx)

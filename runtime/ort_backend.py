"""The same interface as NumbaModel over ONNX Runtime (`--backend onnxruntime`).

The fallback for every valid export the numba kernels cannot run (a qdq graph, a GELU variant,
a rope scaling type): it runs the same format validation (validate.py) and memory check, but
none of the numba capability checks, and it never imports numba.
"""

from __future__ import annotations

import numpy as np

from .errors import EdgeLLMError
from .loader import ONNX_NAME
from .plan import plan_export


class OrtModel:
    """`forward(ids)` appends tokens to the KV cache (past_key_values) and returns logits."""

    backend = "onnxruntime"
    kernels = "onnxruntime (CPUExecutionProvider)"
    kv_cache = "fp32"
    kernel_warning = None

    def __init__(self, path, n_ctx: int | None = None, threads: int | None = None, verify: bool = False):
        from .deps import require

        if threads is not None and threads < 1:
            raise EdgeLLMError(f"--threads {threads} is invalid; give at least 1")
        # the same validation as every backend; no tensor walk: ORT reads the weights itself
        plan = plan_export(path, who="ONNX Runtime", n_ctx=n_ctx, verify=verify, walk=False)
        self.export = ex = plan.export
        self.config, self.n_ctx = plan.config, plan.n_ctx
        ex.close()
        ort = require("onnxruntime")
        self.threads = threads
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(ex.path / ONNX_NAME), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EdgeLLMError(f"ONNX Runtime cannot load '{ex.path / ONNX_NAME}': {_first_line(exc)}") from None
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.reset()

    def reset(self):
        c = self.config
        empty = np.zeros((1, c.num_kv_heads, 0, c.head_dim), np.float32)
        self.past = [(empty, empty) for _ in range(c.num_layers)]
        self.pos_ = 0

    @property
    def pos(self) -> int:
        return self.pos_

    def set_threads(self, threads):
        if threads != self.threads:
            raise EdgeLLMError("the onnxruntime backend fixes its thread count when the model is loaded")

    def truncate(self, n: int):
        n = min(n, self.pos_)
        self.past = [(k[:, :, :n], v[:, :, :n]) for k, v in self.past]
        self.pos_ = n

    def forward(self, ids, all_logits: bool = False, prompt: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        t = ids.shape[1]
        if t == 0:
            raise EdgeLLMError("no tokens to run")
        if self.pos_ + t > self.n_ctx:
            raise EdgeLLMError(f"{self.pos_ + t} tokens exceed the context of {self.n_ctx}")
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, self.pos_ + t), np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(self.pos_, self.pos_ + t, dtype=np.int64)[None]
        for i, (k, v) in enumerate(self.past):
            feed[f"past_key_values.{i}.key"] = k
            feed[f"past_key_values.{i}.value"] = v
        try:
            out = self.session.run(None, feed)
        except Exception as exc:  # a graph that does not compute what its metadata says
            raise EdgeLLMError(
                f"ONNX Runtime failed to run '{self.export.path / ONNX_NAME}': {_first_line(exc)}"
            ) from None
        names = [o.name for o in self.session.get_outputs()]
        res = dict(zip(names, out))
        c = self.config
        want = {
            "logits": (1, t, c.vocab_size),
            **{
                f"present.{i}.{kv}": (1, c.num_kv_heads, self.pos_ + t, c.head_dim)
                for i in range(c.num_layers)
                for kv in ("key", "value")
            },
        }
        for name, shape in want.items():
            if name not in res or tuple(res[name].shape) != shape:
                got = tuple(res[name].shape) if name in res else "missing"
                raise EdgeLLMError(
                    f"'{self.export.path / ONNX_NAME}' output '{name}' is {got}; the metadata implies {shape}"
                )
        self.past = [(res[f"present.{i}.key"], res[f"present.{i}.value"]) for i in range(c.num_layers)]
        self.pos_ += t
        logits = res["logits"][0]
        return logits if all_logits else logits[-1]

    def warmup(self):
        pos = self.pos_
        self.forward(np.zeros(1, np.int64))
        self.truncate(pos)

    def close(self):
        self.session = None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__

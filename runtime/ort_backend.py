"""The same interface as NumbaModel over ONNX Runtime (`--backend onnxruntime`)."""

from __future__ import annotations

import numpy as np

from edgellm.errors import EdgeLLMError

from .loader import ONNX_NAME, open_export
from .model import ModelConfig


class OrtModel:
    """`forward(ids)` appends tokens to the KV cache (past_key_values) and returns logits."""

    backend = "onnxruntime"

    def __init__(self, path, n_ctx: int | None = None, threads: int | None = None):
        from edgellm._deps import require

        ort = require("onnxruntime")
        self.export = ex = open_export(path)  # validates the directory and data file the same way
        self.config = cfg = ModelConfig.from_metadata(ex.config)
        self.n_ctx = min(n_ctx or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if threads is not None and threads < 1:
            raise EdgeLLMError(f"--threads {threads} is invalid; give at least 1")
        self.threads = threads
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(ex.path / ONNX_NAME), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EdgeLLMError(f"ONNX Runtime cannot load '{ex.path / ONNX_NAME}': {exc}") from None
        ex.close()  # ORT reads the weights itself
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

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
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
        out = self.session.run(None, feed)
        names = [o.name for o in self.session.get_outputs()]
        res = dict(zip(names, out))
        self.past = [(res[f"present.{i}.key"], res[f"present.{i}.value"]) for i in range(self.config.num_layers)]
        self.pos_ += t
        logits = res["logits"][0]
        return logits if all_logits else logits[-1]

    def warmup(self):
        pos = self.pos_
        self.forward(np.zeros(1, np.int64))
        self.truncate(pos)

    def close(self):
        self.session = None

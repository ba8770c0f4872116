"""The one interface every backend implements (numba CPU, CUDA, ONNX Runtime), so that the
Generator, the server, `run` and `bench` drive any of them without probing attributes.

Each backend builds itself from plan.plan_export (one validation, one weights plan)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .validate import ModelConfig


@runtime_checkable
class Backend(Protocol):
    backend: str  # "numba", "numba-cuda", "onnxruntime"
    config: ModelConfig  # the validated metadata
    n_ctx: int  # positions the KV cache holds
    threads: int | None  # CPU threads (None: the backend's default)
    kernels: str  # what computes: the kernel tier, the GPU, or ONNX Runtime's provider
    kv_cache: str  # "fp16" | "fp32"
    kernel_warning: str | None  # a one-line note when the best kernels were not used

    @property
    def pos(self) -> int: ...  # tokens in the KV cache

    def forward(self, ids, all_logits: bool = False, prompt: bool = False) -> np.ndarray: ...  # (t, V) or (V,) logits

    def reset(self) -> None: ...

    def truncate(self, n: int) -> None: ...  # forget positions >= n (or more: read pos after)

    def set_threads(self, threads: int | None) -> None: ...

    def warmup(self) -> None: ...  # compile or load kernels, then forget the tokens

    def close(self) -> None: ...

"""`edgellm bench DIR:openvino`: an edgellm export run by OpenVINO, in OpenVINO's own python.

OpenVINO's exporter stack pins an older transformers than edgellm's, so OpenVINO usually lives in
its own venv, named by `EDGELLM_OV_PYTHON` (else this python, when it imports openvino). The row:
- the parent (`run.run_worker`) starts `OV_PYTHON benchmarks/ov_worker.py JOB RESULT`, which
  mounts edgellm's torch-free bench modules and runs the same worker (same pp/tg/TTFT/RSS/quality
  protocol as every row) with this backend;
- the export is converted once to OpenVINO IR (benchmarks/ov_convert.py, in a child process so its
  memory stays out of the row's peak RSS) into a cache folder keyed by the export's files, then
  evicted from the page cache, so `load` is a cold read + compile of the IR;
- the graph is the export's own (stateless: the KV cache in and out as tensors, as ONNX Runtime
  runs it), compiled for CPU with `INFERENCE_NUM_THREADS`, every other setting OpenVINO's default;
  the tokenizer is openvino_tokenizers' conversion of the export's tokenizer.json.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeLLMError

from .backends import Backend

OV_PYTHON_ENV = "EDGELLM_OV_PYTHON"
HERE = Path(__file__).resolve().parent
INSTALL_HINT = (
    "install it in its own venv and name that python: python3 -m venv ov-venv && "
    "ov-venv/bin/python -m pip install openvino openvino-tokenizers transformers && "
    f"export {OV_PYTHON_ENV}=$PWD/ov-venv/bin/python"
)


def ov_python() -> str:
    """The python that runs OpenVINO rows: $EDGELLM_OV_PYTHON, else this one if it has openvino;
    an EdgeLLMError naming the packages and how to install them otherwise."""
    named = os.environ.get(OV_PYTHON_ENV, "")
    if named:
        if not Path(named).is_file():
            raise EdgeLLMError(f"{OV_PYTHON_ENV}='{named}' does not exist; {INSTALL_HINT}")
        probe = subprocess.run(
            [named, "-c", "import openvino, openvino_tokenizers, transformers"], capture_output=True, text=True
        )
        if probe.returncode != 0:
            raise EdgeLLMError(
                f"{OV_PYTHON_ENV}='{named}' cannot import openvino, openvino_tokenizers and transformers; install "
                f"them there: {named} -m pip install openvino openvino-tokenizers transformers"
            )
        return named
    if all(importlib.util.find_spec(m) for m in ("openvino", "openvino_tokenizers")):
        return sys.executable
    raise EdgeLLMError(f"the openvino backend needs the packages openvino and openvino-tokenizers; {INSTALL_HINT}")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgellm" / "openvino"


def cache_dir(export: Path, ov_version: str) -> Path:
    """Where the IR of `export` goes: keyed by model.onnx's bytes, the data file's size and mtime
    (re-exporting into the same folder gives a new key) and OpenVINO's version."""
    h = hashlib.sha256((export / "model.onnx").read_bytes())
    for f in sorted(export.glob("model.onnx.data")) + sorted(export.glob("tokenizer*.json")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(ov_version.encode())
    return cache_root() / f"{export.resolve().name}-{h.hexdigest()[:16]}"


def _evict(folder: Path) -> None:
    """Flush and drop the IR's pages so the timed load reads it cold, as the worker's evict()."""
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ensure_ir(export: Path) -> Path:
    """The cached IR folder of `export`, converting it (in a child process) when missing."""
    import openvino as ov

    out = cache_dir(export, ov.__version__)
    if not (out / "model.xml").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(
            [sys.executable, str(HERE / "ov_convert.py"), str(export), str(out)], capture_output=True, text=True
        )
        if run.returncode != 0:
            last = next((ln for ln in reversed(run.stderr.splitlines()) if ln.strip()), "")
            raise EdgeLLMError(last.removeprefix("error: ") or f"ov_convert.py exited with code {run.returncode}")
    _evict(out)
    return out


class OpenVinoBackend(Backend):
    """The export's graph (converted to IR, cached) on OpenVINO's CPU plugin; greedy from its logits."""

    name = "openvino"

    def __init__(self, path: str, threads: int, n_ctx: int | None = None):
        super().__init__(path, threads, n_ctx)
        self.ir = ensure_ir(Path(path))  # before the timed load, as a build step

    def load(self):
        import openvino as ov
        import openvino_tokenizers  # noqa: F401  (registers the tokenizer ops)

        core = ov.Core()
        cfg = {"INFERENCE_NUM_THREADS": self.threads} if self.threads else {}
        self.model = core.compile_model(str(self.ir / "model.xml"), "CPU", cfg)
        self.tok = core.compile_model(str(self.ir / "openvino_tokenizer.xml"), "CPU")
        self.req = self.model.create_infer_request()
        names = [p.get_any_name() for p in self.model.inputs]
        self.kv_in = [n for n in names if n.startswith("past_key_values.")]
        self.kv_out = [n.replace("past_key_values.", "present.") for n in self.kv_in]
        shape = self.model.input(self.kv_in[0]).get_partial_shape() if self.kv_in else None
        self.kv_shape = (1, shape[1].get_length(), 0, shape[3].get_length()) if shape is not None else None
        genai = Path(self.path) / "genai_config.json"  # the context length, where the export says it
        self.context = json.loads(genai.read_text())["model"]["context_length"] if genai.is_file() else None
        self.past: dict[str, np.ndarray] = {}
        self.pos = 0

    def encode(self, text):
        return [int(t) for t in self.tok([text])["input_ids"][0]]

    def _run(self, ids, fresh: bool) -> np.ndarray:
        """Logits (T, V) of `ids` after the cache (emptied when `fresh`)."""
        if fresh:
            self.past = {n: np.zeros(self.kv_shape, np.float32) for n in self.kv_in}
            self.pos = 0
        t = len(ids)
        feed = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, self.pos + t), np.int64),
            "position_ids": np.arange(self.pos, self.pos + t, dtype=np.int64)[None],
            **self.past,
        }
        out = self.req.infer(feed)
        self.past = {i: np.array(out[o]) for i, o in zip(self.kv_in, self.kv_out)}  # copies: the request reuses them
        self.pos += t
        return out["logits"][0]

    def prefill(self, ids):
        return np.array(self._run(ids, True)[-1], np.float32)

    def step(self, token):
        return np.array(self._run([token], False)[-1], np.float32)

    def logits(self, ids):
        return np.array(self._run(ids, True), np.float32)

    def max_context(self):
        return self.context

    def close(self):
        self.req = self.model = self.tok = None
        self.past = {}

"""ONNX Runtime GenAI's own int4 model of a Hugging Face checkpoint, built with its own builder
(`onnxruntime_genai.models.builder`), for `edgellm bench OUT:ort-genai` beside edgellm's export
of the same checkpoint: the model an ONNX Runtime user would run.

    python -m edgellm.benchmarks.scripts.ort_genai_build MODEL_DIR -o OUT \\
        [--precision int4] [--block-size 32] [--accuracy-level 4]

Defaults are the builder's CPU defaults (int4, block 32, symmetric, accuracy level 4: int8
activations). Offline: MODEL_DIR is a local model directory (config.json + safetensors), its
weights read as they are. OUT is written whole (temporary sibling, then rename). Bad input (no
onnxruntime-genai, not a model directory, an existing OUT) is one line, exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check(model: Path, out: Path) -> None:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        fail("the builder needs onnxruntime-genai, which is not installed; pip install onnxruntime-genai")
    if (model / "model.onnx").is_file():
        fail(f"'{model}' is an export (model.onnx); give the Hugging Face model directory it was exported from")
    if not (model / "config.json").is_file():
        fail(f"'{model}' is not a model directory (no config.json); give a local Hugging Face model directory")
    if out.exists():
        fail(f"output '{out}' already exists; remove it or choose another")


def build(model: Path, out: Path, precision: str = "int4", block_size: int = 32, accuracy_level: int = 4) -> Path:
    """Run the builder into a temporary sibling of `out`, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="ort-genai-cache-") as cache:
            extra = [f"block_size={block_size}", f"accuracy_level={accuracy_level}", "hf_token=false"]
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(model), "-i", str(model)]
            cmd += ["-o", str(tmp), "-p", precision, "-e", "cpu", "-c", cache, "--extra_options", *extra]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0 or not (tmp / "genai_config.json").is_file():
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"onnxruntime-genai's builder failed on '{model}': {last}")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="local Hugging Face model directory")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--precision", choices=["int4", "int8", "fp32"], default="int4")
    p.add_argument("--block-size", type=int, choices=[16, 32, 64, 128, 256], default=32)
    p.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=4)
    a = p.parse_args(argv)
    check(a.model, a.output)
    try:
        build(a.model, a.output, a.precision, a.block_size, a.accuracy_level)
    except RuntimeError as exc:
        fail(str(exc))
    print(f"wrote {a.output}; bench it with: edgellm bench {a.output}:ort-genai")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Prepare, on a machine with PyPI and ONNX tooling, what benchmarks/gpu_check.sh needs on a GPU
# machine that has neither (it has torch, transformers, numba + CUDA, bitsandbytes, NVML):
#   .gpu/site/          pure-Python packages edgellm needs there (typer, rich, pytest, ...)
#   .gpu/tiny-exports/  the CUDA test suite's tiny exports (tests/cuda_exports.py)
#   .gpu/synth/         random-weight 4-bit skeletons (SmolLM2-135M, TinyLlama-1.1B shapes):
#                       model.onnx + tokenizer, no weights (gpu_check.sh writes them there)
# Everything is git-ignored and, together, well under the 64 MiB that travels with the tree
# (carry: [".gpu"]). Usage: benchmarks/gpu_prepare.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/synth
"$PY" -m pip install -q --no-deps --target .gpu/site typer click rich markdown-it-py mdurl pygments shellingham \
    pytest pluggy iniconfig packaging typing_extensions
NUMBA_ENABLE_CUDASIM=1 "$PY" tests/cuda_exports.py .gpu/tiny-exports > /dev/null
rm -rf .gpu/tiny-exports/llama .gpu/tiny-exports/gpt2 .gpu/tiny-exports/*-q4 .gpu/tiny-exports/*-q8a .gpu/tiny-exports/*-q4-default .gpu/tiny-exports/*-bpw  # keep the exports only
for shape in smollm2-135m tinyllama-1.1b; do
  "$PY" -m edgellm.benchmarks.gpu_synth skeleton "$shape" ".gpu/synth/$shape-q4"
done
du -sh .gpu

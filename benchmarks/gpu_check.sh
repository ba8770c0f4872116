#!/usr/bin/env bash
# The GPU check of the CUDA path, in one go (< 8 minutes on one H200: the two long steps are
# capped at 210 s and 270 s). First, where PyPI is reachable: bash benchmarks/gpu_prepare.sh
# (fills the git-ignored .gpu/, ~25 MB). Then, on the GPU machine, from the repository root with
# .gpu carried along:
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]      # default: $OUT if set, else gpu-results/
#
# 1. environment: GPU, driver, numba / torch / bitsandbytes / pynvml versions
# 2. tests/cuda_suite.py on the GPU: every kernel against its numpy reference (256 threads per
#    block), the CUDA model against the CPU runtime (logits, 32 greedy tokens, fused vs phases,
#    streaming, the CLI, torch-free)
# 3. benchmarks/gpu_bench.py on random-weight 4-bit exports of the SmolLM2-135M and TinyLlama-1.1B
#    shapes: prompt (512) and decode (128) tokens/s, NVML J/token (measured), greedy parity with
#    the CPU runtime for 32 steps, transformers fp16 eager and bitsandbytes NF4 / int8 beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RES=${1:-${OUT:-$ROOT/gpu-results}}
mkdir -p "$RES"
PY=${PYTHON:-python3}
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$RES/gpu_check.log"; }
# edgellm from this tree (non-editable copy: the package-dir mapping needs an install), plus the
# pure-Python packages gpu_prepare.sh carried; numpy / numba / torch are the machine's own.
rm -rf .gpu/edgellm-site
if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target .gpu/edgellm-site . >> "$RES/gpu_check.log" 2>&1; then
  export PYTHONPATH="$ROOT/.gpu/edgellm-site:$ROOT/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
else
  log "pip could not install edgellm from the tree; falling back to an editable-less path shim"
  export PYTHONPATH="$ROOT/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
fi
unset NUMBA_ENABLE_CUDASIM
status=0

log "1/3 environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader 2>&1
  "$PY" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("numpy", "numba", "numba_cuda", "torch", "transformers", "bitsandbytes", "pynvml", "edgellm"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "missing:", type(e).__name__)
from numba import cuda
print("numba.cuda", getattr(cuda, "implementation", "?"), "available:", cuda.is_available())
if cuda.is_available():
    d = cuda.get_current_device(); print("device", d.name, "cc", d.compute_capability)
PY
} 2>&1 | tee -a "$RES/gpu_check.log"

log "2/3 tests/cuda_suite.py on the GPU"
timeout 210 "$PY" -m pytest -q -p no:cacheprovider tests/cuda_suite.py -rs --durations=10 --junitxml="$RES/cuda_suite.xml" 2>&1 \
  | tee "$RES/cuda_suite.txt" | tail -25 | tee -a "$RES/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "3/3 speed and energy (random-weight 4-bit exports)"
for d in .gpu/synth/*-q4; do
  [ -f "$d/model.onnx.data" ] || "$PY" -m edgellm.benchmarks.gpu_synth fill "$d" 2>&1 | tee -a "$RES/gpu_check.log"
done
timeout 270 "$PY" -m edgellm.benchmarks.gpu_bench .gpu/synth/smollm2-135m-q4 .gpu/synth/tinyllama-1.1b-q4 --peers --parity 32 \
  --prompt-tokens 512 --gen-tokens 128 --reps 3 -o "$RES/gpu_bench.json" 2>&1 | tee "$RES/gpu_bench.md" | tee -a "$RES/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
log "done (status $status); results in $RES"
exit $status

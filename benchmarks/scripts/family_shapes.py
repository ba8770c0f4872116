"""Random-weight bf16 checkpoints with the real shapes of Qwen3-0.6B and Gemma-3-1B (issue 25's
speed benchmark against llama.cpp: decode and prompt speed depend on the shapes, not the values).

    python -m edgellm.benchmarks.scripts.family_shapes --out DIR [--only qwen3-0.6b gemma3-1b]

Each DIR/NAME is a Hugging Face directory (config.json from the published model's text config,
seeded N(0, 0.02) weights as transformers initialises them, bf16 safetensors) with a small
byte-level tokenizer trained on the built-in corpus (its 512 ids lie inside the model's vocabulary;
the benchmark needs a prompt, not meaningful text). Then, per model:

    edgellm quantize DIR/NAME --bits 4 --method rtn -o Q4 && edgellm export Q4 -o Q4-ONNX
    python -m edgellm.benchmarks.scripts.hf_to_gguf DIR/NAME F32.gguf --placeholder-vocab
    python -m edgellm.benchmarks.scripts.runtime_decode --q4 Q4-ONNX --gguf-src F32.gguf --q4-gguf Q4_0 ...

Sizes on disk: Qwen3-0.6B 1.2 GB bf16 (2.4 GB as F32 GGUF), Gemma-3-1B 2.0 GB (4.0 GB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHAPES = {
    # Qwen/Qwen3-0.6B config.json
    "qwen3-0.6b": dict(
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # google/gemma-3-1b-it config.json (text model)
    "gemma3-1b": dict(
        model_type="gemma3_text",
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        sliding_window=512,
        sliding_window_pattern=6,
        query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
}


def build(name: str, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgellm.benchmarks.scripts.train_small import make_tokenizer
    from edgellm.data import builtin_text

    kw = dict(SHAPES[name])
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    dst = out / name
    tmp = out / f"{name}.tmp"
    model.save_pretrained(str(tmp), safe_serialization=True)
    make_tokenizer(builtin_text()[:200_000], tmp)
    tmp.rename(dst)
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.only:
        if (a.out / name).is_dir():
            print(f"{a.out / name} exists, kept")
            continue
        print(f"wrote {build(name, a.out, a.seed)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory and time of `edgellm quantize` on real model shapes (issue 26), not in CI.

    python -m edgellm.benchmarks.scripts.stream_quantize --shape tinyllama-1.1b --root CKPT_DIR \
        --method gptq --calib-samples 8 --seq-len 256
    python -m edgellm.benchmarks.scripts.stream_quantize --shape tiny --root CKPT_DIR   # a smoke run

Builds a seeded random-weight checkpoint in bf16 with the shape's config (written a tensor at a
time, in shards of at most 2 GB, so building an 8B checkpoint needs little memory), then runs
`edgellm quantize` in a child process and reports its peak RSS (VmHWM, read by the child
itself at exit) and wall time as a JSON line. Random weights: the numbers measure memory and
time, not quality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied
    "tiny": (256, 704, 4, 4, 2, 512, False),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000, False),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128256, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, 151936, True),  # head_dim 128, q/k norms
}
MODEL_TYPE = {"qwen3-1.7b": ("qwen3", "Qwen3ForCausalLM")}  # the others: llama
SHARD_BYTES = 2 << 30


def config_for(shape: str):
    """The config of `shape` (LlamaConfig unless MODEL_TYPE names another family), stored in bf16."""
    from transformers import AutoConfig

    d, i_f, n_layers, heads, kv, vocab, tied = SHAPES[shape]
    model_type, arch = MODEL_TYPE.get(shape, ("llama", "LlamaForCausalLM"))
    cfg = AutoConfig.for_model(
        model_type,
        hidden_size=d,
        intermediate_size=i_f,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
        architectures=[arch],  # what ORT GenAI's builder and llama.cpp's converter dispatch on
    )
    cfg.dtype = "bfloat16"
    return cfg


def build(shape: str, out: Path, seed: int = 0) -> Path:
    """A bf16 checkpoint of `shape` with seeded random weights (std 0.02, norms 1) and a tokenizer.
    The tensors and their order are the meta-device model's (the family's own names: llama's
    embedding, per layer q, k, v, o, gate, up, down and the two norms, the final norm, the head)."""
    import torch
    from safetensors.torch import save_file

    from edgellm.checkpoint import expected_shapes

    if (out / "config.json").is_file():
        return out
    cfg = config_for(shape)
    tied = SHAPES[shape][-1]
    shapes = {k: v for k, v in expected_shapes(cfg).items() if not (tied and k == "lm_head.weight")}
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shard, size, weight_map, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shp in shapes.items():
        t = torch.ones(shp) if len(shp) == 1 else torch.randn(shp, generator=gen) * 0.02
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(str(out))
    _tokenizer(out)
    return out


def _tokenizer(out: Path) -> None:
    """A byte-level BPE trained on the built-in corpus (ids beyond its vocabulary stay unused)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgellm.data import builtin_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([builtin_text()[:200_000]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(
        str(out)
    )


CHILD = """
import sys
from edgellm.cli import main
try:
    main()
finally:
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            print('VMHWM', int(line.split()[1]) * 1024, file=sys.stderr)
"""


def measure(model: Path, out: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-c", CHILD, "quantize", str(model), "-o", str(out), "--force", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("VMHWM")]
    return {
        "model": str(model),
        "args": args,
        "rc": r.returncode,
        "peak_rss_mb": round(peak[-1] / 1e6, 1) if peak else None,
        "wall_min": round(wall / 60, 2),
        "log_tail": r.stderr.strip().splitlines()[-3:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--root", type=Path, required=True, help="where the checkpoint and the output go")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--calib-samples", default="8")
    ap.add_argument("--seq-len", default="256")
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--eval", action="store_true", help="also score before/after (slower)")
    a = ap.parse_args()
    model = build(a.shape, a.root / a.shape)
    args = ["--method", a.method, "--calib-samples", a.calib_samples, "--seq-len", a.seq_len]
    args += [] if a.eval else ["--no-eval"]
    args += ["--max-memory", a.max_memory] if a.max_memory else []
    print(json.dumps(measure(model, a.root / f"{a.shape}-q4", args)))


if __name__ == "__main__":
    main()

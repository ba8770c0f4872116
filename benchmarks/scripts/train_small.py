"""Train the reference model the quantization measurements use: a ~13M-parameter llama on the
CPython standard library source (text that ships with every Python, so it works offline).

    python -m edgellm.benchmarks.scripts.train_small --out MODEL_DIR

Writes a Hugging Face model directory (config.json, model.safetensors, tokenizer files) plus
`corpus.txt`, the exact text it was trained on. Pass that file as `--data` to `edgellm quantize`
and `edgellm eval`: edgellm's fixed split makes the last 10% of its tokens the evaluation split,
and this script trains only on the first 90%, so perplexity is measured on unseen code.

The width (384 = 128 x 3) is deliberately not a power of two, like SmolLM2's 576, so rotation's
non-power-of-two path is what gets measured. Cached: if `--out` already holds a model, nothing
is retrained. Not run in CI. The defaults are the run that made the reference model of
benchmarks/RESULTS.md (2026-12-01, this 2-core machine otherwise idle: 1,854 steps in 35 minutes,
training loss 2.80; an earlier run beside other jobs got 109 steps, loss 6.36, too few to measure
quantization on).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

VOCAB = 8192
CONFIG = dict(
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)


def corpus_text(max_chars: int) -> str:
    """The stdlib's .py files in sorted order (deterministic), up to max_chars characters."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in rel):
            continue
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(f"# file: {'/'.join(rel)}\n{t}")
        n += len(parts[-1])
        if n >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def make_tokenizer(text: str, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(str(out))
    return fast


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the model directory to write")
    ap.add_argument("--minutes", type=float, default=35.0, help="wall-clock training budget")
    ap.add_argument("--chars", type=int, default=8_000_000, help="corpus size in characters")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgellm.data import split_tokens, token_ids

    if (args.out / "model.safetensors").is_file():
        print(f"{args.out} already holds a trained model; delete it to retrain")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    text = corpus_text(args.chars)
    (tmp / "corpus.txt").write_text(text, encoding="utf-8")
    tokenizer = make_tokenizer(text, tmp)
    ids = token_ids(tokenizer, text)
    train_ids = split_tokens(ids, "calib")
    print(f"corpus: {len(text)} chars, {len(ids)} tokens ({len(train_ids)} for training)", flush=True)

    config = AutoConfig.for_model("llama", vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    warmup = 100
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    step, ema = 0, None
    model.train()
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for grp in opt.param_groups:
            grp["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=g)
        x = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])  # (B, T)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step} loss {ema:.3f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "train.json").write_text(
        json.dumps(
            {
                "steps": step,
                "final_loss_ema": ema,
                "params": n_params,
                "seconds": round(time.time() - t0),
                **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            },
            indent=1,
        )
    )
    tmp.rename(args.out)
    print(f"wrote {args.out} after {step} steps (loss {ema:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

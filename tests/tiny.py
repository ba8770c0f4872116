"""Tiny seeded models for tests: built from transformers configs, optionally trained briefly.

Nothing is downloaded: the tokenizer is a small byte-level BPE trained on the built-in corpus.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512

CONFIGS = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512, tie_word_embeddings=True),
}


_SMALL = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
# the families of issue 25, each with the features that set it apart switched on at tiny size
# (kept apart from CONFIGS, which every older per-family test iterates over)
FAMILIES = {
    "qwen3": dict(_SMALL, model_type="qwen3", head_dim=24, tie_word_embeddings=True),  # head_dim != hidden/heads
    "smollm3": dict(_SMALL, model_type="smollm3", no_rope_layer_interval=2, tie_word_embeddings=True),
    "granite": dict(
        _SMALL,
        model_type="granite",
        embedding_multiplier=6.0,
        residual_multiplier=0.5,
        attention_multiplier=0.09,
        logits_scaling=2.5,
        tie_word_embeddings=False,
    ),
    "olmo2": dict(_SMALL, model_type="olmo2", tie_word_embeddings=False),
    "phi3": dict(
        _SMALL,
        model_type="phi3",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        pad_token_id=0,
        tie_word_embeddings=False,
    ),
    "gemma3_text": dict(
        _SMALL,
        model_type="gemma3_text",
        head_dim=16,
        sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=20,
        attn_logit_softcapping=30.0,
        final_logit_softcapping=15.0,
        tie_word_embeddings=True,
    ),
}


def _byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgellm.data import builtin_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([builtin_text()[:200_000]], trainer)
    return tok


CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt "
    "%}<|assistant|>{% endif %}"
)


def make_tokenizer(out_dir: Path):
    """A byte-level BPE with VOCAB tokens trained on the built-in corpus, saved in out_dir."""
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT
    fast.save_pretrained(str(out_dir))
    return fast


def make_sentencepiece_tokenizer(out_dir: Path):
    """A Gemma-style sentencepiece BPE of VOCAB pieces (`▁` for spaces, byte fallback; the five
    specials, then the 256 byte tokens, then text pieces: the printable ones of the byte-level
    BPE, in its merge order), saved in out_dir. Its merges follow the piece order, as transformers
    rebuilds them for a Gemma GGUF."""
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.tokenization_utils_base import generate_merges

    unbyte = {c: b for b, c in bytes_to_unicode().items()}
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    seen = set(pieces)
    bpe = _byte_level_bpe().get_vocab()
    for t, _ in sorted(bpe.items(), key=lambda kv: kv[1]):
        try:
            text = bytes(unbyte[c] for c in t).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        piece = text.replace(" ", "\u2581")
        if piece and piece not in seen and all(c.isprintable() for c in text.replace(" ", "")):
            pieces.append(piece)
            seen.add(piece)
        if len(pieces) == VOCAB:
            break
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = generate_merges(vocab, {p: -i for i, p in enumerate(pieces)})
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    tok.chat_template = CHAT
    tok.save_pretrained(str(out_dir))
    return tok


def build(family: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(CONFIGS.get(family) or FAMILIES[family])
    model_type = kw.pop("model_type")
    kw.update(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def family_model(family: str, seed: int = 0, **overrides):
    """A tiny model of a FAMILIES family with larger-than-default weights (logits of order 5) and
    random norm weights (ones would hide a missing or misplaced norm, zeros Gemma's 1 + w)."""
    model = build(family, seed=seed, initializer_range=0.15, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
    return model


def train(model, tokenizer, steps: int, seq_len: int = 128, batch: int = 16, lr: float = 3e-3, seed: int = 0):
    """Briefly train on the calibration split so weights are genuinely continuous."""
    from edgellm.data import builtin_text, split_tokens, token_ids

    ids = split_tokens(token_ids(tokenizer, builtin_text()), "calib")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def save(model, tokenizer, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def export_q4(src: Path, root: Path, name: str) -> Path:
    """`quantize` (4-bit RTN, g32 symmetric) then `export` of the model in `src` through the CLI, into
    root/NAME-q4 and root/NAME-onnx; returns the export directory."""
    from typer.testing import CliRunner

    from edgellm.cli import app

    runner, q = CliRunner(), root / f"{name}-q4"
    args = ["--bits", "4", "--group-size", "32", "--sym", "--method", "rtn", "--no-eval", "-o", str(q)]
    r = runner.invoke(app, ["quantize", str(src), *args])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(q), "-o", str(root / f"{name}-onnx"), "--no-check"])
    assert r.exit_code == 0, r.output
    return root / f"{name}-onnx"

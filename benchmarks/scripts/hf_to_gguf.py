"""An F32 GGUF of a Hugging Face directory, as llama.cpp's converter writes it (issues 12, 25).

    python -m edgellm.benchmarks.scripts.hf_to_gguf HF_DIR OUT.gguf [--placeholder-vocab]

Families: llama, qwen3, gemma3_text, phi3 (the ones both transformers and llama.cpp read from a
GGUF). What each needs, as llama.cpp's convert_hf_to_gguf.py does it:
- tensor names from gguf-py's own map (`gguf.get_tensor_name_map`), so they are the names every
  reader expects; a tied head is stored once, as token_embd;
- llama: q/k rows permuted to llama.cpp's interleaved rotary layout (readers permute them back);
- gemma3: every RMSNorm weight stored as 1 + w (llama.cpp's norms compute x * w); the window,
  head size and global rope theta as keys; the 5:1 layer pattern, the local theta (10000) and the
  attention scale are implied (llama.cpp derives them), so a config that sets them otherwise, or
  soft-caps, cannot be written and is refused;
- phi3: the fused qkv / gate_up as they are; rope.dimension_count carries the partial rotary;
  LongRoPE as `rope_factors_long/short` tensors beside the attention factor and the original
  context length.
The tokenizer goes in as metadata: a byte-level BPE (tokenizer.json with a ByteLevel decoder) as
`gpt2` with its merges; a sentencepiece-style one (`▁` pieces, byte fallback) as `llama` with
scores from the ids. `--placeholder-vocab` (or a tokenizer whose size is not the model's
vocabulary, as in the random-weight benchmark models) writes llama.cpp's byte-fallback
placeholder vocabulary of the model's size instead: enough for speed runs, meaningless as text.
Tests (tests/test_gguf_families.py) write tiny seeded models with it and load them back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ARCH = {"llama": "llama", "qwen3": "qwen3", "gemma3_text": "gemma3", "phi3": "phi3"}
GEMMA3_PATTERN = 6  # llama.cpp: every 6th Gemma 3 layer is global
GEMMA3_LOCAL_THETA = 10000.0


def hf_tensors(src: Path):
    """(name, float32 array) of every tensor of a Hugging Face directory, shard by shard (bf16 and
    fp16 read through torch: numpy has no bfloat16)."""
    from safetensors import safe_open

    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise SystemExit(f"{src}: no .safetensors files")
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k).float().numpy()


def _rope(config) -> dict:
    rp = dict(getattr(config, "rope_parameters", None) or {})
    return dict(rp.get("full_attention") or {}) if "full_attention" in rp else rp


def _refuse(src: Path, what: str) -> None:
    raise SystemExit(f"{src}: {what} cannot be written to a GGUF (llama.cpp has no key for it)")


def _check_gemma3(src: Path, c) -> None:
    pattern = [
        "sliding_attention" if (i + 1) % GEMMA3_PATTERN else "full_attention" for i in range(c.num_hidden_layers)
    ]
    if list(c.layer_types) != pattern:
        _refuse(src, f"layer_types other than llama.cpp's 5:1 pattern ({c.layer_types})")
    local = c.rope_parameters["sliding_attention"]
    if local.get("rope_type", "default") != "default" or float(local["rope_theta"]) != GEMMA3_LOCAL_THETA:
        _refuse(src, "a local rope other than theta 10000")
    implied = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == 62 else c.head_dim
    if c.query_pre_attn_scalar != implied:
        _refuse(src, f"query_pre_attn_scalar {c.query_pre_attn_scalar} (llama.cpp implies {implied})")
    if c.attn_logit_softcapping or c.final_logit_softcapping:
        _refuse(src, "soft-capping")


def _metadata(w, c, src: Path) -> None:
    import gguf

    mt = c.model_type
    heads = c.num_attention_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope = _rope(c)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_vocab_size(c.vocab_size)
    kind = rope.get("rope_type", "default")
    if mt == "phi3":
        partial = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)) or 1.0
        w.add_rope_dimension_count(int(partial * c.hidden_size) // heads)
        if getattr(c, "sliding_window", None):
            w.add_sliding_window(c.sliding_window)
        if kind == "longrope":
            orig = rope.get("original_max_position_embeddings") or c.original_max_position_embeddings
            scale = c.max_position_embeddings / orig
            attn = rope.get("attention_factor") or (
                1.0 if scale <= 1.0 else float(np.sqrt(1 + np.log(scale) / np.log(orig)))
            )
            w.add_rope_scaling_attn_factors(attn)
            w.add_rope_scaling_orig_ctx_len(orig)
            w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
            w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
            return
    else:
        w.add_key_length(hd)
        w.add_value_length(hd)
        if mt != "gemma3_text":
            w.add_rope_dimension_count(hd)
    if mt == "gemma3_text":
        _check_gemma3(src, c)
        w.add_sliding_window(c.sliding_window)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3"):  # llama3: llama.cpp writes rope_freqs; not needed here
        _refuse(src, f"rope type '{kind}'")


def _placeholder_vocab(w, n: int, bos: int, eos: int) -> None:
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + [f"t{i}" for i in range(n - 259)]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks[:n])
    w.add_token_scores([0.0] * n)
    w.add_token_types(([2, 3, 3] + [6] * 256 + [1] * (n - 259))[:n])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)


def _tokenizer(w, src: Path, c) -> bool:
    """The directory's tokenizer.json as GGUF metadata; False when it cannot stand for the model's
    vocabulary (absent, another size)."""
    path = src / "tokenizer.json"
    if not path.is_file():
        return False
    tj = json.loads(path.read_text())
    model = tj["model"]
    if model.get("type") != "BPE":
        return False
    vocab = dict(model["vocab"])
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    if len(vocab) != c.vocab_size or sorted(vocab.values()) != list(range(c.vocab_size)):
        return False
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    byte_level = "ByteLevel" in json.dumps(tj.get("decoder"))
    if byte_level:
        w.add_tokenizer_model("gpt2")
        pre = json.dumps(tj.get("pre_tokenizer"))
        w.add_tokenizer_pre("qwen2" if "Split" in pre else "default")
        w.add_token_list(tokens)
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
        w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    else:  # sentencepiece-style BPE: llama.cpp's "llama" vocabulary, merges recovered from the order
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        types = []
        for i, t in enumerate(tokens):
            byte = len(t) == 6 and t.startswith("<0x") and t.endswith(">")
            types.append(3 if i in special else 6 if byte else 1)
        w.add_token_types(types)
        w.add_add_space_prefix(False)
    tc = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
    ids = {}
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        tok = tc.get(f"{key}_token")  # the tokenizer's own special tokens first, as llama.cpp's SpecialVocab
        tok = tok.get("content") if isinstance(tok, dict) else tok
        v = vocab.get(tok) if isinstance(tok, str) else getattr(c, f"{key}_token_id", None)
        v = v[0] if isinstance(v, list) else v
        if v is not None:
            ids[key] = int(v)
            add(int(v))
    post = json.dumps(tj.get("post_processor"))  # does the tokenizer put BOS in front by itself?
    w.add_add_bos_token("bos" in ids and json.dumps(tokens[ids["bos"]]) in post)
    chat = src / "chat_template.jinja"
    if chat.is_file():
        w.add_chat_template(chat.read_text())
    elif isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])
    return True


def write_gguf(src: Path, dst: Path, placeholder_vocab: bool = False) -> None:
    """Write `src` (a Hugging Face directory of a family in ARCH) as an F32 GGUF at `dst` (through
    a temporary sibling)."""
    import gguf
    from transformers import AutoConfig

    src, dst = Path(src), Path(dst)
    c = AutoConfig.from_pretrained(str(src))
    mt = c.model_type
    if mt not in ARCH:
        raise SystemExit(f"{src}: model_type {mt!r} is not written here; supported: {', '.join(ARCH)}")
    tmp = dst.with_name(dst.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), ARCH[mt])
    _metadata(w, c, src)
    bos = c.bos_token_id if isinstance(c.bos_token_id, int) else 0
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
    if placeholder_vocab or not _tokenizer(w, src, c):
        _placeholder_vocab(w, c.vocab_size, bos or 0, eos or 0)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == ARCH[mt])
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    def permute(x, nh):  # HF's rotate-half layout -> llama.cpp's interleaved pairs, per head
        return x.reshape(nh, 2, x.shape[0] // nh // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for k, t in hf_tensors(src):
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SystemExit(f"{src}: tensor {k!r} has no GGUF name for {ARCH[mt]}")
        if mt == "llama" and k.endswith("q_proj.weight"):
            t = permute(t, heads)
        elif mt == "llama" and k.endswith("k_proj.weight"):
            t = permute(t, kv)
        elif mt == "gemma3_text" and k.endswith("norm.weight"):
            t = t + 1.0
        w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(dst)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="a Hugging Face model directory")
    ap.add_argument("dst", type=Path, help="the .gguf to write")
    ap.add_argument("--placeholder-vocab", action="store_true", help="llama.cpp's placeholder vocabulary")
    a = ap.parse_args(argv)
    write_gguf(a.src, a.dst, a.placeholder_vocab)
    print(f"wrote {a.dst} ({a.dst.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

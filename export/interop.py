"""Side files that let other tools open an export as it is (docs/EXPORT_FORMAT.md, "Side files").

- `config.json`: the source model's Hugging Face config. Optimum's `ORTModelForCausalLM` (and
  anything that calls `AutoConfig`) needs it to know what the folder holds.
- `genai_config.json`: ONNX Runtime GenAI's description of the graph, built from the same
  metadata the runtime reads (`edgellm.config`), so the two can never disagree. The graph
  concatenates its KV cache (present = past + new), so `past_present_share_buffer` is false.
"""

from __future__ import annotations

import json
from pathlib import Path

from .writer import ONNX_NAME

CONFIG_NAME = "config.json"
GENAI_CONFIG_NAME = "genai_config.json"
# ORT GenAI's model type per edgellm architecture. All four graphs are plain decoders with the
# Optimum I/O names below, which GenAI's decoder-only model reads by name. GenAI's own "gpt2" type
# expects its older graph (one combined `past_%d` per layer), so edgellm's GPT-2 graph is declared
# as a decoder-only type: everything architectural is inside the graph.
# ORT GenAI's model type: every edgellm graph has the same inputs and outputs (Optimum's names),
# which GenAI's decoder types read alike; a family it has no type of its own for runs as "llama"
# (GPT-2 too: GenAI's gpt2 type expects other input names)
GENAI_TYPE = {"mistral": "mistral", "qwen2": "qwen2"}


def genai_config(cfg: dict, generation: dict | None = None) -> dict:
    """genai_config.json for an export whose metadata `edgellm.config` is `cfg`; `generation`:
    the export's generation_config.json (token ids, max_length)."""
    gen = generation or {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    pad = gen.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) and eos else eos
    context = int(cfg["max_position_embeddings"])
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": ONNX_NAME,
                "head_size": cfg["head_dim"],
                "hidden_size": cfg["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg["num_heads"],
                "num_hidden_layers": cfg["num_layers"],
                "num_key_value_heads": cfg["num_kv_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_TYPE.get(cfg["architecture"], "llama"),
            "vocab_size": cfg["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,  # present = Concat(past, new): a new buffer each step
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_side_files(model, cfg: dict, out: Path) -> None:
    """config.json (the model's HF config) and genai_config.json into `out`; call after the
    generation config is written (genai_config.json reads its token ids)."""
    out = Path(out)
    model.config.to_json_file(str(out / CONFIG_NAME))
    gen_path = out / "generation_config.json"
    generation = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    text = json.dumps(genai_config(cfg, generation), indent=2)
    (out / GENAI_CONFIG_NAME).write_text(text + "\n", encoding="utf-8")

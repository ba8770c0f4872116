"""What edgellm knows about each supported architecture, as data.

Modules are found by walking each family's structure (layer list, norms, the linears that read
each norm's output), never by guessing from substrings of weight names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import UnsupportedError


@dataclass(frozen=True)
class Family:
    layers: str  # attribute path from the CausalLM to its list of decoder blocks
    final_norm: str  # attribute path to the norm before lm_head
    # Scaling groups inside a block for AWQ: (module whose output feeds them, the linears it feeds).
    # The first module's output is divided by the scales and the linears' input columns multiplied.
    scale_groups: tuple[tuple[str, tuple[str, ...]], ...]
    # Linears AWQ does not clip: q/k feed softmax(QK^T), so their own output error is not what
    # matters (llm-awq skips them too).
    clip_skip: tuple[str, ...] = ()
    # The checkpoint side of the per-layer description (runtime/features.py is the export side):
    # the modules whose rows the export fuses into each of its linears (format/names.py ROLES) ...
    linears: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("o", ("self_attn.o_proj",)),
        ("up", ("mlp.gate_proj", "mlp.up_proj")),
        ("down", ("mlp.down_proj",)),
    )
    # ... each norm by its role (format/names.py NORM_ROLES) ...
    norms: tuple[tuple[str, str], ...] = (("attn", "input_layernorm"), ("mlp", "post_attention_layernorm"))
    norm_offset: float = 0.0  # RMSNorm computes x * (offset + w) (Gemma: 1)
    attn_softcap: bool = False  # the attention applies the config's attn_logit_softcapping
    # ... and why --rotate is not exact for this family (None: it is). AWQ folds into every family's
    # norms exactly (offset norms: 1 + w' = (1 + w) / s), so it has no refusal.
    rotate_refusal: str | None = "its norms are LayerNorms, whose mean subtraction a rotation does not commute with"
    # why the layer-streaming paths (quantize, prune, eval, export) load this family whole (None: they
    # stream it). They read the embedding, the final norm and the head off the skeleton, and give
    # each block the keyword arguments the model's forward gives it (calibration.capture_layer_inputs).
    stream_refusal: str | None = None

    def role_modules(self) -> dict[str, tuple[str, ...]]:
        return dict(self.linears)


_PRE = (("attn", "input_layernorm"), ("mlp", "post_attention_layernorm"))
_QK = (("q", "self_attn.q_norm"), ("k", "self_attn.k_norm"))
_POST = (("attn_out", "post_attention_layernorm"), ("mlp_out", "post_feedforward_layernorm"))
_NO_ROTATE = "its layers were not checked against the rotation's fusions (supported: llama, mistral, qwen2)"

_LLAMA = Family(
    layers="model.layers",
    final_norm="model.norm",
    scale_groups=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),  # used only when v and o are square (no GQA)
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    clip_skip=("self_attn.q_proj", "self_attn.k_proj"),
    rotate_refusal=None,
)

# the llama layout's checkpoint names of the parts outside the blocks: embedding, head, final norm
# (the streamed --rotate reads them, quant/stream_rotate.py; the other streamed paths read every
# family's names off its skeleton, quant/stream.py part_names)
LLAMA_PARTS = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": replace(_LLAMA, norms=_PRE + _QK, rotate_refusal=_NO_ROTATE),
    "smollm3": replace(_LLAMA, rotate_refusal=_NO_ROTATE),
    "granite": replace(_LLAMA, rotate_refusal=_NO_ROTATE),
    # post-norm: q/k/v and gate/up read the residual stream itself, so no norm takes AWQ's scales
    "olmo2": replace(
        _LLAMA,
        scale_groups=(("self_attn.v_proj", ("self_attn.o_proj",)), ("mlp.up_proj", ("mlp.down_proj",))),
        norms=_POST + _QK,
        rotate_refusal="its norms sit after attention and the MLP (post-norm), where a rotation of the residual "
        "stream does not pass through them",
    ),
    # fused in the checkpoint: qkv_proj and gate_up_proj (gate rows, then up rows)
    "phi3": replace(
        _LLAMA,
        scale_groups=(
            ("input_layernorm", ("self_attn.qkv_proj",)),
            ("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
        clip_skip=("self_attn.qkv_proj",),
        linears=(
            ("qkv", ("self_attn.qkv_proj",)),
            ("o", ("self_attn.o_proj",)),
            ("up", ("mlp.gate_up_proj",)),
            ("down", ("mlp.down_proj",)),
        ),
        rotate_refusal=_NO_ROTATE,
    ),
    "gemma3_text": replace(
        _LLAMA,
        scale_groups=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("self_attn.v_proj", ("self_attn.o_proj",)),
            ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            ("mlp.up_proj", ("mlp.down_proj",)),
        ),
        norms=(("attn", "input_layernorm"), ("mlp", "pre_feedforward_layernorm")) + _POST + _QK,
        norm_offset=1.0,
        rotate_refusal="its RMSNorm computes x * (1 + w) and its norms sit on both sides of each block (a rotation "
        "does not pass through the post-norms)",
    ),
    "gpt2": Family(
        layers="transformer.h",
        final_norm="transformer.ln_f",
        # GPT-2's MLP has GELU between c_fc and c_proj, and c_attn fuses q/k/v: only the norms fold.
        scale_groups=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        clip_skip=("attn.c_attn",),
        stream_refusal="its learned position table and Conv1D linears",
    ),
}

SUPPORTED_TEXT = (
    "Llama (incl. SmolLM2/TinyLlama), Mistral, Qwen2, Qwen3, SmolLM3, Granite, OLMo 2, Phi-3/Phi-4-mini, "
    "Gemma 3 (text), GPT-2"
)
# rope types the exporter and the numba runtime compute from the config; others are refused up front
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedError(
            f"architecture '{model_type}' is not supported; supported: {SUPPORTED_TEXT} "
            f"(model_type one of {', '.join(sorted(FAMILIES))})"
        )
    check_config(config)
    return FAMILIES[model_type]


def stream_refusal(config) -> str | None:
    """Why the layer-streaming paths load a model of this config whole, as a phrase ("the gpt2
    family (...)"); None when they stream it."""
    why = family_of(config).stream_refusal
    return None if why is None else f"the {config.model_type} family ({why})"


def _rope_params(config) -> list[dict]:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) or v is None for v in rp.values()):
        return [v for v in rp.values() if v]  # per layer type (Gemma 3)
    return [rp] if isinstance(rp, dict) else []


def check_config(config) -> None:
    """What a supported family's config may set that edgellm does not implement: a one-line
    UnsupportedError naming the field and the supported values."""
    types = getattr(config, "layer_types", None)
    bad = sorted({t for t in types or () if t not in LAYER_TYPES})
    if bad:
        raise UnsupportedError(
            f"config layer_types has {', '.join(map(repr, bad))}; supported entries: {', '.join(LAYER_TYPES)}"
        )
    for rp in _rope_params(config):
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise UnsupportedError(
                f"config rope_parameters rope_type '{kind}' is not implemented; supported: {', '.join(ROPE_TYPES)}"
            )


def get_path(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def decoder_layers(model):
    return get_path(model, family_of(model.config).layers)


def is_linear(module) -> bool:
    """nn.Linear or GPT-2's Conv1D (same maths with the weight stored transposed)."""
    import torch.nn as nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module):
    """The weight as (out, in), whatever the module type (a view for Conv1D)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def set_linear_weight(module, w) -> None:
    """Write an (out, in) weight back into a Linear or Conv1D in place."""
    target = module.weight.data
    target.copy_(w.t() if type(module).__name__ == "Conv1D" else w)


def block_linears(block) -> dict:
    """Linear layers of one decoder block, by their path inside the block, in forward order."""
    return {name: m for name, m in block.named_modules() if is_linear(m)}

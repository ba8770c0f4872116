"""What edgellm knows about each supported architecture, as data.

Modules are found by walking each family's structure (layer list, norms, the linears that read
each norm's output), never by guessing from substrings of weight names.
"""

from __future__ import annotations

from dataclasses import dataclass

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
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": Family(
        layers="transformer.h",
        final_norm="transformer.ln_f",
        # GPT-2's MLP has GELU between c_fc and c_proj, and c_attn fuses q/k/v: only the norms fold.
        scale_groups=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        clip_skip=("attn.c_attn",),
    ),
}

SUPPORTED_TEXT = "Llama (incl. SmolLM2/TinyLlama), Mistral, Qwen2, GPT-2"


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedError(
            f"architecture '{model_type}' is not supported; supported: {SUPPORTED_TEXT} "
            f"(model_type one of {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


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

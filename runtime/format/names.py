"""Tensor names of export format 1, per architecture (docs/EXPORT_FORMAT.md).

The exporter fuses the checkpoint's projections: a decoder layer has four linears, named here by
their role, and two norms. A linear `P` is stored as `P.weight` (float) or `P.qweight` /
`P.scales` / `P.qzeros` (packed, format/blocks.py), plus `P.bias` where the model has one.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("qkv", "o", "up", "down")  # the layer's linears in the order the step runs them
LAYER_NORMS = ("attn", "mlp")  # the norm before attention and the one before the MLP
# every norm a layer may have, by role: before attention / the MLP ("pre" placement), on the
# attention / MLP output before the residual add ("post"), on q and k (metadata `qk_norm`); which
# ones an export holds follows from its metadata (validate.layer_norms)
NORM_ROLES = ("attn", "mlp", "attn_out", "mlp_out", "q", "k")
HEAD = "lm_head"
WEIGHT, BIAS, QWEIGHT, SCALES, QZEROS = "weight", "bias", "qweight", "scales", "qzeros"
# a packed embedding's scales / integer zero points as GatherBlockQuantized reads them: float32 and
# uint8 (vocab, n_blocks, 1), initializers the op takes as they are (OpenVINO needs constants, and
# MatMulNBits refuses that scale shape, so they sit beside the fp16 `P.scales`; exports since 12-07)
GATHER_SCALES, GATHER_ZEROS = "gather_scales", "gather_zeros"


@dataclass(frozen=True)
class TensorNames:
    """Where one architecture keeps each tensor (paths without the `.weight` / `.qweight` part)."""

    layer: str  # prefix of layer i, formatted with i
    linears: dict  # role -> path under the layer
    norms: dict  # LAYER_NORMS entry -> path under the layer
    embed: str
    final_norm: str
    positions: str | None = None  # learned position table (float32 (ctx, hidden)), full name

    def linear(self, i: int, role: str) -> str:
        return f"{self.layer.format(i)}.{self.linears[role]}"

    def norm(self, i: int, which: str) -> str:
        return f"{self.layer.format(i)}.{self.norms[which]}"


LLAMA = TensorNames(
    layer="model.layers.{}",
    linears={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
    norms={
        "attn": "input_layernorm",
        "mlp": "post_attention_layernorm",  # llama's name for the norm before the MLP
        "attn_out": "attn_output_layernorm",
        "mlp_out": "post_feedforward_layernorm",
        "q": "self_attn.q_norm",
        "k": "self_attn.k_norm",
    },
    embed="model.embed_tokens",
    final_norm="model.norm",
)
GPT2 = TensorNames(
    layer="transformer.h.{}",
    linears={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    norms={"attn": "ln_1", "mlp": "ln_2"},
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    positions="transformer.wpe.weight",
)
# every decoder family but GPT-2 is stored under llama's names: what differs between them is the
# per-layer description in the metadata (validate.Features), not where tensors live
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2", "phi3", "gemma3_text")
BY_ARCHITECTURE = {**{a: LLAMA for a in LLAMA_LIKE}, "gpt2": GPT2}
ARCHITECTURES = tuple(BY_ARCHITECTURE)


def names_for(architecture: str) -> TensorNames:
    return BY_ARCHITECTURE[architecture]


def tensor(path: str, part: str) -> str:
    """'model.norm', 'weight' -> 'model.norm.weight'."""
    return f"{path}.{part}"


# checkpoint projections the exporter fuses into one linear, by their module name -> the role
FUSED_ROLES = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "up", "up_proj": "up"}


def export_name(checkpoint_path: str) -> str:
    """The export's name of a checkpoint linear: 'model.layers.0.self_attn.q_proj' ->
    'model.layers.0.self_attn.qkv_proj' (fused); any other module keeps its path."""
    parent, _, leaf = checkpoint_path.rpartition(".")
    if leaf not in FUSED_ROLES:
        return checkpoint_path
    return f"{parent}.{LLAMA.linears[FUSED_ROLES[leaf]].rpartition('.')[2]}"

"""The per-layer description of a decoder family, read from export metadata (docs/EXPORT_FORMAT.md).

A family is data, not a code path: the one layer loop (model.py `forward`, the ONNX builder
export/llama.py) reads these fields. Every key is optional; absent, it means what Llama does, so
exports written before these keys existed read as before.

- `norm_placement`: `pre` (before attention / the MLP), `post` (on their outputs, before the
  residual add: OLMo 2), `both` (Gemma 3's four norms);
- `qk_norm`: null, `head` (RMSNorm over each head, weight (head_dim,): Qwen3, Gemma 3) or `proj`
  (over the whole q / k projection: OLMo 2);
- `rope_dims`: null or an even 2..head_dim: the leading dims of each head that rotate (Phi-3's
  partial_rotary_factor x head_dim);
- `layer_rope`: null or per layer `global` / `local` / `none` (SmolLM3's NoPE layers: none;
  Gemma 3's sliding layers: local), `rope_local_theta` the local table's theta;
- `embedding_multiplier` (Granite; Gemma: sqrt(hidden)), `residual_multiplier` (each block's
  output times it before the residual add: Granite), `attention_scale` (null: 1/sqrt(head_dim);
  Granite's attention_multiplier, Gemma's query_pre_attn_scalar**-0.5), `logits_scaling` (logits
  divided by it: Granite);
- `attn_logit_softcapping`, `final_logit_softcapping`: null or cap, s -> cap tanh(s / cap).

Gemma's RMSNorm `x * (1 + w)` is stored folded (the file holds 1 + w, exact in float32): the
runtime has one RMSNorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import EdgeLLMError

PLACEMENTS = ("pre", "post", "both")
QK_NORMS = ("head", "proj")
LAYER_ROPES = ("global", "local", "none")
KEYS = (
    "norm_placement",
    "qk_norm",
    "rope_dims",
    "layer_rope",
    "rope_local_theta",
    "embedding_multiplier",
    "residual_multiplier",
    "attention_scale",
    "logits_scaling",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)


def _bad(key, value, want) -> EdgeLLMError:
    return EdgeLLMError(f"export metadata 'edgellm.config' has {key} = {value!r}; expected {want}")


def _number(c: dict, key: str, default, lo: float, hi: float, null: bool = False):
    """A finite number in (lo, hi]; null allowed when `null`."""
    v = c.get(key, default)
    if v is None and null:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo < v <= hi:
        raise _bad(key, v, ("null or " if null else "") + f"a number in ({lo:g}, {hi:g}]")
    return float(v)


@dataclass(frozen=True)
class Features:
    """What sets a family apart, resolved per layer (defaults: Llama)."""

    norm_placement: str = "pre"
    qk_norm: str | None = None
    rope_dims: int = 0  # rotated dims per head (resolved: head_dim when the metadata says null)
    layer_rope: tuple = ()  # per layer "global" | "local" | "none"
    rope_local_theta: float | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_scale: float | None = None  # None: 1/sqrt(head_dim)
    logits_scaling: float = 1.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    @property
    def pre_norms(self) -> bool:
        return self.norm_placement in ("pre", "both")

    @property
    def post_norms(self) -> bool:
        return self.norm_placement in ("post", "both")

    def non_llama(self, head_dim: int) -> list[str]:
        """The keys whose value is not Llama's, for a backend that implements only Llama's layer."""
        out = [k for k in KEYS if k not in ("rope_dims", "layer_rope") and getattr(self, k) != getattr(LLAMA, k)]
        if self.rope_dims != head_dim:
            out.append("rope_dims")
        if any(r != "global" for r in self.layer_rope):
            out.append("layer_rope")
        return out

    @classmethod
    def from_metadata(cls, c: dict, *, layers: int, head_dim: int, position: str, norm: str) -> "Features":
        """Each key's type and range, then their consistency with each other and with the rest of
        the config; an EdgeLLMError names the key, its value and what it must be."""
        placement = c.get("norm_placement", "pre")
        if placement not in PLACEMENTS:
            raise _bad("norm_placement", placement, " | ".join(PLACEMENTS))
        qk = c.get("qk_norm")
        if qk is not None and qk not in QK_NORMS:
            raise _bad("qk_norm", qk, "null | " + " | ".join(QK_NORMS))
        rd = c.get("rope_dims")
        if rd is None:
            rd = head_dim
        elif isinstance(rd, bool) or not isinstance(rd, int) or rd < 2 or rd > head_dim or rd % 2:
            raise _bad("rope_dims", rd, f"null or an even integer in [2, {head_dim}] (head_dim)")
        lr = c.get("layer_rope")
        if lr is None:
            lr = ["global"] * layers
        elif not isinstance(lr, list) or len(lr) != layers or any(r not in LAYER_ROPES for r in lr):
            raise _bad("layer_rope", lr, f"null or a list of {layers} entries, each " + " | ".join(LAYER_ROPES))
        local = _number(c, "rope_local_theta", None, 0.0, 1e12, null=True)
        if ("local" in lr) != (local is not None):
            raise _bad(
                "rope_local_theta",
                local,
                "a theta exactly when layer_rope has 'local' layers" if "local" in lr else "null (no 'local' layers)",
            )
        f = cls(
            placement,
            qk,
            rd,
            tuple(lr),
            local,
            _number(c, "embedding_multiplier", 1.0, 0.0, 1e6),
            _number(c, "residual_multiplier", 1.0, 0.0, 1e6),
            _number(c, "attention_scale", None, 0.0, 1e6, null=True),
            _number(c, "logits_scaling", 1.0, 0.0, 1e6),
            _number(c, "attn_logit_softcapping", None, 0.0, 1e6, null=True),
            _number(c, "final_logit_softcapping", None, 0.0, 1e6, null=True),
        )
        if position != "rope":  # learned positions (GPT-2): no rotary keys
            rotary = [k for k in ("rope_dims", "layer_rope", "rope_local_theta") if c.get(k) is not None]
            if rotary:
                raise _bad(rotary[0], c[rotary[0]], "null: position is 'learned', which has no rotary table")
        if norm != "rms" and (qk is not None or placement != "pre"):
            key = "qk_norm" if qk is not None else "norm_placement"
            raise _bad(key, c[key], f"{'null' if key == 'qk_norm' else 'pre'} with norm 'layer' (LayerNorm: GPT-2)")
        return f


LLAMA = Features()

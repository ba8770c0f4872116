"""The rotary tables a run reads, from the export metadata's rope keys (numpy only).

LongRoPE (Phi-3.5, Phi-4-mini: `rope_scaling` type `longrope`) divides each rotary frequency by a
per-frequency factor, `short_factor` or `long_factor`, and scales cos and sin by one
`attention_factor`. Which set applies follows transformers 5.x exactly
(modeling_rope_utils.longrope_frequency_update): per forward call, by that call's largest
position: seq_len = max(position_ids) + 1 > original_max_position_embeddings -> long, else short,
for every token of the call. Keys already in the cache keep the rotation they were cached with.
So decoding token by token switches at position original_max_position_embeddings, and a prompt
that ends past it is rotated with the long factors throughout; the numba runtime
(model.NumbaModel.forward) decides once per `forward` call (not per prompt chunk), and the ONNX
graph (export/decoder.py rotary) per session run, so both equal transformers with its KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import EdgeLLMError


def _bad(key, value, want) -> EdgeLLMError:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return EdgeLLMError(f"export metadata 'edgellm.config' has rope_scaling.{key} = {text}; expected {want}")


def kind(scaling: dict | None) -> str:
    """The rope scaling type of a metadata `rope_scaling` (HF spells it rope_type or type)."""
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default")) or "default"


@dataclass(frozen=True)
class LongRope:
    short_factor: np.ndarray  # (rope_dims/2,) float64
    long_factor: np.ndarray  # (rope_dims/2,)
    original_max: int  # original_max_position_embeddings: longer calls use long_factor
    attention_factor: float  # cos and sin are multiplied by it (both sets)

    @classmethod
    def from_metadata(cls, scaling: dict, rope_dims: int, max_positions: int) -> "LongRope":
        """Each field's type and range (a one-line EdgeLLMError naming it); attention_factor, when
        absent, as transformers derives it (from `factor`, else max / original positions)."""
        half = rope_dims // 2
        factors = []
        for key in ("short_factor", "long_factor"):
            v = scaling.get(key)
            if (
                not isinstance(v, list)
                or len(v) != half
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                or not all(math.isfinite(x) and x > 0 for x in v)
            ):
                raise _bad(key, v, f"a list of {half} positive numbers (rope_dims / 2)")
            factors.append(np.asarray(v, np.float64))
        orig = scaling.get("original_max_position_embeddings")
        if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
            raise _bad("original_max_position_embeddings", orig, "a positive integer")
        att = scaling.get("attention_factor")
        if att is None:
            factor = scaling.get("factor")
            if factor is None:
                factor = max_positions / orig
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
                raise _bad("factor", factor, "null or a finite number")
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig)) if orig > 1 else 1.0
        if isinstance(att, bool) or not isinstance(att, (int, float)) or not math.isfinite(att) or not 0 < att <= 100:
            raise _bad("attention_factor", att, "null or a number in (0, 100]")
        return cls(factors[0], factors[1], orig, float(att))

    def inv_freq(self, theta: float, rope_dims: int, long: bool) -> np.ndarray:
        """(rope_dims/2,) inverse frequencies 1 / (factor_i theta^(2i/rope_dims)), as transformers."""
        ext = self.long_factor if long else self.short_factor
        return 1.0 / (ext * theta ** (np.arange(0, rope_dims, 2, dtype=np.float64) / rope_dims))


def longrope_of(scaling: dict | None, rope_dims: int, max_positions: int) -> LongRope | None:
    """The validated LongRoPE of a metadata `rope_scaling`, or None for another type."""
    if kind(scaling) != "longrope":
        return None
    return LongRope.from_metadata(scaling, rope_dims, max_positions)

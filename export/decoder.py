"""Pieces every decoder family shares: graph I/O with the KV cache, the causal/padding mask,
rotary embeddings, and attention over past + new keys (grouped-query aware).

Shapes: B batch, S new tokens, P past tokens, T = P + S, nh query heads, nkv key/value heads,
rep = nh / nkv, hd head dim. One graph serves the prompt (P = 0) and decode steps (S = 1).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graph import FLOAT, INT64, Graph


class DecoderIO:
    """Declares Optimum-named inputs/outputs; holds the mask shared by all layers."""

    def __init__(self, g: Graph, num_layers: int, num_kv_heads: int, head_dim: int):
        self.g = g
        self.ids = g.input("input_ids", INT64, ["batch", "seq"])
        self.mask = g.input("attention_mask", INT64, ["batch", "total_seq"])
        self.pos = g.input("position_ids", INT64, ["batch", "seq"])
        kv_shape = ["batch", num_kv_heads, "past_seq", head_dim]
        self.past = [(g.input(f"past_key_values.{i}.key", FLOAT, kv_shape), g.input(f"past_key_values.{i}.value", FLOAT, kv_shape))
                     for i in range(num_layers)]
        self.present_shape = ["batch", num_kv_heads, "total_seq", head_dim]
        self._allowed: dict[int | None, str] = {}

    def allowed(self, window: int | None = None) -> str:
        """bool (B, 1, 1, S, T): query s (absolute position P+s) may attend key t iff t <= P+s,
        attention_mask[b, t] == 1, and (sliding window) P+s - t < window."""
        if window in self._allowed:
            return self._allowed[window]
        g = self.g
        s = g.op("Squeeze", [g.shape_dim(self.ids, 1, "mask/S"), g.const([0])], name="mask/S_scalar")
        t = g.op("Squeeze", [g.shape_dim(self.mask, 1, "mask/T"), g.const([0])], name="mask/T_scalar")
        p = g.op("Sub", [t, s], name="mask/P")
        one, zero = g.const(1), g.const(0)
        kpos = g.op("Unsqueeze", [g.op("Range", [zero, t, one], name="mask/kpos"), g.const([0])], name="mask/kpos_row")  # (1, T)
        qpos = g.op("Unsqueeze", [g.op("Range", [p, t, one], name="mask/qpos"), g.const([1])], name="mask/qpos_col")  # (S, 1)
        ok = g.op("LessOrEqual", [kpos, qpos], name="mask/causal")  # (S, T)
        if window is not None:
            dist = g.op("Sub", [qpos, kpos], name="mask/dist")
            ok = g.op("And", [ok, g.op("Less", [dist, g.const(window)], name="mask/in_window")], name="mask/causal_window")
        pad = g.op("Unsqueeze", [g.op("Cast", [self.mask], name="mask/pad", to=TensorProto.BOOL), g.const([1])], name="mask/pad_rows")  # (B, 1, T)
        ok = g.op("And", [ok, pad], name="mask/allowed")  # (B, S, T)
        self._allowed[window] = g.op("Unsqueeze", [ok, g.const([1, 2])], name="mask/allowed5")  # (B, 1, 1, S, T)
        return self._allowed[window]


def rotary(g: Graph, pos: str, inv_freq: np.ndarray, scaling: float) -> tuple[str, str]:
    """cos, sin (B, S, hd) for position_ids (B, S), as HF computes them (fp32)."""
    p = g.op("Unsqueeze", [g.op("Cast", [pos], name="rope/pos", to=FLOAT), g.const([-1])], name="rope/pos3")  # (B, S, 1)
    f = g.op("Mul", [p, g.const(inv_freq.astype(np.float32), np.float32, "rope/inv_freq")], name="rope/freqs")  # (B, S, hd/2)
    emb = g.op("Concat", [f, f], name="rope/emb", axis=-1)  # (B, S, hd)
    cos, sin = g.op("Cos", [emb], name="rope/cos"), g.op("Sin", [emb], name="rope/sin")
    if scaling != 1.0:
        c = g.const(scaling, np.float32, "rope/scaling")
        cos, sin = g.op("Mul", [cos, c], name="rope/cos_scaled"), g.op("Mul", [sin, c], name="rope/sin_scaled")
    return cos, sin


def _apply_rope(g: Graph, x: str, cos: str, sin: str, hd: int, name: str) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[..., hd/2:], x[..., :hd/2])."""
    half = hd // 2
    x1 = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([-1])], name=f"{name}/x1")
    x2 = g.op("Slice", [x, g.const([half]), g.const([hd]), g.const([-1])], name=f"{name}/x2")
    rot = g.op("Concat", [g.op("Neg", [x2], name=f"{name}/neg"), x1], name=f"{name}/rot", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], name=f"{name}/xcos"), g.op("Mul", [rot, sin], name=f"{name}/rsin")], name=name)


def attention(g: Graph, io: DecoderIO, layer: int, q: str, k: str, v: str, *, nh: int, nkv: int, hd: int,
              scale: float, rope: tuple[str, str] | None, window: int | None, name: str) -> str:
    """Attention of new q (B,S,nh*hd) over past + new k/v (B,S,nkv*hd); returns (B,S,nh*hd) and
    exposes present.{layer}.key/value. Grouped-query: q is viewed as (B, nkv, rep, S, hd) so each
    kv head broadcasts over its rep query heads (HF's repeat_kv order: head h = kv*rep + r)."""
    rep = nh // nkv
    q5 = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, nkv, rep, hd])], name=f"{name}/q_heads")],
              name=f"{name}/q5", perm=[0, 2, 3, 1, 4])  # (B, nkv, rep, S, hd)
    k4 = g.op("Transpose", [g.op("Reshape", [k, g.const([0, 0, nkv, hd])], name=f"{name}/k_heads")], name=f"{name}/k4", perm=[0, 2, 1, 3])
    v4 = g.op("Transpose", [g.op("Reshape", [v, g.const([0, 0, nkv, hd])], name=f"{name}/v_heads")], name=f"{name}/v4", perm=[0, 2, 1, 3])
    if rope is not None:
        cos, sin = rope
        cos4 = g.op("Unsqueeze", [cos, g.const([1])], name=f"{name}/cos4")  # (B, 1, S, hd)
        sin4 = g.op("Unsqueeze", [sin, g.const([1])], name=f"{name}/sin4")
        cos5 = g.op("Unsqueeze", [cos4, g.const([1])], name=f"{name}/cos5")  # (B, 1, 1, S, hd)
        sin5 = g.op("Unsqueeze", [sin4, g.const([1])], name=f"{name}/sin5")
        q5 = _apply_rope(g, q5, cos5, sin5, hd, f"{name}/q_rope")
        k4 = _apply_rope(g, k4, cos4, sin4, hd, f"{name}/k_rope")
    past_k, past_v = io.past[layer]
    present_k = g.op("Concat", [past_k, k4], name=f"{name}/present_k", axis=2)  # (B, nkv, T, hd)
    present_v = g.op("Concat", [past_v, v4], name=f"{name}/present_v", axis=2)
    g.output(present_k, f"present.{layer}.key", FLOAT, io.present_shape)
    g.output(present_v, f"present.{layer}.value", FLOAT, io.present_shape)
    kt = g.op("Unsqueeze", [g.op("Transpose", [f"present.{layer}.key"], name=f"{name}/kT", perm=[0, 1, 3, 2]), g.const([2])],
              name=f"{name}/kT5")  # (B, nkv, 1, hd, T)
    scores = g.op("Mul", [g.op("MatMul", [q5, kt], name=f"{name}/qk"), g.const(scale, np.float32, "scale")], name=f"{name}/scores")
    neg = g.const(np.finfo(np.float32).min, np.float32, "mask_value")
    scores = g.op("Where", [io.allowed(window), scores, neg], name=f"{name}/masked")  # (B, nkv, rep, S, T)
    probs = g.op("Softmax", [scores], name=f"{name}/softmax", axis=-1)
    v5 = g.op("Unsqueeze", [f"present.{layer}.value", g.const([2])], name=f"{name}/v5")  # (B, nkv, 1, T, hd)
    o = g.op("MatMul", [probs, v5], name=f"{name}/pv")  # (B, nkv, rep, S, hd)
    o = g.op("Transpose", [o], name=f"{name}/o_t", perm=[0, 3, 1, 2, 4])  # (B, S, nkv, rep, hd)
    return g.op("Reshape", [o, g.const([0, 0, -1])], name=f"{name}/merge")  # (B, S, nh*hd)


def split_last(g: Graph, x: str, sizes: list[int], name: str) -> list[str]:
    return g.op("Split", [x, g.const(sizes)], name=name, outputs=len(sizes), axis=-1)

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
        self.past = [
            (
                g.input(f"past_key_values.{i}.key", FLOAT, kv_shape),
                g.input(f"past_key_values.{i}.value", FLOAT, kv_shape),
            )
            for i in range(num_layers)
        ]
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
        kpos = g.op(
            "Unsqueeze", [g.op("Range", [zero, t, one], name="mask/kpos"), g.const([0])], name="mask/kpos_row"
        )  # (1, T)
        qpos = g.op(
            "Unsqueeze", [g.op("Range", [p, t, one], name="mask/qpos"), g.const([1])], name="mask/qpos_col"
        )  # (S, 1)
        ok = g.op("LessOrEqual", [kpos, qpos], name="mask/causal")  # (S, T)
        if window is not None:
            dist = g.op("Sub", [qpos, kpos], name="mask/dist")
            ok = g.op(
                "And", [ok, g.op("Less", [dist, g.const(window)], name="mask/in_window")], name="mask/causal_window"
            )
        pad = g.op(
            "Unsqueeze",
            [g.op("Cast", [self.mask], name="mask/pad", to=TensorProto.BOOL), g.const([1])],
            name="mask/pad_rows",
        )  # (B, 1, T)
        ok = g.op("And", [ok, pad], name="mask/allowed")  # (B, S, T)
        self._allowed[window] = g.op("Unsqueeze", [ok, g.const([1, 2])], name="mask/allowed5")  # (B, 1, 1, S, T)
        return self._allowed[window]


def rotary(g: Graph, pos: str, inv_freq: np.ndarray, scaling: float, long=None) -> tuple[str, str]:
    """cos, sin (B, S, 1, rot) for position_ids (B, S), as HF computes them (fp32), computed once
    and broadcast over heads in every layer (rot = 2 len(inv_freq): head_dim, or fewer with
    partial rotary). long: LongRoPE's (long inv_freq, original_max_position_embeddings): when
    max(position_ids) + 1 > original, every position of the run rotates with the long set
    (transformers' longrope_frequency_update, runtime/rope.py)."""
    p = g.op(
        "Unsqueeze", [g.op("Cast", [pos], name="rope/pos", to=FLOAT), g.const([-1])], name="rope/pos3"
    )  # (B, S, 1)
    inv = g.const(inv_freq.astype(np.float32), np.float32, "rope/inv_freq")  # (hd/2,)
    if long is not None:
        long_inv, orig = long
        top = g.op("ReduceMax", [pos], name="rope/max_pos", keepdims=0)  # () over the batch, as HF
        is_long = g.op("GreaterOrEqual", [top, g.const(orig)], name="rope/is_long")  # max + 1 > orig
        inv = g.op(
            "Where",
            [is_long, g.const(long_inv.astype(np.float32), np.float32, "rope/long_inv_freq"), inv],
            name="rope/inv_freq_set",
        )
    f = g.op("Mul", [p, inv], name="rope/freqs")  # (B, S, hd/2)
    emb = g.op(
        "Unsqueeze", [g.op("Concat", [f, f], name="rope/emb", axis=-1), g.const([2])], name="rope/emb4"
    )  # (B, S, 1, hd)
    cos, sin = g.op("Cos", [emb], name="rope/cos"), g.op("Sin", [emb], name="rope/sin")
    if scaling != 1.0:
        c = g.const(scaling, np.float32, "rope/scaling")
        cos, sin = g.op("Mul", [cos, c], name="rope/cos_scaled"), g.op("Mul", [sin, c], name="rope/sin_scaled")
    return cos, sin


def _rotate_half_matrix(hd: int) -> np.ndarray:
    """R with x @ R = rotate_half(x) = concat(-x[hd/2:], x[:hd/2]): one MatMul instead of Slice,
    Slice, Neg, Concat; exact in fp32 (each output is one input times +-1 plus zeros)."""
    half = hd // 2
    r = np.zeros((hd, hd), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def attention(
    g: Graph,
    io: DecoderIO,
    layer: int,
    qkv: str,
    *,
    nh: int,
    nkv: int,
    hd: int,
    scale: float,
    rope: tuple[str, str] | None,
    window: int | None,
    name: str,
    rot: int | None = None,
    qk_norm: tuple | None = None,
    softcap: float | None = None,
) -> str:
    """Attention of the new tokens' fused qkv (B, S, (nh+2*nkv)*hd) over past + new keys/values;
    returns (B, S, nh*hd) and exposes present.{layer}.key/value. Grouped-query: q is viewed as
    (B, nkv, rep, S, hd) so each kv head broadcasts over its rep query heads (HF's repeat_kv
    order: head h = kv*rep + r). RoPE rotates q and k together, before they are split, over the
    first `rot` dims of each head (None: all). qk_norm = (kind, q weight, k weight, eps): RMSNorm
    of q and k before RoPE, per head ("head") or over the projection ("proj"). softcap: scores
    -> softcap * tanh(scores / softcap)."""
    rep = nh // nkv
    if qk_norm is not None and qk_norm[0] == "proj":  # (B, S, nh*hd) and (B, S, nkv*hd) each normed whole
        _, wq, wk, eps = qk_norm
        q, k, v = split_last(g, qkv, [nh * hd, nkv * hd, nkv * hd], f"{name}/qkv_split")
        q, k = g.rms_norm(q, wq, eps, f"{name}/q_norm"), g.rms_norm(k, wk, eps, f"{name}/k_norm")
        qkv = g.op("Concat", [q, k, v], name=f"{name}/qkv_normed", axis=-1)
    heads = g.op("Reshape", [qkv, g.const([0, 0, nh + 2 * nkv, hd])], name=f"{name}/heads")  # (B, S, nh+2nkv, hd)
    if qk_norm is not None and qk_norm[0] == "head":  # each head of q and k normed over hd
        _, wq, wk, eps = qk_norm
        q, k, v = g.op("Split", [heads, g.const([nh, nkv, nkv])], name=f"{name}/heads_split", outputs=3, axis=2)
        q, k = g.rms_norm(q, wq, eps, f"{name}/q_norm"), g.rms_norm(k, wk, eps, f"{name}/k_norm")
        heads = g.op("Concat", [q, k, v], name=f"{name}/heads_normed", axis=2)
    if rope is not None:
        qk, v = g.op("Split", [heads, g.const([nh + nkv, nkv])], name=f"{name}/qk_v", outputs=2, axis=2)
        cos, sin = rope
        rot = rot or hd
        if rot < hd:  # partial rotary: the last hd - rot dims pass through
            qk, qk_pass = g.op("Split", [qk, g.const([rot, hd - rot])], name=f"{name}/qk_rot", outputs=2, axis=3)
        rotated = g.op(
            "MatMul", [qk, g.memo_const(f"rope/rotate_half{rot}", _rotate_half_matrix(rot))], name=f"{name}/rotate_half"
        )
        qk = g.op(
            "Add",
            [g.op("Mul", [qk, cos], name=f"{name}/qk_cos"), g.op("Mul", [rotated, sin], name=f"{name}/rot_sin")],
            name=f"{name}/qk_rope",
        )
        if rot < hd:
            qk = g.op("Concat", [qk, qk_pass], name=f"{name}/qk_rot_pass", axis=3)
        q, k = g.op("Split", [qk, g.const([nh, nkv])], name=f"{name}/q_k", outputs=2, axis=2)
    else:
        q, k, v = g.op("Split", [heads, g.const([nh, nkv, nkv])], name=f"{name}/q_k_v", outputs=3, axis=2)
    q5 = g.op(
        "Transpose",
        [g.op("Reshape", [q, g.const([0, 0, nkv, rep, hd])], name=f"{name}/q_groups")],
        name=f"{name}/q5",
        perm=[0, 2, 3, 1, 4],
    )  # (B, nkv, rep, S, hd)
    k4 = g.op("Transpose", [k], name=f"{name}/k4", perm=[0, 2, 1, 3])  # (B, nkv, S, hd)
    v4 = g.op("Transpose", [v], name=f"{name}/v4", perm=[0, 2, 1, 3])
    past_k, past_v = io.past[layer]
    present_k, present_v = f"present.{layer}.key", f"present.{layer}.value"
    g.op("Concat", [past_k, k4], name=f"{name}/present_k", outputs=[present_k], axis=2)  # (B, nkv, T, hd)
    g.op("Concat", [past_v, v4], name=f"{name}/present_v", outputs=[present_v], axis=2)
    g.output(present_k, present_k, FLOAT, io.present_shape)
    g.output(present_v, present_v, FLOAT, io.present_shape)
    kt = g.op(
        "Unsqueeze",
        [g.op("Transpose", [present_k], name=f"{name}/kT", perm=[0, 1, 3, 2]), g.const([2])],
        name=f"{name}/kT5",
    )  # (B, nkv, 1, hd, T)
    scores = g.op(
        "Mul", [g.op("MatMul", [q5, kt], name=f"{name}/qk"), g.const(scale, np.float32, "scale")], name=f"{name}/scores"
    )
    if softcap:
        cap = g.const(softcap, np.float32, "softcap")
        scores = g.op(
            "Mul",
            [g.op("Tanh", [g.op("Div", [scores, cap], name=f"{name}/capped")], name=f"{name}/tanh"), cap],
            name=f"{name}/softcapped",
        )
    neg = g.const(np.finfo(np.float32).min, np.float32, "mask_value")
    scores = g.op("Where", [io.allowed(window), scores, neg], name=f"{name}/masked")  # (B, nkv, rep, S, T)
    probs = g.op("Softmax", [scores], name=f"{name}/softmax", axis=-1)
    v5 = g.op("Unsqueeze", [present_v, g.const([2])], name=f"{name}/v5")  # (B, nkv, 1, T, hd)
    o = g.op("MatMul", [probs, v5], name=f"{name}/pv")  # (B, nkv, rep, S, hd)
    o = g.op("Transpose", [o], name=f"{name}/o_t", perm=[0, 3, 1, 2, 4])  # (B, S, nkv, rep, hd)
    return g.op("Reshape", [o, g.const([0, 0, -1])], name=f"{name}/merge")  # (B, S, nh*hd)


def split_last(g: Graph, x: str, sizes: list[int], name: str) -> list[str]:
    return g.op("Split", [x, g.const(sizes)], name=name, outputs=len(sizes), axis=-1)

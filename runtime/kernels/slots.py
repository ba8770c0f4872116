"""Attention for a batch of sequences decoded together (`edgellm serve --parallel`), beside its
numpy reference.

Each row is one token of its own sequence: row i is the newest token of slot slot[i], at position
pos[i], and attends over that slot's cache. The KV caches of all slots are one array
(S, L, n_kv, ctx, hd): slot s's cache of layer l is kc[s, l], the (n_kv, ctx, hd) layout the
single-sequence kernels read. One parallel region covers every (row, head) pair, each computed
by the decode kernel's own per-query code (`layers._attn_query_rows`), so a row's output equals
what `layers.attention` gives for that sequence alone, bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .layers import _attn_query_rows, kv_get


@njit(cache=True, parallel=True, fastmath=True)
def attention_rows(q, rows, kc, vc, slot, pos, layer, n_heads, n_kv, hd, out, scores, window, scale, softcap):
    """Causal GQA attention of the rows `rows` of q (T, n_heads*hd), row i for slot slot[i] at
    position pos[i]; kc, vc (S, L, n_kv, ctx, hd) already hold each slot's positions [0, pos[i]];
    out (T, n_heads*hd) gets those rows; scores: scratch (len(rows)*n_heads, >= max pos + 1);
    window > 0: the last `window` positions only; scale of q.k (0: 1/sqrt(hd)); softcap > 0:
    scores -> softcap * tanh(scores / softcap)."""
    group = n_heads // n_kv
    scale = np.float32(scale if scale > 0 else 1.0 / np.sqrt(hd))
    softcap = np.float32(softcap)
    for job in prange(rows.shape[0] * n_heads):
        r, h = job // n_heads, job % n_heads
        i = rows[r]
        s = slot[i]
        n = pos[i] + 1  # this query sees keys [p0, n)
        p0 = max(0, n - window) if window > 0 else 0
        _attn_query_rows(
            q[i, h * hd : (h + 1) * hd],
            kc[s, layer, h // group],
            vc[s, layer, h // group],
            scores[job],
            out[i, h * hd : (h + 1) * hd],
            p0,
            n,
            scale,
            softcap,
        )


def ref_attention_rows(q, kc, vc, slot, pos, layer, window=0, scale=0.0, softcap=0.0):
    """q (T, nh, hd); kc, vc (S, L, n_kv, ctx, hd) -> (T, nh, hd) in float64: row i attends over
    slot[i]'s keys [0, pos[i]] (the last `window` of them when window > 0)."""
    t, nh, hd = q.shape
    group = nh // kc.shape[2]
    out = np.zeros((t, nh, hd))
    for i in range(t):
        k = kv_get(kc[slot[i], layer]).astype(np.float64)
        v = kv_get(vc[slot[i], layer]).astype(np.float64)
        lo = max(0, pos[i] + 1 - window) if window else 0
        for h in range(nh):
            s = k[h // group, lo : pos[i] + 1] @ q[i, h] * (scale or 1 / np.sqrt(hd))
            if softcap:
                s = softcap * np.tanh(s / softcap)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[h // group, lo : pos[i] + 1]
    return out

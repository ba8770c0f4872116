"""Attention for a batch of sequences decoded together (`edgellm serve --parallel`), beside its
numpy reference.

Each row is one token of its own sequence: row i is the newest token of slot slot[i], at position
pos[i], and attends over that slot's cache. The KV caches of all slots are one array
(S, L, n_kv, nblk, hd, bs): slot s's cache of layer l is kc[s, l], the (n_kv, nblk, hd, bs) layout the
single-sequence kernels read. One parallel region covers every (row, KV head, part of its heads), each computed
by the decode kernel's own per-query code (`layers._attn_group`), so a row's output equals
what `layers.attention` gives for that sequence alone, bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..format.records import KIND_F16, KIND_F32
from .jitcache import stamp
from .layers import _attn_group, head_split, kv_get, kv_positions
from .quant import RECENTRE, _finish_mat, _frow, _held, _qrows_vec, lane_shift, linear_mat, quantize_act

# Rows up to which a batched step's linears run every row through the decode microkernel
# (`linear_rows`); above it, the prompt chunk's rows take the prompt path's RB x TB tiles (`linear_mat`)
# and the decoding rows stay on the decode microkernel.
ROWS_VEC = 16
ROW_TILE = 32  # weight rows per parallel unit: one tile stays in L1 while every row passes over it


@njit(cache=True, parallel=True, fastmath=True)
def attention_rows(q, rows, kc, vc, slot, pos, layer, n_heads, n_kv, hd, out, scores, window, scale, softcap):
    """Causal GQA attention of the rows `rows` of q (T, n_heads*hd), row i for slot slot[i] at
    position pos[i]; kc, vc (S, L, n_kv, nblk, hd, bs) already hold each slot's positions [0, pos[i]];
    out (T, n_heads*hd) gets those rows; scores: scratch (len(rows)*n_heads, >= max pos + 1);
    window > 0: the last `window` positions only; scale of q.k (0: 1/sqrt(hd)); softcap > 0:
    scores -> softcap * tanh(scores / softcap)."""
    group = n_heads // n_kv
    scale = np.float32(scale if scale > 0 else 1.0 / np.sqrt(hd))
    softcap = np.float32(softcap)
    parts, per = head_split(rows.shape[0] * n_kv, group)
    for job in prange(rows.shape[0] * n_kv * parts):
        r, kv, part = job // (n_kv * parts), (job // parts) % n_kv, job % parts
        h0 = kv * group + part * per
        h1 = min(h0 + per, (kv + 1) * group)
        i = rows[r]
        s = slot[i]
        n = pos[i] + 1  # this query sees keys [p0, n)
        p0 = max(0, n - window) if window > 0 else 0
        # ring 0: a slot's cache keeps every position, sliding layers too (window masks them)
        kt, vt = kc[s, layer, kv], vc[s, layer, kv]  # (nblk, hd, bs)
        _attn_group(q[i], h0, h1, kt, vt, scores, r * n_heads, out[i], p0, n, scale, softcap, 0)


@njit(cache=True, parallel=True, fastmath=True)
def linear_rows(d, x, out, xa, xb, init, xsl, xzb, xs, tier):
    """out (t, n) = x (t, k) W^T + b for a few rows of different sequences (a batched decode step):
    tiles of ROW_TILE weight rows in parallel, each row of x through the decode microkernel
    (`quant._qrows_vec`) while the tile sits in L1. The first row streams the weights with the
    decode kernel's software prefetch; the prompt path's RB x TB tiles have none, and on a 4-bit
    SmolLM2 step of 4 to 8 rows they waited on memory (13 ms for 4 rows against 3.6 ms for 2).
    Each output row equals `linear_vec`'s for that row alone (the same microkernel)."""
    t, n = x.shape[0], d.n
    dv = _held(d)
    ntile = (n + ROW_TILE - 1) // ROW_TILE
    if d.kind == KIND_F32 or d.kind == KIND_F16:
        for tile in prange(ntile):
            r0, r1 = tile * ROW_TILE, min(n, (tile + 1) * ROW_TILE)
            for r in range(r0, r1):
                for i in range(t):
                    out[i, r] = _frow(dv[0], r, x[i])
        return
    off = RECENTRE[tier, d.kind]
    for i in range(t):  # a few rows: no parallel region of their own
        quantize_act(x[i], d, xa[i], xb[i], init[i], xsl[i], xzb[i], xs[i], off)
    so, o = out.strides[0], out.ctypes.data
    shift = lane_shift(d)
    for tile in prange(ntile):
        r0, r1 = tile * ROW_TILE, min(n, (tile + 1) * ROW_TILE)
        for i in range(t):
            _qrows_vec(dv[0], shift, r0, r1, xa[i], xb[i], init[i], xsl[i], o + i * so, tier)
        if dv[0].z_addr != 0 or dv[0].b_addr != 0:
            _finish_mat(dv[0], r0, r1, out, xzb, t)


@njit(cache=True, inline="always")
def batch_linear(d, x, out, act, tier, nd):
    """The linear of a batched step whose first nd rows decode (one token of their slot each): those
    always through `linear_rows` (the decode microkernel, so a row's output never depends on how
    many others share the step); the rest, a prompt chunk, too when the step has at most ROWS_VEC
    rows, else through the prompt path's tiles (`linear_mat`), which sum in another order."""
    xa, xb, init, xsl, xzb, xs = act
    t = x.shape[0]
    if t <= ROWS_VEC or nd >= t:
        linear_rows(d, x, out, xa, xb, init, xsl, xzb, xs, tier)
        return
    if nd > 0:
        linear_rows(d, x[:nd], out[:nd], xa[:nd], xb[:nd], init[:nd], xsl[:nd], xzb[:nd], xs[:nd], tier)
    linear_mat(d, x[nd:], out[nd:], xa[nd:], xb[nd:], init[nd:], xsl[nd:], xzb[nd:], xs[nd:], tier)


def ref_attention_rows(q, kc, vc, slot, pos, layer, window=0, scale=0.0, softcap=0.0):
    """q (T, nh, hd); kc, vc (S, L, n_kv, nblk, hd, bs) -> (T, nh, hd) in float64: row i attends over
    slot[i]'s keys [0, pos[i]] (the last `window` of them when window > 0)."""
    t, nh, hd = q.shape
    group = nh // kc.shape[2]
    out = np.zeros((t, nh, hd))
    for i in range(t):
        k = kv_positions(kv_get(kc[slot[i], layer])).astype(np.float64)  # (n_kv, positions, hd)
        v = kv_positions(kv_get(vc[slot[i], layer])).astype(np.float64)
        lo = max(0, pos[i] + 1 - window) if window else 0
        for h in range(nh):
            s = k[h // group, lo : pos[i] + 1] @ q[i, h] * (scale or 1 / np.sqrt(hd))
            if softcap:
                s = softcap * np.tanh(s / softcap)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[h // group, lo : pos[i] + 1]
    return out


# numba's cache of this module's kernels keys on all their sources, not only this file (jitcache.py)
stamp(globals())

"""Several sequences through the model in one step: the batched forward of `edgellm serve --parallel`.

`forward_rows` is the hot loop of the parallel server: one compiled call runs T rows, each a token
of one of S sequences (slots) at its own position, through every layer. Each weight is read from
memory once for all rows: decoding rows (the first rows of a step) always go through `linear_rows`,
which holds a tile of weight rows in L1 while every row passes over it with the decode microkernel,
so a decoding slot's logits never depend on how many requests are in flight; a prompt chunk's rows
join them up to ROWS_VEC rows in all, above that take the prompt path's RB x TB tiles (`linear_mat`).
Attention is per sequence against its own KV cache:
- a row that is its slot's only token this step (decode) joins one parallel attention region
  over all such rows (kernels/slots.py `attention_rows`, the decode kernel's per-query code);
- a run of rows of one slot at consecutive positions (a chunk of a prompt) goes through the
  prompt kernel (`attention_mat`) against that slot's cache.
Every kernel computes a row independently of the others, so each sequence's logits equal what the
single-sequence `model.forward` gives for it alone (tests/test_slots.py checks them bit for bit).

`SlotCaches` holds the S caches (pages of one lazily zeroed array) and runs a step of segments.
"""

from __future__ import annotations

import subprocess
import sys

import numba
import numpy as np
from numba import njit

from .errors import EdgeLLMError
from .format.records import ROPE_LOCAL
from .kernels.family import scale_cap
from .kernels.jitcache import stamp
from .kernels.layers import attention_mat, embed_rows, kv_cast, rope
from .kernels.simd import as_voidptr
from .kernels.slots import attention_rows, batch_linear
from .kvcache import blocked, lazy_zeros
from .model import _activate, _mlp_in, _norm, _qk_norm, _residual
from .validate import available_memory, run_bytes

# Prompt tokens per step, summed over the slots that are reading a prompt: a long prompt is read
# in chunks of this many tokens, between which the running streams decode one token each.
PREFILL_CHUNK = 64


@njit(cache=True)
def forward_rows(ids, slot, pos, dec, segs, want, cfg, model, layers, cos, sin, kc, vc, logits, tier):
    """Run T = len(ids) rows through every layer; write logits (R, V) of the rows `want`.

    Row i is a token of slot slot[i] at position pos[i]. dec (D,): the rows that are their slot's
    only token this step, rows 0..D-1; segs (G, 3): [first row, rows, slot] of each run of several rows of one
    slot at consecutive positions (a prompt chunk). kc, vc: KV caches (S, L, NKV, nblk, HD, bs) (kvcache.blocked); the
    rest as `model.forward`."""
    t, nd = ids.shape[0], dec.shape[0]
    H, NH, NKV, HD = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
    cap, nbc = cfg.act_cap, cfg.block_cap
    x = np.empty((t, H), np.float32)  # residual stream (T, H)
    xn = np.empty((t, H), np.float32)
    qkv = np.empty((t, (NH + 2 * NKV) * HD), np.float32)  # (T, q|k|v)
    att = np.empty((t, NH * HD), np.float32)
    res = np.empty((t, H), np.float32)
    up = np.empty((t, layers[0].up.n), np.float32)
    mid = np.empty((t, cfg.intermediate), np.float32)
    act = (  # int8 activations and their scales (kernels/quant.py quantize_act)
        np.empty((t, cap), np.int8),
        np.empty((t, cap), np.int8),
        np.empty((t, cap // 4), np.int32),
        np.empty((t, cap // 4), np.float32),
        np.empty((t, nbc), np.float32),
        np.empty((t, nbc), np.float32),
    )
    span = 1  # scores scratch: (D * NH, max position + 1) for decode rows, (chunk * NH, chunk end) per chunk
    for i in range(t):
        span = max(span, pos[i] + 1)
    chunk = 1
    for g in range(segs.shape[0]):
        chunk = max(chunk, segs[g, 1])
    dscores = np.empty((max(1, dec.shape[0]) * NH, span), np.float32)
    cscores = np.empty((chunk * NH, span), np.float32)
    embed_rows(model.embed, ids, x)
    if cfg.emb_mult != 1:
        scale_cap(x, cfg.emb_mult, np.float32(0.0))
    if cfg.learned_pos:  # learned positions (gpt2)
        wpe = numba.carray(as_voidptr(model.positions_addr), (cfg.ctx, H), np.float32)
        for i in range(t):
            for j in range(H):
                x[i, j] += wpe[pos[i], j]
    for l in range(cfg.layers):
        layer = layers[l]
        # attention block
        if layer.attn_norm_w != 0:
            _norm(cfg, x, layer.attn_norm_w, layer.attn_norm_b, xn)
        else:
            xn[:] = x
        batch_linear(layer.qkv, xn, qkv, act, tier, nd)
        _qk_norm(layer, qkv, NH, NKV, HD, cfg.eps)
        if layer.rope != 0:
            tab = 1 if layer.rope == ROPE_LOCAL else 0
            for i in range(t):  # each row at its own position
                rope(qkv[i : i + 1], 0, NH, HD, pos[i], cos[tab], sin[tab], cfg.rope_dims)
                rope(qkv[i : i + 1], NH * HD, NKV, HD, pos[i], cos[tab], sin[tab], cfg.rope_dims)
        bs = kc.shape[5]  # positions per block of the cache (kvcache.blocked)
        for i in range(t):
            s, p = slot[i], pos[i]
            for h in range(NKV):
                for j in range(HD):
                    kc[s, l, h, p // bs, j, p % bs] = kv_cast(qkv[i, (NH + h) * HD + j], kc)
                    vc[s, l, h, p // bs, j, p % bs] = kv_cast(qkv[i, (NH + NKV + h) * HD + j], vc)
        sc, acap = cfg.attn_scale, cfg.attn_cap
        if dec.shape[0] > 0:
            attention_rows(qkv, dec, kc, vc, slot, pos, l, NH, NKV, HD, att, dscores, layer.window, sc, acap)
        for g in range(segs.shape[0]):
            r0, n, s = segs[g, 0], segs[g, 1], segs[g, 2]
            q, o = qkv[r0 : r0 + n], att[r0 : r0 + n]
            attention_mat(q, kc[s, l], vc[s, l], pos[r0], NH, NKV, HD, o, cscores, layer.window, sc, acap)
        batch_linear(layer.o, att, res, act, tier, nd)
        _residual(cfg, x, res, layer.attn_out_norm_w, xn)
        # MLP block
        _mlp_in(cfg, layer, x, xn)
        batch_linear(layer.up, xn, up, act, tier, nd)
        _activate(cfg, up, mid)
        batch_linear(layer.down, mid, res, act, tier, nd)
        _residual(cfg, x, res, layer.mlp_out_norm_w, xn)
    r = want.shape[0]  # the head only for the rows whose logits are wanted
    xw = np.empty((r, H), np.float32)
    for k in range(r):
        xw[k] = x[want[k]]
    xo = np.empty((r, H), np.float32)
    _norm(cfg, xw, model.final_norm_w, model.final_norm_b, xo)
    batch_linear(model.head, xo, logits, act, tier, r)  # a row each: decode's kernel
    if cfg.logit_mult != 1 or cfg.final_cap > 0:
        scale_cap(logits, cfg.logit_mult, cfg.final_cap)


class SlotCaches:
    """The KV caches of `n` sequences decoded together on `model` (a NumbaModel): one array
    (n, L, NKV, nblk, HD, bs) whose pages become resident only as positions are written."""

    def __init__(self, model, n: int):
        if n < 1:
            raise EdgeLLMError(f"--parallel {n} is invalid; give 1 or more")
        if model.rope_switch > 0:  # LongRoPE switches its tables per call by the sequence's last position
            raise EdgeLLMError(
                "this model's rotary embedding is LongRoPE (Phi-3.5 / Phi-4-mini), which the batched step does not "
                "switch per slot yet; serve it with --parallel 1"
            )
        cfg, st = model.config, model.state
        self.model, self.n = model, n
        shape = blocked((n, cfg.num_layers, cfg.num_kv_heads), cfg.head_dim, model.n_ctx)  # (S, L, NKV, nblk, HD, bs)
        self.k = lazy_zeros(shape, st.k.dtype)
        self.v = lazy_zeros(shape, st.v.dtype)
        self.pos = [0] * n  # positions cached per slot

    def step(self, segments: list[tuple[int, np.ndarray, bool, bool]]) -> np.ndarray:
        """Append each segment's tokens (slot, ids, wants logits, is prompt) at its slot's position,
        all in one compiled call; the logits (R, V) of the last token of each segment that wants
        them, in order. A slot appears at most once. Prompt tokens always go through the prompt's
        attention kernel, generated ones through the decode kernel: the two round differently, so
        a prompt's keys and values are the same however its chunks fall (one token or many)."""
        args = self._args(segments)
        numba.set_num_threads(self.model.threads)
        forward_rows(*args)
        for s, toks, *_ in segments:
            self.pos[s] += len(toks)
        return args[13]

    def _args(self, segments) -> tuple:
        """The arguments of `forward_rows` for `segments` (see `step`)."""
        m = self.model
        ids, slot, pos, dec, segs, want = [], [], [], [], [], []
        first = {}  # segment -> its first row: decoding segments first (rows 0..D-1), then the chunks
        order = sorted(range(len(segments)), key=lambda g: not (len(segments[g][1]) == 1 and not segments[g][3]))
        for g in order:
            s, toks, wants, prompt = segments[g]
            n, p0 = len(toks), self.pos[s]
            if n == 0:
                raise EdgeLLMError("no tokens to run")
            if p0 + n > m.n_ctx:
                raise EdgeLLMError(f"{p0 + n} tokens exceed the context of {m.n_ctx}")
            r0 = first[g] = len(ids)
            ids.extend(int(i) for i in toks)
            slot.extend([s] * n)
            pos.extend(range(p0, p0 + n))
            if n == 1 and not prompt:
                dec.append(r0)
            else:
                segs.append((r0, n, s))
        for g, (_, toks, wants, _) in enumerate(segments):  # logits in the segments' order
            if wants:
                want.append(first[g] + len(toks) - 1)
        ids_a = np.array(ids, np.int64)
        if ids_a.min() < 0 or ids_a.max() >= m.config.vocab_size:
            raise EdgeLLMError(f"token id out of range [0, {m.config.vocab_size})")
        w = m.weights
        return (
            ids_a,
            np.array(slot, np.int64),
            np.array(pos, np.int64),
            np.array(dec, np.int64),
            np.array(segs, np.int64).reshape(-1, 3),
            np.array(want, np.int64),
            m.run_config,
            w.model,
            w.layers,
            *m.rope_sets[0],  # cos, sin (2, ctx, rope_dims/2): one set, LongRoPE refused above
            self.k,
            self.v,
            np.empty((len(want), m.config.vocab_size), np.float32),
            m.tier,
        )

    def copy_prefix(self, src: int, dst: int, n: int):
        """Slot dst's first n positions := slot src's (both caches then hold the same prefix)."""
        nb = -(-n // self.k.shape[-1])  # whole blocks: positions >= n are written before they are read
        self.k[dst, :, :, :nb] = self.k[src, :, :, :nb]
        self.v[dst, :, :, :nb] = self.v[src, :, :, :nb]
        self.pos[dst] = n

    def truncate(self, s: int, n: int):
        """Forget slot s's positions >= n."""
        self.pos[s] = min(self.pos[s], n)

    def warmup(self):
        """Load the batched step from numba's cache, compiled first in a child process when it is
        not there (as model.forward's, runtime/warmup.py: LLVM's memory leaves with the child),
        then run it once: decode rows and a prompt chunk."""
        from .warmup import cache_state

        m = self.model
        if cache_state(forward_rows, self._args([(0, np.zeros(2, np.int64), True, True)]))[0] == "missing":
            _compile_in_child(m.tier, m.kv_cache == "fp16")
        if self.n > 1:
            self.step([(0, np.zeros(2, np.int64), True, True), (1, np.zeros(1, np.int64), True, False)])
        else:
            self.step([(0, np.zeros(2, np.int64), True, True)])
        self.pos = [0] * self.n


def _warm_args(tier, kv_fp16: bool, keep: list) -> tuple:
    """`forward_rows` arguments on warmup.py's synthetic one-layer model: a decode row and a
    two-row chunk (the types are what numba compiles for; the sizes do not matter)."""
    from .warmup import step_args

    _, _, cfg, model, layers, cos, sin, kc, vc, _kr, _vr, logits, _all, _prompt, tier = step_args(tier, kv_fp16, keep)
    kc, vc = np.stack([kc, kc]), np.stack([vc, vc])  # (S=2, L, NKV, nblk, HD, bs)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    rows = (i64(1, 2, 3), i64(0, 1, 1), i64(0, 0, 1), i64(0), i64(1, 2, 1).reshape(1, 3), i64(0, 2))
    return (*rows, cfg, model, layers, cos, sin, kc, vc, np.empty((2, logits.shape[1]), np.float32), tier)


def _compile_in_child(tier, kv_fp16: bool) -> bool:
    """Compile `forward_rows` for `tier` into numba's cache in a child process; False if it failed
    (then the caller's first step compiles it in-process)."""
    cmd = [sys.executable, "-m", "edgellm.runtime.batched", tier.name, "fp16" if kv_fp16 else "fp32"]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=3600)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def slots_bytes(cfg, n_ctx: int, kv_itemsize: int, parallel: int) -> dict[str, int]:
    """What `edgellm serve --parallel` allocates besides the weights: the single-sequence run's
    parts (validate.run_bytes) plus `parallel` slot caches and the batched step's scratch."""
    parts = run_bytes(cfg, n_ctx, kv_itemsize)
    kv = parts["KV cache"]
    parts["KV cache"] = kv * (parallel + 1)  # the model's own cache (warm-up, echo scoring) + one per slot
    return parts


def check_parallel(path, parallel: int, n_ctx: int | None, kv_cache: str = "auto") -> int:
    """`edgellm serve --parallel`'s check before loading: the slot count is 1 or more and its KV
    caches fit in the memory available (read from the export's metadata only). Bytes needed."""
    from .loader import open_export
    from .validate import ModelConfig, Quant

    if parallel < 1:
        raise EdgeLLMError(f"--parallel {parallel} is invalid; give 1 or more (requests decoded together)")
    ex = open_export(path)
    try:
        cfg = ModelConfig.from_metadata(ex.config)
        q = Quant.from_metadata(ex.quantization)
    finally:
        ex.close()
    ctx = min(n_ctx or cfg.max_position_embeddings, cfg.max_position_embeddings)
    itemsize = 2 if kv_cache == "fp16" or (kv_cache == "auto" and q is not None) else 4
    return check_slots_memory(cfg, ctx, itemsize, parallel)


def check_slots_memory(cfg, n_ctx: int, kv_itemsize: int, parallel: int) -> int:
    """Refuse a --parallel whose caches do not fit in the memory available (before loading)."""
    if parallel < 1:
        raise EdgeLLMError(f"--parallel {parallel} is invalid; give 1 or more (slots decoded together)")
    parts = slots_bytes(cfg, n_ctx, kv_itemsize, parallel)
    need = sum(parts.values())
    avail = available_memory()
    if avail is not None and need > avail:
        mib = 1 << 20
        kv_slot = 2 * cfg.num_layers * cfg.num_kv_heads * n_ctx * cfg.head_dim * kv_itemsize
        raise EdgeLLMError(
            f"--parallel {parallel} needs {need / mib:,.0f} MiB for {parallel} KV caches of {n_ctx} tokens "
            f"({kv_slot / mib:,.0f} MiB each) and scratch, but only {avail / mib:,.0f} MiB is available; "
            "give a smaller --parallel or --ctx"
        )
    return need


# numba's cache of this module's kernels keys on all their sources, not only this file (jitcache.py)
stamp(globals())


if __name__ == "__main__":  # the child of _compile_in_child: python -m edgellm.runtime.batched TIER fp16|fp32
    from .kernels import tiers

    keep: list = []  # the synthetic weights the records point into
    forward_rows(*_warm_args(tiers.BY_NAME[sys.argv[1]], sys.argv[2] == "fp16", keep))

"""The Numba model: config, weights and run state kept apart (llama2.c style), and `forward`.

`forward` is the hot loop: one compiled call runs every layer for t new tokens (t = 1 while
decoding, the whole prompt while prefilling) against a preallocated KV cache; inside it, each
matrix product is one `prange` region and nothing returns to Python between operations.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
from numba import njit

from .errors import EdgeLLMError, UnsupportedError
from .format.records import CONFIG, KIND_F16, KIND_F32, LAYER, LINEAR, MODEL, ROPE_KINDS, ROPE_LOCAL, record, records
from .hugepages import HUGE, Arena
from .kernels import tiers
from .kernels.family import geglu, rms_norm_cols, scale_cap
from .kernels.jitcache import stamp
from .kernels.layers import (
    attention,
    attention_mat,
    copy_rows,
    embed_rows,
    gelu_new,
    kv_cast,
    layer_norm,
    rms_norm,
    rope,
    rope_inv_freq,
    rope_tables,
    swiglu,
)
from .kernels.quant import act_caps, checked_tier, linear_few, linear_mat
from .kernels.simd import as_voidptr
from .kernels.tiers import describe as describe_tier
from .kvcache import RunState
from .loader import Export
from .plan import LinearPlan, Norm, WeightsPlan, plan_export
from .rope import longrope_of
from .validate import ModelConfig

# ----------------------------------------------------------------------------- config
# The format checks live in validate.py (every backend); below, what only the numba kernels cannot
# run (--backend onnxruntime still can).
NUMBA_MLPS = {
    ("gated", "silu"),
    ("gated", "gelu_pytorch_tanh"),  # GeGLU (Gemma)
    ("plain", "gelu_new"),
    ("plain", "gelu_pytorch_tanh"),
}  # gelu_pytorch_tanh = gelu_new's formula
ORT_HINT = "; --backend onnxruntime may still run it"
ROLES = ("qkv", "o", "up", "down")


def check_numba_support(cfg: ModelConfig, ex: Export, who: str = "the numba runtime", hint: str = ORT_HINT) -> None:
    """What the numba kernels (CPU, and the CUDA path with its own `who`) cannot run."""
    fmt = (ex.quantization or {}).get("format", "matmulnbits")
    if fmt != "matmulnbits":
        raise UnsupportedError(
            f"'{ex.path}' stores its quantized weights as '{fmt}' (DequantizeLinear); {who} reads "
            f"the MatMulNBits layout (export with --format matmulnbits){hint}"
        )
    if (cfg.mlp, cfg.activation) not in NUMBA_MLPS:
        raise UnsupportedError(
            f"a {cfg.mlp} MLP with activation '{cfg.activation}' is not supported by {who} (supported: "
            f"{', '.join(f'{m}/{a}' for m, a in sorted(NUMBA_MLPS))}){hint}"
        )


def run_config(cfg: ModelConfig, n_ctx: int, act_cap: int, block_cap: int):
    """The CONFIG record the compiled step reads."""
    c = record(CONFIG)
    c.hidden, c.intermediate, c.layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    c.heads, c.kv_heads, c.head_dim, c.ctx = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, n_ctx
    c.layer_norm = cfg.norm == "layer"
    c.learned_pos = cfg.position == "learned"
    c.gated = cfg.mlp == "gated"
    c.gelu_gate = c.gated and cfg.activation == "gelu_pytorch_tanh"
    c.act_cap, c.block_cap, c.eps = act_cap, block_cap, cfg.norm_eps
    f = cfg.features  # the family's description (features.py)
    c.rope_dims = f.rope_dims
    c.emb_mult, c.res_mult = f.embedding_multiplier, f.residual_multiplier
    c.attn_scale = f.attention_scale or 1.0 / np.sqrt(cfg.head_dim)
    c.logit_mult = 1.0 / f.logits_scaling
    c.attn_cap, c.final_cap = f.attn_logit_softcapping or 0.0, f.final_logit_softcapping or 0.0
    return c


# ----------------------------------------------------------------------------- weights
class Weights:
    """The plan's tensors as records of addresses (format/records.py) into the memory-mapped file.

    Copies made at load, all small: fp16 scales padded for 16-lane loads (older files store them
    as float32) and, for asymmetric formats, zero*scale as float32."""

    def __init__(self, plan: WeightsPlan):
        self._keep = []  # every array whose address a record holds
        self._ex = plan.export
        # the matrices every decode step streams move to huge pages where the kernel allows
        # (hugepages.py); an untied embedding stays in the file map: a step reads one row of it
        streamed = [lin for lp in plan.layers for lin in lp.linears.values()]
        streamed.append(plan.head if plan.head is not None else plan.embed)
        self.arena = Arena.open([lin.weight for lin in streamed])
        self._streamed = {id(lin.weight) for lin in streamed}
        self.bits = plan.quant.bits if plan.quant else 0
        self.layers = records(LAYER, len(plan.layers))  # (L,) LAYER
        rows = self.layers.view(np.recarray)
        for i, lp in enumerate(plan.layers):
            row = rows[i]
            for role, lin in lp.linears.items():
                setattr(row, role, self._linear(lin))
            row.attn_norm_w, row.attn_norm_b = self._norm(lp.norms.get("attn"))
            row.mlp_norm_w, row.mlp_norm_b = self._norm(lp.norms.get("mlp"))
            row.attn_out_norm_w = self._norm(lp.norms.get("attn_out"))[0]
            row.mlp_out_norm_w = self._norm(lp.norms.get("mlp_out"))[0]
            row.q_norm_w, row.k_norm_w = self._norm(lp.norms.get("q"))[0], self._norm(lp.norms.get("k"))[0]
            row.qk_width = lp.norms["q"].weight.shape[0] if "q" in lp.norms else 0
            row.window, row.rope = lp.window, ROPE_KINDS[lp.rope]
        self.model = m = record(MODEL)
        m.embed = self._linear(plan.embed)
        m.head = self._linear(plan.head) if plan.head is not None else m.embed  # tied: one copy in the file
        m.final_norm_w, m.final_norm_b = self._norm(plan.final_norm)
        m.positions_addr = self._addr(plan.positions, np.float32) if plan.positions is not None else 0
        caps = [act_caps(d) for d in self.linears()]
        self.act_cap = max(c for c, _ in caps)
        self.block_cap = max(b for _, b in caps)
        self.bytes_per_token = plan.bytes_per_token

    def linears(self) -> list:
        """Every LINEAR record the decode step reads (decoder layers, then the head)."""
        rows = self.layers.view(np.recarray)
        return [getattr(r, role) for r in rows for role in ROLES] + [self.model.head]

    def _addr(self, arr: np.ndarray, dtype) -> int:
        if arr.dtype != dtype:
            arr = arr.astype(dtype)
        arr = np.ascontiguousarray(arr)
        self._keep.append(arr)
        return arr.ctypes.data

    def _placed(self, weight: np.ndarray) -> np.ndarray:
        """`weight` copied into the huge-page arena (its file pages let go), or itself without one."""
        if self.arena is None or id(weight) not in self._streamed:
            return weight
        return self.arena.place(weight, release=self._ex.drop_pages)

    def _norm(self, norm: Norm | None) -> tuple[int, int]:
        if norm is None:  # a norm this family's layer does not have
            return 0, 0
        bias = self._addr(norm.bias, np.float32) if norm.bias is not None else 0
        return self._addr(norm.weight, np.float32), bias

    def _linear(self, p: LinearPlan):
        d = record(LINEAR)
        d.n, d.k = p.n, p.k
        if p.fmt is None:
            d.kind = KIND_F32 if p.weight.dtype == np.float32 else KIND_F16
            d.row_bytes, d.w_addr = p.k * p.weight.itemsize, self._addr(self._placed(p.weight), p.weight.dtype)
        else:
            n, nb = p.n, p.nb
            s16 = np.zeros(n * nb + 16, np.float16)  # (n * nb + 16,): 16-lane loads past the last scale
            s16[: n * nb] = p.scales
            d.kind, d.w_addr = p.bits, self._addr(self._placed(p.weight), np.uint8)
            d.s_addr = self._addr(s16.view(np.uint16), np.uint16)
            d.block, d.nb, d.row_bytes, d.zero = p.fmt.block, nb, nb * p.weight.shape[2], p.fmt.sym_zero
            d.sym = p.zeros is None
            if p.zeros is not None:
                d.z_addr = self._addr(p.zeros * p.scales.reshape(n, nb).astype(np.float32), np.float32)
                self._ex.drop_pages(p.stored_zeros)
            self._ex.drop_pages(p.scales)  # the kernels read the fp16 copy
        if p.bias is not None:
            d.b_addr = self._addr(p.bias, np.float32)
        return d


# ----------------------------------------------------------------------------- run state
KV_CACHE_TYPES = ("auto", "fp16", "fp32")


# ----------------------------------------------------------------------------- the hot loop
# Calls of up to FEW_TOKENS tokens that are not a prompt (a decode step, a speculative verify pass:
# runtime/speculate.py) run each token through the decode kernels (`linear_few`, `attention`): their
# logits and keys/values equal those of as many decode steps bit for bit, so speculation returns
# exactly the tokens plain decoding would. The prompt tiles (`linear_mat`, `attention_mat`) round
# differently, and on SmolLM2 4-bit that moved later logits by up to 1.0 (the int8 activations
# amplify the difference). A prompt (`prompt=True`) always takes the prompt tiles, however few its
# tokens: its logits and cache then do not depend on how it was split (prefix reuse leaves a short
# remainder; the `--parallel` slots read prompts in chunks through the same tiles).
FEW_TOKENS = 16


@njit(cache=True, inline="always")
def _linear(d, x, out, act, tier, few):
    """y = x W^T + b for the LINEAR record d; `act` is the int8 activation scratch. Inlined into
    `forward` by numba (not a compiled function of its own: that re-optimized both linears'
    code once more, 0.9 s of a first compile). Decode (t = 1) runs `linear_few` too: the same
    microkernel, row blocks and finish as `linear_vec`, and one parallel kernel fewer to
    compile on a first start (linear_vec was 1.8 s of CPU on Zen 5)."""
    xa, xb, init, xsl, xzb, xs = act
    if few:
        linear_few(d, x, out, xa, xb, init, xsl, xzb, xs, tier)
    else:
        linear_mat(d, x, out, xa, xb, init, xsl, xzb, xs, tier)


@njit(cache=True)
def _norm(cfg, x, w_addr, b_addr, out):
    if cfg.layer_norm:
        layer_norm(x, w_addr, b_addr, cfg.eps, out)
    else:
        rms_norm(x, w_addr, cfg.eps, out)


@njit(cache=True)
def _qk_norm(layer, qkv, NH, NKV, HD, eps):
    """RMSNorm of q and k inside the fused qkv (t, (NH + 2 NKV) HD), per head or over the
    projection (layer.qk_width columns per segment)."""
    if layer.q_norm_w == 0:
        return
    per_head = layer.qk_width == HD  # per head (Qwen3, Gemma 3), else over the projection (OLMo 2)
    for seg in range(2):  # q, then k, through one call site: one compiled rms_norm_cols, not four
        heads = NKV if seg else NH  # (a constant argument is typed as its literal, a specialization each)
        n_seg = heads if per_head else 1
        rms_norm_cols(qkv, seg * NH * HD, n_seg, heads * HD // n_seg, layer.k_norm_w if seg else layer.q_norm_w, eps)


@njit(cache=True)
def _residual(cfg, x, res, out_norm_w, xn):
    """x += res_mult * (post-norm of res, where the layer has one)."""
    if out_norm_w != 0:
        rms_norm(res, out_norm_w, cfg.eps, xn)
        copy_rows(xn, res)
    if cfg.res_mult != 1:
        scale_cap(res, cfg.res_mult, np.float32(0.0))
    for i in range(x.shape[0]):  # loops: numba's array `+=` compiles a shape check whose error
        for j in range(x.shape[1]):  # message (string formatting) was 1.5 s of a 19 s first compile
            x[i, j] += res[i, j]


@njit(cache=True)
def _mlp_in(cfg, layer, x, xn):
    """xn := the MLP's input: x through the layer's pre-MLP norm (OLMo 2 has none: x itself)."""
    if layer.mlp_norm_w != 0:
        _norm(cfg, x, layer.mlp_norm_w, layer.mlp_norm_b, xn)
    else:
        copy_rows(x, xn)


@njit(cache=True)
def _activate(cfg, up, mid):
    """mid := the family's MLP activation of up: GeGLU, SwiGLU (gate and up halves) or GELU."""
    if cfg.gelu_gate:
        geglu(up, cfg.intermediate, mid)
    elif cfg.gated:
        swiglu(up, cfg.intermediate, mid)
    else:
        gelu_new(up, mid)


@njit(cache=True)
def forward(ids, pos0, cfg, model, layers, cos, sin, kc, vc, kr, vr, logits, all_logits, prompt, tier):
    """Run t = len(ids) tokens at positions pos0.. through every layer; write logits (t or 1, V).

    cfg: CONFIG record; model: MODEL record (embedding, head, final norm); layers: (L,) LAYER
    records (the family's per-layer description: norms and their placement, q/k norm, rope table,
    window, KV rows); cos, sin: rope tables (2: global, local; ctx, rope_dims/2); kc, vc: the
    full-attention layers' KV cache (L_full, NKV, nblk, HD, bs: kvcache.blocked); kr, vr: the sliding
    layers' ring buffers (L_ring, NKV, nblk, HD, bs over the ring's rows); `prompt`: the tokens are
    (part of) a prompt, read through the prompt tiles whatever their number (FEW_TOKENS above);
    `tier`: the kernel tier of the quantized linears, a `Tier` (compiled as the literal of its id:
    one specialization per tier, holding that tier's code only, kernels/tiers.py)."""
    t = ids.shape[0]
    few = t <= FEW_TOKENS and not prompt  # decode kernels: a decode step or a verify pass
    H, NH, NKV, HD = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
    cap, nbc = cfg.act_cap, cfg.block_cap
    x = np.empty((t, H), np.float32)  # residual stream (t, H)
    xn = np.empty((t, H), np.float32)
    qkv = np.empty((t, (NH + 2 * NKV) * HD), np.float32)  # (t, q|k|v)
    att = np.empty((t, NH * HD), np.float32)
    res = np.empty((t, H), np.float32)
    up = np.empty((t, layers[0].up.n), np.float32)
    mid = np.empty((t, cfg.intermediate), np.float32)
    act = (  # int8 activations and their scales (kernels/quant.py quantize_act)
        np.empty((t, cap), np.int8),  # xa
        np.empty((t, cap), np.int8),  # xb
        np.empty((t, cap // 4), np.int32),  # init
        np.empty((t, cap // 4), np.float32),  # xsl
        np.empty((t, nbc), np.float32),  # xzb
        np.empty((t, nbc), np.float32),  # xs
    )
    scores = np.empty((t * NH, pos0 + t), np.float32)
    embed_rows(model.embed, ids, x)
    if cfg.emb_mult != 1:
        scale_cap(x, cfg.emb_mult, np.float32(0.0))
    if cfg.learned_pos:  # learned positions (gpt2)
        wpe = numba.carray(as_voidptr(model.positions_addr), (cfg.ctx, H), np.float32)
        for i in range(t):
            for j in range(H):
                x[i, j] += wpe[pos0 + i, j]
    for l in range(cfg.layers):
        layer = layers[l]
        # attention block
        if layer.attn_norm_w != 0:
            _norm(cfg, x, layer.attn_norm_w, layer.attn_norm_b, xn)
        else:  # post-norm layers (OLMo 2): the linears read the residual stream itself
            copy_rows(x, xn)
        _linear(layer.qkv, xn, qkv, act, tier, few)
        _qk_norm(layer, qkv, NH, NKV, HD, cfg.eps)
        if layer.rope != 0:  # ROPE_NONE: a NoPE layer (SmolLM3)
            tab = 1 if layer.rope == ROPE_LOCAL else 0
            rope(qkv, 0, NH + NKV, HD, pos0, cos[tab], sin[tab], cfg.rope_dims)  # q and k heads: adjacent
        ring = layer.ring  # > 0: a sliding layer's ring buffer, position p in row p % ring
        kl, vl = (kr[layer.kv], vr[layer.kv]) if ring > 0 else (kc[layer.kv], vc[layer.kv])  # (NKV, nblk, HD, bs)
        bs = kl.shape[3]  # positions per block of the cache (kvcache.blocked)
        for i in range(t):
            row = (pos0 + i) % ring if ring > 0 else pos0 + i
            for h in range(NKV):
                for j in range(HD):
                    kl[h, row // bs, j, row % bs] = kv_cast(qkv[i, (NH + h) * HD + j], kl)
                    vl[h, row // bs, j, row % bs] = kv_cast(qkv[i, (NH + NKV + h) * HD + j], vl)
        sc, cap = cfg.attn_scale, cfg.attn_cap
        if few:  # decode, and a verify pass of drafted tokens: the decode kernel's sums (speculate.py)
            attention(qkv, kl, vl, pos0, NH, NKV, HD, att, scores, layer.window, sc, cap, ring)
        else:
            attention_mat(qkv, kl, vl, pos0, NH, NKV, HD, att, scores, layer.window, sc, cap, ring)
        _linear(layer.o, att, res, act, tier, few)
        _residual(cfg, x, res, layer.attn_out_norm_w, xn)
        # MLP block
        _mlp_in(cfg, layer, x, xn)
        _linear(layer.up, xn, up, act, tier, few)
        _activate(cfg, up, mid)
        _linear(layer.down, mid, res, act, tier, few)
        _residual(cfg, x, res, layer.mlp_out_norm_w, xn)
    if all_logits:
        _norm(cfg, x, model.final_norm_w, model.final_norm_b, xn)
        _linear(model.head, xn, logits, act, tier, few)
    else:
        _norm(cfg, x[t - 1 :], model.final_norm_w, model.final_norm_b, xn[:1])
        _linear(model.head, xn[:1], logits, act, tier, True)  # one row: as every call's last token
    if cfg.logit_mult != 1 or cfg.final_cap > 0:  # Granite's logits_scaling, Gemma's final soft-cap
        scale_cap(logits, cfg.logit_mult, cfg.final_cap)


# ----------------------------------------------------------------------------- the model
def rope_sets(cfg: ModelConfig, n_ctx: int) -> tuple[list, int]:
    """[(cos, sin)], each (2, n_ctx, rope_dims/2): the global table, then the local one (Gemma 3's
    sliding layers; a copy of the global one when the family has none); (2, 1, 1) zeros for
    learned positions. LongRoPE has a second set (its long factors) and a switch: a forward call
    whose positions reach past `switch` uses it (rope.py); 0: one set."""
    if cfg.position != "rope":
        return [(np.zeros((2, 1, 1), np.float32), np.zeros((2, 1, 1), np.float32))], 0
    f = cfg.features
    lr = longrope_of(cfg.rope_scaling, f.rope_dims, cfg.max_position_embeddings)
    if lr is not None:
        invs = [lr.inv_freq(cfg.rope_theta, f.rope_dims, long) for long in (False, True)]
        scale, switch = lr.attention_factor, lr.original_max
    else:
        try:
            invs = [rope_inv_freq(f.rope_dims, cfg.rope_theta, cfg.rope_scaling)]
        except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
            raise UnsupportedError(
                f"rope scaling {cfg.rope_scaling} is not supported by the numba runtime ({exc}){ORT_HINT}"
            ) from None
        scale, switch = 1.0, 0
    if not all(np.isfinite(inv).all() for inv in invs):
        raise UnsupportedError(f"rope scaling {cfg.rope_scaling} gives non-finite frequencies{ORT_HINT}")
    local = rope_tables(n_ctx, rope_inv_freq(f.rope_dims, f.rope_local_theta, None)) if f.rope_local_theta else None
    sets = []
    for inv in invs:
        cg, sg = rope_tables(n_ctx, inv)
        if scale != 1.0:  # LongRoPE's attention_factor scales cos and sin (transformers: after the cast)
            cg, sg = cg * np.float32(scale), sg * np.float32(scale)
        cl, sl = local if local is not None else (cg, sg)
        sets.append((np.stack([cg, cl]), np.stack([sg, sl])))
    return sets, switch


# Tokens per compiled call on the prompt path. The step's scratch (scores alone: chunk x heads x
# context floats) grows with it; 512 tokens at once peaked 20 MB higher than chunks of 128 for the
# same prompt speed (SmolLM2 4-bit, pp512).
PROMPT_CHUNK = 128


class NumbaModel:
    """Load once, run many: `forward(ids)` appends tokens to the cache and returns logits."""

    backend = "numba"  # implements backend.Backend

    def __init__(
        self,
        path,
        n_ctx: int | None = None,
        threads: int | None = None,
        simd: bool = True,
        kv_cache: str = "auto",
        kernels: str = "auto",
        verify: bool = False,
        compile_in_child: bool = True,
    ):
        """kernels: the kernel tier ("auto": the best the CPU numba compiles for has; or one of
        kernels/tiers.py NAMES, to force a lower one); simd=False is kernels="generic".
        verify: check every file against the sha256 recorded at export first (slower start).
        compile_in_child: when numba's cache lacks the compiled step, compile it in a child
        process first (runtime/warmup.py; the serving process then stays as small as a warm one)."""
        if kv_cache not in KV_CACHE_TYPES:
            raise EdgeLLMError(f"--kv-cache {kv_cache!r} is invalid; give one of {', '.join(KV_CACHE_TYPES)}")
        # auto: fp16 beside quantized weights (the int8 activations already round more than fp16
        # keys and values do; half the cache's memory and attention reads), fp32 beside float
        # weights (whose contract is ONNX Runtime's logits within 1e-3)
        fp16 = lambda q: kv_cache == "fp16" or (kv_cache == "auto" and q is not None)  # noqa: E731
        plan = plan_export(
            path,
            who="the numba runtime",
            n_ctx=n_ctx,
            kv_itemsize=lambda q: 2 if fp16(q) else 4,
            verify=verify,
            supports=check_numba_support,
            hint=ORT_HINT,
        )
        self.export, self.config, self.n_ctx = plan.export, plan.config, plan.n_ctx
        cfg = self.config  # every shape below comes from validated metadata
        self.weights = w = Weights(plan)
        self.simd = simd
        self.rope_sets, self.rope_switch = rope_sets(cfg, self.n_ctx)
        self.run_config = run_config(cfg, self.n_ctx, w.act_cap, w.block_cap)
        self.kv_cache = "fp16" if fp16(plan.quant) else "fp32"
        self.chunk = PROMPT_CHUNK  # tokens per compiled call: the rings hold window + chunk - 1 rows
        self.state = st = RunState(cfg, self.n_ctx, self.kv_cache == "fp16", self.chunk)
        rows = w.layers.view(np.recarray)
        for i, (kv, ring) in enumerate(st.layer_kv):
            rows[i].kv, rows[i].ring = kv, ring
        # a first start seeds numba's cache from the package's cache pack (runtime/cachepack.py),
        # else compiles the step in a child process (runtime/warmup.py): LLVM's memory leaves
        # with it, and this process loads the step from numba's cache
        self.seeded, self.compiled_in_child = self._prepare_step(
            tiers.resolve(kernels if simd else "generic"), compile_in_child
        )
        # the kernel tier (kernels/tiers.py); a tier failing its load-time self-check falls back
        # one tier, with the one-line `kernel_warning` (also issued as a warning)
        self.tier, self.kernel_warning = checked_tier(kernels if simd else "generic")
        if self.kernel_warning:
            warnings.warn(self.kernel_warning, RuntimeWarning, stacklevel=2)
        self.set_threads(threads)

    def _step_args(self, ids, logits, all_logits, tier, long_rope: bool = False, prompt: bool = False):
        """The arguments of the compiled step `forward` for `ids` at the current position
        (`long_rope`: LongRoPE's long set of rotary tables)."""
        w, st = self.weights, self.state
        cos, sin = self.rope_sets[1 if long_rope else 0]
        return (
            ids,
            st.pos,
            self.run_config,
            w.model,
            w.layers,
            cos,
            sin,
            st.k,
            st.v,
            st.kr,
            st.vr,
            logits,
            all_logits,
            prompt,
            tier,
        )

    def _prepare_step(self, tier, in_child: bool) -> tuple[int, bool]:
        """Get the step for `tier` into numba's cache where it is not there: from the package's
        cache pack, else (in_child) compiled in a child process. (Entries the pack added, whether a
        child compiled the step.)"""
        from . import warmup

        args = self._step_args(np.zeros(1, np.int64), np.empty((1, self.config.vocab_size), np.float32), False, tier)
        state, added = warmup.cache_state(forward, args)
        return added, in_child and state == "missing" and warmup.compile_in_child(tier, self.kv_cache == "fp16")

    def set_threads(self, threads: int | None):
        if threads is not None and threads < 1:
            raise EdgeLLMError(f"--threads {threads} is invalid; give at least 1")
        self.threads = min(threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(self.threads)

    @property
    def kernels(self) -> str:
        """The kernel tier that runs, for `info`, `run --verbose` and bench rows."""
        return describe_tier(self.tier)

    @property
    def weight_pages(self) -> str:
        """Where the streamed weights live, for `run --verbose`: huge pages (hugepages.py) or the file map."""
        a = self.weights.arena
        if a is None:
            return "file map"
        return f"{HUGE >> 20} MiB pages ({a.huge_bytes() / 2**20:.0f} of {a.size / 2**20:.0f} MiB)"

    @property
    def pos(self) -> int:
        return self.state.pos

    def reset(self):
        self.state.pos = 0

    def truncate(self, n: int):
        """Forget cached positions >= n (the cache beyond is overwritten by later tokens); all of
        them when a sliding layer's ring no longer holds the window before n (read `pos` after)."""
        n = min(self.state.pos, n)
        self.state.pos = n if self.state.keeps(n) else 0

    def forward(self, ids, all_logits: bool = False, prompt: bool = False) -> np.ndarray:
        """Append `ids` at the current position; logits (len(ids), V) or (V,) of the last token.
        `prompt`: the ids are (the rest of) a prompt: the prompt tiles read them however few they
        are, so a prompt's logits and cache do not depend on how it was split."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        t = ids.size
        if t == 0:
            raise EdgeLLMError("no tokens to run")
        if self.state.pos + t > self.n_ctx:
            raise EdgeLLMError(f"{self.state.pos + t} tokens exceed the context of {self.n_ctx}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise EdgeLLMError(f"token id out of range [0, {self.config.vocab_size})")
        numba.set_num_threads(self.threads)
        logits = np.empty((t if all_logits else 1, self.config.vocab_size), np.float32)
        # LongRoPE: the whole call (every chunk) takes the long tables when it reaches past the
        # switch, as transformers decides per forward call (rope.py)
        long_rope = 0 < self.rope_switch < self.state.pos + t
        for c0 in range(0, t, self.chunk):  # long prompts in chunks: the step's scratch is O(chunk x context)
            c1 = min(t, c0 + self.chunk)
            out = logits[c0:c1] if all_logits else logits  # a non-final chunk's last-token logits are overwritten
            forward(*self._step_args(ids[c0:c1], out, all_logits, self.tier, long_rope, prompt))
            self.state.pos += c1 - c0
        return logits if all_logits else logits[0]

    def warmup(self):
        """Compile (or load from the cache) both paths, then forget the tokens."""
        pos = self.state.pos
        self.forward(np.zeros(2, np.int64))
        self.forward(np.zeros(1, np.int64))
        self.state.pos = pos

    def close(self):
        self.export.close()


# numba's cache of this module's kernels keys on all their sources, not only this file (jitcache.py)
stamp(globals())

"""The Numba model: config, weights and run state kept apart (llama2.c style), and `forward`.

`forward` is the hot loop: one compiled call runs every layer for t new tokens (t = 1 while
decoding, the whole prompt while prefilling) against a preallocated KV cache; inside it, each
matrix product is one `prange` region and nothing returns to Python between operations.
"""

from __future__ import annotations

import mmap
import warnings

import numba
import numpy as np
from numba import njit

from edgellm.errors import EdgeLLMError, UnsupportedError

from .kernels.layers import (
    attention,
    attention_mat,
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
from .kernels.quant import (
    D_B,
    D_GS,
    D_K,
    D_KIND,
    D_N,
    D_NB,
    D_RB,
    D_S,
    D_SYM,
    D_W,
    D_Z,
    D_ZERO,
    DESC_LEN,
    K_F16,
    K_F32,
    act_caps,
    checked_tier,
    linear_mat,
    linear_vec,
)
from .kernels.simd import as_voidptr as _voidptr
from .kernels.tiers import describe as _describe_tier
from .loader import Export, open_export
from .packing import zero_points
from .validate import ModelConfig, check_export, check_memory

# ----------------------------------------------------------------------------- config
# ModelConfig and the format checks live in validate.py (both backends); below, what only the
# numba kernels cannot run (--backend onnxruntime still can).
NUMBA_MLPS = {
    ("gated", "silu"),
    ("plain", "gelu_new"),
    ("plain", "gelu_pytorch_tanh"),
}  # gelu_pytorch_tanh = gelu_new's formula


def check_numba_support(cfg: ModelConfig, ex: Export) -> None:
    fmt = (ex.quantization or {}).get("format", "matmulnbits")
    if fmt != "matmulnbits":
        raise UnsupportedError(
            f"'{ex.path}' stores its quantized weights as '{fmt}' (DequantizeLinear); the numba runtime reads "
            "the MatMulNBits layout (export with --format matmulnbits); --backend onnxruntime may still run it"
        )
    if (cfg.mlp, cfg.activation) not in NUMBA_MLPS:
        raise UnsupportedError(
            f"a {cfg.mlp} MLP with activation '{cfg.activation}' is not supported by the numba runtime (supported: "
            f"{', '.join(f'{m}/{a}' for m, a in sorted(NUMBA_MLPS))}); --backend onnxruntime may still run it"
        )


# integer config passed to the compiled step
C_H, C_I, C_L, C_NH, C_NKV, C_HD, C_V, C_CTX, C_NORM, C_POS, C_ACT, C_GATED, C_CAP, C_NBCAP, C_WPE, C_LEN = range(16)
R_QKV, R_O, R_UP, R_DOWN = range(4)  # linear roles per layer
N_LN1W, N_LN1B, N_LN2W, N_LN2B = range(4)


def linear_inputs(cfg: ModelConfig) -> dict[int, int]:
    """Input width of each linear role of a layer (the CPU and CUDA loaders check exports against it)."""
    return {
        R_QKV: cfg.hidden_size,
        R_O: cfg.num_heads * cfg.head_dim,
        R_UP: cfg.hidden_size,
        R_DOWN: cfg.intermediate_size,
    }


def _names(cfg: ModelConfig, i: int) -> dict:
    if cfg.architecture == "gpt2":
        p = f"transformer.h.{i}"
        return {
            R_QKV: f"{p}.attn.c_attn",
            R_O: f"{p}.attn.c_proj",
            R_UP: f"{p}.mlp.c_fc",
            R_DOWN: f"{p}.mlp.c_proj",
            "ln1": f"{p}.ln_1",
            "ln2": f"{p}.ln_2",
        }
    p = f"model.layers.{i}"
    return {
        R_QKV: f"{p}.self_attn.qkv_proj",
        R_O: f"{p}.self_attn.o_proj",
        R_UP: f"{p}.mlp.gate_up_proj",
        R_DOWN: f"{p}.mlp.down_proj",
        "ln1": f"{p}.input_layernorm",
        "ln2": f"{p}.post_attention_layernorm",
    }


# ----------------------------------------------------------------------------- weights
class Weights:
    """Descriptors (kernels/quant.py) of every tensor, pointing into the memory-mapped file.

    Copies made at load, all small: fp16 scales padded for 16-lane loads (the file stores them as
    float32) and, for asymmetric formats, zero*scale as float32."""

    def __init__(self, ex: Export, cfg: ModelConfig):
        self._keep = []  # every array whose address a descriptor holds
        q = ex.quantization or {}
        self.bits = int(q.get("bits") or 0)
        self.tensor_bits = q.get("tensor_bits") or {}  # per packed tensor (8-bit embeddings, mixed plans)
        L = cfg.num_layers
        self.lin = np.zeros((L, 4, DESC_LEN), np.int64)
        self.norms = np.zeros((L, 4), np.int64)
        for i in range(L):
            n = _names(cfg, i)
            ins = linear_inputs(cfg)
            for role in (R_QKV, R_O, R_UP, R_DOWN):
                self.lin[i, role] = self._linear(ex, n[role], ins[role])
            for slot, key in ((N_LN1W, "ln1"), (N_LN2W, "ln2")):
                self.norms[i, slot] = self._addr(ex.get(f"{n[key]}.weight"), np.float32)
                if cfg.norm == "layer":
                    self.norms[i, slot + 1] = self._addr(ex.get(f"{n[key]}.bias"), np.float32)
        gpt2 = cfg.architecture == "gpt2"
        emb_name = "transformer.wte" if gpt2 else "model.embed_tokens"
        self.emb = self._linear(ex, emb_name, cfg.hidden_size)
        if ex.has("lm_head.qweight") or ex.has("lm_head.weight"):
            self.head = self._linear(ex, "lm_head", cfg.hidden_size)
        else:
            self.head = self.emb.copy()  # tied (one copy of the table in the file)
        fn = "transformer.ln_f" if gpt2 else "model.norm"
        self.fnorm = np.array(
            [
                self._addr(ex.get(f"{fn}.weight"), np.float32),
                self._addr(ex.get(f"{fn}.bias"), np.float32) if cfg.norm == "layer" else 0,
            ],
            np.int64,
        )
        self.wpe = self._addr(ex.get("transformer.wpe.weight"), np.float32) if cfg.position == "learned" else 0
        caps = [act_caps(d) for d in self.lin.reshape(-1, DESC_LEN)] + [act_caps(self.head)]
        self.cap = max(c for c, _ in caps)
        self.nbcap = max(b for _, b in caps)
        self.bytes_per_token = int(sum(self._bytes(d) for d in self.lin.reshape(-1, DESC_LEN)) + self._bytes(self.head))

    def _addr(self, arr: np.ndarray, dtype) -> int:
        if arr.dtype != dtype:
            arr = arr.astype(dtype)
        arr = np.ascontiguousarray(arr)
        self._keep.append(arr)
        return arr.ctypes.data

    @staticmethod
    def _bytes(d) -> int:
        if d[D_KIND] in (K_F32, K_F16):
            return int(d[D_RB] * d[D_N])
        return int(d[D_RB] * d[D_N] + d[D_NB] * d[D_N] * 2)

    def _linear(self, ex: Export, p: str, k: int) -> np.ndarray:
        d = np.zeros(DESC_LEN, np.int64)
        if ex.has(f"{p}.qweight"):
            qw = ex.get(f"{p}.qweight")
            bits = int(self.tensor_bits.get(p, self.bits))
            if bits not in (4, 8) or qw.dtype != np.uint8 or qw.ndim != 3:
                raise UnsupportedError(
                    f"'{p}.qweight' ({qw.dtype}, shape {qw.shape}, {bits}-bit) is not a MatMulNBits layout "
                    "the numba runtime reads (4 or 8 bits); --backend onnxruntime may still run it"
                )
            n, nb, bb = qw.shape
            gs = bb * 8 // bits
            if gs < 16 or gs & (gs - 1):
                raise UnsupportedError(
                    f"'{p}' has blocks of {gs} columns; the numba runtime needs a power of two >= 16; "
                    "--backend onnxruntime may still run it"
                )
            scales = ex.get(f"{p}.scales").reshape(-1)
            if scales.size != n * nb:
                raise EdgeLLMError(f"'{p}.scales' has {scales.size} values, expected {n * nb}")
            s16 = np.zeros(n * nb + 16, np.float16)
            s16[: n * nb] = scales
            if not nb * gs - gs < k <= nb * gs:
                raise EdgeLLMError(f"'{p}.qweight' packs {nb * gs} columns but the layer has {k} inputs")
            d[D_KIND], d[D_N], d[D_K], d[D_W] = bits, n, k, self._addr(qw, np.uint8)
            d[D_S] = self._addr(s16.view(np.uint16), np.uint16)
            d[D_GS], d[D_NB], d[D_RB], d[D_ZERO] = gs, nb, nb * bb, 1 << (bits - 1)
            d[D_SYM] = 1
            if ex.has(f"{p}.qzeros"):
                zp = ex.get(f"{p}.qzeros")
                zs = zero_points(zp, n, nb, bits) * scales.reshape(n, nb).astype(np.float32)
                d[D_Z], d[D_SYM] = self._addr(zs, np.float32), 0
                ex.drop_pages(zp)
            ex.drop_pages(scales)  # the kernels read the fp16 copy
        elif ex.has(f"{p}.weight"):
            w = ex.get(f"{p}.weight")
            if w.ndim != 2 or w.dtype not in (np.float32, np.float16) or w.shape[1] != k:
                raise UnsupportedError(
                    f"'{p}.weight' ({w.dtype}, shape {w.shape}) is not a float matrix the numba runtime reads"
                )
            d[D_KIND] = K_F32 if w.dtype == np.float32 else K_F16
            d[D_N], d[D_K], d[D_RB] = w.shape[0], w.shape[1], w.shape[1] * w.itemsize
            d[D_W] = self._addr(w, w.dtype)
        else:
            ex.get(f"{p}.weight")  # raises the "no initializer" error
        if ex.has(f"{p}.bias"):
            d[D_B] = self._addr(ex.get(f"{p}.bias"), np.float32)
        return d


# ----------------------------------------------------------------------------- run state
def lazy_zeros(shape, dtype) -> np.ndarray:
    """Zeros in an anonymous mapping whose pages become resident only when written, in 4 KiB
    pages: numpy asks for transparent huge pages on big arrays, and then writing position 0 of
    each (layer, head) slab of the KV cache made the whole cache resident (+42 MB at 8 tokens)."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: calloc'd zeros, whose pages the OS also commits on first write
        return np.zeros(shape, dtype)
    size = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype, count=int(np.prod(shape))).reshape(shape)


KV_CACHE_TYPES = ("auto", "fp16", "fp32")


class RunState:
    """The KV cache, preallocated for n_ctx positions (zeros: pages are touched only when used).
    fp16 is held as uint16 bits (kernels/layers.py kv_get / kv_cast)."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, fp16: bool):
        shape = (cfg.num_layers, cfg.num_kv_heads, n_ctx, cfg.head_dim)  # (L, n_kv, ctx, hd)
        dtype = np.uint16 if fp16 else np.float32
        self.k = lazy_zeros(shape, dtype)
        self.v = lazy_zeros(shape, dtype)
        self.pos = 0


# ----------------------------------------------------------------------------- the hot loop
@njit(cache=True)
def _linear(d, x, out, xa, xb, init, xsl, xzb, xs, tier):
    if x.shape[0] == 1:
        linear_vec(d, x[0], out[0], xa[0], xb[0], init[0], xsl[0], xzb[0], xs[0], tier)
    else:
        linear_mat(d, x, out, xa, xb, init, xsl, xzb, xs, tier)


@njit(cache=True)
def _norm(ci, x, w, b, eps, out):
    if ci[C_NORM] == 0:
        rms_norm(x, w, eps, out)
    else:
        layer_norm(x, w, b, eps, out)


@njit(cache=True)
def forward(ids, pos0, ci, eps, lin, norms, emb, head, fnorm, window, cos, sin, kc, vc, logits, all_logits, tier):
    """Run t = len(ids) tokens at positions pos0.. through every layer; write logits (t or 1, V).
    `tier`: the kernel tier id of the quantized linears (kernels/tiers.py)."""
    t = ids.shape[0]
    H, NH, NKV, HD, L = ci[C_H], ci[C_NH], ci[C_NKV], ci[C_HD], ci[C_L]
    cap, nbc = ci[C_CAP], ci[C_NBCAP]
    x = np.empty((t, H), np.float32)  # residual stream (t, H)
    xn = np.empty((t, H), np.float32)
    qkv = np.empty((t, (NH + 2 * NKV) * HD), np.float32)  # (t, q|k|v)
    att = np.empty((t, NH * HD), np.float32)
    res = np.empty((t, H), np.float32)
    up = np.empty((t, lin[0, R_UP, D_N]), np.float32)
    mid = np.empty((t, ci[C_I]), np.float32)
    xa = np.empty((t, cap), np.int8)  # int8 activations and their scales (kernels/quant.py)
    xb = np.empty((t, cap), np.int8)
    init = np.empty((t, cap // 4), np.int32)
    xsl = np.empty((t, cap // 4), np.float32)
    xzb = np.empty((t, nbc), np.float32)
    xs = np.empty((t, nbc), np.float32)
    scores = np.empty((t * NH, pos0 + t), np.float32)
    embed_rows(emb, ids, x)
    if ci[C_POS] == 1:  # learned positions (gpt2)
        wpe = numba.carray(_voidptr(ci[C_WPE]), (ci[C_CTX], H), np.float32)
        for i in range(t):
            x[i] += wpe[pos0 + i]
    for l in range(L):
        # attention block
        _norm(ci, x, norms[l, N_LN1W], norms[l, N_LN1B], eps, xn)
        _linear(lin[l, R_QKV], xn, qkv, xa, xb, init, xsl, xzb, xs, tier)
        if ci[C_POS] == 0:
            rope(qkv, 0, NH, HD, pos0, cos, sin)
            rope(qkv, NH * HD, NKV, HD, pos0, cos, sin)
        for i in range(t):
            for h in range(NKV):
                for j in range(HD):
                    kc[l, h, pos0 + i, j] = kv_cast(qkv[i, (NH + h) * HD + j], kc)
                    vc[l, h, pos0 + i, j] = kv_cast(qkv[i, (NH + NKV + h) * HD + j], vc)
        if t == 1:
            attention(qkv, kc[l], vc[l], pos0, NH, NKV, HD, att, scores, window[l])
        else:
            attention_mat(qkv, kc[l], vc[l], pos0, NH, NKV, HD, att, scores, window[l])
        _linear(lin[l, R_O], att, res, xa, xb, init, xsl, xzb, xs, tier)
        x += res
        # MLP block
        _norm(ci, x, norms[l, N_LN2W], norms[l, N_LN2B], eps, xn)
        _linear(lin[l, R_UP], xn, up, xa, xb, init, xsl, xzb, xs, tier)
        if ci[C_GATED] == 1:
            swiglu(up, ci[C_I], mid)
        else:
            gelu_new(up, mid)
        _linear(lin[l, R_DOWN], mid, res, xa, xb, init, xsl, xzb, xs, tier)
        x += res
    if all_logits:
        _norm(ci, x, fnorm[0], fnorm[1], eps, xn)
        _linear(head, xn, logits, xa, xb, init, xsl, xzb, xs, tier)
    else:
        _norm(ci, x[t - 1 :], fnorm[0], fnorm[1], eps, xn[:1])
        _linear(head, xn[:1], logits, xa, xb, init, xsl, xzb, xs, tier)


# ----------------------------------------------------------------------------- the model
# Tokens per compiled call on the prompt path. The step's scratch (scores alone: chunk x heads x
# context floats) grows with it; 512 tokens at once peaked 20 MB higher than chunks of 128 for the
# same prompt speed (SmolLM2 4-bit, pp512).
PROMPT_CHUNK = 128


class NumbaModel:
    """Load once, run many: `forward(ids)` appends tokens to the cache and returns logits."""

    backend = "numba"

    def __init__(
        self,
        path,
        n_ctx: int | None = None,
        threads: int | None = None,
        simd: bool = True,
        kv_cache: str = "auto",
        kernels: str = "auto",
        verify: bool = False,
    ):
        """kernels: the kernel tier ("auto": the best the CPU numba compiles for has; or one of
        kernels/tiers.py NAMES, to force a lower one); simd=False is kernels="generic".
        verify: check every file against the sha256 recorded at export first (slower start)."""
        if kv_cache not in KV_CACHE_TYPES:
            raise EdgeLLMError(f"--kv-cache {kv_cache!r} is invalid; give one of {', '.join(KV_CACHE_TYPES)}")
        self.export = open_export(path, verify=verify)
        self.config = cfg = check_export(self.export)  # every shape below comes from validated metadata
        check_numba_support(cfg, self.export)
        self.n_ctx = min(n_ctx or cfg.max_position_embeddings, cfg.max_position_embeddings)
        fp16 = kv_cache == "fp16" or (kv_cache == "auto" and bool((self.export.quantization or {}).get("bits")))
        check_memory(
            cfg, self.n_ctx, 2 if fp16 else 4, f"'{path}' on the numba runtime"
        )  # before anything is sized by n_ctx
        self.weights = w = Weights(self.export, cfg)
        self.simd = simd
        # the kernel tier (kernels/tiers.py); a tier failing its load-time self-check falls back
        # one tier, with the one-line `kernel_warning` (also issued as a warning)
        self.tier, self.kernel_warning = checked_tier(kernels if simd else "generic")
        if self.kernel_warning:
            warnings.warn(self.kernel_warning, RuntimeWarning, stacklevel=2)
        self.set_threads(threads)
        if cfg.position == "rope":
            try:
                inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
                raise UnsupportedError(
                    f"rope scaling {cfg.rope_scaling} is not supported by the numba runtime ({exc}); "
                    "--backend onnxruntime may still run it"
                ) from None
            if not np.isfinite(inv).all():
                raise UnsupportedError(
                    f"rope scaling {cfg.rope_scaling} gives non-finite frequencies; --backend onnxruntime may still "
                    "run it"
                )
            self.cos, self.sin = rope_tables(self.n_ctx, inv)
        else:
            self.cos = self.sin = np.zeros((1, 1), np.float32)
        self.ci = np.zeros(C_LEN, np.int64)
        self.ci[[C_H, C_I, C_L, C_NH, C_NKV, C_HD, C_V, C_CTX]] = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_layers,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.vocab_size,
            self.n_ctx,
        )
        self.ci[C_NORM] = 0 if cfg.norm == "rms" else 1
        self.ci[C_POS] = 0 if cfg.position == "rope" else 1
        self.ci[C_GATED] = 1 if cfg.mlp == "gated" else 0
        self.ci[C_CAP], self.ci[C_NBCAP], self.ci[C_WPE] = w.cap, w.nbcap, w.wpe
        self.window = np.array(cfg.sliding_window, np.int64)
        # auto: fp16 beside quantized weights (the int8 activations already round more than fp16
        # keys and values do; half the cache's memory and attention reads), fp32 beside float
        # weights (whose contract is ONNX Runtime's logits within 1e-3)
        self.kv_cache = ("fp16" if w.bits else "fp32") if kv_cache == "auto" else kv_cache
        self.state = RunState(cfg, self.n_ctx, self.kv_cache == "fp16")

    def set_threads(self, threads: int | None):
        if threads is not None and threads < 1:
            raise EdgeLLMError(f"--threads {threads} is invalid; give at least 1")
        self.threads = min(threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(self.threads)

    @property
    def kernels(self) -> str:
        """The kernel tier that runs, for `info`, `run --verbose` and bench rows."""
        return _describe_tier(self.tier)

    @property
    def pos(self) -> int:
        return self.state.pos

    def reset(self):
        self.state.pos = 0

    def truncate(self, n: int):
        """Forget cached positions >= n (the cache beyond is overwritten by later tokens)."""
        self.state.pos = min(self.state.pos, n)

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Append `ids` at the current position; logits (len(ids), V) or (V,) of the last token."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        t = ids.size
        if t == 0:
            raise EdgeLLMError("no tokens to run")
        if self.state.pos + t > self.n_ctx:
            raise EdgeLLMError(f"{self.state.pos + t} tokens exceed the context of {self.n_ctx}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise EdgeLLMError(f"token id out of range [0, {self.config.vocab_size})")
        numba.set_num_threads(self.threads)
        w = self.weights
        logits = np.empty((t if all_logits else 1, self.config.vocab_size), np.float32)
        for c0 in range(0, t, PROMPT_CHUNK):  # long prompts in chunks: the step's scratch is O(chunk x context)
            c1 = min(t, c0 + PROMPT_CHUNK)
            out = logits[c0:c1] if all_logits else logits  # a non-final chunk's last-token logits are overwritten
            forward(
                ids[c0:c1],
                self.state.pos,
                self.ci,
                np.float32(self.config.norm_eps),
                w.lin,
                w.norms,
                w.emb,
                w.head,
                w.fnorm,
                self.window,
                self.cos,
                self.sin,
                self.state.k,
                self.state.v,
                out,
                all_logits,
                self.tier.id,
            )
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

"""The CUDA model: the export's weights uploaded once, a preallocated fp16 KV cache, `forward`.

Same interface as the CPU runtime's NumbaModel (`forward(ids, all_logits)`, `reset`,
`truncate`, `pos`, `n_ctx`, `warmup`), so `Generator` (sampling, streaming, chat) drives both.

Upload: every tensor goes from its memory-mapped view in `model.onnx.data` (runtime/loader.py,
the CPU runtime's reader) straight into a device staging buffer, and a device kernel writes it
into the transposed layout of kernels.py (fp32 scales and float weights become fp16 there): the
host makes no copy of the weights, only of the small tensors (biases, norms, zero*scale).

Decode (one token): kernels.decode_coop, one cooperative launch per token; if the GPU or driver
refuses a cooperative launch, the same phases run as one launch each (`decode_mode` says which).
Prompt (several tokens): chunks of PROMPT_CHUNK tokens, per layer a norm, a tiled GEMM per
linear, RoPE/KV, attention and the activation as separate launches (9 per layer).
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgeLLMError, UnsupportedError
from ..format.blocks import zero_points
from ..kernels.layers import rope_inv_freq, rope_tables
from ..loader import open_export
from ..model import ModelConfig, _names, linear_inputs
from . import device as dev
from .kernels import (
    C_FNB,
    C_FNW,
    C_GATED,
    C_H,
    C_HD,
    C_I,
    C_L,
    C_LAYER,
    C_LEN,
    C_NH,
    C_NKV,
    C_ROPE,
    C_V,
    C_WPE,
    D_B,
    D_GS,
    D_K,
    D_KIND,
    D_N,
    D_NB,
    D_S,
    D_W,
    D_WORDS,
    D_Z,
    D_ZERO,
    DESC_LEN,
    K_FLOAT,
    LAYER_PHASES,
    MAX_THREADS,
    N_LN1B,
    N_LN1W,
    N_LN2B,
    N_LN2W,
    OUT_ADD,
    OUT_SET,
    PH_ATTN,
    PH_DOWN,
    PH_EMBED,
    PH_HEAD,
    PH_O,
    PH_QKV,
    PH_ROPE,
    PH_UP,
    R_DOWN,
    R_O,
    R_QKV,
    R_UP,
    ROWS,
    act_kernel,
    attention_kernel,
    decode_coop,
    embed_kernel,
    gemm_grid,
    gemm_kernel,
    norm_rows_kernel,
    phase_kernel,
    rope_kv_kernel,
    transpose_into,
)

PROMPT_CHUNK = 128  # tokens per prompt pass: the scratch (scores: chunk x heads x ctx floats) grows with it
KV_CACHE_TYPES = ("auto", "fp16")
SIM_THREADS = 64  # threads per block under numba's CUDA simulator (tests); MAX_THREADS on a GPU


class _Plan:
    """Where every tensor goes: host views (into the memory map) and offsets in the device arrays."""

    def __init__(self):
        self.size = {"wq": 0, "fw": 0, "sc": 0, "zs": 0}
        self.pf: list[np.ndarray] = []  # small fp32 tensors, concatenated on the host
        self.pf_size = 0
        self.copies: list[tuple] = []  # (device array name, offset, host (n, m) array)

    def big(self, name: str, host: np.ndarray) -> int:
        off = self.size[name]
        self.copies.append((name, off, host))
        self.size[name] += host.size
        return off

    def small(self, arr) -> int:
        a = np.ascontiguousarray(arr, np.float32).reshape(-1)
        off = self.pf_size
        self.pf.append(a)
        self.pf_size += a.size
        return off


def _linear(ex, plan: _Plan, p: str, k: int, bits: int) -> np.ndarray:
    d = np.full(DESC_LEN, -1, np.int64)
    if ex.has(f"{p}.qweight"):
        qw = ex.get(f"{p}.qweight")
        if bits not in (4, 8) or qw.dtype != np.uint8 or qw.ndim != 3:
            raise UnsupportedError(
                f"'{p}.qweight' ({qw.dtype}, shape {qw.shape}, {bits}-bit) is not a MatMulNBits layout the CUDA path "
                "reads (4 or 8 bits)"
            )
        n, nb, bb = qw.shape
        gs = bb * 8 // bits
        if gs < 16 or gs & (gs - 1):
            raise UnsupportedError(f"'{p}' has blocks of {gs} columns; the CUDA path needs a power of two >= 16")
        if not nb * gs - gs < k <= nb * gs:
            raise EdgeLLMError(f"'{p}.qweight' packs {nb * gs} columns but the layer has {k} inputs")
        scales = ex.get(f"{p}.scales").reshape(-1)
        if scales.size != n * nb:
            raise EdgeLLMError(f"'{p}.scales' has {scales.size} values, expected {n * nb}")
        words = nb * bb // 4
        d[D_KIND], d[D_N], d[D_K], d[D_GS], d[D_NB], d[D_WORDS], d[D_ZERO] = bits, n, k, gs, nb, words, 1 << (bits - 1)
        d[D_W] = plan.big("wq", qw.reshape(n, nb * bb).view(np.uint32))
        d[D_S] = plan.big("sc", scales.reshape(n, nb))
        if ex.has(f"{p}.qzeros"):
            zs = zero_points(ex.get(f"{p}.qzeros"), n, nb, bits) * scales.reshape(n, nb).astype(np.float32)
            d[D_Z] = plan.big("zs", zs)
    elif ex.has(f"{p}.weight"):
        w = ex.get(f"{p}.weight")
        if w.ndim != 2 or w.dtype not in (np.float32, np.float16) or w.shape[1] != k:
            raise UnsupportedError(
                f"'{p}.weight' ({w.dtype}, shape {w.shape}) is not a float matrix the CUDA path reads"
            )
        d[D_KIND], d[D_N], d[D_K] = K_FLOAT, w.shape[0], k
        d[D_W] = plan.big("fw", w)
    else:
        ex.get(f"{p}.weight")  # raises the "no initializer" error
    if ex.has(f"{p}.bias"):
        d[D_B] = plan.small(ex.get(f"{p}.bias"))
    return d


class CudaModel:
    """Load once (weights to the GPU), run many: `forward(ids)` appends tokens to the cache."""

    backend = "numba-cuda"

    def __init__(
        self,
        path,
        n_ctx: int | None = None,
        threads: int | None = None,
        kv_cache: str = "auto",
        threads_per_block: int | None = None,
        fused: bool = True,
    ):
        if kv_cache not in KV_CACHE_TYPES:
            raise EdgeLLMError(
                f"--kv-cache {kv_cache!r} is not available with --device cuda; it keeps an fp16 cache (give auto or "
                "fp16)"
            )
        if threads_per_block is None:  # the simulator runs each CUDA thread as a Python thread: small blocks there
            threads_per_block = SIM_THREADS if dev.simulator() else MAX_THREADS
        if threads_per_block % ROWS or not ROWS <= threads_per_block <= MAX_THREADS:
            raise EdgeLLMError(
                f"threads_per_block {threads_per_block} must be a multiple of {ROWS} in [{ROWS}, {MAX_THREADS}]"
            )
        self.cuda = cuda = dev.open_gpu()
        self.threads, self.kv_cache, self.tpb = threads, "fp16", threads_per_block
        self.export = ex = open_export(path)
        self.config = cfg = ModelConfig.from_metadata(ex.config)
        lacks = cfg.features.non_llama(cfg.head_dim) + (["GeGLU"] if cfg.activation == "gelu_pytorch_tanh" else [])
        if lacks and cfg.architecture != "gpt2":  # runtime/features.py: Llama's layer only, for now
            raise UnsupportedError(
                f"the CUDA path does not implement {', '.join(lacks)} ({cfg.architecture}); "
                "run it on the CPU (numba) or with --backend onnxruntime"
            )
        if cfg.num_heads % cfg.num_kv_heads:
            raise UnsupportedError(f"num_heads {cfg.num_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}")
        if cfg.head_dim % 2 or cfg.head_dim > 2 * MAX_THREADS:
            raise UnsupportedError(
                f"head_dim {cfg.head_dim} is not supported by the CUDA path (even, at most {2 * MAX_THREADS})"
            )
        self.n_ctx = min(n_ctx or cfg.max_position_embeddings, cfg.max_position_embeddings)
        plan, desc, norms = self._plan(ex, cfg)
        self.chunk = min(PROMPT_CHUNK, self.n_ctx)
        L, H, NH, NKV, HD = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        up_n = int(desc[R_UP, D_N])
        wide = max(H, NH * HD, cfg.intermediate_size)
        scratch = {
            "x": ((self.chunk, H), np.float32),
            "qkv": ((self.chunk, (NH + 2 * NKV) * HD), np.float32),
            "hb": ((self.chunk, wide), np.float16),
            "up": ((self.chunk, up_n), np.float32),
            "scores": ((self.chunk * NH, self.n_ctx), np.float32),
            "logits": ((self.chunk, cfg.vocab_size), np.float32),
            "kc": ((L, NKV, self.n_ctx, HD), np.float16),
            "vc": ((L, NKV, self.n_ctx, HD), np.float16),
        }
        weight_bytes = (
            4 * plan.size["wq"] + 2 * plan.size["fw"] + 2 * plan.size["sc"] + 4 * plan.size["zs"] + 4 * plan.pf_size
        )
        staging = max([h.nbytes for _, _, h in plan.copies] or [0])
        state_bytes = sum(int(np.prod(s)) * np.dtype(t).itemsize for s, t in scratch.values())
        self.device_bytes = weight_bytes + state_bytes
        if not dev.simulator():
            free, total, name = dev.memory_info(cuda)
            dev.check_fits(
                self.device_bytes + staging, free, total, name, f"'{path}' with a {self.n_ctx}-token context"
            )
        self._upload(plan, staging)
        self.bytes_per_token = weight_bytes
        self.desc, self.norms = desc, norms  # host copies: launch sizes and offsets for the prompt path
        self.d_desc = cuda.to_device(desc)
        self.desc_rows = [self.d_desc[r] for r in range(desc.shape[0])]
        self.d_norms = cuda.to_device(norms)
        self.window = np.array(cfg.sliding_window, np.int64)
        self.d_window = cuda.to_device(self.window)
        if cfg.position == "rope":
            try:
                inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            except (ValueError, KeyError) as exc:
                raise UnsupportedError(f"rope scaling {cfg.rope_scaling} is not supported ({exc})") from None
            cos, sin = rope_tables(self.n_ctx, inv)
        else:
            cos = sin = np.zeros((1, 1), np.float32)
        self.d_cos, self.d_sin = cuda.to_device(cos), cuda.to_device(sin)
        self.ci = np.zeros(C_LEN, np.int64)
        self.ci[[C_H, C_I, C_L, C_NH, C_NKV, C_HD, C_V]] = (H, cfg.intermediate_size, L, NH, NKV, HD, cfg.vocab_size)
        self.ci[C_LAYER] = 1 if cfg.norm == "layer" else 0
        self.ci[C_ROPE] = 1 if cfg.position == "rope" else 0
        self.ci[C_GATED] = 1 if cfg.mlp == "gated" else 0
        self.ci[[C_WPE, C_FNW, C_FNB]] = self._extra
        self.d_ci = cuda.to_device(self.ci)
        self.buf = {k: cuda.device_array(s, t) for k, (s, t) in scratch.items()}
        self.eps = np.float32(cfg.norm_eps)
        self.pos = 0
        self.fused = fused
        self.decode_mode = "cooperative" if fused else "phases"
        self._coop_grid, self._coop_ran = None, False
        tiles = lambda n: (int(n) + ROWS - 1) // ROWS  # noqa: E731
        half = HD // 2
        self._phase_grid = {
            PH_EMBED: -(-H // self.tpb),
            PH_QKV: tiles(desc[R_QKV, D_N]),
            PH_ROPE: -(-((NH + NKV) * half + NKV * HD) // self.tpb),
            PH_ATTN: NH,
            PH_O: tiles(H),
            PH_UP: tiles(up_n),
            PH_DOWN: tiles(H),
            PH_HEAD: tiles(cfg.vocab_size),
        }
        ex.close()  # everything lives on the GPU now

    # ------------------------------------------------------------------ load
    def _plan(self, ex, cfg):
        q = ex.quantization or {}
        bits = int(q.get("bits") or 0)
        plan = _Plan()
        L = cfg.num_layers
        desc = np.full((L * 4 + 2, DESC_LEN), -1, np.int64)
        norms = np.full((L, 4), -1, np.int64)
        for i in range(L):
            n = _names(cfg, i)
            ins = linear_inputs(cfg)
            for role in (R_QKV, R_O, R_UP, R_DOWN):
                desc[i * 4 + role] = _linear(ex, plan, n[role], ins[role], bits)
            for slot, key in ((N_LN1W, "ln1"), (N_LN2W, "ln2")):
                norms[i, slot] = plan.small(ex.get(f"{n[key]}.weight"))
                if cfg.norm == "layer":
                    norms[i, slot + 1] = plan.small(ex.get(f"{n[key]}.bias"))
        gpt2 = cfg.architecture == "gpt2"
        desc[L * 4] = _linear(ex, plan, "transformer.wte" if gpt2 else "model.embed_tokens", cfg.hidden_size, bits)
        if ex.has("lm_head.qweight") or ex.has("lm_head.weight"):
            desc[L * 4 + 1] = _linear(ex, plan, "lm_head", cfg.hidden_size, bits)
        else:
            desc[L * 4 + 1] = desc[L * 4]  # tied: one copy on the GPU
        fn = "transformer.ln_f" if gpt2 else "model.norm"
        fnw = plan.small(ex.get(f"{fn}.weight"))
        fnb = plan.small(ex.get(f"{fn}.bias")) if cfg.norm == "layer" else -1
        wpe = -1
        if cfg.position == "learned":
            table = ex.get("transformer.wpe.weight")
            if table.shape[0] < self.n_ctx:
                raise EdgeLLMError(
                    f"'transformer.wpe.weight' has {table.shape[0]} positions; the context is {self.n_ctx}"
                )
            wpe = plan.small(table[: self.n_ctx])
        self._extra = (wpe, fnw, fnb)
        return plan, desc, norms

    def _upload(self, plan: _Plan, staging_bytes: int):
        cuda = self.cuda
        dtypes = {"wq": np.uint32, "fw": np.float16, "sc": np.float16, "zs": np.float32}
        self.w = {k: cuda.device_array(max(1, plan.size[k]), t) for k, t in dtypes.items()}
        self.w["pf"] = cuda.to_device(np.concatenate(plan.pf) if plan.pf else np.zeros(1, np.float32))
        stage = {}
        for name, off, host in plan.copies:
            dt = host.dtype
            if dt not in stage:
                stage[dt] = cuda.device_array(max(1, staging_bytes // dt.itemsize), dt)
            src = stage[dt][: host.size].reshape(host.shape)
            src.copy_to_device(np.ascontiguousarray(host))  # from the memory map (a view; no copy unless unaligned)
            blocks = min(1024, -(-host.size // self.tpb))
            transpose_into[blocks, self.tpb](src, self.w[name], off)
        cuda.synchronize()
        del stage

    # ------------------------------------------------------------------ run
    @property
    def _args(self):
        b, w = self.buf, self.w
        return (
            self.eps,
            self.d_ci,
            self.d_desc,
            self.d_norms,
            self.d_window,
            w["wq"],
            w["fw"],
            w["sc"],
            w["zs"],
            w["pf"],
            self.d_cos,
            self.d_sin,
            b["kc"],
            b["vc"],
            b["x"],
            b["qkv"],
            b["hb"],
            b["up"],
            b["scores"],
            b["logits"],
        )

    def reset(self):
        self.pos = 0

    def truncate(self, n: int):
        self.pos = min(self.pos, n)

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Append `ids` at the current position; logits (len(ids), V) or (V,) of the last token."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        t = ids.size
        if t == 0:
            raise EdgeLLMError("no tokens to run")
        if self.pos + t > self.n_ctx:
            raise EdgeLLMError(f"{self.pos + t} tokens exceed the context of {self.n_ctx}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise EdgeLLMError(f"token id out of range [0, {self.config.vocab_size})")
        if t == 1 and not all_logits:
            self._decode(int(ids[0]))
            self.pos += 1
            return self.buf["logits"][0].copy_to_host()
        out = np.empty((t, self.config.vocab_size), np.float32) if all_logits else None
        for c0 in range(0, t, self.chunk):
            c1 = min(t, c0 + self.chunk)
            self._prompt(ids[c0:c1], all_logits)
            if all_logits:
                out[c0:c1] = self.buf["logits"][: c1 - c0].copy_to_host()
            self.pos += c1 - c0
        return out if all_logits else self.buf["logits"][0].copy_to_host()

    def _decode(self, tok: int):
        args = (tok, self.pos) + self._args
        if self.fused:
            try:
                if self._coop_grid is None:
                    self._coop_grid = self._cooperative_blocks(args)
                decode_coop[self._coop_grid, self.tpb](*args)
                self._coop_ran = True
                return
            except Exception as exc:  # a refused cooperative launch (no support, grid not resident, no cudadevrt)
                if self._coop_ran:
                    raise
                first = (str(exc).strip().splitlines() or [""])[0][:160]
                self.fused, self.decode_mode = (
                    False,
                    f"phases (cooperative launch refused: {type(exc).__name__}: {first})",
                )
        self._phase(PH_EMBED, 0, 0, tok, self.pos)
        for l in range(self.config.num_layers):
            for ph in LAYER_PHASES:
                self._phase(ph, l, 0, tok, self.pos)
        self._phase(PH_HEAD, 0, 0, tok, self.pos)

    def _cooperative_blocks(self, args) -> int:
        """Blocks of decode_coop that can all be resident at once (what a grid barrier needs),
        capped at the most any phase can use."""
        most = max(self._phase_grid.values())
        if dev.simulator():
            return min(most, decode_coop.overloads[()].max_cooperative_grid_blocks(self.tpb))
        sig = tuple(decode_coop.typeof_pyval(a) for a in args)
        kernel = decode_coop.compile(sig)
        return max(1, min(most, kernel.max_cooperative_grid_blocks(self.tpb)))

    def _phase(self, ph, l, row, tok, pos):
        phase_kernel[self._phase_grid[ph], self.tpb](ph, l, row, tok, pos, *self._args)

    def _gemm(self, role_row: int, x, t: int, out, omode: int):
        d = self.desc_rows[role_row]
        w = self.w
        gemm_kernel[gemm_grid(int(self.desc[role_row, D_N]), t), self.tpb](
            d, w["wq"], w["fw"], w["sc"], w["zs"], w["pf"], x, t, out, omode
        )

    def _prompt(self, ids: np.ndarray, all_logits: bool):
        """t tokens at positions pos..: every layer, then the last row's (or every row's) logits."""
        cfg, b, w, tpb = self.config, self.buf, self.w, self.tpb
        t, pos, L = ids.size, self.pos, cfg.num_layers
        H, NH, NKV, HD, I = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        layer, rope, gated = int(self.ci[C_LAYER]), int(self.ci[C_ROPE]), int(self.ci[C_GATED])
        norms = self.norms
        spread = lambda n: max(1, min(1024, -(-n // tpb)))  # noqa: E731
        embed_kernel[spread(H), tpb](
            self.desc_rows[L * 4],
            w["wq"],
            w["fw"],
            w["sc"],
            w["zs"],
            w["pf"],
            self.cuda.to_device(ids),
            pos,
            H,
            int(self.ci[C_WPE]),
            b["x"],
        )
        for l in range(L):
            norm_rows_kernel[t, tpb](
                b["x"], t, H, layer, self.eps, w["pf"], norms[l, N_LN1W], norms[l, N_LN1B], b["hb"]
            )
            self._gemm(l * 4 + R_QKV, b["hb"], t, b["qkv"], OUT_SET)
            rope_kv_kernel[spread(t * ((NH + NKV) * HD // 2 + NKV * HD)), tpb](
                b["qkv"], t, pos, l, NH, NKV, HD, rope, self.d_cos, self.d_sin, b["kc"], b["vc"]
            )
            attention_kernel[t * NH, tpb](
                b["qkv"], b["kc"], b["vc"], l, pos, t, NH, NKV, HD, int(self.window[l]), b["scores"], b["hb"]
            )
            self._gemm(l * 4 + R_O, b["hb"], t, b["x"], OUT_ADD)
            norm_rows_kernel[t, tpb](
                b["x"], t, H, layer, self.eps, w["pf"], norms[l, N_LN2W], norms[l, N_LN2B], b["hb"]
            )
            self._gemm(l * 4 + R_UP, b["hb"], t, b["up"], OUT_SET)
            act_kernel[spread(t * I), tpb](b["up"], t, I, gated, b["hb"])
            self._gemm(l * 4 + R_DOWN, b["hb"], t, b["x"], OUT_ADD)
        if all_logits:
            fnw, fnb = int(self.ci[C_FNW]), int(self.ci[C_FNB])
            norm_rows_kernel[t, tpb](b["x"], t, H, layer, self.eps, w["pf"], fnw, fnb, b["hb"])
            self._gemm(L * 4 + 1, b["hb"], t, b["logits"], OUT_SET)
        else:
            self._phase(PH_HEAD, 0, t - 1, 0, pos + t - 1)

    def warmup(self):
        """Compile (or load from numba's cache) the prompt and decode kernels, then forget the tokens."""
        pos = self.pos
        self.forward(np.zeros(2, np.int64))
        self.forward(np.zeros(1, np.int64))
        self.pos = pos

    def close(self):
        self.w = self.buf = None

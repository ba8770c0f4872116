"""The CUDA model: the export's weights uploaded once, a preallocated fp16 KV cache, `forward`.

Implements runtime/backend.py's Backend, as the CPU runtime's NumbaModel does, so `Generator`
(sampling, streaming, chat) drives both. It builds from the same weights plan (runtime/plan.py
`plan_export`: verify, validate_export, check_memory, per-tensor formats), turned into the CUDA
records of runtime/format/records.py (CUDA_CONFIG, CUDA_MODEL, CUDA_LAYER, CUDA_LINEAR); what is
checked here is only what the GPU adds: the kernels' limits and the device memory fit.

Upload: every tensor goes from its memory-mapped view in `model.onnx.data` (runtime/loader.py,
the CPU runtime's reader) straight into a device staging buffer, and a device kernel writes it
into the transposed layout of kernels.py (fp32 scales and float weights become fp16 there): the
host makes no copy of the weights, only of the small tensors (biases, norms, zero*scale).

Decode (one token): kernels.decode_coop, one cooperative launch per token; if the GPU or driver
refuses a cooperative launch, the same phases run as one launch each (`decode_mode` says which).
Prompt (several tokens): chunks of PROMPT_CHUNK tokens, per layer a norm, a tiled GEMM per
linear, RoPE/KV, attention and the activation as separate launches (9 per layer, up to 12 with
q/k norm and post-norms).

Model families (issue 25: Qwen3, SmolLM3, Granite, OLMo 2, Phi-3 with LongRoPE, Gemma 3 text) are
data, not code paths: `cuda_records` turns the family's per-layer description
(runtime/features.py, the plan's per-layer norms and rope table) into CUDA_CONFIG / CUDA_LAYER
fields, and one layer loop (kernels.run_phase, `_prompt`) reads them, as the CPU runtime's
`forward` reads CONFIG / LAYER. Sliding-window layers keep the full-context cache and mask by
their window (no ring buffer); the rotary tables are the CPU runtime's (model.rope_sets), with
LongRoPE's long set swapped in per forward call past its switch. Tested against the CPU runtime
under numba's CUDA simulator (tests/cuda_families.py), and compiled to sm_90 PTX
(tests/cuda_ptx.py).
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import EdgeLLMError, UnsupportedError
from ..format.names import ROLES
from ..format.records import CUDA_CONFIG, CUDA_LAYER, CUDA_MODEL, KIND_F32, ROPE_KINDS, records
from ..model import check_numba_support, rope_sets
from ..plan import LinearPlan, Norm, WeightsPlan, plan_export
from ..validate import ModelConfig
from . import device as dev
from .kernels import (
    IN_GEGLU,
    IN_GELU,
    IN_SWIGLU,
    LAYER_PHASES,
    MAX_THREADS,
    OUT_ADD,
    OUT_SET,
    PH_ATTN,
    PH_DOWN,
    PH_DOWN_POST,
    PH_EMBED,
    PH_HEAD,
    PH_O,
    PH_O_POST,
    PH_QKNORM,
    PH_QKV,
    PH_ROPE,
    PH_UP,
    ROWS,
    State,
    Weights,
    act_kernel,
    attention_kernel,
    decode_coop,
    embed_kernel,
    gemm_grid,
    gemm_kernel,
    has_phase,
    norm_rows_kernel,
    phase_kernel,
    qk_norm_kernel,
    residual_norm_kernel,
    rope_kv_kernel,
    transpose_into,
)

PROMPT_CHUNK = 128  # tokens per prompt pass: the scratch (scores: chunk x heads x ctx floats) grows with it
KV_CACHE_TYPES = ("auto", "fp16")
SIM_THREADS = 64  # threads per block under numba's CUDA simulator (tests); MAX_THREADS on a GPU
# blocks per prompt-path launch of the grid-stride kernels under the simulator, which runs blocks
# one after another, each as blockDim Python threads: one block per row or head cost ~30 ms of
# thread start-up each (a 6-token Gemma 3 prompt: 10 s, 4.4 s at 32 threads, then 2.0 s with this);
# every grid size computes the same (tests/cuda_suite.py launches the kernels with several blocks)
SIM_BLOCKS = 2
WHO = "the CUDA path"


def check_cuda_support(cfg: ModelConfig, ex) -> None:
    """What the CUDA kernels cannot run (validate.py has checked the format and the family's
    description already). Every key of runtime/features.py runs here, as on the CPU: what is
    left is the MLP activations and formats the numba kernels share, and the heads the
    attention kernel's shared buffers hold."""
    check_numba_support(cfg, ex, WHO, "")
    if cfg.head_dim % 2 or cfg.head_dim > 2 * MAX_THREADS:
        raise UnsupportedError(f"head_dim {cfg.head_dim} is not supported by {WHO} (even, at most {2 * MAX_THREADS})")


class _Upload:
    """Where every tensor goes: host views (into the memory map) and offsets in the device arrays
    (kernels.Weights: wq, fw, sc, zs take whole tensors; pf the small fp32 ones)."""

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
        if arr is None:
            return -1
        a = np.ascontiguousarray(arr, np.float32).reshape(-1)
        off = self.pf_size
        self.pf.append(a)
        self.pf_size += a.size
        return off

    @property
    def weight_bytes(self) -> int:
        s = self.size
        return 4 * s["wq"] + 2 * s["fw"] + 2 * s["sc"] + 4 * s["zs"] + 4 * self.pf_size

    def linear(self, d, p: LinearPlan) -> None:
        """Fill the CUDA_LINEAR record `d` for the planned linear `p` (format and bits resolved by the plan)."""
        d.n, d.k = p.n, p.k
        d.w_off = d.s_off = d.z_off = d.b_off = -1
        if p.fmt is None:
            d.kind, d.w_off = KIND_F32, self.big("fw", p.weight)
        else:
            n, nb, blob = p.weight.shape
            d.kind, d.block, d.nb, d.words, d.zero = p.bits, p.fmt.block, nb, nb * blob // 4, p.fmt.sym_zero
            d.w_off = self.big("wq", p.weight.reshape(n, nb * blob).view(np.uint32))
            d.s_off = self.big("sc", p.scales.reshape(n, nb))
            if p.zeros is not None:
                d.z_off = self.big("zs", p.zeros * p.scales.reshape(n, nb).astype(np.float32))
        d.b_off = self.small(p.bias)

    def norm(self, norm: Norm | None) -> tuple[int, int]:
        if norm is None:  # a norm this family's layer does not have
            return -1, -1
        return self.small(norm.weight), self.small(norm.bias)


def cuda_records(plan: WeightsPlan, up: _Upload):
    """The plan as CUDA records: (config (1,), model (1,), layers (L,)) plus, for the prompt path,
    one one-record CUDA_LINEAR array per linear {(layer, role) | "embed" | "head": array}.
    The family's description (runtime/features.py, the plan's per-layer norms and rope table)
    becomes fields, as the CPU runtime's model.run_config / Weights fill CONFIG / LAYER."""
    cfg = plan.config
    f = cfg.features
    c = records(CUDA_CONFIG, 1)
    r = c.view(np.recarray)[0]
    r.hidden, r.intermediate, r.layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    r.heads, r.kv_heads, r.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    r.vocab, r.ctx, r.eps = cfg.vocab_size, plan.n_ctx, cfg.norm_eps
    r.layer_norm, r.learned_pos, r.gated = cfg.norm == "layer", cfg.position == "learned", cfg.mlp == "gated"
    r.gelu_gate = r.gated and cfg.activation == "gelu_pytorch_tanh"
    r.rope_dims = f.rope_dims
    r.emb_mult, r.res_mult = f.embedding_multiplier, f.residual_multiplier
    r.attn_scale = f.attention_scale or 0.0  # 0: the kernel's 1/sqrt(HD)
    r.logit_mult = 1.0 / f.logits_scaling
    r.attn_cap, r.final_cap = f.attn_logit_softcapping or 0.0, f.final_logit_softcapping or 0.0
    layers = records(CUDA_LAYER, cfg.num_layers)
    for i, lp in enumerate(plan.layers):
        ly = layers.view(np.recarray)[i]
        for role in ROLES:
            up.linear(ly[role], lp.linears[role])
        norms = lp.norms  # the roles this family's layer has (validate.layer_norms); absent: -1
        ly.attn_norm_w, ly.attn_norm_b = up.norm(norms.get("attn"))
        ly.mlp_norm_w, ly.mlp_norm_b = up.norm(norms.get("mlp"))
        ly.attn_out_norm_w = up.norm(norms.get("attn_out"))[0]
        ly.mlp_out_norm_w = up.norm(norms.get("mlp_out"))[0]
        ly.q_norm_w, ly.k_norm_w = up.norm(norms.get("q"))[0], up.norm(norms.get("k"))[0]
        ly.qk_width = norms["q"].weight.shape[0] if "q" in norms else 0
        ly.window, ly.rope = lp.window, ROPE_KINDS[lp.rope]
    model = records(CUDA_MODEL, 1)
    m = model.view(np.recarray)[0]
    up.linear(m.embed, plan.embed)
    if plan.head is None:
        m.head = m.embed  # tied: one copy on the GPU
    else:
        up.linear(m.head, plan.head)
    m.final_norm_w, m.final_norm_b = up.norm(plan.final_norm)
    m.positions_off = -1 if plan.positions is None else up.small(plan.positions[: plan.n_ctx])
    single = {(i, role): layers[i : i + 1][role].copy() for i in range(cfg.num_layers) for role in ROLES}
    single["embed"], single["head"] = model["embed"].copy(), model["head"].copy()
    return c, model, layers, single


class CudaModel:
    """Load once (weights to the GPU), run many: `forward(ids)` appends tokens to the cache.
    Implements runtime/backend.py's Backend."""

    backend = "numba-cuda"
    kernel_warning = None  # one code path: nothing falls back at load (decode_mode says how decode runs)

    def __init__(
        self,
        path,
        n_ctx: int | None = None,
        threads: int | None = None,
        kv_cache: str = "auto",
        threads_per_block: int | None = None,
        fused: bool = True,
        verify: bool = False,
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
        self.cuda = dev.open_gpu()
        self.fused = fused
        self.set_threads(threads)
        self.kv_cache, self.tpb = "fp16", threads_per_block
        plan = plan_export(
            path, who=WHO, n_ctx=n_ctx, kv_itemsize=lambda q: 2, verify=verify, supports=check_cuda_support
        )
        try:
            self._load(plan, path)
        finally:
            plan.export.close()  # everything lives on the GPU now

    def _load(self, plan: WeightsPlan, path):
        cuda = self.cuda
        self.config = cfg = plan.config
        self.n_ctx = plan.n_ctx
        up = _Upload()
        cfg_rec, model_rec, layers, self._single = cuda_records(plan, up)
        self.chunk = min(PROMPT_CHUNK, self.n_ctx)
        L, H, NH, NKV, HD = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        up_n = int(layers["up"]["n"][0])
        wide = max(H, NH * HD, cfg.intermediate_size)
        scratch = {  # State's fields after cos, sin
            "kc": ((L, NKV, self.n_ctx, HD), np.float16),
            "vc": ((L, NKV, self.n_ctx, HD), np.float16),
            "x": ((self.chunk, H), np.float32),
            "qkv": ((self.chunk, (NH + 2 * NKV) * HD), np.float32),
            "att": ((self.chunk, wide), np.float16),
            "up": ((self.chunk, up_n), np.float32),
            "scores": ((self.chunk * NH, self.n_ctx), np.float32),
            "logits": ((self.chunk, cfg.vocab_size), np.float32),
            "res": ((self.chunk, H), np.float32),
        }
        staging = max([h.nbytes for _, _, h in up.copies] or [0])
        state_bytes = sum(int(np.prod(s)) * np.dtype(t).itemsize for s, t in scratch.values())
        self.device_bytes = up.weight_bytes + state_bytes
        if not dev.simulator():
            free, total, name = dev.memory_info(cuda)
            dev.check_fits(
                self.device_bytes + staging, free, total, name, f"'{path}' with a {self.n_ctx}-token context"
            )
        self.w = self._upload(up, staging)
        self.bytes_per_token = up.weight_bytes  # as the GPU holds them (float weights in fp16)
        self.layers = layers  # host copies: launch sizes for the prompt path
        self.d_cfg, self.d_model, self.d_layers = (
            cuda.to_device(cfg_rec),
            cuda.to_device(model_rec),
            cuda.to_device(layers),
        )
        self.d_single = {k: cuda.to_device(v) for k, v in self._single.items()}
        self._cfg = cfg_rec.view(np.recarray)[0]  # host copy: the prompt path's flags and multipliers
        self.positions_off = int(model_rec["positions_off"][0])
        self.final_norm = int(model_rec["final_norm_w"][0]), int(model_rec["final_norm_b"][0])
        # the rotary tables, the CPU runtime's: (2, ctx, rope_dims/2) global | local (Gemma 3's
        # sliding layers), scaled (linear, llama3, LongRoPE); LongRoPE has a second set, its long
        # factors, that a forward call reaching past `rope_switch` takes (runtime/rope.py): the
        # same State with the other tables
        sets, self.rope_switch = rope_sets(cfg, self.n_ctx)
        state = State(
            cuda.to_device(sets[0][0]),
            cuda.to_device(sets[0][1]),
            **{k: cuda.device_array(s, t) for k, (s, t) in scratch.items()},
        )
        self._states = [state] + [state._replace(cos=cuda.to_device(c), sin=cuda.to_device(s)) for c, s in sets[1:]]
        self.state = state
        self.pos = 0
        self.decode_mode = "cooperative" if self.fused else "phases"
        self._coop_grid, self._coop_ran = None, False
        tiles = lambda n: (int(n) + ROWS - 1) // ROWS  # noqa: E731
        half = HD // 2
        self._phase_grid = {
            PH_EMBED: -(-H // self.tpb),
            PH_QKV: tiles(layers["qkv"]["n"][0]),
            PH_QKNORM: NH + NKV,  # one block per head (at most; 2 for a norm over the projection)
            PH_ROPE: -(-((NH + NKV) * half + NKV * HD) // self.tpb),
            PH_ATTN: NH,
            PH_O: tiles(H),
            PH_O_POST: 1,
            PH_UP: tiles(up_n),
            PH_DOWN: tiles(H),
            PH_DOWN_POST: 1,
            PH_HEAD: tiles(cfg.vocab_size),
        }

    @property
    def kernels(self) -> str:
        """What computes, for `info`, `run --verbose` and bench rows."""
        if dev.simulator():
            return f"numba CUDA simulator ({self.tpb} threads/block)"
        free, total, name = dev.memory_info(self.cuda)
        cc = ".".join(map(str, self.cuda.get_current_device().compute_capability))
        return f"{name} (sm {cc}, {self.tpb} threads/block, decode: {self.decode_mode})"

    def set_threads(self, threads: int | None):
        """CPU threads do not compute here (the GPU does); kept for the Backend interface and `info`."""
        if threads is not None and threads < 1:
            raise EdgeLLMError(f"--threads {threads} is invalid; give at least 1")
        self.threads = threads

    # ------------------------------------------------------------------ load
    def _upload(self, up: _Upload, staging_bytes: int) -> Weights:
        cuda = self.cuda
        dtypes = {"wq": np.uint32, "fw": np.float16, "sc": np.float16, "zs": np.float32}
        arrays = {k: cuda.device_array(max(1, up.size[k]), t) for k, t in dtypes.items()}
        arrays["pf"] = cuda.to_device(np.concatenate(up.pf) if up.pf else np.zeros(1, np.float32))
        if dev.simulator():
            # the simulator's "device" arrays are host memory, so the staging copy + transpose_into
            # launch (there to spare a host copy of the weights on a GPU) buys nothing and costs a
            # Python thread per element (~40 s for a hidden-64 fp32 llama on 2 busy cores): write
            # the same layout with numpy (references.ref_transposed; tests/cuda_suite.py checks
            # transpose_into against it, and gpu_check.sh runs this path on the GPU)
            for name, off, host in up.copies:
                dst = arrays[name]
                dst[off : off + host.size] = np.ascontiguousarray(host.T).reshape(-1).astype(dst.dtype)
            return Weights(**arrays)
        stage = {}
        for name, off, host in up.copies:
            dt = host.dtype
            if dt not in stage:
                stage[dt] = cuda.device_array(max(1, staging_bytes // dt.itemsize), dt)
            src = stage[dt][: host.size].reshape(host.shape)
            src.copy_to_device(np.ascontiguousarray(host))  # from the memory map (a view; no copy unless unaligned)
            blocks = min(1024, -(-host.size // self.tpb))
            transpose_into[blocks, self.tpb](src, arrays[name], off)
        cuda.synchronize()
        del stage
        return Weights(**arrays)

    # ------------------------------------------------------------------ run
    @property
    def _step(self):
        """The decode step's arguments after (tok, pos) / (ph, l, row, tok, pos)."""
        return self.d_cfg, self.d_model, self.d_layers, self.w, self.state

    def reset(self):
        self.pos = 0

    def truncate(self, n: int):
        self.pos = min(self.pos, n)

    def forward(self, ids, all_logits: bool = False, prompt: bool = False) -> np.ndarray:
        """Append `ids` at the current position; logits (len(ids), V) or (V,) of the last token."""
        if not dev.simulator():
            return self._forward(ids, all_logits)
        # the simulator computes each CUDA thread's arithmetic with numpy scalars, which warn on
        # NaN/inf where a GPU stays silent (damaged weights are reported once, by the Generator);
        # the filter is process-wide because the simulated threads are Python threads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return self._forward(ids, all_logits)

    def _forward(self, ids, all_logits: bool) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        t = ids.size
        if t == 0:
            raise EdgeLLMError("no tokens to run")
        if self.pos + t > self.n_ctx:
            raise EdgeLLMError(f"{self.pos + t} tokens exceed the context of {self.n_ctx}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise EdgeLLMError(f"token id out of range [0, {self.config.vocab_size})")
        # LongRoPE: the whole call takes the long tables when it reaches past the switch, as the
        # CPU runtime decides per forward call (runtime/rope.py)
        self.state = self._states[1 if 0 < self.rope_switch < self.pos + t else 0]
        if t == 1 and not all_logits:
            self._decode(int(ids[0]))
            self.pos += 1
            return self.state.logits[0].copy_to_host()
        out = np.empty((t, self.config.vocab_size), np.float32) if all_logits else None
        for c0 in range(0, t, self.chunk):
            c1 = min(t, c0 + self.chunk)
            self._prompt(ids[c0:c1], all_logits)
            if all_logits:
                out[c0:c1] = self.state.logits[: c1 - c0].copy_to_host()
            self.pos += c1 - c0
        return out if all_logits else self.state.logits[0].copy_to_host()

    def _decode(self, tok: int):
        args = (tok, self.pos) + self._step
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
        rows = self.layers.view(np.recarray)
        for l in range(self.config.num_layers):
            for ph in LAYER_PHASES:
                if has_phase(ph, rows[l]):
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
        phase_kernel[self._phase_grid[ph], self.tpb](ph, l, row, tok, pos, *self._step)

    def _gemm(self, which, x, t: int, out, omode: int, mult=1.0, cap=0.0):
        """The tiled GEMM of one linear: which = (layer, role), "embed" or "head"; out = (or +=)
        epilogue(x W^T + b, mult, cap) (kernels.epilogue)."""
        n = int(self._single[which]["n"][0])
        gemm_kernel[gemm_grid(n, t), self.tpb](
            self.d_single[which], self.w, x, t, out, omode, np.float32(mult), np.float32(cap)
        )

    def _block_out(self, which, x, t: int, out_norm: int, grid: int):
        """A block's output linear (O or DOWN) for t rows: x += res_mult * y, or through the
        layer's post-norm first (s.res, then residual_norm_kernel)."""
        s, cfg = self.state, self.config
        res_mult = np.float32(cfg.features.residual_multiplier)
        if out_norm < 0:
            self._gemm(which, x, t, s.x, OUT_ADD, res_mult)
            return
        self._gemm(which, x, t, s.res, OUT_SET)
        eps = np.float32(cfg.norm_eps)
        residual_norm_kernel[grid, self.tpb](s.x, s.res, t, cfg.hidden_size, eps, self.w.pf, out_norm, res_mult)

    def _prompt(self, ids: np.ndarray, all_logits: bool):
        """t tokens at positions pos..: every layer, then the last row's (or every row's) logits.
        The layer loop reads the family's description from the CUDA_LAYER / CUDA_CONFIG records
        (host copies): which norms, q/k norm, rope table, window, multipliers and caps."""
        cfg, s, pf, tpb = self.config, self.state, self.w.pf, self.tpb
        c = self._cfg
        t, pos, L = ids.size, self.pos, cfg.num_layers
        H, NH, NKV, HD, I = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        layer = int(cfg.norm == "layer")
        act = IN_GELU if not c.gated else IN_GEGLU if c.gelu_gate else IN_SWIGLU
        eps = np.float32(cfg.norm_eps)
        most = SIM_BLOCKS if dev.simulator() else 1 << 30
        blocks = lambda n: max(1, min(most, n))  # noqa: E731  (grid-stride kernels: any grid computes the same)
        spread = lambda n: blocks(min(1024, -(-n // tpb)))  # noqa: E731
        embed_kernel[spread(H), tpb](
            self.d_single["embed"], self.w, self.cuda.to_device(ids), pos, H, self.positions_off, c.emb_mult, s.x
        )
        rows = self.layers.view(np.recarray)
        for l in range(L):
            ly = rows[l]
            norm_rows_kernel[blocks(t), tpb](s.x, t, H, layer, eps, pf, int(ly.attn_norm_w), int(ly.attn_norm_b), s.att)
            self._gemm((l, "qkv"), s.att, t, s.qkv, OUT_SET)
            if ly.q_norm_w >= 0:
                nseg = NH + NKV if ly.qk_width == HD else 2
                qk_norm_kernel[blocks(min(1024, t * nseg)), tpb](
                    s.qkv, t, NH, NKV, HD, int(ly.qk_width), int(ly.q_norm_w), int(ly.k_norm_w), eps, pf
                )
            rope_kv_kernel[spread(t * ((NH + NKV) * HD // 2 + NKV * HD)), tpb](
                s.qkv, t, pos, l, NH, NKV, HD, int(c.rope_dims), int(ly.rope), s.cos, s.sin, s.kc, s.vc
            )
            attention_kernel[blocks(t * NH), tpb](
                s.qkv, s.kc, s.vc, l, pos, t, NH, NKV, HD, int(ly.window), c.attn_scale, c.attn_cap, s.scores, s.att
            )
            self._block_out((l, "o"), s.att, t, int(ly.attn_out_norm_w), blocks(t))
            norm_rows_kernel[blocks(t), tpb](s.x, t, H, layer, eps, pf, int(ly.mlp_norm_w), int(ly.mlp_norm_b), s.att)
            self._gemm((l, "up"), s.att, t, s.up, OUT_SET)
            act_kernel[spread(t * I), tpb](s.up, t, I, act, s.att)
            self._block_out((l, "down"), s.att, t, int(ly.mlp_out_norm_w), blocks(t))
        if all_logits:
            fnw, fnb = self.final_norm
            norm_rows_kernel[blocks(t), tpb](s.x, t, H, layer, eps, pf, fnw, fnb, s.att)
            self._gemm("head", s.att, t, s.logits, OUT_SET, c.logit_mult, c.final_cap)
        else:
            self._phase(PH_HEAD, 0, t - 1, 0, pos + t - 1)

    def warmup(self):
        """Compile (or load from numba's cache) the prompt and decode kernels, then forget the tokens."""
        pos = self.pos
        self.forward(np.zeros(2, np.int64))
        self.forward(np.zeros(1, np.int64))
        self.pos = pos

    def close(self):
        self.w = self.state = None

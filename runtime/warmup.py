"""Compile the numba kernels before the first run, into numba's on-disk cache.

The first start of the numba runtime compiles its decode step (`model.forward` and every kernel it
calls) with LLVM: about 19 s of CPU on a Zen 5 core for one kernel tier. Two ways keep that out
of a user's first `edgellm run`:

- `edgellm warmup` (install instructions run it once after `pip install`) compiles the step for
  the tier this CPU runs, for both KV cache types, on a synthetic one-layer model: the compiled
  code depends on the argument *types* only (records, array ranks and dtypes, the tier), not on
  the model's sizes, so every export of the default formats then starts warm.
- A `NumbaModel` whose step is not in the cache compiles it in a child process first
  (`compile_in_child`), then loads it from the cache: LLVM's memory (~300 MB of a 600 MB
  first run on SmolLM2-135M) goes away with the child instead of staying in the serving process.

Whether the step is cached is asked of numba's own cache index (`is_cached`), under the key
numba loads by: the argument types (the tier as a literal, kernels/tiers.py), the target's
CPU name and features, and the function's bytecode. A cache written for another CPU (or under
NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) has another key: it is recompiled, never run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from .format.records import CONFIG, LAYER, MODEL, record, records
from .kernels import tiers
from .kernels.layers import rope_tables
from .kernels.quant import make_desc

# The synthetic model: one layer, every dimension a small multiple of the widest SIMD chunk.
H, I, NH, NKV, HD, V, CTX = 64, 128, 2, 1, 32, 64, 8


def _linear(rng, n, k, bits, gs, keep):
    nb = k // gs
    qw = rng.integers(0, 256, (n, nb, gs * bits // 8), dtype=np.uint8)
    scales = np.full(n * nb, 0.01, np.float32)
    return make_desc(qw, scales, None, bits, k, gs, keep)


def step_args(tier, kv_fp16: bool, keep: list, t: int = 1) -> tuple:
    """Arguments of `model.forward` for a synthetic one-layer model with 4-bit linears and an
    8-bit embedding/head (the default export's formats; float and other packed kinds run in the
    same compiled code: a linear's kind is a runtime field of its record)."""
    rng = np.random.default_rng(0)
    layers = records(LAYER, 1)
    row = layers.view(np.recarray)[0]
    for role, n, k in (("qkv", (NH + 2 * NKV) * HD, H), ("o", H, NH * HD), ("up", 2 * I, H), ("down", H, I)):
        setattr(row, role, _linear(rng, n, k, 4, 32, keep))
    norm = np.ones(max(H, I), np.float32)
    keep.append(norm)
    row.attn_norm_w = row.mlp_norm_w = norm.ctypes.data
    model = record(MODEL)
    model.embed = model.head = _linear(rng, V, H, 8, 32, keep)
    model.final_norm_w = norm.ctypes.data
    cfg = record(CONFIG)
    cfg.hidden, cfg.intermediate, cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ctx = H, I, 1, NH, NKV, HD, CTX
    cfg.gated, cfg.act_cap, cfg.block_cap, cfg.eps = 1, 128, I // 32, 1e-5
    cfg.rope_dims, cfg.emb_mult, cfg.res_mult, cfg.logit_mult, cfg.attn_scale = HD, 1.0, 1.0, 1.0, HD**-0.5
    row.rope = 1  # the global rope table (format/records.py ROPE_KINDS)
    cos, sin = rope_tables(CTX, 1.0 / 10000 ** (np.arange(0, HD, 2) / HD))
    cos, sin = np.stack([cos, cos]), np.stack([sin, sin])  # (2: global, local; ctx, HD/2), as model._rope_tables
    kv = (1, NKV, 1, HD, CTX)  # (L, n_kv, nblk, hd, bs)
    dtype = np.uint16 if kv_fp16 else np.float32
    kc, vc = np.zeros(kv, dtype), np.zeros(kv, dtype)
    kr, vr = np.zeros((0, NKV, 1, HD, 1), dtype), np.zeros((0, NKV, 1, HD, 1), dtype)  # no sliding layers (kvcache.py)
    ids = np.zeros(t, np.int64)
    logits = np.empty((1, V), np.float32)
    return ids, 0, cfg, model, layers, cos, sin, kc, vc, kr, vr, logits, False, False, tier


def is_cached(dispatcher, args) -> bool:
    """Whether `dispatcher` is compiled for `args`' types in this process, or in numba's cache
    under the key numba itself would load (types, target CPU name and features, bytecode).
    False when unsure (then the caller compiles, which is always correct)."""
    from numba.core.typing.typeof import Purpose, typeof

    sig = tuple(typeof(a, Purpose.argument) for a in args)
    if sig in dispatcher.overloads:
        return True
    try:
        cache = dispatcher._cache
        key = cache._index_key(sig, dispatcher.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # a numba without these internals, an unreadable cache: unknown
        return False


def cache_state(dispatcher, args) -> tuple[str, int]:
    """Whether numba's cache has `dispatcher` for `args`' types: ("cached", 0); else after seeding
    it from the package's cache pack (cachepack.py): ("seeded", entries added) where that gave it,
    ("missing", entries added) where it did not (the caller compiles)."""
    from .cachepack import seed

    if is_cached(dispatcher, args):
        return "cached", 0
    added = seed()
    return ("seeded" if added and is_cached(dispatcher, args) else "missing"), added


def attention_args(kv_fp16: bool, t: int) -> tuple:
    """Arguments of kernels/layers.py `attention` / `attention_mat` with the types the step passes
    them (so that a compile of these serves the step's call: numba's cache holds one entry per
    argument types): q (t, (NH + 2 NKV) HD), one layer's cache (NKV, 1, HD, CTX), out, scores."""
    dtype = np.uint16 if kv_fp16 else np.float32
    kc, vc = np.zeros((1, NKV, 1, HD, CTX), dtype), np.zeros((1, NKV, 1, HD, CTX), dtype)
    q = np.zeros((t, (NH + 2 * NKV) * HD), np.float32)
    out, scores = np.zeros((t, NH * HD), np.float32), np.zeros((t * NH, t), np.float32)
    return q, kc[0], vc[0], 0, NH, NKV, HD, out, scores, 0, np.float32(HD**-0.5), np.float32(0.0), 0


# The step's largest kernels, in groups that compile side by side (each in a child of its own)
# before the step itself, which then loads them from numba's cache: of a 19.4 s (CPU) first
# compile on Zen 5, the linears were 7.5 s and the attention kernels 5.4 s
# (benchmarks/scripts/first_start.py --profile). Only the wall time shrinks, given a core each.
PARTS = ("linears", "attention")


def warm_part(tier, kv_fp16: bool, part: str) -> None:
    """Compile (or load) one group of PARTS with the argument types the step passes."""
    if part == "linears":
        from .kernels.quant import self_check

        self_check(tier.id)  # linear_few / linear_mat as the model's step calls them
    else:
        from .kernels.layers import attention, attention_mat

        attention(*attention_args(kv_fp16, 1))
        attention_mat(*attention_args(kv_fp16, 2))


def warm(tier, kv_fp16: bool) -> bool:
    """Compile (or load) the decode step and the tier's self-check kernels; True if it compiled."""
    from .kernels.quant import self_check
    from .model import forward

    keep: list = []
    args = step_args(tier, kv_fp16, keep)
    cold = not is_cached(forward, args)
    self_check(tier.id)  # linear_few / linear_mat as the model's step calls them
    forward(*args)  # both paths (t == 1, t > 1) are one compiled function
    return cold


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def compile_parts(tier, kv_fp16: bool) -> None:
    """Compile the PARTS side by side, one child each, when this process may run on more than
    one core (else nothing: one core would run them one after the other anyway). A part whose
    child fails is compiled later by whoever compiles the step."""
    if _cores() < 2:
        return
    cmd = [sys.executable, "-m", "edgellm.runtime.warmup", tier.name, "fp16" if kv_fp16 else "fp32"]
    kids = []
    for part in PARTS:
        try:
            kids.append(
                subprocess.Popen(
                    [*cmd, part], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        except OSError:
            pass
    for kid in kids:
        try:
            kid.wait(timeout=3600)
        except subprocess.TimeoutExpired:
            kid.kill()
            kid.wait()


def compile_in_child(tier, kv_fp16: bool) -> bool:
    """Run `warm` in a child process (same environment, so the same numba target and cache):
    the compile's LLVM memory leaves with the child. Its largest kernels compile first, side by
    side in children of their own (`compile_parts`). False if the child failed (the caller then
    compiles in-process)."""
    compile_parts(tier, kv_fp16)
    cmd = [sys.executable, "-m", "edgellm.runtime.warmup", tier.name, "fp16" if kv_fp16 else "fp32"]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=3600)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def warmup(kernels: str = "auto", kv_caches=("fp16", "fp32")) -> list[dict]:
    """`edgellm warmup`: compile the step for the tier `kernels` resolves to, per KV cache type
    (first from the package's cache pack, where it has this CPU's level). One row per type: tier,
    kv cache, whether it compiled, whether the pack gave it, seconds (wall and CPU)."""
    from .model import forward

    tier = tiers.resolve(kernels)
    rows = []
    for kv in kv_caches:
        w0, c0 = time.perf_counter(), time.process_time()
        state, _ = cache_state(forward, step_args(tier, kv == "fp16", []))
        if state == "missing":
            compile_parts(tier, kv == "fp16")  # its largest kernels side by side first
        cold = warm(tier, kv == "fp16")
        rows.append(
            {
                "tier": tier.name,
                "kv_cache": kv,
                "compiled": cold,
                "from_pack": state == "seeded",
                "wall_s": time.perf_counter() - w0,
                "cpu_s": time.process_time() - c0,
            }
        )
    return rows


def cache_dir() -> str | None:
    """The folder numba keeps the decode step's cache in (NUMBA_CACHE_DIR, beside the sources,
    or the user's cache folder when those are read-only)."""
    from .model import forward

    return getattr(getattr(forward, "_cache", None), "_cache_path", None)


if __name__ == "__main__":  # the children of compile_in_child: python -m edgellm.runtime.warmup TIER fp16|fp32 [PART]
    if len(sys.argv) > 3:
        warm_part(tiers.BY_NAME[sys.argv[1]], sys.argv[2] == "fp16", sys.argv[3])
    else:
        warm(tiers.BY_NAME[sys.argv[1]], sys.argv[2] == "fp16")

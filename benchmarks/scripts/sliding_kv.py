"""KV cache memory of a Gemma-3-1B-shaped model at a long context, rings vs full (issue 25).

The KV cache depends on the layer types, window, KV heads and head dim only, so the model has
Gemma-3-1B's attention shape (26 layers, 5 sliding of every 6 with window 512, 1 KV head of 256
dims) and a tiny everything else (hidden 64, vocab 512, random weights); it runs N positions
through the numba runtime (fp16 KV cache, prompt chunks of 128) twice: with the sliding layers'
ring buffers (runtime/kvcache.py) and with every layer holding the whole context (the layout
before; forced by turning the rings off). Reported: the cache's allocated bytes, the bytes of it
actually resident (mincore on its pages), and the bound (global x N + sliding x window) x bytes
per position and layer.

    python -m edgellm.benchmarks.scripts.sliding_kv [--ctx 8192] [--heads 1]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import tempfile
import time
from pathlib import Path

import numpy as np


def resident(arr: np.ndarray) -> int:
    """Bytes of `arr`'s pages that are in memory (mincore), arr page-aligned (an mmap)."""
    if arr.nbytes == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    n = (arr.nbytes + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(arr.nbytes), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(v & 1 for v in vec) * page


def build(out: Path, heads: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgellm.export.exporter import export_model
    from edgellm.export.weights import Options
    from edgellm.modelio import Loaded

    layers = 26
    cfg = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        query_pre_attn_scalar=256,
        max_position_embeddings=32768,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    export_model(Loaded(model, None, "gemma-3-1b-kv-shape", {"steps": []}), out, Options(), False)


def measure(path: Path, ctx: int, rings: bool) -> dict:
    from edgellm.runtime import kvcache
    from edgellm.runtime.model import NumbaModel

    if not rings:
        kvcache.ring_rows = lambda window, n_ctx, chunk: 0  # every layer full: the layout before rings
    nm = NumbaModel(path, n_ctx=ctx, kv_cache="fp16")
    st = nm.state
    t0 = time.perf_counter()
    nm.forward(np.arange(ctx, dtype=np.int64) % 500)
    secs = time.perf_counter() - t0
    cfg = nm.config
    per = 2 * cfg.num_kv_heads * cfg.head_dim * 2  # bytes of k and v per position and layer (fp16)
    glob = sum(1 for w in cfg.sliding_window if not w)
    slid = [w for w in cfg.sliding_window if w]
    bound = (glob * ctx + sum(slid)) * per
    res = sum(resident(a) for a in (st.k, st.v, st.kr, st.vr))
    nm.close()
    return {
        "rings": rings,
        "ctx": ctx,
        "layers_full": glob,
        "layers_sliding": len(slid),
        "allocated_bytes": st.nbytes,
        "resident_bytes": res,
        "bound_bytes": bound,
        "resident_over_bound": res / bound,
        "prefill_s": round(secs, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument(
        "--heads", type=int, default=1, help="query heads (Gemma-3-1B: 4; the KV cache does not depend on it)"
    )
    ap.add_argument("--layout", choices=["rings", "full", "both"], default="both")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "onnx"
        build(path, a.heads)
        for rings in {"rings": [True], "full": [False], "both": [True, False]}[a.layout]:
            print(json.dumps(measure(path, a.ctx, rings)), flush=True)


if __name__ == "__main__":
    main()

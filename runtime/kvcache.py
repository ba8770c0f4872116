"""The numba runtime's KV cache: full-attention layers hold every position, sliding-window layers
only their window, as a ring buffer (issue 25: Gemma 3's five sliding layers in six, Mistral's).

A sliding layer of window W that runs chunks of up to C new tokens keeps W + C - 1 rows: the
chunk's first query sees the W - 1 positions before it, the chunk writes its C keys before its
queries attend, and position p lives in row p % (W + C - 1). Decoding reads the same rows.

Napkin math, Gemma-3-1B (26 layers: 4 global, 22 sliding with W = 512; 1 KV head of 256 dims,
fp16: 1 KiB of keys and values per position and layer) at 8192 positions:
  every layer full:  26 x 8192 x 1 KiB = 208 MiB
  rings (C = 128):   (4 x 8192 + 22 x 639) x 1 KiB = 45.7 MiB  (the bound 4 x 8192 + 22 x 512: 43 MiB)

Truncating the cache (a server's prefix reuse, runtime/generate.py) keeps a ring only while it
still holds the window before the new end; otherwise the model forgets everything (`pos` 0) and
the caller re-runs the prefix.
"""

from __future__ import annotations

import mmap

import numpy as np

from .validate import ModelConfig


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


def ring_rows(window: int, n_ctx: int, chunk: int) -> int:
    """Rows of a sliding layer's ring buffer (window + chunk - 1), or 0 (no ring: a full-attention
    layer, or a window that covers the whole context anyway)."""
    rows = window + chunk - 1
    return rows if 0 < window and rows < n_ctx else 0


KV_BLOCK = 512  # positions per block of the cache (kernels/layers.py): 1 KB rows in fp16


def blocked(lead: tuple, hd: int, rows: int) -> tuple:
    """The cache's shape for `rows` positions: (*lead, nblk, hd, bs), blocks of bs = min(KV_BLOCK,
    rows) positions, each transposed (a row of positions per head dim). Writing position p touches
    only its block's pages, so the cache becomes resident as it fills (fully transposed rows
    (hd, ctx) made a page per head dim resident at the first token: 47 MB at SmolLM2's 8,192)."""
    bs = max(1, min(KV_BLOCK, rows))
    return (*lead, -(-rows // bs), hd, bs)


def kv_bytes(cfg: ModelConfig, n_ctx: int, itemsize: int, chunk: int) -> int:
    """Bytes of keys and values the cache holds at n_ctx positions (check_memory's figure)."""
    rows = sum(ring_rows(w, n_ctx, chunk) or n_ctx for w in cfg.sliding_window)
    return 2 * cfg.num_kv_heads * cfg.head_dim * itemsize * rows


class RunState:
    """The KV cache, preallocated (zeros: pages are touched only when used). k, v: the
    full-attention layers' (L_full, n_kv, nblk, hd, bs) for n_ctx positions; kr, vr: the sliding
    layers' rings (L_ring, n_kv, nblk, hd, bs) for `rows` (`blocked`: blocks of positions, each
    transposed; kernels/layers.py says why). `layer_kv[l]` = (index into its array, ring rows or
    0), the LAYER record's
    `kv` and `ring`. fp16 is held as uint16 bits (kernels/layers.py kv_get / kv_cast)."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, fp16: bool, chunk: int):
        self.rings = [ring_rows(w, n_ctx, chunk) for w in cfg.sliding_window]
        self.windows = list(cfg.sliding_window)
        full = [i for i, r in enumerate(self.rings) if r == 0]
        ring = [i for i, r in enumerate(self.rings) if r > 0]
        self.layer_kv = [(full.index(i), 0) if r == 0 else (ring.index(i), r) for i, r in enumerate(self.rings)]
        nkv, hd = cfg.num_kv_heads, cfg.head_dim
        dtype = np.uint16 if fp16 else np.float32
        rows = max(self.rings, default=0) or 1
        self.k = lazy_zeros(blocked((len(full), nkv), hd, n_ctx), dtype)  # (L_full, n_kv, nblk, hd, bs)
        self.v = lazy_zeros(blocked((len(full), nkv), hd, n_ctx), dtype)
        self.kr = lazy_zeros(blocked((len(ring), nkv), hd, rows), dtype)  # (L_ring, n_kv, nblk, hd, bs)
        self.vr = lazy_zeros(blocked((len(ring), nkv), hd, rows), dtype)
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.kr.nbytes + self.vr.nbytes

    def keeps(self, n: int) -> bool:
        """Whether, truncated to n positions, every ring still holds the window before n: the
        rows of positions [pos - rows, pos) are intact, the next query sees [n - window + 1, n)."""
        return all(r == 0 or max(0, n - w + 1) >= self.pos - r for r, w in zip(self.rings, self.windows))

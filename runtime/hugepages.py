"""The packed weights in memory backed by huge pages (Linux transparent huge pages: 2 MiB on x86-64).

A decode step streams every weight once. Read through the export's file map, the stream crosses a
4 KiB page every 4 KiB: a TLB miss each time, and the hardware prefetchers, which stop at page
boundaries, start over. Copied once at load into one anonymous private mapping advised with
MADV_HUGEPAGE, the same bytes sit on 2 MiB pages (measured in benchmarks/RESULTS.md, "Huge
pages"). The file's pages under each copied tensor are then released (Export.drop_pages), so the
resident size stays the export's.

Used where the kernel offers it: Linux with transparent huge pages set to `always` or `madvise`
(/sys/kernel/mm/transparent_hugepage/enabled). Elsewhere, or with EDGELLM_HUGEPAGES=0, the
weights stay in the file map as before (`Arena.open` returns None).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")


def _huge_size() -> int:
    """Bytes of this kernel's transparent huge page: 2 MiB on x86-64 and 4 KiB-granule arm64, 32 MiB on a
    16 KiB-granule arm64 kernel (the Raspberry Pi 5's default)."""
    try:
        return int((THP_DIR / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


HUGE = _huge_size()
ALIGN = 64  # every placed tensor starts on a cache line
PAD = 64  # bytes after each tensor: SIMD loads may read a few bytes past a row's end
CHUNK = 32 << 20  # bytes copied (and their file pages released) at a time


def thp_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or "" when unknown."""
    try:
        text = (THP_DIR / "enabled").read_text()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def wanted() -> bool:
    """Whether the weights go to huge pages here: the platform has MADV_HUGEPAGE, the kernel's mode
    lets a madvise'd mapping have them, and EDGELLM_HUGEPAGES is not 0."""
    if os.environ.get("EDGELLM_HUGEPAGES", "1").strip() in ("0", "no", "off", "false"):
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE") and thp_mode() in ("always", "madvise")


def _span(nbytes: int) -> int:
    return (nbytes + PAD + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    """One anonymous private mapping, aligned to a huge page, that tensors are copied into in order."""

    def __init__(self, total: int):
        self.size = total
        # one huge page more than needed: the first huge page boundary inside the mapping is where it starts
        self._map = mmap.mmap(-1, total + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._map.madvise(mmap.MADV_HUGEPAGE)
        base = np.frombuffer(self._map, np.uint8)
        start = -base.ctypes.data % HUGE
        self._buf = base[start : start + total]  # (total,) uint8
        self._used = 0

    @classmethod
    def open(cls, arrays: list[np.ndarray]) -> "Arena | None":
        """An arena for `arrays` (their sizes only), or None where huge pages are not to be used."""
        total = sum(_span(a.nbytes) for a in arrays)
        if not total or not wanted():
            return None
        try:
            return cls(total)
        except (OSError, ValueError):  # no address space / madvise refused: keep the file map
            return None

    def place(self, arr: np.ndarray, release=None) -> np.ndarray:
        """A copy of `arr` (same dtype and shape) inside the arena, copied CHUNK bytes at a time;
        `release(piece)` is called on each copied piece of a C-contiguous `arr` (the loader lets
        the file pages under it go: a 394 MB head otherwise sat twice in memory while it was copied)."""
        if not arr.flags.c_contiguous:
            arr, release = np.ascontiguousarray(arr), None
        n = _span(arr.nbytes)
        if self._used + n > self.size:
            raise ValueError(f"arena of {self.size} bytes is full ({self._used} used, {n} asked)")
        dst = self._buf[self._used : self._used + arr.nbytes]  # (nbytes,) uint8
        src = arr.reshape(-1).view(np.uint8)
        for i in range(0, arr.nbytes, CHUNK):
            dst[i : i + CHUNK] = src[i : i + CHUNK]
            if release is not None:
                release(src[i : i + CHUNK])
        self._used += n
        return dst.view(arr.dtype).reshape(arr.shape)

    def huge_bytes(self) -> int:
        """Bytes of the arena on huge pages: this process's AnonHugePages, at most the arena's size
        (0 if unknown)."""
        try:
            for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
                if line.startswith("AnonHugePages:"):
                    return min(self.size, int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        return 0

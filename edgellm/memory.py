"""Memory budgets: `--max-memory` sizes, what the machine has, and the peak this process reached."""

from __future__ import annotations

import re

from .errors import EdgeLLMError

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
DEFAULT_FRACTION = 0.75  # of available memory, when no --max-memory is given: room for the OS and page cache


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """'6GB', '1.5GiB', '800MB', '4096' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise EdgeLLMError(f"{flag} {text!r} is not a size; give e.g. 6GB, 1.5GiB or 800MB")
    return int(float(m.group(1)) * _UNITS[unit])


def available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def budget(max_memory: str | None) -> tuple[int, str]:
    """(bytes, how it was chosen) for a --max-memory value (None: a fraction of what is available)."""
    if max_memory is not None:
        return parse_size(max_memory), f"--max-memory {max_memory}"
    avail = available()
    if avail is None:
        return 8 * 10**9, "default 8 GB (available memory unknown)"
    return int(avail * DEFAULT_FRACTION), f"{DEFAULT_FRACTION:.0%} of the {human(avail)} available"


def rss() -> int:
    """This process's resident set now (bytes)."""
    return _status_field("VmRSS")


def peak_rss() -> int:
    """The highest resident set this process reached (VmHWM; ru_maxrss where /proc is missing)."""
    peak = _status_field("VmHWM")
    if peak:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_field(name: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def trim() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; nothing elsewhere). A streamed
    workflow frees a layer's buffers each step; without this, glibc keeps much of them mapped
    (its heap grows in pieces it cannot return), and the resident set drifts up over the layers."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (raises AttributeError off glibc)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def return_large_blocks(threshold: int = 4 << 20) -> None:
    """Serve every allocation of `threshold` bytes or more with its own mapping, given back to the
    OS the moment it is freed (glibc's M_MMAP_THRESHOLD; nothing elsewhere). By default glibc
    raises this threshold up to 32 MB as blocks are freed, so a streamed layer's temporaries
    (activations, Hessian products: 4-32 MB each) land in a heap that fragments and stays
    resident between layers."""
    trim()
    if _LIBC:
        _LIBC.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD; fixing it also stops the dynamic raise


_LIBC = None

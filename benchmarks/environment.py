"""Where the numbers were taken: CPU, memory, OS, library versions, git revision, date."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LIBRARIES = (
    "edgellm",
    "numpy",
    "numba",
    "onnx",
    "onnxruntime",
    "tokenizers",
    "torch",
    "transformers",
    "llama_cpp_python",
)
INTERESTING_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "neon",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
)


def _cpuinfo() -> dict:
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model", "Hardware") and "model" not in info:
            info["model"] = value
        elif key in ("flags", "Features") and "flags" not in info:
            info["flags"] = value.split()
    return info


def proc_kib_field(path: str, key: str) -> int | None:
    """A `Key:  N kB` line of a /proc file (meminfo, self/status) in bytes, or None."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mem_total() -> int | None:
    return proc_kib_field("/proc/meminfo", "MemTotal")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_revision(repo: Path | None = None) -> dict | None:
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def collect() -> dict:
    cpu = _cpuinfo()
    flags = cpu.get("flags", [])
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": {
            "model": cpu.get("model") or platform.processor() or "unknown",
            "machine": platform.machine(),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": usable,
            "flags": [f for f in INTERESTING_FLAGS if f in flags],
            "virtualized": "hypervisor" in flags,
        },
        "memory_bytes": _mem_total(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "libraries": {name: _version(name) for name in LIBRARIES},
        "git": git_revision(),
    }

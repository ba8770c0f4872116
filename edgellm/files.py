"""Sizes on disk (torch-free: the benchmarks and the CLI both use it)."""

from __future__ import annotations

from pathlib import Path


def dir_size(path) -> int:
    """Bytes of a file, or of every file under a folder (recursively)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

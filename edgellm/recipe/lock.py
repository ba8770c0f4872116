"""OUT/recipe.lock.json: what each stage was run on, with which options and code, and what it made.

    {"format": 1, "recipe": "...", "model": "...", "code_version": "0.1.0+src.<hash of edgellm's core>",
     "stages": [{"index": 0, "name": "prune", "command": "prune", "dir": "00-prune",
                 "options": {...}, "inputs": {"model": {"spec": ..., "sha256": ...}},
                 "code_version": "0.1.0+src.<hash of the code this stage depends on>",
                 "key": "<sha256 of the above>", "status": "done" | "failed" | "running",
                 "output_sha256": ..., "seconds": ..., "error": ..., "metrics": {...}}]}

A stage is skipped on a rerun when its key (inputs, options, code version) is the one recorded,
it finished, and its output folder still hashes to what was recorded. The file is replaced
atomically after every change, so it always says which stage last ran and how it ended.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from .. import __version__

LOCK_NAME = "recipe.lock.json"
FORMAT = 1
_CHUNK = 1 << 20


def hash_path(path: Path) -> str:
    """sha256 over a file's bytes, or over a folder's relative paths and file bytes (sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def identity(spec: str) -> dict:
    """What a stage input is: a local file or folder by content hash, anything else by its name."""
    from ..modelio import BUILTIN_MODELS, resolve_spec

    resolved = resolve_spec(spec) if spec in BUILTIN_MODELS else spec
    path = Path(resolved)
    if path.exists():
        return {"spec": spec, "sha256": hash_path(path)}
    return {"spec": spec}


# The code each stage's output depends on, besides edgellm's top-level modules (model I/O, data,
# evaluation, architectures) and the workflow's own module in edgellm/pipeline: a change there
# reruns the stage; a change to the CLI, the recipe runner or the report does not.
STAGE_CODE = {
    "prune": ("edgellm/prune", "edgellm/quant"),  # prune drives blocks with quant/apply.py's calibration helpers
    "distill": ("edgellm/distill",),
    "draft": ("edgellm/distill",),
    "quantize": ("edgellm/quant",),
    "export": ("export", "edgellm/quant"),
    "bench": ("benchmarks", "runtime", "export"),
    "eval": (),
}
COMMAND_MODULE = {"eval": "evaluate"}


def _roots() -> dict[str, Path]:
    import edgellm

    roots = {"edgellm": Path(edgellm.__file__).parent}
    for sub in ("export", "runtime", "benchmarks"):
        try:
            roots[sub] = Path(__import__(f"edgellm.{sub}", fromlist=["__file__"]).__file__).parent
        except ImportError:
            pass
    return roots


@functools.lru_cache(maxsize=None)
def code_version(command: str | None = None) -> str:
    """The package version plus a hash of the Python sources a stage's output depends on."""
    roots = _roots()
    top = roots["edgellm"]
    files = sorted(top.glob("*.py"))
    if command is not None:
        files += [top / "pipeline" / f"{COMMAND_MODULE.get(command, command)}.py"]
        files += [top / "pipeline" / "common.py", top / "pipeline" / "options.py"]
        for part in STAGE_CODE[command]:
            head, _, rest = part.partition("/")
            base = roots.get(head)
            if base is not None:
                files += sorted((base / rest if rest else base).rglob("*.py"))
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(f.parents[1])).encode())
            h.update(f.read_bytes())
    return f"{__version__}+src.{h.hexdigest()[:12]}"


def stage_key(command: str, options: dict, inputs: dict, version: str) -> str:
    blob = json.dumps(
        {"command": command, "options": options, "inputs": inputs, "code_version": version}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class Lock:
    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.data = {"format": FORMAT, "stages": []}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("format") == FORMAT and isinstance(data.get("stages"), list):
                    self.data = data
            except (OSError, json.JSONDecodeError):
                pass  # unreadable: every stage reruns, and the file is rewritten

    def entry(self, index: int) -> dict | None:
        for e in self.data["stages"]:
            if e.get("index") == index:
                return e
        return None

    def set(self, index: int, entry: dict) -> None:
        self.data["stages"] = [e for e in self.data["stages"] if e.get("index") != index] + [entry]
        self.data["stages"].sort(key=lambda e: e["index"])
        self.save()

    def truncate(self, n: int) -> None:
        """Forget stages at index >= n (the recipe now has n stages)."""
        self.data["stages"] = [e for e in self.data["stages"] if e["index"] < n]

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)

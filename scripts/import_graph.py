"""The rooms of the house and the import arrows between them (docs/ARCHITECTURE.md's picture).

    python scripts/import_graph.py [REPO_DIR]

A room is a top-level folder, or a package of edgellm/ (cli, commands, pipeline, recipe, ...);
runtime/format is a room of its own. Prints one line per arrow `A -> B (n imports)`, top-level
imports and function-level (lazy) ones alike, then the arrows that run up the floors (none is
the goal). Tests are left out.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

# floors, top first: a room may import the rooms on lower floors (and its own), never higher
FLOORS = [
    ["cli", "commands"],
    ["recipe"],
    ["pipeline", "benchmarks", "benchmarks.scripts"],
    ["export", "quant", "prune", "distill", "edgellm"],
    ["runtime", "runtime.cuda"],
    ["runtime.kernels"],
    ["runtime.format"],
    ["runtime.errors"],  # errors.py and deps.py: what every room raises and how it names an extra
]
FLOOR_OF = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
EDGELLM_ROOMS = ("cli", "commands", "recipe", "pipeline", "quant", "prune", "distill")


def room_of_module(mod: str) -> str | None:
    """'edgellm.runtime.format.blocks' -> 'runtime.format'; 'edgellm.commands.run' -> 'commands'."""
    parts = mod.split(".")
    if parts[0] != "edgellm":
        return None
    if len(parts) == 1:
        return "edgellm"
    top = parts[1]
    if top == "__main__":
        return "cli"  # `python -m edgellm` is the CLI's entry point
    if top == "runtime" and len(parts) > 2 and parts[2] in ("errors", "deps"):
        return "runtime.errors"
    if top in ("runtime", "benchmarks") and len(parts) > 2 and f"{top}.{parts[2]}" in FLOOR_OF:
        return f"{top}.{parts[2]}"
    if top in ("runtime", "export", "benchmarks") or top in EDGELLM_ROOMS:
        return top
    return "edgellm"  # the shared core modules of edgellm/ (modelio, data, errors, console ...)


def module_of(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] != "edgellm":
        parts = ["edgellm", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(root: Path, path: Path):
    mod = module_of(root, path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{a.name}" for a in node.names)  # `from . import device`


def arrows(root: Path) -> Counter:
    out = Counter()
    for folder in ("edgellm", "runtime", "export", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            src = room_of_module(module_of(root, path))
            seen = set()
            for target in imports(root, path):
                dst = room_of_module(target)
                if dst and dst != src and (dst, target.rsplit(".", 1)[0]) not in seen:
                    seen.add((dst, target.rsplit(".", 1)[0]))
                    out[(src, dst)] += 1
    return out


def upward(graph: Counter) -> list:
    return [(a, b) for (a, b) in graph if FLOOR_OF.get(b, 99) < FLOOR_OF.get(a, 99)]


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    g = arrows(root)
    for (a, b), n in sorted(g.items(), key=lambda kv: (FLOOR_OF.get(kv[0][0], 99), kv[0])):
        print(f"{a:18s} -> {b:18s} ({n})")
    up = upward(g)
    print(f"arrows that run up: {len(up)}" + "".join(f"\n  {a} -> {b}" for a, b in up))

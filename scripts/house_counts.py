"""Counts of the house's structure (the restructuring issue's before/after figures).

    python scripts/house_counts.py [REPO_DIR]

Prints JSON: files that spell an export tensor name, files holding a copy of the nibble-packing
code, index-slot constants, private names imported across packages, functions over 80 lines (and
function bodies over 80 lines: without the signature, which typer's Annotated options make long,
and the docstring).
Tests are left out of every count (they may spell names to check them). Source only: .py files
under edgellm/, runtime/, export/, benchmarks/, scripts/.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

ROOMS = {
    "edgellm": "edgellm",
    "runtime": "edgellm.runtime",
    "export": "edgellm.export",
    "benchmarks": "edgellm.benchmarks",
}
# names only an export has (the fused projections, the packed parts, the embedding/head/position
# tensors as stored), searched in string literals that are not docstrings
TENSOR_NAME = re.compile(
    r"qkv_proj|gate_up_proj|\.qweight|\.qzeros|\.scales\b|embed_tokens\.weight|transformer\.wte|lm_head\.(?:weight|bias|q)"
    r"|wpe\.weight|model\.layers\.\{"
)
PACKING = re.compile(r"1::2\]\s*<<\s*4|\(packed\s*&\s*(15|0x0F)")
# index-slot constants: a family of D_/C_/R_/N_ names numbered by range() or a tuple of ints
SLOT = re.compile(
    r"^\s*((?:[DCRN]_[A-Z0-9]+\s*,\s*)+[DCRN]_[A-Z0-9]+\s*=\s*(?:range|\d)|[DCRN]_[A-Z0-9]+\s*=\s*range)", re.M
)


def module_of(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    base = ROOMS.get(parts[0], parts[0])
    mod = ".".join([base, *parts[1:]])
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def package_of(mod: str, is_init: bool) -> str:
    return mod if is_init else mod.rpartition(".")[0]


def room(mod: str) -> str:
    """The top-level folder a module lives in (its room)."""
    parts = mod.split(".")
    return (
        parts[1]
        if parts[0] == "edgellm" and len(parts) > 1 and parts[1] in ("runtime", "export", "benchmarks")
        else parts[0]
    )


def resolve(mod: str, is_init: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = package_of(mod, is_init).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def strings(tree: ast.AST) -> list[str]:
    """Every string literal (f-strings' constant parts joined with {}) that is not a docstring."""
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            docs.add(id(body[0].value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            out.append("{}".join(v.value if isinstance(v, ast.Constant) else "" for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            out.append(node.value)
    return out


def main(root: Path) -> dict:
    files = [p for d in ("edgellm", "runtime", "export", "benchmarks", "scripts") for p in (root / d).rglob("*.py")]
    files = [p for p in files if p.name != "house_counts.py"]
    names, packing, slots, private, long, long_bodies = [], [], [], [], [], []
    for p in sorted(files):
        src = p.read_text()
        rel = str(p.relative_to(root))
        tree = ast.parse(src)
        if any(TENSOR_NAME.search(t) for t in strings(tree)):
            names.append(rel)
        if PACKING.search(src):
            packing.append(rel)
        for m in SLOT.finditer(src):
            slots += [f"{rel}:{n.strip()}" for n in m.group(1).split("=")[0].split(",")]
        mod, is_init = module_of(root, p), p.name == "__init__.py"
        pkg = package_of(mod, is_init)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(mod, is_init, node)
                tpkg = target if (root / "/".join(target.split(".")[1:])).is_dir() else target.rpartition(".")[0]
                if not target.startswith("edgellm"):
                    continue  # third-party privates are the third party's business
                for a in node.names:
                    # a private name from another package, or a private module from another room
                    priv_name = a.name.startswith("_") and not a.name.startswith("__") and tpkg != pkg and target != pkg
                    priv_mod = any(q.startswith("_") and not q.startswith("__") for q in target.split("."))
                    if priv_name or (priv_mod and room(target) != room(mod)):
                        private.append(f"{rel}: from {target} import {a.name}")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
                nb = node.end_lineno - body[0].lineno + 1  # without the signature and the docstring
                if n > 80:
                    long.append(f"{rel}:{node.name} ({n}; body {nb})")
                if nb > 80:
                    long_bodies.append(f"{rel}:{node.name} ({nb})")
    return {
        "files_spelling_tensor_names": names,
        "packing_copies": packing,
        "index_slot_constants": slots,
        "private_cross_package_imports": private,
        "functions_over_80_lines": long,
        "function_bodies_over_80_lines": long_bodies,
        "counts": {
            "files_spelling_tensor_names": len(names),
            "packing_copies": len(packing),
            "index_slot_constants": len(slots),
            "private_cross_package_imports": len(private),
            "functions_over_80_lines": len(long),
            "function_bodies_over_80_lines": len(long_bodies),
        },
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()), indent=1))

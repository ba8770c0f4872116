"""benchmarks/ is the `edgellm bench` harness plus scripts/, the one-off studies (benchmarks/README.md).

Every study runs one way, `python -m edgellm.benchmarks.scripts.NAME`: no `sys.path` edits, an
entry point, an import that works without running anything, and no folder of one machine baked
into its source (folders are arguments; examples write them as MODEL_DIR ...)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = BENCH / "scripts"
MODULES = sorted(BENCH.rglob("*.py"))
SCRIPT_NAMES = sorted(m.name for m in pkgutil.iter_modules([str(SCRIPTS)]))
# a path of this machine: /work/..., /tmp/..., /home/... (or the bare "/tmp" as a string)
MACHINE_PATH = re.compile(r"""(?<![\w.~-])/(?:work|tmp|home)(?:/|["'])""")


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_layout_is_what_the_tests_read():
    assert (SCRIPTS / "__init__.py").is_file()
    assert "_common" in SCRIPT_NAMES and len(SCRIPT_NAMES) > 5, SCRIPT_NAMES


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_sys_path_manipulation(path):
    """A module that edits sys.path (or adds a site dir) to find a sibling runs only one way from
    one place: import through the package instead."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            bad.append(node.lineno)
        if isinstance(node, ast.Attribute) and node.attr == "addsitedir":
            bad.append(node.lineno)
    assert not bad, f"{_rel(path)} touches sys.path at lines {bad}"


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_machine_local_paths(path):
    hits = [
        f"{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1) if MACHINE_PATH.search(line)
    ]
    assert not hits, f"{_rel(path)} names folders of one machine (take them as arguments):\n" + "\n".join(hits)


def _has_main_guard(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = [node.test.left, *node.test.comparators]
            if any(getattr(x, "id", None) == "__name__" for x in names) and any(
                getattr(x, "value", None) == "__main__" for x in names
            ):
                return True
    return False


@pytest.mark.parametrize("name", [n for n in SCRIPT_NAMES if not n.startswith("_")])
def test_script_has_an_entry_point(name):
    tree = ast.parse((SCRIPTS / f"{name}.py").read_text())
    assert _has_main_guard(tree), f'benchmarks/scripts/{name}.py lacks `if __name__ == "__main__":`'
    assert ast.get_docstring(tree), f"benchmarks/scripts/{name}.py has no docstring (what it measures, how to run it)"


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_script_imports(name):
    """Import only (nothing runs). An optional peer that is not installed skips, naming it; better,
    scripts import their peers inside the functions that use them."""
    try:
        importlib.import_module(f"edgellm.benchmarks.scripts.{name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] != "edgellm":
            pytest.skip(f"edgellm.benchmarks.scripts.{name} needs {e.name}, not installed here")
        raise


def test_scripts_import_without_torch():
    """The studies import torch, transformers and the peers lazily, like the harness (DESIGN.md)."""
    code = (
        "import importlib, sys\n"
        f"for n in {SCRIPT_NAMES!r}:\n"
        "    try:\n"
        "        importlib.import_module('edgellm.benchmarks.scripts.' + n)\n"
        "    except ModuleNotFoundError as e:\n"  # a missing optional peer: test_script_imports says so
        "        if (e.name or 'edgellm').split('.')[0] == 'edgellm':\n"
        "            raise\n"
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'llama_cpp') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_harness_api_imports():
    import edgellm.benchmarks as bench

    for name in bench.__all__:
        importlib.import_module(f"edgellm.benchmarks.{name}")


def test_every_benchmarks_package_ships():
    """pyproject.toml's [tool.setuptools] packages lists each package folder under benchmarks/."""
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(("edgellm", *p.parent.relative_to(ROOT).parts)) for p in BENCH.rglob("__init__.py")}
    assert folders <= packages, sorted(folders - packages)

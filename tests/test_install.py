"""The device install (`pip install edgellm`, no extras) in a real venv: the wheel built from this
tree, plus exactly the base dependencies' closure. Every command and optional feature that needs
an extra exits 2 with one line naming it; an exported model runs (no torch, no onnx).

The venv is made offline: `python -m venv --without-pip`, the base dependencies (resolved from
pyproject.toml's `dependencies` and their own requirements) linked from this environment's
site-packages, and the wheel of this tree installed with `pip --python VENV install --no-deps`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from edgellm.cli import app

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("edgellm", "export", "runtime", "benchmarks", "pyproject.toml", "README.md")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_closure() -> list[metadata.Distribution]:
    """The installed distributions that `pip install edgellm` (no extras) would bring."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "extra": ""}
    todo = [
        Requirement(r).name for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    seen: dict[str, metadata.Distribution] = {}
    while todo:
        name = todo.pop()
        if _norm(name) in seen:
            continue
        dist = seen[_norm(name)] = metadata.distribution(name)
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return list(seen.values())


def _link_distribution(dist: metadata.Distribution, site: Path) -> None:
    """Symlink the top-level entries of an installed distribution (packages, modules, .dist-info)."""
    src_site = Path(dist.locate_file(""))
    tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        src, dst = src_site / top, site / top
        if src.exists() and not dst.exists():
            dst.symlink_to(src, target_is_directory=src.is_dir())


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory):
    """(python, edgellm script, seconds it took to build) of a venv with the device install only."""
    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("device-install")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:  # build from a copy: setuptools writes build/ and egg-info beside the sources
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc", "results"))
        else:
            shutil.copy2(p, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "wheel"), str(src)],
        check=True,
        capture_output=True,
        text=True,
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.strip()
    for dist in base_closure():
        _link_distribution(dist, Path(purelib))
    wheel = next((root / "wheel").glob("edgellm-*.whl"))
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    return python, venv / "bin" / "edgellm", time.perf_counter() - t0


def _device(venv, *args, timeout=600):
    python, script, _ = venv
    return subprocess.run(
        [str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=script.parents[2],
        env={
            "PATH": str(script.parent) + ":/usr/bin:/bin",
            "HOME": str(script.parents[2]),
            "TERM": "dumb",
            "COLUMNS": "200",
        },
    )


def test_device_install_has_only_the_base_dependencies(device_venv):
    python, _, seconds = device_venv
    code = (
        "import importlib.util as u, sys; "
        "missing = [m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', 'jinja2', 'matplotlib', "
        "'safetensors') if u.find_spec(m)]; "
        "import edgellm.runtime, edgellm.cli; print('present:', missing); "
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    )
    r = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, cwd=python.parents[2]
    )  # not this tree
    assert r.returncode == 0 and "present: []" in r.stdout, r.stdout + r.stderr
    assert sysconfig.get_paths()["purelib"] not in r.stdout
    print(f"device venv built in {seconds:.1f} s")


@pytest.fixture(scope="module")
def tiny_export(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("device-export") / "llama-onnx"
    r = CliRunner().invoke(app, ["export", str(tiny_dirs["llama"]), "-o", str(out), "--no-check"])
    assert r.exit_code == 0, r.output
    return out


COMPRESS = "pip install 'edgellm[compress]'"


@pytest.mark.parametrize(
    "args,hint",
    [
        (["quantize", "{model}", "-o", "{out}"], COMPRESS),
        (["prune", "{model}", "--structured", "layers", "--ratio", "0.5", "-o", "{out}"], COMPRESS),
        (["distill", "{model}", "-o", "{out}"], COMPRESS),
        (["export", "{model}", "-o", "{out}"], COMPRESS),
        (["eval", "{model}"], COMPRESS),
        (["info", "{model}"], COMPRESS),
        (["bench", "{export}", "-o", "{out}"], "pip install 'edgellm[bench]'"),  # report.html plots
        (["run", "{export}", "-p", "hi", "--backend", "onnxruntime"], "pip install 'edgellm[ort]'"),
        (["run", "{export}", "-p", "hi", "--chat"], "pip install 'edgellm[chat]'"),  # chat template: jinja2
        (["serve", "{export}", "--port", "0"], "pip install 'edgellm[serve]'"),
        (["compress", "{recipe}", "-o", "{out}"], COMPRESS),  # its quantize stage needs torch
    ],
    ids=["quantize", "prune", "distill", "export", "eval", "info", "bench", "run-ort", "run-chat", "serve", "compress"],
)
def test_missing_extra_is_one_line_exit_2(device_venv, tiny_dirs, tiny_export, tmp_path, args, hint):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_dirs['llama']}\nstages:\n  - quantize: {{bits: 4}}\n")
    args = [a.format(model=tiny_dirs["llama"], export=tiny_export, out=tmp_path / "out", recipe=recipe) for a in args]
    r = _device(device_venv, *args)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and hint in lines[0], lines
    assert "internal error" not in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_help_lists_every_command_on_the_device_install(device_venv):
    r = _device(device_venv, "--help")
    assert r.returncode == 0, r.stderr
    for name in ("info", "distill", "prune", "quantize", "export", "run", "eval", "bench", "serve", "compress"):
        assert re.search(rf"│ {name}\s", r.stdout), (name, r.stdout)
    assert "not yet available" not in r.stdout


@pytest.mark.slow
def test_device_install_runs_an_export(device_venv, tiny_export):
    """The promise of the base install: an exported model generates text without torch or onnx.
    Slow (~50 s on 2 busy cores): a fresh install's first run compiles every numba kernel."""
    r = _device(device_venv, "run", tiny_export, "-p", "def f(x):", "-n", "6", "--temperature", "0", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert "generation: 6 tokens" in r.stderr, r.stderr


def test_import_error_of_a_non_extra_module_is_a_bug_not_an_install_hint():
    """Only the extras' modules turn into 'install edgellm[...]' (exit 2); any other missing module
    is an internal error (exit 1), not advice to install something."""
    import typer

    from edgellm import cli

    def broken():
        import edgellm_no_such_module  # noqa: F401

    def needs_torch():
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    app = typer.Typer()
    app.command("broken")(cli._guarded("broken", broken))
    app.command("quantize")(cli._guarded("quantize", needs_torch))
    r = CliRunner().invoke(app, ["broken"])
    assert r.exit_code == 1 and "internal error" in r.output and "pip install" not in r.output, r.output
    r = CliRunner().invoke(app, ["quantize"])
    assert r.exit_code == 2 and "'edgellm quantize' needs 'torch'" in r.output and COMPRESS in r.output, r.output

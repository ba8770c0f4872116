"""Issue 25: prune and distill each new family through the CLI, then export (export --check:
ONNX Runtime equals the compressed PyTorch model) and run it on the numba runtime; the
structured prunings a family's layout cannot take are refused with their reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from guards import one_line_error  # noqa: E402

import tiny  # noqa: E402
from edgellm.cli import app  # noqa: E402

FAST = ["--no-eval", "--calib-samples", "8", "--seq-len", "64"]
# the structured pruning each family is smoke-tested with (each takes --structured layers too)
STRUCTURED = {
    "qwen3": "heads",
    "smollm3": "mlp",
    "granite": "heads",
    "olmo2": "mlp",
    "phi3": "layers",  # fused qkv_proj / gate_up_proj: heads and mlp refused below
    "gemma3_text": "heads",
}


@pytest.fixture(scope="module")
def family_dirs(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    return {fam: tiny.save(tiny.build(fam), tokenizer, root / fam) for fam in tiny.FAMILIES}


def _export_and_run(out: Path):
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(out), "-o", str(out) + "-onnx"])  # with the parity check
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["run", str(out) + "-onnx", "-p", "def f(x):", "-n", "3", "--temperature", "0"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("family", list(STRUCTURED))
def test_prune_and_distill_each_family(family_dirs, tmp_path, family):
    src, runner = family_dirs[family], CliRunner()
    kind = STRUCTURED[family]
    ratio = "0.5" if kind == "heads" else "0.25"
    r = runner.invoke(
        app, ["prune", str(src), "--structured", kind, "--ratio", ratio, *FAST, "-o", str(tmp_path / "p")]
    )
    assert r.exit_code == 0, r.output
    _export_and_run(tmp_path / "p")
    r = runner.invoke(
        app, ["prune", str(src), "--method", "wanda", "--pattern", "2:4", *FAST, "-o", str(tmp_path / "s")]
    )
    assert r.exit_code == 0, r.output
    args = ["--student-layers", "2", "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--no-eval"]
    r = runner.invoke(app, ["distill", str(src), *args, "--checkpoint-every", "0", "-o", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    _export_and_run(tmp_path / "d")  # Gemma 3: a student of sliding layers only (no global rope table)


@pytest.mark.parametrize(
    "family,kind,why",
    [("olmo2", "heads", "whole projection"), ("phi3", "heads", "q, k and v"), ("phi3", "mlp", "gate and up")],
)
def test_structured_refusals_say_why(family_dirs, tmp_path, family, kind, why):
    args = ["prune", str(family_dirs[family]), "--structured", kind, "--ratio", "0.5", *FAST, "-o", str(tmp_path / "o")]
    line = one_line_error(args)
    assert why in line and family in line and "--structured layers" in line
    assert not (tmp_path / "o").exists()

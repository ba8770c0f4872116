"""CI runs ruff (issue 13): the settings are pyproject.toml's [tool.ruff] (line length 120, pycodestyle,
pyflakes, import order); `make lint` runs the same check by hand and `ruff format .` fixes layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff_is_clean(args):
    r = subprocess.run([sys.executable, "-m", "ruff", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

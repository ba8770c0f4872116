"""OpenVINO GenAI as a bench peer (benchmarks/scripts/ov_genai_speed.py, runtime_decode --ov):
bad input is one line and exit 2, a failing child becomes a failed row, and, where an OpenVINO venv
is named by EDGELLM_OV_PYTHON (openvino-genai + optimum-intel, which pins an older transformers
than edgellm's, so it is not a test dependency), a tiny llama converted by optimum-cli is timed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.benchmarks.scripts import runtime_decode
from edgellm.benchmarks.scripts.ov_genai_speed import MODEL_XML, check_peer, measure_ov

OV_PYTHON = os.environ.get("EDGELLM_OV_PYTHON", "")


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        runtime_decode.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_ov_peers_are_one_line_exit_2(tmp_path, capsys):
    assert "optimum-cli export openvino" in _error(capsys, ["--ov", str(tmp_path)])
    (tmp_path / MODEL_XML).write_text("<net/>")
    no_ov = tmp_path / "python"  # a python without openvino_genai
    no_ov.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    no_ov.chmod(0o755)
    err = _error(capsys, ["--ov", str(tmp_path), "--ov-python", str(no_ov)])
    assert "cannot import openvino_genai" in err and "pip install openvino-genai" in err
    assert "does not exist" in _error(capsys, ["--ov", str(tmp_path), "--ov-python", str(tmp_path / "nope")])


def test_a_failing_child_is_a_failed_row(tmp_path):
    """The child's error (here: a folder with no model) comes back as the row's one-line error."""
    python = OV_PYTHON or sys.executable  # without openvino: the import fails, also one line
    res = measure_ov(str(tmp_path), python, "Hello there.", threads=1, tokens=2, pp=4, reps=1)
    assert res["status"] == "failed" and res["error"] and "\n" not in res["error"]


@pytest.mark.skipif(not OV_PYTHON, reason="EDGELLM_OV_PYTHON names no OpenVINO venv (openvino-genai, optimum-intel)")
def test_openvino_genai_times_its_own_int4_model(tiny_dirs, tmp_path):
    out = tmp_path / "ov-int4"
    cli = Path(OV_PYTHON).parent / "optimum-cli"
    cmd = [str(cli), "export", "openvino", "--model", str(tiny_dirs["llama"]), "--task", "text-generation-with-past"]
    cmd += ["--weight-format", "int4", "--sym", "--group-size", "32", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert check_peer(str(out), OV_PYTHON) is None
    res = measure_ov(str(out), OV_PYTHON, "The quick brown fox jumps over the lazy dog. " * 20, 1, 8, 32, 2)
    assert res["status"] == "ok", res
    assert len(res["tg_values"]) == len(res["pp_values"]) == 2
    assert min(res["tg_values"]) > 0 and min(res["pp_values"]) > 0
    assert res["first_token_s"] > 0 and res["peak_rss_mb"] > 0

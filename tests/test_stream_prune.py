"""The layer-streaming prune (issue 26): bit-identical to the resident prune, planned first."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import edgellm.pipeline.prune as pipeline_prune
from edgellm.cli import app
from edgellm.pipeline.prune import PruneOptions, run_prune


@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", None)])
def test_streamed_prune_equals_resident(method, pattern, trained_llama, tmp_path, monkeypatch):
    o = PruneOptions(method=method, pattern=pattern, calib_samples=4, seq_len=64, eval_tokens=1024)
    streamed = run_prune(str(trained_llama), tmp_path / "s", o)
    monkeypatch.setattr(pipeline_prune, "_run_streamed", lambda *a, **k: None)  # the resident path
    resident = run_prune(str(trained_llama), tmp_path / "r", o)
    a, b = load_file(str(tmp_path / "s" / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert streamed.result == resident.result and streamed.result["sparsity_reached"] == 0.5
    assert streamed.before.perplexity == pytest.approx(resident.before.perplexity, rel=1e-6)
    assert streamed.after.perplexity == pytest.approx(resident.after.perplexity, rel=1e-6)
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "r" / f).read_bytes(), f


def test_prune_max_memory_is_planned_first(trained_llama, tmp_path):
    args = ["prune", str(trained_llama), "-o", str(tmp_path / "p"), "--method", "wanda", "--max-memory", "1MB"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "pruning one decoder layer needs about" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not list(tmp_path.iterdir())

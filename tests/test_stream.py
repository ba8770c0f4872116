"""Layer-streaming quantize (issue 26): equal to the resident path, resumable, within a budget,
and bad checkpoints refused before loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgellm.cli import app
from edgellm.errors import EdgeLLMError
from edgellm.pipeline.quantize import Method, QuantizeOptions, _run_resident, quant_config, run_quantize

SMALL = dict(calib_samples=8, seq_len=64, eval_tokens=1024)


def _opts(**kw):
    return QuantizeOptions(**{**SMALL, **kw})


def _both(model, tmp_path, **kw):
    o = _opts(**kw)
    resident = _run_resident(str(model), tmp_path / "resident", o, quant_config(o), None, False)
    streamed = run_quantize(str(model), tmp_path / "streamed", o)
    a = load_file(str(tmp_path / "resident" / "model.safetensors"))
    b = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    return resident, streamed, a, b


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rtn_streamed_is_bit_identical(family, tiny_dirs, trained_llama, tmp_path):
    model = trained_llama if family == "llama" else tiny_dirs[family]  # qwen2: tied embeddings
    resident, streamed, a, b = _both(model, tmp_path, method=Method.rtn)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert resident.info == streamed.info
    assert resident.after.perplexity == pytest.approx(streamed.after.perplexity, rel=1e-6)
    assert resident.before.perplexity == pytest.approx(streamed.before.perplexity, rel=1e-6)
    assert not list(tmp_path.glob(".*partial*"))  # the work folder goes once the output is in place


def test_gptq_streamed_matches_resident(trained_llama, tmp_path):
    resident, streamed, a, b = _both(trained_llama, tmp_path, method=Method.gptq)
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("qweight") and "layers" in k:  # GPTQ: float noise may flip a rare rounding
            assert (a[k] == b[k]).float().mean() > 0.999, k
        else:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-6), k
    assert f"{resident.after.perplexity:.4g}" == f"{streamed.after.perplexity:.4g}"
    assert f"{resident.before.perplexity:.4g}" == f"{streamed.before.perplexity:.4g}"

"""Shared fixtures: a tiny tokenizer, tiny models of each family, a briefly trained llama."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add OpenMP spin-waiting on a shared 2-core box


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return tiny.make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """{family: model dir} of random tiny models, one per supported family."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: tiny.save(tiny.build(fam), tokenizer, root / fam) for fam in tiny.CONFIGS}


@pytest.fixture(scope="session")
def trained_llama(tmp_path_factory, tokenizer):
    """A llama (hidden 128, 2 layers) trained for 300 steps: weights are genuinely continuous."""
    model = tiny.build("llama", hidden_size=128, intermediate_size=384, num_hidden_layers=2)
    tiny.train(model, tokenizer, steps=300)
    return tiny.save(model, tokenizer, tmp_path_factory.mktemp("trained") / "llama")


@pytest.fixture(scope="session")
def rtn_q4_export(tiny_dirs, tmp_path_factory):
    """The tiny llama quantized 4-bit RTN g32 with 8-bit embeddings, exported: the default
    export's formats (fp16 KV cache) at the smallest cost (the first-start tests compile its step)."""
    from typer.testing import CliRunner

    from edgellm.cli import app

    root = tmp_path_factory.mktemp("rtn-q4")
    runner = CliRunner()
    qargs = ["--bits", "4", "--group-size", "32", "--sym", "--method", "rtn", "--quantize-embeddings", "--no-eval"]
    r = runner.invoke(app, ["quantize", str(tiny_dirs["llama"]), *qargs, "-o", str(root / "q4")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(root / "q4"), "-o", str(root / "q4-onnx"), "--no-check"])
    assert r.exit_code == 0, r.output
    return root / "q4-onnx"

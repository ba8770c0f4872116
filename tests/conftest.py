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

"""Structured pruning streamed one decoder block at a time (issue 26): the same choices, config and
tensors as the resident structured prune, planned first, refusals unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import edgellm.pipeline.prune as pipeline_prune
import tiny
from edgellm.cli import app
from edgellm.pipeline.prune import PruneOptions, run_prune


class Notes:
    """A progress that keeps its per-layer lines."""

    def __init__(self):
        self.lines = []

    def track(self, iterable, description="", total=None):
        return iterable

    def status(self, message):
        pass

    def note(self, message):
        self.lines.append(message)


def _gemma_with_a_quiet_middle_layer():
    """Gemma 3 (sliding, sliding, full, sliding) whose block 1 barely writes to the residual stream,
    so it is the block removed and the full-attention block 2 moves to index 1: the kept blocks must
    keep their own masks (a random model would lose its last block, where nothing moves)."""
    model = tiny.family_model("gemma3_text", seed=4)
    with torch.no_grad():
        block = model.model.layers[1]
        for norm in (block.post_attention_layernorm, block.post_feedforward_layernorm):
            norm.weight.fill_(-0.99)  # Gemma's norms scale by 1 + w: 0.01
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("structured")
    return {
        "llama": tiny.save(tiny.build("llama", seed=3, num_hidden_layers=4), tokenizer, root / "llama"),
        "gemma3_text": tiny.save(_gemma_with_a_quiet_middle_layer(), tokenizer, root / "gemma3_text"),
        "qwen3": tiny.save(tiny.family_model("qwen3", seed=5), tokenizer, root / "qwen3"),
        "olmo2": tiny.save(tiny.family_model("olmo2", seed=6), tokenizer, root / "olmo2"),
    }


def _resident_must_not_load(*a, **k):
    raise AssertionError("the resident path loaded the model")


@pytest.mark.parametrize(
    "family,kind,ratio",
    [
        ("llama", "layers", 0.5),
        ("llama", "heads", 0.5),
        ("llama", "mlp", 0.25),
        ("gemma3_text", "layers", 0.25),
        ("qwen3", "heads", 0.5),
    ],
)
def test_streamed_structured_equals_resident(family, kind, ratio, models, tmp_path, monkeypatch):
    src = models[family]
    o = PruneOptions(structured=kind, ratio=ratio, calib_samples=4, seq_len=64, eval_tokens=512)
    notes = Notes()
    with monkeypatch.context() as m:
        m.setattr(pipeline_prune, "load_spec", _resident_must_not_load)  # it really streams
        streamed = run_prune(str(src), tmp_path / "s", o, progress=notes)
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert f"layer {n}/{n} " in "\n".join(notes.lines)
    assert all("; eta " in x and "; peak RSS " in x for x in notes.lines)  # one line per layer
    monkeypatch.setattr(pipeline_prune, "_run_streamed", lambda *a, **k: None)  # the resident path
    resident = run_prune(str(src), tmp_path / "r", o)
    a, b = load_file(str(tmp_path / "s" / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert streamed.result == resident.result and streamed.result["removed"]
    if family == "gemma3_text":
        assert streamed.result["removed"] == [1]
        layer_types = json.loads((tmp_path / "s" / "config.json").read_text())["layer_types"]
        assert layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert streamed.result["parameters_after"] < streamed.result["parameters_before"]
    assert streamed.before.perplexity == pytest.approx(resident.before.perplexity, rel=1e-6)
    assert streamed.after.perplexity == pytest.approx(resident.after.perplexity, rel=1e-6)
    assert streamed.after.perplexity != pytest.approx(streamed.before.perplexity, rel=1e-6)
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "r" / f).read_bytes(), f
    rs = json.loads((tmp_path / "s" / "edgellm.json").read_text())["steps"][-1]
    rr = json.loads((tmp_path / "r" / "edgellm.json").read_text())["steps"][-1]
    assert rs["params"] == rr["params"] and rs["result"] == rr["result"] and rs["data"] == rr["data"]


def test_structured_max_memory_is_planned_first(models, tmp_path):
    args = ["prune", str(models["llama"]), "-o", str(tmp_path / "p"), "--structured", "mlp", "--ratio", "0.25"]
    r = CliRunner().invoke(app, args + ["--max-memory", "1MB"])
    assert r.exit_code == 2 and "pruning one decoder layer needs about" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_structured_refusal_unchanged(models, tmp_path):
    args = ["prune", str(models["olmo2"]), "-o", str(tmp_path / "p"), "--structured", "heads", "--ratio", "0.5"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--structured heads does not support 'olmo2'" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not list(tmp_path.iterdir())

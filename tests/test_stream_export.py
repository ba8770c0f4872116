"""The streamed export (issue 26): the same files as the resident export, its layer-by-layer
parity check (which catches a wrong weight), and --max-memory planned before any work."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edgellm.cli import app
from edgellm.export import stream as export_stream
from edgellm.export.check import ParityError
from edgellm.export.exporter import export_model
from edgellm.modelio import load_model
from edgellm.pipeline.export import ExportOptions, run_export
from edgellm.pipeline.quantize import Method, QuantizeOptions, run_quantize


@pytest.fixture(scope="module")
def quantized(tiny_dirs, tmp_path_factory):
    """{family: 4-bit RTN directory}: llama (untied head, 8-bit embeddings), qwen2 (tied, q/k/v bias)."""
    root = tmp_path_factory.mktemp("q")
    o = QuantizeOptions(method=Method.rtn, calib_samples=4, seq_len=32, evaluate=False)
    return {f: run_quantize(str(tiny_dirs[f]), root / f, o).output for f in ("llama", "qwen2")}


def _same_files(a, b):
    for name in ("model.onnx", "model.onnx.data", "config.json", "genai_config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("case", ["llama-q4", "qwen2-q4", "llama-float"])
def test_streamed_export_equals_resident(case, quantized, tiny_dirs, tmp_path):
    fam, kind = case.split("-")
    src = quantized[fam] if kind == "q4" else tiny_dirs[fam]
    export_model(load_model(str(src)), tmp_path / "resident", check=False)
    res = run_export(str(src), tmp_path / "streamed", ExportOptions(check=False))
    assert res.plan.check == "none"
    _same_files(tmp_path / "resident", tmp_path / "streamed")  # bit-identical graph and weights


def test_layer_by_layer_check(quantized, monkeypatch, tmp_path):
    monkeypatch.setattr(export_stream, "FULL_CHECK_MAX_BYTES", 0)  # as for a model too large to check whole
    r = CliRunner().invoke(app, ["export", str(quantized["llama"]), "-o", str(tmp_path / "e")])
    assert r.exit_code == 0 and "parity, layer by layer" in r.output, r.output
    import json

    p = json.loads((tmp_path / "e" / "edgellm.json").read_text())["steps"][-1]["parity"]
    assert p["check"] == "layer by layer" and p["onnx_checker"] == "passed"
    assert p["layer_exact_max_rel_diff"] < 1e-5 and p["cache_vs_nocache_max_rel_diff"] < 1e-5
    assert p["accuracy_level_0_max_abs_diff"] < 1e-4 and 0 < p["layer_max_rel_diff"] < 0.1
    assert not list((tmp_path / "e").glob(".check-*"))  # the cut graphs are gone
    monkeypatch.undo()  # a small model is checked whole, and says so
    small = run_export(str(quantized["qwen2"]), tmp_path / "w", ExportOptions())
    assert small.parity["check"] == "whole model" and small.plan.check == "whole model"


def test_layer_by_layer_check_catches_a_wrong_weight(quantized, monkeypatch, tmp_path):
    from edgellm.export import writer

    monkeypatch.setattr(export_stream, "FULL_CHECK_MAX_BYTES", 0)
    write = writer.DataSink.write

    def corrupt(self, name, arr):  # one layer's down projection written with other codes
        if name == "model.layers.1.mlp.down_proj.qweight":
            arr = arr ^ 0x5A
        return write(self, name, arr)

    monkeypatch.setattr(writer.DataSink, "write", corrupt)
    with pytest.raises(ParityError, match="layer 1"):
        run_export(str(quantized["qwen2"]), tmp_path / "e", ExportOptions(accuracy_level=0))
    assert not (tmp_path / "e").exists() and (tmp_path / "e.failed-check").is_dir()


def test_export_max_memory_is_planned_first(quantized, tmp_path):
    r = CliRunner().invoke(app, ["export", str(quantized["llama"]), "-o", str(tmp_path / "e"), "--max-memory", "1MB"])
    assert r.exit_code == 2 and "needs about" in r.output and "raise --max-memory" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not list(tmp_path.iterdir())

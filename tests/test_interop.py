"""An export is a standard artifact: Optimum and ONNX Runtime GenAI open the folder as it is
(config.json and genai_config.json ride along, covered by the export's sha256 record)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from edgellm.export.exporter import export_model
from edgellm.export.weights import Options
from edgellm.modelio import Loaded
from edgellm.quant.apply import QuantConfig, quantize_model
from edgellm.quant.formats import QuantFormat
from edgellm.runtime.generate import load
from edgellm.runtime.loader import verify_files

PROMPT = [5, 77, 300, 12, 41, 9, 260, 3]
NEW_TOKENS = 12
# optimum-onnx pins transformers<4.58; edgellm runs on transformers 5. `make setup` installs Optimum
# and the transformers it wants into this folder (tests/peers/optimum.txt), used only by a subprocess.
OPTIMUM_PEER = Path(sys.prefix) / "peers" / "optimum"


def _export(tokenizer, out: Path, bits: int | None = None) -> Path:
    """A tiny llama with logits of order 10 (no near-ties for greedy decoding), float or 4-bit."""
    model = tiny.build("llama", initializer_range=0.15)
    record = {"steps": []}
    if bits:
        cfg = QuantConfig(fmt=QuantFormat(bits, 32, True), method="rtn")
        calib = torch.randint(0, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
        _, info = quantize_model(model, cfg, calib)
        record = {"steps": [{"step": "quantize"}], "quantization": info}
    export_model(Loaded(model, tokenizer, "test", record), out, Options(), check=False)
    return out


def _greedy(path: Path, backend: str) -> list[int]:
    """NEW_TOKENS greedy tokens after PROMPT on one of edgellm's own backends (EOS ignored)."""
    m = load(path, backend=backend, warmup=False).model
    m.truncate(0)
    logits, out = m.forward(np.array(PROMPT, np.int64)), []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(logits)))
        logits = m.forward(np.array(out[-1:], np.int64))
    return out


@pytest.fixture(scope="module")
def fp32_export(tokenizer, tmp_path_factory):
    return _export(tokenizer, tmp_path_factory.mktemp("interop") / "fp32")


def test_side_files_described_and_checksummed(fp32_export):
    cfg = json.loads((fp32_export / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 2
    genai = json.loads((fp32_export / "genai_config.json").read_text())
    dec = genai["model"]["decoder"]
    assert genai["search"]["past_present_share_buffer"] is False  # the graph concatenates its cache
    assert (dec["num_key_value_heads"], dec["head_size"], dec["num_hidden_layers"]) == (2, 16, 2)
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert {"config.json", "genai_config.json"} <= set(verify_files(fp32_export))


def test_optimum_generates_like_numba(fp32_export):
    if not (OPTIMUM_PEER / "optimum" / "onnxruntime").is_dir():
        pytest.skip(f"Optimum is not installed in {OPTIMUM_PEER} (run `make setup`; tests/peers/optimum.txt)")
    script = textwrap.dedent(
        f"""
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM
        m = ORTModelForCausalLM.from_pretrained({str(fp32_export)!r})
        ids = torch.tensor([{PROMPT!r}])
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens={NEW_TOKENS}, do_sample=False,
                         min_new_tokens={NEW_TOKENS})
        print(out[0, ids.shape[1]:].tolist())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(OPTIMUM_PEER), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    optimum_tokens = json.loads(run.stdout.strip().splitlines()[-1])
    assert optimum_tokens == _greedy(fp32_export, "numba")


def test_ort_genai_generates_from_4bit_export(tokenizer, tmp_path):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the dev extra")
    path = _export(tokenizer, tmp_path / "q4", bits=4)
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + NEW_TOKENS, min_length=len(PROMPT) + NEW_TOKENS)
    gen = og.Generator(model, params)
    gen.append_tokens(PROMPT)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    assert out == _greedy(path, "onnxruntime")  # the same graph through a plain ONNX Runtime session
    assert len(out) == NEW_TOKENS


def test_ort_genai_builder_helper(tiny_dirs, tmp_path):
    """benchmarks/scripts/ort_genai_build: ORT GenAI's own builder's int4 model of the same
    checkpoint (the peer's model for `edgellm bench OUT:ort-genai`); bad input is one line, exit 2."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the dev extra")
    script = [sys.executable, "-m", "edgellm.benchmarks.scripts.ort_genai_build"]
    out = tmp_path / "genai-q4"
    run = subprocess.run(
        [*script, str(tiny_dirs["llama"]), "-o", str(out)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{out}:ort-genai" in run.stdout
    assert "MatMulNBits" in (out / "model.onnx").read_bytes().decode("latin-1")
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 4)
    gen = og.Generator(model, params)
    gen.append_tokens(PROMPT)
    gen.generate_next_token()
    assert 0 <= int(gen.get_next_tokens()[0]) < tiny.VOCAB
    for args, needle in (
        ([str(out), "-o", str(tmp_path / "x")], "is an export"),
        ([str(tmp_path), "-o", str(tmp_path / "x")], "not a model directory"),
        ([str(tiny_dirs["llama"]), "-o", str(out)], "already exists"),
    ):
        bad = subprocess.run([*script, *args], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and needle in bad.stderr, bad.stderr

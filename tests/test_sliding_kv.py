"""Issue 25: sliding-window layers keep only their window in the KV cache, as a ring buffer
(runtime/kvcache.py), and still equal transformers past the window.

A tiny Gemma 3 (window 8, sliding layers with their own rope theta, a global layer) runs prompt
chunks of 4, so each ring has 8 + 4 - 1 = 11 rows and wraps many times in 40 greedy steps.
"""

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

WINDOW = 8
PROMPT = [5, 17, 100, 3, 77, 250, 9, 11, 400, 12, 33, 7, 90, 41]  # 14 tokens: prefill crosses the window


@pytest.fixture(scope="module")
def gemma(tokenizer, tmp_path_factory):
    model = tiny.build("gemma3_text", seed=3, initializer_range=0.15, sliding_window=WINDOW)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("sliding") / "onnx"
    export_model(Loaded(model, tokenizer, "t", {"steps": []}), path, Options(), False)
    return model, path


def _numba(path, monkeypatch, chunk=4, **kw):
    import edgellm.runtime.model as M

    monkeypatch.setattr(M, "PROMPT_CHUNK", chunk)
    return M.NumbaModel(path, n_ctx=96, threads=2, **kw)


def test_ring_rows(gemma, monkeypatch):
    nm = _numba(gemma[1], monkeypatch)
    st = nm.state
    assert st.rings == [WINDOW + 3, WINDOW + 3, 0, WINDOW + 3]  # layer_types: 3 sliding, 1 full (tests/tiny.py)
    assert st.k.shape == (1, 2, 1, 16, 96) and st.kr.shape == (3, 2, 1, 16, WINDOW + 3)
    rows = nm.weights.layers.view(np.recarray)
    assert [(r.kv, r.ring) for r in rows] == [(0, 11), (1, 11), (0, 0), (2, 11)]
    nm.close()


@pytest.mark.parametrize("kv_cache", ["fp32", "fp16"])
def test_ring_greedy_equals_transformers(gemma, monkeypatch, kv_cache):
    """Prefill across the window in chunks of 4, then 40 greedy steps (the rings wrap ~5 times)."""
    model, path = gemma
    ids = list(PROMPT)
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        for _ in range(40):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    want = ids[len(PROMPT) :]
    nm = _numba(path, monkeypatch, kv_cache=kv_cache)
    got = nm.forward(np.array(PROMPT), all_logits=True)
    if kv_cache == "fp32":
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    out = []
    for _ in range(40):
        out.append(int(got.argmax(-1).reshape(-1)[-1]))
        got = nm.forward([out[-1]])
    nm.close()
    assert out == want


def test_ring_truncate_keeps_or_forgets(gemma, monkeypatch):
    """Prefix reuse: truncating within the ring's slack keeps the cache, further forgets it all
    (pos 0), and either way the next logits equal a fresh run's."""
    path = gemma[1]
    seq = (PROMPT * 3)[:30]
    fresh = _numba(path, monkeypatch)
    want = fresh.forward(np.array(seq), all_logits=True)
    fresh.close()
    nm = _numba(path, monkeypatch)
    nm.forward(np.array(seq[:20]))
    nm.truncate(18)  # rows of positions [9, 20) intact; the next query needs [11, 18): kept
    assert nm.pos == 18
    np.testing.assert_allclose(nm.forward(np.array(seq[18:24]), all_logits=True), want[18:24], atol=1e-4)
    nm.truncate(10)  # needs [3, 10), the ring holds [13, 24): forgotten
    assert nm.pos == 0
    np.testing.assert_allclose(nm.forward(np.array(seq), all_logits=True), want, atol=1e-4)
    nm.close()


def test_ring_prefix_reuse_through_the_generator(gemma, monkeypatch):
    """The server's prefix reuse (Generator.stream(reuse_prefix=True)) on a model whose ring
    cannot keep the shared prefix: it re-runs the prefix, the tokens equal a fresh stream's."""
    import edgellm.runtime.model as M
    from edgellm.runtime.generate import Sampling, load

    monkeypatch.setattr(M, "PROMPT_CHUNK", 4)
    gen = load(gemma[1], n_ctx=96, threads=2, warmup=False)
    p = Sampling(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    first = "".join(gen.stream(PROMPT + [20, 21], p))
    assert gen.model.pos > 16 + WINDOW
    again = "".join(gen.stream(PROMPT + [20, 21], p, reuse_prefix=True))
    assert again == first and gen.stats.prompt_tokens == 16  # the whole prompt ran again
    gen.model.close()

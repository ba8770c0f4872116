"""`edgellm serve --parallel`: a decoding slot's logits do not depend on how many other requests
share the batched step (issue 28). A step of more than ROWS_VEC (16) rows used to send its decode
rows through the prompt GEMM, which sums in another order (8-bit g128 differed by ~3e-5); now every
decoding row takes the decode microkernel whatever the row count, prompt chunks keep the prompt
tiles (a step of one decoding row included).

Each slot's cache is copied into the model's own cache, so "decoded alone" is `model.forward` of
the same token on the same keys and values: the comparison isolates the step.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from edgellm.cli import app
from edgellm.runtime.kernels import tiers

S = 20  # slots decoding together: more than ROWS_VEC


@pytest.fixture(scope="module")
def export8(tmp_path_factory, tokenizer):
    """A tiny llama wide enough for several 128-groups per row (hidden 256), 8-bit g128: the shape
    where the prompt tiles and the decode kernel round differently."""
    import tiny

    root = tmp_path_factory.mktemp("exact")
    src = tiny.save(tiny.build("llama", hidden_size=256, intermediate_size=512), tokenizer, root / "llama")
    runner, q = CliRunner(), root / "llama-q8"
    args = ["--bits", "8", "--group-size", "128", "--sym", "--method", "rtn", "--no-eval", "-o", str(q)]
    r = runner.invoke(app, ["quantize", str(src), *args])
    assert r.exit_code == 0, r.output
    dst = root / "llama-q8-onnx"
    r = runner.invoke(app, ["export", str(q), "-o", str(dst), "--no-check"])
    assert r.exit_code == 0, r.output
    return dst


def _alone(m, sc, s: int, tok: int) -> np.ndarray:
    """Logits of `tok` decoded by model.forward on a copy of slot s's cache."""
    n = sc.pos[s]
    nb = -(-n // sc.k.shape[-1])  # whole blocks of positions
    m.state.k[:, :, :nb] = sc.k[s, :, :, :nb]
    m.state.v[:, :, :nb] = sc.v[s, :, :, :nb]
    m.state.pos = n
    return m.forward(np.array([tok]))


@pytest.mark.parametrize("kernels", sorted({tiers.best().name, "generic"}))
def test_decode_rows_exact_whatever_the_row_count(export8, kernels):
    from edgellm.runtime.batched import SlotCaches
    from edgellm.runtime.kernels.slots import ROWS_VEC
    from edgellm.runtime.model import NumbaModel

    assert S > ROWS_VEC
    m = NumbaModel(export8, n_ctx=64, threads=2, kernels=kernels)
    assert m.tier.name == kernels
    rng = np.random.default_rng(5)
    V = m.config.vocab_size
    sc = SlotCaches(m, S + 1)
    for s in range(S):  # each slot's own prompt
        sc.step([(s, rng.integers(0, V, 2 + s % 5), True, True)])

    # S decoding rows in one step (rows > ROWS_VEC)
    toks = rng.integers(0, V, S)
    want = [_alone(m, sc, s, toks[s]) for s in range(S)]
    got = sc.step([(s, toks[s : s + 1], True, False) for s in range(S)])
    for s in range(S):
        np.testing.assert_array_equal(got[s], want[s], err_msg=f"slot {s} of {S} ({kernels})")

    # decoding rows beside a prompt chunk (segments in any order; the chunk's rows on the prompt tiles)
    toks = rng.integers(0, V, S)
    want = [_alone(m, sc, s, toks[s]) for s in range(S - 3)]
    chunk = (S, rng.integers(0, V, 7), True, True)
    segs = [(s, toks[s : s + 1], True, False) for s in range(S - 3)]
    got = sc.step(segs[:5] + [chunk] + segs[5:])
    for s in range(S - 3):
        k = s if s < 5 else s + 1  # logits come in the segments' order
        np.testing.assert_array_equal(got[k], want[s], err_msg=f"slot {s} beside a prompt chunk ({kernels})")
    m.reset()
    ref = m.forward(chunk[1], prompt=True)  # the chunk's own logits: the prompt path's
    assert np.abs(got[5] - ref).max() <= 1e-3 * np.abs(ref).max()

    # one decoding row: the decode kernel too, its position advanced
    tok = int(rng.integers(0, V))
    want, p = _alone(m, sc, 3, tok), sc.pos[3]
    got = sc.step([(3, np.array([tok]), True, False)])
    assert got.shape == (1, V) and sc.pos[3] == p + 1
    np.testing.assert_array_equal(got[0], want)
    m.close()

"""GPTQ's memory-saving steps (issue 26) change no result: the in-place damping, permutation and
Cholesky factors give the same bits as the copying versions, and the clip search in row chunks
the same scales as one search over the whole matrix."""

from __future__ import annotations

import torch

from edgellm.hessian import inverse_cholesky, permute_symmetric, prepare_hessian
from edgellm.quant.formats import QuantFormat, mse_group_params
from edgellm.quant.gptq import CLIP_ROWS, gptq_quantize


def _problem(out_f: int, in_f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, in_f, generator=g) * torch.rand(in_f, generator=g)  # uneven column scales
    x[:, 3] = 0  # a dead input
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[0, :4] = 0  # pruned weights
    return w, 2 * x.t() @ x / len(x)


def test_in_place_hessian_steps_equal_the_copying_ones():
    w, H = _problem(8, 96)
    W1, W2 = w.clone(), w.clone()
    ref, dead = prepare_hessian(W1, H.clone(), 0.01)
    mine, dead2 = prepare_hessian(W2, H.clone(), 0.01, overwrite=True)
    reference = H.clone()
    reference[dead, dead] = 1
    reference += 0.01 * torch.mean(torch.diag(reference)) * torch.eye(96)  # the textbook damping
    assert torch.equal(ref, reference) and torch.equal(mine, reference) and torch.equal(dead, dead2)
    assert torch.equal(W1, W2) and W1[:, 3].eq(0).all()
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(permute_symmetric(ref.clone(), perm), ref[perm][:, perm])
    scratch = ref.clone()
    assert torch.equal(inverse_cholesky(scratch, overwrite=True), inverse_cholesky(ref))


def test_gptq_overwriting_its_hessian_gives_the_same_bits():
    w, H = _problem(700, 256)  # more rows than CLIP_ROWS: the clip search runs in chunks
    assert 700 > CLIP_ROWS
    for fmt in (QuantFormat(4, 128), QuantFormat(4, 64, False), QuantFormat(8, 128, False, "float")):
        for act_order in (True, False):
            ref = gptq_quantize(w, H, fmt, act_order=act_order)
            scratch = H.clone()
            got = gptq_quantize(w, scratch, fmt, act_order=act_order, overwrite_h=True)
            assert all(torch.equal(a, b) for a, b in zip(ref, got)), (fmt, act_order)
            assert not torch.equal(scratch, H)  # it did use the scratch copy


def test_clip_search_in_row_chunks_equals_one_search():
    w, H = _problem(2 * CLIP_ROWS + 17, 128, seed=2)
    fmt = QuantFormat(4, 32)
    wg = w.reshape(len(w), 4, 32)
    imp = torch.diag(H).reshape(4, 32)
    whole = mse_group_params(wg, fmt, imp)
    parts = [mse_group_params(wg[r : r + CLIP_ROWS], fmt, imp) for r in range(0, len(wg), CLIP_ROWS)]
    assert torch.equal(whole[0], torch.cat([s for s, _ in parts]))
    assert torch.equal(whole[1], torch.cat([z for _, z in parts]))

"""AWQ (Lin et al., 2023): activation-aware weight quantization.

1. Scale search: for each group of linears that read one module's output (a norm, or a linear
   such as v_proj -> o_proj), try per-input-channel scales s = x_mean^a / w_mean^(1-a) for a on
   a grid, quantize W * s (and divide the input by s), and keep the a whose quantized outputs
   are closest to the fp outputs on calibration activations. The scales are folded into the
   preceding module, so the model's function is unchanged before rounding.
2. Clip search: per output row and group, shrink the clipping range max|w| by a factor on a grid
   and keep the factor that minimises that group's output error on sampled activations.
Finally the weights are rounded to nearest with the chosen scales and clipping.
"""

from __future__ import annotations

import torch

from .formats import QuantFormat, dequantize_codes, group_params, pad_columns, quantize_codes

GRID = 20  # points of the scale-exponent grid (a = 0, 1/20, ..., 19/20), as in llm-awq
CLIP_GRID = 20  # shrink factors 1.0 ... 0.5
CLIP_MIN = 0.5


def fake_quantize(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """RTN quantize-dequantize of W (out, in) in its group format -> (out, in) fp32."""
    out_f, in_f = w.shape
    g = fmt.group_for(in_f)
    wg = pad_columns(w.float(), fmt.padded(in_f)).reshape(out_f, -1, g)
    s, z = group_params(wg, fmt)
    return dequantize_codes(quantize_codes(wg, s, z, fmt.maxq, fmt.float_zero), s, z).reshape(out_f, -1)[:, :in_f]


def search_scales(x: torch.Tensor, weights: list[torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    """Best per-input-channel scales (in,) for linears `weights` [(out_i, in)] reading x (N, in)."""
    x = x.float()
    W = torch.cat([w.float() for w in weights], 0)  # (sum out, in)
    in_f = W.shape[1]
    g = fmt.group_for(in_f)
    wg = pad_columns(W.abs(), fmt.padded(in_f)).reshape(W.shape[0], -1, g)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(W.shape[0], -1)[:, :in_f].mean(0)  # (in,)
    x_mean = x.abs().mean(0)  # (in,)
    ref = x @ W.t()  # (N, sum out)
    best, best_err = torch.ones(in_f), float("inf")
    for k in range(GRID):
        a = k / GRID
        s = (x_mean.pow(a) / w_mean.pow(1 - a).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out = (x / s) @ fake_quantize(W * s, fmt).t()
        err = (out - ref).pow(2).mean().item()
        if err < best_err:
            best, best_err = s, err
    return best


def search_clip(x: torch.Tensor, w: torch.Tensor, fmt: QuantFormat, oc_batch: int = 256) -> torch.Tensor:
    """Per (row, group) clipping bound max|w| * shrink minimising group output error -> (out, ng)."""
    out_f, in_f = w.shape
    g = fmt.group_for(in_f)
    xg = pad_columns(x.float(), fmt.padded(in_f)).reshape(x.shape[0], -1, g)  # (N, ng, gs)
    wg_all = pad_columns(w.float(), fmt.padded(in_f)).reshape(out_f, -1, g)  # (out, ng, gs)
    bounds = []
    for o1 in range(0, out_f, oc_batch):
        wg = wg_all[o1 : o1 + oc_batch]  # (ob, ng, gs)
        ref = torch.einsum("ngk,ogk->ong", xg, wg)  # (ob, N, ng)
        max_abs = wg.abs().amax(-1)  # (ob, ng)
        best_err = torch.full_like(max_abs, float("inf"))
        best = max_abs.clone()
        for k in range(CLIP_GRID):
            bound = max_abs * (1 - (1 - CLIP_MIN) * k / CLIP_GRID)
            wc = torch.maximum(torch.minimum(wg, bound.unsqueeze(-1)), -bound.unsqueeze(-1))
            s, z = group_params(wc, fmt)
            deq = dequantize_codes(quantize_codes(wc, s, z, fmt.maxq, fmt.float_zero), s, z)
            err = (torch.einsum("ngk,ogk->ong", xg, deq) - ref).pow(2).mean(1)  # (ob, ng)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, bound, best)
        bounds.append(best)
    return torch.cat(bounds, 0)


def apply_clip(w: torch.Tensor, bounds: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Clamp W (out, in) to ±bounds (out, ng) group-wise."""
    out_f, in_f = w.shape
    g = fmt.group_for(in_f)
    b = bounds.repeat_interleave(g, dim=1)[:, :in_f]
    return torch.maximum(torch.minimum(w, b), -b)

"""Quantization formats as data, with the pure quantize/dequantize maths (torch).

A weight matrix W of shape (out, in) is split along `in` into groups of `group_size` columns;
each (row, group) has one fp16 scale and, when asymmetric, one unsigned zero point:

    q   = clamp(round(w / scale) + zero, 0, 2**bits - 1)      # unsigned codes
    w'  = (q - zero) * scale

Asymmetric formats store integer zero points (uint8) by default; `zero="float"` stores them as fp16
instead (Q4_1 / k-quant style: the group's minimum lands exactly on code 0 and its maximum on the
top code, with no rounding of the zero point; 2 bytes per group, 1.0 bit/weight at group 32 where
integer zeros cost 0.5 at 4 bits). Codes are then round(w / scale + zero). ONNX Runtime's
MatMulNBits takes float zero points of the scales' type.

Symmetric formats use the fixed zero point 2**(bits-1) (8 for 4-bit, 128 for 8-bit) and, like
llama.cpp's Q4_0 and ONNX Runtime's MatMulNBits quantizer, map the group's largest-magnitude
value exactly onto the most negative code, so all 2**bits levels are used.
When `in` is not a multiple of the group size the last group is padded with zeros, as
MatMulNBits does (SmolLM2's width 576 is not a multiple of 128). `group_size=-1` means one
group per output channel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import EdgeLLMError

SUPPORTED_BITS = (4, 8)
ZERO_KINDS = ("int", "float")


@dataclass(frozen=True)
class QuantFormat:
    bits: int = 4  # 4: two codes per byte; 8: one code per byte
    group_size: int = 128  # columns sharing a scale; -1 = per output channel
    sym: bool = True  # symmetric: fixed zero point, no zero points stored
    zero: str = "int"  # asymmetric zero points: "int" (uint8 codes) or "float" (fp16)

    def __post_init__(self):
        if self.zero not in ZERO_KINDS:
            raise EdgeLLMError(f"zero point kind {self.zero!r} is invalid; choose one of {', '.join(ZERO_KINDS)}")
        if self.zero == "float" and self.sym:
            raise EdgeLLMError("float zero points are for asymmetric formats (sym=False)")
        if self.bits not in SUPPORTED_BITS:
            raise EdgeLLMError(
                f"--bits {self.bits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}"
            )
        gs = self.group_size
        if gs != -1 and (gs < 16 or gs & (gs - 1)):
            raise EdgeLLMError(
                f"--group-size {gs} is invalid; it must be a power of two >= 16 (e.g. 32, 64, 128) or -1 for "
                "per-channel"
            )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def group_for(self, in_features: int) -> int:
        """The effective group size for a layer of width `in_features`."""
        return in_features if self.group_size == -1 else self.group_size

    def fitted(self, in_features: int) -> "QuantFormat":
        """This format with the group halved (not below 16) until it divides `in_features`, so no
        group is padding: SmolLM2's 576-wide inputs at group 128 would store 640 columns (4.58
        bits/weight) where group 64 stores 576 (4.25) and rounds finer. Unchanged when no power
        of two >= 16 divides the width (the last group is padded then)."""
        g = self.group_size
        if g == -1:
            return self
        while g > 16 and in_features % g:
            g //= 2
        return self if in_features % g or g == self.group_size else QuantFormat(self.bits, g, self.sym, self.zero)

    @property
    def float_zero(self) -> bool:
        return self.zero == "float"

    @property
    def zero_bytes(self) -> int:
        """Stored bytes per group for its zero point (0 when symmetric)."""
        return 0 if self.sym else (2 if self.float_zero else 1)

    def label(self) -> str:
        """e.g. "4-bit g32", "4-bit g32 asym", "4-bit g32 asym fp16-zero"."""
        return (
            f"{self.bits}-bit g{self.group_size}"
            + ("" if self.sym else " asym")
            + (" fp16-zero" if self.float_zero else "")
        )

    def padded(self, in_features: int) -> int:
        g = self.group_for(in_features)
        return -(-in_features // g) * g

    def to_dict(self) -> dict:
        return asdict(self)


def pad_columns(w: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dimension of `w` to `width`."""
    return w if w.shape[-1] == width else torch.nn.functional.pad(w, (0, width - w.shape[-1]))


def group_params(
    w: torch.Tensor, fmt: QuantFormat, shrink: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points for groups given as the last dim of `w` (..., gs) -> (...,), (...,).

    `shrink` (a float or (...,)) scales the clipping range [min, max] (1 = no clipping).
    Scales are rounded to fp16 here, so the codes are chosen against the scale that is stored.
    """
    w = w.float()
    if fmt.sym:
        idx = w.abs().argmax(dim=-1, keepdim=True)
        m = torch.gather(w, -1, idx).squeeze(-1)  # signed value of largest magnitude
        scale = m * shrink / -fmt.sym_zero
        zero = torch.full_like(scale, fmt.sym_zero)
    elif fmt.float_zero:  # the range need not hold 0: [min, max] maps onto [0, maxq] exactly
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        mid = (lo + hi) / 2
        lo, hi = mid + (lo - mid) * shrink, mid + (hi - mid) * shrink  # clipping shrinks towards the middle
        scale = (hi - lo) / fmt.maxq
        zero = torch.zeros_like(scale)
    else:
        lo = w.amin(dim=-1).clamp(max=0) * shrink
        hi = w.amax(dim=-1).clamp(min=0) * shrink
        scale = (hi - lo) / fmt.maxq
        zero = torch.zeros_like(scale)  # set below once scale is final
    scale = scale.half().float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero group: any scale works
    if fmt.float_zero:
        zero = (-lo / scale).half().float()  # stored as fp16
    elif not fmt.sym:
        zero = torch.clamp(torch.round(-lo / scale), 0, fmt.maxq)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, float_zero: bool = False
) -> torch.Tensor:
    """Codes for `w` (..., gs) with per-group `scale`, `zero` (...,) -> uint8 (..., gs).
    Integer zero points: round(w / scale) + zero; float ones: round(w / scale + zero)."""
    if float_zero:
        q = torch.round(w.float() / scale.unsqueeze(-1) + zero.unsqueeze(-1))
    else:
        q = torch.round(w.float() / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp_(0, maxq).to(torch.uint8)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_codes: (..., gs) codes -> fp32 values."""
    return (q.float() - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)


def quantize_rtn(w: torch.Tensor, fmt: QuantFormat):
    """Round-to-nearest: W (out, in) -> codes (out, n_groups, gs) uint8, scales, zeros (out, n_groups)."""
    out_f, in_f = w.shape
    g = fmt.group_for(in_f)
    wg = pad_columns(w.float(), fmt.padded(in_f)).reshape(out_f, -1, g)  # (out, ng, gs)
    scale, zero = group_params(wg, fmt)
    return quantize_codes(wg, scale, zero, fmt.maxq, fmt.float_zero), scale, zero


CLIP_GRID = tuple(1.0 - 0.01 * k for k in range(31))  # clipping ranges tried by the MSE search: 100% .. 70%


def mse_group_params(
    w: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor | None = None, grid: tuple[float, ...] = CLIP_GRID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the clipping range on `grid` whose rounding error sum(importance * (w - w')^2) is
    smallest (importance (gs,) or (..., gs), e.g. diag H; None = plain MSE). w (..., gs) ->
    scales, zeros (...,). The unclipped range is on the grid, so the result never rounds worse."""
    w = w.float()
    imp = torch.ones_like(w) if importance is None else importance.float().expand_as(w)
    best_s, best_z = group_params(w, fmt)
    best_err = torch.full(best_s.shape, float("inf"))
    for p in grid:
        s, z = group_params(w, fmt, p)
        err = (imp * (dequantize_codes(quantize_codes(w, s, z, fmt.maxq, fmt.float_zero), s, z) - w) ** 2).sum(-1)
        better = err < best_err
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_err = torch.minimum(err, best_err)
    return best_s, best_z

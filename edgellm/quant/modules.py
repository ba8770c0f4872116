"""Modules that compute from packed low-bit weights (module swaps, optimum-quanto style).

Buffers (all saved to safetensors; shapes for a layer with `out` rows, `ng` groups of `gs`):
    qweight  uint8   (out, ng, gs * bits / 8)   packed codes, MatMulNBits layout
    scales   fp16    (out, ng)
    qzeros   uint8   (out, ng)                  only when asymmetric (fp16 for float zero points)
    bias     fp32    (out,)                     when the layer had one
The forward pass dequantizes the packed weight and multiplies: the values computed with are
exactly those stored, which is what the exporter and the runtime reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import QuantFormat, dequantize_codes
from .packing import pack, unpack


class PackedMatrix(nn.Module):
    """Storage and dequantization of a packed (out, in) matrix, shared by every quantized module
    (and read by the exporter and model I/O)."""

    def __init__(self, out_features: int, in_features: int, fmt: QuantFormat):
        super().__init__()
        self.out_features, self.in_features, self.fmt = out_features, in_features, fmt
        g = fmt.group_for(in_features)
        ng = fmt.padded(in_features) // g
        self.register_buffer("qweight", torch.zeros(out_features, ng, g * fmt.bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, ng, dtype=torch.float16))
        if not fmt.sym:
            zdt = torch.float16 if fmt.float_zero else torch.uint8
            self.register_buffer("qzeros", torch.zeros(out_features, ng, dtype=zdt))
        else:
            self.qzeros = None

    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Store codes (out, ng, gs) uint8 with scales/zeros (out, ng)."""
        self.qweight.copy_(pack(codes, self.fmt.bits))
        self.scales.copy_(scales.half())
        if self.qzeros is not None:
            self.qzeros.copy_(zeros.to(self.qzeros.dtype))

    def zeros_or_sym(self, rows=None) -> torch.Tensor:
        if self.qzeros is not None:
            return self.qzeros if rows is None else self.qzeros[rows]
        shape = self.scales.shape if rows is None else (*rows.shape, self.scales.shape[-1])
        return torch.full(shape, self.fmt.sym_zero, dtype=torch.uint8, device=self.scales.device)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (out, in) these buffers encode."""
        codes = unpack(self.qweight, self.fmt.bits)  # (out, ng, gs)
        w = dequantize_codes(codes, self.scales, self.zeros_or_sym())  # (out, ng, gs)
        return w.reshape(self.out_features, -1)[:, : self.in_features]

    def extra_repr(self) -> str:
        f = self.fmt
        return f"in={self.in_features}, out={self.out_features}, {f.label()}"


class QuantLinear(PackedMatrix):
    """y = x @ dequant(W).T + b, computed from the packed weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: QuantFormat):
        super().__init__(out_features, in_features, fmt)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantEmbedding(PackedMatrix):
    """Row lookup into a packed (vocab, dim) table; only the looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: QuantFormat, embed_scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim, fmt)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # the scale a family's embedding multiplies its rows by (Gemma's sqrt(hidden)), as HF names it
        self.scalar_embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., dim)
        codes = unpack(self.qweight[ids], self.fmt.bits)  # (..., ng, gs)
        w = dequantize_codes(codes, self.scales[ids], self.zeros_or_sym(ids)).flatten(-2)[..., : self.embedding_dim]
        return w if self.scalar_embed_scale == 1.0 else w * self.scalar_embed_scale


class TiedQuantLinear(nn.Module):
    """An lm_head that multiplies by a QuantEmbedding's packed table (tied embeddings)."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self.embedding = [embedding]  # a list: not registered, so its buffers are saved once
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., vocab)
        return F.linear(x, self.embedding[0].dequantize().to(x.dtype))

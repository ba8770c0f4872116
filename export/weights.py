"""Linear layers and embeddings as ONNX initializers + nodes: float, MatMulNBits, or QDQ.

The packed bytes edgellm quantize stored are written unchanged (no second quantization):
- `matmulnbits`: `P.qweight` uint8 (out, n_blocks, blob) is MatMulNBits' input B as is;
  `P.scales` float16 (out*n_blocks) are the stored fp16 scales, widened by a Cast node because
  MatMulNBits takes scales of its activations' type (ONNX Runtime folds the Cast at load; the
  Numba and CUDA runtimes read the fp16 initializer directly). fp32 scales in the file would add
  2 bytes per group: 3.7 MB on SmolLM2-135M's default 4-bit export. `P.qzeros` (asym only)
  packed per row like B, or, for float zero points (`zero="float"` formats), fp16 (out*n_blocks)
  widened by a Cast like the scales (MatMulNBits takes zero points of the scales' type; the
  QDQ format and GatherBlockQuantized have no float zero points: refused).
  Embeddings gather rows with com.microsoft.GatherBlockQuantized over the same code bytes
  (vocab, n_blocks, blob) with quantize_axis 2, reading every input straight from an initializer
  (OpenVINO's ONNX frontend refuses any node in front of `data` or `scales`): the scales again as
  float32 `P.gather_scales` (vocab, n_blocks, 1) and integer zero points unpacked as uint8
  `P.gather_zeros` (vocab, n_blocks, 1) (MatMulNBits, which a tied head runs on the same codes,
  refuses that scale shape): beside `P.scales` / `P.qzeros` when a tied head reads those (+4 bytes
  a block, 1.8 MB on SmolLM2-135M), in their place when not (nothing unused in the file). Its
  output (batch, seq, n_blocks, block) is reshaped to rows; padded columns -> Slice. Exports
  before 2026-12-07 reshaped `P.qweight` and `Cast(P.scales)` in the graph; the runtimes read both.
- `qdq`: the same bytes typed UINT4/UINT8 (out, padded_in) for a blocked DequantizeLinear
  (opset 21, axis 1) with the same Cast fp16 scales and explicit zero points (out, n_blocks) (the implied
  symmetric zero point 2**(bits-1) is written out, because DequantizeLinear's default is 0).
Fused layers (qkv, gate_up) concatenate rows: groups run along `in`, so each row keeps its own
scales and the result is exactly the per-layer computation stacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from edgellm.arch import linear_weight
from edgellm.errors import EdgeLLMError, UnsupportedError
from edgellm.quant.packing import pack, unpack
from edgellm.runtime.format.names import (
    BIAS,
    GATHER_SCALES,
    GATHER_ZEROS,
    QWEIGHT,
    QZEROS,
    SCALES,
    WEIGHT,
    export_name,
    tensor,
)

from .graph import MS_DOMAIN, Graph

FORMATS = ("matmulnbits", "qdq")


@dataclass
class Options:
    format: str = "matmulnbits"  # how quantized layers are expressed (see module docstring)
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fastest on CPU), 0 = fp32


@dataclass
class LinearSpec:
    """One (possibly fused) linear, as float weights or packed codes, out x in."""

    out_f: int
    in_f: int
    bias: np.ndarray | None = None  # (out,) float32
    w: np.ndarray | None = None  # float (out, in)
    qweight: np.ndarray | None = None  # uint8 (out, nb, block*bits/8)
    scales: np.ndarray | None = None  # float32 (out, nb), the stored fp16 values
    zeros: np.ndarray | None = None  # uint8 (out, nb) unpacked, or float16 (float zero points); None when symmetric
    bits: int = 0
    block: int = 0

    @property
    def quantized(self) -> bool:
        return self.qweight is not None

    @property
    def n_blocks(self) -> int:
        return self.qweight.shape[1]


def _np(t) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _packed_spec(m) -> LinearSpec:
    """Spec of a QuantLinear/QuantEmbedding; per-channel groups whose width is not a power of two
    are padded to one (codes = zero point, so they encode 0) because MatMulNBits needs it."""
    fmt = m.fmt
    qweight, scales = _np(m.qweight), _np(m.scales).astype(np.float32)
    zeros = None if m.qzeros is None else _np(m.qzeros)
    block = qweight.shape[2] * 8 // fmt.bits
    if block & (block - 1):  # group_size -1 on a width like 576: one group, padded to 1024
        new = 1 << (block - 1).bit_length()
        codes = unpack(qweight, fmt.bits)  # (out, 1, block)
        z = zeros if zeros is not None else np.full(scales.shape, fmt.sym_zero, np.uint8)
        z = np.clip(np.rint(z.astype(np.float32)), 0, fmt.maxq).astype(np.uint8)  # float zeros: nearest code
        pad = np.broadcast_to(z[..., None], (*z.shape, new - block))
        qweight, block = pack(np.concatenate([codes, pad], -1), fmt.bits, pad_odd=True), new
    return LinearSpec(
        out_f=m.out_features,
        in_f=m.in_features,
        qweight=qweight,
        scales=scales,
        zeros=zeros,
        bits=fmt.bits,
        block=block,
        bias=None if getattr(m, "bias", None) is None else _np(m.bias).astype(np.float32),
    )


def linear_spec(modules: list, path: str) -> LinearSpec:
    """The spec of the linears in `modules` with their output rows concatenated (fusion)."""
    from edgellm.quant.modules import PackedMatrix, TiedQuantLinear

    modules = [m.embedding[0] if isinstance(m, TiedQuantLinear) else m for m in modules]
    packed = [isinstance(m, PackedMatrix) for m in modules]
    if any(packed) and not all(packed):
        raise UnsupportedError(f"'{path}' fuses quantized and float layers; quantize the whole model or none of it")
    if all(packed):
        specs = [_packed_spec(m) for m in modules]
        s0 = specs[0]
        if any(
            (s.in_f, s.bits, s.block, None if s.zeros is None else s.zeros.dtype)
            != (s0.in_f, s0.bits, s0.block, None if s0.zeros is None else s0.zeros.dtype)
            for s in specs
        ):
            raise UnsupportedError(f"'{path}' fuses layers quantized with different formats")
        spec = LinearSpec(
            out_f=sum(s.out_f for s in specs),
            in_f=s0.in_f,
            bits=s0.bits,
            block=s0.block,
            qweight=np.concatenate([s.qweight for s in specs]),
            scales=np.concatenate([s.scales for s in specs]),
            zeros=None if s0.zeros is None else np.concatenate([s.zeros for s in specs]),
        )
    else:
        ws = [_np(linear_weight(m)).astype(np.float32) for m in modules]
        spec = LinearSpec(out_f=sum(w.shape[0] for w in ws), in_f=ws[0].shape[1], w=np.concatenate(ws))
    biases = [getattr(m, "bias", None) for m in modules]
    if any(b is not None for b in biases):
        spec.bias = np.concatenate(
            [
                _np(b).astype(np.float32)
                if b is not None
                else np.zeros(m.out_features if hasattr(m, "out_features") else linear_weight(m).shape[0], np.float32)
                for b, m in zip(biases, modules)
            ]
        )
    return spec


# -- emitting ---------------------------------------------------------------------------------


def _quant_initializers(g: Graph, name: str, spec: LinearSpec, opts: Options) -> list[str]:
    """Add (once) the initializers of a packed tensor named `name`: codes, fp16 scales, zero points
    (what the numba runtime reads); their names."""
    fz = spec.zeros is not None and spec.zeros.dtype == np.float16
    if opts.format == "matmulnbits":
        names = [tensor(name, QWEIGHT), tensor(name, SCALES)] + (
            [tensor(name, QZEROS)] if spec.zeros is not None else []
        )
        if names[0] not in g.weights:
            g.weight(names[0], spec.qweight)
            g.weight(names[1], spec.scales.astype(np.float16).reshape(-1))  # exact: stored fp16 values
            if fz:
                g.weight(names[2], spec.zeros.reshape(-1))  # fp16 (out*nb), exact
            elif spec.zeros is not None:
                g.weight(names[2], pack(spec.zeros, spec.bits, pad_odd=True).reshape(-1))
    elif fz:
        raise UnsupportedError(
            f"'{name}' has float zero points, which blocked DequantizeLinear cannot hold; "
            "export with --format matmulnbits"
        )
    else:
        names = [tensor(name, QWEIGHT), tensor(name, SCALES), tensor(name, QZEROS)]
        if names[0] not in g.weights:
            elem = TensorProto.UINT4 if spec.bits == 4 else TensorProto.UINT8
            padded_in = spec.n_blocks * spec.block
            g.weight(names[0], spec.qweight.reshape(spec.out_f, -1), elem, dims=[spec.out_f, padded_in])
            g.weight(names[1], spec.scales.astype(np.float16))
            zeros = spec.zeros if spec.zeros is not None else np.full(spec.scales.shape, 1 << (spec.bits - 1), np.uint8)
            g.weight(names[2], pack(zeros.reshape(-1), spec.bits, pad_odd=True), elem, dims=list(spec.scales.shape))
    return names


def _quant_weights(g: Graph, name: str, spec: LinearSpec, opts: Options) -> list[str]:
    """The initializers of a packed tensor (added once) as its users take them: codes, float32
    scales (a Cast of the fp16 initializer `name.scales`), zero points (float ones Cast too)."""
    names = _quant_initializers(g, name, spec, opts)
    if opts.format == "matmulnbits" and spec.zeros is not None and spec.zeros.dtype == np.float16:
        zkey = f"{names[2]}/float"
        if zkey not in g.memo:
            g.memo[zkey] = g.op("Cast", [names[2]], name=f"{name}/zeros_float", to=TensorProto.FLOAT)
        names[2] = g.memo[zkey]
    key = f"{names[1]}/float"
    if key not in g.memo:
        g.memo[key] = g.op("Cast", [names[1]], name=f"{name}/scales_float", to=TensorProto.FLOAT)
    return [names[0], g.memo[key], *names[2:]]


def _dequantized(g: Graph, name: str, spec: LinearSpec, opts: Options) -> str:
    """QDQ: the (out, in) float tensor DequantizeLinear gives for a packed tensor (memoized, so
    a tied embedding and lm_head share one node)."""
    key = f"{name}/dequantized"
    if key not in g.memo:
        q, s, z = _quant_weights(g, name, spec, opts)
        w = g.op("DequantizeLinear", [q, s, z], name=f"{name}/dequantize", axis=1, block_size=spec.block)
        if spec.n_blocks * spec.block != spec.in_f:
            w = g.op("Slice", [w, g.const([0]), g.const([spec.in_f]), g.const([1])], name=f"{name}/unpad")
        g.memo[key] = w
    return g.memo[key]


def emit_linear(g: Graph, x: str, spec: LinearSpec, path: str, opts: Options, weight_name: str | None = None) -> str:
    """y = x @ W^T (+ b) for x (..., in) -> (..., out). `weight_name` shares another tensor's weights."""
    wname = weight_name or path
    if not spec.quantized:
        if tensor(wname, WEIGHT) not in g.weights:
            g.weight(tensor(wname, WEIGHT), spec.w)
        wt = g.op("Transpose", [tensor(wname, WEIGHT)], name=f"{path}/transpose", perm=[1, 0])
        y = g.op("MatMul", [x, wt], name=f"{path}/matmul")
    elif opts.format == "matmulnbits":
        names = _quant_weights(g, wname, spec, opts)
        ins = [x] + (names if spec.zeros is not None else names[:2])
        y = g.op(
            "MatMulNBits",
            ins,
            name=f"{path}/matmulnbits",
            domain=MS_DOMAIN,
            K=spec.in_f,
            N=spec.out_f,
            bits=spec.bits,
            block_size=spec.block,
            accuracy_level=opts.accuracy_level,
        )
    else:
        w = _dequantized(g, wname, spec, opts)
        y = g.op("MatMul", [x, g.op("Transpose", [w], name=f"{path}/transpose", perm=[1, 0])], name=f"{path}/matmul")
    if spec.bias is not None:
        g.weight(tensor(path, BIAS), spec.bias)
        y = g.op("Add", [y, tensor(path, BIAS)], name=f"{path}/bias")
    return y


def emit_embedding(g: Graph, ids: str, spec: LinearSpec, path: str, opts: Options, tied: bool = True) -> str:
    """Rows of the (vocab, dim) table `path` for int64 ids (batch, seq) -> (batch, seq, dim).
    `tied`: the lm_head will read the same tensors (a packed table then also keeps the fp16
    `P.scales` / packed `P.qzeros` MatMulNBits takes; an untied one holds only what the gather reads)."""
    if not spec.quantized:
        g.weight(tensor(path, WEIGHT), spec.w)
        return g.op("Gather", [tensor(path, WEIGHT), ids], name=f"{path}/gather", axis=0)
    if opts.format == "qdq":
        return g.op("Gather", [_dequantized(g, path, spec, opts), ids], name=f"{path}/gather", axis=0)
    if spec.zeros is not None and spec.zeros.dtype == np.float16:
        raise UnsupportedError(
            f"'{path}': GatherBlockQuantized takes no float zero points; quantize embeddings with integer ones"
        )
    if tied:
        names = _quant_initializers(g, path, spec, opts)[:1]  # the codes (vocab, nb, blob) as they are
    else:
        names = [tensor(path, QWEIGHT)]
        g.weight(names[0], spec.qweight)
    col = (spec.out_f, spec.n_blocks, 1)  # scales / zero points along quantize_axis 2, one per block
    g.weight(tensor(path, GATHER_SCALES), spec.scales.astype(np.float16).astype(np.float32).reshape(col))
    names.append(tensor(path, GATHER_SCALES))
    if spec.zeros is not None:
        g.weight(tensor(path, GATHER_ZEROS), spec.zeros.reshape(col))  # one unpacked code a byte
        names.append(tensor(path, GATHER_ZEROS))
    ins = [names[0], ids, *names[1:]]
    y = g.op(
        "GatherBlockQuantized",
        ins,
        name=f"{path}/gather",
        domain=MS_DOMAIN,
        bits=spec.bits,
        block_size=spec.block,
        gather_axis=0,
        quantize_axis=2,
    )  # (batch, seq, nb, block)
    y = g.op("Reshape", [y, g.const([0, 0, spec.n_blocks * spec.block])], name=f"{path}/join_blocks")
    if spec.n_blocks * spec.block != spec.in_f:
        y = g.op("Slice", [y, g.const([0]), g.const([spec.in_f]), g.const([-1])], name=f"{path}/unpad")
    return y


def embedding_spec(module, path: str) -> LinearSpec:
    from edgellm.quant.modules import QuantEmbedding

    if isinstance(module, QuantEmbedding):
        return _packed_spec(module)
    import torch.nn as nn

    if not isinstance(module, nn.Embedding):  # an Embedding subclass (Gemma's scaled one: features.py scales)
        raise UnsupportedError(f"'{path}' is a {type(module).__name__}, not an embedding edgellm can export")
    w = _np(module.weight).astype(np.float32)
    return LinearSpec(out_f=w.shape[0], in_f=w.shape[1], w=w)


def tensor_bits(model) -> dict[str, int]:
    """Bits of every packed tensor by its name in the export (fused q/k/v and gate/up named as
    the exporters name them), so a reader needs no single model-wide width: a mixed-precision
    plan or 8-bit embeddings beside 4-bit linears. A tied head reads the embedding's entry."""
    from edgellm.quant.modules import PackedMatrix

    out = {}
    for path, m in model.named_modules():
        if isinstance(m, PackedMatrix):
            out[export_name(path)] = m.fmt.bits
    return out


def check_options(opts: Options) -> None:
    if opts.format not in FORMATS:
        raise EdgeLLMError(f"--format {opts.format!r} is not supported; choose one of {', '.join(FORMATS)}")
    if opts.accuracy_level not in (0, 1, 2, 3, 4):
        raise EdgeLLMError(
            f"--accuracy-level {opts.accuracy_level} is invalid; choose 0 (fp32), 1, 2, 3 or 4 (int8 activations)"
        )

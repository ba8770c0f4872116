"""The one walk from an export directory to the tensors a backend runs: validated, then planned.

`plan_export` is what every backend calls (numba CPU, CUDA, ONNX Runtime):

1. `open_export` reads the directory (and checks every file's sha256 with `verify`);
2. `validate_export` checks the metadata and every tensor against it (validate.py);
3. `check_memory` compares what the run will allocate with the memory available;
4. the walk below resolves each tensor's format once (per-tensor bits for 8-bit embeddings and
   mixed plans, zero points unpacked) into a `WeightsPlan` of named records: views into the
   memory-mapped file, nothing copied but the small zero-point tables.

A backend then turns the plan into its own descriptors (model.py: addresses for the numba
kernels; cuda/model.py: offsets in device arrays). Nothing else spells a tensor name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import EdgeLLMError, UnsupportedError
from .format.blocks import MIN_BLOCK, BlockFormat, from_blob, zero_kind, zero_points
from .format.names import (
    BIAS,
    GATHER_SCALES,
    GATHER_ZEROS,
    HEAD,
    QWEIGHT,
    QZEROS,
    ROLES,
    SCALES,
    WEIGHT,
    names_for,
    tensor,
)
from .loader import Export, open_export
from .validate import ModelConfig, Quant, check_memory, layer_norms, validate_export


@dataclass
class LinearPlan:
    """One linear y = x W^T + b as stored: float, or packed (format/blocks.py)."""

    name: str
    n: int  # output features
    k: int  # input features
    weight: np.ndarray  # float (n, k), or packed uint8 (n, nb, blob): a view into the file
    fmt: BlockFormat | None = None  # None: float weights
    scales: np.ndarray | None = None  # (n * nb,) fp16 (fp32: older exports, untied packed embeddings), a view
    zeros: np.ndarray | None = None  # float32 (n, nb) zero points, asymmetric formats only
    stored_zeros: np.ndarray | None = None  # the file's qzeros view (so a backend can drop its pages)
    bias: np.ndarray | None = None  # float32 (n,)

    @property
    def bits(self) -> int:
        return self.fmt.bits if self.fmt else 0

    @property
    def nb(self) -> int:
        return self.weight.shape[1] if self.fmt else 0

    @property
    def bytes_read(self) -> int:
        """Bytes a matrix-vector product reads: the weights and, packed, the fp16 scales."""
        if self.fmt is None:
            return int(self.weight.nbytes)
        return int(self.weight.nbytes + self.n * self.nb * 2)


@dataclass
class Norm:
    weight: np.ndarray  # float32 (H,)
    bias: np.ndarray | None = None  # float32 (H,), LayerNorm only


@dataclass
class LayerPlan:
    linears: dict[str, LinearPlan]  # ROLES -> plan
    norms: dict[str, Norm]  # the roles of validate.layer_norms (format/names.py NORM_ROLES) -> norm
    window: int  # sliding window, 0 = full attention
    rope: str = "global"  # the rotary table: "global" | "local" | "none" (features.py layer_rope)


@dataclass
class WeightsPlan:
    export: Export
    config: ModelConfig
    quant: Quant | None
    n_ctx: int
    layers: list[LayerPlan] = field(default_factory=list)
    embed: LinearPlan | None = None
    head: LinearPlan | None = None  # None: tied to `embed` (one copy in the file)
    final_norm: Norm | None = None
    positions: np.ndarray | None = None  # float32 (max_positions, H) learned positions (gpt2)

    def linears(self):
        """Every decoder linear, then the head (the embedding when tied): what decode reads."""
        for layer in self.layers:
            yield from layer.linears.values()
        yield self.head or self.embed

    @property
    def bytes_per_token(self) -> int:
        return sum(p.bytes_read for p in self.linears())


def linear_inputs(cfg: ModelConfig) -> dict[str, int]:
    """Input width of each linear role of a layer."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    return {"qkv": H, "o": cfg.num_heads * cfg.head_dim, "up": H, "down": I}


def plan_export(
    path,
    *,
    who: str,
    n_ctx: int | None = None,
    kv_itemsize: Callable[[Quant | None], int] = lambda q: 4,
    verify: bool = False,
    walk: bool = True,
    supports: Callable[[ModelConfig, Export], None] | None = None,
    hint: str = "",
) -> WeightsPlan:
    """Open, validate, check memory and (with `walk`) plan the tensors of the export at `path`.
    `who` names the backend in errors ("the numba runtime"); `supports` raises UnsupportedError
    for what that backend cannot run; `hint` ends a refusal (e.g. "; --backend onnxruntime may
    still run it"). The export is closed again when anything fails."""
    ex = open_export(path, verify=verify)
    try:
        cfg = validate_export(ex)
        q = Quant.from_metadata(ex.quantization)
        if supports is not None:
            supports(cfg, ex)
        ctx = min(n_ctx or cfg.max_position_embeddings, cfg.max_position_embeddings)
        check_memory(cfg, ctx, kv_itemsize(q), f"'{path}' on {who}")  # before anything is sized by n_ctx
        plan = WeightsPlan(ex, cfg, q, ctx)
        if walk:
            _Walk(ex, cfg, q, who, hint).fill(plan)
        return plan
    except BaseException:
        ex.close()
        raise


class _Walk:
    def __init__(self, ex: Export, cfg: ModelConfig, q: Quant | None, who: str, hint: str):
        self.ex, self.cfg, self.who, self.hint = ex, cfg, who, hint
        self.bits = q.bits if q else 0
        self.tensor_bits = q.tensor_bits if q else {}  # per packed tensor (8-bit embeddings, mixed plans)
        self.names = names_for(cfg.architecture)

    def fill(self, plan: WeightsPlan):
        cfg, names, ex = self.cfg, self.names, self.ex
        ins = linear_inputs(cfg)
        for i in range(cfg.num_layers):
            plan.layers.append(
                LayerPlan(
                    {role: self.linear(names.linear(i, role), ins[role]) for role in ROLES},
                    {which: self.norm(names.norm(i, which)) for which in layer_norms(cfg)},
                    cfg.sliding_window[i],
                    cfg.features.layer_rope[i] if cfg.position == "rope" else "none",
                )
            )
        plan.embed = self.linear(names.embed, cfg.hidden_size)
        if ex.has(tensor(HEAD, QWEIGHT)) or ex.has(tensor(HEAD, WEIGHT)):
            plan.head = self.linear(HEAD, cfg.hidden_size)
        plan.final_norm = self.norm(names.final_norm)
        if cfg.position == "learned":
            plan.positions = ex.get(names.positions)

    def norm(self, path: str) -> Norm:
        bias = self.ex.get(tensor(path, BIAS)) if self.cfg.norm == "layer" else None
        return Norm(self.ex.get(tensor(path, WEIGHT)), bias)

    def refuse(self, what: str) -> UnsupportedError:
        return UnsupportedError(f"{what} {self.who} reads{self.hint}")

    def linear(self, p: str, k: int) -> LinearPlan:
        ex = self.ex
        bias = ex.get(tensor(p, BIAS)) if ex.has(tensor(p, BIAS)) else None
        if not ex.has(tensor(p, QWEIGHT)):
            wname = tensor(p, WEIGHT)
            w = ex.get(wname)  # raises the "no initializer" error when absent
            if w.ndim != 2 or w.dtype not in (np.float32, np.float16) or w.shape[1] != k:
                raise self.refuse(f"'{wname}' ({w.dtype}, shape {w.shape}) is not a float matrix")
            return LinearPlan(p, w.shape[0], k, w, bias=bias)
        qname = tensor(p, QWEIGHT)
        qw = ex.get(qname)
        bits = int(self.tensor_bits.get(p, self.bits))
        if bits not in (4, 8) or qw.dtype != np.uint8 or qw.ndim != 3:
            raise self.refuse(
                f"'{qname}' ({qw.dtype}, shape {qw.shape}, {bits}-bit) is not a MatMulNBits layout (4 or 8 bits)"
            )
        n, nb, blob = qw.shape
        # an untied packed embedding (exports since 12-07) keeps its scales / zero points only as
        # GatherBlockQuantized reads them: float32 / unpacked uint8 (n, nb, 1) (validate.gather_inputs)
        gathered = not ex.has(tensor(p, SCALES)) and ex.has(tensor(p, GATHER_SCALES))
        zname = tensor(p, GATHER_ZEROS if gathered else QZEROS)
        zp = ex.get(zname) if ex.has(zname) else None
        fmt = from_blob(bits, blob, zero_kind(zp))
        gs = fmt.block
        if gs < MIN_BLOCK or gs & (gs - 1):
            raise UnsupportedError(
                f"'{p}' has blocks of {gs} columns; {self.who} needs a power of two >= {MIN_BLOCK}{self.hint}"
            )
        sname = tensor(p, GATHER_SCALES if gathered else SCALES)
        scales = ex.get(sname).reshape(-1)
        if scales.size != n * nb:
            raise EdgeLLMError(f"'{sname}' has {scales.size} values, expected {n * nb}")
        if not nb * gs - gs < k <= nb * gs:
            raise EdgeLLMError(f"'{qname}' packs {nb * gs} columns but the layer has {k} inputs")
        zeros = (
            None if zp is None else zp.reshape(n, nb).astype(np.float32) if gathered else zero_points(zp, n, nb, bits)
        )
        return LinearPlan(p, n, k, qw, fmt, scales, zeros, zp, bias)

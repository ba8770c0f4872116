"""The one validation pass over an opened export, before anything is sized or any kernel runs.

An export is untrusted input (people download models), and the numba runtime hands raw addresses
to compiled kernels, so nothing in the file is believed until it is checked against everything
else (docs/EXPORT_FORMAT.md):

- the metadata: every key of `edgellm.config` and `edgellm.quantization` has its JSON type and a
  value range (positive dimensions below hard limits, finite epsilons, known enum values);
- every tensor, by name: the exact set of initializers the architecture has (no missing, no
  unknown: a renamed `lm_head.weight` or `*.qzeros` is an error, not a silent fallback), each
  with its dtype and full shape derived from the metadata: embeddings and lm_head rows against
  vocab_size, norms against hidden_size, q/k/v/o from heads x head_dim, MLP widths, biases, the
  GPT-2 position table against the context length, and the packed layouts of quantized weights;
- the small float tensors (norms, biases, quantization scales) are finite;
- so every dimension is bounded by the tensors actually present in the file (the byte ranges
  themselves were checked by loader.open_export).

Every backend calls `validate_export` (through plan.plan_export); what only the numba kernels
cannot do (a norm kind, a rope scaling type, a block size) is checked in model.py, so `--backend
onnxruntime` still runs every valid export the numba backend refuses. `check_memory` then
compares what the run will allocate (KV cache, tables, scratch) with the memory available, before
anything is allocated.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import EdgeLLMError, UnsupportedError
from .features import LLAMA, Features
from .format.dtypes import FLOAT as _FLOAT
from .format.dtypes import FLOAT16 as _HALF
from .format.dtypes import UINT4
from .format.dtypes import UINT8 as _U8
from .format.names import (
    ARCHITECTURES,
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
from .loader import Export
from .rope import kind as rope_kind
from .rope import longrope_of

NORMS, POSITIONS, MLPS = ("rms", "layer"), ("rope", "learned"), ("gated", "plain")
ACTIVATIONS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu")
FORMATS = ("matmulnbits", "qdq")
# Hard limits, far above any model a laptop or Pi runs, far below an int64 overflow in a size product.
LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_layers": 1 << 10,
    "num_heads": 1 << 10,
    "num_kv_heads": 1 << 10,
    "head_dim": 1 << 11,
    "max_position_embeddings": 1 << 24,
}


def _bad(key, value, want) -> EdgeLLMError:
    return EdgeLLMError(f"export metadata 'edgellm.config' has {key} = {value!r}; expected {want}")


def _int(c: dict, key: str, lo: int = 1, hi: int | None = None) -> int:
    if key not in c:
        raise EdgeLLMError(f"export metadata 'edgellm.config' lacks '{key}'")
    v, hi = c[key], LIMITS.get(key) if hi is None else hi
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise _bad(key, v, f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}")
    return v


def _choice(c: dict, key: str, ok: tuple) -> str:
    v = c.get(key)
    if not isinstance(v, str) or v not in ok:
        raise _bad(key, v, f"one of {', '.join(ok)}")
    return v


def _finite(c: dict, key: str, lo: float, hi: float, default=None) -> float:
    v = c.get(key, default)
    if v is None and default is not None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo < v < hi:
        raise _bad(key, v, f"a finite number in ({lo:g}, {hi:g})")
    return float(v)


def _flag(c: dict, key: str) -> bool:
    v = c.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(key, v, "true or false")
    return v


def _token_ids(c: dict, key: str, vocab: int) -> tuple:
    v = c.get(key)
    vals = [] if v is None else v if isinstance(v, list) else [v]
    if len(vals) > 64 or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < vocab for x in vals):
        raise _bad(key, v, f"null, a token id or a list of token ids in [0, {vocab})")
    return tuple(vals)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str  # "rms" | "layer"
    norm_eps: float
    position: str  # "rope" | "learned"
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    activation: str  # "silu" | "gelu_new" | ...
    mlp: str  # "gated" | "plain"
    attention_bias: bool
    tie_word_embeddings: bool
    eos_token_ids: tuple
    bos_token_id: int | None
    sliding_window: tuple  # per layer, 0 = full attention
    features: Features = LLAMA  # the family's per-layer description (features.py)

    @classmethod
    def from_metadata(cls, c) -> "ModelConfig":
        """Every key's type and range; an EdgeLLMError names the key, the value and what it must be."""
        if not isinstance(c, dict):
            raise EdgeLLMError(f"export metadata 'edgellm.config' is a JSON {type(c).__name__}, not an object")
        arch = c.get("architecture")
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise UnsupportedError(
                f"architecture {arch!r} is not one export format 1 describes (supported: {', '.join(ARCHITECTURES)})"
            )
        vocab, layers = _int(c, "vocab_size"), _int(c, "num_layers")
        heads, kv, hd = _int(c, "num_heads"), _int(c, "num_kv_heads"), _int(c, "head_dim")
        if heads % kv:
            raise EdgeLLMError(f"export metadata has num_heads {heads}, not a multiple of num_kv_heads {kv}")
        position = _choice(c, "position", POSITIONS)
        if position == "rope" and hd % 2:
            raise EdgeLLMError(f"export metadata has head_dim {hd}; rotary positions need an even head_dim")
        theta = _finite(c, "rope_theta", 0.0, 1e12, default=10000.0) if position == "rope" else 10000.0
        scaling = c.get("rope_scaling")
        if scaling is not None and (not isinstance(scaling, dict) or len(scaling) > 32):
            raise _bad("rope_scaling", scaling, "null or a JSON object")
        sw = c.get("sliding_window")
        sw = [0] * layers if sw is None else [sw] * layers if isinstance(sw, int) and not isinstance(sw, bool) else sw
        if (
            not isinstance(sw, list)
            or len(sw) != layers
            or any(w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < 2**31) for w in sw)
        ):  # a window past 2**31 overflowed the kernels' int64 records (found by the fuzzer)
            raise _bad(
                "sliding_window",
                c.get("sliding_window"),
                f"null, a window size in [0, 2**31), or a list of {layers} of those or nulls",
            )
        bos = c.get("bos_token_id")
        if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or not 0 <= bos < vocab):
            raise _bad("bos_token_id", bos, f"null or a token id in [0, {vocab})")
        cfg = cls(
            arch,
            vocab,
            _int(c, "hidden_size"),
            _int(c, "intermediate_size"),
            layers,
            heads,
            kv,
            hd,
            _choice(c, "norm", NORMS),
            _finite(c, "norm_eps", 0.0, 1.0),
            position,
            theta,
            scaling,
            _int(c, "max_position_embeddings"),
            _choice(c, "activation", ACTIVATIONS),
            _choice(c, "mlp", MLPS),
            _flag(c, "attention_bias"),
            _flag(c, "tie_word_embeddings"),
            _token_ids(c, "eos_token_id", vocab),
            bos,
            tuple(int(w or 0) for w in sw),
            Features.from_metadata(c, layers=layers, head_dim=hd, position=position, norm=c.get("norm")),
        )
        if position == "rope":  # LongRoPE's factors and switch point (rope.py)
            longrope_of(scaling, cfg.features.rope_dims, cfg.max_position_embeddings)
        return cfg


@dataclass(frozen=True)
class Quant:
    bits: int
    group_size: int  # -1: per channel
    sym: bool
    embeddings: bool
    format: str
    # bits of every packed tensor by name (exports since 8-bit embeddings and mixed plans): when
    # present, each tensor's bits, block size and zero points are its own, checked per tensor
    tensor_bits: dict = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, q) -> "Quant | None":
        if q is None:
            return None
        if not isinstance(q, dict):
            raise EdgeLLMError(
                f"export metadata 'edgellm.quantization' is a JSON {type(q).__name__}, not an object or null"
            )

        def bad(key, want):
            return EdgeLLMError(f"export metadata 'edgellm.quantization' has {key} = {q.get(key)!r}; expected {want}")

        bits, gs = q.get("bits"), q.get("group_size")
        if type(bits) is not int or bits not in (4, 8):  # not 8.0 or true
            raise bad("bits", "4 or 8")
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or 16 <= gs <= 1 << 16):
            raise bad("group_size", "-1 or an integer in [16, 65536]")
        for key in ("sym", "embeddings"):
            if not isinstance(q.get(key, False), bool):
                raise bad(key, "true or false")
        fmt = q.get("format", "matmulnbits")
        if fmt not in FORMATS:
            raise bad("format", " or ".join(FORMATS))
        tb = q.get("tensor_bits") or {}
        if not isinstance(tb, dict) or any(
            not isinstance(k, str) or type(v) is not int or v not in (4, 8) for k, v in tb.items()
        ):
            raise bad("tensor_bits", "an object of tensor names to 4 or 8")
        return cls(bits, gs, q.get("sym", True), bool(q.get("embeddings", False)), fmt, tb)


# ----------------------------------------------------------------------------- tensors
def linear_paths(cfg: ModelConfig) -> dict[str, tuple[int, int, bool]]:
    """{path: (out, in, has bias)} of every decoder linear; the embedding and lm_head apart."""
    H, I, NH, NKV, HD = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv, mlp_up = (NH + 2 * NKV) * HD, (2 * I if cfg.mlp == "gated" else I)
    gpt2 = cfg.architecture == "gpt2"  # GPT-2's Conv1D layers all have biases
    shapes = {
        "qkv": (qkv, H, gpt2 or cfg.attention_bias),
        "o": (H, NH * HD, gpt2),
        "up": (mlp_up, H, gpt2),
        "down": (H, I, gpt2),
    }
    names = names_for(cfg.architecture)
    return {names.linear(i, role): shapes[role] for i in range(cfg.num_layers) for role in ROLES}


def layer_norms(cfg: ModelConfig) -> dict[str, int]:
    """{norm role: width} of the norms each layer has (format/names.py NORM_ROLES), from the
    metadata's norm placement and q/k norm."""
    f, H = cfg.features, cfg.hidden_size
    out = {"attn": H, "mlp": H} if f.pre_norms else {}
    if f.post_norms:
        out.update(attn_out=H, mlp_out=H)
    if f.qk_norm is not None:
        per_head = f.qk_norm == "head"
        out.update(
            q=cfg.head_dim if per_head else cfg.num_heads * cfg.head_dim,
            k=cfg.head_dim if per_head else cfg.num_kv_heads * cfg.head_dim,
        )
    return out


def norm_names(cfg: ModelConfig) -> dict[str, int]:
    """{name: width} of every norm's weight (and bias, for LayerNorm), each float32."""
    names = names_for(cfg.architecture)
    bases = {names.norm(i, r): w for i in range(cfg.num_layers) for r, w in layer_norms(cfg).items()}
    bases[names.final_norm] = cfg.hidden_size
    parts = ("weight", "bias") if cfg.norm == "layer" else ("weight",)
    return {f"{b}.{s}": w for b, w in bases.items() for s in parts}


class _Checker:
    def __init__(self, ex: Export, cfg: ModelConfig, q: Quant | None):
        self.ex, self.cfg, self.q = ex, cfg, q
        self.seen: set[str] = set()

    def info(self, name: str):
        info = self.ex.infos.get(name)
        if info is None:
            raise EdgeLLMError(
                f"'{self.ex.path}' lacks initializer '{name}', which the metadata's model needs "
                "(a damaged export, or metadata that does not match the weights)"
            )
        self.seen.add(name)
        return info

    def tensor(self, name: str, shape: tuple, types: tuple, finite: bool = False):
        info = self.info(name)
        if info.data_type not in types:
            raise EdgeLLMError(
                f"initializer '{name}' has ONNX data type {info.data_type}; expected {' or '.join(map(str, types))} "
                "(1 = float32, 10 = float16, 2 = uint8, 21 = uint4)"
            )
        if info.shape != shape:
            raise EdgeLLMError(f"initializer '{name}' has shape {info.shape}; the metadata implies {shape}")
        if finite and name in self.ex.tensors and not np.isfinite(self.ex.tensors[name]).all():
            raise EdgeLLMError(f"initializer '{name}' holds NaN or infinite values; the export is damaged")

    def linear(self, p: str, n: int, k: int, bias: bool, quantized: bool):
        """A float [n, k] weight, or the packed layout of the quantization format; optional bias [n]."""
        ex, q = self.ex, self.q
        qw, sc, qz, wt = (tensor(p, part) for part in (QWEIGHT, SCALES, QZEROS, WEIGHT))
        if quantized and q is not None and qw in ex.infos:
            bits, fmt, own = q.tensor_bits.get(p, q.bits), q.format, bool(q.tensor_bits)
            qinfo = self.info(qw)
            if fmt == "matmulnbits":
                if len(qinfo.shape) != 3 or qinfo.shape[0] != n or qinfo.shape[2] < 1:
                    raise EdgeLLMError(f"initializer '{qw}' has shape {qinfo.shape}; expected ({n}, n_blocks, blob)")
                nb, blob = qinfo.shape[1], qinfo.shape[2]
                block = blob * 8 // bits
            else:
                if len(qinfo.shape) != 2 or qinfo.shape[0] != n:
                    raise EdgeLLMError(f"initializer '{qw}' has shape {qinfo.shape}; expected ({n}, padded inputs)")
                nb = self.info(sc).shape[-1] if len(self.info(sc).shape) == 2 else 0
                block = qinfo.shape[1] // nb if nb else 0
            if own and (block < 16 or block & (block - 1)):
                raise EdgeLLMError(f"'{p}' is packed in blocks of {block} columns; blocks are powers of two >= 16")
            if not own and q.group_size > 0 and block != q.group_size:
                raise EdgeLLMError(
                    f"'{p}' is packed in blocks of {block} columns; the metadata says group_size {q.group_size}"
                )
            if block < 1 or nb != -(-k // block) or (q.group_size == -1 and nb != 1):
                raise EdgeLLMError(
                    f"'{p}' packs {nb} blocks of {block} columns; its {k} inputs need {-(-k // max(block, 1))}"
                )
            if fmt == "matmulnbits":
                self.tensor(qw, (n, nb, block * bits // 8), (_U8,))
                # an untied packed embedding (exports since 12-07) keeps only its gather_* copies
                gathered = sc not in ex.infos and tensor(p, GATHER_SCALES) in ex.infos
                if not gathered:
                    self.tensor(sc, (n * nb,), (_HALF, _FLOAT), finite=True)  # fp32: exports before 12-01
                needs_zeros = (qz in ex.infos or tensor(p, GATHER_ZEROS) in ex.infos) if own else not q.sym
                if gathered and needs_zeros and tensor(p, GATHER_ZEROS) not in ex.infos:
                    self.info(tensor(p, GATHER_ZEROS))  # the "lacks initializer" error
                if needs_zeros and not gathered:  # per-tensor formats: zero points where asymmetric
                    if self.info(qz).data_type == _HALF:  # float zero points (fp16, one per block)
                        self.tensor(qz, (n * nb,), (_HALF,), finite=True)
                    else:
                        self.tensor(qz, (n * (-(-nb * bits // 8)),), (_U8,))
            else:
                code = UINT4 if bits == 4 else _U8
                self.tensor(qw, (n, nb * block), (code,))
                self.tensor(sc, (n, nb), (_HALF, _FLOAT), finite=True)
                self.tensor(qz, (n, nb), (code,))
        else:
            if wt not in ex.infos and qw in ex.infos:
                raise EdgeLLMError(f"'{p}' is quantized, but the metadata says the model is not (edgellm.quantization)")
            self.tensor(wt, (n, k), (_FLOAT, _HALF))
        if bias:
            self.tensor(tensor(p, BIAS), (n,), (_FLOAT,), finite=True)

    def gather_inputs(self, p: str, bits: int, tied: bool):
        """A packed embedding's GatherBlockQuantized inputs (exports since 2026-12-07; older ones
        reshape in the graph): float32 scales and uint8 zero points (n, n_blocks, 1), each equal to
        `P.scales` / `P.qzeros` where the file also holds those (a tied head's MatMulNBits reads
        them), so every backend computes one table."""
        ex, gs, gz = self.ex, tensor(p, GATHER_SCALES), tensor(p, GATHER_ZEROS)
        qw, sc, qz = (tensor(p, part) for part in (QWEIGHT, SCALES, QZEROS))
        if gs not in ex.infos:
            if gz in ex.infos:
                raise EdgeLLMError(f"'{ex.path}' has '{gz}' without '{gs}' (a damaged export)")
            return
        self.info(gs)  # seen, so an error below names it rather than calling it unknown
        if self.q is None or self.q.format != "matmulnbits" or qw not in ex.infos:
            raise EdgeLLMError(f"'{ex.path}' has '{gs}', but '{p}' is not packed in the MatMulNBits layout")
        n, nb = ex.infos[qw].shape[:2]
        self.tensor(gs, (n, nb, 1), (_FLOAT,), finite=True)
        if tied:  # the head's MatMulNBits reads the fp16 scales (and packed zero points)
            self.info(sc)
        if sc in ex.tensors and gs in ex.tensors:
            if not np.array_equal(ex.tensors[gs].reshape(-1), ex.tensors[sc].astype(np.float32).reshape(-1)):
                raise EdgeLLMError(f"initializer '{gs}' differs from '{sc}'; the export is damaged")
        if qz in ex.infos and ex.infos[qz].data_type != _U8 and gz not in ex.infos:
            raise EdgeLLMError(f"'{p}' has float zero points, which GatherBlockQuantized cannot take (damaged)")
        if qz in ex.infos and ex.infos[qz].data_type == _U8 and gz not in ex.infos:
            self.info(gz)  # the "lacks initializer" error: the gather would ignore the zero points
        if gz in ex.infos:
            self.tensor(gz, (n, nb, 1), (_U8,))
            if gz in ex.tensors and int(ex.tensors[gz].max(initial=0)) >= 1 << bits:
                raise EdgeLLMError(f"initializer '{gz}' holds zero points over {bits} bits; the export is damaged")
            if gz in ex.tensors and qz in ex.tensors:
                packed = ex.tensors[qz].reshape(n, -1)
                codes = packed if bits == 8 else np.stack([packed & 15, packed >> 4], -1).reshape(n, -1)
                if not np.array_equal(ex.tensors[gz].reshape(n, nb), codes[:, :nb]):
                    raise EdgeLLMError(f"initializer '{gz}' differs from '{qz}'; the export is damaged")


def validate_export(ex: Export) -> ModelConfig:
    """Validate the metadata and every tensor of `ex` (see the module docstring); its config."""
    cfg = ModelConfig.from_metadata(ex.config)
    q = Quant.from_metadata(ex.quantization)
    c = _Checker(ex, cfg, q)
    if cfg.architecture == "gpt2":
        if cfg.num_heads * cfg.head_dim != cfg.hidden_size or cfg.num_kv_heads != cfg.num_heads:
            raise EdgeLLMError(
                f"export metadata: GPT-2 needs num_heads x head_dim = hidden_size and num_kv_heads = num_heads "
                f"(got {cfg.num_heads} x {cfg.head_dim}, {cfg.hidden_size}, {cfg.num_kv_heads})"
            )
        if cfg.position != "learned" or cfg.norm != "layer" or cfg.mlp != "plain":
            raise EdgeLLMError("export metadata: GPT-2 has learned positions, LayerNorm and a plain MLP")
        c.tensor(names_for("gpt2").positions, (cfg.max_position_embeddings, cfg.hidden_size), (_FLOAT,))
    else:
        if cfg.position != "rope":
            raise EdgeLLMError(
                f"export metadata: architecture {cfg.architecture} has rotary positions, not {cfg.position!r}"
            )
    for p, (n, k, bias) in linear_paths(cfg).items():
        c.linear(p, n, k, bias, quantized=True)
    for name, width in norm_names(cfg).items():
        c.tensor(name, (width,), (_FLOAT,), finite=True)
    emb = names_for(cfg.architecture).embed
    embedded = q is not None and q.embeddings
    c.linear(emb, cfg.vocab_size, cfg.hidden_size, False, quantized=embedded)
    tied = not any(n.startswith(f"{HEAD}.") and n != f"{HEAD}.bias" for n in ex.infos)
    c.gather_inputs(emb, q.tensor_bits.get(emb, q.bits) if q is not None else 8, tied)
    if any(n.startswith(f"{HEAD}.") and n != f"{HEAD}.bias" for n in ex.infos):
        c.linear(HEAD, cfg.vocab_size, cfg.hidden_size, f"{HEAD}.bias" in ex.infos, quantized=embedded)
    else:
        if not cfg.tie_word_embeddings:
            raise EdgeLLMError(
                f"'{ex.path}' has no lm_head tensors, but the metadata says the head is not tied to the embeddings"
            )
        if f"{HEAD}.bias" in ex.infos:
            c.tensor(f"{HEAD}.bias", (cfg.vocab_size,), (_FLOAT,), finite=True)
    unknown = sorted(set(ex.infos) - c.seen)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise EdgeLLMError(
            f"'{ex.path}' has initializers the metadata's model does not use: {', '.join(unknown[:3])}{more} "
            "(a damaged export, or metadata that does not match the weights)"
        )
    return cfg


# ----------------------------------------------------------------------------- memory
def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def run_bytes(cfg: ModelConfig, n_ctx: int, kv_itemsize: int, chunk: int = 128) -> dict[str, int]:
    """What a run of n_ctx positions allocates besides the (memory-mapped) weights, by part."""
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    t = min(chunk, n_ctx)
    tables = 6 if rope_kind(cfg.rope_scaling) == "longrope" else 4  # cos, sin: global, local (LongRoPE: + long)
    return {
        "KV cache": 2 * cfg.num_layers * cfg.num_kv_heads * n_ctx * cfg.head_dim * kv_itemsize,
        "rope tables": tables * n_ctx * (cfg.features.rope_dims // 2) * 4 if cfg.position == "rope" else 0,
        "scratch": 4
        * t
        * (4 * cfg.hidden_size + qkv + 3 * cfg.intermediate_size + cfg.num_heads * (cfg.head_dim + n_ctx))
        + 4 * cfg.vocab_size * t,
    }


def check_memory(cfg: ModelConfig, n_ctx: int, kv_itemsize: int, what: str = "this run") -> int:
    """Compare what `run_bytes` needs with the memory available, before anything is allocated;
    an EdgeLLMError says how much is needed and how to need less. Returns the bytes needed."""
    parts = run_bytes(cfg, n_ctx, kv_itemsize)
    need = sum(parts.values())
    avail = available_memory()
    if avail is not None and need > avail:
        mib = 1 << 20
        detail = ", ".join(f"{k} {v / mib:,.0f} MiB" for k, v in parts.items() if v)
        raise EdgeLLMError(
            f"{what} needs {need / mib:,.0f} MiB for a context of {n_ctx} tokens ({detail}) but only "
            f"{avail / mib:,.0f} MiB is available; give a smaller --ctx"
        )
    return need

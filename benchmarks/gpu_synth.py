"""Random-weight exports for GPU speed runs, without ONNX tooling or big files on the GPU machine.

    python -m edgellm.benchmarks.gpu_synth skeleton SHAPE OUT_DIR   # here: model.onnx, no weights
    python -m edgellm.benchmarks.gpu_synth fill OUT_DIR [--seed 0]  # there: write model.onnx.data

`skeleton` writes what the numba runtime reads from an export of a 4-bit (group 32, symmetric,
embeddings quantized) llama of a named shape (SHAPES): `model.onnx` with the edgellm metadata
and the initializer table (names, shapes, offsets into model.onnx.data, 64-byte aligned, as
`edgellm export` lays them out) but no graph nodes (ONNX Runtime cannot run it; the numba
runtime, CPU or CUDA, never reads the nodes), plus a word-level tokenizer. It is a few KB and
travels with the working tree. `fill` writes every tensor at its offset: random codes, scales
that keep activations at unit scale (1 / (4.6 sqrt(k)) for 4-bit codes), norms of 1. Speed
depends only on the shapes; the values are random, so quality figures from these files mean
nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

# hidden, intermediate, layers, heads, kv heads, vocab, context, tied (SmolLM2-135M; TinyLlama-1.1B)
SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, 8192, True),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000, 2048, False),
}
GS, BITS = 32, 4
ALIGN = 64


def _tensors(shape: str):
    """(name, ONNX data type, dims) of every initializer, in export order (names from
    runtime/format/names.py, the one place tensor names are spelled)."""
    from edgellm.runtime.format.dtypes import FLOAT, UINT8
    from edgellm.runtime.format.names import HEAD, QWEIGHT, SCALES, WEIGHT, names_for, tensor

    h, inter, layers, heads, kv, vocab, _, tied = SHAPES[shape]
    hd = h // heads
    names = names_for("llama")

    def linear(path, n, k):
        nb = -(-k // GS)
        return [(tensor(path, QWEIGHT), UINT8, (n, nb, GS * BITS // 8)), (tensor(path, SCALES), FLOAT, (n * nb,))]

    def norm(path):
        return [(tensor(path, WEIGHT), FLOAT, (h,))]

    out = linear(names.embed, vocab, h)
    for i in range(layers):
        out += norm(names.norm(i, "attn")) + linear(names.linear(i, "qkv"), (heads + 2 * kv) * hd, h)
        out += linear(names.linear(i, "o"), h, heads * hd) + norm(names.norm(i, "mlp"))
        out += linear(names.linear(i, "up"), 2 * inter, h) + linear(names.linear(i, "down"), h, inter)
    out += norm(names.final_norm)
    if not tied:
        out += linear(HEAD, vocab, h)
    return out


def skeleton(shape: str, out: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    h, inter, layers, heads, kv, vocab, ctx, tied = SHAPES[shape]
    config = {
        "architecture": "llama",
        "vocab_size": vocab,
        "hidden_size": h,
        "intermediate_size": inter,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv,
        "head_dim": h // heads,
        "norm": "rms",
        "norm_eps": 1e-5,
        "position": "rope",
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": ctx,
        "activation": "silu",
        "mlp": "gated",
        "attention_bias": False,
        "sliding_window": None,
        "tie_word_embeddings": tied,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    quant = {
        "bits": BITS,
        "group_size": GS,
        "sym": True,
        "method": "random",
        "embeddings": True,
        "format": "matmulnbits",
    }
    inits, off = [], 0
    for name, dt, dims in _tensors(shape):
        n = int(np.prod(dims)) * (1 if dt == 2 else 4)
        t = TensorProto(name=name, data_type=dt, dims=list(dims), data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "model.onnx.data"), ("offset", str(off)), ("length", str(n))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)
        off += -(-n // ALIGN) * ALIGN
    model = helper.make_model(helper.make_graph([], f"synthetic-{shape}", [], [], initializer=inits))
    for key, value in (
        ("edgellm.format_version", "1"),
        ("edgellm.config", json.dumps(config)),
        ("edgellm.quantization", json.dumps(quant)),
        ("edgellm.synthetic", f"random weights of the {shape} shape; no graph nodes (numba runtime only)"),
    ):
        helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, key: value})
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    _tokenizer(out, vocab)
    (out / "SYNTHETIC.json").write_text(
        json.dumps({"shape": shape, "data_bytes": off, "note": "run gpu_synth fill before use"})
    )


def _tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer with `vocab` entries (the speed runs feed token ids directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t0"})
    )


def fill(out: Path, seed: int = 0) -> int:
    from edgellm.runtime.format.names import QWEIGHT, QZEROS, SCALES
    from edgellm.runtime.loader import DATA_NAME, ONNX_NAME
    from edgellm.runtime.onnx_proto import EXTERNAL, read_model

    _, inits = read_model((out / ONNX_NAME).read_bytes())
    ext = [t for t in inits if t.data_location == EXTERNAL]
    size = max(int(t.external.get("offset", 0)) + int(t.external["length"]) for t in ext)
    rng = np.random.default_rng(seed)
    k_of = {}  # columns per row of each linear, from its qweight (n, blocks, bytes)
    for t in ext:
        path, _, part = t.name.rpartition(".")
        if part == QWEIGHT:
            k_of[path] = int(t.dims[1]) * int(t.dims[2]) * 2
    tmp = out / (DATA_NAME + ".tmp")  # a temporary sibling, renamed at the end
    with open(tmp, "wb") as f:
        f.truncate(size)
        mm = np.memmap(tmp, np.uint8, "r+", shape=(size,))
        for t in ext:
            off, n = int(t.external.get("offset", 0)), int(t.external["length"])
            view = mm[off : off + n]
            name = t.name
            path, _, part = name.rpartition(".")
            if part in (QWEIGHT, QZEROS):
                view[:] = rng.integers(0, 256, n, dtype=np.uint8)
            elif part == SCALES:
                k = k_of.get(path, 1024)
                view.view(np.float32)[:] = np.float32(1.0 / (4.6 * math.sqrt(k)))
            elif name.endswith("norm.weight") or "layernorm" in name:
                view.view(np.float32)[:] = 1.0
            elif name.endswith(".bias"):
                view[:] = 0
            else:  # float weights (fp32, or fp16: ONNX data type 10)
                dt = np.float16 if t.data_type == 10 else np.float32
                view.view(dt)[:] = rng.normal(0, 0.02, n // np.dtype(dt).itemsize).astype(dt)
        mm.flush()
        del mm
    os.replace(tmp, out / DATA_NAME)
    return size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_synth", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("skeleton")
    s.add_argument("shape", choices=sorted(SHAPES))
    s.add_argument("out", type=Path)
    f = sub.add_parser("fill")
    f.add_argument("out", type=Path)
    f.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "skeleton":
        skeleton(a.shape, a.out)
        print(f"{a.out}: skeleton of {a.shape}", file=sys.stderr)
    else:
        n = fill(a.out, a.seed)
        print(f"{a.out}: wrote {n / 2**20:.0f} MiB of random weights", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A packed 4-bit checkpoint of a real model shape with random codes, to measure `edgellm export`
and `edgellm run` on shapes whose quantize takes hours on a 2-core machine (issue 26), not in CI.

    python -m edgellm.benchmarks.scripts.stream_export --shape llama-3.1-8b --out DIR \
        --like tinyllama-q4/          # a quantize output whose edgellm.json options to copy
    /usr/bin/time -v edgellm export DIR -o DIR-onnx
    /usr/bin/time -v edgellm run DIR-onnx -p "Hello" -n 16

The checkpoint is exactly what `edgellm quantize` writes for that shape and those options (the
same tensor names, dtypes and shapes, one model.safetensors, the edgellm.json "quantization"
entry), with uniformly random codes, fp16 scales of a 0.02-std weight and unit norms; it is
written a tensor at a time, so building an 8B one needs little memory. Random codes: the numbers
measure memory and time, not quality.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgellm.runtime.format.names import SCALES

from .stream_quantize import SHAPES, _tokenizer, config_for

_DT = {"uint8": "U8", "float16": "F16", "float32": "F32"}


def build_packed(shape: str, out: Path, like: Path, seed: int = 0) -> Path:
    """The packed checkpoint of `shape` in `out`, with the quantization options of `like`'s edgellm.json."""
    import torch

    from edgellm.arch import decoder_layers, family_of
    from edgellm.checkpoint import meta_model
    from edgellm.quant.apply import swap_for_loading

    like_record = json.loads((Path(like) / "edgellm.json").read_text())
    info = dict(like_record["quantization"])
    cfg = config_for(shape)
    cfg.dtype = "float32"
    model = meta_model(cfg)
    n = cfg.num_hidden_layers
    first = f"{family_of(cfg).layers}.0."  # the layer list's path, e.g. model.layers
    layer_mods = [m[len(first) :] for m in info["modules"] if m.startswith(first)]
    info["modules"] = [f"{first[:-2]}{i}.{m}" for i in range(n) for m in layer_mods]
    info["tied"] = bool(cfg.tie_word_embeddings)
    info.pop("formats", None)
    with torch.device("meta"):
        swap_for_loading(model, info, torch.float32)
    assert len(decoder_layers(model)) == n
    entries = [(k, str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in model.state_dict().items()]
    if info["tied"]:
        entries = [e for e in entries if not e[0].startswith("lm_head.")]
    out.mkdir(parents=True, exist_ok=True)
    header, offset = {"__metadata__": {"format": "pt", "edgellm": "packed"}}, 0
    for name, dt, shp in entries:
        size = int(np.prod(shp)) * np.dtype(dt).itemsize
        header[name] = {"dtype": _DT[dt], "shape": list(shp), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    tmp = out / "model.safetensors.tmp"
    with open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name, dt, shp in entries:
            if dt == "uint8":
                arr = rng.integers(0, 256, size=shp, dtype=np.uint8)
            elif name.rpartition(".")[2] == SCALES:
                arr = np.full(shp, 0.02 / 4, np.float16)  # ~ a 0.02-std weight on a 4-bit grid
            else:
                arr = np.ones(shp, np.dtype(dt))  # norms (and any bias: 1s are as good as any)
            fh.write(arr.tobytes())
    tmp.rename(out / "model.safetensors")
    cfg.save_pretrained(str(out))
    _tokenizer(out)
    record = {**like_record, "source": {"kind": "synthetic", "shape": shape}, "quantization": info}
    (out / "edgellm.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--like", type=Path, required=True, help="a quantize output whose options to copy")
    a = ap.parse_args()
    print(build_packed(a.shape, a.out, a.like))


if __name__ == "__main__":
    main()

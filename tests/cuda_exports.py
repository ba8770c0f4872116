"""The tiny exports of tests/cuda_suite.py (hidden 32: the CUDA simulator pays per element), built
with edgellm quantize + export. `python tests/cuda_exports.py DIR` builds them into DIR for a GPU
machine without ONNX tooling (benchmarks/gpu_prepare.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
TRAIN_STEPS = 300
RTN = ["--method", "rtn", "--quantize-embeddings"]
VARIANTS = {  # edgellm quantize options per export (f32: not quantized)
    "q4": ["--bits", "4", "--group-size", "16", "--sym", *RTN],
    "q8a": ["--bits", "8", "--group-size", "16", "--asym", *RTN],
    "f32": [],
    # the way a user quantizes, default options: GPTQ, groups of 128, embeddings at 8 bits inside a
    # 4-bit export (`tensor_bits` in the metadata: the file the CUDA path once misread), and a
    # mixed-precision plan (per-layer bits, group sizes and zero points); llama only
    "q4-default": ["--bits", "4"],
    "bpw": ["--target-bpw", "5"],
}
USER_VARIANTS = ("q4-default", "bpw")


def build_exports(root: Path, tokenizer) -> dict:
    """Tiny exports (hidden 32: the simulator pays per element) through edgellm quantize + export;
    the llama is trained for TRAIN_STEPS steps first."""
    from typer.testing import CliRunner

    import tiny
    from edgellm.cli import app

    out = {}
    models = {"llama": tiny.build("llama", **SMALL), "gpt2": tiny.build("gpt2", n_embd=32, n_layer=2, n_head=2)}
    # trained briefly: a random tiny model's top-2 logits often lie closer than fp16 and int8
    # activations differ (1e-3 here), and greedy parity would test ties, not the kernels
    tiny.train(models["llama"], tokenizer, steps=TRAIN_STEPS)
    for fam, m in models.items():
        src = tiny.save(m, tokenizer, root / fam)
        for var, qargs in VARIANTS.items():
            if fam == "gpt2" and var != "q4":
                continue
            model = src
            if qargs:
                model = root / f"{fam}-{var}"
                r = CliRunner().invoke(
                    app,
                    [
                        "quantize",
                        str(src),
                        *qargs,
                        "--no-eval",
                        "-o",
                        str(model),
                        "--force",
                    ],
                )
                assert r.exit_code == 0, r.output
            r = CliRunner().invoke(
                app, ["export", str(model), "-o", str(root / f"{fam}-{var}-onnx"), "--no-check", "--force"]
            )
            assert r.exit_code == 0, r.output
            out[fam, var] = root / f"{fam}-{var}-onnx"
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    dest = Path(sys.argv[1])
    dest.mkdir(parents=True, exist_ok=True)
    for key, path in build_exports(dest, tiny.make_tokenizer(dest / "tokenizer")).items():
        print("-".join(key), path)

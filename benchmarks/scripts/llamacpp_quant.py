"""llama.cpp's own quantizer against edgellm quantize, on one fp32 base (issue 12).

    python -m edgellm.benchmarks.scripts.llamacpp_quant --work GGUF_DIR \
        --edgellm Q4_MODEL_DIR MIXED_MODEL_DIR --out benchmarks/results/llamacpp_quant_smollm2.md

Run it alone (nothing else busy on the machine).

1. The base: builtin:smollm2 ships as Q4_1; every tensor is dequantized to fp32 (gguf-py's
   dequantize) and written, with all of the file's metadata and tokenizer, as an F32 GGUF. That is
   the same fp32 model edgellm loads (transformers dequantizes the same file). Because those
   weights sit on Q4_1's grid, `--base DIR --data FILE` compares on a model trained here instead
   (edgellm.benchmarks.scripts.train_small: a Hugging Face llama directory, converted as llama.cpp does).
2. llama.cpp quantizes that F32 file itself (llama_model_quantize): Q4_0, Q4_K_M, Q5_K_M, Q8_0.
   (No importance matrix: the binding exposes no way to compute one.)
3. Every model is scored on the same token windows of the held-out split (edgellm.evaluate's
   windows, ctx 512): perplexity, and KL / top-1 agreement against the fp32 torch model. llama.cpp
   models run through edgellm.benchmarks.backends.LlamaCppBackend; edgellm model directories in torch
   (they compute from exactly the stored codes). Sizes: the .gguf file; for edgellm its
   model.safetensors (packed codes, scales, norms) and, when given, the exported ONNX data.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from edgellm.benchmarks.scripts._common import llama_quantize, write_table

QUANTS = {
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",  # the builtin base's own grid: shows what reproducing it is worth
}


def write_f32_gguf(src: Path, dst: Path) -> None:
    """Copy `src` with every tensor dequantized to float32 (metadata and tokenizer unchanged)."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"]
    arch = bytes(arch.parts[arch.data[0]]).decode()
    w = gguf.GGUFWriter(str(dst), arch=arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = f.types[0]
        if name == "general.file_type":
            w.add_uint32(name, int(gguf.LlamaFileType.ALL_F32))
            continue
        if vt == gguf.GGUFValueType.ARRAY:
            sub = f.types[1] if len(f.types) > 1 else None
            if sub == gguf.GGUFValueType.STRING:
                vals = [bytes(f.parts[i]).decode("utf-8", errors="surrogateescape") for i in f.data]
            else:
                vals = [f.parts[i].tolist()[0] for i in f.data]
            w.add_array(name, vals)
        elif vt == gguf.GGUFValueType.STRING:
            w.add_string(name, bytes(f.parts[f.data[0]]).decode("utf-8", errors="surrogateescape"))
        else:
            w.add_key_value(name, f.parts[f.data[0]].tolist()[0], vt)
    for t in r.tensors:
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(t.shape.tolist())]  # gguf lists dims fastest-first
        w.add_tensor(t.name, arr.reshape(shape), raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_f32_gguf_from_hf(src: Path, dst: Path) -> None:
    """An F32 GGUF of a Hugging Face llama directory (e.g. scripts/train_small.py's model), as
    llama.cpp's converter writes it (scripts/hf_to_gguf.py: q/k rows permuted to llama.cpp's rotary
    layout, a tied lm_head stored once as token_embd). The vocabulary is llama.cpp's placeholder
    (scoring feeds token ids, never text); its size and the BOS/EOS ids are the model's."""
    from edgellm.benchmarks.scripts.hf_to_gguf import write_gguf

    c = json.loads((src / "config.json").read_text())
    if c.get("model_type") != "llama":
        raise SystemExit(f"{src}: only llama directories are converted here (got {c.get('model_type')!r})")
    write_gguf(src, dst, placeholder_vocab=True)


def score(logits_fn, ids, wins, ref_cache) -> dict:
    """Perplexity, KL to the reference log-probs in ref_cache (filled on the first call), top-1."""
    import torch

    nll = kl = agree = count = 0.0
    fill = not ref_cache
    for start, end, first in wins:
        x = ids[start:end]
        logp = torch.log_softmax(torch.as_tensor(logits_fn(x)).float()[first:-1], -1)
        target = torch.as_tensor(x[first + 1 :])
        nll += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
        if fill:
            ref_cache[(start, end)] = logp
        ref = ref_cache[(start, end)]
        kl += (ref.exp() * (ref - logp)).sum().item()
        agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
    return {"ppl": math.exp(nll / count), "kl": kl / count, "top1": agree / count, "tokens": int(count)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the GGUF files (kept for reuse)")
    ap.add_argument("--edgellm", nargs="*", default=[], help="edgellm quantized model directories to score beside them")
    ap.add_argument("--onnx", nargs="*", default=[], help="their exports, same order, for the exported size (optional)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quants", default="F32," + ",".join(QUANTS), help="llama.cpp files to score (all are written)")
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--base",
        default="builtin:smollm2",
        help="the fp32 base: builtin:smollm2 (its GGUF dequantized) or a Hugging Face llama directory",
    )
    ap.add_argument("--data", help="text whose held-out split is scored (default: builtin:pydoc)")
    args = ap.parse_args(argv)

    import torch

    from edgellm.benchmarks.backends import LlamaCppBackend
    from edgellm.data import load_text, split_tokens, token_ids
    from edgellm.evaluate import DEFAULT_CTX, windows
    from edgellm.modelio import load_model, resolve_spec

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    builtin = args.base == "builtin:smollm2"
    stem = "smollm2" if builtin else Path(args.base).name
    f32 = args.work / f"{stem}-f32.gguf"
    if not f32.is_file():
        if builtin:
            write_f32_gguf(Path(resolve_spec(args.base)), f32)
        else:
            write_f32_gguf_from_hf(Path(args.base), f32)
    for kind in QUANTS:
        q = args.work / f"{stem}-{kind}.gguf"
        if not q.is_file():
            llama_quantize(f32, q, QUANTS[kind], args.threads)

    ref = load_model(args.base)
    ids = split_tokens(token_ids(ref.tokenizer, load_text(args.data)), "eval")[: args.eval_tokens].tolist()
    wins = windows(len(ids), DEFAULT_CTX, DEFAULT_CTX)
    cache: dict = {}

    def torch_logits(model):
        def f(x):
            with torch.inference_mode():
                return model(input_ids=torch.tensor([x]), use_cache=False).logits[0]

        return f

    rows = [{"model": "fp32 (torch, reference)", "bytes": None, **score(torch_logits(ref.model), ids, wins, cache)}]
    print(json.dumps(rows[-1]), flush=True)
    for kind in [k for k in args.quants.split(",") if k and k != "none"]:
        path = f32 if kind == "F32" else args.work / f"{stem}-{kind}.gguf"
        b = LlamaCppBackend(str(path), args.threads, n_ctx=DEFAULT_CTX)
        b.n_ctx_needed = DEFAULT_CTX
        b.load(logits_all=True)
        t0 = time.perf_counter()
        rows.append(
            {
                "model": f"llama.cpp {kind}",
                "bytes": path.stat().st_size,
                **score(b.logits, ids, wins, cache),
                "time_s": round(time.perf_counter() - t0, 1),
            }
        )
        b.close()
        print(json.dumps(rows[-1]), flush=True)
    del ref
    for i, d in enumerate(args.edgellm):
        m = load_model(d)
        q = json.loads((Path(d) / "edgellm.json").read_text())["quantization"]
        row = {
            "model": f"edgellm {Path(d).name}",
            "bytes": (Path(d) / "model.safetensors").stat().st_size,
            "bpw": q.get("bits_per_weight"),
            **score(torch_logits(m.model), ids, wins, cache),
        }
        if i < len(args.onnx):
            row["onnx_bytes"] = sum(p.stat().st_size for p in Path(args.onnx[i]).glob("model.onnx*"))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del m
    what = "SmolLM2-135M (fp32 = the builtin Q4_1 file dequantized)" if builtin else f"{args.base} (fp32)"
    lines = [
        f"{what}, {rows[0]['tokens']} held-out tokens of {args.data or 'builtin:pydoc'}, ctx {DEFAULT_CTX}; "
        "KL and top-1 against the fp32 torch model.",
        "",
        "| model | file (MB) | bits/weight (linears) | perplexity | Δ ppl | KL (nats/token) | top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = rows[0]["ppl"]
    for r in rows:
        size = r.get("onnx_bytes") or r["bytes"]
        lines.append(
            f"| {r['model']} | {'' if size is None else f'{size / 1e6:.1f}'} | {r.get('bpw') or ''} | {r['ppl']:.3f} | "
            f"{(r['ppl'] / base - 1) * 100:+.2f}% | {r['kl']:.4f} | {r['top1'] * 100:.2f}% |"
        )
    write_table("\n".join(lines), rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

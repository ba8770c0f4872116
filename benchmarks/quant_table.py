"""Quantization quality table: perplexity, KL and top-1 agreement of every edgellm quantize
variant against the unquantized model (issue 2).

    python benchmarks/quant_table.py /work/models/smollm2-fp32 --calib-samples 32 --eval-tokens 4096

Each variant is quantized from the same fp32 model with the same calibration windows and scored
on the same held-out windows (edgellm.evaluate protocol); the reference's log-probabilities are
computed once and reused. Prints a Markdown table (and writes it with --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import date

import torch

from edgellm.data import builtin_text, calibration_batch, split_tokens, token_ids
from edgellm.evaluate import evaluate
from edgellm.modelio import load_model
from edgellm.quant.apply import QuantConfig, quantize_model
from edgellm.quant.formats import QuantFormat

VARIANTS = [(8, 128, True, "rtn")] + [
    (4, g, sym, m) for g in (32, 128) for sym in (True, False) for m in ("rtn", "gptq", "awq")
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated variant indexes to run (default: all)")
    ap.add_argument("--out", help="write the Markdown table (and a .json beside it) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ref = load_model(args.model)
    ids = token_ids(ref.tokenizer, builtin_text())
    calib = calibration_batch(ids, args.calib_samples, args.seq_len)
    eval_ids = split_tokens(ids, "eval")
    cache: dict = {}
    base = evaluate(ref.model, eval_ids, max_tokens=args.eval_tokens)
    rows = [{"variant": "fp32 (reference)", "ppl": base.perplexity, "kl": 0.0, "top1": 1.0, "time_s": 0.0}]
    chosen = VARIANTS if not args.only else [VARIANTS[int(i)] for i in args.only.split(",")]
    for bits, g, sym, method in chosen:
        model = copy.deepcopy(ref.model)
        cfg = QuantConfig(fmt=QuantFormat(bits, g, sym), method=method)
        t0 = time.perf_counter()
        quantize_model(model, cfg, calib)
        secs = time.perf_counter() - t0
        q = evaluate(model, eval_ids, reference=ref.model, reference_cache=cache, max_tokens=args.eval_tokens)
        rows.append({"variant": f"{bits}-bit {method} g{g} {'sym' if sym else 'asym'}", "ppl": q.perplexity,
                     "kl": q.kl, "top1": q.top1, "time_s": secs})
        print(json.dumps(rows[-1]), flush=True)
        del model
    lines = [
        f"Quantization quality, {args.model} (linear layers; embeddings kept), {date.today()}, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}; calibration "
        f"{calib.shape[0]}x{calib.shape[1]} tokens, eval {base.tokens} held-out tokens (ctx {base.ctx}, stride {base.stride}).",
        "",
        "| variant | perplexity | Δ ppl | KL (nats/token) | top-1 agreement | quantize time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ppl']:.3f} | {(r['ppl'] / base.perplexity - 1) * 100:+.2f}% | "
                     f"{r['kl']:.4f} | {r['top1'] * 100:.2f}% | {r['time_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

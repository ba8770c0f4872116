"""Size-quality table of every edgellm quantize variant, with its Pareto front and a plot (issue 12).

    python -m edgellm.benchmarks.scripts.quant_table MODEL_DIR --data MODEL_DIR/corpus.txt \
        --out benchmarks/results/quant_stdlib.md

MODEL_DIR: an fp32 model directory, e.g. the one edgellm.benchmarks.scripts.train_small writes.

Each variant is quantized from the same fp32 model with the same calibration windows and scored
on the same held-out windows (edgellm.evaluate protocol: perplexity, KL and top-1 agreement
against the fp32 model, whose log-probabilities are computed once). Size is the saved
model.safetensors (codes, scales, embeddings, norms); bits/weight is that of the decoder blocks'
linears (apply.bits_per_weight). A row is on the Pareto front when no other variant is both no
larger and lower in KL. Writes the Markdown table (--out), a .json and a .png plot beside it, and
a small .html page holding both.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

from edgellm.benchmarks.scripts._common import write_table

# name: (bits, group, sym, method, extra QuantConfig fields)
VARIANTS = {
    "8-bit rtn g128": (8, 128, True, "rtn", {}),
    "4-bit rtn g128": (4, 128, True, "rtn", {}),
    "4-bit awq g128": (4, 128, True, "awq", {}),
    "4-bit gptq g128 (no clip search)": (4, 128, True, "gptq", {"clip_search": False}),
    "4-bit gptq g128": (4, 128, True, "gptq", {}),
    "4-bit gptq g128 + rotation": (4, 128, True, "gptq", {"rotate": True}),
    "4-bit rtn g32": (4, 32, True, "rtn", {}),
    "4-bit awq g32": (4, 32, True, "awq", {}),
    "4-bit gptq g32": (4, 32, True, "gptq", {}),
    "4-bit gptq g32 + rotation": (4, 32, True, "gptq", {"rotate": True}),
    "gptq --target-bpw 4.5": (4, 128, True, "gptq", {"target_bpw": 4.5}),
    "gptq --target-bpw 4.5 + rotation": (4, 128, True, "gptq", {"target_bpw": 4.5, "rotate": True}),
    "gptq --target-bpw 4.25": (4, 128, True, "gptq", {"target_bpw": 4.25}),
}


def pareto(rows: list[dict]) -> None:
    for r in rows:
        r["pareto"] = not any(o is not r and o["bytes"] <= r["bytes"] and o["kl"] < r["kl"] for o in rows)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    q = [r for r in rows if r["variant"] != "fp32 (reference)"]
    ax.scatter([r["bytes"] / 1e6 for r in q], [r["ppl"] for r in q], c=["C3" if r["pareto"] else "C0" for r in q])
    for r in q:
        ax.annotate(r["variant"], (r["bytes"] / 1e6, r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in q if r["pareto"]), key=lambda r: r["bytes"])
    ax.plot(
        [r["bytes"] / 1e6 for r in front], [r["ppl"] for r in front], "C3--", lw=1, label="Pareto front (size vs KL)"
    )
    ax.axhline(rows[0]["ppl"], color="gray", lw=0.8, ls=":", label="fp32")
    ax.set_xlabel("model.safetensors (MB)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", help="text for calibration and evaluation (default builtin:pydoc)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--embeddings", default="8", choices=["8", "4", "keep"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated variant names or indexes (default: all)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here (.json, .png, .html beside it)")
    args = ap.parse_args(argv)
    import torch

    from edgellm.data import calibration_batch, load_text, split_tokens, token_ids
    from edgellm.evaluate import evaluate
    from edgellm.modelio import load_model, save_model
    from edgellm.quant.apply import QuantConfig, quantize_model
    from edgellm.quant.formats import QuantFormat

    torch.set_num_threads(args.threads)

    ref = load_model(args.model)
    ids = token_ids(ref.tokenizer, load_text(args.data))
    calib = calibration_batch(ids, args.calib_samples, args.seq_len)
    eval_ids = split_tokens(ids, "eval")
    cache: dict = {}
    base = evaluate(ref.model, eval_ids, max_tokens=args.eval_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="quant_table-"))
    ref.model.save_pretrained(str(tmp / "fp32"), safe_serialization=True)
    rows = [
        {
            "variant": "fp32 (reference)",
            "bytes": (tmp / "fp32" / "model.safetensors").stat().st_size,
            "bpw": 32.0,
            "ppl": base.perplexity,
            "kl": 0.0,
            "top1": 1.0,
            "time_s": 0.0,
        }
    ]
    names = list(VARIANTS)
    chosen = names if not args.only else [names[int(x)] if x.isdigit() else x for x in args.only.split(",")]
    for name in chosen:
        bits, g, sym, method, extra = VARIANTS[name]
        model = copy.deepcopy(ref.model)
        cfg = QuantConfig(fmt=QuantFormat(bits, g, sym), method=method, embeddings=args.embeddings, **extra)
        t0 = time.perf_counter()
        _, info = quantize_model(model, cfg, calib)
        secs = time.perf_counter() - t0
        q = evaluate(model, eval_ids, reference=ref.model, reference_cache=cache, max_tokens=args.eval_tokens)
        save_model(model, None, tmp / "q", {"quantization": info, "steps": []})
        size = (tmp / "q" / "model.safetensors").stat().st_size
        rows.append(
            {
                "variant": name,
                "bytes": size,
                "bpw": info["bits_per_weight"],
                "ppl": q.perplexity,
                "kl": q.kl,
                "top1": q.top1,
                "time_s": secs,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model
    pareto(rows)
    lines = [
        f"Quantization size-quality, {args.model} (embeddings {args.embeddings}), {date.today()}, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}; calibration "
        f"{calib.shape[0]}x{calib.shape[1]} tokens of {args.data or 'builtin:pydoc'}, eval {base.tokens} held-out "
        f"tokens (ctx {base.ctx}, stride {base.stride}). * = on the Pareto front (no variant both no larger and lower "
        "KL).",
        "",
        "| variant | size (MB) | bits/weight (linears) | perplexity | Δ ppl | KL (nats/token) | top-1 | quantize (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']}{' *' if r['pareto'] and r['kl'] > 0 else ''} | {r['bytes'] / 1e6:.2f} | {r['bpw']:.3f} "
            f"| {r['ppl']:.3f} | {(r['ppl'] / base.perplexity - 1) * 100:+.2f}% | {r['kl']:.3g} | "
            f"{r['top1'] * 100:.2f}% | {r['time_s']:.0f} |"
        )
    table = "\n".join(lines)
    write_table(table, rows, args.out)
    if args.out:
        png = args.out.with_suffix(".png")
        plot(rows, png, f"{Path(args.model).name}: size vs perplexity")
        import html

        args.out.with_suffix(".html").write_text(
            f"<!doctype html><meta charset=utf-8><title>quantization table</title><pre>{html.escape(table)}</pre>"
            f"<img src='{png.name}' alt='size vs perplexity'>\n"
        )


if __name__ == "__main__":
    main()

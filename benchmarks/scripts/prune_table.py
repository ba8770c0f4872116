"""Pruning table for one model: perplexity and parameters for magnitude / Wanda / SparseGPT at 50%
and 2:4, and structured removal of MLP channels and layers (optionally with ONNX export size).

    python -m edgellm.benchmarks.scripts.prune_table MODEL_DIR --out OUT_DIR --export

Run it alone (nothing else busy on the machine).

Perplexity follows edgellm.evaluate (held-out last 10% of the built-in corpus, ctx 512, stride
512, the first --eval-tokens tokens). Every variant is pruned from the same loaded model with
the same calibration batch. Writes <out>/prune_table.md and <out>/prune_table.json; structured
variants (and their exports with --export) are saved under <out>/. Unstructured sparsity leaves
dense tensors: its parameter count, file size and dense-runtime speed equal the original's.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from edgellm.benchmarks.scripts._common import numba_speed
from edgellm.files import dir_size


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument(
        "--out", type=Path, required=True, help="folder for the table and the structured variants (not the repo)"
    )
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--mlp-ratio", type=float, default=0.25)
    ap.add_argument("--layer-ratio", type=float, default=0.2)
    ap.add_argument(
        "--export",
        action="store_true",
        help="export dense and structured variants to ONNX (fp32) and record their size",
    )
    ap.add_argument(
        "--speed",
        action="store_true",
        help="with --export: Numba-runtime decode/prompt tokens/s of each export (one edgellm bench worker each)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = ap.parse_args(argv)

    import torch

    from edgellm.data import builtin_text, calibration_batch, split_tokens, token_ids
    from edgellm.evaluate import evaluate
    from edgellm.modelio import count_parameters, load_model, save_model
    from edgellm.prune.apply import PruneConfig, prune_structured, prune_unstructured
    from edgellm.prune.masks import Pattern
    from edgellm.record import add_step

    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    ids = token_ids(loaded.tokenizer, builtin_text())
    calib = calibration_batch(ids, args.calib_samples, args.seq_len)
    eval_ids = split_tokens(ids, "eval")

    variants = [("dense", None)]
    for method in ("magnitude", "wanda", "sparsegpt"):
        variants += [(f"{method} 50%", ("u", method, None)), (f"{method} 2:4", ("u", method, Pattern(2, 4)))]
    variants += [
        (f"mlp -{args.mlp_ratio:.0%}", ("s", "mlp", args.mlp_ratio)),
        (f"layers -{args.layer_ratio:.0%}", ("s", "layers", args.layer_ratio)),
    ]
    if args.only:
        variants = [v for v in variants if v[0] in args.only or v[0] == "dense"]

    rows = []
    for name, spec in variants:
        t0 = time.perf_counter()
        model = loaded.model if spec is None else copy.deepcopy(loaded.model)
        row = {"variant": name}
        if spec and spec[0] == "u":
            _, info = prune_unstructured(model, PruneConfig(method=spec[1], sparsity=0.5, pattern=spec[2]), calib)
            row["sparsity"] = info["sparsity_reached"]
        elif spec:
            plan = prune_structured(model, spec[1], spec[2], calib)
            row["config"] = plan["config"]
        row["prune_s"] = round(time.perf_counter() - t0, 1)
        row["params"] = count_parameters(model)
        row["perplexity"] = evaluate(model, eval_ids, max_tokens=args.eval_tokens).perplexity
        if args.export and (spec is None or spec[0] == "s"):
            from edgellm.export.exporter import export_model
            from edgellm.modelio import Loaded

            slug = name.replace(" ", "").replace("%", "").replace("-", "minus")
            record = (
                loaded.record
                if spec is None
                else add_step(loaded.record, "prune", params={"structured": spec[1], "ratio": spec[2]})
            )
            if spec is not None:
                save_model(model, loaded.tokenizer, args.out / slug, record)
            onnx_dir = args.out / f"{slug}-onnx"
            if not onnx_dir.exists():
                export_model(Loaded(model, loaded.tokenizer, args.model, record), onnx_dir, check=False)
            row["export_bytes"] = dir_size(onnx_dir)
            row["onnx_dir"] = str(onnx_dir)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if spec is not None:
            del model

    if args.speed:  # after pruning, so the timings do not overlap with any torch work of this run
        for row in rows:
            if "onnx_dir" in row:
                row.update({f"numba_{k}": v for k, v in numba_speed(row["onnx_dir"], args.threads).items()})
                print(json.dumps(row), flush=True)
    (args.out / "prune_table.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "calib_samples": int(calib.shape[0]),
                "seq_len": int(calib.shape[1]),
                "eval_tokens": args.eval_tokens,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    dense = rows[0]
    lines = [
        f"Model `{args.model}`; calibration {calib.shape[0]} x {calib.shape[1]} tokens; perplexity on "
        f"{args.eval_tokens} held-out tokens (ctx 512).",
        "",
        "| variant | perplexity | vs dense | parameters | sparsity of decoder linears | export size (fp32) | Numba "
        "decode tok/s | Numba prompt tok/s | prune time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        size = f"{r['export_bytes'] / 2**20:.1f} MiB" if "export_bytes" in r else ("= dense" if "sparsity" in r else "")
        other = "= dense" if "sparsity" in r else ("error (see json)" if "numba_error" in r else "")
        tg = f"{r['numba_tg']:.1f}" if "numba_tg" in r else other
        pp = f"{r['numba_pp']:.1f}" if "numba_pp" in r else other
        lines.append(
            f"| {r['variant']} | {r['perplexity']:.3f} | {(r['perplexity'] / dense['perplexity'] - 1) * 100:+.1f}% | "
            f"{r['params'] / 1e6:.2f} M | {r.get('sparsity', 0):.1%} | {size} | {tg} | {pp} | {r['prune_s']:.0f} s |"
        )
    (args.out / "prune_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

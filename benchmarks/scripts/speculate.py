"""Speculative decoding (issue 29): prompt lookup vs plain greedy on tasks that copy from their
context, the slowdown on free generation, and the verify pass's cost (k tokens in one pass vs one
decode step). Greedy, chat template, plain and lookup interleaved (ABAB...) in one process, medians
of the decode time (the prompt's prefill is the same for both and left out); every lookup run is
checked to give plain greedy's tokens. Run it alone (under the machine's lock):

    python -m edgellm.benchmarks.scripts.speculate --model Q4_EXPORT_DIR --reps 5 \
        --out benchmarks/results/speculate-smollm2.md

With `--draft DRAFT_EXPORT_DIR` the drafter is that model (`edgellm distill --draft-for`) instead of
prompt lookup: the same tasks, plain vs draft interleaved; `--draft D --lookup`: lookup where the
context has a copy, the draft elsewhere (`run --lookup --draft`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from edgellm.benchmarks.scripts._common import run_header, write_table
from edgellm.benchmarks.speculation import run_tasks  # the bench phase's tasks and loop, one copy


def verify_cost(model, at: int, ks, reps: int) -> list[dict]:
    """Median time of a pass of t = 1 + k tokens at position `at` against one decode step, interleaved."""
    ids = (np.arange(at + 20, dtype=np.int64) * 7919 + 11) % 30000 + 10
    model.reset()
    model.forward(ids[:at])
    times = {t: [] for t in [1] + [1 + k for k in ks]}
    for _ in range(reps):
        for t in times:
            model.truncate(at)
            t0 = time.perf_counter()
            model.forward(ids[at : at + t], all_logits=t > 1)
            times[t].append(time.perf_counter() - t0)
    one = statistics.median(times[1])
    return [
        dict(k=t - 1, tokens=t, ms=1e3 * statistics.median(v), vs_decode=statistics.median(v) / one)
        for t, v in times.items()
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="export directory (SmolLM2-135M-Instruct 4-bit)")
    ap.add_argument("--tokens", type=int, default=128, help="most new tokens per generation")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verify-only", action="store_true", help="only the verify-pass cost")
    ap.add_argument("--ks", default="1,2,3,4,8", help="drafts per verify pass to time (comma-separated, 1..15)")
    ap.add_argument("--at", type=int, default=200, help="position of the verify pass")
    ap.add_argument("--draft", type=Path, help="a draft export: speculate with it instead of prompt lookup")
    ap.add_argument("--lookup", action="store_true", help="with --draft: prompt lookup first, the draft elsewhere")
    ap.add_argument("--draft-p-min", type=float, default=0.0, help="the draft stops below this probability")
    ap.add_argument("--bandwidth", action="store_true", help="also the target decode step's %% of the read bandwidth")
    ap.add_argument("--out", type=Path, help="write the tables here (.md) and the rows beside it (.json)")
    args = ap.parse_args()
    from edgellm.runtime.generate import load
    from edgellm.runtime.speculate import Lookup, LookupThenDraft

    gen = load(args.model, threads=args.threads, n_ctx=1024)
    drafter = None
    if args.draft:
        from edgellm.runtime.model import NumbaModel
        from edgellm.runtime.speculate import DraftModel, check_draft

        dm = NumbaModel(args.draft, n_ctx=1024, threads=args.threads, kernels="auto")
        dm.warmup()
        check_draft(gen.model, dm, Path(args.model), args.draft)
        drafter = DraftModel(dm, p_min=args.draft_p_min)
        if args.lookup:
            drafter = LookupThenDraft(Lookup(), drafter)
    what = "prompt lookup" if drafter is None else f"{'lookup + ' if args.lookup else ''}draft {args.draft.name}"
    head = run_header(args.threads) | {"model": args.model, "draft": what, "p_min": args.draft_p_min}
    print(head, flush=True)
    ks = tuple(int(k) for k in args.ks.split(","))
    vrows = verify_cost(gen.model, args.at, ks, max(20, 6 * args.reps))
    table = f"Verify pass at position {args.at} ({head['cpu']}, {args.threads} threads, {head['date']})\n\n"
    if args.bandwidth:  # how bandwidth-bound the target's decode step is
        from edgellm.benchmarks.scripts.runtime_decode import bandwidth_gbs

        bw, per = bandwidth_gbs(args.threads, 1024), int(gen.model.weights.bytes_per_token)
        eff = per / (vrows[0]["ms"] / 1e3) / 1e9
        head |= {"read_gbs": bw, "bytes_per_token": per, "decode_gbs": eff}
        table += (
            f"Target decode step: {vrows[0]['ms']:.2f} ms for {per / 1e6:.1f} MB of weights = {eff:.1f} GB/s, "
            f"{100 * eff / bw:.0f}% of this machine's read bandwidth ({bw:.1f} GB/s, a {args.threads}-thread float32 "
            "sum over 1 GiB): the bandwidth bound is "
            f"{per / bw / 1e6:.2f} ms per token.\n\n"
        )
    table += "| k drafts | tokens in the pass | ms | vs one decode step |\n|---|---|---|---|\n"
    table += "\n".join(f"| {r['k']} | {r['tokens']} | {r['ms']:.2f} | {r['vs_decode']:.2f}x |" for r in vrows)
    spec = (
        None
        if args.verify_only
        else run_tasks(gen, drafter or Lookup(), args.tokens, args.reps, args.k_max, verbose=True)
    )
    rows = spec["tasks"] if spec else []
    if rows:
        table += (
            f"\n\n{what} vs plain greedy ({head['cpu']}, {args.threads} threads, median of {args.reps} "
            "interleaved runs, decode time)\n\n| task | prompt | tokens | plain s | speculating s | speed-up | "
            "acceptance | mean accepted |\n|---|---|---|---|---|---|---|---|\n"
        )
        table += "\n".join(
            f"| {r['task']} | {r['prompt_tokens']} | {r['tokens']} | {r['plain_s']:.3f} | {r['spec_s']:.3f} | "
            f"{r['speedup']:.2f}x | {100 * (r['acceptance'] or 0):.0f}% | {r['mean_accepted'] or 0:.2f} |"
            for r in rows
        )
    if spec:
        curve = " ".join(f"{100 * a:.0f}%" for a in spec["acceptance_by_position"])
        table += (
            f"\n\nAll tasks: {spec['accepted']}/{spec['drafted']} drafts accepted "
            f"({100 * (spec['acceptance'] or 0):.0f}%), "
            f"mean accepted length {spec['mean_accepted'] or 0:.2f}, speed-up {spec['speedup']:.2f}x (sum of medians); "
            f"acceptance by draft position (given the drafts before it accepted): {curve}"
        )
        print(table.rsplit("\n", 1)[-1], flush=True)
    write_table(table, [head | {"verify": vrows, "tasks": rows, "speculation": spec}], args.out)


if __name__ == "__main__":
    main()

"""Speculative decoding (issue 29): prompt lookup vs plain greedy on tasks that copy from their
context, the slowdown on free generation, and the verify pass's cost (k tokens in one pass vs one
decode step). Greedy, chat template, plain and lookup interleaved (ABAB...) in one process, medians
of the decode time (the prompt's prefill is the same for both and left out); every lookup run is
checked to give plain greedy's tokens. Run it alone (under the machine's lock):

    python -m edgellm.benchmarks.scripts.speculate --model Q4_EXPORT_DIR --reps 5 \
        --out benchmarks/results/speculate-smollm2.md

With `--draft DRAFT_EXPORT_DIR` the drafter is that model (`edgellm distill --draft-for`) instead of
prompt lookup: the same tasks, plain vs draft interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from edgellm.benchmarks.scripts._common import run_header, write_table

CODE = '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
'''
PARAGRAPH = (
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square "
    "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. It can be seen "
    "from outer space and is the world's biggest single structure made by living organisms. The reef is "
    "composed of and built by billions of tiny organisms, known as coral polyps. It supports a wide diversity "
    "of life and was selected as a World Heritage Site in 1981."
)
DOCUMENT = (
    "Product manual, section 4: Resetting the device. To reset the router to its factory settings, press "
    "and hold the reset button on the back panel for ten seconds until the power light blinks orange. The "
    "router then restarts, which takes about two minutes. After the restart, connect to the network named "
    "on the label under the device and open the setup page at http://192.168.0.1 to configure it again. "
    "Resetting erases every setting, including the Wi-Fi password and the port forwarding rules."
)
TASKS = {
    "type hints": f"Rewrite this Python function with type hints. Keep everything else the same.\n\n{CODE}",
    "summarize": f"Summarize this paragraph in two sentences.\n\n{PARAGRAPH}",
    "answer from document": f"{DOCUMENT}\n\nUsing the manual above, how do I reset the router to factory settings?",
    "free generation": "Write a short story about a fox who learns to play the violin.",
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def generate(gen, ids, n, spec):
    from edgellm.runtime.generate import Sampling

    gen.speculator = spec
    toks = []
    for _ in gen.stream(ids, Sampling(temperature=0, max_new_tokens=n), observe=lambda t, lg: toks.append(t)):
        pass
    return toks, gen.stats.gen_s, gen.stats


def tasks(gen, n: int, reps: int, k_max: int, drafter=None) -> list[dict]:
    from edgellm.runtime.speculate import Lookup, Speculator

    rows = []
    for name, msg in TASKS.items():
        ids = gen.tokenizer.encode(gen.tokenizer.apply_chat_template([{"role": "user", "content": msg}]), special=False)
        plain_s, spec_s, last = [], [], None
        for _ in range(reps):  # interleaved: plain, lookup, plain, lookup, ...
            base, s0, _ = generate(gen, ids, n, None)
            toks, s1, st = generate(gen, ids, n, Speculator(drafter or Lookup(), k_max=k_max))
            if toks != base:
                raise SystemExit(f"{name}: speculation changed the greedy output")
            plain_s.append(s0)
            spec_s.append(s1)
            last = st
        sp = last.spec
        a, b = statistics.median(plain_s), statistics.median(spec_s)
        rows.append(
            dict(
                task=name,
                prompt_tokens=len(ids),
                tokens=last.gen_tokens,
                plain_s=a,
                lookup_s=b,
                speedup=a / b,
                acceptance=sp.acceptance,
                mean_accepted=sp.mean_accepted,
                verify_passes=sp.rounds,
                plain_steps=sp.steps,
                plain_values=plain_s,
                lookup_values=spec_s,
            )
        )
        print(f"{name}: {a:.3f}s -> {b:.3f}s  x{a / b:.2f}  {sp.line()}", flush=True)
    return rows


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
    ap.add_argument("--out", type=Path, help="write the tables here (.md) and the rows beside it (.json)")
    args = ap.parse_args()
    from edgellm.runtime.generate import load

    gen = load(args.model, threads=args.threads, n_ctx=1024)
    drafter = None
    if args.draft:
        from edgellm.runtime.model import NumbaModel
        from edgellm.runtime.speculate import DraftModel, check_draft

        dm = NumbaModel(args.draft, n_ctx=1024, threads=args.threads, kernels="auto")
        dm.warmup()
        check_draft(gen.model, dm, Path(args.model), args.draft)
        drafter = DraftModel(dm)
    head = run_header(args.threads) | {"cpu": cpu_name(), "model": args.model, "draft": str(args.draft or "lookup")}
    print(head, flush=True)
    ks = tuple(int(k) for k in args.ks.split(","))
    vrows = verify_cost(gen.model, args.at, ks, max(20, 6 * args.reps))
    table = f"Verify pass at position {args.at} ({head['cpu']}, {args.threads} threads, {head['date']})\n\n"
    table += "| k drafts | tokens in the pass | ms | vs one decode step |\n|---|---|---|---|\n"
    table += "\n".join(f"| {r['k']} | {r['tokens']} | {r['ms']:.2f} | {r['vs_decode']:.2f}x |" for r in vrows)
    rows = [] if args.verify_only else tasks(gen, args.tokens, args.reps, args.k_max, drafter)
    what = f"draft {args.draft.name}" if args.draft else "prompt lookup"
    if rows:
        table += (
            f"\n\n{what} vs plain greedy ({head['cpu']}, {args.threads} threads, median of {args.reps} "
            "interleaved runs, decode time)\n\n| task | prompt | tokens | plain s | speculating s | speed-up | "
            "acceptance | mean accepted |\n|---|---|---|---|---|---|---|---|\n"
        )
        table += "\n".join(
            f"| {r['task']} | {r['prompt_tokens']} | {r['tokens']} | {r['plain_s']:.3f} | {r['lookup_s']:.3f} | "
            f"{r['speedup']:.2f}x | {100 * (r['acceptance'] or 0):.0f}% | {r['mean_accepted'] or 0:.2f} |"
            for r in rows
        )
    write_table(table, [head | {"verify": vrows, "tasks": rows}], args.out)


if __name__ == "__main__":
    main()

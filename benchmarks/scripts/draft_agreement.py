"""How often drafts agree with their target on the speculation tasks, in torch (issue 29): the
target (an unquantized model directory) writes its greedy answer to each task of
benchmarks/speculation.py (chat template, at most --tokens tokens); each draft directory then reads
that answer teacher-forced, and at every answer position its argmax is compared with the target's
token. That is the acceptance of a first drafted token, without the runtime: where it is low, no
runtime work makes the draft pay. Also by the draft's own confidence: the share of positions whose
top probability reaches each threshold, and how often those match (what `--draft-p-min` keeps).

    python -m edgellm.benchmarks.scripts.draft_agreement --target TARGET_HF_DIR \\
        --draft NAME=DRAFT_HF_DIR [--draft NAME=DIR ...] --out results/draft_agreement.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgellm.benchmarks.scripts._common import run_header, write_table
from edgellm.benchmarks.speculation import TASKS

THRESHOLDS = (0.5, 0.7, 0.8, 0.9)


def answers(target, tok, tokens: int) -> dict:
    """{task: (prompt + answer ids (1, P + G), P)}: the target's greedy answer to each task."""
    import torch

    out = {}
    for name, msg in TASKS.items():
        text = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, P)
        with torch.no_grad():
            full = target.generate(ids, max_new_tokens=tokens, do_sample=False)  # (1, P + G)
        out[name] = (full, ids.shape[1])
    return out


def agreement(draft, answered: dict) -> dict:
    """Per task and pooled: agreement, and per threshold the share of positions kept and their agreement."""
    import torch

    rows, probs, oks = [], [], []
    for name, (full, P) in answered.items():
        with torch.no_grad():
            p = draft(full).logits[0, P - 1 : -1].float().softmax(-1)  # (G, V): the draft's next-token law
        top, arg = p.max(-1)  # (G,)
        ok = arg == full[0, P:]  # (G,)
        probs.append(top)
        oks.append(ok)
        rows.append({"task": name, "tokens": int(ok.numel()), "agreement": float(ok.float().mean())})
    top, ok = torch.cat(probs), torch.cat(oks)
    conf = []
    for t in THRESHOLDS:
        keep = top >= t
        conf.append(
            {
                "p_min": t,
                "kept": float(keep.float().mean()),
                "agreement": float(ok[keep].float().mean()) if keep.any() else None,
            }
        )
    return {"tasks": rows, "agreement": float(ok.float().mean()), "by_confidence": conf}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="the target's unquantized model directory")
    ap.add_argument("--draft", action="append", required=True, help="NAME=DIR: a draft's model directory")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    tok = AutoTokenizer.from_pretrained(args.target)
    answered = answers(load(args.target), tok, args.tokens)
    head = run_header(args.threads) | {"target": args.target}
    results = []
    for spec in args.draft:
        name, _, path = spec.partition("=")
        results.append({"draft": name, "path": path} | agreement(load(path or name), answered))
    names = list(TASKS)
    table = (
        f"Drafts against {Path(args.target).name}'s greedy answers, teacher-forced ({head['date']})\n\n"
        f"| draft | {' | '.join(names)} | all | "
        + " | ".join(f"p ≥ {t}: kept / agree" for t in THRESHOLDS)
        + " |\n|---|"
        + "---|" * (len(names) + 1 + len(THRESHOLDS))
        + "\n"
    )
    for r in results:
        cells = [f"{100 * t['agreement']:.0f}%" for t in r["tasks"]] + [f"{100 * r['agreement']:.0f}%"]
        cells += [
            f"{100 * c['kept']:.0f}% / " + (f"{100 * c['agreement']:.0f}%" if c["agreement"] is not None else "-")
            for c in r["by_confidence"]
        ]
        table += f"| {r['draft']} | " + " | ".join(cells) + " |\n"
    print(table, flush=True)
    write_table(table, [head | {"drafts": results}], args.out)


if __name__ == "__main__":
    main()

"""Perplexity at the start of distillation for two ways to make a 20%-shallower student.

    nice -n 10 .venv/bin/python scripts/student_init.py builtin:smollm2 --ratio 0.2

- `every-k-th`: `edgellm distill --student-layers N` (keep_layers: evenly spread, first and last kept);
- `block-importance`: `edgellm prune --structured layers` (drop the blocks with the lowest
  1 - cos(in, out) on calibration data, ShortGPT / Minitron depth pruning).

Both remove the same number of layers and are scored with the same protocol as `edgellm eval`
(held-out split, ctx 512, non-overlapping windows), KL against the teacher. Prints one JSON
object per student and writes them to --json when given.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="builtin:smollm2")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import copy

    import torch

    torch.set_num_threads(1)
    from edgellm.data import calibration_batch, load_text, split_tokens, token_ids
    from edgellm.distill.student import keep_layers, num_layers, student_from_teacher
    from edgellm.evaluate import evaluate
    from edgellm.modelio import load_model
    from edgellm.prune.apply import plan_structured, prune_structured

    teacher = load_model(args.model)
    ids = token_ids(teacher.tokenizer, load_text(None))
    eval_ids = split_tokens(ids, "eval")
    cache: dict = {}
    rows = []

    def score(name, model, extra):
        t0 = time.perf_counter()
        q = evaluate(model, eval_ids, reference=teacher.model, max_tokens=args.eval_tokens, reference_cache=cache)
        row = {
            "student": name,
            "layers": num_layers(model.config),
            **extra,
            **q.to_dict(),
            "eval_s": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    n_teacher = num_layers(teacher.model.config)
    score("teacher", teacher.model, {})
    plan = plan_structured(teacher.model, "layers", args.ratio)
    n_student = plan["keep"]
    kept = keep_layers(n_teacher, n_student)
    student, _ = student_from_teacher(teacher.model, n_student)
    score("every-k-th (--student-layers)", student, {"kept": kept})
    del student

    pruned = copy.deepcopy(teacher.model)
    calib = calibration_batch(ids, args.calib_samples, args.seq_len, seed=0)
    info = prune_structured(pruned, "layers", args.ratio, calib)
    score(
        "block-importance (prune --structured layers)",
        pruned,
        {
            "removed": info["removed"],
            "kept": [i for i in range(n_teacher) if i not in info["removed"]],
            "block_influence": info["scores"],
        },
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"model": args.model, "ratio": args.ratio, "eval_tokens": args.eval_tokens, "rows": rows}, fh, indent=1
            )


if __name__ == "__main__":
    main()

"""Distil SmolLM2-135M (30 layers) into a 15-layer student for a fixed CPU time budget.

    python -m edgellm.benchmarks.scripts.distill_smollm --teacher TEACHER_DIR --out STUDENT_DIR --budget-min 15

TEACHER_DIR is SmolLM2-135M as an fp32 model directory; STUDENT_DIR must not exist yet. Run it alone
(nothing else busy on the machine): the budget is CPU time.

1. a probe run (a few steps, no evaluation) measures the time per optimizer step on this machine;
2. the real run gets as many steps as fit the budget (the cosine schedule needs the step count
   up front, so the budget is converted to steps rather than cutting a run short);
3. `edgellm distill` measures teacher / initial student / distilled student perplexity (and KL /
   top-1 agreement to the teacher) on the held-out split;
4. teacher and student are exported to ONNX (fp32, `edgellm export`) and their decode / prompt
   speed measured on the Numba runtime side by side (one `edgellm bench` worker each, 64
   tokens, median of 3); this script writes <out>.report.json and <out>.report.md.

The budget counts training only (model loading and the three perplexity measurements come on top).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgellm.benchmarks.scripts._common import numba_speed
from edgellm.files import dir_size


def edgellm(*args: str) -> None:
    cmd = [sys.executable, "-c", "from edgellm.cli import main; main()", *args]
    print("+ edgellm " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


# numba_speed's keys -> this report's
SPEED_KEYS = {"tg": "tg_tok_s", "pp": "pp_tok_s", "tg_all": "tg_all", "error": "error"}


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the teacher: SmolLM2-135M, an fp32 model directory")
    ap.add_argument("--out", required=True, help="the student's model directory (reports beside it)")
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--budget-min", type=float, default=15.0, help="training time budget in minutes")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--probe-steps", type=int, default=5)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2, help="Numba runtime threads for the speed measurement")
    ap.add_argument("--no-speed", action="store_true", help="skip the ONNX export and Numba speed measurement")
    args = ap.parse_args()

    out = Path(args.out)
    common = [
        "--student-layers",
        str(args.layers),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--grad-accum",
        str(args.grad_accum),
        "--lr",
        str(args.lr),
        "--precision",
        args.precision,
    ]

    probe = out.with_name(out.name + ".probe")
    t0 = time.time()
    edgellm(
        "distill",
        args.teacher,
        "-o",
        str(probe),
        "--steps",
        str(args.probe_steps),
        "--no-eval",
        "--checkpoint-every",
        "0",
        "--force",
        *common,
    )
    rows = [json.loads(line) for line in (probe / "distill_log.jsonl").read_text().splitlines()]
    step_s = statistics.median(r["step_s"] for r in rows[1:]) if len(rows) > 1 else rows[0]["step_s"]
    shutil.rmtree(probe)
    steps = max(1, int(args.budget_min * 60 / step_s))
    print(
        f"probe: {step_s:.2f} s/step -> {steps} steps in {args.budget_min} min (probe took {time.time() - t0:.0f} s)",
        flush=True,
    )

    t1 = time.time()
    edgellm(
        "distill",
        args.teacher,
        "-o",
        str(out),
        "--steps",
        str(steps),
        "--eval-tokens",
        str(args.eval_tokens),
        "--checkpoint-every",
        str(max(1, steps // 2)),
        "--force",
        *common,
    )
    wall = time.time() - t1

    speed = {}
    if not args.no_speed:
        exports = {"teacher": out.with_name(out.name + ".teacher-onnx"), "student": out.with_name(out.name + "-onnx")}
        edgellm("export", args.teacher, "-o", str(exports["teacher"]), "--force", "--no-check")
        edgellm("export", str(out), "-o", str(exports["student"]), "--force", "--no-check")
        for name, path in exports.items():  # side by side, same run, same threads
            r = numba_speed(path, args.threads)
            speed[name] = {**{SPEED_KEYS[k]: v for k, v in r.items() if k in SPEED_KEYS}, "onnx_bytes": dir_size(path)}
        shutil.rmtree(exports["teacher"])

    rec = json.loads((out / "edgellm.json").read_text())["steps"][-1]
    q = rec["quality"]
    report = {
        "teacher": args.teacher,
        "student_layers": rec["student"]["from_teacher_layers"],
        "budget_min": args.budget_min,
        "probe_step_s": step_s,
        "steps": steps,
        "tokens": rec["training"]["tokens"],
        "train_time_s": rec["training"]["train_time_s"],
        "wall_s": round(wall, 1),
        "params": rec["parameters"],
        "weights_bytes": {"teacher": weights_bytes(Path(args.teacher)), "student": weights_bytes(out)},
        "perplexity": {k: q[k]["perplexity"] for k in ("teacher", "initial_student", "student")},
        "eval_tokens": q["student"]["tokens"],
        "ctx": q["student"]["ctx"],
        "hyper": {
            k: rec["params"][k] for k in ("seq_len", "batch_size", "grad_accum", "lr", "warmup_steps", "precision")
        },
        "kl_to_teacher": {k: q[k]["kl"] for k in ("initial_student", "student")},
        "top1_agreement": {k: q[k]["top1"] for k in ("initial_student", "student")},
        "numba": speed,
    }
    out.with_name(out.name + ".report.json").write_text(json.dumps(report, indent=2) + "\n")
    p = report["perplexity"]
    teacher_layers = json.loads((Path(args.teacher) / "config.json").read_text())["num_hidden_layers"]
    md = [
        f"# {Path(args.teacher).name} -> {args.layers} layers, {args.budget_min:g} min CPU budget",
        "",
        "| model | layers | parameters | weights | perplexity | KL to teacher | top-1 agreement | Numba decode tok/s "
        "| Numba prompt tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| teacher | {teacher_layers} | {report['params']['teacher']:,} | "
        f"{report['weights_bytes']['teacher'] / 1e6:.1f} MB | {p['teacher']:.2f} | | | {_speed(speed, 'teacher')} |",
        f"| initial student | {args.layers} | {report['params']['student']:,} | "
        f"{report['weights_bytes']['student'] / 1e6:.1f} MB | {p['initial_student']:.2f} "
        f"| {report['kl_to_teacher']['initial_student']:.3f} | {report['top1_agreement']['initial_student']:.1%} | | |",
        f"| distilled student | {args.layers} | {report['params']['student']:,} | "
        f"{report['weights_bytes']['student'] / 1e6:.1f} MB | {p['student']:.2f} "
        f"| {report['kl_to_teacher']['student']:.3f} | {report['top1_agreement']['student']:.1%} | "
        f"{_speed(speed, 'student')} |",
        "",
        f"{steps} steps x {args.batch_size * args.grad_accum} x {args.seq_len} tokens = {report['tokens']:,} tokens in "
        f"{report['train_time_s']:.0f} s training; perplexity on {report['eval_tokens']} held-out tokens, ctx "
        f"{report['ctx']}.",
    ]
    out.with_name(out.name + ".report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


def _speed(speed: dict, name: str) -> str:
    r = speed.get(name)
    if not r:
        return "not measured | not measured"
    if "error" in r:
        return f"error: {r['error'][:60]} |"
    return f"{r['tg_tok_s']:.1f} | {r['pp_tok_s']:.1f}"


if __name__ == "__main__":
    main()

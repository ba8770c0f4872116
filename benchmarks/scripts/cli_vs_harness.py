"""What a user sees against what the harness measures (issue 27, goal 7), not in CI.

Three measurements of decode speed on one export, interleaved over `--rounds`, each in its own
process, medians:

- harness: `edgellm bench`'s worker (benchmarks/worker.py), tg = greedy decode steps after a
  1-token prefill;
- API: `edgellm.runtime.load(dir).stream(prompt, Sampling(greedy, max_tokens=N, ignore_eos))`,
  its `stats.gen_rate` (decode steps after the first generated token, sampling and
  detokenization included);
- CLI: `edgellm run DIR -p PROMPT -n N --ignore-eos --temperature 0 -v`, the tokens/s it prints
  (the same steps, plus printing to a pipe).

    python -m edgellm.benchmarks.scripts.cli_vs_harness EXPORT_DIR --tokens 128 --rounds 3

Run it alone: two-thread decode collapses on busy cores.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgellm.benchmarks.scripts._common import cpu_name

PROMPT = "Write a story about a robot."
API_CHILD = """
import json, sys
from edgellm.runtime import load
from edgellm.runtime.generate import Sampling
g = load(sys.argv[1], threads=int(sys.argv[2]))
rates = []
for _ in range(int(sys.argv[4])):
    for _ in g.stream(sys.argv[5], Sampling(temperature=0.0, max_new_tokens=int(sys.argv[3]), ignore_eos=True)):
        pass
    rates.append(g.stats.gen_rate)
print(json.dumps(rates))
"""
RATE = re.compile(r"after the first: ([0-9.]+) tokens/s")


def harness(path: str, threads: int, tokens: int, reps: int) -> list[float]:
    from edgellm.benchmarks.scripts._common import measure

    r = measure(path, "numba", threads, tokens=tokens, pp=64, reps=reps)
    if r["status"] != "ok":
        raise SystemExit(f"harness failed: {r.get('error')}")
    return r["tg_values"]


def api(path: str, threads: int, tokens: int, reps: int) -> list[float]:
    cmd = [sys.executable, "-c", API_CHILD, path, str(threads), str(tokens), str(reps), PROMPT]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cli(path: str, threads: int, tokens: int, reps: int) -> list[float]:
    exe = [sys.executable, "-m", "edgellm"]
    rates = []
    for _ in range(reps):
        cmd = [*exe, "run", path, "-p", PROMPT, "-n", str(tokens), "--ignore-eos", "--temperature", "0", "-v"]
        r = subprocess.run([*cmd, "--threads", str(threads)], capture_output=True, text=True)
        m = RATE.search(r.stdout + r.stderr)
        if r.returncode or not m:
            raise SystemExit(f"edgellm run failed (rc {r.returncode}): {(r.stderr or r.stdout)[-300:]}")
        rates.append(float(m.group(1)))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="runs per measurement per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    ways = {"harness": harness, "api": api, "cli": cli}
    vals = {k: [] for k in ways}
    cli(a.export, a.threads, 8, 1)  # the compile cache warm before anything is timed
    for _ in range(a.rounds):
        for k, f in ways.items():
            vals[k] += f(a.export, a.threads, a.tokens, a.reps)
    med = {k: statistics.median(v) for k, v in vals.items()}
    head = dict(date=time.strftime("%Y-%m-%d %H:%M"), cpu=cpu_name(), threads=a.threads, tokens=a.tokens)
    print(json.dumps(head))
    print("| measured by | decode tok/s median (min-max) | vs harness |")
    print("|---|---:|---:|")
    for k, v in vals.items():
        print(f"| {k} | {med[k]:.1f} ({min(v):.1f}-{max(v):.1f}) | {med[k] / med['harness']:.3f} |")
    if a.json:
        a.json.write_text(json.dumps(dict(head, values=vals, medians=med), indent=1))


if __name__ == "__main__":
    main()

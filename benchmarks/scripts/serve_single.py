"""Per-token latency of one streaming client on `edgellm serve` servers (issue 28's "single-client
latency within 5% of --parallel 1"): each --server NAME=PARALLEL[@PYTHON] starts a server (PYTHON:
another checkout's interpreter, to compare against it in the same run); then --reps rounds, each
one greedy streaming request per server in turn (interleaved: drift hits every server alike).
Per request: (time of the last content chunk - the first) / (completion tokens - 1), and the time
to the first token. Medians per server, and each server's ratio to the first one.

    python -m edgellm.benchmarks.scripts.serve_single EXPORT_DIR --server p1=1 --server p8=8 --reps 9

Run it alone (nothing else busy on the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgellm.benchmarks.scripts._common import ServerProcess, free_port, model_id, run_header

PROMPT = "Write a long story about a lighthouse keeper and the storm that changed the village."


def start(export: str, parallel: int, python: str, threads: int, ctx: int, log: Path) -> ServerProcess:
    port = free_port()
    cmd = [python, "-c", "from edgellm.cli import main; main()", "serve", export, "--port", str(port)]
    cmd += ["--threads", str(threads), "--ctx", str(ctx), "--parallel", str(parallel)]
    return ServerProcess(cmd, port, "/health", log)


def one(client, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds per token after the first, time to first token, completion tokens) of one request."""
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    for c in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if c.usage is not None:
            tokens = c.usage.completion_tokens
        if c.choices and c.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
    return (last - first) / max(1, tokens - 1), first - t0, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("--server", action="append", required=True, help="NAME=PARALLEL[@PYTHON]")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    import openai

    specs = []
    for s in args.server:
        name, _, rest = s.partition("=")
        par, _, py = rest.partition("@")
        specs.append((name, int(par), py or sys.executable))
    logs = Path(tempfile.mkdtemp(prefix="serve_single_"))
    procs, res = {}, {name: {"per_token_s": [], "ttft_s": []} for name, _, _ in specs}
    try:
        for name, par, py in specs:
            procs[name] = start(args.export, par, py, args.threads, args.ctx, logs / f"{name}.log")
        clients = {
            n: (openai.OpenAI(base_url=p.base_url, api_key="none", max_retries=0, timeout=300), model_id(p.base_url))
            for n, p in procs.items()
        }
        for n, (c, m) in clients.items():  # warm: the first request of each server is not timed
            one(c, m, "(0) " + PROMPT, 8)
        for r in range(args.reps):
            for n, (c, m) in clients.items():
                per, ttft, _ = one(c, m, f"({r + 1}) " + PROMPT, args.max_tokens)
                res[n]["per_token_s"].append(per)
                res[n]["ttft_s"].append(ttft)
    finally:
        for p in procs.values():
            p.close()
    base = specs[0][0]
    out = {**run_header(args.threads), "max_tokens": args.max_tokens, "reps": args.reps, "servers": {}}
    b = statistics.median(res[base]["per_token_s"])
    for name, par, py in specs:
        med = statistics.median(res[name]["per_token_s"])
        ttft = statistics.median(res[name]["ttft_s"])
        out["servers"][name] = {"parallel": par, "python": py, **res[name], "median_per_token_s": med}
        print(
            f"{name:12} --parallel {par}: {med * 1e3:.2f} ms/token ({1 / med:.1f} tok/s), TTFT {ttft * 1e3:.0f} ms, "
            f"{med / b:.3f}x {base}'s latency",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Load on `edgellm serve` vs llama.cpp's server: concurrent streaming `openai` clients, loopback only.

    python -m edgellm.benchmarks.scripts.serve_load EXPORT_DIR --gguf MODEL.Q4_0.gguf \
        --clients 8 --requests 25 --max-tokens 16 --threads 2 --json serve_load.json

Run it alone (nothing else busy on the machine).

Each server runs in its own process on 127.0.0.1 (a free port), one after the other in the same
run, with the same clients: every client thread sends --requests streaming chat completions
(greedy, its own prompt) back to back. Before the load, each prompt is asked once alone,
non-streaming; every streamed answer under load must equal that reference text exactly and end
with a finish_reason (else it counts as failed or garbled). Reported: p50/p95 time to first
token (to the first non-empty content chunk, so queueing counts: batch-1 servers serve one
request at a time), tokens/s per client and in total, and the server's RSS before and after the
load (once warm: after each prompt has run once, alone). llama.cpp (`llama_cpp.server`, from
`llama-cpp-python[server]`) is skipped when it is not installed. Bounded: --clients x --requests
requests, each with a --timeout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgellm.benchmarks.scripts._common import ServerProcess, edgellm_server, free_port, model_id, run_header

TOPICS = [
    "the sea",
    "a mountain",
    "bread",
    "the moon",
    "a library",
    "rain",
    "a bicycle",
    "coffee",
    "winter",
    "a river",
    "music",
    "a garden",
    "the desert",
    "a train",
    "snow",
    "the forest",
]


def llama_cpp_server(gguf: str, threads: int, ctx: int, log: Path) -> ServerProcess:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        gguf,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--n_ctx",
        str(ctx),
        "--model_alias",
        "model",
        "--interrupt_requests",
        "False",
    ]  # its default cuts a running stream whenever a new request arrives
    return ServerProcess(cmd, port, "/v1/models", log)


def stream_chat(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming chat completion: its text, finish_reason, TTFT and decode time."""
    t0 = time.perf_counter()
    first = last = None
    text, finish, n_chunks = [], None, 0
    for c in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True
    ):
        if not c.choices:
            continue
        piece = c.choices[0].delta.content or ""
        if piece:
            now = time.perf_counter()
            first = first or now
            last = now
            n_chunks += 1
            text.append(piece)
        finish = c.choices[0].finish_reason or finish
    end = time.perf_counter()
    return {
        "text": "".join(text),
        "finish": finish,
        "ttft": (first or end) - t0,
        "total": end - t0,
        "decode": (last or end) - (first or end),
        "chunks": n_chunks,
    }


def load_run(
    base_url: str, clients: int, requests: int, max_tokens: int, timeout: float, rss=lambda: float("nan")
) -> dict:
    """The reference pass, then the load; `rss` reads the server's RSS (MiB) once warm and after the load."""
    import openai

    model = model_id(base_url)
    prompts = [f"Write one sentence about {TOPICS[i % len(TOPICS)]}." for i in range(clients)]
    ref_client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout)
    reference, ref_tokens = [], []
    for p in prompts:  # alone, not streamed: what every answer under load must equal
        r = ref_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": p}], max_tokens=max_tokens, temperature=0
        )
        reference.append(r.choices[0].message.content)
        ref_tokens.append(r.usage.completion_tokens)
    rss_warm = rss()  # after every prompt has run once: what the load may not grow
    results = [[] for _ in range(clients)]
    errors = [[] for _ in range(clients)]
    walls = [0.0] * clients

    def client_loop(i):
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout)
        t0 = time.perf_counter()
        for _ in range(requests):
            try:
                results[i].append(stream_chat(client, model, prompts[i], max_tokens))
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                errors[i].append(f"{type(exc).__name__}: {exc}")
        walls[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    bad = [
        (reference[i], r["text"], r["finish"])
        for i in range(clients)
        for r in results[i]
        if r["text"] != reference[i] or r["finish"] not in ("stop", "length")
    ]
    garbled = len(bad)
    failed = sum(len(e) for e in errors)
    ttft = sorted(r["ttft"] for rs in results for r in rs)
    tokens = [
        sum(ref_tokens[i] for _ in results[i]) for i in range(clients)
    ]  # each answer has its reference's token count
    decode = [(r["chunks"] - 1) / r["decode"] for rs in results for r in rs if r["decode"] > 0 and r["chunks"] > 1]
    return {
        "rss_before_mb": rss_warm,
        "rss_after_mb": rss(),
        "requests": clients * requests,
        "failed": failed,
        "garbled": garbled,
        "errors": sorted({e for es in errors for e in es})[:5],
        "garbled_examples": [{"reference": a, "got": b, "finish": f} for a, b, f in bad[:3]],
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p95_s": _pct(ttft, 95),
        "wall_s": wall,
        "tokens_per_s_total": sum(tokens) / wall,
        "tokens_per_s_per_client": statistics.median(t / w for t, w in zip(tokens, walls) if w),
        "stream_chunks_per_s_median": statistics.median(decode) if decode else 0.0,
        "completion_tokens": sum(tokens),
    }


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))  # nearest rank
    return xs[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="edgellm export directory (e.g. SmolLM2-135M 4-bit)")
    ap.add_argument(
        "--gguf", help="the same model as a Q4_0 GGUF for llama.cpp's server (skipped if absent or not installed)"
    )
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=300, help="seconds, any one request")
    ap.add_argument("--logs", default=tempfile.gettempdir(), help="folder for the servers' logs (default: temp dir)")
    ap.add_argument("--json")
    args = ap.parse_args()
    servers = [("edgellm", lambda log: edgellm_server(args.export, args.threads, args.ctx, log))]
    if args.gguf:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("sse_starlette"):
            servers.append(("llama.cpp", lambda log: llama_cpp_server(args.gguf, args.threads, args.ctx, log)))
        else:
            print("llama.cpp server not installed (pip install 'llama-cpp-python[server]'): skipped", file=sys.stderr)
    out = {
        **run_header(args.threads),
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "runs": [],
    }
    for name, start in servers:
        log = Path(args.logs) / f"serve_load_{name}.log"
        srv = start(log)
        try:
            rss_start = srv.rss_mb()
            res = load_run(srv.base_url, args.clients, args.requests, args.max_tokens, args.timeout, srv.rss_mb)
            res["rss_start_mb"] = rss_start
        finally:
            res_code = srv.close()
        res.update(server=name, exit_code=res_code, log=str(log))
        out["runs"].append(res)
        print(
            f"{name:9} {res['requests']} requests: {res['failed']} failed, {res['garbled']} garbled | TTFT p50 "
            f"{res['ttft_p50_s']:.2f} s p95 {res['ttft_p95_s']:.2f} s | {res['tokens_per_s_per_client']:.1f} tok/s "
            f"per client, {res['tokens_per_s_total']:.1f} total | RSS {res['rss_start_mb']:.0f} at start, "
            f"{res['rss_before_mb']:.0f} warm -> {res['rss_after_mb']:.0f} MiB after | {res['wall_s']:.0f} s, exit "
            f"{res_code}",
            flush=True,
        )
        for e in res["errors"]:
            print(f"  error: {e}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

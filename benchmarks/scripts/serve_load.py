"""Load on `edgellm serve`: `--parallel 1` (one request at a time) vs `--parallel N` (slots decoded
together), optionally beside llama.cpp's server; concurrent streaming `openai` clients, loopback only.

    python -m edgellm.benchmarks.scripts.serve_load EXPORT_DIR --parallel 8 --clients 8 --requests 25 \
        --rounds 2 --threads 2 --json serve_load.json [--gguf MODEL.gguf [--llama-server PATH]]

Run it alone (nothing else busy on the machine).

Every server runs in its own process on 127.0.0.1 (a free port); all are started first, then the
load passes alternate between them (--rounds, interleaved: drift on a shared machine hits each
alike). Every client thread sends --requests streaming chat completions (greedy) back to back,
each picked from a pool of mixed requests: short, medium and long prompts (about 15 to 400
tokens) and max_tokens from 16 to 96. Before the load, each request of the pool is asked once
alone, non-streaming, on each server: every streamed answer under load must equal that reference
text exactly and end with a finish_reason (else it counts as failed or garbled), and the
references of every edgellm server must agree. Reported per pass and as medians over the rounds:
p50/p95 time to first token (to the first non-empty content chunk, so queueing counts), tokens/s
per client and in total, and the server's RSS before and after the load (once warm). Then the
single-client latency: --single requests alone, one at a time, alternating between the servers,
median time per request. The ratios --parallel N / --parallel 1 are printed with the issue's goals
(total tokens/s >= 3x, p95 TTFT <= 1/3, single client within 5%). llama.cpp (`llama_cpp.server`,
from `llama-cpp-python[server]`, one request at a time) is skipped when it is not installed; with
--llama-server PATH the `llama-server` binary runs instead, on --gguf with --parallel slots of --ctx
tokens each and continuous batching, as the peer of --parallel N. Bounded: --clients x --requests
requests per pass, each with a --timeout.

Unless --plain, 2 of every 8 pool requests answer under a JSON schema (response_format) and 2 call
a tool (tool_choice required). SmolLM2's chat template cannot show tools, so every server runs with
SmolLM2's template plus a Hermes tool section (_common.TOOLS_TEMPLATE; the same text as SmolLM2's
own for requests without tools); llama-server reads it with --jinja --chat-template-file.
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

from edgellm.benchmarks.scripts._common import (
    TOOLS,
    TOOLS_TEMPLATE,
    ServerProcess,
    edgellm_server,
    free_port,
    model_id,
    run_header,
    tools_view,
)

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


def llama_server(binary: str, gguf: str, threads: int, ctx: int, parallel: int, log: Path, template: Path):
    """llama.cpp's own `llama-server` with `parallel` slots of `ctx` tokens each (continuous batching),
    the chat template `template` through its Jinja engine (so tools reach the model as edgellm shows them)."""
    port = free_port()
    cmd = [
        binary,
        "-m",
        gguf,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(parallel),
        "-c",
        str(ctx * parallel),  # split evenly: ctx per slot
        "--no-kv-unified",
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--jinja",
        "--chat-template-file",
        str(template),
        "--alias",
        "model",
        "--no-webui",
    ]
    return ServerProcess(cmd, port, "/health", log)


def _calls_text(calls) -> str:
    """Tool calls as text, to compare an answer with its reference."""
    return "".join(f"<call {c.function.name} {c.function.arguments}>" for c in calls or [])


def stream_chat(client, model: str, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    """One streaming chat completion: its text (tool calls included), finish_reason, TTFT and decode time."""
    t0 = time.perf_counter()
    first = last = None
    text, finish, n_chunks, calls = [], None, 0, {}
    for c in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        **(extra or {}),
    ):
        if not c.choices:
            continue
        delta = c.choices[0].delta
        piece = delta.content or ""
        for tc in delta.tool_calls or []:  # a call's name and arguments may come in pieces
            name, args = calls.get(tc.index, ("", ""))
            f = tc.function
            calls[tc.index] = (name + ((f.name or "") if f else ""), args + ((f.arguments or "") if f else ""))
            piece += " "  # counts as output for TTFT and chunks; dropped from the text below
        if piece:
            now = time.perf_counter()
            first = first or now
            last = now
            n_chunks += 1
            text.append(piece.rstrip(" ") if delta.tool_calls else piece)
        finish = c.choices[0].finish_reason or finish
    end = time.perf_counter()
    return {
        "text": "".join(text) + "".join(f"<call {n} {a}>" for _, (n, a) in sorted(calls.items())),
        "finish": finish,
        "ttft": (first or end) - t0,
        "total": end - t0,
        "decode": (last or end) - (first or end),
        "chunks": n_chunks,
    }


NOTES = (
    "Notes from the river survey. The water level rose by a hand's width overnight, the ferry ran "
    "late twice, and the old stone bridge showed new cracks on its downstream side. Fishermen "
    "reported fewer trout near the mill but more perch below the weir. The council wants a short "
    "summary before the spring meeting, written plainly, with the most urgent repair first. "
)


SCHEMA = {  # a nested object, an enum, an array, bounded numbers
    "type": "object",
    "properties": {
        "topic": {"type": "string", "maxLength": 20},
        "mood": {"enum": ["calm", "busy", "grim"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
        "words": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["topic", "mood", "score"],
    "additionalProperties": False,
}


def request_pool(mix: str = "mixed", structured: bool = True) -> list[tuple[str, int, dict]]:
    """(prompt, max_tokens, extra request fields) of the requests. mixed: prompt lengths short /
    medium / long, four max_tokens values, spread so that neighbours differ in both; with
    `structured`, 2 of every 8 requests answer under a JSON schema and 2 call a tool (tool_choice
    required). short: the short prompts only (decoding dominates), no schemas or tools."""
    pool = []
    for i, topic in enumerate(TOPICS):
        size = i % 3 if mix == "mixed" else 0
        extra, max_tokens, ask = {}, (16, 32, 64, 96)[i % 4], f"write one sentence about {topic}"
        if structured and mix == "mixed" and i % 8 in (2, 3):
            extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "note", "schema": SCHEMA}}}
            max_tokens, ask = 64, f"describe {topic} as JSON"
        elif structured and mix == "mixed" and i % 8 in (5, 6):
            extra = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
            max_tokens, ask = 64, f"check the weather for a trip to {topic}"
        if size == 0:
            prompt = ask[0].upper() + ask[1:] + "."
        else:
            prompt = NOTES * (1 if size == 1 else 6) + f"Now {ask}."
        pool.append((prompt, max_tokens, extra))
    return pool


def references(base_url: str, pool, timeout: float) -> tuple[list[str], list[int]]:
    """Each request of the pool alone, not streamed: its text and completion tokens."""
    import openai

    model = model_id(base_url)
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout)
    texts, tokens = [], []
    for prompt, max_tokens, extra in pool:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, **extra
        )
        texts.append((r.choices[0].message.content or "") + _calls_text(r.choices[0].message.tool_calls))
        tokens.append(r.usage.completion_tokens)
    return texts, tokens


def load_run(base_url: str, clients: int, requests: int, pool, ref, timeout: float, rss=lambda: float("nan")) -> dict:
    """One load pass: `clients` threads x `requests` streaming requests from `pool`, each checked
    against `ref` (texts, tokens); `rss` reads the server's RSS (MiB) before and after."""
    import openai

    model = model_id(base_url)
    ref_text, ref_tokens = ref
    rss_warm = rss()
    results = [[] for _ in range(clients)]
    errors = [[] for _ in range(clients)]
    walls = [0.0] * clients

    def pick(i, j):  # client i's j-th request: every client walks the pool from its own start
        return (i * 5 + j) % len(pool)

    def client_loop(i):
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout)
        t0 = time.perf_counter()
        for j in range(requests):
            k = pick(i, j)
            try:
                results[i].append((k, stream_chat(client, model, *pool[k])))
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
    done = [(k, r) for rs in results for k, r in rs]
    bad = [(ref_text[k], r["text"], r["finish"]) for k, r in done if r["text"] != ref_text[k] or not r["finish"]]
    ttft = sorted(r["ttft"] for _, r in done)
    tokens = [sum(ref_tokens[k] for k, _ in rs) for rs in results]  # each answer has its reference's tokens
    decode = [(r["chunks"] - 1) / r["decode"] for _, r in done if r["decode"] > 0 and r["chunks"] > 1]
    return {
        "rss_before_mb": rss_warm,
        "rss_after_mb": rss(),
        "requests": clients * requests,
        "failed": sum(len(e) for e in errors),
        "garbled": len(bad),
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


def single_client(urls: dict, pool, n: int, timeout: float) -> dict:
    """n requests alone per server, one at a time, alternating servers: median seconds per request and TTFT.
    Each prompt starts with its own number, so neither server finds it in a cache from the load
    (both reuse the chat template's shared start)."""
    import openai

    clients = {
        name: (openai.OpenAI(base_url=u, api_key="none", max_retries=0, timeout=timeout), model_id(u))
        for name, u in urls.items()
    }
    times = {name: [] for name in urls}
    ttfts = {name: [] for name in urls}
    for j in range(n):
        prompt, max_tokens, extra = pool[(j * 7) % len(pool)]
        prompt = f"({j + 1}) {prompt}"
        for name, (client, model) in clients.items():
            r = stream_chat(client, model, prompt, max_tokens, extra)
            times[name].append(r["total"])
            ttfts[name].append(r["ttft"])
    return {
        name: {
            "requests": n,
            "median_s": statistics.median(times[name]),
            "ttft_median_s": statistics.median(ttfts[name]),
        }
        for name in urls
    }


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))  # nearest rank
    return xs[k]


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="edgellm export directory (e.g. SmolLM2-135M 4-bit)")
    ap.add_argument("--parallel", type=int, default=8, help="slots of the second edgellm server (the first has 1)")
    ap.add_argument(
        "--gguf",
        help="the same model as a GGUF for llama.cpp's server: --llama-server's, else llama_cpp.server "
        "(skipped if that is not installed)",
    )
    ap.add_argument(
        "--llama-server",
        metavar="PATH",
        help="llama.cpp's `llama-server` binary, run on --gguf with --parallel slots (skipped when not given)",
    )
    ap.add_argument("--plain", action="store_true", help="no schemas or tools in the request pool")
    ap.add_argument("--mix", choices=("mixed", "short"), default="mixed", help="request pool (see request_pool)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="requests per client and pass")
    ap.add_argument("--rounds", type=int, default=2, help="load passes per server, interleaved")
    ap.add_argument("--single", type=int, default=16, help="single-client requests per server (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=300, help="seconds, any one request")
    ap.add_argument("--logs", default=tempfile.gettempdir(), help="folder for the servers' logs (default: temp dir)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.llama_server and not args.gguf:
        ap.error("--llama-server needs --gguf MODEL.gguf (the same model as the export)")
    if args.llama_server and not Path(args.llama_server).is_file():
        ap.error(f"--llama-server {args.llama_server}: no such file")
    work = Path(tempfile.mkdtemp(prefix="edgellm-load-"))
    export = str(tools_view(Path(args.export), work))  # the export, its template able to show tools
    (work / "tools.jinja").write_text(TOOLS_TEMPLATE)
    p1, pn = "edgellm-p1", f"edgellm-p{args.parallel}"
    servers = [
        (p1, lambda log: edgellm_server(export, args.threads, args.ctx, log)),
        (pn, lambda log: edgellm_server(export, args.threads, args.ctx, log, ("--parallel", str(args.parallel)))),
    ]
    if args.llama_server:
        ln = f"llama-server-p{args.parallel}"
        servers.append(
            (
                ln,
                lambda log: llama_server(
                    args.llama_server, args.gguf, args.threads, args.ctx, args.parallel, log, work / "tools.jinja"
                ),
            )
        )
    elif args.gguf:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("sse_starlette"):
            servers.append(("llama.cpp", lambda log: llama_cpp_server(args.gguf, args.threads, args.ctx, log)))
        else:
            print("llama.cpp server not installed (pip install 'llama-cpp-python[server]'): skipped", file=sys.stderr)
    pool = request_pool(args.mix, not args.plain)
    out = {
        **run_header(args.threads),
        "clients": args.clients,
        "requests_per_client": args.requests,
        "rounds": args.rounds,
        "mix": args.mix,
        "pool": [{"prompt_chars": len(p), "max_tokens": m, "extra": sorted(e)} for p, m, e in pool],
        "runs": [],
    }
    procs = {}
    try:
        for name, start in servers:
            log = Path(args.logs) / f"serve_load_{name}.log"
            procs[name] = (start(log), log)
            out.setdefault("rss_start_mb", {})[name] = procs[name][0].rss_mb()
        refs = {name: references(srv.base_url, pool, args.timeout) for name, (srv, _) in procs.items()}
        out["references_agree"] = refs[p1][0] == refs[pn][0]
        if not out["references_agree"]:
            print(f"warning: the references of {p1} and {pn} differ", file=sys.stderr)
        for rnd in range(args.rounds):
            for name, (srv, log) in procs.items():
                res = load_run(srv.base_url, args.clients, args.requests, pool, refs[name], args.timeout, srv.rss_mb)
                res.update(server=name, round=rnd, log=str(log))
                out["runs"].append(res)
                print(
                    f"{name:11} round {rnd}: {res['requests']} requests, {res['failed']} failed, {res['garbled']} "
                    f"garbled | TTFT p50 {res['ttft_p50_s']:.2f} s p95 {res['ttft_p95_s']:.2f} s | "
                    f"{res['tokens_per_s_per_client']:.1f} tok/s per client, {res['tokens_per_s_total']:.1f} total | "
                    f"RSS {res['rss_before_mb']:.0f} -> {res['rss_after_mb']:.0f} MiB | {res['wall_s']:.0f} s",
                    flush=True,
                )
                for e in res["errors"]:
                    print(f"  error: {e}", file=sys.stderr)
        if args.single:
            urls = {name: procs[name][0].base_url for name in (p1, pn)}
            out["single_client"] = single_client(urls, pool, args.single, args.timeout)
    finally:
        for name, (srv, _) in procs.items():
            out.setdefault("exit_codes", {})[name] = srv.close()
    by = {name: [r for r in out["runs"] if r["server"] == name] for name in procs}
    tot = _median(by[pn], "tokens_per_s_total") / _median(by[p1], "tokens_per_s_total")
    p95 = _median(by[pn], "ttft_p95_s") / _median(by[p1], "ttft_p95_s")
    out["ratios"] = {"tokens_per_s_total": tot, "ttft_p95": p95}
    print(
        f"{pn} / {p1} (medians over {args.rounds} rounds): total tokens/s {tot:.2f}x (goal >= 3), "
        f"TTFT p95 {p95:.2f}x (goal <= 0.33)"
    )
    for peer in [name for name in procs if name not in (p1, pn)]:
        tot_p = _median(by[pn], "tokens_per_s_total") / _median(by[peer], "tokens_per_s_total")
        p95_p = _median(by[pn], "ttft_p95_s") / _median(by[peer], "ttft_p95_s")
        out["ratios"][f"vs_{peer}"] = {"tokens_per_s_total": tot_p, "ttft_p95": p95_p}
        print(f"{pn} / {peer}: total tokens/s {tot_p:.2f}x, TTFT p95 {p95_p:.2f}x")
    if args.single:
        sc = out["single_client"]
        lat = sc[pn]["median_s"] / sc[p1]["median_s"]
        out["ratios"]["single_client_latency"] = lat
        print(
            f"single client, median per request: {pn} {sc[pn]['median_s']:.3f} s, {p1} {sc[p1]['median_s']:.3f} s "
            f"({lat:.3f}x, goal <= 1.05)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

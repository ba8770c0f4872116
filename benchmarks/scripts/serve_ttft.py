"""Second-turn time to first token of `edgellm serve`, with and without prefix (KV-cache) reuse.

    python -m edgellm.benchmarks.scripts.serve_ttft EXPORT_DIR --threads 2 --rounds 3

Run it alone (nothing else busy on the machine).

Two servers of the same export run side by side (127.0.0.1, free ports): one default, one with
--no-prefix-cache. A conversation starts with a system message holding --history tokens or so of
text (the Python docs corpus) and one user question; turn 2 appends the reply and a follow-up
question. Each round asks turn 1 then turn 2 of each server in turn (interleaved, so a noisy
stretch of a shared machine hits both); TTFT is client-side, the `openai` client streaming, to the
first non-empty content chunk. Both servers must give the same turn-2 text (greedy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from edgellm.benchmarks.scripts._common import edgellm_server, model_id


def history_text(n_tokens: int, tokenizer) -> str:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text).ids[:n_tokens]
    return tokenizer.decode(ids)


def turn(client, model: str, messages: list, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, text, use = None, [], None
    for c in client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if c.usage is not None:
            use = c.usage
        if c.choices and c.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(c.choices[0].delta.content)
    return {
        "ttft": (first or time.perf_counter()) - t0,
        "text": "".join(text),
        "prompt_tokens": use.prompt_tokens,
        "cached_tokens": use.prompt_tokens_details.cached_tokens,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export")
    ap.add_argument(
        "--history", type=int, nargs="+", default=[200, 800], help="tokens of text in the system message (one run each)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--json")
    ap.add_argument("--logs", default=tempfile.gettempdir(), help="folder for the servers' logs (default: temp dir)")
    args = ap.parse_args()
    import openai
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(args.export) / "tokenizer.json"))
    servers = {
        "reuse": edgellm_server(args.export, args.threads, args.ctx, Path(args.logs) / "serve_ttft_reuse.log"),
        "no reuse": edgellm_server(
            args.export, args.threads, args.ctx, Path(args.logs) / "serve_ttft_noreuse.log", ["--no-prefix-cache"]
        ),
    }
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "rounds": args.rounds, "runs": []}
    try:
        clients = {
            k: openai.OpenAI(base_url=s.base_url, api_key="none", max_retries=0, timeout=300)
            for k, s in servers.items()
        }
        model = model_id(servers["reuse"].base_url)
        for n in args.history:
            doc = history_text(n, tok)
            t2 = {k: [] for k in servers}
            t1 = {k: [] for k in servers}
            last = {}
            for r in range(args.rounds):
                for k, client in clients.items():
                    msgs = [
                        {"role": "system", "content": f"Answer questions about this text.\n\n{doc}"},
                        {"role": "user", "content": f"Round {r}: what is the text about?"},
                    ]
                    a = turn(client, model, msgs, args.max_tokens)
                    msgs += [
                        {"role": "assistant", "content": a["text"]},
                        {"role": "user", "content": "Give it a short title."},
                    ]
                    b = turn(client, model, msgs, args.max_tokens)
                    t1[k].append(a["ttft"])
                    t2[k].append(b["ttft"])
                    last[k] = b
            same = last["reuse"]["text"] == last["no reuse"]["text"]
            res = {
                "history_tokens": n,
                "turn2_prompt_tokens": last["reuse"]["prompt_tokens"],
                "turn2_cached_tokens": {k: v["cached_tokens"] for k, v in last.items()},
                "turn1_ttft_median_s": {k: statistics.median(v) for k, v in t1.items()},
                "turn2_ttft_s": t2,
                "turn2_ttft_median_s": {k: statistics.median(v) for k, v in t2.items()},
                "same_text": same,
            }
            out["runs"].append(res)
            m = res["turn2_ttft_median_s"]
            print(
                f"turn-2 prompt {res['turn2_prompt_tokens']} tokens ({res['turn2_cached_tokens']['reuse']} reused): "
                f"TTFT median {m['reuse'] * 1000:.0f} ms with reuse, {m['no reuse'] * 1000:.0f} ms without "
                f"({m['no reuse'] / m['reuse']:.1f}x); turn 1 {res['turn1_ttft_median_s']['reuse'] * 1000:.0f} / "
                f"{res['turn1_ttft_median_s']['no reuse'] * 1000:.0f} ms; same text: {same}",
                flush=True,
            )
    finally:
        for s in servers.values():
            s.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

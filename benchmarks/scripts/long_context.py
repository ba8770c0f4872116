"""Decode and prompt speed against the context length (issue 27, goals 3 and 4), not in CI.

For each context c: a prompt of c tokens is read (timed: the prompt rate at c tokens), then
`--tokens` greedy decode steps run after it (timed: the decode rate at c tokens of context).
Contexts are interleaved over `--rounds`; medians. Beside each rate: the KV cache bytes a decode
step reads at that context (fp16 keys and values of every layer) and what a pure stream of weights +
cache would allow relative to the shortest context, so a fall in rate can be told apart from the
cache's own bytes; "context share" = 1 - t(shortest) / t(c) is the part of the step that the
longer context added (attention over the cache, mostly).

    python -m edgellm.benchmarks.scripts.long_context EXPORT_DIR --ctx 128,1024,2048,4096 --pp 512,2048 --bursts 20

`--bursts N` adds N rounds of 8 decode steps at each context in alternation over one filled cache
(columns "alt"): on a machine whose speed switches between states seconds apart, the ratio to the
shortest context is then measured within a second, not across whole prompts.

An export whose config allows fewer positions than the longest context asked for can be
stretched with `--positions N`: the script writes a copy of model.onnx (a few MB) whose recorded
`max_position_embeddings` is N into a temporary folder beside links to the original weights, and
says so in its output (rotary tables are computed, so the positions beyond the trained ones cost
what they would in a model trained for them; the logits are not used for anything but argmax).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgellm.benchmarks.scripts._common import cpu_name


def stretched(src: Path, positions: int, tmp: Path) -> Path:
    """A view of the export at `src` whose config allows `positions` positions."""
    import onnx

    dst = tmp / "stretched"
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.onnx":
            os.symlink(f.resolve(), dst / f.name)
    m = onnx.load(str(src / "model.onnx"), load_external_data=False)
    for p in m.metadata_props:
        if p.key == "edgellm.config":
            cfg = json.loads(p.value)
            cfg["max_position_embeddings"] = positions
            p.value = json.dumps(cfg)
    onnx.save(m, str(dst / "model.onnx"))
    return dst


def ids_for(n: int, vocab: int) -> np.ndarray:
    return ((np.arange(n, dtype=np.int64) * 7919 + 11) % max(2, vocab - 10)) + 5


def one(model, c: int, tokens: int) -> tuple[float, float]:
    """(seconds to read a c-token prompt, seconds per decode step after it)."""
    model.reset()
    t0 = time.perf_counter()
    logits = model.forward(ids_for(c, model.config.vocab_size), prompt=True)
    prompt = time.perf_counter() - t0
    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = int(np.argmax(model.forward(np.array([tok], np.int64))))
    return prompt, (time.perf_counter() - t0) / tokens


def bursts(model, ctxs: list[int], rounds: int, burst: int) -> dict[int, list[float]]:
    """Seconds per decode step at each context, the contexts in alternation `burst` steps at a
    time (`--bursts`): the cache is filled once with max(ctxs) positions, then each burst starts at
    position c (the step writes positions c.., which the next burst at c overwrites; what they
    hold does not change the time). A switch of the machine's speed then falls on every context
    alike, which rounds of whole prompts, seconds apart, do not promise."""
    model.reset()
    model.forward(ids_for(max(ctxs), model.config.vocab_size), prompt=True)
    out = {c: [] for c in ctxs}
    tok = 5
    for _ in range(rounds):
        for c in ctxs:
            model.state.pos = c  # back (or forward) to c: positions below c hold the prompt's keys
            t0 = time.perf_counter()
            for _ in range(burst):
                tok = int(np.argmax(model.forward(np.array([tok], np.int64))))
            out[c].append((time.perf_counter() - t0) / burst)
    return out


def kv_bytes(cfg, c: int, itemsize: int) -> int:
    """Keys and values of every layer for c positions (the bytes one decode step reads at c)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize * c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path)
    ap.add_argument("--ctx", default="128,1024,2048,4096", help="contexts for the decode rate (comma list)")
    ap.add_argument("--pp", default="512,2048", help="prompt lengths for the prompt rate (comma list)")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed after each prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--positions", type=int, help="stretch the export's max_position_embeddings to this")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument(
        "--bursts",
        type=int,
        default=0,
        help="then this many rounds of 8 decode steps at each context in alternation (a column 'alt')",
    )
    a = ap.parse_args()
    from edgellm.runtime.model import NumbaModel

    ctxs = sorted({int(x) for x in a.ctx.split(",")} | {int(x) for x in a.pp.split(",")})
    positions = max(a.positions, max(ctxs) + a.tokens) if a.positions else None
    with tempfile.TemporaryDirectory() as tmp:
        path = stretched(a.export, positions, Path(tmp)) if positions else a.export
        model = NumbaModel(path, n_ctx=max(ctxs) + a.tokens, threads=a.threads)
        model.warmup()
        one(model, 16, 4)  # the prompt tiles and the decode step compiled / loaded, caches touched
        prompt = {c: [] for c in ctxs}
        step = {c: [] for c in ctxs}
        for _ in range(a.rounds):
            for c in ctxs:
                p, s = one(model, c, a.tokens)
                prompt[c].append(p)
                step[c].append(s)
        dctx = sorted(int(x) for x in a.ctx.split(","))
        alt = bursts(model, dctx, a.bursts, min(8, a.tokens)) if a.bursts else {}
        cfg, itemsize = model.config, 2 if model.kv_cache == "fp16" else 4
        weights = sum(os.path.getsize(f) for f in Path(path).iterdir() if f.name.startswith("model.onnx"))
        tier = model.tier.name
        model.close()
    base = min(ctxs)
    t_base = statistics.median(step[base])
    rows = []
    for c in ctxs:
        t = statistics.median(step[c])
        kv = kv_bytes(cfg, c, itemsize)
        rows.append(
            dict(
                ctx=c,
                tg=round(1 / t, 2),
                tg_range=[round(1 / max(step[c]), 2), round(1 / min(step[c]), 2)],
                tg_vs_shortest=round(t_base / t, 3),
                stream_bound_vs_shortest=round((weights + kv_bytes(cfg, base, itemsize)) / (weights + kv), 3),
                kv_mb=round(kv / 1e6, 1),
                context_share=round(1 - t_base / t, 3),
                pp=round(c / statistics.median(prompt[c]), 1),
            )
        )
        if c in alt:
            rows[-1].update(
                tg_alt=round(1 / statistics.median(alt[c]), 2),
                tg_alt_vs_shortest=round(statistics.median(alt[min(alt)]) / statistics.median(alt[c]), 3),
            )
    head = dict(
        date=time.strftime("%Y-%m-%d %H:%M"),
        cpu=cpu_name(),
        tier=tier,
        threads=a.threads,
        export=str(a.export),
        stretched_positions=positions,
        weights_mb=round(weights / 1e6, 1),
        kv_cache=f"fp{8 * itemsize}",
        rounds=a.rounds,
        tokens=a.tokens,
        bursts=a.bursts,
    )
    print(json.dumps(head))
    print(
        "| context | tg tok/s (min-max) | vs shortest | weights+KV bound vs shortest | KV read MB "
        "| context share | pp tok/s | alt tg tok/s | alt vs shortest |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lo, hi = r["tg_range"]
        print(
            f"| {r['ctx']} | {r['tg']} ({lo}-{hi}) | {r['tg_vs_shortest']} | {r['stream_bound_vs_shortest']} "
            f"| {r['kv_mb']} | {r['context_share']} | {r['pp']} | {r.get('tg_alt', '-')} "
            f"| {r.get('tg_alt_vs_shortest', '-')} |"
        )
    if a.json:
        a.json.write_text(json.dumps(dict(head, rows=rows), indent=1))


if __name__ == "__main__":
    main()

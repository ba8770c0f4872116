"""The decode step's share of the memory-bandwidth bound, with the bound measured beside each
measurement (issue 27, goal 1). On a shared VM the read bandwidth moves within minutes (the probe
read 49-84 GB/s on one machine in one day), so one probe at the start of a run can put the same
step at 72% or 96% of "the bound". Here each round measures the probe (a float32 sum over 1 GiB,
the decode's threads, best of 5) and then `--steps` greedy decode steps of the export (median),
alternating; the share is bytes of weights per token / step time / that round's probe.

    python -m edgellm.benchmarks.scripts.bound_share EXPORT [EXPORT ...] --rounds 5 [--linears] --out results/bound.md

`--linears` also times each linear of the step alone (in the step's order, so the others evict it from the
caches) and prints the streaming rate per shape: where the step's time goes, and whether any kernel reads slower
than the rest.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from edgellm.benchmarks.scripts._common import run_header, write_table
from edgellm.benchmarks.scripts.runtime_decode import bandwidth_gbs


def decode_ms(model, steps: int, at: int = 64) -> float:
    """Median ms of `steps` single-token steps after a prompt of `at` tokens."""
    ids = (np.arange(at + steps, dtype=np.int64) * 7919 + 11) % 30000 + 10
    model.reset()
    model.forward(ids[:at])
    times = []
    for i in range(at, at + steps):
        t0 = time.perf_counter()
        model.forward(ids[i : i + 1])
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def linear_rates(model, rounds: int = 5) -> list[dict]:
    """Each linear of the step timed alone (`linear_few` with one token), in the step's order, so that
    the others evict it from the caches between its calls; grouped by shape: ms summed, GB/s."""
    from edgellm.runtime.kernels import quant as Q

    lin = model.weights.linears()  # the decoder layers' records, then the head
    prep = []
    for d in lin:
        x = np.random.default_rng(0).standard_normal((1, int(d.k))).astype(np.float32)  # (1, k)
        out = np.zeros((1, int(d.n)), np.float32)  # (1, n)
        bufs = Q.act_buffers(d, 1)
        Q.linear_few(d, x, out, *bufs, model.tier)
        prep.append((d, x, out, bufs))
    times = [[] for _ in lin]
    for _ in range(rounds):
        for i, (d, x, out, bufs) in enumerate(prep):
            t0 = time.perf_counter()
            Q.linear_few(d, x, out, *bufs, model.tier)
            times[i].append(time.perf_counter() - t0)
    groups: dict = {}
    for i, d in enumerate(lin):
        key = ("head" if i == len(lin) - 1 else "layer", int(d.n), int(d.k), int(d.kind))
        g = groups.setdefault(key, {"count": 0, "s": 0.0, "bytes": 0})
        g["count"] += 1
        g["s"] += statistics.median(times[i])
        g["bytes"] += int(d.n) * int(d.row_bytes)
    return [
        {"what": k[0], "n": k[1], "k": k[2], "kind": k[3], **g, "gbs": g["bytes"] / g["s"] / 1e9}
        for k, g in groups.items()
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--linears", action="store_true", help="also each linear's streaming rate, timed alone")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from edgellm.runtime.model import NumbaModel

    head = run_header(args.threads)
    rows = []
    for path in args.exports:
        m = NumbaModel(path, n_ctx=256, threads=args.threads)
        m.warmup()
        per = int(m.weights.bytes_per_token)
        rounds = []
        for _ in range(args.rounds):
            bw = bandwidth_gbs(args.threads, 1024)
            ms = decode_ms(m, args.steps)
            rounds.append({"probe_gbs": bw, "step_ms": ms, "share": per / (ms / 1e3) / 1e9 / bw})
            print(
                f"{Path(path).name}: probe {bw:.1f} GB/s, step {ms:.2f} ms, {100 * rounds[-1]['share']:.0f}%",
                flush=True,
            )
        lines = linear_rates(m) if args.linears else []
        for g in lines:
            print(
                f"  {g['what']} {g['n']}x{g['k']} (kind {g['kind']}) x{g['count']}: {1e3 * g['s']:.2f} ms, "
                f"{g['bytes'] / 1e6:.1f} MB, {g['gbs']:.1f} GB/s",
                flush=True,
            )
        shares = [r["share"] for r in rounds]
        rows.append(
            {
                "export": path,
                "bytes_per_token": per,
                "kernels": m.tier.name,
                "rounds": rounds,
                "share_median": statistics.median(shares),
                "share_min": min(shares),
                "share_max": max(shares),
                "linears": lines,
            }
        )
        del m
    table = (
        f"Decode step vs the read bandwidth, measured in alternation ({head['cpu']}, {args.threads} threads, "
        f"{head['date']}; {args.rounds} rounds)\n\n| export | MB/token | kernels | probe GB/s | step ms | share of the "
        "bound, median (range) |\n|---|---|---|---|---|---|\n"
    )
    for r in rows:
        probes = [x["probe_gbs"] for x in r["rounds"]]
        steps = [x["step_ms"] for x in r["rounds"]]
        table += (
            f"| {Path(r['export']).name} | {r['bytes_per_token'] / 1e6:.1f} | {r['kernels']} | "
            f"{min(probes):.1f}-{max(probes):.1f} | {statistics.median(steps):.2f} "
            f"({min(steps):.2f}-{max(steps):.2f}) | "
            f"{100 * r['share_median']:.0f}% ({100 * r['share_min']:.0f}-{100 * r['share_max']:.0f}%) |\n"
        )
    print(table, flush=True)
    write_table(table, [head | {"exports": rows}], args.out)


if __name__ == "__main__":
    main()

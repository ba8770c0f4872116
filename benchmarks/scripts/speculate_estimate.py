"""ESTIMATE, not a measurement: the speed-up of speculative decoding for 1B / 3B / 8B targets from a
measured acceptance curve, the verify-pass cost measured at 1.1B shape and each target's bytes per token.

    python -m edgellm.benchmarks.scripts.speculate_estimate \
        --spec speculate-pair.json --verify speculate-verify-tl11.json \
        --verify-model TL11_EXPORT --draft DRAFT_EXPORT [--out estimate.md] \
        [--pair-verify speculate-verify-target.json --pair-model TARGET_EXPORT]

Inputs (every figure measured by a run, none assumed):
- `--spec`: the JSON of `benchmarks/scripts/speculate.py --draft ... --out X.md` (X.json): the pooled
  acceptance by draft position a_i = P(draft i accepted | drafts 1..i-1 accepted), i = 1..;
- `--verify`: the JSON of `speculate.py --model TL11_EXPORT --verify-only --ks 1,2,...,8 --out Y.md` (Y.json):
  V(k) = time of one target pass over 1 + k tokens / time of one decode step, and that decode step's time
  t_1.1B, on a random-weight TinyLlama-1.1B-shaped 4-bit export (`--verify-model`, its bytes per token b_1.1B);
- `--draft`: the draft export; its one-token decode step is timed here (median at position 200): t_d.

The model, per target T with bytes per decoded token b_T (4-bit g128 linears, 8-bit embeddings/head, the
tl11 export's format: the formula `shape_bytes` reproduces that export's own count, checked at start):

    decode step   t_T  = t_1.1B * b_T / b_1.1B      (decode is bandwidth-bound: same effective GB/s)
    verify pass   V_T(k) = V(k)                     (one weight read + k tokens' extra dot products; both
                                                     scale with the weights, so the ratio carries over)
    tokens/round  E(k) = 1 + sum_{j=1..k} prod_{i=1..j} a_i
    time/round    C(k) = k * t_d + V(k) * t_T
    speed-up      S(k) = E(k) * t_T / C(k),  reported for the best k (a fixed k per round; the runtime's
                                              adaptive k does about as well as the best fixed k)

and, inverted, the per-position acceptance a (the same at every position) a target needs for a goal speed-up G
at the best k: the smallest a with max_k S(k) >= G. Caveats, printed with the table: the acceptance curve
comes from the pair it was measured on (a 135M target and its draft), not from a 1B/3B/8B model and its
draft; the draft step time is that draft's (a draft for an 8B target with a 128k-token head reads more);
V(k) at 3B/8B is the 1.1B ratio unless `--measured SHAPE=VERIFY_JSON,EXPORT` gives the verify pass and decode
step measured on a random-weight export of that shape (`stream_quantize.py` builds its checkpoint layer-streamed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from edgellm.benchmarks.scripts._common import write_table

# Published configs (config.json): hidden, intermediate, layers, heads, kv heads, head dim, vocab, tied head
SHAPES = {
    "TinyLlama-1.1B (the measured shape)": (2048, 5632, 22, 32, 4, 64, 32000, False),
    "Llama-3.2-1B": (2048, 8192, 16, 32, 8, 64, 128256, True),
    "Llama-3.2-3B": (3072, 8192, 28, 24, 8, 128, 128256, True),
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128, 128256, False),
}
LINEAR_BYTES = 0.5 + 2 / 128  # 4-bit weights + an fp16 scale per 128
HEAD_BYTES = 1 + 2 / 128  # 8-bit head + an fp16 scale per 128 (wider groups only lower it)


def shape_bytes(shape) -> float:
    """Weight bytes read per decoded token: every linear of every layer + the head (one embedding row: ~0)."""
    h, inter, layers, heads, kv, hd, vocab, _tied = shape
    per_layer = h * (heads + 2 * kv) * hd + heads * hd * h + 3 * h * inter  # qkv, o, gate/up/down
    return layers * per_layer * LINEAR_BYTES + vocab * h * HEAD_BYTES


def export_bytes(path) -> int:
    """The runtime's own count of weight bytes read per decoded token (its weight descriptors)."""
    from edgellm.runtime.model import NumbaModel

    m = NumbaModel(path, n_ctx=16, threads=1)
    try:
        return int(m.weights.bytes_per_token)
    finally:
        m.close()


def draft_step_s(path, threads: int, at: int = 200, reps: int = 40) -> float:
    from edgellm.runtime.model import NumbaModel

    m = NumbaModel(path, n_ctx=at + 8, threads=threads)
    m.warmup()
    ids = (np.arange(at + 1, dtype=np.int64) * 7919 + 11) % 30000 + 10
    m.forward(ids[:at])
    ts = []
    for _ in range(reps):
        m.truncate(at)
        t0 = time.perf_counter()
        m.forward(ids[at : at + 1])
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def tokens_per_round(curve: list[float], k: int) -> float:
    """E(k) = 1 + sum_j prod_{i<=j} a_i; positions past the measured curve take its last value."""
    e, p = 1.0, 1.0
    for i in range(k):
        p *= curve[min(i, len(curve) - 1)]
        e += p
    return e


def speedup(curve, k: int, vk: float, draft_ratio: float) -> float:
    """S(k) = E(k) / (k * t_d / t_T + V(k))."""
    return tokens_per_round(curve, k) / (k * draft_ratio + vk)


def best(curve, verify: dict[int, float], draft_ratio: float) -> tuple[int, float]:
    return max(((k, speedup(curve, k, v, draft_ratio)) for k, v in verify.items() if k > 0), key=lambda x: x[1])


def needed_acceptance(goal: float, verify: dict[int, float], draft_ratio: float) -> float | None:
    """The smallest flat per-position acceptance a whose best-k speed-up reaches `goal` (None: not even a = 1)."""
    if best([1.0], verify, draft_ratio)[1] < goal:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if best([mid], verify, draft_ratio)[1] >= goal else (mid, hi)
    return hi


def load_verify(path: Path) -> tuple[dict[int, float], float]:
    """speculate.py --verify-only JSON -> ({k: V(k)}, decode step seconds)."""
    rows = json.loads(path.read_text())[0]["verify"]
    return {r["k"]: r["vs_decode"] for r in rows}, next(r["ms"] for r in rows if r["k"] == 0) / 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--spec", type=Path, help="speculate.py --draft ... --out X.md: X.json (without: only the acceptance needed)"
    )
    ap.add_argument("--verify", type=Path, required=True, help="speculate.py --verify-only --out Y.md: Y.json")
    ap.add_argument("--verify-model", type=Path, required=True, help="the export the verify cost was measured on")
    ap.add_argument("--draft", type=Path, help="the draft export (its decode step is timed here)")
    ap.add_argument("--draft-ms", type=float, help="the draft's decode step in ms instead of timing --draft")
    ap.add_argument("--pair-verify", type=Path, help="speculate.py --verify-only JSON of the measured pair's target")
    ap.add_argument("--pair-model", type=Path, help="the measured pair's target export (with --pair-verify)")
    ap.add_argument(
        "--measured",
        action="append",
        default=[],
        metavar="SHAPE=VERIFY_JSON,EXPORT",
        help="use V(k) and the decode step measured on a random-weight export of that shape (a SHAPES name, e.g. "
        "Llama-3.2-3B) instead of the 1.1B ratio and scaled step (repeatable)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--goal", type=float, default=1.8, help="speed-up goal for the 'acceptance needed' column")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if (a.draft is None) == (a.draft_ms is None):
        raise SystemExit("give --draft DIR or --draft-ms MS")
    spec = json.loads(a.spec.read_text())[0] if a.spec else None
    sp = spec["speculation"] if spec else None
    curve = sp["acceptance_by_position"] if sp else None
    verify, t_ref = load_verify(a.verify)
    b_ref = export_bytes(a.verify_model)
    formula = shape_bytes(SHAPES["TinyLlama-1.1B (the measured shape)"])
    if abs(formula / b_ref - 1) > 0.03:
        raise SystemExit(f"shape_bytes gives {formula / 1e6:.1f} MB for TinyLlama, the export counts {b_ref / 1e6:.1f}")
    t_d = draft_step_s(a.draft, a.threads) if a.draft else a.draft_ms / 1e3
    gbs = b_ref / t_ref / 1e9
    lines = ["**ESTIMATE, not a measurement** (benchmarks/scripts/speculate_estimate.py; formula in its docstring)", ""]
    if sp:
        lines.append(
            f"- acceptance by draft position, measured on {spec.get('model')} with draft {spec.get('draft')}: "
            + " ".join(f"{100 * x:.0f}%" for x in curve)
            + f" (pooled {100 * (sp['acceptance'] or 0):.0f}%, mean accepted length {sp['mean_accepted'] or 0:.2f}, "
            f"that run's own timing {sp['speedup']:.2f}x, valid only if it ran alone)"
        )
    lines += [
        f"- verify pass V(k) measured on {a.verify_model.name} ({b_ref / 1e6:.0f} MB/token, decode step "
        f"{1e3 * t_ref:.2f} ms = {gbs:.1f} GB/s effective): "
        + ", ".join(f"k={k}: {v:.2f}x" for k, v in sorted(verify.items()) if k),
        f"- draft decode step t_d: {1e3 * t_d:.2f} ms"
        + (f" (timed here: {a.draft.name}, {a.threads} threads)" if a.draft else " (given)"),
        "",
        "| target | bytes/token | decode step | t_d / t_T | best k | tokens/round | speed-up (ESTIMATE) | "
        f"flat acceptance needed for {a.goal:g}x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    measured = {}
    for spec_ in a.measured:
        name, _, files = spec_.partition("=")
        vj, _, ex = files.partition(",")
        if name not in SHAPES or not vj or not ex:
            raise SystemExit(f"--measured {spec_!r}: give SHAPE=VERIFY_JSON,EXPORT, SHAPE one of {', '.join(SHAPES)}")
        mv, mt = load_verify(Path(vj))
        measured[name] = (f"{name} (V(k) and step measured on {Path(ex).name})", export_bytes(Path(ex)), mv, mt)
    targets = [
        measured.get(name, (name, b_ref if name.startswith("TinyLlama") else shape_bytes(shape), verify, None))
        for name, shape in SHAPES.items()
    ]
    if a.pair_verify:
        pv, pt = load_verify(a.pair_verify)
        targets.insert(
            0,
            (
                f"{a.pair_model.name} (the pair's target, its own V(k), measured step)",
                export_bytes(a.pair_model),
                pv,
                pt,
            ),
        )
    rows = []
    for name, b, vk, t_meas in targets:
        t_t = t_meas if t_meas is not None else t_ref * b / b_ref
        ratio = t_d / t_t
        k, s = best(curve, vk, ratio) if curve else (None, None)
        need = needed_acceptance(a.goal, vk, ratio)
        rows.append(dict(target=name, bytes=b, t_ms=1e3 * t_t, ratio=ratio, k=k, speedup=s, need=need))
        lines.append(
            f"| {name} | {b / 1e6:.0f} MB | {1e3 * t_t:.2f} ms | {ratio:.3f} | {k or '—'} | "
            + (f"{tokens_per_round(curve, k):.2f} | **{s:.2f}x** | " if curve else "— | — | ")
            + ("unreachable" if need is None else f"{100 * need:.0f}%")
            + " |"
        )
    lines += [
        "",
        "Caveats: the acceptance curve is the measured pair's, not a 1B/3B/8B model's and its draft's; t_d is that "
        "draft's step (a draft with a 128k-token head reads more); "
        + (
            f"V(k) and the decode step of {', '.join(measured)} were measured on random-weight exports of them; "
            if measured
            else ""
        )
        + "the other targets' V(k) is the 1.1B ratio and their decode time scales with bytes at the 1.1B export's "
        "effective bandwidth.",
    ]
    table = "\n".join(lines)
    write_table(table, [{"curve": curve, "verify": verify, "t_ref_s": t_ref, "t_d_s": t_d, "rows": rows}], a.out)


if __name__ == "__main__":
    main()

"""*Estimated* Raspberry Pi decode speed of an export: bytes read per token against each board's
memory bandwidth, and against the NEON loop's instruction throughput. No Pi was measured here;
every output line says "estimated".

    python -m edgellm.benchmarks.scripts.pi_estimate EXPORT_DIR [--ctx 64] [--threads 4]

Bytes per token = every linear's weights and scales (the runtime's own count,
Weights.bytes_per_token) + the fp16 KV cache read at `--ctx` cached positions. Decode at batch 1
streams all of them once per token, so tokens/s <= bandwidth / bytes. Bandwidth figures (GB/s):

    Pi 4 (BCM2711, LPDDR4-3200):  peak 12.8 = 3200 MT/s x 4 bytes (32-bit bus); measured 5.56, the
        best STREAM kernel (Scale) on a headless Pi 4, https://www.sci-pi.org.uk/bench/stream.html
    Pi 5 (BCM2712, LPDDR4X-4267): peak 17.1 = 4267 MT/s x 4 bytes; no measured figure was found, so
        the Pi 4's measured/peak ratio (0.43) is applied: 7.4 (an assumption, labelled so)
    RAM types and clocks: https://forum.digikey.com/t/raspberry-pi-5-vs-other-models-evaluation-test/53405

The compute side: instructions per 64 weight bytes of the decode tile's loop (neon_asm, 4 rows x 1
token) at an assumed sustained IPC (ASSUMED_IPC) and the boards' clocks, times threads.
"""

from __future__ import annotations

import argparse
import sys

BOARDS = {
    # name: (tier, cpu, GHz, measured-or-derived GB/s, peak GB/s, how the GB/s was obtained)
    "Raspberry Pi 4": ("neon", "cortex-a72", 1.8, 5.56, 12.8, "STREAM, sci-pi.org.uk"),
    "Raspberry Pi 5": ("neon-dotprod", "cortex-a76", 2.4, 17.1 * 5.56 / 12.8, 17.1, "peak x Pi 4 STREAM/peak"),
}
ASSUMED_IPC = 2.0  # sustained instructions per cycle in the tile loop (A72: 3-wide decode, A76: 4-wide)


def bytes_per_token(path, ctx: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) the runtime reads per decoded token at `ctx` positions."""
    from edgellm.runtime.plan import plan_export

    plan = plan_export(path, who="the estimate")
    cfg = plan.config
    kv = (
        2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * ctx * (2 if plan.quant else 4)
    )  # K and V, fp16 beside quantized
    per = plan.bytes_per_token
    plan.export.close()
    return per, kv


def estimate(path, ctx: int = 64, threads: int = 4) -> list[dict]:
    from . import neon_asm

    weights, kv = bytes_per_token(path, ctx)
    total = weights + kv
    rows = []
    for board, (tier, cpu, ghz, gbs, peak, how) in BOARDS.items():
        per64, _ = neon_asm.per_64_bytes(tier, 4, 1, 4, cpu)
        compute_gbs = threads * ghz * ASSUMED_IPC / per64 * 64  # GB/s of weights the loop can consume
        rows.append(
            {
                "board": board,
                "tier": tier,
                "bytes": total,
                "bandwidth_gbs": gbs,
                "peak_gbs": peak,
                "how": how,
                "instr_per_64": per64,
                "compute_gbs": compute_gbs,
                "tok_s_bandwidth": gbs * 1e9 / total,
                "tok_s_peak": peak * 1e9 / total,
                "tok_s": min(gbs, compute_gbs) * 1e9 / total,
            }
        )
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pi_estimate", description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("--ctx", type=int, default=64, help="cached positions whose K/V each token reads")
    ap.add_argument("--threads", type=int, default=4)
    a = ap.parse_args(argv)
    weights, kv = bytes_per_token(a.export, a.ctx)
    print(f"bytes per token: weights {weights / 1e6:.1f} MB + KV cache at {a.ctx} positions {kv / 1e6:.2f} MB")
    for r in estimate(a.export, a.ctx, a.threads):
        print(
            f"{r['board']} ({r['tier']}), estimated: {r['tok_s']:.0f} tok/s  [bandwidth {r['bandwidth_gbs']:.2f} GB/s "
            f"({r['how']}) -> {r['tok_s_bandwidth']:.0f}; peak {r['peak_gbs']:.1f} GB/s -> {r['tok_s_peak']:.0f}; loop "
            f"{r['instr_per_64']:.0f} instr/64 B at IPC {ASSUMED_IPC:g} x {a.threads} threads -> "
            f"{r['compute_gbs']:.1f} GB/s]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

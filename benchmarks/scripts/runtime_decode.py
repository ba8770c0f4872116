"""Decode and prompt speed of edgellm's numba runtime vs ONNX Runtime vs llama.cpp, side by side:
a thin script over `edgellm bench`'s worker (benchmarks/worker.py, same pp/tg protocol, each
measurement in its own process so peak RSS is per engine).

What it adds for a one-off comparison table: `--rounds` interleave the engines (ABCABC...) and
the medians pool every repetition of every round; GGUF peers made with llama.cpp's own
llama_model_quantize from --gguf-src (requantized with allow_requantize when the source is already
quantized: speed depends on the format, not on where the values came from); the numba runtime's
first-ever start (an empty compile cache: load + first prefill includes compiling the kernels);
and a memory-bandwidth probe with the 4-bit bandwidth bound. Run it alone:

    python -m edgellm.benchmarks.scripts.runtime_decode --q4 Q4_EXPORT_DIR --q8 Q8_EXPORT_DIR \
        --fp32 FP32_EXPORT_DIR --gguf-src SmolLM2-135M-Instruct.Q4_1.gguf --gguf-dir GGUF_DIR --threads 2

Kernel tiers (runtime/kernels/tiers.py): `--numba TIER@CPU` (repeatable) runs the numba runtime on
that tier with numba compiling for CPU (the worker gets NUMBA_CPU_NAME=CPU, so the float kernels
are that CPU's too; `native` = this machine's x86-64 level, the runtime's default, kernels/pin.py;
`host` = this machine's CPU by name), e.g. `--numba avx2@haswell` for an AVX2 laptop.
`--peer NAME=WHERE` (repeatable) runs llama.cpp from another llama-cpp-python build: WHERE is a
folder holding its `llama_cpp` package (`pip install --target DIR llama_cpp_python-*.whl`) or the
python of a venv that has it; the worker imports it first through PYTHONPATH. `--no-ort` leaves
ONNX Runtime out. `--q4-gguf Q4_0,Q4_K_M` adds llama.cpp's K-quant beside Q4_0 (made from --gguf-src:
give an F32 GGUF, e.g. scripts/llamacpp_quant.write_f32_gguf's, so neither is a requantization);
`--genai DIR` adds ONNX Runtime GenAI on its own builder's int4 model (scripts/ort_genai_build),
`--genai q4` on the 4-bit export itself. `--ov DIR` (repeatable) adds OpenVINO GenAI's LLMPipeline on
OpenVINO's own int4 model (`optimum-cli export openvino --weight-format int4`), run by `--ov-python`,
the python of the venv openvino-genai lives in (scripts/ov_genai_speed.py; default: this python).
The last lines give, per numba row, its share of the
bandwidth bound and its tg/pp ratio to every peer of the same format. Setting NUMBA_CPU_NAME for a
benchmark child is how a laptop CPU is emulated here; the runtime itself has no such knob (load(kernels=) picks a tier).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgellm.benchmarks.scripts._common import llama_quantize, measure, run_header
from edgellm.benchmarks.scripts.ov_genai_speed import check_peer, measure_ov

FTYPES = {"F32": 0, "Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}


@functools.cache
def _probes():
    """The two read patterns of bandwidth_gbs, compiled once per process (bound_share calls it
    every round)."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def total(a):  # one stream per thread
        s = 0.0
        for i in prange(a.size):
            s += a[i]
        return s

    @njit(parallel=True, fastmath=True)
    def rows8(w, out):  # w (R, C) float32 -> out (R // 8,): eight rows summed together
        for q in prange(w.shape[0] // 8):
            r, s = 8 * q, np.float32(0)
            for j in range(w.shape[1]):
                s += w[r, j] + w[r + 1, j] + w[r + 2, j] + w[r + 3, j]
                s += w[r + 4, j] + w[r + 5, j] + w[r + 6, j] + w[r + 7, j]
            out[q] = s

    return total, rows8


def bandwidth_gbs(threads: int, mib: int = 256) -> float:
    """Read bandwidth (GB/s) of `threads` threads (numba prange) streaming `mib` MiB: the ceiling
    for a memory-bound decode step on this machine. The best of two read patterns: one float32
    stream per thread (a plain sum), and eight interleaved row streams per thread, as the decode
    kernels read (a tile of 4 rows, each with its codes and its scales). A single Ice Lake server
    core keeps too few lines in flight on one stream: there the plain sum read less than the 1.1B
    decode step itself streamed, and eight row streams 1.5x the plain sum (RESULTS §43)."""
    import numba

    total, rows8 = _probes()
    numba.set_num_threads(threads)
    a = np.ones(mib * 2**20 // 4, np.float32)
    w = a.reshape(-1, 8192)
    out = np.zeros(w.shape[0] // 8, np.float32)
    best = 0.0
    for probe in (lambda: total(a), lambda: rows8(w, out)):
        probe()  # compile (once per process), and fault the pages in
        for _ in range(5):
            t = time.perf_counter()
            probe()
            best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def make_gguf(src: Path, dst: Path, ftype: str) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)  # --gguf-dir may be new (llama.cpp's own error: "iostream error")
    try:
        llama_quantize(src, dst, FTYPES[ftype], threads=2, allow_requantize=True)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q4", help="4-bit export directory")
    ap.add_argument("--q8", help="8-bit export directory")
    ap.add_argument("--fp32", help="float export directory")
    ap.add_argument("--gguf-src", help="a .gguf to make the llama.cpp peers from (Q4_0, Q8_0, F32)")
    ap.add_argument(
        "--q4-gguf",
        default="Q4_0",
        help="comma-separated llama.cpp formats beside the 4-bit export (Q4_0, Q4_K_M; default Q4_0)",
    )
    ap.add_argument(
        "--genai",
        action="append",
        default=[],
        metavar="DIR",
        help="an ONNX Runtime GenAI model folder (its builder's int4: scripts/ort_genai_build) beside the 4-bit "
        "export; repeatable. `--genai q4` runs the 4-bit export itself through ORT GenAI",
    )
    ap.add_argument(
        "--ov",
        action="append",
        default=[],
        metavar="DIR",
        help="an OpenVINO model folder (optimum-cli export openvino --weight-format int4) run by OpenVINO GenAI "
        "beside the 4-bit export; repeatable",
    )
    ap.add_argument(
        "--ov-python",
        default=sys.executable,
        help="the python of the venv that has openvino-genai (default: this python)",
    )
    ap.add_argument("--gguf-dir", default=".", help="where the peer .gguf files are written (kept for reuse)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all engines")
    ap.add_argument("--tokens", type=int, default=128, help="tg: greedy decode steps")
    ap.add_argument("--pp", type=int, default=512, help="pp: prompt tokens")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument(
        "--numba",
        action="append",
        default=[],
        metavar="TIER@CPU",
        help="numba runs: kernel tier @ the CPU numba compiles for",
    )
    ap.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=WHERE",
        help="llama.cpp runs from another build (see above)",
    )
    ap.add_argument("--no-ort", action="store_true", help="leave ONNX Runtime out")
    args = ap.parse_args(argv)

    # a job: (format, label, engine, path, options of measure())
    jobs = []
    q4_ggufs = [q.strip() for q in args.q4_gguf.split(",") if q.strip()]
    if unknown := [q for q in q4_ggufs if q not in FTYPES]:
        ap.error(f"--q4-gguf: unknown llama.cpp format(s) {', '.join(unknown)}; choose from {', '.join(FTYPES)}")
    formats = [("4-bit", args.q4, g) for g in q4_ggufs] + [("8-bit", args.q8, "Q8_0"), ("fp32", args.fp32, "F32")]
    seen = set()
    for fmt, path, gg in formats:
        if not path:
            continue
        if (fmt, path) not in seen:
            seen.add((fmt, path))
            jobs += _own_jobs(args, fmt, path)
            if fmt == "4-bit":
                jobs += [
                    (
                        fmt,
                        "ort-genai " + ("(export)" if g == "q4" else Path(g).name),
                        "ort-genai",
                        path if g == "q4" else g,
                        {},
                    )
                    for g in args.genai
                ]
        if args.gguf_src:
            dst = Path(args.gguf_dir) / f"{Path(args.gguf_src).stem.split('.')[0].lower()}-{gg.lower()}.gguf"
            make_gguf(Path(args.gguf_src), dst, gg)
            peers = [
                (f"llama.cpp {gg} {name}", {"env": {"PYTHONPATH": site}}) for name, site in map(_peer_site, args.peer)
            ]
            jobs += [(fmt, label, "llama.cpp", str(dst), o) for label, o in peers] or [
                (fmt, f"llama.cpp {gg}", "llama.cpp", str(dst), {})
            ]
    for ov_dir in args.ov:
        if why := check_peer(ov_dir, args.ov_python):
            ap.error(f"--ov: {why}")
        jobs.append(("4-bit", f"openvino-genai {Path(ov_dir).name}", "openvino-genai", ov_dir, {}))
    if not jobs:
        ap.error("give at least one of --q4, --q8, --fp32, --ov")
    opts = dict(threads=args.threads, tokens=args.tokens, pp=args.pp, reps=args.reps)
    results = {
        **run_header(args.threads),
        "rounds": args.rounds,
        "protocol": "edgellm bench worker (benchmarks/worker.py)",
        "bandwidth_gbs": bandwidth_gbs(args.threads),
        "runs": [],
    }

    numba_jobs = [(path, o) for _, _, engine, path, o in jobs if engine == "numba"]
    if numba_jobs:  # first-ever start: an empty compile cache, so load + first prefill includes compiling
        path, o = numba_jobs[0]
        with tempfile.TemporaryDirectory() as cache:
            cold = measure(
                path, "numba", **{**opts, "reps": 1}, **{**o, "env": {**o.get("env", {}), "NUMBA_CACHE_DIR": cache}}
            )
        results["numba_first_ever_start_s"] = cold.get("first_token_s")
        for path, o in numba_jobs:  # and fill the default cache before timing anything
            measure(path, "numba", **{**opts, "reps": 1}, **o)
    per_job = {i: [] for i in range(len(jobs))}
    for _ in range(args.rounds):  # rounds interleave the engines, so a noisy stretch hits all of them
        for i, (fmt, backend, engine, path, o) in enumerate(jobs):
            if engine == "openvino-genai":
                res = measure_ov(path, args.ov_python, _prompt_text(args.pp), **opts)
            else:
                res = measure(path, engine, **opts, **o)
            if res["status"] == "ok":
                per_job[i].append(res)
            else:
                print(f"{fmt} {backend} {path}: failed: {res['error']}", flush=True)
    for i, (fmt, backend, _engine, path, _o) in enumerate(jobs):
        rs = per_job[i]
        if not rs:
            continue
        tg = [v for r in rs for v in r["tg_values"]]
        pps = [v for r in rs for v in r["pp_values"]]
        row = {
            "format": fmt,
            "backend": backend,
            "kernels": rs[0].get("kernels"),
            "model": path,
            "size_mb": rs[0]["size_bytes"] / 1e6,
            "tg": tg,
            "tg_median": statistics.median(tg),
            "pp": pps,
            "pp_median": statistics.median(pps),
            "first_token_s": statistics.median(r["first_token_s"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "peak_rss_total_mb": max(r["peak_rss_total_mb"] for r in rs),
            "traffic": rs[0].get("traffic"),
        }
        results["runs"].append(row)
        print(
            f"{fmt:6} {backend:26} tg {row['tg_median']:7.1f} tok/s  pp{args.pp} {row['pp_median']:7.1f} tok/s  "
            f"load+1st {row['first_token_s']:.2f} s  RSS speed/all "
            f"{row['peak_rss_mb']:.0f}/{row['peak_rss_total_mb']:.0f} MiB  "
            f"size {row['size_mb'] * 1e6 / 2**20:.1f} MiB" + (f"  kernels {row['kernels']}" if row["kernels"] else ""),
            flush=True,
        )
    print(f"{results['cpu']}, {args.threads} threads, {results['date']}, {args.rounds} interleaved rounds")
    if results.get("numba_first_ever_start_s") is not None:
        print(f"numba first-ever start (empty compile cache): load+1st {results['numba_first_ever_start_s']:.1f} s")
    line = f"bandwidth {results['bandwidth_gbs']:.1f} GB/s"
    q4 = next((r for r in results["runs"] if r["format"] == "4-bit" and r["backend"] == "numba"), None)
    if q4 and q4["traffic"]:
        per_token = q4["traffic"]["bytes_per_token"]
        results["q4_weight_bytes_per_token"] = per_token
        results["q4_bandwidth_bound_tok_s"] = results["bandwidth_gbs"] * 1e9 / per_token
        line += f"; 4-bit bound {results['q4_bandwidth_bound_tok_s']:.0f} tok/s ({per_token / 1e6:.1f} MB/token)"
    print(line)
    for mine in (r for r in results["runs"] if r["backend"].startswith("numba") and r["traffic"]):
        share = mine["tg_median"] * mine["traffic"]["bytes_per_token"] / (results["bandwidth_gbs"] * 1e9)
        mine["bound_share"] = share
        peers = [r for r in results["runs"] if r["format"] == mine["format"] and not r["backend"].startswith("numba")]
        ratios = "  ".join(
            f"{p['backend']} tg {mine['tg_median'] / p['tg_median']:.2f}x pp {mine['pp_median'] / p['pp_median']:.2f}x"
            for p in peers
        )
        print(f"{mine['format']} {mine['backend']}: {100 * share:.0f}% of the bound; vs {ratios or 'no peer'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _own_jobs(args, fmt: str, path: str) -> list:
    """The numba runs (one per --numba tier, else the default) and ONNX Runtime's, on one export."""
    jobs = [(fmt, f"numba {spec}", "numba", path, _tier_options(spec)) for spec in args.numba] or [
        (fmt, "numba", "numba", path, {})
    ]
    return jobs + ([] if args.no_ort else [(fmt, "onnxruntime", "onnxruntime", path, {})])


def _prompt_text(pp: int) -> str:
    """The start of the bench's built-in text, as the worker's prompt (enough for `pp` tokens)."""
    from edgellm.data import load_text

    return load_text(None)[: 32 * pp]


def _tier_options(spec: str) -> dict:
    """`TIER@CPU` -> measure() options: the tier, and the worker's compile target: `native` (or
    nothing) the runtime's default, this CPU's x86-64 level (kernels/pin.py); `host` this CPU by
    name (EDGELLM_NUMBA_TARGET=host); else NUMBA_CPU_NAME=CPU."""
    tier, _, cpu = spec.partition("@")
    env = (
        {}
        if cpu in ("", "native")
        else {"EDGELLM_NUMBA_TARGET": "host"}
        if cpu == "host"
        else {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": ""}
    )
    return {"kernels": tier, "env": env}


def _peer_site(spec: str) -> tuple[str, str]:
    """`NAME=WHERE` -> (NAME, the folder holding that build's llama_cpp package)."""
    name, _, where = spec.partition("=")
    if Path(where).is_file():  # a venv's python: ask it where its llama_cpp lives
        code = "import llama_cpp, os; print(os.path.dirname(os.path.dirname(llama_cpp.__file__)))"
        where = subprocess.run([where, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if not (Path(where) / "llama_cpp").is_dir():
        raise SystemExit(f"--peer {spec}: no llama_cpp package in {where}")
    return name, where


if __name__ == "__main__":
    main()

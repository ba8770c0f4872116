"""Decode and prompt speed of `edgellm run` (numba) vs ONNX Runtime vs llama.cpp, side by side.

Each measurement runs in its own child process (so peak RSS is per backend) of one parent, in one
run, same prompt, same threads; --rounds interleave the backends (ABCABC...) and the medians pool
every repetition of every round. Wrap the whole run in `flock /tmp/edgellm-heavy.lock`.

    python benchmarks/runtime_decode.py --q4 q4-onnx --q8 q8-onnx --fp32 fp32-onnx \
        --gguf-src SmolLM2-135M-Instruct.Q4_1.gguf --gguf-dir /work/models --threads 2

Kernel tiers (runtime/kernels/tiers.py): `--numba TIER@CPU` (repeatable) runs the numba runtime
on that tier with numba compiling for CPU (NUMBA_CPU_NAME=CPU with that CPU's own features, so the
float kernels are that CPU's too; `native` = this machine), e.g. `--numba avx2@haswell` for an AVX2
laptop; `--peer NAME=PYTHON` (repeatable) runs llama.cpp in another interpreter (a venv holding
another llama-cpp-python build, e.g. an AVX2-only one); `--no-ort` leaves ONNX Runtime out.

GGUF peers are made with llama.cpp's own llama_model_quantize from --gguf-src (requantized with
allow_requantize when the source is already quantized; speed depends on the format, not on where
the values came from).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = [504, 3458, 282, 4649, 314, 1167, 30, 378]  # a short fixed prompt (token ids < 49152)
FTYPES = {"F32": 0, "Q8_0": 7, "Q4_0": 2}


def child(args) -> dict:
    """One backend on one model: load + first token, decode tok/s reps, pp tok/s, peak RSS."""
    t0 = time.perf_counter()
    if args.backend == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024,
                              n_batch=512, verbose=False)
        llm.eval(PROMPT)
        first = time.perf_counter() - t0

        def decode(n):
            llm.reset()
            llm.eval(PROMPT)
            t = time.perf_counter()
            for i in range(n):
                llm.eval([PROMPT[i % len(PROMPT)]])
            return n / (time.perf_counter() - t)

        def pp(n):
            llm.reset()
            t = time.perf_counter()
            llm.eval([(i * 7919) % 40000 + 10 for i in range(n)])
            return n / (time.perf_counter() - t)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        if args.backend == "numba":
            from edgellm.runtime.model import NumbaModel as M
        else:
            from edgellm.runtime.ort_backend import OrtModel as M
        m = M(args.model, n_ctx=1024, threads=args.threads, **({"kernels": args.kernels} if args.kernels != "auto" else {}))
        m.forward(np.array(PROMPT))
        first = time.perf_counter() - t0

        def decode(n):
            m.reset() if hasattr(m, "reset") else None
            tok = int(m.forward(np.array(PROMPT)).argmax())
            t = time.perf_counter()
            for _ in range(n):
                tok = int(m.forward([tok]).argmax())
            return n / (time.perf_counter() - t)

        def pp(n):
            m.reset()
            t = time.perf_counter()
            m.forward(np.array([(i * 7919) % 40000 + 10 for i in range(n)]))
            return n / (time.perf_counter() - t)
    decode(8)  # warm-up
    tg = [decode(args.tokens) for _ in range(args.reps)]
    rss_decode = _peak_rss_mb()  # the decode workload: short prompt + 128 tokens
    pps = [pp(args.pp) for _ in range(max(1, args.reps - 1))]
    return {"kernels": getattr(m, "kernels", None) if args.backend != "llama.cpp" else llama_cpp.llama_print_system_info().decode(),
            "load_first_token_s": first, "tg": tg, "tg_median": statistics.median(tg), "pp": pps, "pp_median": statistics.median(pps),
            "peak_rss_decode_mb": rss_decode, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would include the parent's peak from before exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bandwidth() -> float:
    """Read bandwidth (GB/s) of a 512 MB float32 sum with the benchmark's threads (numba prange)."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def total(a):
        s = 0.0
        for i in prange(a.size):
            s += a[i]
        return s

    a = np.ones(128 * 1024 * 1024, np.float32)
    total(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        total(a)
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def make_gguf(src: Path, dst: Path, ftype: str):
    if dst.exists():
        return
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[ftype]
    p.nthread = 2
    p.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({ftype}) failed: {rc}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q4"), ap.add_argument("--q8"), ap.add_argument("--fp32")
    ap.add_argument("--gguf-src"), ap.add_argument("--gguf-dir", default=".")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all backends")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=2, metavar=("BACKEND", "MODEL"))
    ap.add_argument("--kernels", default="auto", help="(child) the numba kernel tier")
    ap.add_argument("--numba", action="append", default=[], metavar="TIER@CPU", help="numba runs: kernel tier @ the CPU numba compiles for")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=PYTHON", help="llama.cpp runs in this interpreter")
    ap.add_argument("--no-ort", action="store_true", help="leave ONNX Runtime out")
    ap.add_argument("--no-cold", action="store_true", help="skip the first-ever start (an empty compile cache)")
    ap.add_argument("--baseline", metavar="PYTHON", help="also run numba in this interpreter (another checkout's venv: an A/B of two versions)")
    args = ap.parse_args()
    if args.child:
        args.backend, args.model = args.child
        print(json.dumps(child(args)))
        return
    jobs = []
    for fmt, path, gg in (("4-bit", args.q4, "Q4_0"), ("8-bit", args.q8, "Q8_0"), ("fp32", args.fp32, "F32")):
        if not path:
            continue
        jobs += [(fmt, f"numba {spec}", path) for spec in args.numba] or [(fmt, "numba", path)]
        jobs += [(fmt, "numba baseline", path)] if args.baseline else []
        jobs += [] if args.no_ort else [(fmt, "onnxruntime", path)]
        if args.gguf_src:
            dst = Path(args.gguf_dir) / f"{Path(args.gguf_src).stem.split('.')[0].lower()}-{gg.lower()}.gguf"
            make_gguf(Path(args.gguf_src), dst, gg)
            jobs += [(fmt, f"llama.cpp {gg} {peer.split('=')[0]}", str(dst)) for peer in args.peer] or [(fmt, f"llama.cpp {gg}", str(dst))]
    common = ["--threads", str(args.threads), "--reps", str(args.reps), "--tokens", str(args.tokens), "--pp", str(args.pp)]
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor() or platform.machine(), "threads": args.threads,
               "rounds": args.rounds, "bandwidth_gbs": bandwidth(), "runs": []}

    peers = dict(p.split("=", 1) for p in args.peer)

    def run(backend, path, env=None):
        b = "llama.cpp" if backend.startswith("llama.cpp") else backend.split()[0]
        exe, extra, env = sys.executable, [], dict(env or {})
        if b == "llama.cpp" and len(backend.split()) > 2:
            exe = peers[backend.split()[2]]
        if backend == "numba baseline":  # its own compile cache: never written into the other checkout
            exe = args.baseline
            env.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "edgellm-baseline-numba-cache"))
        elif b == "numba" and " " in backend:  # "numba TIER@CPU"
            tier, cpu = backend.split()[1].split("@")
            extra = ["--kernels", tier]
            if cpu != "native":
                env.update(NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="")
        r = subprocess.run([exe, __file__, "--child", b, path, *common, *extra], capture_output=True, text=True,
                           env={**os.environ, **env})
        if r.returncode != 0:
            print(f"{backend} {path}: failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
        return json.loads(r.stdout.strip().splitlines()[-1])

    if args.q4 and not args.no_cold:  # first-ever start: an empty compile cache, so load + first token includes compiling
        with tempfile.TemporaryDirectory() as cache:
            cold = run(next(b for _, b, _ in jobs if b.startswith("numba")), args.q4, {"NUMBA_CACHE_DIR": cache})
        results["numba_cold_compile_load_first_token_s"] = cold and cold["load_first_token_s"]
        for fmt, backend, path in jobs:  # and fill the default cache before timing anything
            if backend.startswith("numba"):
                run(backend, path)
    per_job = {i: [] for i in range(len(jobs))}
    for _ in range(args.rounds):  # rounds interleave the backends, so a noisy stretch hits all of them
        for i, (fmt, backend, path) in enumerate(jobs):
            res = run(backend, path)
            if res is not None:
                per_job[i].append(res)
    for i, (fmt, backend, path) in enumerate(jobs):
        rs = per_job[i]
        if not rs:
            continue
        tg = [v for r in rs for v in r["tg"]]
        pps = [v for r in rs for v in r["pp"]]
        res = {"format": fmt, "backend": backend, "kernels": rs[0].get("kernels"), "model": path, "size_mb": _size(path) / 1e6, "tg": tg, "tg_median": statistics.median(tg),
               "pp": pps, "pp_median": statistics.median(pps),
               "load_first_token_s": statistics.median(r["load_first_token_s"] for r in rs),
               "peak_rss_decode_mb": max(r["peak_rss_decode_mb"] for r in rs), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
        results["runs"].append(res)
        print(f"{fmt:6} {backend:26} tg {res['tg_median']:7.1f} tok/s  pp{args.pp} {res['pp_median']:7.1f} tok/s  "
              f"load+1st {res['load_first_token_s']:.2f} s  RSS decode/all {res['peak_rss_decode_mb']:.0f}/{res['peak_rss_mb']:.0f} MiB  "
              f"size {res['size_mb'] * 1e6 / 2**20:.1f} MiB" + (f"  kernels {res['kernels']}" if backend.startswith("numba") else ""), flush=True)
    if args.q4 and not args.no_cold:
        print(f"numba first-ever start (empty compile cache): load+1st {results['numba_cold_compile_load_first_token_s']:.1f} s")
    if args.q4:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from edgellm.runtime.model import NumbaModel

        per_token = NumbaModel(args.q4, n_ctx=8).weights.bytes_per_token
        results["q4_weight_bytes_per_token"] = per_token
        results["q4_bandwidth_bound_tok_s"] = results["bandwidth_gbs"] * 1e9 / per_token
    print(f"bandwidth {results['bandwidth_gbs']:.1f} GB/s" + (f"; 4-bit bound {results['q4_bandwidth_bound_tok_s']:.0f} tok/s "
          f"({results['q4_weight_bytes_per_token'] / 1e6:.1f} MB/token)" if args.q4 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _size(path) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


if __name__ == "__main__":
    main()

"""First start of the numba runtime: `edgellm run` with an empty compile cache and no cache pack
(cold: it compiles), then with the cache it filled (warm), and with an empty cache seeded from the
package's cache pack for this CPU's level (pack: runtime/cachepack.py, where one is built); wall
time and peak memory, and what the cold start compiles.

    python -m edgellm.benchmarks.scripts.first_start EXPORT_DIR [--runs 3] [--profile]

Each cold and pack run gets a fresh NUMBA_CACHE_DIR (a temporary folder), so nothing another run
compiled is reused; the warm run after the cold one reuses its folder. Per run: wall seconds of the whole command
(load, compile, prompt, `-n` tokens) and CPU seconds of all its processes; the serving process's
own peak RSS (VmHWM, read at its exit) and that of the largest process of the run (wait4: the
compile child included).
`--profile` compiles the step in this process (no child) with numba's compile events recorded:
seconds per compiled function (inclusive, and exclusive of the functions it compiled in turn)
and how many specializations each has. Run it alone (under the machine's benchmark lock):
compile time is CPU time.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time

# the CLI in a child that writes its own VmHWM (peak RSS) to $FIRST_START_HWM at exit
_CLI = """
import atexit, os, sys
def _hwm():
    with open('/proc/self/status') as f:
        kb = next(int(l.split()[1]) for l in f if l.startswith('VmHWM'))
    with open(os.environ['FIRST_START_HWM'], 'w') as f:
        f.write(str(kb))
atexit.register(_hwm)
from edgellm.cli import app
sys.argv = ['edgellm', *sys.argv[1:]]
app()
"""


def run_once(export: str, cache: str, prompt: str, tokens: int, threads: int | None, pack: bool = True) -> dict:
    """One `edgellm run` with NUMBA_CACHE_DIR=cache (and the package's cache pack, or without any:
    EDGELLM_CACHEPACK=off): wall and CPU s, own peak RSS MiB, largest process MiB."""
    with tempfile.NamedTemporaryFile(suffix=".hwm", delete=False) as f:
        hwm_path = f.name
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "FIRST_START_HWM": hwm_path}
    if not pack:
        env["EDGELLM_CACHEPACK"] = "off"
    cmd = [sys.executable, "-c", _CLI, "run", export, "-p", prompt, "-n", str(tokens), "--temperature", "0"]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    with open(hwm_path) as f:
        own = int(f.read() or 0) / 1024
    os.unlink(hwm_path)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"edgellm run failed:\n{err[-2000:]}")
    cpu = ru.ru_utime + ru.ru_stime  # the run's processes, the compile child included
    return {"wall_s": wall, "cpu_s": cpu, "rss_mb": own, "rss_all_mb": ru.ru_maxrss / 1024}


def profile(export: str) -> None:
    """Compile the step in this process with an empty cache and print where the time went."""
    from numba.core import event

    spans = []  # (start|end, function name, perf_counter, process_time)

    class _Rec(event.Listener):
        def on_start(self, ev):
            spans.append(("s", _name(ev), time.perf_counter(), time.process_time()))

        def on_end(self, ev):
            spans.append(("e", _name(ev), time.perf_counter(), time.process_time()))

    def _name(ev):
        fn = getattr(ev.data.get("dispatcher"), "py_func", None)
        return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__qualname__}" if fn else "?"

    event.register("numba:compile", _Rec())
    from edgellm.runtime.model import NumbaModel

    c0, w0 = time.process_time(), time.perf_counter()
    m = NumbaModel(export, compile_in_child=False)
    m.warmup()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    stack, excl, incl, count = [], collections.Counter(), collections.Counter(), collections.Counter()
    for kind, name, _t, c in spans:  # CPU seconds, nested: a callee's compile runs inside its caller's
        if kind == "s":
            stack.append([name, c, 0.0])
            continue
        n, c_start, inner = stack.pop()
        excl[n] += c - c_start - inner
        incl[n] += c - c_start
        count[n] += 1
        if stack:
            stack[-1][2] += c - c_start
    print(f"load + warmup: {wall:.1f} s wall, {cpu:.1f} s CPU; {sum(count.values())} compiles")
    print(f"{'CPU s excl':>10} {'incl':>6}  n  function")
    for n, v in excl.most_common(30):
        print(f"{v:10.2f} {incl[n]:6.2f} {count[n]:2d}  {n}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("export", help="export directory (e.g. a 4-bit SmolLM2-135M export)")
    ap.add_argument("--runs", type=int, default=3, help="cold runs, each followed by a warm one")
    ap.add_argument("--prompt", default="Hello")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="also: what a cold start compiles, per function")
    ap.add_argument("--profile-here", action="store_true", help=argparse.SUPPRESS)  # the --profile child
    args = ap.parse_args(argv)
    if args.profile_here:
        return profile(args.export)
    from edgellm.runtime import cachepack
    from edgellm.runtime.kernels.tiers import target_name

    where = cachepack.root()
    has_pack = where is not None and os.path.isfile(os.path.join(cachepack.folder(where), cachepack.MANIFEST))
    if not has_pack:
        print(f"no cache pack for this target under {where} (python -m edgellm.runtime.cachepack build --levels host)")
    # cold: an empty cache, no pack (compiles); warm: that cache again; pack: an empty cache seeded from the pack
    rows = {"cold": [], "warm": [], **({"pack": []} if has_pack else {})}
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache, tempfile.TemporaryDirectory() as fresh:
            for kind in rows:
                pack = kind == "pack"
                r = run_once(args.export, fresh if pack else cache, args.prompt, args.tokens, args.threads, pack)
                rows[kind].append(r)
                print(
                    f"run {i + 1} {kind}: {r['wall_s']:.2f} s ({r['cpu_s']:.1f} s CPU), peak RSS {r['rss_mb']:.0f} MiB "
                    f"(largest process {r['rss_all_mb']:.0f} MiB)",
                    flush=True,
                )
    print(f"numba target {target_name()}; edgellm run {args.export} -p {args.prompt!r} -n {args.tokens}")
    for kind, rs in rows.items():
        walls = [r["wall_s"] for r in rs]
        print(
            f"{kind}: median {statistics.median(walls):.2f} s (min {min(walls):.2f}, max {max(walls):.2f}), "
            f"CPU {statistics.median(r['cpu_s'] for r in rs):.1f} s, "
            f"peak RSS {statistics.median(r['rss_mb'] for r in rs):.0f} MiB, "
            f"largest process {statistics.median(r['rss_all_mb'] for r in rs):.0f} MiB"
        )
    if args.profile:  # in a child: numba reads NUMBA_CACHE_DIR when it is imported
        with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
            cmd = [sys.executable, "-m", "edgellm.benchmarks.scripts.first_start", args.export, "--profile-here"]
            subprocess.run(cmd, env={**os.environ, "NUMBA_CACHE_DIR": cache}, check=True)


if __name__ == "__main__":
    main()

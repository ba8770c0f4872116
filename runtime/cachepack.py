"""Compiled kernels shipped with the package, one pack per x86-64 level, seeded into numba's cache
on the first start.

A first start compiles the decode step with LLVM (35 s on an Ice Lake core). The compiled code
depends on the argument types, the kernel tier and the compile target only, and kernels/pin.py
names that target by the host's x86-64 level: so one build per level serves every machine of it.
`python -m edgellm.runtime.cachepack build` (run for a release, before the wheel is built; `make wheel`) compiles the
step (both KV cache types), the serving step and the load-time self-check for each level in a child
process, without running them (a level the build machine lacks compiles as well), and copies
numba's cache files into cachepack/<numba and Python version>/<level>/ with a manifest.

`seed()` runs where a model finds its step missing from numba's cache: it picks the pack of this
process's numba and Python versions and compile target, checks the manifest (the runtime sources'
digest, each file's sha256) and merges the pack's entries into numba's own cache folders under
their lock (jitcache.py), each under numba's own key. numba then loads them as if compiled here.

A pack never runs on the wrong CPU or code: the pack's folder is chosen by the target, and each
entry keeps numba's key (argument types, CPU name and features, bytecode) inside an index stamped
with the sources' digest (jitcache.py); an entry for another level, another numba or other
sources is not loaded. No pack (a source checkout, an ARM host, another numba): the first start
compiles as before.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

PACK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cachepack")  # the wheel's packs


def root() -> str | None:
    """Where `seed` looks: EDGELLM_CACHEPACK (a folder, or `off`: never seed), else the package's."""
    where = os.environ.get("EDGELLM_CACHEPACK", PACK)
    return None if where == "off" else where


MANIFEST = "manifest.json"
# (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES) a release builds: kernels/pin.py's choices for the x86 CPUs
# in use (Zen 5 / Sapphire Rapids; Ice Lake, Zen 4, Cascade Lake; Skylake-X; Alder Lake and later
# laptops; Haswell to Zen 3; older).
LEVELS = (
    ("x86-64-v4", "+avx512vnni,+avxvnni"),
    ("x86-64-v4", "+avx512vnni"),
    ("x86-64-v4", ""),
    ("x86-64-v3", "+avxvnni"),
    ("x86-64-v3", ""),
    ("x86-64-v2", ""),
    ("x86-64", ""),
)


def versions() -> str:
    """The folder of packs this process can load: numba's cache is per numba and Python version."""
    import numba

    return f"numba-{numba.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"


def folder(where: str) -> str:
    """The pack under `where` for this process's numba, Python and compile target."""
    from .kernels import tiers

    return os.path.join(where, versions(), tiers.target_name())


def _modules():
    """Import every module whose cached kernels a pack holds; the stamped dispatchers."""
    from . import batched, model  # noqa: F401  (their imports bring in every kernel module)
    from .kernels import jitcache

    return jitcache.STAMPED


def _file_name(dispatcher) -> str:
    """A pack's name for `dispatcher`'s index: module and numba's own index name."""
    return f"{dispatcher.py_func.__module__}~{dispatcher._cache._cache_file._index_name}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sources_digest() -> str:
    """The digest of the runtime sources the step is built from (jitcache.py)."""
    from . import model
    from .kernels.jitcache import digest

    return digest(model.__file__)


# ------------------------------------------------------------------------------------------ seed
def seed(where: str | None = None) -> int:
    """Merge this target's pack under `where` (default `root()`) into numba's cache (module
    docstring); entries added (0: no pack, or a pack for other sources, numba or Python)."""
    where = where or root()
    if where is None:
        return 0
    where = folder(where)
    try:
        with open(os.path.join(where, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return 0
    if manifest.get("sources") != sources_digest():
        return 0  # built from other runtime sources
    added = 0
    for d in _modules():
        name = _file_name(d)
        if name in manifest["files"]:
            try:
                added += _merge(d._cache._cache_file, where, name, manifest["files"])
            except OSError:  # a cache folder numba cannot write either: the step compiles, as without a pack
                pass
    return added


def _read(where: str, name: str, files: dict) -> bytes | None:
    """A pack file's bytes (stored zlib-compressed: 10.2 -> 4.6 MB for one level), or None where it
    is missing or not the file the manifest names."""
    try:
        with open(os.path.join(where, name), "rb") as f:
            packed = f.read()
    except OSError:
        return None
    if _sha(packed) != files.get(name):
        return None
    try:
        return zlib.decompress(packed)
    except zlib.error:
        return None


def _write(out: str, name: str, data: bytes, files: dict) -> None:
    packed = zlib.compress(data, 9)
    with open(os.path.join(out, name), "wb") as f:
        f.write(packed)
    files[name] = _sha(packed)


def _overloads(raw: bytes, cache_file) -> dict:
    """The entries of numba's index file `raw` ({key: data file name}, after a pickled version
    string and the index's stamp) where it was written by this numba from these sources (the
    stamp of the live `cache_file`, jitcache.py); else none."""
    f = io.BytesIO(raw)
    if pickle.load(f) != cache_file._version:
        return {}
    stamp, overloads = pickle.loads(f.read())
    return overloads if stamp == cache_file._source_stamp else {}


def _merge(cache_file, where: str, name: str, files: dict) -> int:
    """Add the pack's entries of one index that numba's live `cache_file` lacks, through numba's
    own save (under the cache folder's lock, jitcache.locked); entries added."""
    raw = _read(where, name, files)
    live = cache_file._load_index()
    module = name.split("~")[0]
    added = 0
    for key, data_name in (_overloads(raw, cache_file) if raw else {}).items():
        data = None if key in live else _read(where, f"{module}~{data_name}", files)
        if data is not None:
            cache_file.save(key, pickle.loads(data))  # what numba's load reads, saved as numba saves it
            added += 1
    return added


# ----------------------------------------------------------------------------------------- build
def compile_all(kv=("fp16", "fp32"), rows: bool = True) -> list[str]:
    """Compile, without running, what a first start and a first `serve` load (in this process,
    for its compile target and best tier): the step for both KV cache types, the batched step,
    the self-check kernels. Names of what was compiled."""
    from numba.core.typing.typeof import Purpose, typeof

    from .batched import _warm_args, forward_rows
    from .kernels import tiers
    from .kernels.quant import check_calls, linear_few, linear_mat
    from .model import forward
    from .warmup import step_args

    sig = lambda args: tuple(typeof(a, Purpose.argument) for a in args)  # noqa: E731
    tier = tiers.best()
    done = []
    for cache in kv:
        keep: list = []
        forward.compile(sig(step_args(tier, cache == "fp16", keep)))
        done.append(f"forward/{cache}")
        if rows:
            forward_rows.compile(sig(_warm_args(tier, cache == "fp16", keep)))
            done.append(f"forward_rows/{cache}")
    for _ref, mat, few, _keep in check_calls(tier.id):
        linear_mat.compile(sig(mat))
        linear_few.compile(sig(few))
    done.append("self-check")
    return done


def collect(out: str, info: dict) -> dict:
    """Copy every stamped kernel's numba cache files into the pack folder `out` (new), with the
    manifest; the manifest."""
    files = {}
    os.makedirs(out)
    for d in _modules():
        cache_file = d._cache._cache_file
        try:
            with open(cache_file._index_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            continue
        overloads = _overloads(raw, cache_file)
        if not overloads:
            continue
        module = d.py_func.__module__
        for data_name in overloads.values():
            with open(cache_file._data_path(data_name), "rb") as f:
                _write(out, f"{module}~{data_name}", f.read(), files)
        _write(out, _file_name(d), raw, files)
    manifest = {**info, "sources": sources_digest(), "files": files}
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


def _build_child(out: str, kv, rows: bool) -> None:
    """In a child whose environment names the level and an empty NUMBA_CACHE_DIR: compile, collect."""
    import llvmlite
    import numba

    from .kernels import tiers

    t0, c0 = time.perf_counter(), time.process_time()
    done = compile_all(kv, rows)
    cpu, features = tiers.target()[:2]
    info = {
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "cpu": cpu,
        "features": features,
        "tier": tiers.best().name,
        "compiled": done,
        "compile_wall_s": round(time.perf_counter() - t0, 1),
        "compile_cpu_s": round(time.process_time() - c0, 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    collect(out, info)


def _spec(kv, rows: bool) -> list[str]:
    return [",".join(kv), str(int(rows))]


def build(where: str = PACK, levels=LEVELS, progress=None, kv=("fp16", "fp32"), rows: bool = True) -> list[dict]:
    """Build the packs of `levels` under `where`/<versions>/ (each in a child process, compiled in
    a fresh cache folder, written to a temporary sibling and renamed at the end); one row each.
    progress(level, None) before a level, progress(level, row) after it. kv, rows: what
    compile_all compiles (tests build a smaller pack)."""
    from .kernels import tiers

    table = []
    base = os.path.join(where, versions())
    os.makedirs(base, exist_ok=True)
    for cpu, features in levels:
        name = tiers.level_name(cpu, features)
        final = os.path.join(base, name)
        tmp = tempfile.mkdtemp(prefix=".building-", dir=base)
        cache = tempfile.mkdtemp(prefix="edgellm-cachepack-")
        env = {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features, "NUMBA_CACHE_DIR": cache}
        env.pop("EDGELLM_NUMBA_TARGET", None)
        if progress:
            progress(name, None)
        t0 = time.perf_counter()
        try:
            r = subprocess.run(
                [sys.executable, "-m", __spec__.name, "_child", os.path.join(tmp, "pack"), *_spec(kv, rows)],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"building the {name} pack failed: {tail[0]}")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(os.path.join(tmp, "pack"), final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
        with open(os.path.join(final, MANIFEST)) as f:
            manifest = json.load(f)
        size = sum(os.path.getsize(os.path.join(final, n)) for n in os.listdir(final))
        table.append(
            {
                "level": name,
                "tier": manifest["tier"],
                "files": len(manifest["files"]),
                "bytes": size,
                "wall_s": round(time.perf_counter() - t0, 1),
                "compile_cpu_s": manifest["compile_cpu_s"],
            }
        )
        if progress:
            progress(name, table[-1])
    return table


def main(argv=None) -> int:
    """python -m edgellm.runtime.cachepack build [--levels all|host|LEVEL,...] [--out DIR]"""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m edgellm.runtime.cachepack",
        description="Build the compiled-kernel packs a wheel ships (one per x86-64 level; runtime/cachepack.py).",
    )
    ap.add_argument("command", choices=["build"])
    ap.add_argument(
        "--levels",
        default="all",
        help="all (every level a release ships), host (this CPU's level), or levels such as "
        "x86-64-v4+avx512vnni,x86-64-v3 (default: all)",
    )
    ap.add_argument("--out", default=PACK, help=f"the packs' folder (default: {PACK})")
    a = ap.parse_args(argv)
    from .kernels import tiers

    if tiers.target()[2] != "x86_64":
        print("error: packs are built per x86-64 level; on this CPU run `edgellm warmup` once instead", file=sys.stderr)
        return 2
    known = {tiers.level_name(c, f): (c, f) for c, f in LEVELS}
    if a.levels == "all":
        levels = LEVELS
    elif a.levels == "host":
        levels = [tiers.target()[:2]]
    else:
        bad = [n for n in a.levels.split(",") if n not in known]
        if bad:
            print(f"error: unknown level {bad[0]!r}; give all, host or some of {', '.join(known)}", file=sys.stderr)
            return 2
        levels = [known[n] for n in a.levels.split(",")]
    t0 = time.perf_counter()

    def say(level: str, row: dict | None) -> None:
        if row is None:
            print(f"compiling {level} ...", end=" ", flush=True)
        else:
            mb, s = row["bytes"] / 1e6, row["wall_s"]
            print(f"tier {row['tier']}, {row['files']} files, {mb:.1f} MB, {s:.0f} s", flush=True)

    build(a.out, levels, progress=say)
    print(f"{len(levels)} packs in {os.path.join(a.out, versions())} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "_child":  # build()'s child: compile in its fresh cache, collect
        _build_child(sys.argv[2], sys.argv[3].split(","), sys.argv[4] == "1")
    else:
        sys.exit(main())

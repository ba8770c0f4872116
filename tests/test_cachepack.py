"""Compiled kernels that carry over between machines: numba's target pinned to the host's x86-64
level (runtime/kernels/pin.py), and the packs a wheel ships per level, seeded into an empty cache
on the first start (runtime/cachepack.py): loaded without compiling, giving the tokens a compiled
model gives, and never loaded for another level, other sources, or from a damaged file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import llvmlite.binding as llb
import numpy as np
import pytest

from edgellm.runtime import cachepack
from edgellm.runtime.kernels import pin, tiers

X86 = tiers.target()[2] == "x86_64"


# ----------------------------------------------------------------------------- the level
ICELAKE = dict.fromkeys(pin.V4 + ("avx512vnni", "avx512vbmi", "gfni", "sha"), True)


@pytest.mark.parametrize(
    "host, level",
    [
        (ICELAKE, ("x86-64-v4", "+avx512vnni")),  # Ice Lake, Zen 4, Cascade Lake
        ({**ICELAKE, "avxvnni": True}, ("x86-64-v4", "+avx512vnni,+avxvnni")),  # Zen 5, Sapphire Rapids
        ({**dict.fromkeys(pin.V4, True)}, ("x86-64-v4", "")),  # Skylake-X
        ({**dict.fromkeys(pin.V3, True), "avxvnni": True, "avx512vnni": True}, ("x86-64-v3", "+avxvnni")),
        ({**dict.fromkeys(pin.V4, True), "avx512bw": False}, ("x86-64-v3", "")),  # AVX-512 without BW: v3
        ({**dict.fromkeys(pin.V3, True), "movbe": False}, ("x86-64-v2", "")),  # one v3 feature missing
        (dict.fromkeys(("sse2", "cx8"), True), ("x86-64", "")),
    ],
)
def test_the_target_is_the_highest_level_the_host_has_whole(host, level):
    """A level's features all present, or the level below; the dot-product extensions only on a
    level that can encode them (avx512vnni needs v4: an Alder Lake with a stray flag stays v3)."""
    assert pin.choose(host) == level
    assert level in cachepack.LEVELS  # a release builds a pack for every level pin can choose


_TARGET = "import edgellm.runtime, os; from edgellm.runtime.kernels import tiers; print(*tiers.target()[:2], sep='|')"


def _target(**env) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_CPU_", "EDGELLM_NUMBA_TARGET"))}
    r = subprocess.run([sys.executable, "-c", _TARGET], capture_output=True, text=True, env={**base, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().split("|")


@pytest.mark.skipif(not X86, reason="the level pin is x86-64 only")
def test_the_runtime_compiles_for_the_level_unless_told_otherwise():
    """By default numba's target is the host's level (what pin.choose says of LLVM's own host
    features); a target the user names and EDGELLM_NUMBA_TARGET=host are left alone."""
    assert _target() == list(pin.choose(llb.get_host_cpu_features()))
    assert _target(NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="") == ["haswell", ""]
    assert _target(EDGELLM_NUMBA_TARGET="host")[0] == llb.get_host_cpu_name()


def test_a_host_whose_features_llvm_cannot_read_is_left_alone(monkeypatch):
    def fail():
        raise RuntimeError("failed to get host cpu features")

    monkeypatch.setattr(pin, "_numba_target_built", lambda: False)
    monkeypatch.setattr(llb, "get_host_cpu_features", fail)
    monkeypatch.setattr(pin.platform, "machine", lambda: "x86_64")
    env: dict = {}
    assert pin.pin(env) is None and env == {}


# ----------------------------------------------------------------------------- packs
@pytest.fixture(scope="module")
def q4(rtn_q4_export):
    return rtn_q4_export


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """A pack for this process's target: the step with an fp16 KV cache (the default 4-bit
    export's) and the self-check, compiled without running (as a release builds every level)."""
    where = tmp_path_factory.mktemp("packs")
    (row,) = cachepack.build(str(where), [tuple(_level())], kv=("fp16",), rows=False)
    return where, row


def _level() -> list[str]:
    """The target the children below compile for (this environment's, as a fresh process sees it)."""
    return _target(**{k: v for k, v in os.environ.items() if k.startswith(("NUMBA_CPU_", "EDGELLM_NUMBA_TARGET"))})


_RUN = textwrap.dedent(
    """
    import json, sys
    from edgellm.runtime.model import NumbaModel, forward
    m = NumbaModel(sys.argv[1], n_ctx=16, threads=1)
    ids, out = [1, 5, 9], []
    logits = m.forward(__import__("numpy").array(ids, "int64"))
    for _ in range(6):
        out.append(int(logits.argmax()))
        logits = m.forward(__import__("numpy").array(out[-1:], "int64"))
    print(json.dumps({"seeded": m.seeded, "child": m.compiled_in_child, "tokens": out,
                      "misses": sum(forward.stats.cache_misses.values()),
                      "hits": sum(forward.stats.cache_hits.values())}))
    """
)


def _run(q4, cache, pack, **env) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "EDGELLM_CACHEPACK": str(pack), **env}
    r = subprocess.run([sys.executable, "-c", _RUN, str(q4)], capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_pack_starts_a_model_without_compiling_and_gives_its_tokens(q4, packs, tmp_path):
    """An empty cache and the pack: the step is merged in and loaded (no child, no compile, one
    cache hit) and decodes the tokens that a process which compiled the step itself decodes."""
    where, row = packs
    assert row["files"] > 10 and row["tier"] == tiers.best().name, row
    got = _run(q4, tmp_path / "cache", where)
    assert got["seeded"] > 10 and not got["child"] and got["misses"] == 0 and got["hits"] == 1, got
    compiled = _run(q4, tmp_path / "own", "off")
    assert compiled["seeded"] == 0 and compiled["child"], compiled
    assert got["tokens"] == compiled["tokens"]


_SEED = textwrap.dedent(
    """
    import sys
    from edgellm.runtime import cachepack, warmup
    from edgellm.runtime.kernels import tiers
    from edgellm.runtime.model import forward
    n = cachepack.seed(sys.argv[1])
    print(n, warmup.is_cached(forward, warmup.step_args(tiers.best(), True, [])))
    """
)


def _seed(where, cache, **env) -> tuple[int, bool]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), **env}
    r = subprocess.run([sys.executable, "-c", _SEED, str(where)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    n, cached = r.stdout.split()
    return int(n), cached == "True"


def _copy(where, to):
    shutil.copytree(where, to)
    return to, to / cachepack.versions() / tiers.level_name(*_level())


@pytest.mark.skipif(not X86, reason="packs are built per x86-64 level")
def test_a_pack_never_loads_for_another_level_other_sources_or_damaged_files(packs, tmp_path):
    where, _ = packs
    full, cached = _seed(where, tmp_path / "c0")
    assert full > 10 and cached
    # another level: its own folder has no pack; this level's pack put in its place merges, but
    # numba's key (CPU name and features) keeps every entry from loading
    cpu = _level()[0]
    lower = {"x86-64-v4": "x86-64-v3", "x86-64-v3": "x86-64-v2"}.get(cpu, "x86-64")
    other = {"NUMBA_CPU_NAME": lower, "NUMBA_CPU_FEATURES": ""}
    assert _seed(where, tmp_path / "c1", **other) == (0, False)
    foreign, mine = _copy(where, tmp_path / "foreign")
    os.rename(mine, mine.parent / tiers.level_name(lower, ""))
    n, cached = _seed(foreign, tmp_path / "c2", **other)
    assert n == full and not cached
    # other sources: the manifest's digest is not this checkout's
    stale, mine = _copy(where, tmp_path / "stale")
    manifest = json.loads((mine / cachepack.MANIFEST).read_text())
    (mine / cachepack.MANIFEST).write_text(json.dumps({**manifest, "sources": "0" * 64}))
    assert _seed(stale, tmp_path / "c3") == (0, False)
    # a damaged data file: that entry is left out, the others merge
    damaged, mine = _copy(where, tmp_path / "damaged")
    step = next(n for n in manifest["files"] if n.startswith("edgellm.runtime.model~model.forward") and ".nbc" in n)
    data = bytearray((mine / step).read_bytes())
    data[len(data) // 2] ^= 1
    (mine / step).write_bytes(bytes(data))
    assert _seed(damaged, tmp_path / "c4") == (full - 1, False)


def test_build_refuses_an_unknown_level_in_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "edgellm.runtime.cachepack", "build", "--levels", "x86-64-v9"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "x86-64-v9" in r.stderr, r.stderr
    assert np.all([lvl in r.stderr for lvl in ("x86-64-v4+avx512vnni", "x86-64-v3")])


def test_warmup_says_what_the_pack_gave_and_compiles_the_rest(packs, tmp_path):
    """`edgellm warmup` on an empty cache: the fp16 step from the pack (the test pack holds that
    one), the fp32 step compiled."""
    where, _ = packs
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "EDGELLM_CACHEPACK": str(where)}
    warm = [sys.executable, "-c", "from edgellm.cli import main; main()", "warmup"]
    r = subprocess.run(warm, capture_output=True, text=True, env=env, timeout=1800)
    said = r.stdout + r.stderr  # the console writes to stderr
    assert r.returncode == 0, said[-2000:]
    assert "fp16 KV cache: loaded from the package's compiled kernels" in said, said[-2000:]
    assert "fp32 KV cache: compiled" in said, said[-2000:]

"""numba's cache keyed on every source a kernel is built from (runtime/kernels/jitcache.py): a kernel whose
callee changed in another file recompiles instead of loading its stale cached code."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest
from numba.core.caching import NullCache
from numba.core.dispatcher import Dispatcher

import edgellm.runtime as rt
from edgellm.runtime.kernels import jitcache

_CALLEE = "from numba import njit\n\n\n@njit(cache=True)\ndef f():\n    return {value}\n"
_CALLER = textwrap.dedent(
    """
    from numba import njit

    from .callee import f
    {stamp}

    @njit(cache=True)
    def g():
        return f() * 10
    {call}
    """
)
_RUN = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from pkg.caller import g; print(g(), sum(g.stats.cache_hits.values()))"
)


def _package(root, value: int, stamped: bool):
    pkg = root / "pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "callee.py").write_text(_CALLEE.format(value=value))
    if not (pkg / "caller.py").exists():  # the caller's file never changes: its own stamp stays valid
        stamp = "from edgellm.runtime.kernels.jitcache import stamp" if stamped else ""
        call = "stamp(globals())" if stamped else ""
        (pkg / "caller.py").write_text(_CALLER.format(stamp=stamp, call=call))


def _run(root) -> tuple[int, int]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(root / "cache")}
    r = subprocess.run([sys.executable, "-c", _RUN, str(root)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    value, hits = r.stdout.split()
    return int(value), int(hits)


@pytest.mark.parametrize("stamped", [False, True])
def test_a_changed_callee_in_another_file_recompiles_its_caller(tmp_path, stamped):
    """numba alone (stamped=False) loads the caller's stale code after its callee's file changed:
    the hazard, shown. With stamp() the caller's index is stale too and it recompiles."""
    _package(tmp_path, 1, stamped)
    assert _run(tmp_path) == (10, 0)  # compiled and cached
    assert _run(tmp_path) == (10, 1)  # loaded from the cache
    _package(tmp_path, 2, stamped)
    if stamped:
        assert _run(tmp_path) == (20, 0)  # recompiled
        assert _run(tmp_path) == (20, 1)  # and cached again under the new sources
    else:
        assert _run(tmp_path) == (10, 1)  # numba's own cache: the old callee's code


def _runtime_modules():
    for info in pkgutil.walk_packages(rt.__path__, rt.__name__ + "."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def test_every_cached_runtime_kernel_is_stamped():
    """A module that defines cached kernels and forgets stamp(globals()) fails here: every cached
    kernel carries the sources digest and saves under the folder's lock."""
    cached, missing = 0, []
    for mod in _runtime_modules():
        for name, obj in vars(mod).items():
            if isinstance(obj, Dispatcher) and obj.__module__ == mod.__name__ and not isinstance(obj._cache, NullCache):
                cached += 1
                save = obj._cache._cache_file.save
                if not jitcache.stamped(obj) or save.__qualname__ != "locked.<locals>.locked_save":
                    missing.append(f"{mod.__name__}.{name}")
    assert cached > 20 and not missing, missing


def test_sources_follow_the_kernels_imports_only():
    """The step's digest covers the kernels and the constants they read (format/records.py), not
    the server or the generator (editing those must not recompile the kernels)."""
    from edgellm.runtime import model

    root = os.path.dirname(model.__file__)
    got = {os.path.relpath(p, root) for p in jitcache.sources(model.__file__)}
    must = {"model.py", "kernels/layers.py", "kernels/quant.py", "kernels/simd.py", "kernels/hooks_x86.py"}
    must |= {"kernels/hooks_neon.py", "kernels/family.py", "format/records.py", "kvcache.py", "kernels/jitcache.py"}
    assert must <= got, must - got
    assert not got & {"serve.py", "generate.py", "speculate.py", "__init__.py", "engine.py"}, got


def test_digest_changes_with_a_source_and_not_with_its_path(tmp_path):
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "m.py").write_text("from .n import x\n")
        (tmp_path / where / "n.py").write_text("x = 1\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "m.py").write_text("from .n import x\n")
    (tmp_path / "c" / "n.py").write_text("x = 2\n")
    a, b, c = (jitcache.digest(str(tmp_path / w / "m.py")) for w in "abc")
    assert a == b != c


_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from numba.core.caching import IndexDataCacheFile
    from edgellm.runtime.kernels.jitcache import locked
    folder, tag, use_lock = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    f = IndexDataCacheFile(folder, "kernel", ("stamp",))
    if use_lock:
        locked(f)
    open(os.path.join(folder, "ready-" + tag), "w").close()
    while len([n for n in os.listdir(folder) if n.startswith("ready-")]) < 2:  # start together
        time.sleep(0.001)
    for i in range(150):
        f.save((tag, i), ("code of", tag, i))
    """
)


@pytest.mark.parametrize("locked", [False, True])
def test_two_processes_saving_at_once_keep_each_entry_with_its_own_code(tmp_path, locked):
    """Two processes saving specializations of one kernel into one cache folder at once (numba's
    index file and numbered data files). numba's own save (locked=False) loses entries and can
    leave the index naming another entry's code: the hazard, shown. `locked` keeps all 300,
    each with its own data."""
    from numba.core.caching import IndexDataCacheFile

    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), tag, str(int(locked))]) for tag in "ab"]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    f = IndexDataCacheFile(str(tmp_path), "kernel", ("stamp",))
    index = f._load_index()
    wrong = [key for key, name in index.items() if f._load_data(name) != ("code of", *key)]
    lost = 300 - len(index)
    if locked:
        assert lost == 0 and wrong == [], (lost, wrong[:5])
    else:
        assert lost > 0 or wrong, "numba's unlocked save kept every entry: the race did not show"

"""Numba's on-disk cache, keyed on every runtime source a kernel is built from.

numba validates a cached function against its own source file only (the index holds that file's
mtime and size). A kernel inlines the kernels it calls from other files: after layers.py changes,
a cached `model.forward` (model.py unchanged) would still load the old attention code. That hit
this project's own tests once, and it hits every editable install after a `git pull` that changes
a kernel but not its callers.

`stamp(globals())`, called at the end of each module that defines cached kernels, replaces the
stamp of each of its cache indexes (numba's: the file's mtime and size) with a digest of the
module's source and every runtime module it imports (relative imports, function-level ones
included, followed transitively): contents only, so an index built from the same sources elsewhere
(a cache pack in the wheel, cachepack.py) is as fresh as one built here. A changed
digest makes numba treat the whole index as stale: it recompiles, and the next save overwrites
the index and reuses its data files, so stale entries do not pile up. Processes with different
sources that share a cache folder each load only the entries built from their own sources.

The compile target (CPU name and features) is already part of numba's key for each entry: a
cache built for one CPU is never loaded on another (kernels/tiers.py).

Saves and loads are serialized between processes (`locked`). numba's own save reads the index, picks
the first free data file number, writes the index, then the data, with no lock: two processes
compiling different specializations of one kernel at once (two first starts, `serve` beside `run`,
test workers) both take number 1, and the index can end up naming a file that holds the other's
code, which a later start loads as its own (numba issues #4807, #10128; two processes saving 150
entries each lost 117-133 of the 300 and left 3-32 naming another's data, tests/test_jitcache.py).
Here numba's own save runs under an exclusive flock on the cache folder and its load under a
shared one: one process at a time reads the index, picks the number and writes both files, and no
load sees an index whose data file is not written yet.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re

try:
    import fcntl
except ImportError:  # Windows: numba's own unlocked save and load
    fcntl = None

_MARK = "edgellm-sources"
STAMPED: list = []  # every stamped dispatcher in this process, in import order (cachepack.py reads their caches)


@functools.lru_cache(maxsize=None)
def _file_hash(path: str) -> tuple[bytes, tuple[str, ...]]:
    """(sha256 of the file, the runtime files it imports, as absolute paths)."""
    with open(path, "rb") as f:
        src = f.read()
    return hashlib.sha256(src).digest(), tuple(sorted(_imports(path, src)))


_FROM = re.compile(rb"^[ \t]*from[ \t]+(\.+)([\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)", re.M)


def _imports(path: str, src: bytes) -> set[str]:
    """The files of the relative imports in `src`, module level or in a function (a regex, not
    ast: parsing every source on each start cost 0.16 s). `from .a import b` reads a.py, or, where
    a is a package, a/b.py when b is a submodule and a/__init__.py when b is a name defined there."""
    found = set()
    here = os.path.dirname(path)
    for dots, module, names in _FROM.findall(src):
        base = here
        for _ in range(len(dots) - 1):
            base = os.path.dirname(base)
        if module:
            base = os.path.join(base, *module.decode().split("."))
        if os.path.isfile(base + ".py"):
            found.add(base + ".py")
            continue
        names = re.sub(rb"#[^\n]*", b"", names).strip(b"()")
        for name in (n.split()[0].decode() for n in names.split(b",") if n.strip()):
            sub = [os.path.join(base, name + ".py"), os.path.join(base, name, "__init__.py")]
            hit = [p for p in sub if os.path.isfile(p)]
            found.update(hit or [os.path.join(base, "__init__.py")])
    return {os.path.abspath(p) for p in found if os.path.isfile(p)}


@functools.lru_cache(maxsize=None)
def sources(path: str) -> tuple[str, ...]:
    """`path` and every runtime file it imports, transitively, sorted."""
    seen, todo = set(), [os.path.abspath(path)]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(_file_hash(p)[1])
    return tuple(sorted(seen))


@functools.lru_cache(maxsize=None)
def digest(path: str) -> str:
    """sha256 over the contents of sources(path), each named relative to `path`'s folder (the
    same sources at another path give the same digest)."""
    root = os.path.dirname(os.path.abspath(path))
    h = hashlib.sha256()
    for p in sources(path):
        h.update(os.path.relpath(p, root).encode() + b"\0" + _file_hash(p)[0])
    return h.hexdigest()


def _index(obj):
    """(numba's cache index file of `obj`, its source stamp), or (None, None) for anything else."""
    cache_file = getattr(getattr(obj, "_cache", None), "_cache_file", None)
    return cache_file, getattr(cache_file, "_source_stamp", None)


def stamped(dispatcher) -> bool:
    """Whether `dispatcher`'s cache carries the sources digest (a test checks every cached kernel)."""
    own = _index(dispatcher)[1]
    return isinstance(own, tuple) and own[:1] == (_MARK,)


@contextlib.contextmanager
def folder_lock(folder: str, mode: int):
    """An flock (fcntl.LOCK_EX / LOCK_SH) on `folder`/edgellm-cache.lock for the block."""
    fd = os.open(os.path.join(folder, "edgellm-cache.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def locked(cache_file):
    """Serialize numba's own IndexDataCacheFile.save and .load of `cache_file` between processes
    (module docstring): a save under the folder's exclusive lock (its index read, number picked and
    files written by one process at a time), a load under a shared one (it never reads an index
    whose data file is not written yet). Where fcntl is missing (Windows) numba's methods stay."""
    if fcntl is None:
        return cache_file
    save, load = cache_file.save, cache_file.load

    def locked_save(key, data):
        with folder_lock(cache_file._cache_path, fcntl.LOCK_EX):
            save(key, data)

    def locked_load(key):
        with folder_lock(cache_file._cache_path, fcntl.LOCK_SH):
            return load(key)

    cache_file.save, cache_file.load = locked_save, locked_load
    return cache_file


def stamp(namespace: dict) -> int:
    """Key the cache of every cached numba function in `namespace` (a module's globals) on the
    digest of that module's sources, and serialize its saves and loads (`locked`). Returns how many it
    stamped (an already stamped one is left as it is)."""
    n = 0
    for obj in list(namespace.values()):
        cache_file, own = _index(obj)
        if own is None or stamped(obj):
            continue
        cache_file._source_stamp = (_MARK, digest(namespace["__file__"]))
        locked(cache_file)
        STAMPED.append(obj)
        n += 1
    return n

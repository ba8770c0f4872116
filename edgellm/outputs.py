"""Output directories that appear whole or not at all, and never over an input.

Every command writes into a temporary sibling of its output and renames it into place at the
end, so an interrupted or failed command leaves nothing half-written at the output path.
Missing parent folders are created (and removed again if the command fails). An output equal
to, inside, or around any input is refused even with --force, so no command can destroy what
it reads. `COMPLETED` lists the outputs this process renamed into place, so an interrupt that
comes after the rename can say that the output is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import EdgeLLMError

COMPLETED: list[Path] = []  # outputs renamed into place by this process, in order
EXPORT_MARKER = "model.onnx"  # a folder holding it is an export directory


def existing_ancestor(out: Path) -> Path:
    """The nearest folder above `out` that exists (where the missing parents will be created)."""
    p = Path(os.path.abspath(out)).parent
    while not p.exists():
        p = p.parent
    return p


def _local(spec) -> Path | None:
    if spec is None:
        return None
    p = Path(str(spec))
    return Path(os.path.realpath(p)) if p.exists() else None


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_dir(out: Path, force: bool, inputs=(), protect_exports: bool = False) -> None:
    """Refuse an existing output path unless `force`; refuse an output equal to, inside or
    around any of `inputs` (paths or specs; non-local ones are ignored) even with `force`;
    with `protect_exports`, refuse to replace or write into an export directory; check that
    the nearest existing parent is a writable folder."""
    out = Path(out)
    real = Path(os.path.realpath(out))
    for spec in inputs:
        inp = _local(spec)
        if inp is None:
            continue
        if _within(real, inp):
            where = "is" if real == inp else "is inside"
            raise EdgeLLMError(
                f"output '{out}' {where} the input '{spec}'; choose an output outside it (--force never replaces an "
                "input)"
            )
        if _within(inp, real):
            raise EdgeLLMError(
                f"output '{out}' contains the input '{spec}'; replacing it would delete the input (--force never does)"
            )
    if protect_exports:
        for p in (real, *real.parents):
            if (p / EXPORT_MARKER).is_file():
                raise EdgeLLMError(
                    f"output '{out}' is {'inside ' if p != real else ''}the export directory '{p}'; "
                    "choose a folder of its own for the report"
                )
    if out.exists() or out.is_symlink():
        if not force:
            raise EdgeLLMError(f"output '{out}' already exists; choose another path or pass --force to replace it")
        if not out.is_dir() or out.is_symlink():
            raise EdgeLLMError(f"output '{out}' exists and is not a folder; remove it or choose another path")
    parent = existing_ancestor(out)
    if not parent.is_dir():
        raise EdgeLLMError(f"cannot write output '{out}': '{parent}' is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgeLLMError(f"cannot write to '{parent}' (permission denied); choose a writable output path")


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM for the few renames that swap the output in (delivered right after)."""
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    if main:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False, inputs=(), protect_exports: bool = False):
    """Yield a temporary sibling directory; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    check_output_dir(out, force, inputs, protect_exports)
    parent = Path(os.path.abspath(out)).parent
    created = []  # missing parents made here, deepest last
    p = parent
    while not p.exists():
        created.insert(0, p)
        p = p.parent
    tmp = None
    try:
        # Signals are held while the folder is made, so that one arriving just after mkdtemp is
        # raised here, inside this try, with `tmp` set: it used to land between mkdtemp and the
        # try and leave the folder behind (seen once under load in tests/test_fuzz.py).
        with _signals_held():
            try:
                parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
            except OSError as exc:
                raise EdgeLLMError(f"cannot create output '{out}' ({exc.strerror or exc})") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any new folder
        yield tmp
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    old = None
    with _signals_held():
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        COMPLETED.append(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            break

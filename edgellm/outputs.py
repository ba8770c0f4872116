"""Output directories that appear whole or not at all.

Every command writes into a temporary sibling of its output and renames it into place at the
end, so an interrupted or failed command leaves nothing half-written at the output path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import EdgeLLMError


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing output path unless `force`; check the parent is writable."""
    out = Path(out)
    if out.exists() and not force:
        raise EdgeLLMError(f"output '{out}' already exists; choose another path or pass --force to replace it")
    parent = out.resolve().parent
    if not parent.exists():
        raise EdgeLLMError(f"the folder '{parent}' for output '{out}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise EdgeLLMError(f"cannot write to '{parent}' (permission denied); choose a writable output path")


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False):
    """Yield a temporary sibling directory; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    check_output_dir(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any new folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)

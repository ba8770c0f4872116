"""`edgellm warmup`: compile the runtime's kernels once, before the first `edgellm run`."""

from __future__ import annotations

from typing import Annotated

import typer

from .run import Kernels


def warmup(
    kernels: Annotated[
        Kernels,
        typer.Option("--kernels", help="Kernel tier to compile: auto = the best the CPU has (what run uses)."),
    ] = Kernels.auto,
):
    """Compile the numba runtime's decode step for this CPU into numba's cache (run once after
    installing).

    A wheel built with 'make wheel' already carries the compiled kernels of every x86-64 level:
    there the first 'edgellm run' loads them and this command only checks. Elsewhere (a source
    checkout, ARM, another numba version) the first 'edgellm run' compiles the step itself (about
    30 s of CPU on a laptop core, minutes on a Raspberry Pi), in a child process. The compiled code
    depends on the CPU's x86-64 level (numba keys its cache on it: code for another level is
    recompiled, never run) and on the kernel tier, not on the model: every export then starts warm.
    Example: pip install edgellm && edgellm warmup
    """
    from ..console import console
    from ..runtime.kernels.tiers import target_name
    from ..runtime.warmup import cache_dir
    from ..runtime.warmup import warmup as compile_step

    with console.status(f"compiling the kernels for {target_name()}"):
        rows = compile_step(kernels.value)
    for r in rows:
        what = "compiled" if r["compiled"] else "already cached"
        if r["from_pack"]:
            what = "loaded from the package's compiled kernels"
        console.print(
            f"{r['tier']} kernels, {r['kv_cache']} KV cache: {what} in {r['wall_s']:.1f} s ({r['cpu_s']:.1f} s CPU)",
            highlight=False,
        )
    console.print(f"[dim]numba cache: {cache_dir()} (target {target_name()})[/]", highlight=False)

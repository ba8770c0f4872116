"""The CPU numba compiles the kernels for: the x86-64 level the host has, not the host's model.

numba compiles for the host CPU by name (`icelake-server`, `znver4`) and keys every cache entry on
that name and the host's whole feature string. A cache built on one machine then never loads on
another, so every machine's first start compiled the kernels (35 s on an Ice Lake core, minutes on
slow cores), and no cache could be shipped.

`pin()` names the target by the psABI level the host has (x86-64-v2, -v3, -v4) plus the two
dot-product extensions the kernel tiers use (avx512vnni, avxvnni): every machine of one level gets
the same key, so caches built once per level (cachepack.py, in the wheel) load on all of them.
Code for a level runs on any CPU that has it, and the key keeps a level's code from loading on a
CPU below it: a host without AVX-512 pins x86-64-v3, whose key is not x86-64-v4's.

The pin sets NUMBA_CPU_NAME / NUMBA_CPU_FEATURES before numba builds its CPU target (the runtime
package's first import), so child processes compile for the same target. Left alone: a target the
user names (either variable set), EDGELLM_NUMBA_TARGET=host (compile for the host CPU by name, as
numba does), other architectures (ARM hosts compile for their own CPU), and a process where numba
already built its CPU target (some other library compiled first): that process compiles for the
host, which is always correct, only not shared.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

# The x86-64 psABI micro-architecture levels (LLVM's CPU names), each with the features LLVM gives it.
V2 = ("cx16", "sahf", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3")
V3 = V2 + ("avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe", "xsave")
V4 = V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
LEVELS = (("x86-64-v4", V4), ("x86-64-v3", V3), ("x86-64-v2", V2))
# The extensions a kernel tier needs beyond its level (hooks_x86.py), added where the host has them.
EXTRAS = {"x86-64-v4": ("avx512vnni", "avxvnni"), "x86-64-v3": ("avxvnni",)}


def choose(host: Mapping[str, bool]) -> tuple[str, str]:
    """(NUMBA_CPU_NAME, NUMBA_CPU_FEATURES) for a host with the LLVM features `host` marks true."""
    for name, need in LEVELS:
        if all(host.get(f) for f in need):
            return name, ",".join("+" + f for f in EXTRAS.get(name, ()) if host.get(f))
    return "x86-64", ""


def _numba_target_built() -> bool:
    registry = sys.modules.get("numba.core.registry")
    return registry is not None and "_toplevel_target_context" in vars(registry.cpu_target)


def pin(environ=os.environ) -> tuple[str, str] | None:
    """Pin numba's compile target to the host's level (module docstring); the (name, features)
    set, or None where it is left alone."""
    if environ.get("EDGELLM_NUMBA_TARGET", "level") == "host":
        return None
    if "NUMBA_CPU_NAME" in environ or "NUMBA_CPU_FEATURES" in environ:
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or _numba_target_built():
        return None
    import llvmlite.binding as llb

    try:
        host = llb.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot read this CPU's features: numba compiles for the host as it does
        return None
    name, features = choose(host)
    environ["NUMBA_CPU_NAME"], environ["NUMBA_CPU_FEATURES"] = name, features
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba is imported: its config has read the environment already
        config.CPU_NAME, config.CPU_FEATURES = name, features
    return name, features

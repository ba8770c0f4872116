"""Kernel tier registry and selection: which tiers exist (hook.py says what one is), which the
CPU numba compiles for has, and which one a model runs.

The compile target is numba's (its CPU name and features, NUMBA_CPU_NAME / NUMBA_CPU_FEATURES
included), never the host query alone: a cache built for `generic` then holds generic code only.

A `Tier` passed to a compiled kernel is typed as the literal of its id (`typeof` below): each tier
is a specialization of its own, holding that tier's tile code only (simd.py `_per_tier`), and its
own entry in numba's cache (whose index keys on the argument types and on the target CPU's name
and features). A plain int id compiles one switch over every tier the target has (tests and
direct calls); `NumbaModel` and the self-check pass the `Tier`, so a first start compiles one tier,
not all of them (4 on AVX-512 machines: 37 -> 19 s of compile CPU for SmolLM2 on Zen 5).
"""

from __future__ import annotations

import functools
import re

import llvmlite.binding as llb
from numba.core import types
from numba.extending import typeof_impl

from ..errors import EdgeLLMError
from .hook import Tier


def _tiers() -> tuple[Tier, ...]:
    from .hooks_generic import GENERIC
    from .hooks_neon import NEON, NEON_DOTPROD
    from .hooks_x86 import AVX2, AVX512_VNNI, AVX_VNNI

    return (AVX512_VNNI, AVX_VNNI, AVX2, NEON_DOTPROD, NEON, GENERIC)


TIERS = _tiers()
KNOWN = (
    "avx512-vnni",
    "avx-vnni",
    "avx2",
    "neon-dotprod",
    "neon",
    "generic",
)  # every name `kernels=` takes (and "auto")
BY_NAME = {t.name: t for t in TIERS}
BY_ID = {t.id: t for t in TIERS}
NAMES = tuple(t.name for t in TIERS)


_LITERALS = {t.id: types.literal(t.id) for t in TIERS}  # made once: typeof runs on every call


@typeof_impl.register(Tier)
def _typeof_tier(tier, c):
    return _LITERALS[tier.id]  # unboxed through Tier.__index__


# ----------------------------------------------------------------------------- the compile target
@functools.lru_cache(maxsize=1)
def target():
    """(cpu name, feature string, arch, llvmlite TargetMachine) numba compiles for: its CPU name
    and features honour NUMBA_CPU_NAME / NUMBA_CPU_FEATURES (a cache built for `generic` then
    holds generic code), not only the host."""
    from numba.core.registry import cpu_target

    cg = cpu_target.target_context.codegen()
    name = cg._get_host_cpu_name()
    feats = cg._tm_features if isinstance(getattr(cg, "_tm_features", None), str) else ""
    triple = llb.get_process_triple()
    arch = (
        "aarch64"
        if triple.startswith(("aarch64", "arm64"))
        else "x86_64"
        if triple.startswith(("x86_64", "amd64"))
        else triple.split("-")[0]
    )
    tm = getattr(cg, "_tm", None)
    if tm is None:  # older numba: build the same machine
        tm = llb.Target.from_triple(triple).create_target_machine(cpu=name, features=feats, opt=2, jit=True)
    return name, feats, arch, tm


def _asm(ir_text: str) -> str:
    mod = llb.parse_assembly(ir_text)
    mod.triple = llb.get_process_triple()
    mod.verify()
    return target()[3].emit_assembly(mod)


@functools.lru_cache(maxsize=None)
def available(name: str) -> bool:
    """Whether the compile target has tier `name`'s instructions (its probe, see above)."""
    t = BY_NAME[name]
    if t.arch not in ("any", target()[2]):
        return False
    if t.probe is None:
        return True
    ir_text, pattern = t.probe
    return re.search(pattern, _asm(ir_text)) is not None


_HALF_PROBE = """
define float @h2f(ptr %a) {
  %h = load half, ptr %a
  %f = fpext half %h to float
  ret float %f
}
define void @f2h(float %f, ptr %a) {
  %h = fptrunc float %f to half
  store half %h, ptr %a
  ret void
}
"""


@functools.lru_cache(maxsize=1)
def native_half() -> bool:
    """Whether the compile target converts fp16 <-> fp32 in hardware (F16C, NEON): elsewhere LLVM
    emits libgcc calls (__extendhfsf2) that numba's JIT cannot link, so the kernels convert
    with integer ops (irutil.half_to_float)."""
    asm = _asm(_HALF_PROBE)
    return "hfsf2" not in asm and "sfhf2" not in asm and "gnu_" not in asm


def supported() -> tuple[str, ...]:
    """Names of the tiers the compile target runs, best first."""
    return tuple(t.name for t in TIERS if available(t.name))


def best() -> Tier:
    return BY_NAME[supported()[0]]


def resolve(kernels: str | None) -> Tier:
    """The tier `kernels` names ("auto"/None: the best the compile target has). Unknown or
    unavailable names raise a one-line EdgeLLMError."""
    if kernels in (None, "auto"):
        return best()
    if kernels not in KNOWN:
        raise EdgeLLMError(f"--kernels {kernels!r} is not a kernel tier; give auto or one of {', '.join(KNOWN)}")
    if kernels not in BY_NAME or not available(kernels):
        cpu = target()[0]
        raise EdgeLLMError(
            f"--kernels {kernels!r} needs instructions that the CPU numba compiles for ({cpu}) lacks; "
            f"this CPU runs {', '.join(supported())}"
        )
    return BY_NAME[kernels]


def level_name(cpu: str, features: str) -> str:
    """A compile target as one word: the CPU name and the features named beside it (an x86-64
    level and its extensions, kernels/pin.py), e.g. 'x86-64-v4+avx512vnni', 'haswell'; a host's
    whole feature string (EDGELLM_NUMBA_TARGET=host, ARM) is left out."""
    return cpu if len(features) > 64 else cpu + features.replace(",", "")


def target_name() -> str:
    """level_name of the target numba compiles for."""
    return level_name(*target()[:2])


def describe(tier: Tier) -> str:
    """One line for `info`, `run --verbose` and bench rows, e.g. 'avx2 (numba target x86-64-v3)'."""
    return f"{tier.name} (numba target {target_name()})"

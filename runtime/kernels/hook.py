"""Kernel tiers: one microkernel (simd.py), one small hook per instruction set.

The tile code of the quantized linears (rows x tokens, weight chunks, nibble unpacking, block
scales, float accumulation, row tails, the horizontal sums) is written once, in simd.py. A tier
supplies only what differs between instruction sets, as a `Tier` (below, built in hooks_*.py):

    name, id    "avx2", T_AVX2: the name users pass (`load(..., kernels="avx2")`), the int the
                compiled kernels switch on (ids are stable: they are baked into compile caches)
    arch        "x86_64" | "aarch64" | "any": tiers of another architecture are never probed
    width       weight bytes per chunk = one vector register: 64 (zmm), 32 (ymm), 16 (NEON, SSE);
                L = width/4 int32 lanes, each covering 4 weight bytes
    dot(builder, acc, parts, signed) -> <L x i32>
                acc (<L x i32>) plus, for every (w, x) in parts (each <width x i8>), the sum over
                each lane's 4 bytes of w*x, exact in int32. x is int8 in [-127, 127]; w is the
                unsigned code (4-bit: 0..15, 8-bit: 0..255), or the re-centred signed code
                (code - 8 in -8..7, code - 128 in -128..127) when bits is in `recentre` (then
                `signed` is True). 4-bit
                chunks pass two parts (low nibbles x even columns, high nibbles x odd columns),
                8-bit chunks one. It must not saturate or overflow anywhere in those ranges
                (tests/test_kernels.py::test_dot_extremes checks codes 0/15/255 and x = +-127).
    recentre    bit widths (4, 8) whose codes the tile turns signed before `dot` (sdot is
                signed x signed; AVX2's vpmaddubsw would saturate int16 with 8-bit codes). The
                zero point is folded into each lane's start value, so it costs nothing.
    spread(builder, s, idx, k) -> <L x float>
                optional: s holds the fp16->fp32 scales of the chunk's first L blocks; lane l
                must get s[idx[l]] where idx[l] = l >> k (k = min(log2 lanes per block, log2 L),
                an i32 fixed per linear). None: portable constant shuffles (one per possible k).
    probe       (LLVM IR text, asm regex): the tier is available iff the assembly of that IR, for
                the target machine numba compiles with, matches the regex. The IR must be plain
                (no ISA intrinsics: compiling an intrinsic for a target that lacks it aborts the
                process), chosen so that LLVM selects the tier's instruction only when it may.
    fallback    the name of the tier to use when this one's load-time self-check fails
    zero_init   bit widths for which the tile also has a copy without the lanes' start values,
                run when all of them are zero (the tier re-centres the codes by exactly their
                zero point: AVX2 8-bit symmetric; or neither re-centres nor has one: asymmetric
                with unsigned codes). Only worth it where `dot` adds init as an instruction of
                its own (AVX2: one vpaddd per row-token pair and chunk, of 7 in the 8-bit step);
                VNNI and sdot start their accumulation from it for free.
    subtile     optional (rows, tokens): the prompt tiles (more than one token) run as passes of
                at most this many rows x tokens each, every pass over all chunks (L1-resident
                by then). For ISAs with 16 vector registers (AVX2, AVX-VNNI): the 4x4 tile's 16
                accumulators plus 3 registers of state per row spilled to the stack (AVX2 8-bit:
                227 instructions per chunk for 16 row-token pairs); 2x2 passes ran SmolLM2's
                512-token prompt 1.3-1.4x faster on AVX2 and 1.1-1.25x on AVX-VNNI, where 4x2,
                2x4, 4x1 and 1x4 gained less. None: one pass (32-register ISAs: AVX-512, NEON).

Adding a tier (as NEON was: hooks_neon.py): write its hooks in a new file, build its `Tier`, and
add it to `_tiers()` in tiers.py; nothing in simd.py or quant.py changes. The compiled kernels contain
code only for the tiers the compile target has (the gate runs at code generation), so a cache
built for one CPU never holds another's instructions, and numba keys its caches on the target
CPU name and features, so it is recompiled, never run, on another CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# Stable ids (compiled into the kernels' tier switch). Higher is not "better" across arches.
T_GENERIC, T_NEON, T_NEON_DOTPROD, T_AVX2, T_AVX_VNNI, T_AVX512_VNNI = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Tier:
    name: str
    id: int
    arch: str
    width: int
    dot: Callable
    probe: tuple[str, str] | None  # None: always available on its arch
    fallback: str | None
    recentre: tuple = ()
    spread: Callable | None = None
    subtile: tuple[int, int] | None = None
    zero_init: tuple = ()
    cpus: str = ""  # for messages and docs
    lanes: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "lanes", self.width // 4)

    def __index__(self) -> int:  # a Tier passed to a compiled kernel is unboxed as its id (tiers.py)
        return self.id

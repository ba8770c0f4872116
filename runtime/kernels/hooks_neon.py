"""aarch64 tier hooks (see hook.py for the contract): NEON with dotprod, and plain NEON.

Both work on 16-byte chunks (one q register, 4 int32 lanes of 4 weight bytes each) of signed
codes: the tile re-centres 4-bit codes to -8..7 and 8-bit codes to -128..127 (`recentre`), because
sdot is signed x signed and NEON has no u8 x s8 multiply (usdot needs the i8mm extension).

Per 16 weight bytes (32 4-bit weights: two parts, low and high nibbles; or 16 8-bit weights: one
part), one tile step costs:
    neon-dotprod  2 x sdot (4-bit), 1 x sdot (8-bit)
    neon          smull + smull2 per part, the second part as smlal + smlal2 (products kept in
                  int16), then saddlp + saddlp + addp + add -> 8 (4-bit) / 6 (8-bit)
int16 is exact there: |code| <= 128 and |x| <= 127 give |product| <= 16256, two parts <= 32512.

Which tier a process gets (tiers.py probes): neon-dotprod needs the compile target to select sdot
for plain sext x sext IR (LLVM knows cortex-a76, apple-m1, neoverse-n1 have it even where the
feature string does not spell `+dotprod`, e.g. numba on a Raspberry Pi 5) *and*, on Linux, the
running CPU to report it (HWCAP_ASIMDDP), so a target named by hand (NUMBA_CPU_NAME) that the
CPU lacks gets plain NEON instead of SIGILL. The sdot intrinsic itself is only emitted for
targets that passed: LLVM aborts the process ("Cannot select ... AArch64ISD::SDOT") otherwise.
Plain NEON (ASIMD) is part of every AArch64 Linux/macOS ABI, so `neon` needs no probe.
"""

from __future__ import annotations

import ctypes
import platform
import sys

from .hook import T_NEON, T_NEON_DOTPROD, Tier
from .irutil import F32, I8, I16, I32, const_vec, declare, vec

WIDTH = 16
AT_HWCAP, HWCAP_ASIMDDP = 16, 1 << 20  # <asm/hwcap.h> (aarch64)

# Plain IR (no intrinsic of the tier) of a signed 16-byte dot into 4 int32 lanes: LLVM 22 turns
# it into `sdot v.4s, v.16b, v.16b` exactly when the target has dotprod, smull/smull2 otherwise.
PROBE_SDOT = """
define <4 x i32> @probe(<4 x i32> %acc, ptr %a, ptr %b) {
  %x = load <16 x i8>, ptr %a
  %y = load <16 x i8>, ptr %b
  %xs = sext <16 x i8> %x to <16 x i32>
  %ys = sext <16 x i8> %y to <16 x i32>
  %m = mul <16 x i32> %xs, %ys
  %r = call <4 x i32> @llvm.vector.partial.reduce.add.v4i32.v16i32(<4 x i32> %acc, <16 x i32> %m)
  ret <4 x i32> %r
}
declare <4 x i32> @llvm.vector.partial.reduce.add.v4i32.v16i32(<4 x i32>, <16 x i32>)
"""
SDOT_ASM = r"\bsdot\s+v\d+\.4s"
NEVER = r"(?!)"  # a pattern no assembly matches


def running_cpu_has_dotprod() -> bool | None:
    """HWCAP_ASIMDDP of the running CPU on aarch64 Linux (qemu-user reports its -cpu model's
    bits); None where the kernel offers no answer (macOS, other OSes, not aarch64)."""
    if platform.machine().lower() not in ("aarch64", "arm64") or not sys.platform.startswith("linux"):
        return None
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return None
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return bool(getauxval(AT_HWCAP) & HWCAP_ASIMDDP)


def _sdot(builder, acc, parts, signed):
    """acc + sdot(w, x) per part: each int32 lane += the 4 products of its bytes."""
    assert signed, "neon-dotprod re-centres every bit width (sdot is signed x signed)"
    v16b, v4s = vec(I8, 16), vec(I32, 4)
    fn = declare(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", v4s, [v4s, v16b, v16b])
    for w, x in parts:
        acc = builder.call(fn, [acc, w, x])
    return acc


def _half(builder, v, hi: bool):
    return builder.shuffle_vector(v, v, const_vec(I32, range(8, 16) if hi else range(8)))


def _smull(builder, acc, parts, signed):
    """Baseline NEON: int16 products of the low and high 8 bytes (smull / smull2; a second part
    accumulates with smlal / smlal2), pairwise widened to int32 (saddlp: byte pairs), pairwise
    added (addp: byte quads = the 4 lanes), added to acc."""
    assert signed, "neon re-centres every bit width (smull is signed x signed)"
    v8b, v8h, v4s = vec(I8, 8), vec(I16, 8), vec(I32, 4)
    smull = declare(builder, "llvm.aarch64.neon.smull.v8i16", v8h, [v8b, v8b])
    saddlp = declare(builder, "llvm.aarch64.neon.saddlp.v4i32.v8i16", v4s, [v8h])
    addp = declare(builder, "llvm.aarch64.neon.addp.v4i32", v4s, [v4s, v4s])
    sums = []
    for hi in (False, True):
        total = None
        for w, x in parts:  # <= 2 parts: |sum| <= 2 * 128 * 127 = 32512 fits int16
            p = builder.call(smull, [_half(builder, w, hi), _half(builder, x, hi)])
            total = p if total is None else builder.add(total, p)
        sums.append(builder.call(saddlp, [total]))  # (b0+b1, b2+b3, b4+b5, b6+b7) of this half
    return builder.add(acc, builder.call(addp, sums))  # lanes: bytes 0-3, 4-7, 8-11, 12-15


def _spread_tbl(builder, s, idx, k):
    """Lane l gets s[idx[l]] with one `tbl` (byte table lookup): byte b of lane l reads byte
    4 idx[l] + b of s. The byte indices depend on idx only, so LLVM hoists them out of the loop
    (the portable spread selects among constant shuffles: 5-7 instructions per row and chunk)."""
    v16b = vec(I8, 16)
    tbl = declare(builder, "llvm.aarch64.neon.tbl1.v16i8", v16b, [v16b, v16b])
    byte_idx = builder.add(builder.mul(idx, const_vec(I32, [0x04040404] * 4)), const_vec(I32, [0x03020100] * 4))
    r = builder.call(tbl, [builder.bitcast(s, v16b), builder.bitcast(byte_idx, v16b)])
    return builder.bitcast(r, vec(F32, 4))


def _dotprod_probe() -> tuple[str, str]:
    # The running CPU says no (e.g. NUMBA_CPU_NAME=cortex-a76 on a Pi 4): never available.
    return (PROBE_SDOT, NEVER if running_cpu_has_dotprod() is False else SDOT_ASM)


NEON_DOTPROD = Tier(
    "neon-dotprod",
    T_NEON_DOTPROD,
    "aarch64",
    WIDTH,
    _sdot,
    _dotprod_probe(),
    "neon",
    recentre=(4, 8),
    spread=_spread_tbl,
    cpus="Raspberry Pi 5 (Cortex-A76), Apple M, AWS Graviton 2+",
)
NEON = Tier(
    "neon",
    T_NEON,
    "aarch64",
    WIDTH,
    _smull,
    None,
    "generic",
    recentre=(4, 8),
    spread=_spread_tbl,
    cpus="Raspberry Pi 4 (Cortex-A72), Pi 3 and other ARMv8.0 cores",
)

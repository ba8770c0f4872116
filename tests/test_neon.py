"""The aarch64 tiers (runtime/kernels/hooks_neon.py).

On any host: the tier gate and the code each tier emits, read from aarch64 assembly that
llvmlite's AArch64 back end writes for a named core (cortex-a76 = Raspberry Pi 5, cortex-a72 =
Pi 4). On aarch64 (a Pi, or scripts/test-arm64.sh under qemu-user): the dot hooks against their
numpy reference at the extreme codes; tests/test_kernels.py runs every kernel there on each tier.
"""

from __future__ import annotations

import platform
import re

import numpy as np
import pytest

from edgellm.runtime.kernels import hooks_neon as H
from edgellm.runtime.kernels import tiers

llb = pytest.importorskip("llvmlite.binding")
neon_asm = pytest.importorskip("edgellm.benchmarks.scripts.neon_asm")

ON_ARM = platform.machine().lower() in ("aarch64", "arm64")
# Instructions that need more than ARMv8.0-A + ASIMD (what a Cortex-A72 has): dot products,
# int8 matrix multiply, fp16 arithmetic, SVE registers.
BEYOND_A72 = re.compile(
    r"^\s*(?:sdot|udot|usdot|sudot|smmla|ummla|usmmla|bf\w+|fmlal2?|fmlsl2?)\s"  # dot / matmul / bf16
    r"|^\s*f(?!cvt)\w+\s+v\d+\.[48]h"  # fp16 arithmetic (v8.2)
    r"|\bz\d+\.[bhsd]\b",
    re.M,
)  # SVE


def _probe_asm(cpu, features=""):
    return neon_asm.assembly(H.PROBE_SDOT, cpu, features)


@pytest.mark.parametrize(
    "cpu,features,has",
    [
        ("cortex-a76", "", True),  # Pi 5: LLVM's cortex-a76 implies dotprod; no explicit +dotprod needed
        ("neoverse-n1", "", True),  # Graviton 2
        ("apple-m1", "", True),
        ("generic", "+dotprod", True),
        ("cortex-a72", "", False),  # Pi 4
        ("cortex-a53", "", False),  # Pi 3
        ("generic", "", False),
        ("cortex-a76", "-dotprod", False),
    ],
)
def test_probe_follows_the_target(cpu, features, has):
    """The neon-dotprod probe (plain IR, no intrinsic) becomes sdot exactly where the target has it."""
    assert (re.search(H.SDOT_ASM, _probe_asm(cpu, features)) is not None) == has


def test_running_cpu_without_dotprod_disables_the_tier(monkeypatch):
    """HWCAP says no (a target named by hand that the CPU lacks): the probe can never match."""
    monkeypatch.setattr(H, "running_cpu_has_dotprod", lambda: False)
    ir_text, pattern = H._dotprod_probe()
    assert re.search(pattern, _probe_asm("cortex-a76")) is None
    monkeypatch.setattr(H, "running_cpu_has_dotprod", lambda: None)  # no answer (macOS): trust the target
    ir_text, pattern = H._dotprod_probe()
    assert re.search(pattern, _probe_asm("cortex-a76")) is not None


def test_registered_in_order():
    names = tiers.NAMES
    assert names.index("neon-dotprod") < names.index("neon") < names.index("generic")
    assert tiers.BY_NAME["neon-dotprod"].fallback == "neon" and tiers.BY_NAME["neon"].fallback == "generic"
    if not ON_ARM:
        assert not tiers.available("neon") and not tiers.available("neon-dotprod")


@pytest.mark.parametrize("cpu", ["cortex-a72", "generic"])
@pytest.mark.parametrize("nrows,ntok", neon_asm.TILES)
def test_neon_tile_is_plain_armv8(cpu, nrows, ntok):
    """The neon tier's whole tile (both bit widths, tails included) compiles for a Pi 4 core and
    for generic ARMv8.0 without aborting and uses nothing beyond ARMv8.0 ASIMD: never SIGILL there."""
    for bits in (4, 8):
        asm = neon_asm.assembly(neon_asm.tile_module("neon", nrows, ntok, bits), cpu)
        assert BEYOND_A72.search(asm) is None, BEYOND_A72.search(asm).group(0)
        assert re.search(r"\bsmull2?\b", asm) and re.search(r"\bsaddlp\b", asm)


@pytest.mark.parametrize("nrows,ntok", neon_asm.TILES)
@pytest.mark.parametrize("bits", [4, 8])
def test_dotprod_tile_loop(nrows, ntok, bits):
    """The Pi 5 loop: one sdot per 16 weight bytes per part and token, no widening multiplies."""
    n, loop = neon_asm.per_64_bytes("neon-dotprod", nrows, ntok, bits)
    m = neon_asm.mnemonics(loop)
    assert m["sdot"] == nrows * ntok * (2 if bits == 4 else 1)
    assert not any(k.startswith(("smull", "smlal", "saddlp")) for k in m)
    assert m["tbl"] == nrows  # one table lookup spreads each row's block scales (hooks_neon._spread_tbl)


@pytest.mark.parametrize("tier_name,cpu", [("neon", "cortex-a72"), ("neon", "generic"), ("neon-dotprod", "cortex-a76")])
def test_verify_tiles_compile(tier_name, cpu):
    """The verify pass's kernel (simd.qdot_few: RB x 1..TB exact tiles in token-group and row-tile
    loops, both bit widths) compiles for the Pi cores; the neon tier's stays within ARMv8.0 ASIMD.
    Its 4 x 4 tile keeps decode's per-chunk scaling: with blocks wider than a chunk (shift > 2 on
    16-byte NEON chunks) the prompt tile sums chunks in int32 first, the exact one never does."""
    asm = neon_asm.assembly(neon_asm.few_module(tier_name), cpu)
    dot = r"\bsdot\b" if tier_name == "neon-dotprod" else r"\bsmull2?\b"
    assert re.search(dot, asm)
    if tier_name == "neon":
        assert BEYOND_A72.search(asm) is None, BEYOND_A72.search(asm).group(0)
    exact = neon_asm.assembly(neon_asm.tile_module(tier_name, 4, 4, 4, exact=True), cpu)
    loop = neon_asm.chunk_loop(exact)
    if tier_name == "neon-dotprod":
        assert neon_asm.mnemonics(loop)["sdot"] == 4 * 4 * 2
    with pytest.raises(ValueError):
        neon_asm.chunk_loop(exact, sums=True)
    neon_asm.chunk_loop(neon_asm.assembly(neon_asm.tile_module(tier_name, 4, 4, 4), cpu), sums=True)


def test_instruction_budget():
    """Regression guard on the decode tile (4 rows x 1 token, 4-bit): instructions per 64 weight
    bytes, measured when written: neon-dotprod 73, neon 94 (llama.cpp's NEON Q4_0 loop: see
    benchmarks/RESULTS.md). A change to the tile or hooks that bloats the loop fails here."""
    assert neon_asm.per_64_bytes("neon-dotprod", 4, 1, 4)[0] <= 80
    assert neon_asm.per_64_bytes("neon", 4, 1, 4)[0] <= 100


# ----------------------------------------------------------------------------- on aarch64 only
def ref_lane_dot(acc, parts):
    """numpy reference of a dot hook: acc (4,) int32 + sum over parts of each lane's 4 products."""
    out = acc.astype(np.int64)
    for w, x in parts:
        out += (w.astype(np.int64) * x.astype(np.int64)).reshape(4, 4).sum(1)
    return out


def _hook_kernel(tier_name, nparts):
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from edgellm.runtime.kernels.irutil import I8, I32, ptr, vec

    tier = tiers.BY_NAME[tier_name]

    @intrinsic
    def dot(typingctx, acc, w, x, out):
        def codegen(context, builder, signature, args):
            a, wp, xp, op = args
            av = builder.load(ptr(builder, a, vec(I32, 4)))
            parts = [
                (
                    builder.load(ptr(builder, builder.add(wp, ir.Constant(ir.IntType(64), 16 * i)), vec(I8, 16))),
                    builder.load(ptr(builder, builder.add(xp, ir.Constant(ir.IntType(64), 16 * i)), vec(I8, 16))),
                )
                for i in range(nparts)
            ]
            builder.store(tier.dot(builder, av, parts, True), ptr(builder, op, vec(I32, 4)))
            return context.get_dummy_value()

        return types.none(types.int64, types.int64, types.int64, types.int64), codegen

    @njit
    def run(acc, w, x, out):
        dot(acc.ctypes.data, w.ctypes.data, x.ctypes.data, out.ctypes.data)

    return run


@pytest.mark.skipif(not ON_ARM, reason="runs aarch64 code: a Pi, or scripts/test-arm64.sh under qemu-user")
@pytest.mark.parametrize("tier_name", ["neon-dotprod", "neon"])
@pytest.mark.parametrize("bits", [4, 8])
def test_dot_hook_matches_numpy(tier_name, bits):
    """Re-centred codes at their extremes (4-bit -8/7, 8-bit -128/127) against x = +-127 and
    random values: exact, no int16 wrap in the neon tier's smull/smlal sums."""
    if not tiers.available(tier_name):
        pytest.skip(f"the CPU numba compiles for has no {tier_name}")
    nparts = 2 if bits == 4 else 1
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    rng = np.random.default_rng(bits)
    run = _hook_kernel(tier_name, nparts)
    cases = [
        (np.full((nparts, 16), lo), np.full((nparts, 16), 127)),
        (np.full((nparts, 16), lo), np.full((nparts, 16), -127)),
        (np.full((nparts, 16), hi), np.full((nparts, 16), 127)),
        (np.full((nparts, 16), hi), np.full((nparts, 16), -127)),
    ]
    cases += [(rng.integers(lo, hi + 1, (nparts, 16)), rng.integers(-127, 128, (nparts, 16))) for _ in range(20)]
    for w, x in cases:
        w, x = w.astype(np.int8), x.astype(np.int8)
        acc = rng.integers(-1 << 20, 1 << 20, 4).astype(np.int32)
        out = np.zeros(4, np.int32)
        run(acc, w, x, out)
        np.testing.assert_array_equal(out, ref_lane_dot(acc, list(zip(w, x))))

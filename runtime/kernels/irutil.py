"""Small LLVM IR helpers shared by the tile code (simd.py) and the per-tier hooks (hooks_*.py)."""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32 = ir.HalfType(), ir.FloatType()


def vec(ty, n: int) -> ir.VectorType:
    return ir.VectorType(ty, n)


def ptr(builder, addr, ty):
    """An int64 address as a pointer to `ty`."""
    return builder.inttoptr(addr, ir.PointerType(ty))


def declare(builder, name: str, ret, args):
    """The LLVM function `name` (an intrinsic) declared once in the module being built."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def splat(builder, scalar, n: int):
    """<n x scalar.type> with every lane = scalar."""
    v = builder.insert_element(ir.Constant(vec(scalar.type, n), None), scalar, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(vec(I32, n), [0] * n))


def const_vec(ty, values):
    return ir.Constant(vec(ty, len(values)), list(values))


def masked_load(builder, addr, vty, mask):
    """llvm.masked.load of a `vty` at `addr` (lanes where mask is false read as zero): portable
    IR that every LLVM target lowers (natively on AVX-512 / SVE, as a branchy sequence elsewhere;
    used only for row tails)."""
    n, ety = vty.count, vty.element
    suffix = f"v{n}{'f16' if ety == F16 else 'f32' if ety == F32 else 'i' + str(ety.width)}"
    fn = declare(builder, f"llvm.masked.load.{suffix}.p0", vty, [ir.PointerType(vty), I32, vec(I1, n), vty])
    return builder.call(fn, [ptr(builder, addr, vty), ir.Constant(I32, 1), mask, ir.Constant(vty, None)])


def lane_mask(builder, left, n: int):
    """<n x i1>: lane l is on iff l < left (an i64 count, clamped by the comparison)."""
    left32 = builder.trunc(left, I32)
    return builder.icmp_signed("<", const_vec(I32, range(n)), splat(builder, left32, n))


def prefetch(builder, addr):
    """Software prefetch of the line at `addr` (read, high locality, data cache)."""
    fn = declare(builder, "llvm.prefetch.p0", ir.VoidType(), [ir.PointerType(I8), I32, I32, I32])
    builder.call(fn, [builder.inttoptr(addr, ir.PointerType(I8)), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def reduce_fadd(builder, v):
    n = v.type.count
    fn = declare(builder, f"llvm.vector.reduce.fadd.v{n}f32", F32, [F32, v.type])
    return builder.call(fn, [ir.Constant(F32, 0.0), v], fastmath=("reassoc",))


def fmadd(builder, a, b, c):
    """a * b + c, fused where the target has FMA (contract), two instructions where it has not
    (llvm.fma would become a libm call per lane there)."""
    return builder.fadd(builder.fmul(a, b, flags=("contract",)), c, flags=("contract",))

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
    builder.call(
        fn, [builder.inttoptr(addr, ir.PointerType(I8)), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)]
    )


def reduce_fadd(builder, v):
    n = v.type.count
    fn = declare(builder, f"llvm.vector.reduce.fadd.v{n}f32", F32, [F32, v.type])
    return builder.call(fn, [ir.Constant(F32, 0.0), v], fastmath=("reassoc",))


def fmadd(builder, a, b, c):
    """a * b + c, fused where the target has FMA (contract), two instructions where it has not
    (llvm.fma would become a libm call per lane there)."""
    return builder.fadd(builder.fmul(a, b, flags=("contract",)), c, flags=("contract",))


def _like(v, ty):
    return vec(ty, v.type.count) if isinstance(v.type, ir.VectorType) else ty


def _const(v, ty, value):
    t = _like(v, ty)
    return ir.Constant(t, [value] * t.count) if isinstance(t, ir.VectorType) else ir.Constant(t, value)


def half_to_float(builder, v, native: bool):
    """fp16 value(s) (half or <n x half>) -> float32. native: fpext (vcvtph2ps, fcvtl); else
    integer ops (targets without F16C, where fpext is a libgcc call the JIT cannot link):
    exponent re-biased by one multiply by 2**112, which also normalises subnormals exactly;
    inf/nan keep an all-ones exponent."""
    if native:
        return builder.fpext(v, _like(v, F32))
    h = builder.zext(builder.bitcast(v, _like(v, I16)), _like(v, I32))
    sign = builder.shl(builder.and_(h, _const(h, I32, 0x8000)), _const(h, I32, 16))
    em = builder.and_(h, _const(h, I32, 0x7FFF))
    f = builder.fmul(builder.bitcast(builder.shl(em, _const(h, I32, 13)), _like(v, F32)), _const(h, F32, 2.0**112))
    bits = builder.bitcast(f, _like(v, I32))
    bits = builder.select(
        builder.icmp_unsigned(">=", em, _const(h, I32, 0x7C00)), builder.or_(bits, _const(h, I32, 0x7F800000)), bits
    )
    return builder.bitcast(builder.or_(bits, sign), _like(v, F32))


def float_to_half_bits(builder, v, native: bool):
    """float32 (scalar) -> IEEE fp16 bits (i16), round to nearest even. native: fptrunc; else the
    integer algorithm (F. Giesen's float_to_half_fast3_rtne) with selects, no libgcc call."""
    if native:
        return builder.bitcast(builder.fptrunc(v, F16), I16)
    f = builder.bitcast(v, I32)
    sign = builder.and_(f, ir.Constant(I32, 0x80000000))
    f = builder.xor(f, sign)
    c = lambda x: ir.Constant(I32, x)  # noqa: E731
    big = builder.select(builder.icmp_unsigned(">", f, c(255 << 23)), c(0x7E00), c(0x7C00))  # nan / inf
    magic = c(((127 - 15) + (23 - 10) + 1) << 23)
    sub = builder.sub(
        builder.bitcast(builder.fadd(builder.bitcast(f, F32), builder.bitcast(magic, F32)), I32), magic
    )  # subnormal / zero
    odd = builder.and_(builder.lshr(f, c(13)), c(1))
    norm = builder.lshr(builder.add(builder.add(f, c(((15 - 127) << 23) + 0xFFF)), odd), c(13))
    o = builder.select(
        builder.icmp_unsigned(">=", f, c((127 + 16) << 23)),
        big,
        builder.select(builder.icmp_unsigned("<", f, c(113 << 23)), sub, norm),
    )
    return builder.trunc(builder.or_(o, builder.lshr(sign, c(16))), I16)

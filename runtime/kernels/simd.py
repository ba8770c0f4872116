"""Hand-written LLVM IR for the hot loop: one row of a 4/8-bit weight matrix times int8 activations.

Numba's typing widens every integer product to int64, so a plain `acc += w[i] * x[i]` loop over
uint8/int8 compiles to scalar `imul` (about 3 GMAC/s per core here). These intrinsics state the
vector maths directly, the way llama.cpp's Q4_0 x Q8_0 kernel does:

    per 64 weight bytes (128 4-bit or 64 8-bit weights; "chunk"):
        w       = load <64 x u8>                 (masked for the row's partial last chunk)
        lo, hi  = w & 15, w >> 4                 (4-bit: even / odd columns)
        isum    = vpdpbusd(init, lo, x_even)     (u8 x s8 -> 16 lanes of int32, 4 bytes per lane)
        isum    = vpdpbusd(isum, hi, x_odd)
        scale   = fp16 weight scales of the chunk's blocks, spread to lanes (shufflevector)
                  x activation scales already spread to lanes
        acc    += float(isum) * scale            (16 float lanes; one horizontal sum per row)

`init` carries -zero * sum(x codes of the lane) so symmetric zero points cost nothing.
Napkin math: 10 vector instructions per 128 MACs, so a core is limited by memory (about
20 GB/s here), not by arithmetic. Needs AVX-512 VNNI (`HAVE_VNNI`); kernels fall back to plain
Numba loops elsewhere.

Intrinsics are specialised on `mode` = min(lanes per block, 16), a compile-time constant that
fixes the shuffle from block scales to lanes; lanes per block = group_size/8 (4-bit) or
group_size/4 (8-bit).
"""

from __future__ import annotations

import llvmlite.binding as llb
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_FEATURES = llb.get_host_cpu_features()
HAVE_VNNI = bool(_FEATURES.get("avx512vnni") and _FEATURES.get("avx512bw") and _FEATURES.get("avx512f"))

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32 = ir.HalfType(), ir.FloatType()
V64B = ir.VectorType(I8, 64)
V64M = ir.VectorType(I1, 64)
V16I = ir.VectorType(I32, 16)
V16F = ir.VectorType(F32, 16)
V16H = ir.VectorType(F16, 16)
CHUNK = 64  # weight bytes per step = one zmm register
LANES = 16
MODES = (2, 4, 8, 16)


def _ptr(builder, addr, ty):
    return builder.inttoptr(addr, ir.PointerType(ty))


def _for_each_chunk(builder, w, nbytes, step):
    """Call step(chunk index, 64 weight bytes) over nbytes at address w: whole 64-byte chunks,
    then the tail through a masked load (bytes past nbytes read as zero)."""
    k64 = ir.Constant(I64, CHUNK)
    mload = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(V64B, [ir.PointerType(V64B), I32, V64M, V64B]), "llvm.masked.load.v64i8.p0")
    nfull = builder.sdiv(nbytes, k64)
    tail = builder.srem(nbytes, k64)
    with cgutils.for_range(builder, nfull) as loop:
        c = loop.index
        step(c, builder.load(_ptr(builder, builder.add(w, builder.mul(c, k64)), V64B), align=1))
    with builder.if_then(builder.icmp_signed(">", tail, ir.Constant(I64, 0)), likely=True):
        iota = ir.Constant(V64B, list(range(CHUNK)))
        m = builder.icmp_unsigned("<", iota, _splat(builder, builder.trunc(tail, I8)))
        p = _ptr(builder, builder.add(w, builder.mul(nfull, k64)), V64B)
        step(nfull, builder.call(mload, [p, ir.Constant(I32, 1), m, ir.Constant(V64B, None)]))


def _make_rowdot(bits: int, mode: int):
    """Intrinsic (w, nbytes, xa, xb, init, ws, xsl, lpb) -> float32, all int64 addresses/counts."""

    @intrinsic
    def rowdot(typingctx, w, nbytes, xa, xb, init, ws, xsl, lpb):
        sig = types.float32(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            w, nbytes, xa, xb, init, ws, xsl, lpb = args
            mod = builder.module
            dp = cgutils.get_or_insert_function(mod, ir.FunctionType(V16I, [V16I, V64B, V64B]), "llvm.x86.avx512.vpdpbusd.512")
            red = cgutils.get_or_insert_function(mod, ir.FunctionType(F32, [F32, V16F]), "llvm.vector.reduce.fadd.v16f32")
            acc = cgutils.alloca_once_value(builder, ir.Constant(V16F, None))
            mask = ir.Constant(V16I, [l // mode if mode < 16 else 0 for l in range(LANES)])
            c15 = ir.Constant(V64B, [15] * CHUNK)
            c4 = ir.Constant(V64B, [4] * CHUNK)
            k64, k16 = ir.Constant(I64, CHUNK), ir.Constant(I64, LANES)

            def step(c, wv):
                off = builder.mul(c, k64)
                iv = builder.load(_ptr(builder, builder.add(init, off), V16I), align=4)
                xa_v = builder.load(_ptr(builder, builder.add(xa, off), V64B), align=1)
                if bits == 4:
                    xb_v = builder.load(_ptr(builder, builder.add(xb, off), V64B), align=1)
                    s = builder.call(dp, [iv, builder.and_(wv, c15), xa_v])
                    s = builder.call(dp, [s, builder.lshr(wv, c4), xb_v])
                else:
                    s = builder.call(dp, [iv, wv, xa_v])
                fb = builder.sdiv(builder.mul(c, k16), lpb)  # first block of the chunk
                wh = builder.load(_ptr(builder, builder.add(ws, builder.mul(fb, ir.Constant(I64, 2))), V16H), align=2)
                wsv = builder.fpext(wh, V16F)
                wsv = builder.shuffle_vector(wsv, wsv, mask)
                xs = builder.load(_ptr(builder, builder.add(xsl, off), V16F), align=4)
                f = builder.sitofp(s, V16F)
                a = builder.load(acc)
                builder.store(builder.call(_fma, [f, builder.fmul(wsv, xs), a]), acc)

            _fma = cgutils.get_or_insert_function(mod, ir.FunctionType(V16F, [V16F, V16F, V16F]), "llvm.fma.v16f32")
            _for_each_chunk(builder, w, nbytes, step)
            return builder.call(red, [ir.Constant(F32, 0.0), builder.load(acc)], fastmath=("reassoc",))

        return sig, codegen

    return rowdot


def _splat(builder, scalar):
    v = builder.insert_element(ir.Constant(V64B, None), scalar, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, CHUNK), [0] * CHUNK))


@intrinsic
def as_voidptr(typingctx, addr):
    """An integer address as a void pointer, for `numba.carray(as_voidptr(a), shape, dtype)`."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


rowdot4_m2, rowdot4_m4, rowdot4_m8, rowdot4_m16 = (_make_rowdot(4, m) for m in MODES)
rowdot8_m4, rowdot8_m8, rowdot8_m16 = (_make_rowdot(8, m) for m in MODES[1:])


TT = 8  # tokens per weight load in the matrix-matrix kernel


def _make_tiledot(bits: int, mode: int, ntok: int):
    """Intrinsic (w, nbytes, xa, xb, init, xsl, sa, sl, ws, lpb, out, so): float32 dots to out + u*so.

    The GEMM microkernel of the prompt path: one weight row against `ntok` token rows. Every
    64-byte weight chunk is loaded, unpacked and its block scales spread to lanes once, then used
    for the vpdpbusd products of all `ntok` tokens (accumulators stay in zmm registers). Token u's
    activations are at xa + u*sa, xb + u*sa (int8 codes) and init + u*sl, xsl + u*sl (lanes),
    the layout of `rowdot` (one token) repeated with row strides sa, sl in bytes; token u's result
    is stored at out + u*so (one column of the (tokens, rows) output)."""

    @intrinsic
    def tiledot(typingctx, w, nbytes, xa, xb, init, xsl, sa, sl, ws, lpb, out, so):
        sig = types.none(*([types.int64] * 12))

        def codegen(context, builder, signature, args):
            w, nbytes, xa, xb, init, xsl, sa, sl, ws, lpb, out, so = args
            mod = builder.module
            dp = cgutils.get_or_insert_function(mod, ir.FunctionType(V16I, [V16I, V64B, V64B]), "llvm.x86.avx512.vpdpbusd.512")
            red = cgutils.get_or_insert_function(mod, ir.FunctionType(F32, [F32, V16F]), "llvm.vector.reduce.fadd.v16f32")
            fma = cgutils.get_or_insert_function(mod, ir.FunctionType(V16F, [V16F, V16F, V16F]), "llvm.fma.v16f32")
            accs = [cgutils.alloca_once_value(builder, ir.Constant(V16F, None)) for _ in range(ntok)]
            mask = ir.Constant(V16I, [l // mode if mode < 16 else 0 for l in range(LANES)])
            c15 = ir.Constant(V64B, [15] * CHUNK)
            c4 = ir.Constant(V64B, [4] * CHUNK)
            k64, k16 = ir.Constant(I64, CHUNK), ir.Constant(I64, LANES)
            toks_a = [builder.mul(sa, ir.Constant(I64, u)) for u in range(ntok)]
            toks_l = [builder.mul(sl, ir.Constant(I64, u)) for u in range(ntok)]

            def step(c, wv):
                off = builder.mul(c, k64)
                if bits == 4:
                    lo, hi = builder.and_(wv, c15), builder.lshr(wv, c4)
                fb = builder.sdiv(builder.mul(c, k16), lpb)
                wh = builder.load(_ptr(builder, builder.add(ws, builder.mul(fb, ir.Constant(I64, 2))), V16H), align=2)
                wsv = builder.fpext(wh, V16F)
                wsv = builder.shuffle_vector(wsv, wsv, mask)
                pa = builder.add(xa, off)
                pb = builder.add(xb, off)
                pi = builder.add(init, off)
                px = builder.add(xsl, off)
                for u in range(ntok):
                    iv = builder.load(_ptr(builder, builder.add(pi, toks_l[u]), V16I), align=4)
                    xa_v = builder.load(_ptr(builder, builder.add(pa, toks_a[u]), V64B), align=1)
                    if bits == 4:
                        xb_v = builder.load(_ptr(builder, builder.add(pb, toks_a[u]), V64B), align=1)
                        s = builder.call(dp, [iv, lo, xa_v])
                        s = builder.call(dp, [s, hi, xb_v])
                    else:
                        s = builder.call(dp, [iv, wv, xa_v])
                    xs = builder.load(_ptr(builder, builder.add(px, toks_l[u]), V16F), align=4)
                    f = builder.sitofp(s, V16F)
                    builder.store(builder.call(fma, [f, builder.fmul(wsv, xs), builder.load(accs[u])]), accs[u])

            _for_each_chunk(builder, w, nbytes, step)
            for u, a in enumerate(accs):
                v = builder.call(red, [ir.Constant(F32, 0.0), builder.load(a)], fastmath=("reassoc",))
                builder.store(v, _ptr(builder, builder.add(out, builder.mul(so, ir.Constant(I64, u))), F32), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tiledot


tiledot4_m2, tiledot4_m4, tiledot4_m8, tiledot4_m16 = (_make_tiledot(4, m, TT) for m in MODES)
tiledot8_m4, tiledot8_m8, tiledot8_m16 = (_make_tiledot(8, m, TT) for m in MODES[1:])


def _make_rowdot_float(half: bool):
    """Intrinsic (w, x, n) -> float32: dot of n float32/float16 weights at `w` with float32 `x`."""
    ety = F16 if half else F32
    vty = V16H if half else V16F
    suffix = "v16f16" if half else "v16f32"

    @intrinsic
    def rowdot_float(typingctx, w, x, n):
        sig = types.float32(types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            w, x, n = args
            mod = builder.module
            esize = ir.Constant(I64, 2 if half else 4)
            mload_w = cgutils.get_or_insert_function(mod, ir.FunctionType(vty, [ir.PointerType(vty), I32, ir.VectorType(I1, 16), vty]), f"llvm.masked.load.{suffix}.p0")
            mload_x = cgutils.get_or_insert_function(mod, ir.FunctionType(V16F, [ir.PointerType(V16F), I32, ir.VectorType(I1, 16), V16F]), "llvm.masked.load.v16f32.p0")
            fma = cgutils.get_or_insert_function(mod, ir.FunctionType(V16F, [V16F, V16F, V16F]), "llvm.fma.v16f32")
            red = cgutils.get_or_insert_function(mod, ir.FunctionType(F32, [F32, V16F]), "llvm.vector.reduce.fadd.v16f32")
            accs = [cgutils.alloca_once_value(builder, ir.Constant(V16F, None)) for _ in range(4)]
            k16 = ir.Constant(I64, LANES)

            def widen(v):
                return builder.fpext(v, V16F) if half else v

            def fma_into(acc, wv, xv):
                builder.store(builder.call(fma, [widen(wv), xv, builder.load(acc)]), acc)

            n64 = builder.sdiv(n, ir.Constant(I64, 64))
            with cgutils.for_range(builder, n64) as loop:  # 4 independent accumulators hide FMA latency
                for u in range(4):
                    i = builder.add(builder.mul(loop.index, ir.Constant(I64, 64)), ir.Constant(I64, 16 * u))
                    wv = builder.load(_ptr(builder, builder.add(w, builder.mul(i, esize)), vty), align=2 if half else 4)
                    xv = builder.load(_ptr(builder, builder.add(x, builder.mul(i, ir.Constant(I64, 4))), V16F), align=4)
                    fma_into(accs[u], wv, xv)
            done = builder.mul(n64, ir.Constant(I64, 64))
            rest = builder.sdiv(builder.add(builder.sub(n, done), ir.Constant(I64, 15)), k16)
            iota = ir.Constant(V16I, list(range(LANES)))
            with cgutils.for_range(builder, rest) as loop:
                i = builder.add(done, builder.mul(loop.index, k16))
                left = builder.trunc(builder.sub(n, i), I32)
                lv = builder.insert_element(ir.Constant(V16I, None), left, ir.Constant(I32, 0))
                m = builder.icmp_signed("<", iota, builder.shuffle_vector(lv, lv, ir.Constant(V16I, [0] * LANES)))
                wv = builder.call(mload_w, [_ptr(builder, builder.add(w, builder.mul(i, esize)), vty), ir.Constant(I32, 1), m, ir.Constant(vty, None)])
                xv = builder.call(mload_x, [_ptr(builder, builder.add(x, builder.mul(i, ir.Constant(I64, 4))), V16F), ir.Constant(I32, 1), m, ir.Constant(V16F, None)])
                fma_into(accs[0], wv, xv)
            tot = builder.fadd(builder.fadd(builder.load(accs[0]), builder.load(accs[1])), builder.fadd(builder.load(accs[2]), builder.load(accs[3])))
            return builder.call(red, [ir.Constant(F32, 0.0), tot], fastmath=("reassoc",))

        return sig, codegen

    return rowdot_float


rowdot_f32 = _make_rowdot_float(False)
rowdot_f16 = _make_rowdot_float(True)


@intrinsic
def half_to_float(typingctx, bits16):
    """IEEE fp16 bits (uint16) -> float32 (numba has no float16 scalar type on CPU)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], F16), F32)

    return sig, codegen

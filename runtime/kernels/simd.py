"""Hand-written LLVM IR for the hot loop: a tile of 4/8-bit weight rows times int8 activations.

Numba's typing widens every integer product to int64, so a plain `acc += w[i] * x[i]` loop over
uint8/int8 compiles to scalar `imul` (about 3 GMAC/s per core here). These intrinsics state the
vector maths directly, the way llama.cpp's Q4_0 x Q8_0 kernel does:

    per 64 weight bytes (128 4-bit or 64 8-bit weights; "chunk") of each row in the tile:
        w       = load <64 x u8>                 (masked for the row's partial last chunk)
        lo, hi  = w & 15, w >> 4                 (4-bit: even / odd columns)
        scale   = fp16 weight scales of the chunk's blocks, spread to lanes (vpermps)
        per token of the tile:
            isum  = vpdpbusd(init, lo, x_even)   (u8 x s8 -> 16 lanes of int32, 4 bytes per lane)
            isum  = vpdpbusd(isum, hi, x_odd)
            acc  += float(isum) * scale * (activation scales already spread to lanes)
    one horizontal sum per (row, token) at the end

`init` carries -zero * sum(x codes of the lane) so symmetric zero points cost nothing.
Decode runs 4 rows x 1 token tiles (the activation loads and the per-row overheads are shared by
4 rows), the prompt 4 rows x 4 tokens. Needs AVX-512 VNNI (`HAVE_VNNI`); kernels fall back to
plain Numba loops elsewhere. Lanes per block = group_size/8 (4-bit) or group_size/4 (8-bit), a
power of two passed as its log2 (`shift`).
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


def _ptr(builder, addr, ty):
    return builder.inttoptr(addr, ir.PointerType(ty))


def _for_each_chunk(builder, nbytes, step):
    """Call step(chunk index, load) over nbytes: whole 64-byte chunks, then the tail, where
    load(address) is a masked load (bytes past nbytes read as zero)."""
    k64 = ir.Constant(I64, CHUNK)
    mload = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(V64B, [ir.PointerType(V64B), I32, V64M, V64B]), "llvm.masked.load.v64i8.p0")
    nfull = builder.sdiv(nbytes, k64)
    tail = builder.srem(nbytes, k64)
    with cgutils.for_range(builder, nfull) as loop:
        step(loop.index, lambda addr: builder.load(_ptr(builder, addr, V64B), align=1))
    with builder.if_then(builder.icmp_signed(">", tail, ir.Constant(I64, 0)), likely=True):
        iota = ir.Constant(V64B, list(range(CHUNK)))
        m = builder.icmp_unsigned("<", iota, _splat(builder, builder.trunc(tail, I8)))
        step(nfull, lambda addr: builder.call(mload, [_ptr(builder, addr, V64B), ir.Constant(I32, 1), m, ir.Constant(V64B, None)]))


def _make_qdot(nrows: int, ntok: int):
    """Intrinsic (bits, w, rb, xa, xb, init, xsl, sa, sl, ws, ss, shift, out, so): the microkernel.

    `nrows` consecutive weight rows (row j at w + j*rb, its fp16 block scales at ws + j*ss)
    against `ntok` tokens (token u's int8 codes at xa + u*sa, xb + u*sa, its lanes at init + u*sl,
    xsl + u*sl; the layout of quantize_act). Every 64-byte weight chunk is loaded, unpacked and
    its scales spread to lanes once, then used for all ntok tokens; every activation chunk is
    loaded once for all nrows rows, so loads per (row, token) pair fall as the tile grows (4-bit 1x1:
    6 loads per 64 weight bytes; 4x4: 1.5). The nrows*ntok accumulators stay in zmm registers.
    Raw dots (no bias, no zero-point correction) are stored at out + u*so + j*4.

    Block of lane l in chunk c: (16c + l) >> shift with shift = log2(lanes per block), so the
    scales spread with one vpermps whose index vector (l >> min(shift, 4)) is made once.
    `bits` (4 or 8) picks one of two chunk loops once per call."""

    @intrinsic
    def qdot(typingctx, bits, w, rb, xa, xb, init, xsl, sa, sl, ws, ss, shift, out, so):
        sig = types.none(*([types.int64] * 14))

        def codegen(context, builder, signature, args):
            nbits, w, rb, xa, xb, init, xsl, sa, sl, ws, ss, shift, out, so = args
            mod = builder.module
            dp = cgutils.get_or_insert_function(mod, ir.FunctionType(V16I, [V16I, V64B, V64B]), "llvm.x86.avx512.vpdpbusd.512")
            red = cgutils.get_or_insert_function(mod, ir.FunctionType(F32, [F32, V16F]), "llvm.vector.reduce.fadd.v16f32")
            fma = cgutils.get_or_insert_function(mod, ir.FunctionType(V16F, [V16F, V16F, V16F]), "llvm.fma.v16f32")
            perm = cgutils.get_or_insert_function(mod, ir.FunctionType(V16F, [V16F, V16I]), "llvm.x86.avx512.permvar.sf.512")
            pf = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, I32, I32, I32]), "llvm.prefetch.p0")
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(V16F, None)) for _ in range(ntok)] for _ in range(nrows)]
            c15 = ir.Constant(V64B, [15] * CHUNK)
            c4 = ir.Constant(V64B, [4] * CHUNK)
            k64, k16 = ir.Constant(I64, CHUNK), ir.Constant(I64, LANES)
            lane_shift = builder.trunc(builder.select(builder.icmp_signed("<", shift, ir.Constant(I64, 4)), shift, ir.Constant(I64, 4)), I32)
            lsv = builder.insert_element(ir.Constant(V16I, None), lane_shift, ir.Constant(I32, 0))
            lsv = builder.shuffle_vector(lsv, lsv, ir.Constant(V16I, [0] * LANES))
            idx = builder.lshr(ir.Constant(V16I, list(range(LANES))), lsv)  # lane -> block within the chunk
            rows_w = [builder.add(w, builder.mul(rb, ir.Constant(I64, j))) for j in range(nrows)]
            rows_s = [builder.add(ws, builder.mul(ss, ir.Constant(I64, j))) for j in range(nrows)]
            toks_a = [builder.mul(sa, ir.Constant(I64, u)) for u in range(ntok)]
            toks_l = [builder.mul(sl, ir.Constant(I64, u)) for u in range(ntok)]

            def step(bits, c, load):
                off = builder.mul(c, k64)
                fb = builder.lshr(builder.mul(c, k16), shift)  # first block of the chunk
                units = []
                for j in range(nrows):
                    if PREFETCH and ntok == 1:  # decode streams weights from DRAM: ask PREFETCH bytes ahead
                        ahead = builder.add(builder.add(rows_w[j], off), ir.Constant(I64, PREFETCH))
                        builder.call(pf, [builder.inttoptr(ahead, cgutils.voidptr_t), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])
                    wv = load(builder.add(rows_w[j], off))
                    parts = (builder.and_(wv, c15), builder.lshr(wv, c4)) if bits == 4 else (wv,)
                    wh = builder.load(_ptr(builder, builder.add(rows_s[j], builder.mul(fb, ir.Constant(I64, 2))), V16H), align=2)
                    units.append((parts, builder.call(perm, [builder.fpext(wh, V16F), idx])))
                pa, pb, pi, px = (builder.add(p, off) for p in (xa, xb, init, xsl))
                for u in range(ntok):
                    iv = builder.load(_ptr(builder, builder.add(pi, toks_l[u]), V16I), align=4)
                    xs = builder.load(_ptr(builder, builder.add(px, toks_l[u]), V16F), align=4)
                    xv = [builder.load(_ptr(builder, builder.add(pa, toks_a[u]), V64B), align=1)]
                    if bits == 4:
                        xv.append(builder.load(_ptr(builder, builder.add(pb, toks_a[u]), V64B), align=1))
                    for j, (parts, wsv) in enumerate(units):
                        s = iv
                        for wpart, xpart in zip(parts, xv):
                            s = builder.call(dp, [s, wpart, xpart])
                        acc = accs[j][u]
                        builder.store(builder.call(fma, [builder.sitofp(s, V16F), builder.fmul(wsv, xs), builder.load(acc)]), acc)

            with builder.if_else(builder.icmp_signed("==", nbits, ir.Constant(I64, 4))) as (four, eight):
                with four:
                    _for_each_chunk(builder, rb, lambda c, load: step(4, c, load))
                with eight:
                    _for_each_chunk(builder, rb, lambda c, load: step(8, c, load))
            for j in range(nrows):
                for u in range(ntok):
                    v = builder.call(red, [ir.Constant(F32, 0.0), builder.load(accs[j][u])], fastmath=("reassoc",))
                    dst = builder.add(out, builder.add(builder.mul(so, ir.Constant(I64, u)), ir.Constant(I64, 4 * j)))
                    builder.store(v, _ptr(builder, dst, F32), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return qdot


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


# Software prefetch distance of the decode kernels, in bytes of each row ahead. Decode reads every
# weight once per token from DRAM; the 4-row tile's interleaved streams defeat the hardware
# prefetcher (all 121 SmolLM2 4-bit linears: 3.7 ms without, 2.1 ms at 12-16 KiB, 2.9 ms for the
# one-row kernel before; 2.6 ms at 8 KiB, 2.3 ms at 24 KiB; medians of 30 on this machine).
PREFETCH = 16384
RB, TB = 4, 4  # rows x tokens of the big tile (decode: RB x 1; prompt: RB x TB)
qdot_1x1, qdot_rx1, qdot_1xt, qdot_rxt = (_make_qdot(r, t) for r, t in ((1, 1), (RB, 1), (1, TB), (RB, TB)))


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
            pf = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, I32, I32, I32]), "llvm.prefetch.p0")
            with cgutils.for_range(builder, n64) as loop:  # 4 independent accumulators hide FMA latency
                for u in range(4):
                    i = builder.add(builder.mul(loop.index, ir.Constant(I64, 64)), ir.Constant(I64, 16 * u))
                    if u % (2 if half else 1) == 0:  # one prefetch per 64-byte line, PREFETCH bytes ahead
                        ahead = builder.add(builder.add(w, builder.mul(i, esize)), ir.Constant(I64, PREFETCH))
                        builder.call(pf, [builder.inttoptr(ahead, cgutils.voidptr_t), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])
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


def _scalar_cast(ret, arg, convert, doc):
    """An intrinsic ret(arg) whose body is `convert(builder, value)` (bit-level casts numba lacks)."""

    @intrinsic
    def cast(typingctx, value):
        def codegen(context, builder, signature, args):
            return convert(builder, args[0])

        return ret(arg), codegen

    cast.__doc__ = doc
    return cast


half_to_float = _scalar_cast(types.float32, types.uint16, lambda b, v: b.fpext(b.bitcast(v, F16), F32),
                             "IEEE fp16 bits (uint16) -> float32 (numba has no float16 scalar type on CPU).")
float_to_half = _scalar_cast(types.uint16, types.float32, lambda b, v: b.bitcast(b.fptrunc(v, F16), I16),
                             "float32 -> IEEE fp16 bits (uint16), round to nearest even (the fp16 KV cache's store).")
float_from_bits = _scalar_cast(types.float32, types.int32, lambda b, v: b.bitcast(v, F32),
                               "int32 bits -> the float32 with those bits (for building 2**n in `fast_exp`).")


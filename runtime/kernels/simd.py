"""Hand-written LLVM IR for the hot loop: a tile of 4/8-bit weight rows times int8 activations,
written once for every kernel tier; each tier's hook (hook.py, hooks_*.py) supplies the dot step.

Numba's typing widens every integer product to int64, so a plain `acc += w[i] * x[i]` loop over
uint8/int8 compiles to scalar `imul` (about 3 GMAC/s per core here). These intrinsics state the
vector maths directly, the way llama.cpp's Q4_0 x Q8_0 kernel does. With W = the tier's width in
bytes (64 zmm, 32 ymm, 16 NEON/generic) and L = W/4 int32 lanes:

    per W weight bytes (2W 4-bit or W 8-bit weights; "chunk") of each row in the tile:
        w       = load <W x u8>                  (masked for the row's partial last chunk)
        parts   = (w & 15, w >> 4) or (w,)       (4-bit: even / odd columns), re-centred to
                                                 signed codes if the tier asks (hook.recentre)
        scale   = fp16 weight scales of the chunk's blocks, spread to lanes (hook.spread)
        per token of the tile:
            isum  = hook.dot(init, parts x activation chunks)   (L lanes of int32, 4 bytes each)
            acc  += float(isum) * scale * (activation scales already spread to lanes)
    one horizontal sum per (row, token) at the end
    (blocks wider than a chunk: isum carries on in int32 over the block's chunks and `acc` is
    updated once per block, `_chunk_loop`)

`init` carries (recentre offset - zero) * sum(x codes of the lane) (quant.quantize_act), so the
zero point of symmetric formats costs nothing. Decode runs 4 rows x 1 token tiles (the
activation loads and the per-row overheads are shared by 4 rows), the prompt 4 rows x 4 tokens.
Lanes per block = group_size/8 (4-bit) or group_size/4 (8-bit), a power of two passed as its
log2 (`shift`).

Each intrinsic takes the tier id and switches on it; only the tiers the compile target has
(tiers.available) get code, so compiling never meets an instruction the target lacks (LLVM
aborts the process on those) and an id without code writes NaN (tiers.resolve stops that first).
An id typed as a literal (a `Tier` passed from Python, tiers.py) gets the code of that one tier.
"""

from __future__ import annotations

from functools import partial

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import tiers
from .irutil import (
    F16,
    F32,
    I8,
    I32,
    I64,
    const_vec,
    float_to_half_bits,
    fmadd,
    lane_mask,
    masked_load,
    prefetch,
    ptr,
    reduce_fadd,
    splat,
    vec,
)
from .irutil import (
    half_to_float as _h2f,
)

_ptr = ptr


def _for_each_chunk(builder, nbytes, width, step):
    """Call step(chunk index, load) over nbytes in chunks of `width`: whole chunks, then the tail,
    where load(address) is a masked load (bytes past nbytes read as zero)."""
    vb = vec(I8, width)
    kw = ir.Constant(I64, width)
    nfull = builder.sdiv(nbytes, kw)
    tail = builder.srem(nbytes, kw)
    with cgutils.for_range(builder, nfull) as loop:
        step(loop.index, lambda addr: builder.load(ptr(builder, addr, vb), align=1))
    with builder.if_then(builder.icmp_signed(">", tail, ir.Constant(I64, 0)), likely=True):
        m = lane_mask(builder, tail, width)
        step(nfull, lambda addr: masked_load(builder, addr, vb, m))


def _spread_shuffles(builder, s, idx, k):
    """Portable `spread`: lane l gets s[l >> k], one constant shuffle per possible k, selected."""
    n = s.type.count
    out = s  # k = 0: identity
    kk = 1
    while (1 << kk) <= n:
        sh = builder.shuffle_vector(s, s, const_vec(I32, [l >> kk for l in range(n)]))
        out = builder.select(builder.icmp_signed("==", k, ir.Constant(I32, kk)), sh, out)
        kk += 1
    return out


def _tile(builder, tier, nrows, ntok, args, exact=False):
    """The microkernel body for one tier (see the module docstring and `_make_qdot`).

    exact: every (row, token) pair runs the operations of the decode tile (ntok = 1) in its
    order, whatever ntok is: per-chunk scaling (no int32 block sums across chunks) and the
    decode's prefetch, so that each token's dots equal a decode step's bit for bit (`qdot_few`)."""
    nbits, w, rb, xa, xb, init, xsl, sa, sl, ws, ss, shift, out, so = args
    W, L = tier.width, tier.lanes
    vb, vi, vf, vh = vec(I8, W), vec(I32, L), vec(F32, L), vec(F16, L)
    spread = tier.spread or _spread_shuffles
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(ntok)] for _ in range(nrows)]
    log2l = L.bit_length() - 1
    k = builder.trunc(
        builder.select(builder.icmp_signed("<", shift, ir.Constant(I64, log2l)), shift, ir.Constant(I64, log2l)), I32
    )
    idx = builder.lshr(const_vec(I32, range(L)), splat(builder, k, L))  # lane -> block within the chunk
    kw, kl = ir.Constant(I64, W), ir.Constant(I64, L)
    rows_w = [builder.add(w, builder.mul(rb, ir.Constant(I64, j))) for j in range(nrows)]
    rows_s = [builder.add(ws, builder.mul(ss, ir.Constant(I64, j))) for j in range(nrows)]
    toks_a = [builder.mul(sa, ir.Constant(I64, u)) for u in range(ntok)]
    toks_l = [builder.mul(sl, ir.Constant(I64, u)) for u in range(ntok)]

    # int32 sums of the chunks of blocks that span several chunks (`_chunk_loop`), per (row, token)
    isums = [[cgutils.alloca_once_value(builder, ir.Constant(vi, None)) for _ in range(ntok)] for _ in range(nrows)]

    def step(bits, c, load, rows, toks, zero_init=False, mode="full"):
        """Chunk c of the tile's rows. mode "full": the chunk holds whole blocks, its dots go to
        the float accumulators; "sum": a chunk of a block that goes on, its dots stay int32 in
        isums; "last": the block's last chunk, its dots plus isums go to the float accumulators
        (one scale product per block instead of one per chunk)."""
        off = builder.mul(c, kw)  # weight bytes, and bytes of the int32/float32 lane arrays
        fb = builder.lshr(builder.mul(c, kl), shift)  # first block of the chunk
        signed = bits in tier.recentre
        units = []
        for j in rows:
            if PREFETCH and (ntok == 1 or exact):  # decode streams weights from DRAM: ask PREFETCH bytes ahead
                for line in range(0, W, 64):
                    prefetch(builder, builder.add(builder.add(rows_w[j], off), ir.Constant(I64, PREFETCH + line)))
            wv = load(builder.add(rows_w[j], off))
            parts = (
                (builder.and_(wv, const_vec(I8, [15] * W)), builder.lshr(wv, const_vec(I8, [4] * W)))
                if bits == 4
                else (wv,)
            )
            if signed:
                parts = tuple(builder.sub(p, const_vec(I8, [1 << (bits - 1)] * W)) for p in parts)
            wsv = None
            if mode != "sum":
                wh = builder.load(
                    ptr(builder, builder.add(rows_s[j], builder.mul(fb, ir.Constant(I64, 2))), vh), align=2
                )
                wsv = spread(builder, _h2f(builder, wh, tiers.native_half()), idx, k)
            units.append((parts, wsv))
        pa, pb, pi, px = (builder.add(p, off) for p in (xa, xb, init, xsl))
        for u in toks:
            iv = None if zero_init else builder.load(ptr(builder, builder.add(pi, toks_l[u]), vi), align=4)
            xs = None if mode == "sum" else builder.load(ptr(builder, builder.add(px, toks_l[u]), vf), align=4)
            xv = [builder.load(ptr(builder, builder.add(pa, toks_a[u]), vb), align=1)]
            if bits == 4:
                xv.append(builder.load(ptr(builder, builder.add(pb, toks_a[u]), vb), align=1))
            for j, (parts, wsv) in zip(rows, units):
                if mode == "full":
                    start = ir.Constant(vi, None) if zero_init else iv
                else:
                    start = builder.load(isums[j][u])
                    start = start if zero_init else builder.add(start, iv)
                s = tier.dot(builder, start, list(zip(parts, xv)), signed)
                if mode == "sum":
                    builder.store(s, isums[j][u])
                    continue
                if mode == "last":
                    builder.store(ir.Constant(vi, None), isums[j][u])
                acc = accs[j][u]
                builder.store(fmadd(builder, builder.sitofp(s, vf), builder.fmul(wsv, xs), builder.load(acc)), acc)

    # passes of sub-tiles whose accumulators and row state fit the tier's registers (hook.py
    # `subtile`), each over every chunk: e.g. the 4x4 prompt tile as four 2x2 passes. Blocks over
    # several chunks (`_chunk_loop`) hold an int32 sum per pair too: their passes are at most
    # MULTI_PAIRS pairs.
    # Decode (one token) keeps per-chunk scaling: it streams weights from DRAM, and int32 block
    # sums there ran the 8-bit default export's decode 2-6% slower on AVX2.
    def emit(bits, many):
        for rows, toks in _passes(tier, nrows, ntok, many):
            _chunk_loop(builder, tier, bits, rb, init, shift, partial(step, bits, rows=rows, toks=toks), many)

    multi = builder.icmp_signed(">", shift, ir.Constant(I64, log2l))
    with builder.if_else(builder.icmp_signed("==", nbits, ir.Constant(I64, 4))) as (four, eight):
        for bits, block in ((4, four), (8, eight)):
            with block:
                if ntok == 1 or exact:
                    emit(bits, False)
                    continue
                with builder.if_else(multi) as (groups, chunks):
                    with groups:
                        emit(bits, True)
                    with chunks:
                        emit(bits, False)
    for j in range(nrows):
        for u in range(ntok):
            _store_f32(builder, out, so, u, j, reduce_fadd(builder, builder.load(accs[j][u])))


def _passes(tier, nrows, ntok, many):
    """(rows, tokens) ranges of the tile's passes: the tier's `subtile` for prompt tiles, halved
    (rows first) while it has more than MULTI_PAIRS pairs when blocks span several chunks."""
    gr, gt = tier.subtile if tier.subtile and ntok > 1 else (nrows, ntok)
    while many and gr * gt > MULTI_PAIRS:
        gr, gt = (gr // 2, gt) if gr > 1 else (gr, gt // 2)
    return [
        (range(r0, min(nrows, r0 + gr)), range(t0, min(ntok, t0 + gt)))
        for r0 in range(0, nrows, gr)
        for t0 in range(0, ntok, gt)
    ]


def _chunk_loop(builder, tier, bits, rb, init, shift, step, many):
    """The chunk loop of one (bits, pass): step(c, load[, zero_init=True], mode=...).

    `many` (blocks of more lanes than a chunk has, e.g. 8-bit g128: 4 AVX2 chunks; 4-bit g128:
    2): the chunks' dots stay int32 through each block and are converted, scaled and accumulated
    once per block ("sum" chunks, then one "last"), so the AVX2 8-bit step drops from 6 vector
    ops per row-token pair and chunk to 4. Such rows are whole chunks (a block is a whole number
    of them): no masked tail. Otherwise (blocks of one chunk or less) every chunk is "full" (its
    lanes' scales spread per lane).

    Tiers that list `bits` in `zero_init` get a second copy for init == 0 (quant.py passes a null
    address when every lane's start value is zero), which skips the init loads and the adds of
    hook.dot."""
    W, log2l = tier.width, tier.lanes.bit_length() - 1
    vb = vec(I8, W)

    def loops(**kw):
        if not many:
            _for_each_chunk(builder, rb, W, lambda c, load: step(c, load, **kw))
            return
        per = builder.shl(ir.Constant(I64, 1), builder.sub(shift, ir.Constant(I64, log2l)))  # chunks per block
        nblk = builder.lshr(rb, builder.add(shift, ir.Constant(I64, 2)))  # 4 << shift bytes per block

        def load(addr):
            return builder.load(ptr(builder, addr, vb), align=1)

        with cgutils.for_range(builder, nblk) as blk:
            c0 = builder.mul(blk.index, per)
            with cgutils.for_range(builder, builder.sub(per, ir.Constant(I64, 1))) as inner:
                step(builder.add(c0, inner.index), load, mode="sum", **kw)
            step(builder.add(c0, builder.sub(per, ir.Constant(I64, 1))), load, mode="last", **kw)

    if bits not in tier.zero_init:
        loops()
        return
    with builder.if_else(builder.icmp_signed("==", init, ir.Constant(I64, 0))) as (zero, loaded):
        with zero:
            loops(zero_init=True)
        with loaded:
            loops()


def _store_f32(builder, out, so, u, j, v):
    dst = builder.add(out, builder.add(builder.mul(so, ir.Constant(I64, u)), ir.Constant(I64, 4 * j)))
    builder.store(v, ptr(builder, dst, F32), align=4)


def _make_qdot(nrows: int, ntok: int):
    """Intrinsic (tier, bits, w, rb, xa, xb, init, xsl, sa, sl, ws, ss, shift, out, so): the microkernel.

    `nrows` consecutive weight rows (row j at w + j*rb, its fp16 block scales at ws + j*ss)
    against `ntok` tokens (token u's int8 codes at xa + u*sa, xb + u*sa, its lanes at init + u*sl,
    xsl + u*sl; the layout of quantize_act). Every weight chunk is loaded, unpacked and its
    scales spread to lanes once, then used for all ntok tokens; every activation chunk is loaded
    once for all nrows rows, so loads per (row, token) pair fall as the tile grows (4-bit 1x1:
    6 loads per chunk; 4x4: 1.5). The nrows*ntok accumulators stay in registers. Raw dots (no
    bias, no zero-point correction) are stored at out + u*so + j*4.

    Block of lane l in chunk c: (L*c + l) >> shift, so the scales spread with one permute whose
    index vector (l >> min(shift, log2 L)) is made once. `bits` (4 or 8) picks one of two chunk
    loops and `tier` (a tier id) one of the compiled tiers, once per call."""

    @intrinsic
    def qdot(typingctx, tier, bits, w, rb, xa, xb, init, xsl, sa, sl, ws, ss, shift, out, so):
        sig = types.none(*([types.int64] * 15))
        only = _literal_tier(tier)  # a literal id: that tier's code alone

        def codegen(context, builder, signature, args):
            tid, rest = args[0], args[1:]

            def missing():  # a tier this target has no code for: NaN, never garbage
                for j in range(nrows):
                    for u in range(ntok):
                        _store_f32(builder, rest[12], rest[13], u, j, ir.Constant(F32, float("nan")))

            _per_tier(builder, tid, lambda t: _tile(builder, t, nrows, ntok, rest), missing, only)
            return context.get_dummy_value()

        return sig, codegen

    return qdot


def _literal_tier(tier_type):
    """The tier id a kernel's `tier` argument was typed as a literal of (a `Tier` passed from
    Python, tiers.py), or None for a plain int."""
    return tier_type.literal_value if isinstance(tier_type, types.IntegerLiteral) else None


def _per_tier(builder, tid, emit, missing, only=None):
    """switch (tier id): emit(tier) for every tier the compile target has (`only`: that tier
    alone, when the id is a compile-time literal), missing() otherwise."""
    after = builder.append_basic_block("qdot.end")
    other = builder.append_basic_block("qdot.missing")
    sw = builder.switch(tid, other)
    for t in (t for t in tiers.TIERS if tiers.available(t.name) and only in (None, t.id)):
        bb = builder.append_basic_block(f"qdot.{t.name}")
        sw.add_case(ir.Constant(I64, t.id), bb)
        with builder.goto_block(bb):
            emit(t)
            builder.branch(after)
    with builder.goto_block(other):
        missing()
        builder.branch(after)
    builder.position_at_end(after)


@intrinsic
def qdot_rows(typingctx, tier, bits, w, rb, xa, xb, init, xsl, ws, ss, shift, out, ntiles):
    """Decode: `ntiles` consecutive RB x 1 tiles in one call (rows w + i*RB*rb.., their scales at
    ws + i*RB*ss, raw dots at out + (i*RB + j)*4; the other arguments as in `_make_qdot`). The
    decode matvec makes one call per VEC_TILES tiles (quant.py) where it made one per tile, and
    one prange iteration per call (the prompt's leftover tokens use it too). SmolLM2's 4-bit
    matvecs with their weights in L2 and 2 threads: gate_up 29.3 -> 20.7 us, down 13.9 -> 7.6
    us, qkv 8.7 -> 7.8 us; on 1 thread 5-12% faster."""
    sig = types.none(*([types.int64] * 13))
    only = _literal_tier(tier)  # a literal id: that tier's code alone

    def codegen(context, builder, signature, args):
        tid, nbits, w, rb, xa, xb, init, xsl, ws, ss, shift, out, ntiles = args
        zero, krb = ir.Constant(I64, 0), ir.Constant(I64, RB)

        def tiles(t):
            with cgutils.for_range(builder, ntiles) as loop:
                r = builder.mul(loop.index, krb)
                w_r, ws_r = builder.add(w, builder.mul(r, rb)), builder.add(ws, builder.mul(r, ss))
                out_r = builder.add(out, builder.mul(r, ir.Constant(I64, 4)))
                _tile(builder, t, RB, 1, (nbits, w_r, rb, xa, xb, init, xsl, zero, zero, ws_r, ss, shift, out_r, zero))

        def missing():
            with cgutils.for_range(builder, builder.mul(ntiles, krb)) as loop:
                dst = builder.add(out, builder.mul(loop.index, ir.Constant(I64, 4)))
                builder.store(ir.Constant(F32, float("nan")), ptr(builder, dst, F32), align=4)

        _per_tier(builder, tid, tiles, missing, only)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def qdot_few(typingctx, tier, bits, w, rb, xa, xb, init, xsl, sa, sl, ws, ss, shift, out, so, ntiles, ntok):
    """A few tokens (a speculative verify pass): `ntiles` consecutive RB-row tiles against `ntok`
    tokens (token u's activations at xa + u*sa, ..., init + u*sl, xsl + u*sl; raw dots at
    out + u*so + (i*RB + j)*4), each (row, token) dot bit for bit what `qdot_rows` gives that
    token alone: the tiles are `_tile(..., exact=True)`.

    Per RB-row tile, the tokens go in groups of TB (RB x TB, then a last RB x 1..TB: four tile
    copies selected at run time): each weight chunk is loaded, unpacked and its scales spread
    once per group instead of once per token, each activation chunk loaded once for RB rows, and
    the tile's rows (RB x row_bytes: 11 KB for a 4-bit 5632-column row) stay in L1 between
    groups. The per-token alternative (decode's tile t times over 32-row blocks) re-read those
    blocks from L2 and repeated the unpacking for every token."""
    sig = types.none(*([types.int64] * 17))
    only = _literal_tier(tier)  # a literal id: that tier's code alone

    def codegen(context, builder, signature, args):
        tid, rest = args[0], args[1:]
        out, so, ntiles, ntok = rest[12:]
        krb = ir.Constant(I64, RB)

        def missing():
            with cgutils.for_range(builder, ntok) as tok:
                row = builder.add(out, builder.mul(tok.index, so))
                with cgutils.for_range(builder, builder.mul(ntiles, krb)) as loop:
                    dst = builder.add(row, builder.mul(loop.index, ir.Constant(I64, 4)))
                    builder.store(ir.Constant(F32, float("nan")), ptr(builder, dst, F32), align=4)

        _per_tier(builder, tid, lambda t: _few_tiles(builder, t, rest), missing, only)
        return context.get_dummy_value()

    return sig, codegen


def _few_tiles(builder, tier, args):
    """`qdot_few`'s body for one tier: args = (bits, w, rb, xa, xb, init, xsl, sa, sl, ws, ss,
    shift, out, so, ntiles, ntok), IR values."""
    nbits, w, rb, xa, xb, init, xsl, sa, sl, ws, ss, shift, out, so, ntiles, ntok = args
    zero, krb, ktb = ir.Constant(I64, 0), ir.Constant(I64, RB), ir.Constant(I64, TB)
    ngroups = builder.sdiv(builder.add(ntok, ir.Constant(I64, TB - 1)), ktb)
    null_init = builder.icmp_signed("==", init, zero)  # stays null (zero start values) for every group
    with cgutils.for_range(builder, ntiles) as loop:
        r = builder.mul(loop.index, krb)
        w_r, ws_r = builder.add(w, builder.mul(r, rb)), builder.add(ws, builder.mul(r, ss))
        out_r = builder.add(out, builder.mul(r, ir.Constant(I64, 4)))
        with cgutils.for_range(builder, ngroups) as grp:  # tokens in groups of TB, the tile's rows in L1
            u0 = builder.mul(grp.index, ktb)
            left = builder.sub(ntok, u0)
            ua, ul = builder.mul(u0, sa), builder.mul(u0, sl)
            init_g = builder.select(null_init, zero, builder.add(init, ul))
            out_g = builder.add(out_r, builder.mul(u0, so))
            g = (nbits, w_r, rb, builder.add(xa, ua), builder.add(xb, ua), init_g, builder.add(xsl, ul))
            g += (sa, sl, ws_r, ss, shift, out_g, so)
            after = builder.append_basic_block("few.end")
            sw = builder.switch(builder.select(builder.icmp_signed(">", left, ktb), ktb, left), after)
            for n in range(1, TB + 1):  # the group's size: one tile copy each
                bb = builder.append_basic_block(f"few.{n}")
                sw.add_case(ir.Constant(I64, n), bb)
                with builder.goto_block(bb):
                    _tile(builder, tier, RB, n, g, exact=True)
                    builder.branch(after)
            builder.position_at_end(after)


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
# Row-token pairs of a pass whose blocks span several chunks: each pair holds an int32 block sum
# beside its float accumulator, and the AVX-512 4x4 prompt tile with them (32 accumulators in
# 32 zmm) spilled.
MULTI_PAIRS = 8
RB, TB = 4, 4  # rows x tokens of the big tile (decode: RB x 1; prompt: RB x TB)
# decode's RB x 1 tiles come from qdot_rows; 1 x 1 is its leftover rows
qdot_1x1, qdot_1xt, qdot_rxt = (_make_qdot(r, t) for r, t in ((1, 1), (1, TB), (RB, TB)))


def _make_rowdot_float(half: bool):
    """Intrinsic (w, x, n) -> float32: dot of n float32/float16 weights at `w` with float32 `x`,
    in vectors of the best tier's width (tiers.best(): 16 floats on AVX-512, 8 on AVX2/AVX-VNNI,
    4 on NEON/generic), four accumulators, a masked tail."""

    @intrinsic
    def rowdot_float(typingctx, w, x, n):
        sig = types.float32(types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            w, x, n = args
            L = tiers.best().lanes
            vty, vf = vec(F16 if half else F32, L), vec(F32, L)
            esize = ir.Constant(I64, 2 if half else 4)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(4)]
            kl = ir.Constant(I64, L)
            step = 4 * L  # elements per iteration

            def widen(v):
                return _h2f(builder, v, tiers.native_half()) if half else v

            def fma_into(acc, wv, xv):
                builder.store(fmadd(builder, widen(wv), xv, builder.load(acc)), acc)

            nit = builder.sdiv(n, ir.Constant(I64, step))
            with cgutils.for_range(builder, nit) as loop:  # 4 independent accumulators hide FMA latency
                base = builder.mul(loop.index, ir.Constant(I64, step))
                for line in range(
                    0, max(64, step * (2 if half else 4)), 64
                ):  # one prefetch per 64-byte line, PREFETCH ahead
                    prefetch(
                        builder,
                        builder.add(builder.add(w, builder.mul(base, esize)), ir.Constant(I64, PREFETCH + line)),
                    )
                for u in range(4):
                    i = builder.add(base, ir.Constant(I64, L * u))
                    wv = builder.load(ptr(builder, builder.add(w, builder.mul(i, esize)), vty), align=2 if half else 4)
                    xv = builder.load(ptr(builder, builder.add(x, builder.mul(i, ir.Constant(I64, 4))), vf), align=4)
                    fma_into(accs[u], wv, xv)
            done = builder.mul(nit, ir.Constant(I64, step))
            rest = builder.sdiv(builder.add(builder.sub(n, done), ir.Constant(I64, L - 1)), kl)
            with cgutils.for_range(builder, rest) as loop:
                i = builder.add(done, builder.mul(loop.index, kl))
                m = lane_mask(builder, builder.sub(n, i), L)
                wv = masked_load(builder, builder.add(w, builder.mul(i, esize)), vty, m)
                xv = masked_load(builder, builder.add(x, builder.mul(i, ir.Constant(I64, 4))), vf, m)
                fma_into(accs[0], wv, xv)
            tot = builder.fadd(
                builder.fadd(builder.load(accs[0]), builder.load(accs[1])),
                builder.fadd(builder.load(accs[2]), builder.load(accs[3])),
            )
            return reduce_fadd(builder, tot)

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


half_to_float = _scalar_cast(
    types.float32,
    types.uint16,
    lambda b, v: _h2f(b, b.bitcast(v, F16), tiers.native_half()),
    "IEEE fp16 bits (uint16) -> float32 (numba has no float16 scalar type on CPU).",
)
float_to_half = _scalar_cast(
    types.uint16,
    types.float32,
    lambda b, v: float_to_half_bits(b, v, tiers.native_half()),
    "float32 -> IEEE fp16 bits (uint16), round to nearest even (the fp16 KV cache's store).",
)
float_from_bits = _scalar_cast(
    types.float32,
    types.int32,
    lambda b, v: b.bitcast(v, F32),
    "int32 bits -> the float32 with those bits (for building 2**n in `fast_exp`).",
)

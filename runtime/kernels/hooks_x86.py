"""x86-64 tier hooks (see hook.py for the contract): AVX-512 VNNI, AVX-VNNI, AVX2.

Per 64 weight bytes of 4-bit weights (128 weights, two parts) one tile step costs:
    avx512-vnni  2 x vpdpbusd zmm                       (1 register of weights)
    avx-vnni     4 x vpdpbusd ymm                       (2 registers)
    avx2         4 x vpmaddubsw + 2 x vpaddw + 2 x vpmaddwd + 2 x vpaddd ymm
8-bit on AVX2 re-centres codes to signed and uses the sign trick (vpabsb w, vpsignb x by w:
|w| * sign(w) x = w x, |w| <= 128 and |x| <= 127 keep every int16 pair sum <= 32512).
"""

from __future__ import annotations

from llvmlite import ir

from .hook import T_AVX2, T_AVX512_VNNI, T_AVX_VNNI, Tier
from .irutil import F32, I8, I16, I32, const_vec, declare, vec


def _probe_dot(n: int) -> str:
    """Plain IR of a u8 x s8 dot of n bytes, which LLVM turns into vpdpbusd where it may."""
    return f"""
define i32 @probe(ptr %a, ptr %b) {{
  %x = load <{n} x i8>, ptr %a
  %y = load <{n} x i8>, ptr %b
  %xz = zext <{n} x i8> %x to <{n} x i32>
  %ys = sext <{n} x i8> %y to <{n} x i32>
  %m = mul <{n} x i32> %xz, %ys
  %r = call i32 @llvm.vector.reduce.add.v{n}i32(<{n} x i32> %m)
  ret i32 %r
}}
declare i32 @llvm.vector.reduce.add.v{n}i32(<{n} x i32>)
"""


_PROBE_YMM_INT = """
define void @probe(ptr %a, ptr %b) {
  %x = load <32 x i8>, ptr %a
  %y = load <32 x i8>, ptr %b
  %s = add <32 x i8> %x, %y
  store <32 x i8> %s, ptr %a
  ret void
}
"""


def _vnni_dot(width: int):
    lanes = width // 4
    name = f"llvm.x86.avx512.vpdpbusd.{width * 8}"  # AVX-VNNI's VEX form selects from the same intrinsic at 256 bits

    def dot(builder, acc, parts, signed):
        fn = declare(builder, name, vec(I32, lanes), [vec(I32, lanes), vec(I8, width), vec(I8, width)])
        for w, x in parts:
            acc = builder.call(fn, [acc, w, x])
        return acc

    return dot


def _perm512(builder, s, idx, k):
    fn = declare(builder, "llvm.x86.avx512.permvar.sf.512", vec(F32, 16), [vec(F32, 16), vec(I32, 16)])
    return builder.call(fn, [s, idx])


def _perm256(builder, s, idx, k):
    fn = declare(builder, "llvm.x86.avx2.permps", vec(F32, 8), [vec(F32, 8), vec(I32, 8)])
    return builder.call(fn, [s, idx])


def _avx2_dot(builder, acc, parts):
    """vpmaddubsw (u8 x s8 -> int16 pair sums) per part, the parts' int16 sums added (4-bit:
    |2 x 15 x 127| x 2 parts = 7620 fits), then vpmaddwd against ones -> int32 lanes."""
    v32b, v16w, v8d = vec(I8, 32), vec(I16, 16), vec(I32, 8)
    maddubs = declare(builder, "llvm.x86.avx2.pmadd.ub.sw", v16w, [v32b, v32b])
    maddwd = declare(builder, "llvm.x86.avx2.pmadd.wd", v8d, [v16w, v16w])
    total = None
    for w, x in parts:
        p = builder.call(maddubs, [w, x])
        total = p if total is None else builder.add(total, p)
    return builder.add(acc, builder.call(maddwd, [total, const_vec(I16, [1] * 16)]))


def _avx2_dot_signed(builder, acc, parts):
    """Signed codes (8-bit re-centred): vpmaddubsw(|w|, sign(x, w)) = w x pairwise, <= 32512."""
    v32b = vec(I8, 32)
    absb = declare(builder, "llvm.abs.v32i8", v32b, [v32b, ir.IntType(1)])
    signb = declare(builder, "llvm.x86.avx2.psign.b", v32b, [v32b, v32b])
    fixed = [(builder.call(absb, [w, ir.Constant(ir.IntType(1), 0)]), builder.call(signb, [x, w])) for w, x in parts]
    return _avx2_dot(builder, acc, fixed)


def _avx2(builder, acc, parts, signed):
    return (_avx2_dot_signed if signed else _avx2_dot)(builder, acc, parts)


AVX512_VNNI = Tier(
    "avx512-vnni",
    T_AVX512_VNNI,
    "x86_64",
    64,
    _vnni_dot(64),
    (_probe_dot(64), r"vpdpbusd[^\n]*%zmm"),
    "avx-vnni",
    spread=_perm512,
    cpus="AMD Zen 4/5, Intel Xeon since Cascade Lake",
)
AVX_VNNI = Tier(
    "avx-vnni",
    T_AVX_VNNI,
    "x86_64",
    32,
    _vnni_dot(32),
    (_probe_dot(32), r"vpdpbusd[^\n]*%ymm"),
    "avx2",
    spread=_perm256,
    subtile=(2, 2),  # 16 ymm registers (hook.py)
    cpus="Intel Alder Lake and later, AMD Zen 5",
)
AVX2 = Tier(
    "avx2",
    T_AVX2,
    "x86_64",
    32,
    _avx2,
    (_PROBE_YMM_INT, r"vpaddb[^\n]*%ymm"),
    "generic",
    recentre=(8,),
    spread=_perm256,
    subtile=(2, 2),  # 16 ymm registers (hook.py)
    zero_init=(4, 8),  # 8-bit symmetric (re-centred by 128) and 4-bit asymmetric
    cpus="every x86-64 laptop since Haswell",
)

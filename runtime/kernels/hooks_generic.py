"""The generic tier (any CPU numba runs on): the dot step as portable LLVM vector IR, 16 bytes
(4 int32 lanes) per chunk, legal on SSE2, NEON, and any 128-bit SIMD unit. See hook.py.

Products are formed in int32 (exact for every code/activation pair, no saturation to mind), and
each lane's four bytes are summed with shuffles; LLVM maps this onto what the target has
(pmaddwd-style pair sums on x86, smull/saddlp-style on aarch64)."""

from __future__ import annotations

from .hook import T_GENERIC, Tier
from .irutil import I32, const_vec, vec

WIDTH = 16


def _dot(builder, acc, parts, signed):
    wide = vec(I32, WIDTH)
    total = None
    for w, x in parts:
        wi = builder.sext(w, wide) if signed else builder.zext(w, wide)
        p = builder.mul(wi, builder.sext(x, wide))
        total = p if total is None else builder.add(total, p)
    lanes = WIDTH // 4
    quads = [builder.shuffle_vector(total, total, const_vec(I32, [4 * l + b for l in range(lanes)])) for b in range(4)]
    return builder.add(acc, builder.add(builder.add(quads[0], quads[1]), builder.add(quads[2], quads[3])))


GENERIC = Tier("generic", T_GENERIC, "any", WIDTH, _dot, None, None, cpus="any other CPU")

"""The aarch64 assembly of the NEON tiers' tile loops, read on any host (no emulation needed).

llvmlite carries LLVM's AArch64 back end, so the very IR the runtime compiles on a Pi
(simd._tile with a hooks_neon tier) is built here, optimised with the O3 pipeline numba uses,
and emitted for a named ARM core. What is counted: the instructions of the loop over whole
16-byte weight chunks (the hot loop; the masked row tail runs once per row), normalised to 64
weight bytes, so tiles and peers compare per byte of weights streamed.

    python -m edgellm.benchmarks.scripts.neon_asm            # table: tier x tile x bits, per 64 bytes
    python -m edgellm.benchmarks.scripts.neon_asm --dump neon-dotprod 4 1 4   # one loop's instructions
"""

from __future__ import annotations

import re
import sys
from collections import Counter

import llvmlite.binding as llb
from llvmlite import ir

TRIPLE = "aarch64-unknown-linux-gnu"
CPU_OF = {"neon-dotprod": "cortex-a76", "neon": "cortex-a72"}  # Raspberry Pi 5, Raspberry Pi 4
TILES = ((1, 1), (4, 1), (4, 4))  # (rows, tokens): simd.py's 1x1, RBx1 (decode), RBxTB (prompt)


def _target_machine(cpu: str, features: str = ""):
    llb.initialize_all_targets()
    llb.initialize_all_asmprinters()
    return llb.Target.from_triple(TRIPLE).create_target_machine(cpu=cpu, features=features, opt=3)


def tile_module(tier_name: str, nrows: int, ntok: int, bits: int, exact: bool = False) -> str:
    """LLVM IR text of one function running simd._tile for `tier_name` with `bits` fixed
    (`exact`: the verify pass's tile, each token summed as decode sums it)."""
    from edgellm.runtime.kernels import simd

    i64 = ir.IntType(64)
    return _module(
        tier_name, 13, lambda b, t, args: simd._tile(b, t, nrows, ntok, [ir.Constant(i64, bits), *args], exact=exact)
    )


def few_module(tier_name: str) -> str:
    """LLVM IR text of simd.qdot_few's whole body for `tier_name` (both bit widths, every group
    size, the token-group and row-tile loops)."""
    from edgellm.runtime.kernels import simd

    return _module(tier_name, 16, lambda b, t, args: simd._few_tiles(b, t, list(args)))


def _module(tier_name: str, nargs: int, body) -> str:
    from edgellm.runtime.kernels import tiers

    tier = tiers.BY_NAME[tier_name]
    mod = ir.Module(name=f"tile_{tier_name}")
    i64 = ir.IntType(64)
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64] * nargs), name="tile")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    host_half = tiers.native_half
    tiers.native_half = lambda: (
        True
    )  # every AArch64 core converts fp16 in hardware (fcvtl); the probe would ask this host
    try:
        body(builder, tier, fn.args)
    finally:
        tiers.native_half = host_half
    builder.ret_void()
    return str(mod)


def assembly(ir_text: str, cpu: str, features: str = "") -> str:
    """ir_text optimised (O3) and emitted as aarch64 assembly for `cpu`."""
    tm = _target_machine(cpu, features)
    mod = llb.parse_assembly(ir_text)
    mod.triple = TRIPLE
    mod.data_layout = str(tm.target_data)
    mod.verify()
    from numba.core.llvm_bindings import create_pass_builder  # numba's own pipeline set-up

    pb = create_pass_builder(tm, opt=3, loop_vectorize=True, slp_vectorize=True)
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_assembly(mod)


def loops(asm: str) -> list[list[str]]:
    """The single-block loops of `asm`: a label, straight-line instructions, and a conditional
    branch back to that label (the tile's whole-chunk loops are one block: everything in them
    is unrolled). Directives and comments are dropped."""
    out, label, body = [], None, []
    for line in asm.splitlines():
        s = line.split("//")[0].strip()
        if not s or (s.startswith(".") and not s.endswith(":")):
            continue
        if s.endswith(":"):
            label, body = s[:-1], []
            continue
        body.append(s)
        m = re.match(r"(b\.\w+|cbn?z|tbn?z)\s+.*?([.\w]+)$", s)
        if m and label is not None and m.group(2) == label:
            out.append(list(body))
        if m or s.split()[0] in ("b", "ret", "br"):  # the block ends; what follows needs a new label
            label = None
    return out


def chunk_loop(asm: str, sums: bool = False) -> list[str]:
    """The whole-chunk loop: the largest single-block loop holding integer dot instructions and
    float multiply-adds (blocks of one chunk or less: each chunk's dots are scaled and added);
    `sums`: the loop without them (the int32-only chunks of blocks that span several chunks,
    simd._chunk_loop)."""
    cand = [
        l
        for l in loops(asm)
        if any(re.match(r"(sdot|smull|smlal|saddlp|sadalp)\b", i) for i in l)
        and any(i.startswith("fmla") for i in l) != sums
    ]
    if not cand:
        raise ValueError("no dot-product loop found in the assembly")
    return max(cand, key=len)


def mnemonics(loop: list[str]) -> Counter:
    return Counter(i.split()[0] for i in loop)


def per_64_bytes(tier_name: str, nrows: int, ntok: int, bits: int, cpu: str | None = None) -> tuple[float, list[str]]:
    """(instructions per 64 weight bytes, the loop) of the tile's whole-chunk loop: one loop
    iteration streams nrows x 16 weight bytes (and serves ntok tokens)."""
    asm = assembly(tile_module(tier_name, nrows, ntok, bits), cpu or CPU_OF[tier_name])
    loop = chunk_loop(asm)
    return len(loop) * 64 / (16 * nrows), loop


def table() -> list[dict]:
    rows = []
    for tier in CPU_OF:
        for nrows, ntok in TILES:
            for bits in (4, 8):
                n, loop = per_64_bytes(tier, nrows, ntok, bits)
                m = mnemonics(loop)
                rows.append(
                    {
                        "tier": tier,
                        "cpu": CPU_OF[tier],
                        "tile": f"{nrows}x{ntok}",
                        "bits": bits,
                        "loop": len(loop),
                        "per64": n,
                        "per64_per_token": n / ntok,
                        "dot": sum(
                            v for k, v in m.items() if re.match(r"(sdot|smull|smull2|smlal|smlal2|saddlp|addp)$", k)
                        ),
                    }
                )
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] == ["--dump"] and len(argv) == 5:
        tier, nrows, ntok, bits = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        n, loop = per_64_bytes(tier, nrows, ntok, bits)
        print("\n".join(loop))
        print(f"# {len(loop)} instructions per {16 * nrows} weight bytes = {n:.1f} per 64; {dict(mnemonics(loop))}")
        return 0
    print(
        "| tier | target | tile (rows x tokens) | bits | loop instructions | per 64 weight bytes | per 64 bytes per "
        "token | of which dot |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in table():
        print(
            f"| {r['tier']} | {r['cpu']} | {r['tile']} | {r['bits']} | {r['loop']} | {r['per64']:.0f} | "
            f"{r['per64_per_token']:.1f} | {r['dot']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The 4-bit kernels compiled for sm_90 without a GPU: registers, spills, shared memory and the
instructions of the main loop by class, per launch setting.

    python benchmarks/sass_int4.py w4a8                       # W4A8 GEMM, the table's M > 128 tile
    python benchmarks/sass_int4.py w4a8 --tile 64,64,4 --sass loop.sass
    python benchmarks/sass_int4.py w4a8-swap --tile 128,128,8  # the swapped-operand W4A8 kernel
    python benchmarks/sass_int4.py gemv                       # W4A16 GEMV, the default setting
    python benchmarks/sass_int4.py gemv --tile 8,128,2,4      # BLOCK_N,SUB_C,STEPS,warps
    python benchmarks/sass_int4.py gemv --tile 4,128,2,4,1,1  # ... DEQ, TILED (tile_words' layout)
    python benchmarks/sass_int4.py gemv --tile 8,128,1,4,3,0,4  # ... WORDS (DEQ 3's words a thread)
    python benchmarks/sass_int4.py moe_gate_up --tile 8,128,1,4,3,2   # BLOCK_N,SUB_C,STEPS,warps,DEQ,WORDS
    python benchmarks/sass_int4.py moe_down --tile 2,128,1,4,1,1,1     # ... SLOTS (all 8 slots in one tile)

Triton compiles for `GPUTarget("cuda", 90, 32)` with what a launch at the 8B's shapes gets
(symmetric weights in groups of 128; unit strides constant, other ints and every pointer
divisible by 16); ptxas -v gives registers and spills, nvdisasm the SASS
(benchmarks/sass_mla_decode_fp8.py's helpers).

- w4a8 (w4a8_gemm._w4a8_gemm_kernel): per loop trip one int8 warp-group MMA chain (IGMMA) of
  BLOCK_M x BLOCK_N x 128 and the rescale of its int32 result by the group's scale, beside the
  PTX unpack of the weight tile.
- w4a8-swap (w4a8_gemm._w4a8_nt_kernel, symmetric weights): the same product as y^T, the
  weights unpacked (parity order, one LOP3 a register) as the MMA's register operand, the int32
  result converted by offset (IADD3 + FADD) instead of I2FP.
- gemv (int4_gemm._int4_gemv_kernel): per loop trip STEPS slices of SUB_C packed words of
  BLOCK_N rows, i.e. 8 x SUB_C x STEPS x BLOCK_N nibbles over 32 x warps threads; the script
  prints the loop's instructions a nibble a thread, which against the H100's issue rate bounds
  the kernel (docs/PERFORMANCE.md, "4-bit weights").
- moe_gate_up / moe_down (moe_int4._gate_up_kernel / _down_kernel, the small-batch MoE at R1's
  top-8): the same loop on 2 BLOCK_N rows (gate and up) of one assignment, or BLOCK_N rows of
  one slot (the down kernel's slots one after another: the first slot's loop, the first
  innermost loop of the SASS); with SLOTS the down kernel's all-slots loop, 8 slots' words a
  slice (`_all_slots_dot`; DEQ 3: `_all_slots_half2`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import re  # noqa: E402

from sass_mla_decode_fp8 import counts, disassemble, report, resources  # noqa: E402

CLASSES = ("IGMMA", "I2FP", "FADD", "FFMA", "FMUL", "HFMA2", "HMUL2", "HADD2", "F2F", "F2FP", "IADD3", "LOP3", "PRMT", "SHF", "IMAD", "LEA", "STS", "LDS",
           "LDGSTS", "LDG", "BAR", "MOV", "SHFL", "WARPGROUP", "STL", "LDL")


def _compile(fn, consts: dict, ptrs: dict, warps: int, stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = fn.arg_names
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = ptrs.get(name, "i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def compile_w4a8(block_m: int, block_n: int, warps: int, stages: int = 3, overlap: int = 0, swap_ab: bool = False):
    from deepserve.ops.triton import w4a8_gemm as w
    consts = dict(GROUP=128, HAS_BIAS=False, ASM=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128)
    ptrs = dict(a_ptr="*i8", as_ptr="*fp32", qw_ptr="*i32", s_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16")
    if swap_ab:
        return _compile(w._w4a8_nt_kernel, dict(consts, OVERLAP=overlap, ONE_GROUP=False), ptrs, warps, stages)
    return _compile(w._w4a8_gemm_kernel, dict(consts, HAS_ZP=False), dict(ptrs, z_ptr="*bf16"), warps, stages)


def compile_gemv(block_n: int, sub_c: int, steps: int, warps: int, deq: int = 1, tiled: int = 0, words: int = 1):
    from deepserve.ops.triton import int4_gemm as g
    consts = dict(GROUP=128, HAS_ZP=False, HAS_GIDX=False, HAS_BIAS=False, EVEN=True, BLOCK_N=block_n,
                  SUB_C=sub_c, STEPS=steps, DEQ=deq, USE_PDL=True, PREFETCH=False, LINE=32, LINES=64, TILED=tiled,
                  AHEAD=0, ASM=1, WORDS=words, MERGE=0)
    ptrs = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", g_ptr="*i32", b_ptr="*bf16",
                y_ptr="*bf16", o_ptr="*bf16", count_ptr="*i32")
    return _compile(g._int4_gemv_kernel, consts, ptrs, warps, 1)


def compile_moe(kernel: str, block_n: int, sub_c: int, steps: int, warps: int, deq: int = 1, words: int = 1,
                slots: int = 0):
    from deepserve.ops.triton import moe_int4 as m
    consts = dict(GROUP=128, HAS_ZP=False, HAS_GIDX=False, EVEN=True, BLOCK_N=block_n, SUB_C=sub_c, STEPS=steps,
                  DEQ=deq, USE_PDL=True, ASM=1, WORDS=words)
    ptrs = dict(x_ptr="*bf16", h_ptr="*bf16", ids_ptr="*i32", wts_ptr="*fp32", qw_ptr="*i32", s_ptr="*bf16",
                z_ptr="*bf16", g_ptr="*i32", y_ptr="*bf16")
    if kernel == "moe_gate_up":
        return _compile(m._gate_up_kernel, consts, ptrs, warps, 1)
    return _compile(m._down_kernel, dict(consts, TOP_K=8, SLOTS=8 if slots else 0), ptrs, warps, 1)


def inner_loop(sass: str) -> list[str]:
    """The instructions of the first innermost loop (a label to the last branch back to it, with
    no such loop inside): the down kernel's slots one after another are a loop a slot, each
    inside the code that tests its expert."""
    lines = sass.splitlines()
    loops = []
    for i, line in enumerate(lines):
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            back = [j for j in range(i + 1, len(lines))
                    if re.search(rf"BRA `?\(?{re.escape(label.group(1))}\)?", lines[j])]
            if back:
                loops.append((i, back[-1]))
    inner = [(i, b) for i, b in loops if not any(i < i2 and b2 <= b for i2, b2 in loops)]
    if not inner:
        return []
    i, b = inner[0]
    return [ln for ln in lines[i:b + 1] if re.match(r"^\s+/\*[0-9a-f]+\*/", ln)]


def report_moe(kernel, label: str, nibbles: float, sass_path: str = "") -> None:
    """Print a compiled MoE kernel's registers, spills, and its first innermost loop by class and
    per nibble (`nibbles` a thread a trip); write its SASS to `sass_path` if given."""
    sass = disassemble(kernel.asm["cubin"])
    if sass_path:
        Path(sass_path).write_text(sass)
    loop = inner_loop(sass)
    by_class = ", ".join(f"{c} {n}" for c, n in counts(loop).items() if c in CLASSES)
    regs, spill = resources(kernel.asm["ptx"])
    print(f"{label}: {regs} registers, {spill} B spilled, {kernel.metadata.shared} B shared\n  loop {len(loop)} "
          f"instructions for {nibbles:.0f} nibbles a thread, {len(loop) / nibbles:.2f} a nibble: {by_class}", flush=True)


def nibbles_a_thread(kernel: str, block_n: int, sub_c: int, steps: int, warps: int, words: int = 1,
                     slots: int = 0) -> float:
    """The nibbles one loop trip unpacks, per thread: a slice is words x SUB_C words of the loop's
    rows (gate_up: 2 BLOCK_N; the all-slots down loop: BLOCK_N rows of 8 slots)."""
    rows = 2 * block_n if kernel == "moe_gate_up" else 8 * block_n if slots else block_n
    return 8 * sub_c * steps * words * rows / (32 * warps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernel", choices=["w4a8", "w4a8-swap", "gemv", "moe_gate_up", "moe_down"])
    ap.add_argument("--tile", action="append", default=[],
                    help="w4a8: BLOCK_M,BLOCK_N,warps[,stages]; w4a8-swap: the same [,OVERLAP]; "
                         "gemv: BLOCK_N,SUB_C,STEPS,warps[,DEQ[,TILED[,WORDS]]]; "
                         "moe_gate_up / moe_down: BLOCK_N,SUB_C,STEPS,warps[,DEQ[,WORDS[,SLOTS]]] (repeatable)")
    ap.add_argument("--sass", default="", help="write the last build's SASS here")
    args = ap.parse_args()
    tiles = [tuple(int(x) for x in t.split(",")) for t in args.tile]
    if args.kernel.startswith("w4a8"):
        for tile in tiles or [(64, 256, 8)]:
            report(compile_w4a8(*tile, swap_ab=args.kernel == "w4a8-swap"), "BLOCK_M {} BLOCK_N {} warps {}".format(*tile[:3])
                   + (f" stages {tile[3]}" if len(tile) > 3 else ""), CLASSES, args.sass)
        return 0
    if args.kernel.startswith("moe"):
        for tile in tiles or [(8, 128, 1, 4)]:
            block_n, sub_c, steps, warps = tile[:4]
            deq, words, slots = (tuple(tile[4:]) + (1, 1, 0)[len(tile) - 4:])[:3]
            report_moe(compile_moe(args.kernel, block_n, sub_c, steps, warps, deq, words, slots),
                       f"{args.kernel} BLOCK_N {block_n} SUB_C {sub_c} STEPS {steps} warps {warps} DEQ {deq} "
                       f"WORDS {words} SLOTS {slots}",
                       nibbles_a_thread(args.kernel, block_n, sub_c, steps, warps, words, slots), args.sass)
        return 0
    for tile in tiles or [(8, 128, 2, 4)]:
        block_n, sub_c, steps, warps = tile[:4]
        deq = tile[4] if len(tile) > 4 else 1
        tiled = tile[5] if len(tile) > 5 else 0
        words = tile[6] if len(tile) > 6 else 1
        loop = report(compile_gemv(block_n, sub_c, steps, warps, deq, tiled, words),
                      f"BLOCK_N {block_n} SUB_C {sub_c} STEPS {steps} warps {warps} DEQ {deq} TILED {tiled} WORDS {words}",
                      CLASSES, args.sass)
        nibbles = 8 * sub_c * steps * block_n * words / (32 * warps)
        print(f"  {len(loop)} instructions a loop trip for {nibbles:.0f} nibbles a thread: "
              f"{len(loop) / nibbles:.2f} a nibble ({sum(counts(loop).values()) - len(loop)} sub-counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CUDA-core one-row fp8 GEMV (quant_gemm._fp8_gemv_kernel) compiled for sm_90 without a GPU:
registers, spills, shared memory and its K loop's instructions by class, a weight byte, per
launch setting.

    python benchmarks/sass_fp8_gemv.py                          # the tables' tiles and H2's, row quantized first
    python benchmarks/sass_fp8_gemv.py --tile 4,4,4,1,1 --quant-in 1 --sass loop.sass
                                                                # BLOCK_N,GROUPS,warps,STAGES,H2

Triton compiles for `GPUTarget("cuda", 90, 32)` with what a launch at R1's shapes gets (K, the
row stride and every pointer divisible by 16; bf16 output, no bias, PDL on, no L2 prefetch);
benchmarks/sass_mla_decode_fp8.py's helpers give registers (ptxas -v) and the SASS (nvdisasm).
A loop trip reads BLOCK_N x GROUPS x 128 weight bytes over 32 x warps threads; against an SM's
issue rate at the copy bandwidth (about 11 thread-instructions a byte on the H100, 7.8 on the
H200: docs/PERFORMANCE.md, "R1 in FP8") the instructions a weight byte bound the kernel. The
instructions do not depend on N and K beyond their divisibility: R1's shapes share them. Count
at STAGES 1: a pipelined build's first loop need not be its K loop.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from sass_int4 import _compile  # noqa: E402
from sass_mla_decode_fp8 import counts, report  # noqa: E402

CLASSES = ("LDG", "F2FP", "F2F", "HFMA2", "HMUL2", "HADD2", "FFMA", "FMUL", "FADD", "FMNMX", "MUFU", "PRMT",
           "I2F", "I2FP", "SHF", "LOP3", "IADD3", "IMAD", "ISETP", "SEL", "SHFL", "STS", "LDS", "BAR", "STL", "LDL")
# (BLOCK_N, GROUPS, warps, STAGES, H2): the launch tables' CUDA-core settings (GROUPS 8 for weights of
# fewer than 4096 rows), then H2 at the same tiles and at tiles whose threads hold several rows of a run
TILES = [(4, 4, 4, 1, 0), (4, 8, 4, 1, 0), (4, 4, 4, 1, 1), (4, 8, 4, 1, 1), (4, 16, 4, 1, 1), (8, 8, 2, 1, 1),
         (16, 8, 4, 1, 1)]


def compile_gemv(block_n: int, groups: int, warps: int, stages: int, h2: int, quant_in: int):
    from deepserve.ops.triton import quant_gemm as qg
    consts = dict(HAS_BIAS=False, BLOCK_N=block_n, GROUPS=groups, GROUP=128, QUANT_X=bool(quant_in), QMAX=448.0,
                  STAGES=stages, USE_PDL=True, PREFETCH=False, LINE=128, LINES=64, H2=h2, ASM=1)
    ptrs = dict(x_ptr="*bf16" if quant_in else "*fp8e4nv", as_ptr="*fp32", w_ptr="*fp8e4nv", ws_ptr="*fp32",
                b_ptr="*bf16", y_ptr="*bf16")
    return _compile(qg._fp8_gemv_kernel, consts, ptrs, warps, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", action="append", default=[], help="BLOCK_N,GROUPS,warps,STAGES,H2 (repeatable)")
    ap.add_argument("--quant-in", type=int, default=0, help="1: the kernel quantizes the bf16 row itself")
    ap.add_argument("--sass", default="", help="write the last build's SASS here")
    args = ap.parse_args()
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tile] or TILES
    for block_n, groups, warps, stages, h2 in tiles:
        loop = report(compile_gemv(block_n, groups, warps, stages, h2, args.quant_in),
                      f"BLOCK_N {block_n} GROUPS {groups} warps {warps} STAGES {stages} H2 {h2} "
                      f"QUANT_IN {args.quant_in}", CLASSES, args.sass)
        per_thread = block_n * groups * 128 / (32 * warps)
        print(f"  {len(loop)} instructions a loop trip for {per_thread:.0f} weight bytes a thread: "
              f"{len(loop) / per_thread:.2f} a byte ({sum(counts(loop).values()) - len(loop)} sub-counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The W4A8 GEMM kernel (w4a8_gemm._w4a8_gemm_kernel) compiled for sm_90 without a GPU:
registers, spills and the instructions of its K loop by class, per tile setting.

    python benchmarks/sass_w4a8.py                       # the launch's M > 128 tile (64 x 256, 8 warps)
    python benchmarks/sass_w4a8.py --tile 64,64,4 --sass loop.sass

Triton compiles for `GPUTarget("cuda", 90, 32)` with what a launch at the 8B's shapes gets
(group 128, K step 128, PTX unpack, no zero points; unit strides constant, other ints and every
pointer divisible by 16); ptxas -v gives registers and spills, nvdisasm the SASS
(benchmarks/sass_mla_decode_fp8.py's helpers). Per loop trip the kernel does one int8
warp-group MMA chain (IGMMA) of BLOCK_M x BLOCK_N x 128 and rescales its int32 result by the
group's scale; the counts show what that rescale and the unpack cost beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from sass_mla_decode_fp8 import report  # noqa: E402

CLASSES = ("IGMMA", "IMMA", "I2F", "I2FP", "FADD", "FFMA", "FMUL", "IADD3", "LOP3", "PRMT", "SHF", "STS", "LDS",
           "LDGSTS", "LDG", "BAR", "MOV", "WARPGROUP", "STL", "LDL")


def compile_kernel(block_m: int, block_n: int, warps: int, stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deepserve.ops.triton import w4a8_gemm as w
    fn = w._w4a8_gemm_kernel
    names = fn.arg_names
    consts = dict(GROUP=128, HAS_ZP=False, HAS_BIAS=False, ASM=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128)
    ptrs = dict(a_ptr="*i8", as_ptr="*fp32", qw_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", b_ptr="*bf16",
                y_ptr="*bf16")
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = ptrs.get(name, "i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", action="append", default=[], help="BLOCK_M,BLOCK_N,warps[,stages] (repeatable)")
    ap.add_argument("--sass", default="", help="write the last build's SASS here")
    args = ap.parse_args()
    tiles = [tuple(int(x) for x in t.split(",")) for t in args.tile] or [(64, 256, 8)]
    for tile in tiles:
        block_m, block_n, warps = tile[:3]
        stages = tile[3] if len(tile) > 3 else 3
        kernel = compile_kernel(block_m, block_n, warps, stages)
        report(kernel, f"BLOCK_M {block_m} BLOCK_N {block_n} warps {warps} stages {stages}", CLASSES, args.sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())

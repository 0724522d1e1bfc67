"""fused_moe_small's tensor-core kernels (fused_moe_small_mma.py) compiled for sm_90 without a GPU:
registers, spills, shared memory and the SASS of the K loop, per launch setting, at R1's sizes.

    python benchmarks/sass_moe_small_mma.py                 # both kernels, the sweep's MMA candidates
    python benchmarks/sass_moe_small_mma.py --kernel down --tile 64,4,3 --sass down.sass

As benchmarks/sass_mla_decode_fp8.py: Triton compiles for `GPUTarget("cuda", 90, 32)` with the
constants and divisibility a launch at R1's shapes gets (D 7168, I = Is 2048, top-8, bf16
activations; unit strides as constants, every pointer and the other multiples of 16 divisible
by 16). "loop" is the first loop of the kernel: gate_up's over the routed expert's 128-groups
(the shared expert's loop is the same code), down's over every slot's groups. A loop step reads
2 x BLOCK_N x 128 weight bytes (gate_up: gate and up rows) or GROUPS x BLOCK_N x 128 (down); the
instructions a weight byte are the loop's instructions x 32 lanes x num_warps over those bytes,
against the H200's issue budget of ~7.8 (128 lanes a clock over 16.4 bytes a clock an SM).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from sass_mla_decode_fp8 import counts, disassemble, loop_body, resources  # noqa: E402

D, I, TOP_K = 7168, 2048, 8
CLASSES = ("QGMMA", "HGMMA", "HMMA", "LDGSTS", "LDG", "STS", "LDS", "F2FP", "FFMA", "FMUL", "SHFL", "BAR", "MUFU",
           "FCHK", "STL", "LDL")


def compile_kernel(kernel: str, block_n: int, warps: int, stages: int, quant_in: bool, groups: int = 1):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deepserve.ops.triton import fused_moe_small_mma as mma
    act_cols = TOP_K * I + I
    if kernel == "gate_up":
        fn = mma._gate_up_mma_kernel
        ptrs = dict(x_ptr="*bf16" if quant_in else "*fp8e4nv", xs_ptr="*fp32", ids_ptr="*i32", w_ptr="*fp8e4nv",
                    ws_ptr="*fp32", sw_ptr="*fp8e4nv", sws_ptr="*fp32", act_ptr="*bf16", qa_ptr="*fp8e4nv", qs_ptr="*fp32")
        ints = dict(x_stride=D, xs_stride=0 if quant_in else D // 128, ids_s0=TOP_K, ids_s1=1, w_se=2 * I * D,
                    w_sn=D, ws_se=(2 * I // 128) * (D // 128), ws_sn=D // 128, ws_sk=1, sw_sn=D, sws_sn=D // 128,
                    sws_sk=1, act_stride=act_cols, qa_stride=act_cols, qs_stride=act_cols // 128, inter=I, s_inter=I, hidden=D, n_experts=256, n_assign=TOP_K)
        # BLOCK_N 128 also quantises act for the down kernel, as fused_moe_small has it do
        consts = dict(TOP_K=TOP_K, BLOCK_N=block_n, GROUP=128, EVEN_K=True, EVEN_N=True, HAS_SHARED=True, QUANT_IN=quant_in,
                      QUANT_OUT=block_n == 128, QMAX=448.0, USE_PDL=True)
        unspecialised = ("n_assign",)
    else:
        fn = mma._down_mma_kernel
        ptrs = dict(act_ptr="*bf16" if quant_in else "*fp8e4nv", as_ptr="*fp32", ids_ptr="*i32", tw_ptr="*fp32",
                    w_ptr="*fp8e4nv", ws_ptr="*fp32", sw_ptr="*fp8e4nv", sws_ptr="*fp32", out_ptr="*bf16")
        ints = dict(act_stride=act_cols, as_stride=0 if quant_in else act_cols // 128, ids_s0=TOP_K, ids_s1=1,
                    tw_s0=TOP_K, tw_s1=1, w_se=D * I, w_sn=I, ws_se=(D // 128) * (I // 128), ws_sn=I // 128,
                    ws_sk=1, sw_sn=I, sws_sn=I // 128, sws_sk=1, out_stride=D, hidden=D, inter=I, s_inter=I,
                    n_experts=256)
        consts = dict(TOP_K=TOP_K, BLOCK_N=block_n, GROUP=128, G_SLOT=I // 128, G_SHARED=I // 128, GROUPS=groups,
                      COLS=16, EVEN_K=True, EVEN_N=True,
                      QUANT_IN=quant_in, QMAX=448.0, USE_PDL=True)
        unspecialised = ()
    names = fn.arg_names
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in consts or (ints.get(name) == 1 and name not in unspecialised):
            sig[name] = "constexpr"
            consts.setdefault(name, 1)
        else:
            sig[name] = ptrs.get(name, "i32")
        if name in ptrs or (name in ints and name not in unspecialised and ints[name] and ints[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def report(kernel: str, block_n: int, warps: int, stages: int, groups: int, quant_in: bool, sass_path: str = ""
           ) -> None:
    k = compile_kernel(kernel, block_n, warps, stages, quant_in, groups)
    regs, spill = resources(k.asm["ptx"])
    sass = disassemble(k.asm["cubin"])
    loop = loop_body(sass)
    ops = counts(loop)
    step_bytes = (2 if kernel == "gate_up" else groups) * block_n * 128
    per_byte = len(loop) * 32 * warps / step_bytes
    print(f"{kernel} BLOCK_N {block_n} warps {warps} stages {stages}{f' GROUPS {groups}' if kernel == 'down' else ''} "
          f"QUANT_IN {int(quant_in)}: {regs} registers, "
          f"{spill} B spilled, {k.metadata.shared} B shared; loop {len(loop)} instructions, {per_byte:.2f} a weight "
          "byte: " + ", ".join(f"{c} {ops[c]}" for c in CLASSES if ops[c]), flush=True)
    if sass_path:
        Path(sass_path).write_text(sass)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", choices=["gate_up", "down", "both"], default="both")
    ap.add_argument("--tile", action="append", default=[],
                    help="BLOCK_N,num_warps,num_stages[,GROUPS] (repeatable; GROUPS: down's 128-groups a step)")
    ap.add_argument("--quant-in", choices=["0", "1", "both"], default="both",
                    help="1: the activation quantised inside the kernel; 0: loaded pre-quantised")
    ap.add_argument("--sass", default="", help="write the last build's SASS here")
    args = ap.parse_args()
    tiles = [(*(int(v) for v in t.split(",")), 1)[:4] for t in args.tile] or [
        (64, 4, 3, 1), (64, 4, 4, 1), (128, 4, 3, 1), (128, 8, 3, 1), (64, 8, 4, 1), (64, 4, 3, 2), (64, 4, 4, 2)]
    kernels = ("gate_up", "down") if args.kernel == "both" else (args.kernel,)
    quant = (True, False) if args.quant_in == "both" else (args.quant_in == "1",)
    for kernel in kernels:
        for quant_in in quant:
            for block_n, warps, stages, groups in tiles:
                if kernel == "down" or groups == 1:
                    report(kernel, block_n, warps, stages, groups, quant_in, args.sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())

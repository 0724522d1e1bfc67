"""The fp8-pool MLA decode kernel (attention_decode._mla_decode_fp8_kernel) compiled for sm_90
without a GPU: registers, spills, shared memory and the SASS of its loop, per launch setting.

    python benchmarks/sass_mla_decode_fp8.py                        # the table's 16- and 128-head defaults
    python benchmarks/sass_mla_decode_fp8.py --tile 16,64,4,3 --dv-run 4 --sass loop.sass

Triton compiles for `GPUTarget("cuda", 90, 32)` from the kernel's source with the constants and
divisibility a launch at R1's shapes gets (unit strides as constants, the other ints and every
pointer divisible by 16; 576 / 512 latent, 64-token pages); Triton's own ptxas (-v) gives
registers and spill bytes, its nvdisasm the SASS. "loop" counts the instructions between the
kernel's first loop label and the backward branch to it: the main loop over key tiles.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

CLASSES = ("LDGSTS", "QGMMA", "HGMMA", "LDS", "LDS.U8", "LDS.U16", "LDS.64", "LDS.128", "F2FP", "PRMT",
           "STL", "LDL", "SHFL", "MUFU", "BAR")


def compile_kernel(block_h: int, block_n: int, warps: int, stages: int, maxnreg: int, dv_run: int, heads: int,
                   fused_merge: bool = False, qk_promote: int = 0):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deepserve.ops.triton import attention_decode as ad
    fn = ad._mla_decode_fp8_kernel
    names = fn.arg_names
    ints = dict(q_st=heads * 576, q_sh=576, q_sd=1, kc_b=64 * 576, kc_o=576, kc_d=1, bt_stride=64, n_heads=heads,
                block_size=64, d_pe=64, dv=512, num_splits=8, o_st=heads * 512, o_sh=512)
    consts = dict(BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=512, BLOCK_DPE=64, QK_DTYPE=tl.float8e4nv,
                  PV_DTYPE=tl.float16, DV_RUN=dv_run, DV_WG=max(1, warps // 4), FUSED_MERGE=fused_merge,
                  USE_PDL=True, QK_PROMOTE=qk_promote)
    ptrs = dict(q_ptr="*bf16", kc_ptr="*fp8e4nv", qsl_ptr="*i32", seq_lens_ptr="*i32", bt_ptr="*i32",
                mid_o_ptr="*bf16", mid_lse_ptr="*fp32", out_ptr="*bf16", count_ptr="*i32")
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in consts or (ints.get(name) == 1):
            sig[name] = "constexpr"
            consts.setdefault(name, 1)
        else:
            sig[name] = ptrs.get(name) or ("fp32" if name in ("qk_scale", "v_scale") else "i32")
        # num_splits is not specialised (do_not_specialize)
        if name in ptrs or (name in ints and name != "num_splits" and ints[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    options = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resources(ptx: str) -> tuple[int, int]:
    """(registers a thread, spill store bytes) from ptxas -v on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([tool("ptxas"), "--gpu-name", "sm_90a", "-v", str(path), "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True).stdout


def loop_body(sass: str) -> list[str]:
    """The instructions of the first loop: from a label to the last branch back to it."""
    lines = sass.splitlines()
    for i, line in enumerate(lines):
        label = re.match(r"^(\.L_x_\d+):", line)
        if not label:
            continue
        back = [j for j in range(i + 1, len(lines)) if re.search(rf"BRA `?\(?{re.escape(label.group(1))}\)?", lines[j])]
        if back:
            return [ln for ln in lines[i:back[-1] + 1] if re.match(r"^\s+/\*[0-9a-f]+\*/", ln)]
    return []


def counts(instructions: list[str]) -> collections.Counter:
    ops = collections.Counter()
    for line in instructions:
        m = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            full = m.group(1)
            ops[full.split(".")[0]] += 1
            if full.startswith("LDS."):
                ops[".".join(full.split(".")[:2])] += 1
    return ops


def report(kernel, label: str, classes=CLASSES, sass_path: str = "") -> list[str]:
    """Print a compiled kernel's registers, spills, shared memory and its loop's instructions by
    class after `label`; write its SASS to `sass_path` if given. Returns the loop's instructions."""
    regs, spill = resources(kernel.asm["ptx"])
    sass = disassemble(kernel.asm["cubin"])
    loop = loop_body(sass)
    ops = counts(loop)
    print(f"{label}: {regs} registers, {spill} B spilled, {kernel.metadata.shared} B shared; loop {len(loop)} "
          "instructions: " + ", ".join(f"{c} {ops[c]}" for c in classes if ops[c]), flush=True)
    if sass_path:
        Path(sass_path).write_text(sass)
    return loop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", action="append", default=[],
                    help="BLOCK_H,BLOCK_N,warps,stages (repeatable); default: the table's 16- and 128-head settings")
    ap.add_argument("--heads", type=int, default=0, help="query heads (default: 16, or 128 for BLOCK_H > 16)")
    ap.add_argument("--dv-run", type=int, default=1)
    ap.add_argument("--maxnreg", type=int, default=0)
    ap.add_argument("--fused-merge", action="store_true", help="the row's last split merges (setting fused_merge)")
    ap.add_argument("--qk-promote", type=int, default=0,
                    help="the QK product's sums moved into fp32 every N latent dims (setting qk_promote)")
    ap.add_argument("--sass", default="", help="write the last build's SASS here")
    args = ap.parse_args()
    tiles = [tuple(int(x) for x in t.split(",")) for t in args.tile]
    if not tiles:
        from deepserve.ops.triton import launch_config
        for heads in (16, 128):
            cfg = launch_config.lookup("mla_decode_fp8", "", heads=heads, batch=64, ctx=4096, block_size=64)
            tiles.append((cfg["BLOCK_H"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]))
    for block_h, block_n, warps, stages in tiles:
        heads = args.heads or (16 if block_h <= 16 else 128)
        kernel = compile_kernel(block_h, block_n, warps, stages, args.maxnreg, args.dv_run, heads, args.fused_merge,
                                args.qk_promote)
        report(kernel, f"BLOCK_H {block_h} BLOCK_N {block_n} warps {warps} stages {stages} maxnreg {args.maxnreg} "
                       f"dv_run {args.dv_run} heads {heads} fused_merge {int(args.fused_merge)} qk_promote {args.qk_promote}", sass_path=args.sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())

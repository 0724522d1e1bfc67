"""Tile settings of the sorted fused MoE (grouped GEMM over tokens sorted by expert) where it
is compute-bound: R1's experts (D 7168, I 2048, 256 experts, top-8) at 8192 tokens, 256 rows
per expert on average.

    python benchmarks/sweep_fused_moe.py                       # GPU
    python benchmarks/sweep_fused_moe.py --device cpu --tiny   # the script's logic, interpreted

Each candidate (`fused_moe.TILE_OVERRIDE`: BLOCK_M for both kernels, then one kernel's
BLOCK_N / BLOCK_K / warps / stages with the other at the default) is checked against the
default's output, then timed as CUDA-graph replays of the whole op (sort, both GEMMs, the
sum over slots). Rate: 2 * tokens * top_k * 3 * D * I FLOPs over the time, against an
8192^3 bf16 matmul measured first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from sweep_setup import prepare  # noqa: E402

KERNEL = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
          for n, k, w, s in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3),
                             (64, 64, 4, 4), (128, 64, 4, 4), (256, 64, 4, 3), (64, 128, 4, 3))]
FP8 = [dict(BLOCK_N=n, BLOCK_K=128, num_warps=w, num_stages=s) for n, w, s in ((128, 4, 3), (128, 8, 3), (128, 8, 4),
                                                                               (256, 8, 3), (64, 4, 4))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="shapes / 16 (for --device cpu)")
    ap.add_argument("--dtypes", default="bf16,fp8")
    args = ap.parse_args()
    prepare(args.device)
    from deepserve.ops.triton import fused_moe as fm

    dev = args.device
    if dev == "cuda":
        from bench_ops import graph_time_ms, matmul_flops
        peak = matmul_flops()
        print(f"device {torch.cuda.get_device_name()}: bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    else:
        from sweep_setup import wall_time_ms as graph_time_ms
        peak = 1e12
    d, inter, e, k, tokens = 7168, 2048, 256, 8, 8192
    if args.tiny:
        d, inter, e, tokens = 512, 256, 16, 256
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, d, generator=g, device=dev, dtype=torch.bfloat16)
    ids = torch.rand(tokens, e, generator=g, device=dev).topk(k, dim=-1).indices.to(torch.int32)
    tw = torch.rand(tokens, k, generator=g, device=dev)
    w13 = torch.randn(e, 2 * inter, d, generator=g, device=dev, dtype=torch.bfloat16) * d ** -0.5
    w2 = torch.randn(e, d, inter, generator=g, device=dev, dtype=torch.bfloat16) * inter ** -0.5
    flops = 2 * tokens * k * 3 * d * inter
    rows = []
    for dtype in args.dtypes.split(","):
        if dtype == "fp8":
            args_w = (w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn))
            kw = dict(w13_scale=torch.ones(e, 2 * inter // 128, d // 128, device=dev),
                      w2_scale=torch.ones(e, d // 128, inter // 128, device=dev))
            cands = FP8
        else:
            args_w, kw, cands = (w13, w2), {}, KERNEL
        run = lambda: fm.fused_moe(x, *args_w, tw, ids, **kw)  # noqa: E731
        fm.TILE_OVERRIDE = None
        want = run()
        base = graph_time_ms(run, 2)
        print(f"{dtype} default: {base:.2f} ms, {flops / (base * 1e-3) / peak:.1%} of matmul", flush=True)
        rows.append((dtype, "default", base))
        overrides = [{"BLOCK_M": m} for m in (64, 128)]
        overrides += [{"gate_up": c} for c in cands] + [{"down": c} for c in cands]
        overrides += [{"BLOCK_M": 128, "gate_up": c} for c in cands]
        for over in overrides:
            fm.TILE_OVERRIDE = over
            try:
                got = run()
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                if err > 2e-2:
                    print(f"  {over}: differs from the default (rel {err:.2e}), skipped")
                    continue
                ms = graph_time_ms(run, 2)
            except Exception as exc:  # noqa: BLE001 - out of shared memory etc.: report, go on
                print(f"  {over}: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            rows.append((dtype, str(over), ms))
            print(f"  {over}: {ms:.2f} ms, {flops / (ms * 1e-3) / peak:.1%}", flush=True)
        fm.TILE_OVERRIDE = None
    print("\nbest per dtype:")
    for dtype in args.dtypes.split(","):
        best = min((r for r in rows if r[0] == dtype), key=lambda r: r[2])
        print(f"| {dtype} | {best[1]} | {best[2]:.2f} ms | {flops / (best[2] * 1e-3) / peak:.1%} of matmul |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Launch settings of the sorted fused MoE (grouped GEMM over tokens sorted by expert) where it
is compute-bound: R1's experts (D 7168, I 2048, 256 experts, top-8) at 8192 tokens, 256 rows
per expert on average.

    python benchmarks/sweep_fused_moe.py                       # GPU
    python benchmarks/sweep_fused_moe.py --device cpu --tiny   # the script's logic, interpreted

Printed first: the bf16 matmul rate (8192^3) and, as the ceiling a grouped GEMM could reach at
these shapes, cuBLAS batched GEMMs (torch.bmm) with exactly 256 rows for every expert (no
gather, no padding, no routing imbalance). Then each candidate (BLOCK_M, PREQUANT, W_TMA and
each kernel's BLOCK_N / BLOCK_K / GROUP_M / warps / stages, tried over the launch table) is
checked against the default's output and timed as CUDA-graph replays of the whole op (sort,
both GEMMs, the sum over slots). Rate: 2 * tokens * top_k * 3 * D * I FLOPs over the time.
Last, the per-kernel times of the default and the best candidate (torch.profiler), and a
table. `--write` adds each dtype's best candidate to the running device's table
(deepserve/ops/triton/configs/fused_moe/), for this many rows per expert and more.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from sweep_setup import prepare  # noqa: E402

OLD_ORDER = {"GROUP_M": 1 << 20}      # row blocks fastest: the launch order before GROUP_M


def kernel(n, k, w, s, **extra):
    return dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s, **extra)


def candidates(dtype: str) -> list[dict]:
    """Settings around the defaults of `fused_moe._tiles` at 256 rows per expert (bf16: 128-row
    blocks; fp8: 64-row blocks), and the forms they replaced (weights read by pointers, not
    TMA; the old launch order; 64-row bf16 blocks; fp8 activations quantised inside the GEMMs;
    fp8 gate_up at 128 columns). `--quick` takes the first two."""
    both = lambda **kw: {"gate_up": dict(kw), "down": dict(kw)}  # noqa: E731
    out = [{"W_TMA": False}, both(**OLD_ORDER)] + [both(GROUP_M=g) for g in (2, 4, 8)]
    if dtype == "bf16":
        out += [{"BLOCK_M": 64, "gate_up": kernel(256, 64, 8, 3), "down": kernel(256, 64, 8, 3)}]
        out += [{"gate_up": kernel(*c)} for c in ((128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 5),
                                                   (64, 64, 4, 4))]
        out += [{"down": kernel(*c)} for c in ((256, 64, 8, 4), (256, 32, 8, 5), (256, 128, 8, 2),
                                                (128, 64, 4, 4))]
    else:
        out += [{"PREQUANT": False}]
        out += [{"gate_up": kernel(*c)} for c in ((128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4),
                                                   (64, 128, 4, 5), (256, 128, 8, 2))]
        out += [{"down": kernel(*c)} for c in ((256, 128, 8, 4), (128, 128, 4, 4), (512, 128, 8, 3),
                                                (256, 128, 4, 3))]
    return out


def as_rules(over: dict | None, when: dict | None = None) -> list[dict]:
    """A candidate ({"BLOCK_M": .., "gate_up": {..}, "down": {..}}) as launch-table rules."""
    when = when or {}
    over = over or {}
    rules = [{"if": dict(when), "set": {k: v for k, v in over.items() if k not in ("gate_up", "down")}}]
    rules += [{"if": dict(when, kernel=k), "set": over[k]} for k in ("gate_up", "down") if k in over]
    return [r if r["if"] else {"set": r["set"]} for r in rules if r["set"]]


def kernel_times(run, reps: int = 3) -> list[tuple[str, float]]:
    """(kernel name, ms per call) over `reps` calls of run, from torch.profiler's CUDA times."""
    from torch.profiler import ProfilerActivity, profile
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3 / reps) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="small shapes (for --device cpu)")
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--quick", action="store_true", help="the default, pointer loads and the old launch order")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--write", action="store_true", help="add the best candidates to the device's launch table")
    ap.add_argument("--config-dir", default=None, help="write the table under this folder instead of the package's")
    args = ap.parse_args()
    prepare(args.device)
    from deepserve.ops.triton import fused_moe as fm
    from deepserve.ops.triton import launch_config

    dev = args.device
    d, inter, e, k, tokens = 7168, 2048, 256, 8, args.tokens
    if args.tiny:
        d, inter, e, tokens = 256, 128, 8, 32
    flops = 2 * tokens * k * 3 * d * inter
    rate = lambda ms, n=flops: n / (ms * 1e-3) / peak  # noqa: E731  (share of the matmul rate)
    if dev == "cuda":
        from bench_ops import graph_time_ms, matmul_flops, time_ms
        peak = matmul_flops()
        print(f"device {torch.cuda.get_device_name()}: bf16 matmul {peak / 1e12:.0f} TFLOP/s")
        rows_e = max(tokens * k // e, 1)   # cuBLAS at the same FLOPs, every expert exactly this many rows
        xe = torch.randn(e, rows_e, d, device=dev, dtype=torch.bfloat16)
        w1 = torch.randn(e, d, 2 * inter, device=dev, dtype=torch.bfloat16)
        he = torch.randn(e, rows_e, inter, device=dev, dtype=torch.bfloat16)
        w2b = torch.randn(e, inter, d, device=dev, dtype=torch.bfloat16)
        t1 = time_ms(lambda: torch.bmm(xe, w1), iters=10)
        t2 = time_ms(lambda: torch.bmm(he, w2b), iters=10)
        print(f"cuBLAS bmm, {rows_e} rows per expert: gate_up {t1:.2f} ms ({rate(t1, flops * 2 / 3):.1%}), "
              f"down {t2:.2f} ms ({rate(t2, flops / 3):.1%}), both {rate(t1 + t2):.1%}")
        del xe, w1, he, w2b
    else:
        from sweep_setup import wall_time_ms as graph_time_ms
        peak = 1e12
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, d, generator=g, device=dev, dtype=torch.bfloat16)
    ids = torch.rand(tokens, e, generator=g, device=dev).topk(k, dim=-1).indices.to(torch.int32)
    tw = torch.rand(tokens, k, generator=g, device=dev)
    w13 = torch.randn(e, 2 * inter, d, generator=g, device=dev, dtype=torch.bfloat16) * d ** -0.5
    w2 = torch.randn(e, d, inter, generator=g, device=dev, dtype=torch.bfloat16) * inter ** -0.5
    rows = []
    for dtype in args.dtypes.split(","):
        if dtype == "fp8":
            args_w = (w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn))
            kw = dict(w13_scale=torch.ones(e, 2 * inter // 128, d // 128, device=dev),
                      w2_scale=torch.ones(e, d // 128, inter // 128, device=dev))
        else:
            args_w, kw = (w13, w2), {}
        run = lambda: fm.fused_moe(x, *args_w, tw, ids, **kw)  # noqa: E731
        want = run()
        base = graph_time_ms(run, 2)
        print(f"{dtype} default: {base:.2f} ms, {rate(base):.1%} of matmul", flush=True)
        rows.append((dtype, None, base))
        overrides = candidates(dtype)[:2 if args.quick else None]
        for over in overrides:
            with launch_config.trying("fused_moe", as_rules(over)):
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
            rows.append((dtype, over, ms))
            print(f"  {over}: {ms:.2f} ms, {rate(ms):.1%}", flush=True)
        best = min((r for r in rows if r[0] == dtype), key=lambda r: r[2])
        if dev == "cuda":
            for label, over in (("default", None), ("best", best[1])):
                with launch_config.trying("fused_moe", as_rules(over)):
                    parts = ", ".join(f"{name[:28]} {ms:.3f}" for name, ms in kernel_times(run)[:6])
                print(f"  {dtype} {label} kernels (ms): {parts}", flush=True)
    print("\nbest per dtype:")
    written = []
    for dtype in args.dtypes.split(","):
        base = next(r for r in rows if r[0] == dtype and r[1] is None)
        best = min((r for r in rows if r[0] == dtype), key=lambda r: r[2])
        print(f"| {dtype} | default {base[2]:.2f} ms ({rate(base[2]):.1%}) | best {best[1] or 'default'} "
              f"| {best[2]:.2f} ms | {rate(best[2]):.1%} of matmul |")
        if best[1]:
            fp8 = dtype == "fp8"
            when = {"fp8": fp8, "elem_bytes": 1 if fp8 else 2, "per_expert_ge": tokens * k / e}
            written += as_rules(best[1], when)
    if args.write:
        path = launch_config.save_rules("fused_moe", launch_config.device_key(torch.device(dev)), written,
                                        Path(args.config_dir) if args.config_dir else None)
        print(f"wrote {len(written)} rules to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Microbenchmarks of the Triton kernels against the rooflines measured in the same run.

    python benchmarks/bench_ops.py [--only NAME,...] [--out-dir benchmarks/results]

Triton kernels are timed as CUDA-graph replays (no Python launch overhead, as the engine
runs them); the torch references eagerly. Rooflines: a 2 GiB device-to-device copy (bytes read + written per second) for memory-bound
kernels, an 8192^3 bf16 matmul (FLOP/s) for compute-bound ones. Each kernel prints its time,
achieved GB/s or TFLOP/s, the ratio to its roofline, and the torch reference's time; each
result is written as one JSON file (name, device, date, command, value, unit,
roofline_value, ratio, plus torch_ms and speedup) so figures can be compared across commits.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepserve.ops.registry import resolve  # noqa: E402
from tests.ops.paged_batch import make_paged_batch  # noqa: E402


def time_ms(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Median of `iters` CUDA-event timings of fn() (after warm-up and compilation)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_time_ms(fn: Callable[[], object], reps: int = 10) -> float:
    """Kernel time without Python launch overhead: `reps` calls captured in one CUDA graph
    (how the engine runs decode); falls back to eager timing when fn cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
    except RuntimeError:
        return time_ms(fn)
    return time_ms(graph.replay, iters=10, warmup=2) / reps


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=10)  # noqa: F821 (deleted after the lambda runs)
    del src, dst
    return 2 * (2 << 30) / (ms * 1e-3)


def matmul_flops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, iters=10)
    return 2 * 8192 ** 3 / (ms * 1e-3)


def both(op: str, *args, **kwargs):
    tri, ref = resolve(op, "triton")[1], resolve(op, "torch")[1]
    return (lambda: tri(*args, **kwargs)), (lambda: ref(*args, **kwargs))


def cases():
    """(name, kind 'bw'|'flops', amount in bytes or FLOPs, triton fn, torch fn)."""
    bf16, dev = torch.bfloat16, "cuda"
    t, d = 4096, 7168
    x, r = torch.randn(t, d, dtype=bf16, device=dev), torch.randn(t, d, dtype=bf16, device=dev)
    w = torch.randn(d, dtype=bf16, device=dev)
    yield "rms_norm_4096x7168", "bw", 2 * t * d * 2, *both("rms_norm", x, w, 1e-6)
    yield "fused_add_rms_norm_4096x7168", "bw", 4 * t * d * 2, *both("fused_add_rms_norm", x, r, w, 1e-6)
    inter = 14336
    h = torch.randn(t, 2 * inter, dtype=bf16, device=dev)
    yield "silu_and_mul_4096x14336", "bw", 3 * t * inter * 2, *both("silu_and_mul", h)
    pos = torch.randint(0, 32768, (t,), device=dev)
    cache = torch.randn(32768, 128, device=dev)
    q = torch.randn(t, 32, 128, dtype=bf16, device=dev)
    k = torch.randn(t, 8, 128, dtype=bf16, device=dev)
    yield "rotary_neox_4096x32x128", "bw", 2 * (q.numel() + k.numel()) * 2 + t * 128 * 4, \
        *both("rotary_embedding", pos, q, k, cache, True)
    key = torch.randn(t, 1, 576, dtype=bf16, device=dev)
    pool = torch.zeros(8192, 64, 1, 576, dtype=bf16, device=dev)
    slots = torch.randperm(8192 * 64, device=dev)[:t]
    yield "write_kv_cache_mla_4096", "bw", 2 * key.numel() * 2, \
        *both("write_kv_cache", key, None, pool, pool[..., :512], slots)
    del pool
    ctx = 4096
    pb = make_paged_batch([1] * 64, [ctx] * 64, 32, 8, 128, block_size=16, dtype=bf16, device=dev)
    yield "decode_gqa_b64_ctx4k", "bw", 64 * ctx * 8 * 128 * 2 * 2, *both("paged_attention", *pb.args(0.088))
    pb = make_paged_batch([1] * 64, [ctx] * 64, 16, 1, 576, 512, block_size=64, dtype=bf16, device=dev,
                          mla=True)
    yield "decode_mla_b64_ctx4k", "bw", 64 * ctx * 576 * 2, *both("paged_attention", *pb.args(0.072))
    pb = make_paged_batch([1] * 4, [ctx] * 4, 128, 1, 576, 512, block_size=64, dtype=bf16, device=dev,
                          mla=True)
    yield "decode_mla_h128_b4_ctx4k", "bw", 4 * ctx * 576 * 2, *both("paged_attention", *pb.args(0.072))
    seq = 8192
    pb = make_paged_batch([seq], [seq], 32, 8, 128, block_size=16, dtype=bf16, device=dev)
    yield "prefill_gqa_8k", "flops", 2 * 2 * 32 * 128 * seq * seq / 2, *both("paged_attention", *pb.args(0.088))
    pb = make_paged_batch([seq], [seq], 16, 16, 192, 128, block_size=64, dtype=bf16, device=dev)
    yield "prefill_mla_8k", "flops", 2 * 16 * (192 + 128) * seq * seq / 2, \
        *both("paged_attention", *pb.args(0.072))
    del pb
    yield from moe_cases()


def moe_cases():
    """DeepSeek-R1 MoE layer shapes (E=256, k=8, D=7168, I=2048), bf16 and fp8 blocks."""
    dev, e, k, d, inter = "cuda", 256, 8, 7168, 2048
    logits = torch.randn(256, e, device=dev)
    bias = torch.randn(e, device=dev) * 0.1
    route = dict(top_k=k, scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4,
                 norm_topk_prob=True, routed_scaling_factor=2.5)
    yield "moe_route_r1_b256", "bw", logits.numel() * 4, *both("moe_route", logits, bias, **route)
    w13 = torch.randn(e, 2 * inter, d, device=dev, dtype=torch.bfloat16) * d ** -0.5
    w2 = torch.randn(e, d, inter, device=dev, dtype=torch.bfloat16) * inter ** -0.5
    w13_8, w2_8 = w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn)
    s13 = torch.full((e, 2 * inter // 128, d // 128), 1.0, device=dev)
    s2 = torch.full((e, d // 128, inter // 128), 1.0, device=dev)
    for tokens in (1, 32, 128, 256, 8192):
        x = torch.randn(tokens, d, device=dev, dtype=torch.bfloat16)
        ids = torch.rand(tokens, e, device=dev).topk(k, dim=-1).indices.to(torch.int32)
        weights = torch.rand(tokens, k, device=dev)
        hit = int(torch.unique(ids).numel())
        flops = 2 * tokens * k * 3 * d * inter
        for tag, args, kw, elem in (("bf16", (w13, w2), {}, 2), ("fp8", (w13_8, w2_8),
                                                                    dict(w13_scale=s13, w2_scale=s2), 1)):
            fns = both("fused_moe", x, *args, weights, ids, **kw)
            if tokens <= 256:
                yield f"fused_moe_r1_{tag}_b{tokens}", "bw", hit * 3 * d * inter * elem + 2 * tokens * d * 2, *fns
            if tokens >= 256:
                yield f"fused_moe_r1_{tag}_b{tokens}_compute", "flops", flops, *fns


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--no-torch", action="store_true", help="skip timing the torch references")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_ops.py needs a CUDA device")
    import deepserve.ops.triton  # noqa: F401
    device = torch.cuda.get_device_name()
    bw, flops = copy_bandwidth(), matmul_flops()
    print(f"device {device}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = "python " + " ".join(sys.argv)
    only = [s for s in args.only.split(",") if s]
    print(f"{'kernel':34s} {'ms':>9s} {'achieved':>14s} {'roofline':>8s} {'torch ms':>9s} {'speedup':>7s}")
    for name, kind, amount, tri, ref in cases():
        if only and not any(s in name for s in only):
            continue
        ms = graph_time_ms(tri)
        ref_ms = None if args.no_torch else time_ms(ref, iters=5, warmup=1)
        rate = amount / (ms * 1e-3)
        roof = bw if kind == "bw" else flops
        unit = "GB/s" if kind == "bw" else "TFLOP/s"
        scale = 1e9 if kind == "bw" else 1e12
        ref_txt = f"{ref_ms:9.3f} {ref_ms / ms:6.1f}x" if ref_ms else ""
        print(f"{name:34s} {ms:9.3f} {rate / scale:9.1f} {unit:>4s} {rate / roof:7.1%} {ref_txt}")
        record = dict(name=f"ops.{name}", device=device, date=date, command=command,
                      value=round(rate / scale, 3), unit=unit, roofline_value=round(roof / scale, 3),
                      ratio=round(rate / roof, 4), time_ms=round(ms, 5),
                      torch_ms=round(ref_ms, 5) if ref_ms else None,
                      speedup=round(ref_ms / ms, 3) if ref_ms else None)
        (out_dir / f"ops_{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

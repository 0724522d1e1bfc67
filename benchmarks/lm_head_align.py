"""The LM head's GEMM at a vocabulary that is not a multiple of 64 rows against one padded to it.

cuBLAS picks its kernel by the operands' alignment: an odd row count of the [V, D] weight (the
peer benchmarks raise V2-Lite's vocabulary to the R1 tokenizer's 128,815) can send a bf16 GEMM
to a kernel without Hopper's tensor-core path. Times F.linear over rows x D at each V, with the
kernel's name, and the copy bandwidth in the same process for the weight-read roofline.

    python benchmarks/lm_head_align.py [--d 2048] [--rows 1 64 245 256]
"""
import argparse

import torch
import torch.nn.functional as F


def timed(fn, reps=50):
    for _ in range(5):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps * 1e3   # us


def kernel_name(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return names[0][:70] if names else "?"


def copy_bandwidth() -> float:
    """GB/s of a 512 MiB bf16 copy (read + write)."""
    n = 1 << 28
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    return 2 * n * 2 / (timed(lambda: b.copy_(a), 10) / 1e6) / 1e9


def lm_head_rows(v: int, d: int, rows: list[int], copy_gbs: float) -> None:
    """One table row for each batch of `rows` through a [v, d] head."""
    w = torch.randn(v, d, dtype=torch.bfloat16, device="cuda")
    for m in rows:
        x = torch.randn(m, d, dtype=torch.bfloat16, device="cuda")
        us = timed(lambda: F.linear(x, w))
        ratio = v * d * 2 / (us / 1e6) / 1e9 / copy_gbs
        print(f"| {v} | {m} | {us:.1f} | {ratio:.0%} | {kernel_name(lambda: F.linear(x, w))} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 245, 256])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[128815, 128832, 129280, 102400])
    args = ap.parse_args()
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbs:.0f} GB/s")
    print("| vocab | rows | us | of copy (weight bytes) | kernel |")
    print("|---:|---:|---:|---:|---|")
    for v in args.vocabs:
        lm_head_rows(v, args.d, args.rows, copy_gbs)


if __name__ == "__main__":
    main()

"""W4A8 with channel scales (one group over K) at 1,024 rows: cuBLAS bf16 against the
weights-first kernel at a few tiles, eager launches timed with CUDA events (30 calls after 3).

    python benchmarks/w4a8_channel_tiles.py

Eager timing includes each call's host work (the table lookup, the activation quantizer's
launch), which bounds the smaller shapes (8B qkv); bench_int4.py --part dense times the
table's tile in CUDA graphs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepserve.ops.registry import resolve  # noqa: E402
from deepserve.ops.triton.launch_config import trying  # noqa: E402

SHAPES = [("8b gate_up", 28672, 4096), ("8b qkv", 6144, 4096), ("r1 q_b", 24576, 1536), ("r1 o_proj", 7168, 16384)]
TILES = [(128, 64, 4, 4), (128, 128, 8, 3), (256, 128, 8, 3), (128, 256, 8, 3), (256, 64, 8, 3), (128, 128, 4, 3)]


def event_us(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3


def main() -> int:
    w4a8 = resolve("w4a8_linear", "triton")[1]
    for name, n, k in SHAPES:
        q = torch.randint(-2 ** 31, 2 ** 31, (n, k // 8), device="cuda", dtype=torch.int64).to(torch.int32)
        s = (torch.rand(n, 1, device="cuda") * 0.01 + 0.001).bfloat16()
        x = torch.randn(1024, k, device="cuda").bfloat16()
        w = torch.randn(n, k, device="cuda").bfloat16()
        bf = event_us(lambda: F.linear(x, w))
        row = [f"{name}: bf16 {bf:.1f}"]
        for bm, bn, warps, stages in TILES:
            setting = dict(SWAP_AB=1, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, OVERLAP=0)
            with trying("int4", [{"if": {"kernel": "w4a8"}, "set": setting}]):
                us = event_us(lambda: w4a8(x, q, s, None, None, k))
            row.append(f"{bm}x{bn}w{warps}s{stages} {us:.1f} ({bf / us:.2f}x)")
        print(" | ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

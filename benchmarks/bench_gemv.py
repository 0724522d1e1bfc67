"""Decode-sized (M = 1) bf16 projections: which call reads the weights fastest?

cuBLAS picks a kernel per shape; at batch 1 some shapes land on tiles that reach only about
half of the copy bandwidth (the 8B model's o_proj: 54% in benchmarks/profile_decode.py).
This times, as CUDA-graph replays, F.linear(x, W), torch.mv(W, x) and (W @ x^T)^T for the
projections of r1-distill-llama-8b and deepseek-v2-lite, against the copy bandwidth of the
same run, so the engine can pick the fastest per shape.

    python benchmarks/bench_gemv.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import copy_bandwidth, graph_time_ms  # noqa: E402

SHAPES = {  # name: (N, K)
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (28672, 4096), "8b.down": (4096, 14336),
    "v2l.q": (3072, 2048), "v2l.kv_a": (576, 2048), "v2l.o": (2048, 2048),
    "v2l.shared_gate_up": (5632, 2048), "v2l.shared_down": (2048, 2816),
}


def main() -> None:
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'shape':22s} {'variant':8s} {'us':>8s} {'GB/s':>8s} {'% copy':>7s}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, w).float()
        variants = {"linear": lambda: F.linear(x, w), "mv": lambda: torch.mv(w, x[0])[None],
                    "w@xT": lambda: (w @ x.t()).t()}
        for vname, fn in variants.items():
            err = (fn().float() - ref).abs().max().item()
            us = graph_time_ms(fn) * 1e3
            rate = n * k * 2 / (us * 1e-6)
            print(f"{name:22s} {vname:8s} {us:8.1f} {rate / 1e9:8.0f} {rate / bw:7.1%}  (max err {err:.3g})")


if __name__ == "__main__":
    main()

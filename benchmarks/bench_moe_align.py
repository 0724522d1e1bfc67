"""align_by_expert (two Triton launches) against align_by_expert_reference (torch ops) at the
MoE shapes a server meets (issue 25: the reference's ~20 launches were 16.6 ms a mixed step
of V2-Lite's 26 MoE layers under cProfile).

    GPU: python benchmarks/bench_moe_align.py
    CPU: python benchmarks/bench_moe_align.py --device cpu --cases 8x2x8 --iters 2   (interpreted; checks the script)

Per case (tokens x top_k x experts, BLOCK_M 64): host microseconds per call (a loop of calls
without a sync: what the host spends launching, the figure a host-bound step pays), GPU
microseconds per call (CUDA events around the same loop after a sync; where the host is the
slower side it shows the host's pace), and whether both give the same output.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = "64x6x64,256x6x64,1088x6x64,8192x6x64,64x8x256,1088x8x256,16384x8x256"


def timings(fn, iters: int, device: torch.device) -> tuple[float, float]:
    """(host us, device us) per call of fn over `iters` back-to-back calls."""
    cuda = device.type == "cuda"
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters * 1e6
    if not cuda:
        return host, float("nan")
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=CASES, help="comma-separated TOKENSxTOPKxEXPERTS")
    ap.add_argument("--block-m", type=int, default=64)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"     # before the kernels are decorated
    from deepserve.ops.triton.moe_align import align_by_expert, align_by_expert_reference
    device = torch.device(args.device)
    print(f"{'case':>14} {'triton host':>12} {'triton gpu':>11} {'torch host':>11} {'torch gpu':>10}  same")
    for case in args.cases.split(","):
        tokens, top_k, experts = (int(v) for v in case.split("x"))
        gen = torch.Generator().manual_seed(0)
        ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k].to(torch.int32).to(device)
        got = align_by_expert(ids, experts, args.block_m)
        want = align_by_expert_reference(ids, experts, args.block_m)
        same = torch.equal(got.sorted_ids, want.sorted_ids) and torch.equal(got.block_expert, want.block_expert)
        t = timings(lambda: align_by_expert(ids, experts, args.block_m), args.iters, device)
        r = timings(lambda: align_by_expert_reference(ids, experts, args.block_m), args.iters, device)
        print(f"{case:>14} {t[0]:>10.1f}us {t[1]:>9.1f}us {r[0]:>9.1f}us {r[1]:>8.1f}us  {same}")


if __name__ == "__main__":
    main()

"""4-bit weight kernels against bf16: W4A16 GEMV / GEMM, W4A8 GEMM, W4A16 fused MoE.

    python benchmarks/bench_int4.py                      # GPU
    python benchmarks/bench_int4.py --device cpu --tiny  # the script's logic, interpreted

Dense: every batch-1 projection shape of r1-distill-llama-8b (and R1's dense ones), as
compressed-tensors W4A16 (symmetric, groups of 128: packed int32 + bf16 scales) through the
Triton int4_linear, against cuBLAS bf16 (F.linear) on the same shape. Batch 1 is the split-K
GEMV; its roofline counts the packed bytes (weight / 2 + scales) over the 2 GiB copy bandwidth,
as benchmarks/sweep_gemv.py counts bf16 bytes. Rows 16 / 256 / 1024 are the tl.dot GEMM;
W4A8 (int8 tl.dot) runs at 1024 rows. Each timing is a CUDA-graph replay over enough weight
copies (>= 256 MB) that the weights come from HBM. MoE: R1's routed experts of one EP8 rank
(32 experts, D 7168, I 2048) at batch 1 (top-8) and at 256 rows per expert, W4A16 against the
bf16 fused MoE. Each kernel is checked against its torch reference first (WRONG is printed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from sweep_setup import bandwidth_and_timer, prepare  # noqa: E402

SHAPES = [("8b", "qkv", 6144, 4096), ("8b", "o_proj", 4096, 4096), ("8b", "gate_up", 28672, 4096),
          ("8b", "down", 4096, 14336), ("r1", "q_b", 24576, 1536), ("r1", "o_proj", 7168, 16384)]
ROWS = (1, 16, 256, 1024)
GROUP = 128


def int4_weight(n: int, k: int, dev: str):
    qweight = torch.randint(-2 ** 31, 2 ** 31, (n, k // 8), dtype=torch.int64, device=dev).to(torch.int32)
    scales = torch.full((n, k // GROUP), 0.02 / 4.6, dtype=torch.bfloat16, device=dev)
    return qweight, scales


def packed_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * (k // GROUP) * 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="shapes / 64 (for --device cpu)")
    args = ap.parse_args()
    prepare(args.device)
    from deepserve.ops.registry import resolve
    import deepserve.ops.triton  # noqa: F401  (registers the kernels)

    dev = args.device
    bw, timer = bandwidth_and_timer(dev)
    int4_tri, int4_ref = resolve("int4_linear", "triton")[1], resolve("int4_linear", "torch")[1]
    w4a8_tri, w4a8_ref = resolve("w4a8_linear", "triton")[1], resolve("w4a8_linear", "torch")[1]
    print("| shape | N x K | rows | bf16 cuBLAS us | W4A16 us | W4A16 % of packed-bytes roofline | speedup | W4A8 us |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model, proj, n, k in SHAPES:
        if args.tiny:
            n, k = max(n // 64, 16), max(k // 64 // GROUP * GROUP, GROUP)
        copies = 1 if dev == "cpu" else max(1, min(64, (256 << 20) // packed_bytes(n, k)))
        qs = [int4_weight(n, k, dev) for _ in range(copies)]
        bf = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(max(1, copies // 4))]
        for m in ROWS if dev == "cuda" else (1,):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            q, s = qs[0]
            want = int4_ref(x, q, s, None, None, GROUP).float()
            got = int4_tri(x, q, s, None, None, GROUP).float()
            if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                print(f"{model} {proj} rows {m}: W4A16 WRONG, max err {(got - want).abs().max():.3g}")
                continue
            us4 = timer(lambda: [int4_tri(x, q_, s_, None, None, GROUP) for q_, s_ in qs]) * 1e3 / copies
            us16 = timer(lambda: [F.linear(x, w) for w in bf]) * 1e3 / len(bf)
            roof = packed_bytes(n, k) / (us4 * 1e-6) / bw if m == 1 else float("nan")
            w4a8 = "-"
            if m == ROWS[-1] or dev == "cpu":
                if torch.allclose(w4a8_tri(x, q, s, None, None, GROUP).float(),
                                  w4a8_ref(x, q, s, None, None, GROUP).float(), rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                    w4a8 = f"{timer(lambda: [w4a8_tri(x, q_, s_, None, None, GROUP) for q_, s_ in qs]) * 1e3 / copies:.1f}"
                else:
                    w4a8 = "WRONG"
            print(f"| {model} {proj} | {n}x{k} | {m} | {us16:.1f} | {us4:.1f} | {roof:.0%} | {us16 / us4:.2f}x | {w4a8} |",
                  flush=True)
    bench_moe(dev, args.tiny, timer, bw)
    return 0


def bench_moe(dev: str, tiny: bool, timer, bw: float) -> None:
    """R1 routed experts of one EP8 rank: W4A16 fused MoE vs the bf16 one."""
    from deepserve.ops.registry import resolve
    e, d, i, top_k = (32, 7168, 2048, 8) if not tiny else (4, 128, 128, 2)
    w13 = torch.randint(-2 ** 31, 2 ** 31, (e, 2 * i, d // 8), dtype=torch.int64, device=dev).to(torch.int32)
    w2 = torch.randint(-2 ** 31, 2 ** 31, (e, d, i // 8), dtype=torch.int64, device=dev).to(torch.int32)
    s13 = torch.full((e, 2 * i, d // GROUP), 0.02 / 4.6, dtype=torch.bfloat16, device=dev)
    s2 = torch.full((e, d, i // GROUP), 0.02 / 4.6, dtype=torch.bfloat16, device=dev)
    b13 = torch.randn(e, 2 * i, d, device=dev, dtype=torch.bfloat16) * 0.02
    b2 = torch.randn(e, d, i, device=dev, dtype=torch.bfloat16) * 0.02
    tri, fused = resolve("fused_moe_int4", "triton")[1], resolve("fused_moe", "triton")[1]
    print("\n| MoE (R1, one EP8 rank) | tokens | bf16 fused us | W4A16 us | W4A16 % of roofline |")
    print("|---|---:|---:|---:|---:|")
    for tokens in (1, 256 * e // top_k if not tiny else 8):
        x = torch.randn(tokens, d, device=dev, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(e, device=dev)[:top_k] for _ in range(tokens)]).int()
        wts = torch.rand(tokens, top_k, device=dev)
        us4 = timer(lambda: tri(x, w13, s13, None, w2, s2, None, wts, ids, (GROUP, GROUP))) * 1e3
        us16 = timer(lambda: fused(x, b13, b2, wts, ids)) * 1e3
        touched = len(torch.unique(ids))
        nbytes = touched * (packed_bytes(2 * i, d) + packed_bytes(d, i))
        roof = f"{nbytes / (us4 * 1e-6) / bw:.0%}" if tokens == 1 else "-"
        print(f"| experts | {tokens} | {us16:.1f} | {us4:.1f} | {roof} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

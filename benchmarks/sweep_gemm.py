"""Triton GEMM vs cuBLAS per shape (issue 24): which backend the dense several-row linear takes
on this device (configs/gemm/, read by deepserve/ops/triton/gemm.py).

For each projection [N, K] of the chosen models and each row bucket M, the script times cuBLAS
(F.linear) and the Triton kernel under each candidate tile setting (triton.testing.do_bench,
median), checks the kernel against F.linear, and prints both. With --write, every bucket where
the best Triton setting beat cuBLAS by more than --margin becomes a rule of this device's
table: `{"if": {"m_gt": lo, "m_le": hi, "n": N, "k": K}, "set": {"backend": "triton", tiles}}`;
elsewhere the default (cuBLAS) stands. `--ops triton-all` ignores the table.

GPU:  python benchmarks/sweep_gemm.py --models llama8b r1 --out benchmarks/results/sweep_gemm.json [--write]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepserve.ops.triton import launch_config  # noqa: E402
from deepserve.ops.triton.gemm import gemm  # noqa: E402

# [N, K] of each dense projection (one GPU, no TP): q/kv/o, gate+up, down, lm head
SHAPES = {
    "llama8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)],
    "r1": [(1536, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (36864, 7168), (7168, 18432),
           (4096, 7168), (7168, 2048)],
    "v2lite": [(3072, 2048), (576, 2048), (4096, 512), (2048, 2048), (21888, 2048), (2048, 10944)],
}
BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384]  # rows M in (previous, this]
CANDIDATES = [
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
]


def main():
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama8b", "r1"], choices=sorted(SHAPES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--write", action="store_true", help="add the winning buckets to this device's table")
    ap.add_argument("--margin", type=float, default=0.02, help="Triton must be this much faster (fraction)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows, rules = [], []
    for n, k in sorted({s for m in args.models for s in SHAPES[m]}):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        for lo, m in zip(BUCKETS[:-1], BUCKETS[1:]):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            want = F.linear(x, w)
            cublas_ms = do_bench(lambda: F.linear(x, w))
            best = None
            for cfg in CANDIDATES:
                got = gemm(x, w, None, dict(cfg))
                torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2 ** -6)
                ms = do_bench(lambda: gemm(x, w, None, dict(cfg)))
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            row = {"m": m, "n": n, "k": k, "cublas_ms": cublas_ms, "triton_ms": best[0], "triton_cfg": best[1],
                   "triton_vs_cublas": cublas_ms / best[0]}
            rows.append(row)
            print(f"M {m:>6} N {n:>6} K {k:>6}: cuBLAS {1e3 * cublas_ms:9.1f} us, Triton {1e3 * best[0]:9.1f} us "
                  f"({row['triton_vs_cublas']:.2f}x) {best[1]}", flush=True)
            if best[0] < cublas_ms * (1 - args.margin):
                rules.append({"if": {"m_gt": lo, "m_le": m, "n": n, "k": k}, "set": {"backend": "triton", **best[1]}})
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(), "rows": rows,
              "rules": rules}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.write:
        print("wrote", launch_config.save_rules("gemm", launch_config.device_key(dev), rules))


if __name__ == "__main__":
    main()

"""Triton GEMM vs cuBLAS per shape (issue 24): the launch table of the dense several-row linear
on this device (configs/gemm/, read by deepserve/ops/triton/gemm.py).

    python benchmarks/sweep_gemm.py --models llama8b [--write] [--out FILE]   # GPU
    python benchmarks/sweep_gemm.py --device cpu --tiny --buckets 16           # the logic, interpreted

For each projection [N, K] of the chosen models and each row bucket M (rows in (previous
bucket, M]), the script times cuBLAS (F.linear) and the Triton kernel under candidate launch
settings, each checked against F.linear first. Timing is CUDA-graph replay (bench_ops, as the
engine runs) over enough weight copies (>= 256 MB) that weights come from HBM, not from the
50 MB L2, as in a decode step. Buckets run in the order decode needs them (64 rows first), and
each bucket's rules are written as soon as it is measured, so a cut-short run keeps them.

Candidates per bucket: tiles of the bucket's size (TILES: 16-row tiles for M <= 16, 32/64-row
and 32-column ones up to 64, ...) at SPLIT_K 1, plus the table's current setting; then, for
M <= 256, split-K (SPLITS) over the two fastest tiles where their output tiles leave SMs idle
(`split_ks`): at few rows a GEMM is a weight read and needs every SM streaming.

With --write, every swept (shape, bucket) becomes a rule of this device's table carrying the
best Triton setting: `{"if": {"m_gt": lo, "m_le": M, "n": N, "k": K}, "set": {"backend": B,
tiles}}`, B "triton" where the best Triton setting beat cuBLAS by more than --margin, else
"cublas". `--ops triton` follows B; `--ops triton-all` takes the Triton kernel everywhere with
these tiles. The last table: per shape and bucket cuBLAS, the table's setting before the sweep
and the best Triton setting (us), best vs cuBLAS, and each as % of the weight-read bound
((N*K + M*K + M*N) * 2 bytes at the copy bandwidth measured first).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from sweep_setup import bandwidth_and_timer, prepare, try_setting  # noqa: E402

# [N, K] of each dense projection (one GPU, no TP): q/kv/o, gate+up, down, lm head
SHAPES = {
    "llama8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)],
    "r1": [(1536, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (36864, 7168), (7168, 18432),
           (4096, 7168), (7168, 2048)],
    "v2lite": [(3072, 2048), (576, 2048), (4096, 512), (2048, 2048), (21888, 2048), (2048, 10944)],
}
BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384]  # rows M in (previous, this]
ORDER = [64, 16, 4, 256, 1024, 4096, 16384]       # decode's batch sizes first
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by the largest M they are tried for
TILES = {
    16: [(16, 64, 128, 4, 4), (16, 32, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4)],
    64: [(64, 64, 64, 4, 4), (32, 64, 128, 4, 4), (64, 32, 128, 4, 4), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4)],
    256: [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3)],
    None: [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)],
}
SPLITS = (2, 4, 8)
SPLIT_MAX_M = 256      # split-K is tried up to this many rows
SPLIT_BASES = 2        # ... over this many of the fastest unsplit tiles
SETTING_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps", "num_stages")


def setting(block_m: int, block_n: int, block_k: int, warps: int, stages: int, split: int = 1) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "SPLIT_K": split,
            "num_warps": warps, "num_stages": stages}


def tile_candidates(m: int) -> list[dict]:
    """The unsplit tiles tried for a bucket of at most m rows."""
    size = next((s for s in TILES if s is not None and m <= s), None)
    return [setting(*t) for t in TILES[size]]


def split_ks(cfg: dict, m: int, n: int, k: int, sms: int) -> list[int]:
    """SPLIT_K values worth timing for `cfg`'s tiles: where the output tiles are fewer than
    two per SM, up to four programs per SM in all, each split keeping at least 4 K steps."""
    if m > SPLIT_MAX_M:
        return []
    tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    steps = -(-k // cfg["BLOCK_K"])
    return [s for s in SPLITS if tiles < 2 * sms and tiles * s <= 4 * sms and steps >= 4 * s]


def short(cfg: dict) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} s{cfg.get('SPLIT_K', 1)} "
            f"w{cfg['num_warps']} st{cfg['num_stages']}")


def bucket_rule(lo: int, m: int, n: int, k: int, cublas_ms: float, best_ms: float, best: dict,
                margin: float) -> dict:
    """The table rule of one swept (shape, bucket): the best Triton setting in full, with the
    backend that `--ops triton` takes there."""
    backend = "triton" if best_ms < cublas_ms * (1 - margin) else "cublas"
    return {"if": {"m_gt": lo, "m_le": m, "n": n, "k": k},
            "set": {"backend": backend, **{key: best[key] for key in SETTING_KEYS}}}


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes takes NxK (output x input features), got {text!r}") from None
    return n, k


def read_bound_ms(m: int, n: int, k: int, bandwidth: float) -> float:
    """Weight, input and output bytes (bf16) at the copy bandwidth."""
    return (n * k + m * k + m * n) * 2 / bandwidth * 1e3


def sweep_bucket(x: torch.Tensor, ws: list[torch.Tensor], table_cfg: dict, sms: int, timer: Callable,
                 limit: Optional[int]) -> tuple[float, dict, float, dict]:
    """(best ms, its setting, ms of the table's setting, ms of every setting tried) of one shape
    and bucket; at most `limit` candidates a stage when given."""
    from deepserve.ops.triton.gemm import gemm
    m, (n, k) = x.shape[0], ws[0].shape
    want = F.linear(x.float(), ws[0].float())
    times, settings = {}, {}

    def run(cfgs: list[dict]) -> None:
        for cfg in cfgs[:limit]:
            name = short(cfg)
            if name in times:
                continue
            ms, err, why = try_setting("gemm", [{"set": cfg}], lambda: gemm(x, ws[0]), want,
                                       lambda fn: timer(lambda: [gemm(x, w) for w in ws]) / len(ws), tol=2e-2)
            if ms is None:
                print(f"  M {m} N {n} K {k} {name}: {why}", flush=True)
                continue
            times[name], settings[name] = ms, cfg

    table_name = short(table_cfg)
    run([table_cfg] + tile_candidates(m))
    unsplit = sorted((ms, name) for name, ms in times.items() if settings[name]["SPLIT_K"] == 1)
    run([dict(settings[name], SPLIT_K=s) for _, name in unsplit[:SPLIT_BASES]
         for s in split_ks(settings[name], m, n, k, sms)])
    best_ms, best_name = min((ms, name) for name, ms in times.items())
    best = {key: settings[best_name][key] for key in SETTING_KEYS}   # the table's own setting carries its backend
    return best_ms, best, times.get(table_name, float("nan")), times


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama8b"], choices=sorted(SHAPES))
    ap.add_argument("--buckets", nargs="+", type=int, default=ORDER, choices=BUCKETS[1:],
                    help="row buckets to sweep, in this order")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", nargs="+", default=None, metavar="NxK", help="these [N, K] instead of --models'")
    ap.add_argument("--tiny", action="store_true", help="N / 64, K / 16 (for --device cpu)")
    ap.add_argument("--out", default=None, help="JSON file of every timing")
    ap.add_argument("--write", action="store_true", help="write a rule per swept shape and bucket to this "
                    "device's table")
    ap.add_argument("--config-dir", default=None, help="write the table under this folder instead of the package's")
    ap.add_argument("--margin", type=float, default=0.02, help="Triton must be this much faster (fraction) "
                    "for backend triton")
    args = ap.parse_args(argv)
    prepare(args.device)
    from deepserve.ops.triton import launch_config
    from deepserve.ops.triton._common import sm_count
    from deepserve.ops.triton.gemm import gemm_config

    dev = torch.device(args.device)
    bw, graph_time_ms = bandwidth_and_timer(args.device)
    timer = (lambda fn: graph_time_ms(fn, reps=1)) if args.device == "cuda" else graph_time_ms
    sms, key = sm_count(dev), launch_config.device_key(dev)
    limit = 2 if args.device == "cpu" else None          # the interpreter: the script's logic only
    folder = Path(args.config_dir) if args.config_dir else None
    shapes = sorted({s for name in args.models for s in SHAPES[name]})
    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes]
    if args.tiny:
        shapes = sorted({(max(n // 64, 8), max(k // 16, 64)) for n, k in shapes})
    torch.manual_seed(0)
    weights = {}
    for n, k in shapes:
        copies = 1 if args.device == "cpu" else max(1, min(64, (256 << 20) // (n * k * 2)))
        weights[n, k] = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    rows = []
    for m in args.buckets:
        lo = BUCKETS[BUCKETS.index(m) - 1]
        rules = []
        for n, k in shapes:
            ws = weights[n, k]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            cublas_ms = timer(lambda: [F.linear(x, w) for w in ws]) / len(ws)
            table_cfg = gemm_config(m, n, k, dev)
            best_ms, best, table_ms, times = sweep_bucket(x, ws, table_cfg, sms, timer, limit)
            bound = read_bound_ms(m, n, k, bw)
            row = {"m": m, "n": n, "k": k, "cublas_ms": cublas_ms, "table_ms": table_ms, "table_cfg": table_cfg,
                   "triton_ms": best_ms, "triton_cfg": best, "triton_vs_cublas": cublas_ms / best_ms,
                   "bound_ms": bound, "all_ms": times}
            rows.append(row)
            rules.append(bucket_rule(lo, m, n, k, cublas_ms, best_ms, best, args.margin))
            print(f"M {m:>6} N {n:>6} K {k:>6}: cuBLAS {1e3 * cublas_ms:9.1f} us ({bound / cublas_ms:4.0%}), "
                  f"table {1e3 * table_ms:9.1f} us, Triton {1e3 * best_ms:9.1f} us ({bound / best_ms:4.0%}) "
                  f"{short(best)}: {row['triton_vs_cublas']:.2f}x -> {rules[-1]['set']['backend']}", flush=True)
        if args.write:
            path = launch_config.save_rules("gemm", key, rules, folder)
            print(f"wrote {len(rules)} rules (M in ({lo}, {m}]) to {path}", flush=True)
    print(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s; % = weight-read bound / time\n")
    print("| N x K | M | cuBLAS us (%) | table us | best Triton us (%) | Triton / cuBLAS speed | best setting |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in sorted(rows, key=lambda r: (r["n"], r["k"], r["m"])):
        pct = lambda ms: f"{1e3 * ms:.1f} ({r['bound_ms'] / ms:.0%})"  # noqa: E731
        print(f"| {r['n']}x{r['k']} | {r['m']} | {pct(r['cublas_ms'])} | {1e3 * r['table_ms']:.1f} | "
              f"{pct(r['triton_ms'])} | {r['triton_vs_cublas']:.2f}x | {short(r['triton_cfg'])} |")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "device_key": key, "copy_bytes_per_s": bw,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

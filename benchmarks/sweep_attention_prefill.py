"""Launch-setting sweep of the varlen paged prefill attention kernel (ops/triton/attention_prefill.py).

    python benchmarks/sweep_attention_prefill.py [--write]       # GPU
    python benchmarks/sweep_attention_prefill.py --device cpu --tiny   # the script's logic, interpreted

Cases (bf16, one sequence prefilled whole, as bench_ops' prefill rows): GQA 32/8 heads x 128
(the 8B) and MLA's expanded prefill, 16 heads with 192-wide keys and 128-wide values
(V2-Lite); both read the `attention_prefill` table's 16-bit rule (`mla` there is the absorbed
latent's 576/512-wide heads, which decode runs). Each candidate (BLOCK_M, BLOCK_N, warps,
stages) is appended to the table for the run (`launch_config.trying`), checked against the
torch reference, then timed as CUDA-graph replays; FLOP/s count the causal half of QK^T and
PV. `--write` adds the candidate with the least time over both cases to the running device's
table (deepserve/ops/triton/configs/attention_prefill/<device>.json, or under --config-dir).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from sweep_setup import bandwidth_and_timer, prepare, try_setting  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages), the current default first
TILES = [(128, 64, 8, 2), (128, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 8, 3),
         (128, 128, 8, 2), (64, 32, 4, 2)]
TINY_TILES = [(16, 16, 4, 1), (32, 16, 4, 1), (16, 32, 4, 1)]
# name: (heads, kv heads, key dim, value dim, page size)
CASES = {"prefill_gqa": (32, 8, 128, 128, 16), "prefill_mla_expanded": (16, 16, 192, 128, 64)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu runs the kernels under TRITON_INTERPRET=1 (a logic check, not a timing)")
    ap.add_argument("--tiny", action="store_true", help="32 tokens and 16-row tiles: for --device cpu")
    ap.add_argument("--seq", type=int, default=8192, help="tokens prefilled (default 8192)")
    ap.add_argument("--write", action="store_true", help="add the best setting to the device's launch table")
    ap.add_argument("--config-dir", default=None, help="write the table under this folder instead of the package's")
    args = ap.parse_args()
    prepare(args.device)                     # before any kernel module is imported
    from deepserve.ops.registry import resolve
    from deepserve.ops.triton import launch_config
    from tests.ops.paged_batch import make_paged_batch

    began = time.perf_counter()
    _, timer = bandwidth_and_timer(args.device)
    seq = 32 if args.tiny else args.seq
    tiles = TINY_TILES if args.tiny else TILES
    torch_op, tri = resolve("paged_attention", "torch")[1], resolve("paged_attention", "triton")[1]
    totals: dict = {None: 0.0, **{t: 0.0 for t in tiles}}
    for name, (heads, kv_heads, d, dv, page) in CASES.items():
        pb = make_paged_batch([seq], [seq], heads, kv_heads, d, dv, block_size=page, dtype=torch.bfloat16,
                              device=args.device)
        call_args = pb.args(d ** -0.5)
        want = torch_op(*call_args).float()
        flops = 2 * heads * (d + dv) * seq * seq / 2
        for tile in totals:
            rules = [] if tile is None else [{"set": dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
                                                             tile))}]
            label = "default" if tile is None else "m{} n{} w{} s{}".format(*tile)
            ms, err, why = try_setting("attention_prefill", rules, lambda: tri(*call_args), want, timer)
            if ms is None:
                print(f"{name:22s} {label:18s} {why}", flush=True)
                totals[tile] = float("inf")
                continue
            totals[tile] += ms
            print(f"{name:22s} {label:18s} {ms:10.3f} ms {flops / (ms * 1e-3) / 1e12:8.1f} TFLOP/s "
                  f"(max err {err:.2g})", flush=True)
    best = min(totals, key=totals.get)
    print(f"\nleast total time: {'default' if best is None else best} ({totals[best]:.3f} ms; default "
          f"{totals[None]:.3f} ms)")
    if args.write and best is not None:
        rule = {"if": {"mla": False, "fp32": False},
                "set": dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), best))}
        path = launch_config.save_rules("attention_prefill", launch_config.device_key(torch.device(args.device)),
                                        [rule], Path(args.config_dir) if args.config_dir else None)
        print(f"wrote 1 rule to {path}")
    print(f"sweep took {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch-1 projections: cuBLAS (F.linear) vs the Triton GEMV kernel and its launch settings.

    python benchmarks/sweep_gemv.py [--quick]            # GPU
    python benchmarks/sweep_gemv.py --device cpu --tiny  # the script's logic, interpreted

Every bf16 weight shape a batch-1 decode step of r1-distill-llama-8b, deepseek-v2-lite and
deepseek-r1 multiplies by one token (q/k/v, o, MLP, MLA down/up projections, router, lm_head).
Each shape is timed as CUDA-graph replays of one call per weight copy, with enough copies
(>= 256 MB in all) that the weight comes from HBM and not from the 50 MB L2, as in a decode
step. Each Triton candidate is checked against F.linear first (a wrong one prints WRONG).
Bandwidth is the weight bytes read once over the time, against a 2 GiB device-to-device
copy measured first. The last table gives, per shape, cuBLAS, the kernel's default setting
(`gemv.gemv_config`, from the launch table) and the best candidate. `--write` adds each shape's
best setting to the running device's table (deepserve/ops/triton/configs/gemv/<device>.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from sweep_setup import bandwidth_and_timer, prepare  # noqa: E402

# (model, projection, N, K): output features x input features
SHAPES = [
    ("8b", "qkv", 6144, 4096), ("8b", "o_proj", 4096, 4096), ("8b", "gate_up", 28672, 4096),
    ("8b", "down", 4096, 14336), ("8b", "lm_head", 128256, 4096),
    ("v2lite", "q_proj", 3072, 2048), ("v2lite", "kv_a", 576, 2048), ("v2lite", "o_proj", 2048, 2048),
    ("v2lite", "shared_gate_up", 5632, 2048), ("v2lite", "shared_down", 2048, 2816),
    ("v2lite", "dense_gate_up", 21888, 2048), ("v2lite", "dense_down", 2048, 10944),
    ("v2lite", "router", 64, 2048), ("v2lite", "lm_head", 102400, 2048),
    ("r1", "q_a", 1536, 7168), ("r1", "kv_a", 576, 7168), ("r1", "q_b", 24576, 1536),
    ("r1", "o_proj", 7168, 16384),
]
BLOCK_NS, BLOCK_KS, WARPS = (1, 2, 4, 8, 16, 32), (256, 512, 1024), (4, 8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="BLOCK_K 512 only, 4 warps")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="shapes / 64 (for --device cpu)")
    ap.add_argument("--only", default="", help="comma-separated model names (8b,v2lite,r1)")
    ap.add_argument("--out", default="", help="JSON file for every timing (shape -> setting -> us)")
    ap.add_argument("--write", action="store_true", help="add each shape's best setting to the device's launch table")
    ap.add_argument("--config-dir", default=None, help="write the table under this folder instead of the package's")
    args = ap.parse_args()
    prepare(args.device)
    from deepserve.ops.triton import gemv as gemv_mod
    from deepserve.ops.triton import launch_config

    dev = args.device
    bw, graph_time_ms = bandwidth_and_timer(dev)
    grid = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w) for n in BLOCK_NS for k in BLOCK_KS for w in WARPS
            if not args.quick or (k == 512 and w == 4)]
    if dev == "cpu":
        grid = grid[:4]
    only = [s for s in args.only.split(",") if s]
    rows, every, best_rules = [], {}, []
    torch.manual_seed(0)
    for model, proj, n, k in SHAPES:
        if only and model not in only:
            continue
        if args.tiny:
            n, k = max(n // 64, 4), max(k // 64, 64)
        nbytes = n * k * 2
        copies = 1 if dev == "cpu" else max(1, min(64, (256 << 20) // nbytes))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        want = F.linear(x.float(), ws[0].float())

        def timed(fn):
            return graph_time_ms(lambda: [fn(w) for w in ws], reps=1) / copies

        us_cublas = timed(lambda w: F.linear(x, w)) * 1e3
        results, settings = {"cublas": us_cublas}, {}
        for cfg in [None] + grid:
            name = "default" if cfg is None else f"n{cfg['BLOCK_N']} k{cfg['BLOCK_K']} w{cfg['num_warps']}"
            with launch_config.trying("gemv", [{"set": cfg}] if cfg else []):
                try:
                    got = gemv_mod.gemv(x, ws[0])
                except Exception as exc:  # noqa: BLE001  (resources, compiler errors: report, go on)
                    print(f"{model} {proj} {name}: failed: {type(exc).__name__}", flush=True)
                    continue
                if not torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2):
                    print(f"{model} {proj} {name}: WRONG, max err {(got.float() - want).abs().max():.3g}")
                    continue
                results[name] = timed(lambda w: gemv_mod.gemv(x, w)) * 1e3
                settings[name] = cfg
        best = min((v, s) for s, v in results.items() if s not in ("cublas", "default"))
        if best[0] < results.get("default", float("inf")):   # the table's setting kept where it wins
            best_rules.append({"if": {"n": n, "k": k}, "set": settings[best[1]]})
        frac = lambda us: nbytes / (us * 1e-6) / bw  # noqa: E731
        default_cfg = gemv_mod.gemv_config(n, k, x.device)
        rows.append((model, proj, n, k, nbytes, us_cublas, results.get("default"), default_cfg, best))
        every[f"{model} {proj} {n}x{k}"] = results
        print(f"{model:7s} {proj:15s} {n}x{k}: cublas {us_cublas:7.1f} us ({frac(us_cublas):.0%}), "
              f"default {results.get('default', float('nan')):7.1f} us, best {best[1]} {best[0]:.1f} us "
              f"({frac(best[0]):.0%})", flush=True)
    print("\n| model | projection | N x K | MB | cuBLAS us (% copy) | Triton default us (% copy) | best setting | best us (% copy) |")
    print("|---|---|---|---:|---:|---:|---|---:|")
    for model, proj, n, k, nbytes, cub, dft, dcfg, (bus, bname) in rows:
        pct = lambda us: f"{us:.1f} ({nbytes / (us * 1e-6) / bw:.0%})" if us else "-"  # noqa: E731
        print(f"| {model} | {proj} | {n}x{k} | {nbytes / 1e6:.1f} | {pct(cub)} | {pct(dft)} "
              f"(n{dcfg['BLOCK_N']} k{dcfg['BLOCK_K']} w{dcfg['num_warps']}) | {bname} | {pct(bus)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                                              "copy_bytes_per_s": bw, "us": every}, indent=1))
    if args.write:
        path = launch_config.save_rules("gemv", launch_config.device_key(torch.device(dev)), best_rules,
                                        Path(args.config_dir) if args.config_dir else None)
        print(f"wrote {len(best_rules)} rules to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

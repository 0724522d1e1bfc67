"""Launch settings of the small-batch fused MoE (routed + shared experts, two kernels) at batch 1.

    python benchmarks/sweep_moe_small.py            # GPU
    python benchmarks/sweep_moe_small.py --device cpu --tiny   # the script's logic, interpreted
    python benchmarks/sweep_moe_small.py --fp8      # R1 with fp8 block weights (routed + shared)

Cases (bf16, one token): V2-Lite (D 2048, I 1408, 64 experts, top-6, shared Is 2816) and R1
(D 7168, I 2048, 256 experts, top-8, shared Is 2048). Each candidate setting of one kernel
(tried through `launch_config.trying`, the other kernel at its default) is checked against the
default's output, then timed as CUDA-graph replays over 4 layers' worth of weights with
fresh random routing per layer (so neither routed nor shared weights come from L2).
Bandwidth: the routed experts' and the shared expert's bytes over the time, against a 2 GiB
device-to-device copy (bytes read + written) measured first. `--write` adds each case's best
setting per kernel to the running device's table (deepserve/ops/triton/configs/fused_moe_small/).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from sweep_setup import bandwidth_and_timer, prepare  # noqa: E402

CASES = {"v2lite": (2048, 1408, 64, 6, 2816), "r1": (7168, 2048, 256, 8, 2048)}
GATE_UP = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w) for n in (4, 8, 16, 32) for k in (256, 512, 1024) for w in (4, 8)]
# the defaults' tiles with their K loop software-pipelined 2 or 3 deep
STAGES = [dict(LOOP_STAGES=s) for s in (2, 3)]
# the down kernel with every slot in one step (both cases' shared experts are whole pieces of I)
DOWN_SLOTS = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w) for n in (1, 2, 4, 8) for k in (128, 256, 512) for w in (4, 8)]
LAYERS = 2          # each call reads >= 138 MB, well over the 50 MB L2; R1 x 4 did not fit in 80 GB
# R1 with fp8 block weights (`--fp8`; its fp8 shared expert rides in the same launches, as in the
# model): gate_up and down rows x K step (whole 128-wide scale blocks) x warps, then K-loop
# depths; then the down kernel with every slot in one step (16 slots: 8 routed + 1 shared, padded)
FP8_GRIDS = {
    "gate_up": [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w) for n in (8, 16, 32) for k in (128, 256, 512) for w in (4, 8)]
    + [dict(LOOP_STAGES=s) for s in (2, 4)],
    "down": [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w) for n in (4, 8, 16) for k in (256, 512, 1024) for w in (4, 8)]
    + [dict(LOOP_STAGES=s) for s in (2, 3)],
    "down_slots": [dict(ALL_SLOTS=True, BLOCK_N=n, BLOCK_K=k, num_warps=w)
                   for n in (1, 2, 4, 8) for k in (128, 256, 512) for w in (4, 8)],
}
# both fp8 kernels on the tensor cores (fused_moe_small_mma.py, W8A8): weight rows a program x
# warps x cp.async depth, the activations quantised in a launch before (QUANT_IN 0: ~1-3
# instructions a weight byte in the sm_90 SASS), and once inside (QUANT_IN 1: 3-10)
MMA = [dict(MMA=1, BLOCK_N=n, num_warps=w, num_stages=s, QUANT_IN=0) for n in (64, 128) for w in (4, 8)
       for s in (3, 4)] + [dict(MMA=1, BLOCK_N=128, num_warps=4, num_stages=3, QUANT_IN=1)]
FP8_GRIDS["gate_up"] += MMA
# the down kernel also with two 128-groups a step (more bytes in flight for its T x D/BLOCK_N programs)
FP8_GRIDS["down"] += MMA + [dict(MMA=1, BLOCK_N=n, num_warps=4, num_stages=s, QUANT_IN=0, GROUPS=2)
                            for n in (64, 128) for s in (3, 4)]
# both kernels on the tensor cores at once, gate_up's 128-row programs quantising act for the
# down kernel on their way out (no act_quant_fp8 launch between: only this pairing times that)
PAIR = "gate_up+down"
FP8_GRIDS[PAIR] = [{"gate_up": dict(MMA=1, BLOCK_N=128, num_warps=4, num_stages=s, QUANT_IN=0),
                    "down": dict(MMA=1, BLOCK_N=n, num_warps=4, num_stages=s, QUANT_IN=0, GROUPS=groups)}
                   for s in (3, 4) for n, groups in ((64, 1), (64, 2), (128, 1))]
# W8A8 differs from the W8A16 default by the activations' e4m3 rounding (~4% relative, as the
# sorted path): checked by the relative norm of the difference instead (test_moe_small_mma.py)
W8A8_REL = 6e-2


def steady_us(time_us, tries: int = 3) -> float:
    """The fastest of `tries` timings of the default: the first replays after the weights are
    built can run before the GPU is at its clocks, which would flatter every candidate
    against it (docs/PERFORMANCE.md, the H200 sweep of session 13)."""
    return min(time_us() for _ in range(tries))


def per_kernel_settings(kernel: str, cfg: dict) -> dict[str, dict]:
    """{kernel: settings} of one candidate: a PAIR candidate holds both kernels' settings."""
    return cfg if kernel == PAIR else {kernel: cfg}


def best_setting(kernel: str, grid: list[dict], run_all, want: torch.Tensor, time_us, show, base_us: float,
                 atol: float) -> tuple[float, str, dict | None]:
    """Time each setting of `kernel` in grid (tried over the launch table) after checking its
    output against `want`; print each as `show(us)`; return (us, label, setting) of the fastest,
    the default (base_us, setting None) included. A setting that is wrong or does not build is
    reported, skipped."""
    from deepserve.ops.triton.launch_config import trying
    best = (base_us, "default", None)
    for cfg in grid:
        per_kernel = per_kernel_settings(kernel, cfg)
        label = " | ".join(" ".join(f"{key}={v}" for key, v in c.items()) for c in per_kernel.values())
        with trying("fused_moe_small", [{"if": {"kernel": k}, "set": c} for k, c in per_kernel.items()]):
            try:
                got = run_all()[0].float()
                rel = ((got - want).norm() / want.norm()).item()
                mma = any(c.get("MMA") for c in per_kernel.values())
                if not (rel < W8A8_REL if mma else torch.allclose(got, want, rtol=2e-2, atol=atol)):
                    print(f"  {kernel} {label}: WRONG ({(got - want).abs().max():.3g}, {rel:.3g} relative)")
                    continue
                us = time_us()
            except Exception as exc:  # noqa: BLE001  (resources, compiler errors: report, go on)
                print(f"  {kernel} {label}: failed: {type(exc).__name__}")
                continue
        print(f"  {kernel} {label}: {show(us)}", flush=True)
        if us < best[0]:
            best = (us, label, cfg)
    return best


def write_best(rules: list[dict], dev: str, config_dir: str | None) -> None:
    """Add the sweep's best settings to the running device's launch table."""
    from deepserve.ops.triton import launch_config
    path = launch_config.save_rules("fused_moe_small", launch_config.device_key(torch.device(dev)), rules,
                                    Path(config_dir) if config_dir else None)
    print(f"wrote {len(rules)} rules to {path}")


def sweep_fp8(fms, dev: str, bw: float, graph_time_ms, tiny: bool, kernels: list[str]) -> list[dict]:
    """R1's routed and shared experts in fp8 at batch 1: each kernel's candidates against the default."""
    d, inter, e, k, _ = CASES["r1"]
    if tiny:
        d, inter, e = 512, 256, 16
    g = torch.Generator(device=dev).manual_seed(0)
    layers = LAYERS if dev == "cuda" else 1

    def fp8_experts(rows: int, cols: int) -> torch.Tensor:   # one expert at a time: no fp32 copy of all
        w = torch.empty(e, rows, cols, device=dev, dtype=torch.float8_e4m3fn)
        for i in range(e):
            w[i] = (torch.randn(rows, cols, generator=g, device=dev) * 0.5).to(torch.float8_e4m3fn)
        return w

    def layer():
        w13, w2 = fp8_experts(2 * inter, d), fp8_experts(d, inter)
        s13 = torch.rand(e, 2 * inter // 128, d // 128, generator=g, device=dev) / 64 + 0.005
        s2 = torch.rand(e, d // 128, inter // 128, generator=g, device=dev) / 64 + 0.005
        # the shared expert (Is = I) in Fp8BlockLinear's layout: one scale per row and 128 columns
        shared = dict(shared_w13=fp8_experts(2 * inter, d)[0], shared_w2=fp8_experts(d, inter)[0],
                      shared_w13_scale=torch.rand(2 * inter, d // 128, generator=g, device=dev) / 64 + 0.005,
                      shared_w2_scale=torch.rand(d, inter // 128, generator=g, device=dev) / 64 + 0.005)
        return w13, w2, s13, s2, shared

    if dev == "cpu":
        # the interpreter rounds some values of act_quant_fp8's e4m3 cast wrong; the torch
        # quantisation gives what the kernel gives on a GPU
        from deepserve.ops.quant import quant_fp8_per_token_group
        from deepserve.ops.triton import fused_moe_small_mma
        fused_moe_small_mma.act_quant_fp8 = quant_fp8_per_token_group
    ws = [layer() for _ in range(layers)]
    x = torch.randn(1, d, generator=g, device=dev, dtype=torch.bfloat16)
    routes = [torch.randperm(e, generator=g, device=dev)[:k][None].to(torch.int32) for _ in range(layers)]
    tw = torch.softmax(torch.randn(1, k, generator=g, device=dev), -1)
    nbytes = (k + 1) * 3 * inter * d                # one byte a weight (scales: 1/16384 of that)

    def run_all():
        return [fms.fused_moe_small(x, w13, w2, tw, ids, w13_scale=s13, w2_scale=s2, **shared)
                for (w13, w2, s13, s2, shared), ids in zip(ws, routes)]

    want = run_all()[0].float()
    base_us = steady_us(lambda: graph_time_ms(run_all, reps=1) / layers * 1e3)
    pct = lambda t: f"{t:.1f} us ({nbytes / (t * 1e-6) / bw:.0%} of copy)"  # noqa: E731
    print(f"r1 fp8: default {pct(base_us)}, {nbytes / 1e6:.0f} MB", flush=True)
    rows = []
    for kernel, grid in ((k, FP8_GRIDS[k]) for k in kernels):
        # on the CPU, the script's logic: two candidates and a tensor-core one
        tried = grid if dev == "cuda" else grid[:1] if kernel == PAIR else (
            grid[:2] + [cfg for cfg in grid if cfg.get("MMA")][:1])
        best = best_setting(kernel, tried, run_all, want,
                            lambda: graph_time_ms(run_all, reps=1) / layers * 1e3, pct, base_us,
                            2e-2 * want.abs().max().item())
        rows.append((kernel, best))
    print("\n| case | kernel varied | default | best setting | best |\n|---|---|---:|---|---:|")
    for kernel, (us, label, _) in rows:
        print(f"| r1 fp8 | {kernel} | {pct(base_us)} | {label} | {pct(us)} |")
    found = {kernel: best for kernel, best in rows if best[2]}
    if PAIR in found:
        # the pair replaces the two kernels' own winners only where it beats them taken together
        # (each saving measured alone, added)
        alone = base_us - sum(base_us - found[k][0] for k in PAIR.split("+") if k in found)
        keep = found[PAIR][0] < alone
        print(f"{PAIR}: {found[PAIR][0]:.1f} us against {alone:.1f} us for the two kernels' winners apart: "
              f"{'writing the pair' if keep else 'not writing it'}")
        found = {k: v for k, v in found.items() if (k == PAIR) == keep or k not in (PAIR, *PAIR.split("+"))}
    return [{"if": {"kernel": k, "fp8": True, "inter": inter}, "set": c}
            for kernel, (_, _, cfg) in found.items() for k, c in per_kernel_settings(kernel, cfg).items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="shapes / 16 (for --device cpu)")
    ap.add_argument("--kernels", default=None,
                    help="which kernels' settings to vary (default gate_up,down_slots; with --fp8 gate_up,down,down_slots)")
    ap.add_argument("--fp8", action="store_true", help="R1 with fp8 block weights instead (FP8_GRIDS)")
    ap.add_argument("--write", action="store_true", help="add the best settings to the device's launch table")
    ap.add_argument("--config-dir", default=None, help="write the table under this folder instead of the package's")
    args = ap.parse_args()
    prepare(args.device)
    from deepserve.ops.triton import fused_moe_small as fms

    dev = args.device
    bw, graph_time_ms = bandwidth_and_timer(dev)
    if args.fp8:
        kernels = (args.kernels or ",".join(FP8_GRIDS)).split(",")
        unknown = sorted(set(kernels) - set(FP8_GRIDS))
        if unknown:
            ap.error(f"--fp8 --kernels: unknown {unknown}; choices: {', '.join(FP8_GRIDS)}")
        rules = sweep_fp8(fms, dev, bw, graph_time_ms, args.tiny, kernels)
        if args.write:
            write_best(rules, dev, args.config_dir)
        return 0
    layers = LAYERS if dev == "cuda" else 1
    g = torch.Generator(device=dev).manual_seed(0)
    summary, rules = [], []
    for name, (d, inter, e, k, s_inter) in CASES.items():
        if args.tiny:
            d, inter, e, s_inter = d // 16, inter // 16, max(e // 8, k + 1), s_inter // 16
        rn = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=torch.bfloat16) * 0.02  # noqa: E731
        ws = [(rn(e, 2 * inter, d), rn(e, d, inter), rn(2 * s_inter, d), rn(d, s_inter)) for _ in range(layers)]
        x = rn(1, d) * 50
        routes = [torch.randperm(e, generator=g, device=dev)[:k][None] for _ in range(layers)]
        tw = torch.softmax(torch.randn(1, k, generator=g, device=dev), -1)
        nbytes = (k * 3 * inter * d + 3 * s_inter * d) * 2

        def run_all():
            return [fms.fused_moe_small(x, w13, w2, tw, ids, shared_w13=s13, shared_w2=s2)
                    for (w13, w2, s13, s2), ids in zip(ws, routes)]

        want = run_all()[0].float()
        base_us = steady_us(lambda: graph_time_ms(run_all, reps=1) / layers * 1e3)
        print(f"{name}: default {base_us:.1f} us ({nbytes / (base_us * 1e-6) / bw:.0%} of copy), "
              f"{nbytes / 1e6:.0f} MB")
        # the down kernel's slot-by-slot loop (the form before the all-slots step)
        from deepserve.ops.triton.launch_config import trying
        with trying("fused_moe_small", [{"if": {"kernel": "down_slots"}, "set": {"ALL_SLOTS": False}}]):
            loop_us = graph_time_ms(run_all, reps=1) / layers * 1e3
            ok = torch.allclose(run_all()[0].float(), want, rtol=2e-2, atol=2e-3)
        print(f"  down slot by slot: {loop_us:.1f} us ({nbytes / (loop_us * 1e-6) / bw:.0%}){'' if ok else ' WRONG'}")
        summary.append((name, "down slot by slot", base_us, (loop_us, "slot-by-slot loop", None)))
        grids = {"gate_up": GATE_UP, "down_slots": DOWN_SLOTS, "gate_up_stages": STAGES, "down_slots_stages": STAGES}
        for grid_name, grid in ((k, grids[k]) for k in (args.kernels or "gate_up,down_slots").split(",") if k):
            kernel = grid_name.removesuffix("_stages")
            best = best_setting(kernel, grid if dev == "cuda" else grid[:2], run_all, want,
                                lambda: graph_time_ms(run_all, reps=1) / layers * 1e3,
                                lambda us: f"{us:.1f} us ({nbytes / (us * 1e-6) / bw:.0%})", base_us, 2e-3)
            summary.append((name, kernel, base_us, best))
            if best[2]:
                rules.append({"if": {"kernel": kernel, "fp8": False, "inter": inter}, "set": best[2]})
    print("\n| case | kernel varied | default us (% copy) | best setting | best us (% copy) |")
    print("|---|---|---:|---|---:|")
    for name, kernel, base_us, (us, label, _) in summary:
        d, inter, e, k, s_inter = CASES[name]
        nbytes = (k * 3 * inter * d + 3 * s_inter * d) * 2
        pct = lambda t: f"{t:.1f} ({nbytes / (t * 1e-6) / bw:.0%})"  # noqa: E731
        print(f"| {name} | {kernel} | {pct(base_us)} | {label} | {pct(us)} |")
    if args.write:
        write_best(rules, dev, args.config_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Launch settings of the sorted fused MoE (grouped GEMM over tokens sorted by expert) in its two
regimes, written to the running device's table (deepserve/ops/triton/configs/fused_moe/).

Compute-bound (the default mode): R1's experts (D 7168, I 2048, 256 experts, top-8) at 8192
tokens, 256 rows per expert on average.

    python benchmarks/sweep_fused_moe.py                       # GPU
    python benchmarks/sweep_fused_moe.py --device cpu --tiny   # the script's logic, interpreted

Printed first: the bf16 matmul rate (8192^3) and, as the ceiling a grouped GEMM could reach at
these shapes, cuBLAS batched GEMMs (torch.bmm) with exactly 256 rows for every expert (no
gather, no padding, no routing imbalance). Then each candidate (BLOCK_M, PREQUANT, W_TMA and
each kernel's BLOCK_N / BLOCK_K / GROUP_M / warps / stages, tried over the launch table) is
checked against the default's output and timed as CUDA-graph replays of the whole op (sort,
both GEMMs, the sum over slots). Rate: 2 * tokens * top_k * 3 * D * I FLOPs over the time.
Last, the per-kernel times of the default and the best candidate (torch.profiler), and a
table. `--write` adds each dtype's best candidate to the running device's table, for this many
rows per expert and more.

Memory-bound decode (`--decode`): fewer than 48 rows per expert (where the default table's
small-block rules hold), nearly every expert hit, so the op streams the experts' weights once.

    python benchmarks/sweep_fused_moe.py --decode --shape v2lite                   # 16-256 tokens, bf16
    python benchmarks/sweep_fused_moe.py --decode --shape r1 --dtypes fp8 --tokens 32,128,512
    python benchmarks/sweep_fused_moe.py --decode --device cpu --tiny              # interpreted

Each token count runs four stages, each on top of the best so far: vLLM's tiles for the shape
(`vllm_tiles`), the gate_up kernel's tiles, down's, then op-wide settings (BLOCK_M, GROUP_M,
W_TMA, fp8 PREQUANT). Each candidate is checked against the table's output (allclose) and timed
as CUDA-graph replays. Rate: the bytes of the experts hit (distinct expert ids) plus the
activations in and out, over the bandwidth of a 2 GiB device copy measured in the same run. The
table's and the best settings are then timed alternately to confirm the gain. `--budget`
seconds (from the start) share out among the token counts; a count that runs out keeps the best
it measured. `--write` adds, per dtype and token count whose confirmed best beats the table by
`--min-gain`, its whole settings as rules for the rows per expert around that count
(launch_config.range_conditions, all below 48) and this I only (the shape variable `inter`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from sweep_setup import bandwidth_and_timer, prepare, try_setting  # noqa: E402

BEGAN = time.perf_counter()
OLD_ORDER = {"GROUP_M": 1 << 20}      # row blocks fastest: the launch order before GROUP_M
SHAPES = {"r1": (7168, 2048, 256, 8), "v2lite": (2048, 1408, 64, 6)}     # D, I, experts, top-k
TINY = {"compute": (256, 128, 8, 8), "decode": (128, 128, 8, 2)}
DECODE_TOKENS = {"r1": "32,64,128,256,512", "v2lite": "16,32,64,128,256", "tiny": "8,16"}
DECODE_LIMIT = 48     # rows per expert: the default table's small-block rules hold up to here

# (BLOCK_N, BLOCK_K, num_warps, num_stages) of one kernel where the op streams weights: narrow
# to wide column tiles with K steps long enough to keep bytes in flight. gate_up's BLOCK_N
# counts gate and up columns each (a program reads 2 x BLOCK_N weight rows). fp8: K steps of
# one 128-wide scale block.
DECODE_TILES = {
    "gate_up": [(32, 128, 4, 4), (64, 128, 4, 4), (32, 256, 4, 3), (32, 128, 2, 4), (64, 128, 4, 3),
                (64, 128, 8, 5), (64, 256, 8, 2), (128, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3)],
    "down": [(64, 128, 4, 4), (128, 128, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 64, 2, 5),
             (64, 256, 4, 2), (128, 64, 4, 4), (128, 128, 8, 4), (256, 64, 8, 3), (256, 128, 8, 3)],
}
DECODE_TILES_FP8 = {
    "gate_up": [(32, 128, 4, 4), (64, 128, 4, 4), (32, 128, 4, 5), (64, 128, 4, 3), (64, 128, 8, 4),
                (128, 128, 4, 3), (128, 128, 8, 4), (256, 128, 8, 3)],
    "down": [(64, 128, 4, 4), (128, 128, 4, 3), (32, 128, 4, 4), (64, 128, 4, 5), (128, 128, 8, 4),
             (256, 128, 8, 3), (256, 128, 4, 4)],
}
# vLLM's fused-MoE tiles (BLOCK_SIZE_M, _N, _K, GROUP_SIZE_M, num_warps, num_stages) by batch
# size M (vLLM takes the listed M nearest the batch) from its tuned files nearest these shapes.
# None ships for V2-Lite (E=64, N=1408) on the H100 or H200, nor for R1's unsharded experts
# (E=256, N=2048): there vLLM runs its get_default_config (vllm_tiles).
VLLM_FILES = {
    ("v2lite", "bf16"): {
        "vLLM E=64,N=1408 B200": {
            16: (16, 128, 128, 16, 4, 3), 24: (16, 128, 128, 1, 8, 4), 32: (16, 128, 128, 1, 8, 4),
            48: (16, 64, 128, 1, 4, 2), 64: (16, 64, 128, 1, 4, 2), 96: (16, 128, 128, 1, 4, 3),
            128: (32, 256, 128, 1, 8, 4), 256: (64, 256, 64, 1, 8, 5)},
        # the exact shape tuned on an H100 in a fork (zyongye/vllm), not in vLLM's tree
        "vLLM fork E=64,N=1408 H100": {
            16: (16, 32, 256, 16, 4, 2), 24: (16, 32, 256, 64, 4, 4), 32: (16, 32, 128, 1, 4, 5),
            48: (16, 64, 128, 1, 4, 3), 64: (16, 128, 128, 1, 8, 4), 96: (16, 256, 128, 32, 4, 2),
            128: (32, 128, 128, 1, 8, 3), 256: (64, 128, 64, 1, 4, 3)},
        "vLLM E=64,N=1280 H200": {
            16: (16, 64, 128, 16, 4, 2), 24: (16, 128, 256, 32, 4, 2), 32: (16, 128, 128, 1, 4, 4),
            48: (16, 128, 128, 32, 8, 3), 64: (16, 128, 128, 1, 8, 3), 96: (32, 128, 128, 1, 4, 3),
            128: (32, 128, 128, 1, 4, 3), 256: (64, 64, 64, 1, 4, 3)},
    },
    ("r1", "fp8"): {
        "vLLM E=256,N=256 H200 fp8 (R1 at TP8)": {
            16: (16, 128, 128, 16, 4, 3), 24: (16, 128, 128, 16, 4, 4), 32: (16, 128, 128, 16, 4, 5),
            48: (16, 128, 128, 64, 4, 3), 64: (16, 128, 128, 64, 4, 3), 96: (16, 128, 128, 16, 4, 3),
            128: (16, 128, 128, 32, 4, 3), 256: (16, 128, 128, 32, 4, 3), 512: (16, 128, 128, 16, 4, 3)},
    },
}


def kernel(n, k, w, s, **extra):
    return dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s, **extra)


def candidates(dtype: str) -> list[dict]:
    """Settings around the defaults of `fused_moe.sorted_tiles` at 256 rows per expert (bf16:
    128-row blocks; fp8: 64-row blocks), and the forms they replaced (weights read by pointers,
    not TMA; the old launch order; 64-row bf16 blocks; fp8 activations quantised inside the
    GEMMs; fp8 gate_up at 128 columns). `--quick` takes the first two."""
    both = lambda **kw: {"gate_up": dict(kw), "down": dict(kw)}  # noqa: E731
    out = [{"W_TMA": False}, both(**OLD_ORDER)] + [both(GROUP_M=g) for g in (2, 4, 8)]
    if dtype == "bf16":
        out += [{"BLOCK_M": 64, "gate_up": kernel(256, 64, 8, 3), "down": kernel(256, 64, 8, 3)}]
        out += [{"gate_up": kernel(*c)} for c in ((128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 5),
                                                   (64, 64, 4, 4))]
        out += [{"down": kernel(*c)} for c in ((256, 64, 8, 4), (256, 32, 8, 5), (256, 128, 8, 2),
                                                (128, 64, 4, 4))]
    else:
        out += [{"PREQUANT": False}]
        out += [{"gate_up": kernel(*c)} for c in ((128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4),
                                                   (64, 128, 4, 5), (256, 128, 8, 2))]
        out += [{"down": kernel(*c)} for c in ((256, 128, 8, 4), (128, 128, 4, 4), (512, 128, 8, 3),
                                                (256, 128, 4, 3))]
    return out


def as_rules(over: dict | None, when: dict | None = None) -> list[dict]:
    """A candidate ({"BLOCK_M": .., "gate_up": {..}, "down": {..}}) as launch-table rules."""
    when = when or {}
    over = over or {}
    rules = [{"if": dict(when), "set": {k: v for k, v in over.items() if k not in ("gate_up", "down")}}]
    rules += [{"if": dict(when, kernel=k), "set": over[k]} for k in ("gate_up", "down") if k in over]
    return [r if r["if"] else {"set": r["set"]} for r in rules if r["set"]]


def merged(over: dict | None, extra: dict) -> dict:
    """`over` with `extra`'s settings on top (the kernels' settings merged key by key)."""
    out = {key: dict(v) if isinstance(v, dict) else v for key, v in (over or {}).items()}
    for key, v in extra.items():
        out[key] = {**out.get(key, {}), **v} if isinstance(v, dict) else v
    return out


def label(over: dict | None) -> str:
    """A candidate on one short line: "BLOCK_M=32 gate_up(N64 K128 w4 s4) down(N128 G8)"."""
    if not over:
        return "table"
    short = {"BLOCK_N": "N", "BLOCK_K": "K", "num_warps": "w", "num_stages": "s", "GROUP_M": "G"}
    parts = [f"{key}={v}" for key, v in over.items() if not isinstance(v, dict)]
    parts += [f"{key}(" + " ".join(f"{short.get(a, a + '=')}{b}" for a, b in v.items()) + ")"
              for key, v in over.items() if isinstance(v, dict)]
    return " ".join(parts)


def kernel_times(run, reps: int = 3) -> list[tuple[str, float]]:
    """(kernel name, ms per call) over `reps` calls of run, from torch.profiler's CUDA times."""
    from torch.profiler import ProfilerActivity, profile
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3 / reps) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def show_kernels(run, overrides, prefix: str = "") -> None:
    """Print the per-kernel times (the top six, ms per call) of `run` under each (name, override)."""
    from deepserve.ops.triton.launch_config import trying
    for name, over in overrides:
        with trying("fused_moe", as_rules(over)):
            parts = ", ".join(f"{kname[:28]} {ms:.3f}" for kname, ms in kernel_times(run)[:6])
        print(f"  {prefix}{name} kernels (ms): {parts}", flush=True)


def expert_weights(dtype: str, e: int, d: int, inter: int, dev: str, g: torch.Generator) -> tuple[tuple, dict]:
    """Random experts ((w13 [E, 2I, D], w2 [E, D, I]), fused_moe's scale keywords) in `dtype`:
    bf16 at unit output variance, or those cast to e4m3 with unit block scales."""
    w13 = torch.randn(e, 2 * inter, d, generator=g, device=dev, dtype=torch.bfloat16).mul_(d ** -0.5)
    w2 = torch.randn(e, d, inter, generator=g, device=dev, dtype=torch.bfloat16).mul_(inter ** -0.5)
    if dtype != "fp8":
        return (w13, w2), {}
    return (w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn)), dict(
        w13_scale=torch.ones(e, 2 * inter // 128, d // 128, device=dev),
        w2_scale=torch.ones(e, d // 128, inter // 128, device=dev))


def vllm_tiles(shape: str, dtype: str, tokens: int, experts: int) -> dict[str, tuple]:
    """vLLM's tiles at this batch: its default (get_default_config: 16-row blocks while the batch
    is no larger than the expert count; Triton's 4 warps and 3 stages where it sets none), then
    its tuned files' (VLLM_FILES)."""
    if dtype == "fp8":
        tiles = {"vLLM default": (64, 128, 128, 32, 4, 3)}
    else:
        tiles = {"vLLM default": (16, 32, 64, 1, 4, 3) if tokens <= experts else (64, 64, 32, 8, 4, 3)}
    for name, by_m in VLLM_FILES.get((shape, dtype), {}).items():
        tiles[name] = by_m[min(by_m, key=lambda m: abs(m - tokens))]
    return tiles


def from_vllm(bm: int, bn: int, bk: int, group: int, warps: int, stages: int) -> dict:
    """A vLLM tile as a candidate: its BLOCK_SIZE_N spans gate and up columns together, so our
    gate_up kernel (BLOCK_N columns of each) gets half of it; down the same tile."""
    tile = dict(BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages)
    return {"BLOCK_M": bm, "gate_up": dict(tile, BLOCK_N=bn // 2), "down": dict(tile, BLOCK_N=bn)}


def fits(over: dict, d: int, inter: int) -> bool:
    """Whether each kernel's column tile divides its output width (a partial last tile streams
    weight rows it does not use) and its K step is no longer than its K."""
    for name, (n, k) in (("gate_up", (inter, d)), ("down", (d, inter))):
        tile = over.get(name, {})
        if n % tile.get("BLOCK_N", 1) or tile.get("BLOCK_K", 0) > k:
            return False
    return True


def whole_settings(gate_up: dict, down: dict) -> dict:
    """Both kernels' resolved settings (fused_moe.sorted_tiles) as one candidate: the op-wide
    ones (BLOCK_M, PREQUANT, W_TMA: the op reads them from gate_up's) beside each kernel's. What
    the decode sweep writes, so a rule holds the settings measured whatever rules precede it."""
    gate_up, down = dict(gate_up), dict(down)
    opwide = {key: gate_up.pop(key) for key in ("BLOCK_M", "PREQUANT", "W_TMA") if key in gate_up}
    return {**opwide, "gate_up": gate_up, "down": {key: v for key, v in down.items() if key not in opwide}}


def decode_rules(points: list[tuple[float, dict | None]], when: dict) -> list[dict]:
    """Launch-table rules from the decode sweep of one dtype and shape: points (rows per expert,
    the whole settings that won there or None where the table's did), ascending. Each winner
    holds over its share of the per_expert axis (launch_config.range_conditions, all below
    DECODE_LIMIT), under the conditions `when`."""
    from deepserve.ops.triton.launch_config import range_conditions
    ranges = range_conditions("per_expert", [p for p, _ in points], below=DECODE_LIMIT)
    return [rule for (_, won), cond in zip(points, ranges) if won for rule in as_rules(won, {**when, **cond})]


def token_list(text: str) -> list[int]:
    try:
        tokens = sorted({int(t) for t in text.split(",")})
    except ValueError:
        raise SystemExit(f"sweep_fused_moe.py: --tokens takes comma-separated integers, got {text!r}") from None
    if tokens[0] < 1:
        raise SystemExit(f"sweep_fused_moe.py: --tokens must be >= 1, got {text!r}")
    return tokens


def sweep_compute(args, dev: str, d: int, inter: int, e: int, k: int, tokens: int) -> int:
    """The compute-bound sweep (module docstring): each candidate against the table's output."""
    from deepserve.ops.triton import fused_moe as fm
    from deepserve.ops.triton import launch_config

    flops = 2 * tokens * k * 3 * d * inter
    rate = lambda ms, n=flops: n / (ms * 1e-3) / peak  # noqa: E731  (share of the matmul rate)
    if dev == "cuda":
        from bench_ops import graph_time_ms, matmul_flops, time_ms
        peak = matmul_flops()
        print(f"device {torch.cuda.get_device_name()}: bf16 matmul {peak / 1e12:.0f} TFLOP/s")
        rows_e = max(tokens * k // e, 1)   # cuBLAS at the same FLOPs, every expert exactly this many rows
        xe = torch.randn(e, rows_e, d, device=dev, dtype=torch.bfloat16)
        w1 = torch.randn(e, d, 2 * inter, device=dev, dtype=torch.bfloat16)
        he = torch.randn(e, rows_e, inter, device=dev, dtype=torch.bfloat16)
        w2b = torch.randn(e, inter, d, device=dev, dtype=torch.bfloat16)
        t1 = time_ms(lambda: torch.bmm(xe, w1), iters=10)
        t2 = time_ms(lambda: torch.bmm(he, w2b), iters=10)
        print(f"cuBLAS bmm, {rows_e} rows per expert: gate_up {t1:.2f} ms ({rate(t1, flops * 2 / 3):.1%}), "
              f"down {t2:.2f} ms ({rate(t2, flops / 3):.1%}), both {rate(t1 + t2):.1%}")
        del xe, w1, he, w2b
    else:
        from sweep_setup import wall_time_ms as graph_time_ms
        peak = 1e12
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, d, generator=g, device=dev, dtype=torch.bfloat16)
    ids = torch.rand(tokens, e, generator=g, device=dev).topk(k, dim=-1).indices.to(torch.int32)
    tw = torch.rand(tokens, k, generator=g, device=dev)
    rows = []
    for dtype in args.dtypes.split(","):
        args_w, kw = expert_weights(dtype, e, d, inter, dev, g)
        run = lambda: fm.fused_moe(x, *args_w, tw, ids, **kw)  # noqa: E731
        want = run()
        base = graph_time_ms(run, 2)
        print(f"{dtype} default: {base:.2f} ms, {rate(base):.1%} of matmul", flush=True)
        rows.append((dtype, None, base))
        overrides = candidates(dtype)[:2 if args.quick else None]
        for over in overrides:
            with launch_config.trying("fused_moe", as_rules(over)):
                try:
                    got = run()
                    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                    if err > 2e-2:
                        print(f"  {over}: differs from the default (rel {err:.2e}), skipped")
                        continue
                    ms = graph_time_ms(run, 2)
                except Exception as exc:  # noqa: BLE001 - out of shared memory etc.: report, go on
                    print(f"  {over}: {type(exc).__name__}: {str(exc)[:100]}")
                    continue
            rows.append((dtype, over, ms))
            print(f"  {over}: {ms:.2f} ms, {rate(ms):.1%}", flush=True)
        best = min((r for r in rows if r[0] == dtype), key=lambda r: r[2])
        if dev == "cuda":
            show_kernels(run, (("default", None), ("best", best[1])), f"{dtype} ")
        args_w = kw = None                  # this dtype's experts freed before the next's are made
    print("\nbest per dtype:")
    written = []
    for dtype in args.dtypes.split(","):
        base = next(r for r in rows if r[0] == dtype and r[1] is None)
        best = min((r for r in rows if r[0] == dtype), key=lambda r: r[2])
        print(f"| {dtype} | default {base[2]:.2f} ms ({rate(base[2]):.1%}) | best {best[1] or 'default'} "
              f"| {best[2]:.2f} ms | {rate(best[2]):.1%} of matmul |")
        if best[1]:
            fp8 = dtype == "fp8"
            when = {"fp8": fp8, "elem_bytes": 1 if fp8 else 2, "per_expert_ge": tokens * k / e}
            written += as_rules(best[1], when)
    if args.write:
        path = launch_config.save_rules("fused_moe", launch_config.device_key(torch.device(dev)), written,
                                        Path(args.config_dir) if args.config_dir else None)
        print(f"wrote {len(written)} rules to {path}")
    return 0


def decode_stages(vllm: dict[str, tuple], tiles: dict[str, list], fp8: bool, block_m, fit, grid) -> list:
    """The decode sweep's stages, each a function of the best override so far that gives (name,
    candidate) pairs on top of it: vLLM's tiles (`vllm_tiles`), the gate_up kernel's `tiles`,
    down's, then op-wide settings (the other BLOCK_M, pointer loads, GROUP_M 8, fp8 rows
    quantised beforehand). block_m(over): the BLOCK_M an override runs; fit(over): whether its
    tiles fit the shape; grid(pairs): which of a stage's fitting candidates to try."""
    def stage(make):
        return lambda best: grid([(name, merged(best, o)) for name, o in make(best) if fit(merged(best, o))])

    def opwide(best):
        toggles = [{"BLOCK_M": 32 if block_m(best) == 16 else 16}, {"W_TMA": False},
                   {"gate_up": {"GROUP_M": 8}, "down": {"GROUP_M": 8}}] + ([{"PREQUANT": True}] if fp8 else [])
        return [("", c) for c in toggles]

    return [stage(lambda best: [(name, from_vllm(*tile)) for name, tile in vllm.items()]),
            stage(lambda best: [("", {"gate_up": kernel(*c)}) for c in tiles["gate_up"]]),
            stage(lambda best: [("", {"down": kernel(*c)}) for c in tiles["down"]]),
            stage(opwide)]


def decode_point(run, want: torch.Tensor, timer, stages, until: float, tol: float = 2e-2):
    """One token count's staged sweep: each stage's candidates (a function of the best so far,
    giving (name, override) pairs) against the table's output `want`, until `until` (perf_counter
    seconds). Returns (best override or None, its ms, the table's ms, candidates tried, skipped)."""
    base = timer(run)
    best, best_ms, tried, skipped = None, base, 0, 0
    for stage in stages:
        for name, over in stage(best):
            if time.perf_counter() > until:
                skipped += 1
                continue
            ms, _, why = try_setting("fused_moe", as_rules(over), run, want, timer, tol)
            tried += 1
            print(f"  {name + ': ' if name else ''}{label(over)}: {why or f'{ms:.3f} ms'}", flush=True)
            if ms is not None and ms < best_ms:
                best, best_ms = over, ms
    return best, best_ms, base, tried, skipped


def confirm(run, over: dict, timer, rounds: int = 3) -> tuple[float, float]:
    """(the table's ms, `over`'s ms), each the median of `rounds` timings taken alternately, so
    the winner of many candidates is not picked by drift or one lucky timing."""
    from deepserve.ops.triton.launch_config import trying
    base, best = [], []
    for _ in range(rounds):
        base.append(timer(run))
        with trying("fused_moe", as_rules(over)):
            best.append(timer(run))
    return statistics.median(base), statistics.median(best)


def sweep_decode(args, dev: str, d: int, inter: int, e: int, k: int, tokens_list: list[int]) -> int:
    """The memory-bound decode sweep (module docstring)."""
    from deepserve.ops.triton import fused_moe as fm
    from deepserve.ops.triton import launch_config

    for t in tokens_list:
        if fm.use_small_path(t, k, e):
            raise SystemExit(f"sweep_fused_moe.py: --tokens {t}: {t * k} assignments over {e} experts take "
                             "fused_moe_small (benchmarks/sweep_moe_small.py), not the sorted path")
        if t * k / e >= DECODE_LIMIT:
            raise SystemExit(f"sweep_fused_moe.py: --tokens {t}: {t * k / e:g} rows per expert is not the decode "
                             f"regime (< {DECODE_LIMIT}); sweep it without --decode")
    bw, timer = bandwidth_and_timer(dev)
    device = torch.device(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    grid = (lambda items: items) if dev == "cuda" else (lambda items: items[:2])   # interpreted: the logic only
    points = [(dtype, t) for dtype in args.dtypes.split(",") for t in tokens_list]
    until = BEGAN + args.budget if args.budget else float("inf")
    results, rules = [], []
    for dtype in args.dtypes.split(","):
        fp8 = dtype == "fp8"
        elem = 1 if fp8 else 2
        weights, kw = expert_weights(dtype, e, d, inter, dev, g)
        won = []
        for t in tokens_list:
            x = torch.randn(t, d, generator=g, device=dev, dtype=torch.bfloat16)
            ids = torch.rand(t, e, generator=g, device=dev).topk(k, dim=-1).indices.to(torch.int32)
            tw = torch.rand(t, k, generator=g, device=dev)
            hit = int(torch.unique(ids).numel())
            nbytes = hit * 3 * d * inter * elem + 2 * t * d * 2
            run = lambda: fm.fused_moe(x, *weights, tw, ids, **kw)  # noqa: E731
            want = run().float()
            # CUDA-graph replays of ~4 ms each (10 timed), so short calls are not launch-bound
            reps = max(1, min(20, round(4.0 / timer(run, 2)))) if dev == "cuda" else 1
            timed = lambda fn, reps=reps: timer(fn, reps)  # noqa: E731
            n_assign, per_expert = t * k, t * k / e

            def block_m(over):
                with launch_config.trying("fused_moe", as_rules(over)):
                    return fm.sorted_tiles(n_assign, e, inter, fp8, elem, device)[0]["BLOCK_M"]

            stages = decode_stages(vllm_tiles(args.shape, dtype, t, e), DECODE_TILES_FP8 if fp8 else DECODE_TILES,
                                   fp8, block_m, lambda over: fits(over, d, inter), grid)
            print(f"{dtype}, {t} tokens: {per_expert:g} rows per expert, {hit} of {e} experts hit, "
                  f"{nbytes / 1e6:.0f} MB", flush=True)
            left = len(points) - points.index((dtype, t))
            point_until = min(until, time.perf_counter() + (until - time.perf_counter()) / left)
            best, best_ms, base, tried, skipped = decode_point(run, want, timed, stages, point_until)
            if best is not None:
                base, best_ms = confirm(run, best, timed)
            pct = lambda ms, nbytes=nbytes: nbytes / (ms * 1e-3) / bw  # noqa: E731  (share of copy bandwidth)
            gain = base / best_ms - 1
            print(f"  table {base:.3f} ms ({pct(base):.1%} of copy), best {best_ms:.3f} ms ({pct(best_ms):.1%}): "
                  f"{label(best)}; {tried} tried, {skipped} skipped for the budget", flush=True)
            if args.kernels:
                show_kernels(run, (("table", None), ("best", best)) if best else (("table", None),))
            whole = None
            if best is not None and gain >= args.min_gain:
                with launch_config.trying("fused_moe", as_rules(best)):
                    whole = whole_settings(*fm.sorted_tiles(n_assign, e, inter, fp8, elem, device))
            won.append((per_expert, whole))
            results.append((dtype, t, per_expert, hit, nbytes, base, best_ms, pct, best, whole is not None))
        rules += decode_rules(won, {"fp8": fp8, "elem_bytes": elem, "inter": inter})
        weights = kw = None                 # this dtype's experts freed before the next's are made
    for rule in rules:
        print(rule)
    if args.write:
        path = launch_config.save_rules("fused_moe", launch_config.device_key(device), rules,
                                        Path(args.config_dir) if args.config_dir else None)
        print(f"wrote {len(rules)} rules to {path}")
    print(f"\nsweep took {time.perf_counter() - BEGAN:.0f} s; copy {bw / 1e9:.0f} GB/s")
    print("| dtype | tokens | rows/expert | experts hit | MB | table ms (% copy) | best ms (% copy) | best | rule |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for dtype, t, per_expert, hit, nbytes, base, best_ms, pct, best, wrote in results:
        print(f"| {dtype} | {t} | {per_expert:g} | {hit} | {nbytes / 1e6:.0f} | {base:.3f} ({pct(base):.1%}) | "
              f"{best_ms:.3f} ({pct(best_ms):.1%}) | {label(best)} | {'yes' if wrote else '-'} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="small shapes (for --device cpu)")
    ap.add_argument("--shape", default="r1", choices=sorted(SHAPES), help="the experts' shapes (D, I, E, top-k)")
    ap.add_argument("--decode", action="store_true", help="the memory-bound sweep (fewer than 48 rows per expert)")
    ap.add_argument("--dtypes", default=None, help="comma-separated bf16,fp8 (default: both; --decode v2lite: bf16)")
    ap.add_argument("--quick", action="store_true", help="compute sweep: the default, pointer loads and the old "
                    "launch order")
    ap.add_argument("--tokens", default=None, help="token count (--decode: comma-separated counts; default: 256 "
                    f"rows per expert, or --decode {DECODE_TOKENS['r1']} for r1, {DECODE_TOKENS['v2lite']} for v2lite)")
    ap.add_argument("--budget", type=float, default=None, help="--decode: seconds from the start after which no "
                    "candidate starts (default 100 on cuda, none on cpu; 0: none)")
    ap.add_argument("--min-gain", type=float, default=None, help="--decode: write a token count's best where it "
                    "beats the table by this fraction (default 0.02)")
    ap.add_argument("--kernels", action="store_true", help="--decode: each token count's per-kernel times "
                    "(torch.profiler), the table's and the best's, after its sweep")
    ap.add_argument("--write", action="store_true", help="add the best candidates to the device's launch table")
    ap.add_argument("--config-dir", default=None, help="write the table under this folder instead of the package's")
    args = ap.parse_args()
    prepare(args.device)
    d, inter, e, k = SHAPES[args.shape]
    mode = "decode" if args.decode else "compute"
    if args.tiny:
        d, inter, e, k = TINY[mode]
    args.dtypes = args.dtypes or ("bf16" if args.decode and args.shape == "v2lite" else "bf16,fp8")
    bad = set(args.dtypes.split(",")) - {"bf16", "fp8"}
    if bad:
        raise SystemExit(f"sweep_fused_moe.py: --dtypes takes bf16 and fp8, got {','.join(sorted(bad))}")
    if args.decode and args.quick:
        raise SystemExit("sweep_fused_moe.py: --quick is the compute sweep's; --decode stops at --budget")
    if not args.decode and (args.budget is not None or args.min_gain is not None or args.kernels):
        raise SystemExit("sweep_fused_moe.py: --budget, --min-gain and --kernels are --decode's")
    if args.kernels and args.device != "cuda":
        raise SystemExit("sweep_fused_moe.py: --kernels reads CUDA kernel times (torch.profiler): --device cuda")
    if args.decode:
        args.budget = (100.0 if args.device == "cuda" else 0.0) if args.budget is None else args.budget
        args.min_gain = 0.02 if args.min_gain is None else args.min_gain
        default = DECODE_TOKENS["tiny" if args.tiny else args.shape]
        return sweep_decode(args, args.device, d, inter, e, k, token_list(args.tokens or default))
    tokens = token_list(args.tokens or str(32 if args.tiny else 256 * e // k))
    if len(tokens) != 1:
        raise SystemExit(f"sweep_fused_moe.py: the compute sweep takes one token count, got {args.tokens!r}")
    return sweep_compute(args, args.device, d, inter, e, k, tokens[0])


if __name__ == "__main__":
    sys.exit(main())

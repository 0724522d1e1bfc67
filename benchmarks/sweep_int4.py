"""Launch settings of the W4A16 kernels (ops/triton/int4_gemm.py, ops/triton/moe_int4.py).

    python benchmarks/sweep_int4.py --write                 # GPU (about 2 minutes on an H100)
    python benchmarks/sweep_int4.py --device cpu --tiny     # the script's logic, interpreted
    python benchmarks/sweep_int4.py --kernels gemv --deq 3 --write     # only the fp16-pair GEMV candidates

Cases, as benchmarks/bench_int4.py measures them (compressed-tensors W4A16: symmetric, groups
of 128, bf16), the MoE ones first:
- "gemv": the batch-1 projections of r1-distill-llama-8b (qkv, o_proj, gate_up, down), one row
  (`--r1` adds R1's q_b and o_proj);
- "gemm": the 8b qkv shape at 1024 rows;
- "moe_gate_up" / "moe_down": R1's routed experts of one EP8 rank (32 experts, D 7168, I 2048,
  top-8) at batch 1, the small-batch kernels (the other kernel at its setting);
- "moe_sorted": the same experts at 1024 tokens (256 rows per expert), the sorted path;
- "w4a8": the W4A8 GEMM (ops/triton/w4a8_gemm.py, int8 activations) at 1024 rows on the 8b
  shapes and R1's q_b / o_proj (written as rules for every M over 128 at that shape): the
  weights-second kernel (SWAP_AB 0) at three tiles and the weights-first kernel (SWAP_AB 1,
  OVERLAP 0/1) at tiles small enough for two or three programs an SM, whose MMA then overlaps
  another's unpack and rescale (registers and shared memory of each: benchmarks/sass_int4.py
  w4a8 / w4a8-swap).
Each candidate (tried through `launch_config.trying`) is checked against the default
setting's output, then timed as CUDA-graph replays over enough weight copies (>= 256 MB) that
the weights come from HBM. Bytes figures count the packed weights and scales read once, over a
2 GiB device copy measured first; the sorted MoE counts 6 D I FLOPs per assignment. `--write`
adds each case's best setting (where it beats the default) to the running device's table
(deepserve/ops/triton/configs/int4/<device>.json) as soon as the case is measured, as a rule
for exactly that shape.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from sweep_setup import bandwidth_and_timer, prepare  # noqa: E402

GROUP = 128
GEMV_SHAPES = [("8b", "qkv", 6144, 4096), ("8b", "o_proj", 4096, 4096), ("8b", "gate_up", 28672, 4096),
               ("8b", "down", 4096, 14336), ("r1", "q_b", 24576, 1536), ("r1", "o_proj", 7168, 16384)]
MOE = (32, 7168, 2048, 8)            # experts, D, I, top-k: one EP8 rank of R1
# GEMV / small-batch MoE (`int4_rows_dot`): a slice is SUB_C words along the threads (one word a
# thread and row: SUB_C = 32 x num_warps, or a multiple of it), BLOCK_N rows in each thread's
# registers (the gate_up kernel holds 2 BLOCK_N: gate and up rows), STEPS slices unrolled a
# loop step, SPLIT_K programs along K.
# (A candidate takes what it leaves out from the table: the DEQ 3 ones name WORDS and, for
# moe_down, SLOTS, so that a rule written by an earlier sweep does not change them.)
GEMV_GRID = [dict(BLOCK_N=n, SUB_C=c, STEPS=s, num_warps=w, SPLIT_K=k)
             for n, c, s, w, k in ((8, 128, 2, 4, 1), (8, 128, 1, 4, 1), (16, 128, 1, 4, 1), (16, 128, 2, 4, 1),
                                   (4, 128, 2, 4, 1), (4, 128, 4, 4, 1), (8, 256, 1, 8, 1), (16, 256, 1, 8, 1),
                                   (8, 64, 2, 2, 1), (16, 64, 2, 2, 1), (8, 128, 2, 4, 2), (16, 128, 1, 4, 2),
                                   # more programs for the shapes with few rows (o_proj, qkv, down: 512-768
                                   # programs of 8 rows against gate_up's 3,584)
                                   (8, 128, 1, 4, 4), (4, 128, 2, 4, 2), (8, 64, 2, 2, 2), (8, 64, 2, 2, 4),
                                   (4, 64, 2, 2, 2))]
# the lane-pair unpacking (DEQ 2: 4.26 instructions a nibble at 8 rows, 3.94 at 16 x 2 steps, against
# 4.77 / 4.51: benchmarks/sass_int4.py) at the settings that led the last sweep
GEMV_GRID += [dict(BLOCK_N=n, SUB_C=c, STEPS=s, num_warps=w, SPLIT_K=1, DEQ=2)
              for n, c, s, w in ((8, 128, 2, 4), (4, 128, 2, 4), (16, 128, 2, 4), (16, 128, 1, 4), (8, 256, 1, 8))]
# each slice's words loaded one slice ahead (AHEAD; STEPS 1): the reads alone run at 88% of copy at
# gate_up where the GEMV runs at 67% (benchmarks/gemv_read_only.py), so the arithmetic between
# loads, not the access pattern, holds it
GEMV_GRID += [dict(BLOCK_N=n, SUB_C=c, STEPS=1, num_warps=w, SPLIT_K=k, DEQ=d, AHEAD=1)
              for n, c, w, k, d in ((8, 128, 4, 1, 1), (4, 128, 4, 1, 1), (8, 128, 4, 1, 2), (4, 128, 4, 1, 2),
                                    (8, 256, 8, 1, 1), (8, 128, 4, 2, 1), (4, 128, 4, 2, 2))]
# packed fp16 arithmetic (DEQ 3, ops/triton/int4_half2.py) with WORDS adjacent words a thread: sm_90
# loops of 3.2 (1 word) and 2.35 (4 words) instructions a nibble at 8 rows, 2.2 with 4 words at 16
# rows, against DEQ 1's 4.8 (benchmarks/sass_int4.py); a slice is WORDS x SUB_C words (4 x 128: a
# whole 4096-wide row), so the shapes with few rows get split-K over narrower slices, merged by
# each row block's last split (MERGE: no reduction launch after the GEMV)
GEMV_GRID += [dict(BLOCK_N=n, SUB_C=c, STEPS=s, num_warps=w, SPLIT_K=k, DEQ=3, WORDS=d, MERGE=int(k > 1))
              for n, c, s, w, k, d in ((8, 128, 2, 4, 1, 1), (8, 128, 1, 4, 1, 2), (16, 128, 1, 4, 1, 2),
                                       (8, 128, 1, 4, 1, 4), (16, 128, 1, 4, 1, 4), (4, 128, 1, 4, 1, 4),
                                       (16, 64, 1, 2, 1, 4), (8, 64, 1, 2, 1, 4), (4, 128, 2, 4, 1, 2),
                                       (8, 128, 1, 4, 2, 2), (4, 128, 1, 4, 2, 2), (8, 64, 1, 2, 2, 4),
                                       (4, 64, 1, 2, 2, 4), (8, 32, 1, 1, 4, 4), (16, 64, 1, 2, 2, 2),
                                       (8, 64, 1, 2, 4, 2), (16, 64, 1, 2, 2, 4), (8, 128, 1, 4, 2, 4))]
# the tensor-core path (ops/triton/int4_mma.py: about 3 instructions a nibble against 4.5-4.8;
# 2.5-5x slower than the CUDA-core kernel on an H100 at every 8B shape, docs/PERFORMANCE.md)
GEMV_GRID += [dict(MMA=1, MMA_BLOCK_N=n, MMA_WARPS=w, MMA_STAGES=3) for n, w in ((64, 4), (128, 8))]
GRIDS = {
    "gemv": GEMV_GRID,
    "moe_gate_up": [dict(BLOCK_N=n, SUB_C=c, STEPS=s, num_warps=w)
                    for n, c, s, w in ((8, 128, 1, 4), (4, 128, 1, 4), (16, 128, 1, 4), (8, 256, 1, 8), (4, 256, 1, 8),
                                       (8, 64, 2, 2), (16, 64, 1, 2), (4, 128, 7, 4))]
                   + [dict(BLOCK_N=n, SUB_C=128, STEPS=1, num_warps=4, DEQ=2) for n in (4, 8)]
                   # the GEMV's packed fp16 arithmetic, one word a thread (DEQ 3)
                   + [dict(BLOCK_N=n, SUB_C=128, STEPS=s, num_warps=4, DEQ=3, WORDS=1) for n in (4, 8) for s in (1, 2)]
                   # ... WORDS 2 / 4 words a thread (sm_90 loops of 2.45 / 2.13 instructions a nibble at 8 rows
                   # against 3.2 with one word, no spills: benchmarks/sass_int4.py moe_gate_up; 16 rows take
                   # 254 registers); a slice is WORDS SUB_C words, so SUB_C 64 / 32 make D's 896 words whole
                   # slices
                   + [dict(BLOCK_N=n, SUB_C=c, STEPS=1, num_warps=w, DEQ=3, WORDS=d)
                      for n, c, w, d in ((8, 128, 4, 2), (4, 128, 4, 2), (8, 64, 2, 2), (8, 128, 4, 4), (8, 32, 1, 4))],
    "moe_down": [dict(BLOCK_N=n, SUB_C=c, STEPS=s, num_warps=w)
                 for n, c, s, w in ((8, 128, 2, 4), (4, 128, 2, 4), (16, 128, 2, 4), (8, 256, 1, 8), (8, 64, 4, 2),
                                    (4, 64, 4, 2), (8, 32, 8, 1), (4, 32, 8, 1))]
                + [dict(BLOCK_N=n, SUB_C=128, STEPS=2, num_warps=4, DEQ=2) for n in (4, 8)]
                + [dict(BLOCK_N=n, SUB_C=128, STEPS=s, num_warps=4, DEQ=3, WORDS=1, SLOTS=0)
                   for n in (4, 8) for s in (1, 2)]
                # ... WORDS 2 / 4 (I's 256 words: one slice of 2 x 128 or 4 x 64 words a slot; sm_90 loops of
                # 2.77 / 2.43 / 2.30 instructions a nibble against 3.5-3.7 with one word; 4 rows with
                # WORDS 4 spill)
                + [dict(BLOCK_N=n, SUB_C=c, STEPS=1, num_warps=w, DEQ=3, WORDS=d, SLOTS=0)
                   for n, c, w, d in ((4, 128, 4, 2), (8, 128, 4, 2), (8, 64, 2, 4))]
                # every slot's words of a step in one tile (SLOTS; tiles whose sm_90 build keeps
                # the [8 slots, words, rows] operands in registers without spilling)
                + [dict(BLOCK_N=n, SUB_C=c, STEPS=s, num_warps=w, DEQ=1, SLOTS=1)
                   for n, c, s, w in ((2, 128, 1, 4), (4, 128, 1, 4), (2, 256, 1, 8), (1, 128, 2, 4))]
                # ... in packed fp16 (`_all_slots_half2`: 4.44 / 4.09 instructions a nibble against DEQ 1's
                # 6.38 / 6.34)
                + [dict(BLOCK_N=n, SUB_C=c, STEPS=1, num_warps=w, DEQ=3, SLOTS=1)
                   for n, c, w in ((2, 128, 4), (2, 256, 8))],
    "gemm": [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st)
             for m, n, w in ((128, 128, 8), (128, 64, 4), (64, 128, 4)) for k in (64, 128) for st in (2, 3)]
            # the bf16-pair dequantization (int4_gemm.dequant_tile PAIRS: no fp32 -> bf16 conversions)
            + [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=64, num_warps=w, num_stages=3, PAIRS=1)
               for m, n, w in ((128, 128, 8), (128, 64, 4))],
    "w4a8": [dict(SWAP_AB=0, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
             for m, n, w, st in ((64, 256, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3))]
            + [dict(SWAP_AB=1, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st, OVERLAP=o)
               for m, n, w, st, o in ((128, 64, 4, 3, 0), (128, 64, 4, 3, 1), (128, 64, 4, 4, 0), (128, 64, 4, 4, 1),
                                      (128, 128, 8, 3, 0), (128, 128, 8, 3, 1), (256, 64, 8, 3, 0), (64, 64, 4, 3, 0),
                                      (64, 64, 4, 4, 1), (64, 128, 4, 3, 0))],
    "moe_sorted": [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st)
                   for m, n, k, w, st in ((128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (128, 128, 64, 8, 3),
                                          (64, 128, 64, 4, 3), (64, 64, 64, 4, 3), (128, 64, 32, 4, 4),
                                          (64, 128, 128, 4, 3), (64, 256, 64, 8, 3))]
                  + [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=3, PAIRS=1)
                     for m, n, k, w in ((128, 64, 64, 8), (64, 128, 128, 4))],
}


def packed(n: int, k: int, dev: str, copies: int, gen: torch.Generator):
    """`copies` random symmetric W4A16 matrices [n, k]: (qweight int32 [n, k/8], bf16 scales)."""
    return [(torch.randint(-2 ** 31, 2 ** 31, (n, k // 8), generator=gen, device=dev, dtype=torch.int64)
             .to(torch.int32), (torch.rand(n, k // GROUP, generator=gen, device=dev) * 0.004 + 0.002).bfloat16())
            for _ in range(copies)]


def packed_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * (k // GROUP) * 2


def sweep(kernel: str, cond: dict, grid: list[dict], run, timer, show, tol_rel: float = 2e-2):
    """Time the default and each candidate of `kernel` (a rule `cond` -> setting appended to the
    table); a candidate whose output differs from the default's is reported WRONG and skipped.
    Returns (default us, best us, best setting or None)."""
    from deepserve.ops.triton.launch_config import trying
    want = run()[0].float()
    # the fastest of three: a first timing can run before the GPU is at its clocks
    base = min(timer(run) for _ in range(3))
    print(f"  {kernel} {cond}: default {show(base)}", flush=True)
    best = (base, None)
    for cfg in grid:
        label = " ".join(f"{k}={v}" for k, v in cfg.items())
        with trying("int4", [{"if": {"kernel": kernel, **cond}, "set": cfg}]):
            try:
                got = run()[0].float()
                if not torch.allclose(got, want, rtol=tol_rel, atol=tol_rel * want.abs().max().item()):
                    print(f"    {label}: WRONG ({(got - want).abs().max().item():.3g})")
                    continue
                us = timer(run)
            except Exception as exc:  # noqa: BLE001  (resources, compiler errors: report, go on)
                print(f"    {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
                continue
        print(f"    {label}: {show(us)}", flush=True)
        if us < best[0]:
            best = (us, cfg)
    return base, best[0], best[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="small shapes, two candidates a kernel (for --device cpu)")
    ap.add_argument("--kernels", default="gemv,moe_gate_up,moe_down,moe_sorted",
                    help="which kernels to sweep (also: gemm, the 1024-row dense GEMM; w4a8, the W4A8 GEMM)")
    ap.add_argument("--r1", action="store_true", help="also R1's dense projections (q_b, o_proj) in the GEMV sweep")
    ap.add_argument("--deq", default="",
                    help="time only the GEMV / small-batch MoE candidates of these DEQ values (e.g. 3) beside the default")
    ap.add_argument("--write", action="store_true", help="add the best settings to the device's launch table")
    ap.add_argument("--config-dir", default=None, help="write the table under this folder instead of the package's")
    args = ap.parse_args()
    prepare(args.device)
    import deepserve.ops.triton  # noqa: F401  (registers the kernels)
    from deepserve.ops.registry import resolve
    from deepserve.ops.triton import launch_config

    dev, tiny = args.device, args.tiny
    bw, graph_time_ms = bandwidth_and_timer(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    kernels = [k for k in args.kernels.split(",") if k]
    grids = dict(GRIDS)
    if args.deq:     # (a candidate with SUB_C and no DEQ has the default's, 1)
        deqs = {int(d) for d in args.deq.split(",")}
        grids = {k: [c for c in g if c.get("DEQ", 1 if "SUB_C" in c else None) in deqs] for k, g in grids.items()}
    grids = {k: (g[:2] if tiny else g) for k, g in grids.items()}
    summary, rules = [], []

    def record(kernel, case, cond, result, show):
        base, best, cfg = result
        summary.append((kernel, case, show(base), show(best), " ".join(f"{k}={v}" for k, v in (cfg or {}).items())
                        or "default"))
        if cfg is not None:
            rules.append({"if": {"kernel": kernel, **cond}, "set": cfg})
            if args.write:            # as each case finishes, so a run cut short keeps what it measured
                path = launch_config.save_rules("int4", launch_config.device_key(torch.device(dev)), rules[-1:],
                                                Path(args.config_dir) if args.config_dir else None)
                print(f"  wrote {rules[-1]} to {path}", flush=True)

    e, d, i, top_k = MOE if not tiny else (4, 128, 128, 2)
    moe_kernels = [k for k in ("moe_gate_up", "moe_down", "moe_sorted") if k in kernels]
    if moe_kernels:
        moe = resolve("fused_moe_int4", "triton")[1]
        layers = 2 if dev == "cuda" else 1        # >= 2 x 235 MB of experts per timed call: from HBM
        experts = [(packed(2 * i, d, dev, e, gen), packed(d, i, dev, e, gen)) for _ in range(layers)]
        stacked = [(torch.stack([q for q, _ in w13]), torch.stack([s for _, s in w13]),
                    torch.stack([q for q, _ in w2]), torch.stack([s for _, s in w2])) for w13, w2 in experts]
        del experts
        for kernel in moe_kernels:
            tokens = 1 if kernel != "moe_sorted" else (256 if not tiny else 32) * e // top_k
            x = torch.randn(tokens, d, generator=gen, device=dev).bfloat16()
            ids = ([torch.randperm(e, generator=gen, device=dev)[:top_k][None].int() for _ in range(layers)]
                   if tokens == 1 else
                   [(torch.arange(tokens * top_k, device=dev) % e).view(tokens, top_k).int()] * layers)
            wts = torch.rand(tokens, top_k, generator=gen, device=dev)

            def run(x=x, ids=ids, wts=wts):
                return [moe(x, w13, s13, None, w2, s2, None, wts, r, (GROUP, GROUP))
                        for (w13, s13, w2, s2), r in zip(stacked, ids)]

            def timer(fn):
                return graph_time_ms(fn, reps=1) * 1e3 / layers

            if tokens == 1:
                nb = top_k * (packed_bytes(2 * i, d) + packed_bytes(d, i))
                show = lambda us, nb=nb: f"{us:.1f} us ({nb / (us * 1e-6) / bw:.0%} of copy)"  # noqa: E731
                cond = {"m": 1, "n": 2 * i if kernel == "moe_gate_up" else d, "k": d if kernel == "moe_gate_up" else i}
            else:
                flops = tokens * top_k * 6 * d * i
                show = lambda us, f=flops: f"{us:.1f} us ({f / (us * 1e-6) / 1e12:.0f} TFLOP/s)"  # noqa: E731
                cond = {"m": tokens * top_k // e, "n": 2 * i, "k": d}
            record(kernel, f"R1 EP8 rank, {tokens} tokens", cond, sweep(kernel, cond, grids[kernel], run, timer, show),
                   show)

    for kernel, rows in (("gemv", 1), ("gemm", 1024), ("w4a8", 1024)):
        if kernel not in kernels:
            continue
        linear = resolve("w4a8_linear" if kernel == "w4a8" else "int4_linear", "triton")[1]
        shapes = ([sh for sh in GEMV_SHAPES if args.r1 or sh[0] == "8b"] if kernel == "gemv" else
                  GEMV_SHAPES if kernel == "w4a8" else GEMV_SHAPES[:1])
        for model, proj, n, k in shapes[:2 if tiny else None]:
            if tiny:
                n, k = max(n // 128, 16), max(k // 32 // GROUP * GROUP, GROUP)
                rows = min(rows, 32)
            copies = 1 if dev == "cpu" else max(1, min(64, (256 << 20) // packed_bytes(n, k)))
            ws = packed(n, k, dev, copies, gen)
            x = torch.randn(rows, k, generator=gen, device=dev).bfloat16()

            def run(ws=ws, x=x):
                return [linear(x, q, s, None, None, GROUP) for q, s in ws]

            def timer(fn, copies=copies):
                return graph_time_ms(fn, reps=1) * 1e3 / copies

            nb, flops = packed_bytes(n, k), 2 * rows * n * k
            show = ((lambda us, nb=nb: f"{us:.1f} us ({nb / (us * 1e-6) / bw:.0%} of copy)") if kernel == "gemv" else
                    (lambda us, f=flops: f"{us:.1f} us ({f / (us * 1e-6) / 1e12:.0f} TFLOP/s)"))
            cond = ({"m_gt": 128, "n": n, "k": k, "groups": k // GROUP} if kernel == "w4a8" and rows > 128 else
                    {"m": rows, "n": n, "k": k})
            record(kernel, f"{model} {proj} {n}x{k} rows {rows}", cond,
                   sweep(kernel, cond, grids[kernel], run, timer, show), show)

    print("\n| kernel | case | default | best | best setting |\n|---|---|---:|---:|---|")
    for row in summary:
        print("| " + " | ".join(row) + " |")
    if args.write:
        print(f"wrote {len(rules)} rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 21's GPU figures in one run, each against a roofline measured in the same run (a 2 GiB
device copy for bytes, an 8192^3 bf16 matmul for FLOPs):

    python benchmarks/bench_int4.py                      # GPU (about 3 minutes on an H100)
    python benchmarks/bench_int4.py --device cpu --tiny  # the script's logic, interpreted

1. Dense kernels: every batch-1 projection shape of r1-distill-llama-8b (and R1's dense ones), as
   compressed-tensors W4A16 (symmetric, groups of 128: packed int32 + bf16 scales) through the
   Triton int4_linear, against cuBLAS bf16 (F.linear) on the same shape. Batch 1 is the split-K
   GEMV: its roofline counts the packed bytes (weight / 2 + scales) over the copy bandwidth.
   Rows 16 / 256 / 1024 are the tl.dot GEMM; W4A8 (int8 tl.dot) runs at 1024 rows. Each timing
   is a CUDA-graph replay over enough weight copies (>= 256 MB) that the weights come from HBM.
2. Decode: r1-distill-llama-8b with random weights through deepserve's LLM at batch 1, bf16
   against `--quantization compressed-tensors` (W4A16, groups of 128), tokens/s each against
   its bytes roofline (weights read once per token / copy bandwidth) and their ratio.
3. MoE: R1's routed experts of one EP8 rank (32 experts, D 7168, I 2048, top-8), W4A16 fused MoE
   at batch 1 (against the bytes of the experts touched) and at 256 rows per expert (against
   the bf16 matmul rate: 6 D I FLOPs per assignment), beside the bf16 fused MoE.
4. MoE int8 (`--part moe8`): the same experts as msModelSlim W8A8_DYNAMIC / compressed-tensors
   W8A8 int8 store them (int8, fp32 per-row scales) through the int8 fused MoE (per-token int8
   activations, int8 tensor-core dots), at batch 1 (GEMV path, against the bytes of the experts
   touched), 16 tokens and 256 rows per expert (sorted path, against the bf16 matmul rate),
   beside the bf16 fused MoE.

Each kernel is checked against its torch reference first (WRONG is printed and the figure
skipped). The summary table at the end lists every issue-21 figure with its target; each
figure is also written to benchmarks/results/int4_<name>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
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
# the targets: (figure, minimum ratio)
TARGETS = {"gemv_8b": 0.80, "decode_8b_speedup": 1.8, "moe_b1": 0.75, "moe_256_per_expert": 0.40,
           "w4a8_m1024_speedup": 1.0}
R1_EP8_EXPERTS = (32, 7168, 2048, 8)      # experts on one EP8 rank, D, I, top-k
TINY_EXPERTS = (4, 128, 128, 2)


def int4_weight(n: int, k: int, dev: str):
    qweight = torch.randint(-2 ** 31, 2 ** 31, (n, k // 8), dtype=torch.int64, device=dev).to(torch.int32)
    scales = torch.full((n, k // GROUP), 0.02 / 4.6, dtype=torch.bfloat16, device=dev)
    return qweight, scales


def packed_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * (k // GROUP) * 2


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.float().abs().max().item())


RESULTS = REPO / "benchmarks" / "results"


def figure(rows: list, name: str, value: float, unit: str, roof: float, extra: dict | None = None) -> None:
    from bench_engine import record
    record(rows, name, value, unit, roof, extra, prefix="int4_", results=RESULTS)


def bench_dense(dev: str, tiny: bool, timer, bw: float, rows: list) -> None:
    from deepserve.ops.registry import resolve
    int4_tri, int4_ref = resolve("int4_linear", "triton")[1], resolve("int4_linear", "torch")[1]
    w4a8_tri, w4a8_ref = resolve("w4a8_linear", "triton")[1], resolve("w4a8_linear", "torch")[1]
    print("| shape | N x K | rows | bf16 cuBLAS us | W4A16 us | W4A16 % of packed-bytes roofline | speedup | W4A8 us "
          "(groups of 128 / channel scales) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model, proj, n, k in SHAPES:
        if tiny:
            n, k = max(n // 64, 16), max(k // 64 // GROUP * GROUP, GROUP)
        copies = 1 if dev == "cpu" else max(1, min(64, (256 << 20) // packed_bytes(n, k)))
        qs = [int4_weight(n, k, dev) for _ in range(copies)]
        bf = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(max(1, copies // 4))]
        for m in ROWS if dev == "cuda" else (1, ROWS[-1] // 64):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            q, s = qs[0]
            if not close(int4_tri(x, q, s, None, None, GROUP), int4_ref(x, q, s, None, None, GROUP)):
                print(f"{model} {proj} rows {m}: W4A16 WRONG")
                continue
            us4 = timer(lambda: [int4_tri(x, q_, s_, None, None, GROUP) for q_, s_ in qs]) * 1e3 / copies
            us16 = timer(lambda: [F.linear(x, w) for w in bf]) * 1e3 / len(bf)
            roof = packed_bytes(n, k) / (us4 * 1e-6) / bw if m == 1 else float("nan")
            if m == 1 and model == "8b":
                figure(rows, f"gemv_8b_{proj}", packed_bytes(n, k) / (us4 * 1e-6), "B/s", bw,
                       {"target": TARGETS["gemv_8b"], "us": us4, "bf16_us": us16})
            w4a8 = "-"
            if m == max(ROWS if dev == "cuda" else (1, ROWS[-1] // 64)):
                if close(w4a8_tri(x, q, s, None, None, GROUP), w4a8_ref(x, q, s, None, None, GROUP)):
                    us8 = timer(lambda: [w4a8_tri(x, q_, s_, None, None, GROUP) for q_, s_ in qs]) * 1e3 / copies
                    w4a8 = f"{us8:.1f}"
                    figure(rows, f"w4a8_m{m}_speedup_{model}_{proj}", us16 / us8, "x vs bf16", 1.0,
                           {"target": TARGETS["w4a8_m1024_speedup"], "us": us8, "bf16_us": us16})
                else:
                    w4a8 = "WRONG"
                # channel scales (compressed-tensors' "channel" strategy: one group spans K)
                chs = [(q_, s_[:, :1].contiguous()) for q_, s_ in qs]
                if close(w4a8_tri(x, q, chs[0][1], None, None, k), w4a8_ref(x, q, chs[0][1], None, None, k)):
                    us8c = timer(lambda: [w4a8_tri(x, q_, s_, None, None, k) for q_, s_ in chs]) * 1e3 / copies
                    w4a8 += f" / channel {us8c:.1f}"
                    figure(rows, f"w4a8ch_m{m}_speedup_{model}_{proj}", us16 / us8c, "x vs bf16", 1.0,
                           {"target": TARGETS["w4a8_m1024_speedup"], "us": us8c, "bf16_us": us16})
                else:
                    w4a8 += " / channel WRONG"
            print(f"| {model} {proj} | {n}x{k} | {m} | {us16:.1f} | {us4:.1f} | {roof:.0%} | {us16 / us4:.2f}x | {w4a8} |",
                  flush=True)


def bench_moe(dev: str, tiny: bool, timer, bw: float, peak: float, rows: list) -> None:
    """R1 routed experts of one EP8 rank: W4A16 fused MoE vs the bf16 one."""
    from deepserve.ops.registry import resolve
    e, d, i, top_k = TINY_EXPERTS if tiny else R1_EP8_EXPERTS
    w13 = torch.randint(-2 ** 31, 2 ** 31, (e, 2 * i, d // 8), dtype=torch.int64, device=dev).to(torch.int32)
    w2 = torch.randint(-2 ** 31, 2 ** 31, (e, d, i // 8), dtype=torch.int64, device=dev).to(torch.int32)
    s13 = torch.full((e, 2 * i, d // GROUP), 0.02 / 4.6, dtype=torch.bfloat16, device=dev)
    s2 = torch.full((e, d, i // GROUP), 0.02 / 4.6, dtype=torch.bfloat16, device=dev)
    b13 = torch.randn(e, 2 * i, d, device=dev, dtype=torch.bfloat16) * 0.02
    b2 = torch.randn(e, d, i, device=dev, dtype=torch.bfloat16) * 0.02
    tri, ref = resolve("fused_moe_int4", "triton")[1], resolve("fused_moe_int4", "torch")[1]
    fused = resolve("fused_moe", "triton")[1]
    print("\n| MoE (R1, one EP8 rank) | tokens | bf16 fused us | W4A16 us | W4A16 vs its roofline |")
    print("|---|---:|---:|---:|---:|")
    per_expert = 256 if not tiny else 8
    for tokens in (1, per_expert * e // top_k):
        x, wts, ids = moe_batch(tokens, d, e, top_k, dev)
        args = (x, w13, s13, None, w2, s2, None, wts, ids, (GROUP, GROUP))
        if not close(tri(*args), ref(*args)):
            print(f"MoE tokens {tokens}: W4A16 WRONG")
            continue
        us4 = timer(lambda: tri(*args)) * 1e3
        us16 = timer(lambda: fused(x, b13, b2, wts, ids)) * 1e3
        if tokens == 1:
            touched = len(torch.unique(ids))
            nbytes = touched * (packed_bytes(2 * i, d) + packed_bytes(d, i))
            figure(rows, "moe_b1", nbytes / (us4 * 1e-6), "B/s", bw,
                   {"target": TARGETS["moe_b1"], "us": us4, "bf16_us": us16, "experts_touched": touched})
            roof = f"{nbytes / (us4 * 1e-6) / bw:.0%} of bytes"
        else:
            flops = tokens * top_k * 6 * d * i
            figure(rows, "moe_256_per_expert", flops / (us4 * 1e-6), "FLOP/s", peak,
                   {"target": TARGETS["moe_256_per_expert"], "us": us4, "bf16_us": us16,
                    "rows_per_expert": tokens * top_k // e})
            roof = f"{flops / (us4 * 1e-6) / peak:.0%} of bf16 matmul"
        print(f"| experts | {tokens} | {us16:.1f} | {us4:.1f} | {roof} |", flush=True)


def moe_batch(tokens: int, d: int, e: int, top_k: int, dev: str):
    """(x, routing weights, ids) of `tokens` tokens: distinct random experts per token for a
    single token, else every expert exactly tokens * top_k / e assignments."""
    x = torch.randn(tokens, d, device=dev, dtype=torch.bfloat16)
    ids = (torch.stack([torch.randperm(e, device=dev)[:top_k] for _ in range(tokens)]) if tokens == 1 else
           (torch.arange(tokens * top_k, device=dev) % e).view(tokens, top_k)).int()
    return x, torch.rand(tokens, top_k, device=dev), ids


def bench_moe_int8(dev: str, tiny: bool, timer, bw: float, peak: float, rows: list) -> None:
    """R1 routed experts of one EP8 rank: int8 (W8A8) fused MoE vs the bf16 one."""
    from deepserve.ops.registry import resolve
    e, d, i, top_k = TINY_EXPERTS if tiny else R1_EP8_EXPERTS
    w13 = torch.randint(-127, 128, (e, 2 * i, d), dtype=torch.int8, device=dev)
    w2 = torch.randint(-127, 128, (e, d, i), dtype=torch.int8, device=dev)
    s13 = torch.full((e, 2 * i, 1), 0.02 / 73, device=dev)      # values of std ~0.02
    s2 = torch.full((e, d, 1), 0.02 / 73, device=dev)
    b13 = torch.randn(e, 2 * i, d, device=dev, dtype=torch.bfloat16) * 0.02
    b2 = torch.randn(e, d, i, device=dev, dtype=torch.bfloat16) * 0.02
    tri, ref = resolve("fused_moe_int8", "triton")[1], resolve("fused_moe_int8", "torch")[1]
    fused = resolve("fused_moe", "triton")[1]
    expert_bytes = 3 * d * i + 4 * (2 * i + d)
    print("\n| MoE int8 (R1, one EP8 rank) | tokens | bf16 fused us | int8 us | int8 vs its roofline |")
    print("|---|---:|---:|---:|---:|")
    per_expert = 256 if not tiny else 8
    for tokens in (1, 16 if not tiny else 4, per_expert * e // top_k):
        x, wts, ids = moe_batch(tokens, d, e, top_k, dev)
        args = (x, w13, s13, w2, s2, wts, ids)
        if not close(tri(*args), ref(*args)):
            print(f"MoE int8 tokens {tokens}: WRONG")
            continue
        us8 = timer(lambda: tri(*args)) * 1e3
        us16 = timer(lambda: fused(x, b13, b2, wts, ids)) * 1e3
        touched = len(torch.unique(ids))
        nbytes = touched * expert_bytes
        flops = tokens * top_k * 6 * d * i
        figure(rows, f"moe_int8_t{tokens}_bytes", nbytes / (us8 * 1e-6), "B/s", bw,
               {"us": us8, "bf16_us": us16, "experts_touched": touched})
        figure(rows, f"moe_int8_t{tokens}_flops", flops / (us8 * 1e-6), "FLOP/s", peak,
               {"us": us8, "bf16_us": us16, "rows_per_expert": tokens * top_k / e})
        print(f"| experts int8 | {tokens} | {us16:.1f} | {us8:.1f} | {nbytes / (us8 * 1e-6) / bw:.0%} of bytes, "
              f"{flops / (us8 * 1e-6) / peak:.0%} of bf16 matmul, {us16 / us8:.2f}x bf16 |", flush=True)


def bench_decode(dev: str, tiny: bool, bw: float, rows: list, repeats: int) -> None:
    """r1-distill-llama-8b batch-1 decode, bf16 vs W4A16 (random weights), through the LLM."""
    import bench_engine
    from bench_engine import decode_rate, release, weight_bytes
    from deepserve import LLM
    bench_engine.REPEATS = repeats
    kw = dict(load_format="dummy", dtype="bfloat16", max_model_len=1024, max_num_seqs=8,
              gpu_memory_utilization=0.85)
    prompt, new = 128, 256
    if tiny:
        kw.update(hf_overrides={"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                                "vocab_size": 512}, enforce_eager=True, dtype="float32")
        prompt, new = 8, 4
    rates = {}
    for tag, quant in (("bf16", None), ("w4a16", "compressed-tensors")):
        llm = LLM("r1-distill-llama-8b", quantization=quant, **kw)
        wb = weight_bytes(llm.engine.runner.model, active=False)
        rate, runs = decode_rate(llm, 1, prompt, new)
        rates[tag] = rate
        figure(rows, f"decode_8b_{tag}_b1", rate, "tok/s", bw / wb, {"weight_bytes": wb, "runs": runs})
        print(f"decode r1-distill-llama-8b {tag} batch 1: {rate:.1f} tok/s, {wb / 1e9:.2f} GB of weights, "
              f"{rate * wb / bw:.0%} of the bytes roofline (median of {repeats}: "
              f"{statistics.median(runs):.1f})", flush=True)
        release(llm)
    figure(rows, "decode_8b_speedup", rates["w4a16"] / rates["bf16"], "x vs bf16", 1.0,
           {"target": TARGETS["decode_8b_speedup"]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="shapes / 64 and a 2-layer model (for --device cpu)")
    ap.add_argument("--part", nargs="+", default=["dense", "decode", "moe", "moe8"],
                    choices=["dense", "decode", "moe", "moe8"])
    ap.add_argument("--repeats", type=int, default=3, help="timed decode runs, reported as their median")
    args = ap.parse_args()
    prepare(args.device)
    import deepserve.ops.triton  # noqa: F401  (registers the kernels)

    dev = args.device
    bw, timer = bandwidth_and_timer(dev)
    if dev == "cuda":
        from bench_engine import matmul_peak
        peak = matmul_peak()
        print(f"bf16 matmul {peak / 1e12:.0f} TFLOP/s (8192^3)", flush=True)
    else:
        global RESULTS
        peak = 1e9      # nominal: the CPU run checks the logic, not the numbers, and keeps no results
        RESULTS = Path(tempfile.mkdtemp(prefix="bench_int4_"))
    rows: list = []
    parts = {"dense": lambda: bench_dense(dev, args.tiny, timer, bw, rows),
             "decode": lambda: bench_decode(dev, args.tiny, bw, rows, args.repeats),
             "moe": lambda: bench_moe(dev, args.tiny, timer, bw, peak, rows),
             "moe8": lambda: bench_moe_int8(dev, args.tiny, timer, bw, peak, rows)}
    failed = []
    for part in args.part:
        if dev == "cuda":
            torch.cuda.empty_cache()       # the engine sizes its KV pool from the free memory
        try:
            parts[part]()
        except Exception as exc:  # noqa: BLE001 - report and go on with the next part
            print(f"part {part} failed: {type(exc).__name__}: {exc}", flush=True)
            failed.append(part)
    print(f"\nroofline (this run): copy {bw / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.1f} TFLOP/s")
    print("| figure | value | unit | roofline | ratio | target | met |\n|---|---:|---|---:|---:|---:|---|")
    for r in rows:
        target = r.get("target")
        met = "-" if target is None else ("yes" if r["ratio"] >= target else "NO")
        print(f"| {r['name']} | {r['value']:.4g} | {r['unit']} | {r['roofline_value']:.4g} | {r['ratio']:.2f} | "
              f"{'-' if target is None else target} | {met} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

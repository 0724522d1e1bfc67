"""FP8 block-scaled and INT8 W8A8 GEMM throughput against BF16 at DeepSeek-R1 shapes.

    python benchmarks/bench_quant_gemm.py [--m 1,64,1024] [--out-dir benchmarks/results]

For each R1 Linear shape (N, K from the deepseek-r1 preset) and token count M it times, as
CUDA-graph replays (how the engine runs decode):

- bf16: torch.matmul(x, W^T) with bf16 x and W (cuBLAS);
- fp8: the whole `fp8_block_linear` op (Triton per-token-group activation quant + our
  block-scaled fp8 GEMM), the GEMM kernel alone and, at one row, the CUDA-core GEMV alone
  (products summed byte by byte in fp32, or in packed fp16 runs: H2) and on the tensor cores;
- int8: the whole `int8_linear` op (torch per-token quant, torch._int_mm, rescale) and
  torch._int_mm alone.

Rooflines measured in the same run: the bf16 matmul peak (8192^3, TFLOP/s) and a 2 GiB
device copy (GB/s; M = 1 and 64 are bound by reading the weight). Each result is one JSON
file (name, device, date, command, value [TFLOP/s], unit, roofline_value [bf16 peak], ratio,
plus time_ms, bf16_ms, speedup_vs_bf16, weight_gbps, copy_gbps).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_ops import copy_bandwidth, graph_time_ms, matmul_flops  # noqa: E402
from deepserve.ops.quant import fp8_block_linear as fp8_block_linear_torch  # noqa: E402
from deepserve.ops.quant import int8_linear, int8_matmul  # noqa: E402
from deepserve.quant.fp8 import quant_fp8_block  # noqa: E402
from deepserve.quant.int8 import quant_int8_per_channel  # noqa: E402


def r1_shapes() -> list[tuple[str, int, int]]:
    """(name, N, K) of R1's dense Linear layers at TP 1, from the preset."""
    c = json.loads((REPO / "deepserve" / "assets" / "presets" / "deepseek-r1.json").read_text())
    heads, nope, rope, v = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                            c["v_head_dim"])
    d, inter = c["hidden_size"], c["intermediate_size"]
    return [("q_a_proj", c["q_lora_rank"], d),
            ("kv_a_proj", c["kv_lora_rank"] + rope, d),
            ("q_kv_a_proj", c["q_lora_rank"] + c["kv_lora_rank"] + rope, d),   # the two stacked (MLAAttention)
            ("q_b_proj", heads * (nope + rope), c["q_lora_rank"]),
            ("kv_b_proj", heads * (nope + v), c["kv_lora_rank"]),
            ("o_proj", d, heads * v),
            ("gate_up_proj", 2 * inter, d),
            ("down_proj", d, inter)]


# one-row GEMV settings timed beside the default (BLOCK_N, GROUPS, num_warps, SPLIT_K, STAGES): the
# earlier sweeps' winners at each K-loop pipelining depth
GEMV_CANDIDATES = [(4, 8, 4, 1, 1), (4, 8, 4, 1, 2), (4, 8, 4, 1, 3), (4, 4, 4, 1, 2), (4, 4, 4, 1, 3),
                   (4, 4, 4, 4, 1), (4, 4, 4, 4, 2), (8, 4, 8, 1, 2), (8, 4, 4, 1, 3), (2, 8, 4, 1, 2)]
# the same kernel in packed fp16 (H2 1, fp8_half2; BLOCK_N, GROUPS, num_warps, SPLIT_K, STAGES), the row
# quantized either way: the table's tile, pipelined, and tiles whose step spans a group per 8 threads, so
# that a thread holds BLOCK_N rows of one 16-byte run and converts its row's run once for all of them
# (benchmarks/sass_fp8_gemv.py, row quantized first: 2.7-3.5 loop instructions a weight byte, against
# 3.75 at the table's tile and today's 6.1-7.4)
H2_CANDIDATES = [(4, 4, 4, 1, 1), (4, 4, 4, 1, 2), (4, 8, 4, 1, 1), (4, 16, 4, 1, 1), (8, 8, 2, 1, 1),
                 (16, 8, 4, 1, 1), (16, 8, 4, 4, 1)]
# the byte-wise kernel at H2's tiles of several rows a thread (3.7-3.8 instructions a byte there), the row
# quantized first: what H2 adds beyond the tile
WIDE_CANDIDATES = [(8, 8, 2, 1, 1), (16, 8, 4, 1, 1)]
# the tensor-core GEMV's (BLOCK_N, num_warps, SPLIT_K, STAGES): 64 weight rows a warp group (fp8
# wgmma; fewer rows fall back to converting MMAs), split over K for the weights of few rows
MMA_CANDIDATES = [(64, 4, 1, 3), (64, 4, 1, 4), (128, 4, 1, 3), (128, 4, 1, 4), (64, 4, 4, 3), (128, 4, 4, 3),
                  (128, 4, 8, 3), (128, 8, 1, 3)]


def bench_shape(name: str, n: int, k: int, m: int, peak: float, copy_gbps: float, meta: dict) -> list[dict]:
    import deepserve.ops.triton.quant_gemm as qg

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    flop = 2.0 * m * n * k
    bf16_ms = graph_time_ms(lambda: torch.matmul(x, w.t()))  # noqa: F821

    wq, grid = quant_fp8_block(w)
    ws = grid.repeat_interleave(128, 0)[:n].contiguous()
    xq, xs = qg.act_quant_fp8(x)
    wi, wis = quant_int8_per_channel(w)
    xi = torch.randint(-127, 128, (m, k), device="cuda", generator=g, dtype=torch.int8)
    del w
    # one row: the op's launch settings each GEMV candidate stands for (--write), by name: the
    # CUDA-core kernel's (rows a program, groups a step, warps, split, stages) quantizing its row,
    # the same in packed fp16 and the tensor-core kernel's, with the row quantized either way
    settings = {
        **{f"fp8_gemv_n{bn}g{gr}w{nw}s{sk}t{st}": dict(BLOCK_N=bn, GROUPS=gr, num_warps=nw, SPLIT_K=sk, STAGES=st,
                                                      QUANT_IN=1, MMA=0, H2=0) for bn, gr, nw, sk, st in GEMV_CANDIDATES},
        **{f"fp8_gemv_n{bn}g{gr}w{nw}s{sk}t{st}q0": dict(BLOCK_N=bn, GROUPS=gr, num_warps=nw, SPLIT_K=sk, STAGES=st,
                                                        QUANT_IN=0, MMA=0, H2=0) for bn, gr, nw, sk, st in WIDE_CANDIDATES},
        **{f"fp8_gemv_h2_n{bn}g{gr}w{nw}s{sk}t{st}q{qi}": dict(BLOCK_N=bn, GROUPS=gr, num_warps=nw, SPLIT_K=sk,
                                                              STAGES=st, QUANT_IN=qi, MMA=0, H2=1)
           for bn, gr, nw, sk, st in H2_CANDIDATES for qi in (0, 1)},
        **{f"fp8_gemv_mma_n{bn}w{nw}s{sk}t{st}q{qi}": dict(BLOCK_N=bn, GROUPS=1, num_warps=nw, SPLIT_K=sk, STAGES=st,
                                                          QUANT_IN=qi, MMA=1, H2=0)
           for bn, nw, sk, st in MMA_CANDIDATES for qi in (0, 1)}} if m == 1 else {}
    runs = {
        "fp8": (lambda: qg.fp8_block_linear(x, wq, ws), n * k * 1 + n * (-(-k // 128)) * 4),
        "fp8_gemm_only": (lambda: qg.fp8_gemm(xq, xs, wq, ws, torch.bfloat16), n * k),
        # one row: the CUDA-core GEMV the op takes where configs/fp8_gemv/ sets `use`, with its
        # launch table's settings for the shape and the candidates around them (rows a program, groups a step, warps)
        # (on a row quantized beforehand; quantizing the bf16 row itself, QUANT_IN 1; after the
        # activation quant kernel, QUANT_IN 0)
        **({"fp8_gemv_only": (lambda: qg.fp8_gemv(xq, xs, wq, ws, torch.bfloat16), n * k),
            "fp8_gemv_fused": (lambda: qg.fp8_gemv(x, None, wq, ws, torch.bfloat16), n * k),
            "fp8_gemv_quant_first": (lambda: qg.fp8_gemv(*qg.act_quant_fp8(x), wq, ws, torch.bfloat16), n * k)}
           if m == 1 else {}),
        # the candidates, whole op: quantizing the row inside (QUANT_IN 1) or the activation quant
        # kernel first (0)
        **{kind: ((lambda cfg=cfg: qg.fp8_gemv(x, None, wq, ws, torch.bfloat16, settings=cfg)) if cfg["QUANT_IN"]
                  else (lambda cfg=cfg: qg.fp8_gemv(*qg.act_quant_fp8(x), wq, ws, torch.bfloat16, settings=cfg)),
                  n * k) for kind, cfg in settings.items()},
        "int8": (lambda: int8_linear(x, wi, wis), n * k + n * 4),
        "int8_mm_only": (lambda: int8_matmul(xi, wi), n * k),
        "bf16": (None, n * k * 2),
    }
    # a one-row candidate counts (--write) only where its output is the op's: against the torch
    # reference on the dequantized operands, within the GEMM's bound
    ref = fp8_block_linear_torch(x.float(), wq, ws) if settings else None
    out = []
    for kind, (fn, weight_bytes) in runs.items():
        ok = None
        if kind in settings:
            err = (fn().float() - ref).abs().max().item()
            ok = err <= 1e-2 * ref.abs().max().item()
            if not ok:
                print(f"{name} {kind}: max error {err:.3g} against the torch op: not kept", flush=True)
        ms = bf16_ms if fn is None else graph_time_ms(fn)
        tflops = flop / (ms * 1e-3) / 1e12
        rec = dict(meta, name=f"quant_gemm.{name}_{kind}_m{m}", value=round(tflops, 3), unit="TFLOP/s",
                   roofline_value=round(peak / 1e12, 3), ratio=round(tflops * 1e12 / peak, 4),
                   settings=settings.get(kind), matches_reference=ok, time_ms=round(ms, 5), bf16_ms=round(bf16_ms, 5), speedup_vs_bf16=round(bf16_ms / ms, 3),
                   weight_gbps=round(weight_bytes / (ms * 1e-3) / 1e9, 1), copy_gbps=round(copy_gbps / 1e9, 1),
                   shape={"m": m, "n": n, "k": k})
        out.append(rec)
        print(f"{name:13s} M={m:5d} N={n:6d} K={k:6d} {kind:14s} {ms * 1e3:9.1f} us {tflops:8.1f} TFLOP/s "
              f"{rec['weight_gbps']:7.0f} GB/s  x{rec['speedup_vs_bf16']:.2f} vs bf16", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="1,64,1024", help="token counts, comma separated")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--write", action="store_true",
                    help="one row: where a GEMV candidate beats the op as served by 3%%, add its settings for "
                         "that shape to the device's fp8_gemv launch table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_quant_gemm needs a CUDA device")
    if torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("fp8 GEMMs need compute capability >= 8.9")
    peak, copy_gbps = matmul_flops(), copy_bandwidth()
    print(f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s, copy {copy_gbps / 1e9:.0f} GB/s")
    meta = {"device": torch.cuda.get_device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv)}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    one_row = []
    for name, n, k in r1_shapes():
        for m in (int(v) for v in args.m.split(",")):
            recs = bench_shape(name, n, k, m, peak, copy_gbps, meta)
            for rec in recs:
                (out_dir / f"{rec['name'].replace('.', '_')}.json").write_text(json.dumps(rec, indent=1) + "\n")
            if m == 1:
                one_row.append((name, recs))
    if one_row:   # the one-row kernels side by side: us (% of copy over the fp8 weight bytes)
        print("\none row, us (% of copy): op as served | GEMM | CUDA-core GEMV best | packed fp16 GEMV best | "
              "tensor-core GEMV best")
        for name, recs in one_row:
            def cell(rs):
                r = min(rs, key=lambda r: r["time_ms"])
                kind = r["name"].split(".")[1].removeprefix(name + "_").removesuffix("_m1")
                return f"{r['time_ms'] * 1e3:6.1f} ({100 * r['weight_gbps'] / r['copy_gbps']:3.0f}%) {kind}"
            picks = [[r for r in recs if r["name"].endswith(f"_{kind}_m1")] for kind in ("fp8", "fp8_gemm_only")]
            gemv = [r for r in recs if "_fp8_gemv_n" in r["name"] or r["name"].endswith("_fp8_gemv_fused_m1")]
            h2 = [r for r in recs if "_fp8_gemv_h2_" in r["name"]]
            mma = [r for r in recs if "_fp8_gemv_mma_" in r["name"]]
            print(f"{name:13s} | " + " | ".join(cell(rs) for rs in (*picks, gemv, h2, mma) if rs))
    if args.write and one_row:
        write_best(one_row)
    return 0


def write_best(one_row: list) -> None:
    """Each shape's fastest one-row candidate into this device's fp8_gemv table, where it beats
    the op as served (the table's current pick, GEMM or GEMV) by 3% or more."""
    from deepserve.ops.triton import launch_config

    rules = []
    for _, recs in one_row:
        served = next(r for r in recs if r["name"].endswith("_fp8_m1"))
        best = min((r for r in recs if r.get("settings") and r.get("matches_reference")),
                   key=lambda r: r["time_ms"], default=None)
        if best is not None and best["time_ms"] <= 0.97 * served["time_ms"]:
            shape = {"n": best["shape"]["n"], "k": best["shape"]["k"]}
            rules.append({"if": shape, "set": {"use": 1, **best["settings"]}})
            print(f"rule {shape}: {best['settings']} ({best['time_ms'] * 1e3:.1f} us, served "
                  f"{served['time_ms'] * 1e3:.1f} us)")
    if rules:
        path = launch_config.save_rules("fp8_gemv", launch_config.device_key(torch.device("cuda")), rules)
        print(f"wrote {len(rules)} rules to {path}")


if __name__ == "__main__":
    raise SystemExit(main())

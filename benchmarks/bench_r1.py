"""DeepSeek-R1 on one GPU with FP8 routed experts and an FP8 KV cache (issue 16).

    python benchmarks/bench_r1.py --case experts --weights fp8 [--moe-layers N]
    python benchmarks/bench_r1.py --case experts --weights bf16 --cut compare
    python benchmarks/bench_r1.py --case kvcache --kv-cache-dtype fp8
    python benchmarks/bench_r1.py --case kvattn
    python benchmarks/bench_r1.py --case serve --tokenizer FOLDER
    python benchmarks/bench_r1.py --case table                 # the figures written so far
    python benchmarks/bench_r1.py --device cpu --tiny --case ...   # the logic, at toy sizes

The model is the deepseek-r1 preset with random ("dummy") weights cut to 3 dense + N MoE
layers (`hf_overrides` num_hidden_layers; R1's first_k_dense_replace is 3). N defaults to what
fits the GPU at --gpu-memory-utilization 0.9: `--cut big` (fp8: 8 MoE layers on a 141 GB
H200, 5 on an 80 GB H100) or `--cut compare`, the cut where bf16 experts fit too (4 on an
H200, 2 on an H100) for the fp8 / bf16 ratio on the same layers. Each engine runs in its own
process (the driver benchmarks/gpu_issue16.sh), since an engine's memory is not all back in
the allocator when the next one starts.

Cases (every roofline is a 2 GiB device-to-device copy measured first in the same process,
bytes read + written, bench_engine.copy_bandwidth):

  experts  weight bytes of one MoE layer's MLP (gate + routed experts + shared expert, summed
           over the module's parameters), torch.cuda.memory_allocated right after the model
           loads (and the peak during the load), decode tokens/s at batch 1, 64, 256 (median
           of --repeats runs, bench_engine.decode_rate; roofline: batch x copy bandwidth / the
           weight bytes the step is expected to read, experts touched by uniform routing), and
           the MoE layer at batch 1 inside the loaded model: every MoE layer's forward
           (DeepseekMoE.forward, the module the engine runs) on one decode token, one after the
           other in one CUDA graph (so no layer finds its weights in L2), against the bytes it
           must read (the routed experts the token picks with their scales, the shared expert,
           the fp32 gate) / copy bandwidth. A torch-profiler pass of the same calls (eager)
           gives the per-kernel split.
  kvcache  KV tokens the pool holds (num_blocks x block_size) at --gpu-memory-utilization 0.9
           with --kv-cache-dtype auto or fp8, on the big fp8 cut.
  kvattn   the MLA decode kernel (ops paged_attention, Triton) at batch 64, 4k context, 16 heads
           (R1 under TP8) and 128, 576-wide latent keys, 512-wide values in 64-token pages, as
           benchmarks/sweep_mla_decode.py sets it up: a bf16 cache, and an e4m3 cache through
           the split kernel (fp8_split) and the e4m3-product kernel (fp8_mma), in one process;
           the cache bytes read once (fp8: 1 byte an element) / copy bandwidth, as CUDA-graph
           replays, with the relative error against the torch op.
  serve    `deepserve serve deepseek-r1 --load-format dummy --quantization fp8 --hf-overrides
           {"num_hidden_layers": 3 + N}` and `deepserve bench serve` random 1024 in / 256 out
           (--ignore-eos: random weights would stop at a random EOS), concurrency 64, 256 prompts.

Results: one JSON per figure, benchmarks/results/r1_<name>.json (bench_engine's format: name,
device, date, command, value, unit, roofline_value, ratio = value / roofline_value, extras).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import bench_engine as be  # noqa: E402
from bench_moe_layer import graph_or_eager_ms  # noqa: E402
from sweep_fused_moe import kernel_times  # noqa: E402

from deepserve import LLM  # noqa: E402
import deepserve.engine.model_runner as model_runner  # noqa: E402

GIB = 1 << 30
DENSE = 3                                   # R1's first_k_dense_replace
PREFIX = "r1_"
# MoE layers per cut and GPU: (big fp8 cut, cut where bf16 fits too), by GPU memory
CUTS = {"h200": {"big": 8, "compare": 4}, "h100": {"big": 5, "compare": 2}}
TARGETS = {"moe_weights_gib": 11.6, "fp8_over_bf16_b1": 1.6, "moe_layer_b1": 0.8, "kv_attn": 0.8, "kv_tokens": 2.0}
# --tiny: R1's structure (MLA with a q low-rank pair, sigmoid + noaux_tc grouped routing, one
# shared expert, fp8 128-blocks) at toy sizes, for a CPU check of the script's logic
TINY = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "n_routed_experts": 16,
        "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 128, "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 32, "v_head_dim": 32, "max_position_embeddings": 4096,
        "num_nextn_predict_layers": 0}


# ----------------------------------------------------------------------------- setup
def gpu_kind() -> str:
    """'h200' for a GPU with room for R1's 8-MoE-layer fp8 cut (> 100 GiB), else 'h100'."""
    if not torch.cuda.is_available():
        return "h100"
    return "h200" if torch.cuda.get_device_properties(0).total_memory > 100 * GIB else "h100"


def moe_layers(args) -> int:
    if args.moe_layers:
        return args.moe_layers
    return 1 if args.tiny else CUTS[gpu_kind()][args.cut]


def overrides(args, n_moe: int) -> dict:
    return {"num_hidden_layers": DENSE + n_moe, **(TINY if args.tiny else {})}


def bandwidth(args) -> float:
    """Copy bytes/s on the GPU; a nominal 1 GB/s in a CPU logic check (not a measurement)."""
    if args.device == "cpu":
        return 1e9
    bw = be.copy_bandwidth()
    print(f"{be.device_name()}: copy {bw / 1e12:.2f} TB/s (2 GiB, read + written)", flush=True)
    return bw


def engine_kwargs(args, n_moe: int, **extra) -> dict:
    kw = dict(load_format="dummy", hf_overrides=overrides(args, n_moe), seed=0,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
              device=args.device, **extra)
    if args.weights == "fp8":
        kw["quantization"] = "fp8"
    if args.device == "cuda":
        kw["dtype"] = "bfloat16"
    if args.kv_cache_dtype != "auto":
        kw["kv_cache_dtype"] = args.kv_cache_dtype
    return kw


class LoadMemory:
    """torch.cuda.memory_allocated right after the engine's load_model returns (before the KV
    pool and the CUDA graphs), and the peak during the load."""

    def __init__(self):
        self.after_load = self.peak = 0
        self._load = model_runner.load_model

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        def load(*a, **k):
            model = self._load(*a, **k)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.after_load, self.peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            return model

        model_runner.load_model = load
        return self

    def __exit__(self, *exc):
        model_runner.load_model = self._load


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def kv_pool(llm: LLM) -> dict:
    runner = llm.engine.runner
    pool = [t for m in runner.kv_layers for t in m.kv_cache]
    dtypes = sorted({str(t.dtype) for t in pool})
    return {"num_blocks": runner.num_blocks, "block_size": runner.block_size,
            "kv_tokens": runner.num_blocks * runner.block_size, "kv_pool_bytes": nbytes(pool),
            "kv_dtypes": dtypes}


def label(args, n_moe: int) -> str:
    return f"{'tiny_' if args.tiny else ''}{args.weights}_{DENSE}d{n_moe}m"


def save(rows: list, args, name: str, value: float, unit: str, roof, extra: dict | None = None) -> None:
    be.record(rows, name, value, unit, roof, extra, prefix=PREFIX, results=Path(args.out_dir))


# ----------------------------------------------------------------------------- experts
def moe_read_bytes(moe, x: torch.Tensor) -> dict:
    """Weight bytes one DeepseekMoE forward over x reads: the experts its routing picks (each
    expert's slice of every stacked parameter: weights and block scales), the whole shared
    expert and the gate (fp32 weight + correction bias)."""
    _, ids = moe.ops.moe_route(moe.gate(x), moe.gate.e_score_correction_bias, **moe.route)
    picked = int(torch.unique(ids).numel())
    per_expert = nbytes(p[0] for p in moe.experts.parameters())
    gate = nbytes(moe.gate.parameters())
    shared = nbytes(moe.shared_experts.parameters()) if moe.shared_experts is not None else 0
    return {"experts_picked": picked, "bytes_per_expert": per_expert, "gate_bytes": gate,
            "shared_bytes": shared, "total": picked * per_expert + gate + shared}


@torch.inference_mode()
def moe_layer_figure(rows: list, args, model, tag: str, bw: float) -> None:
    """Each MoE layer of the loaded model on one decode token, in one CUDA graph, vs its bytes."""
    layers = [layer.mlp for layer in model.model.layers if getattr(layer, "is_moe", False)]
    device = next(model.parameters()).device
    dtype = model.model.embed_tokens.weight.dtype          # the activations' dtype
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, model.config.hidden_size, generator=g, device=device).to(dtype)
    step_ms, mode = graph_or_eager_ms(lambda: [moe(x) for moe in layers], device, iters=50)
    layer_ms = step_ms / len(layers)
    counts = [moe_read_bytes(moe, x) for moe in layers]
    read = sum(c["total"] for c in counts) / len(layers)
    achieved = read / (layer_ms * 1e-3)
    extra = {"ms_per_layer": layer_ms, "bytes_read_per_layer": int(read), "moe_layers_timed": len(layers),
             "timing": mode, "copy_bandwidth": bw, "read_detail_first_layer": counts[0],
             "target_ratio": TARGETS["moe_layer_b1"]}
    if device.type == "cuda":
        try:
            split = kernel_times(lambda: [moe(x) for moe in layers], reps=5)      # eager
            extra["kernel_us_per_layer"] = {k[:90]: round(ms * 1e3 / len(layers), 2) for k, ms in split}
            extra["kernel_sum_ms_per_layer"] = sum(ms for _, ms in split) / len(layers)
        except Exception as exc:  # noqa: BLE001 - the split explains the figure; the figure stands without it
            extra["kernel_split_error"] = f"{type(exc).__name__}: {exc}"
    save(rows, args, f"{tag}_moe_layer_b1", achieved, "B/s", bw, extra)


def case_experts(args, rows: list) -> None:
    n_moe = moe_layers(args)
    tag = label(args, n_moe)
    bw = bandwidth(args)
    batches = [int(b) for b in args.batches.split(",")]
    with LoadMemory() as mem:
        llm = LLM("deepseek-r1", max_model_len=args.max_model_len, max_num_seqs=max(batches),
                  cuda_graph_sizes=batches, **engine_kwargs(args, n_moe))
    model = llm.engine.runner.model
    first_moe = next(layer for layer in model.model.layers if getattr(layer, "is_moe", False))
    mlp = first_moe.mlp
    parts = {"experts": nbytes(mlp.experts.parameters()), "gate": nbytes(mlp.gate.parameters()),
             "shared": nbytes(mlp.shared_experts.parameters()) if mlp.shared_experts is not None else 0,
             "attention": nbytes(first_moe.self_attn.parameters()),
             "expert_dtype": str(mlp.experts.w13_weight.dtype)}
    per_layer = parts["experts"] + parts["gate"] + parts["shared"]
    total_params = nbytes(model.parameters())
    save(rows, args, f"{tag}_moe_weights", per_layer / GIB, "GiB", None,
         {"bytes": per_layer, "parts_bytes": parts, "target_gib": TARGETS["moe_weights_gib"],
          "model_param_bytes": total_params})
    after = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    save(rows, args, f"{tag}_memory_after_load", mem.after_load / GIB, "GiB", None,
         {"bytes": mem.after_load, "peak_during_load_bytes": mem.peak, "model_param_bytes": total_params,
          "allocated_engine_up_bytes": after, **kv_pool(llm), "startup": llm.engine.runner.timings})
    kv_tokens_figure(rows, args, llm, tag)
    be.REPEATS = max(1, args.repeats)
    for b in batches:
        new = args.new_tokens if b == 1 else max(2, args.new_tokens // 2)
        rate, runs = be.decode_rate(llm, b, args.prompt_len, new)
        step = be.weight_bytes(model, active=True, batch=b)
        save(rows, args, f"{tag}_decode_b{b}", rate, "tok/s", b * bw / step,
             {"step_weight_bytes": step, "runs": runs, "prompt_len": args.prompt_len, "new_tokens": new})
    moe_layer_figure(rows, args, model, tag, bw)
    be.release(llm)


# ----------------------------------------------------------------------------- KV cache
def kv_tokens_figure(rows: list, args, llm: LLM, tag: str) -> None:
    """KV tokens the engine's pool holds (num_blocks x block_size) and its bytes."""
    pool = kv_pool(llm)
    save(rows, args, f"{tag}_kv_{args.kv_cache_dtype}_tokens", pool["kv_tokens"], "tokens", None,
         {**pool, "gpu_memory_utilization": args.gpu_memory_utilization,
          "max_model_len": llm.engine.max_model_len, "kv_cache_dtype": args.kv_cache_dtype,
          "bytes_per_block": llm.engine.runner.bytes_per_block()})


def case_kvcache(args, rows: list) -> None:
    n_moe = moe_layers(args)
    llm = LLM("deepseek-r1", max_model_len=args.max_model_len, max_num_seqs=256, cuda_graph_sizes=[1],
              **engine_kwargs(args, n_moe))
    kv_tokens_figure(rows, args, llm, label(args, n_moe))
    be.release(llm)


def case_kvattn(args, rows: list) -> None:
    """MLA decode attention (sweep_mla_decode.py's case) at each of --kvattn-heads, in one
    process: a bf16 latent pool (split kernel), an e4m3 pool through the split kernel (16-bit
    products over the widened tile, attention.MLA_FP8_MMA off) and through the e4m3-product
    kernel (on). Each is checked against the torch op on the same pool: rel_error_vs_torch on q
    itself, and for the e4m3-product kernel rel_error_vs_torch_q_e4m3 on q rounded as the
    kernel rounds it (its own arithmetic, apart from q's rounding)."""
    from sweep_setup import bandwidth_and_timer, prepare
    prepare(args.device)
    import deepserve.ops.triton  # noqa: F401  (registers the Triton kernels: resolve would give torch's)
    import deepserve.ops.triton.attention as tri_attention
    from deepserve.ops.registry import resolve
    from tests.ops.paged_batch import make_paged_batch
    from tests.ops.test_kv_fp8_ops import q_rounded_to_e4m3, rel_err

    bw, timer = bandwidth_and_timer(args.device)
    batch, ctx = (2, 128) if args.tiny else (64, 4096)
    width, v_width, block, scale = 576, 512, 64, 0.072
    tri, ref = resolve("paged_attention", "triton")[1], resolve("paged_attention", "torch")[1]
    for heads in (int(h) for h in args.kvattn_heads.split(",")):
        for variant in ("bf16", "fp8_split", "fp8_mma"):
            pb = make_paged_batch([1] * batch, [ctx] * batch, heads, 1, width, v_width, block_size=block,
                                  dtype=torch.bfloat16, device=args.device, mla=True)
            if variant != "bf16":
                # e4m3 at scale 1.0 (the engine's --kv-cache-dtype fp8 pool); the values stay a view
                pool = pb.k_cache.to(torch.float8_e4m3fn)
                pb.k_cache, pb.v_cache = pool, pool[..., :v_width]
            tri_attention.MLA_FP8_MMA = variant == "fp8_mma"
            args_ = pb.args(scale)
            got = tri(*args_)
            extras = {"rel_error_vs_torch": rel_err(got, ref(*args_))}
            if variant == "fp8_mma":
                q_args = (q_rounded_to_e4m3(pb.q),) + args_[1:]
                extras["rel_error_vs_torch_q_e4m3"] = rel_err(got, ref(*q_args))
            ms = timer(lambda: tri(*args_))
            if args.device == "cuda":
                # the decode kernel's splits apart from their merge (eager, so launch gaps are not in it)
                extras["kernel_us"] = {k[:90]: round(t * 1e3, 2) for k, t in kernel_times(lambda: tri(*args_), reps=5)}
            read = batch * ctx * width * pb.k_cache.element_size()
            save(rows, args, f"{'tiny_' if args.tiny else ''}mla_decode_{variant}_h{heads}_b{batch}_ctx{ctx}",
                 read / (ms * 1e-3), "B/s", bw,
                 {"us": ms * 1e3, "cache_bytes_read": read, "heads": heads, "block_size": block,
                  "kv_dtype": str(pb.k_cache.dtype), "target_ratio": TARGETS["kv_attn"], **extras})
    tri_attention.MLA_FP8_MMA = True


# ----------------------------------------------------------------------------- serve
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    end = time.time() + timeout_s
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout_s:.0f} s")


def case_serve(args, rows: list) -> None:
    if not args.tokenizer:
        raise SystemExit("--case serve needs --tokenizer FOLDER (the R1 tokenizer.json)")
    n_moe = moe_layers(args)
    port = free_port()
    serve = ["serve", "deepseek-r1", "--load-format", "dummy", "--quantization", "fp8", "--hf-overrides",
             json.dumps(overrides(args, n_moe)), "--tokenizer", args.tokenizer, "--port", str(port),
             "--log-level", "warning"]
    if args.device == "cpu":
        serve += ["--device", "cpu", "--max-model-len", "512"]
    in_len, out_len, conc, n = (32, 8, 4, 8) if args.tiny else (1024, 256, 64, 256)
    result_dir = Path(args.out_dir) / "serve_raw"
    bench = ["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", args.tokenizer,
             "--dataset-name", "random", "--random-input-len", str(in_len), "--random-output-len", str(out_len),
             "--max-concurrency", str(conc), "--num-prompts", str(n), "--ignore-eos", "--disable-tqdm",
             "--save-result", "--result-dir", str(result_dir), "--result-filename", "bench.json"]
    log = open(Path(args.out_dir) / "r1_serve_server.log", "w")
    t0 = time.time()
    server = subprocess.Popen([sys.executable, "-m", "deepserve", *serve], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, args.serve_start_s)
        startup = time.time() - t0
        subprocess.run([sys.executable, "-m", "deepserve", *bench], check=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    res = json.loads((result_dir / "bench.json").read_text())
    tag = f"{label(args, n_moe)}_serve_random{in_len}x{out_len}_c{conc}"
    keep = {k: res[k] for k in ("completed", "failed", "duration", "total_output_tokens", "mean_ttft_ms",
                                "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
                                "p99_tpot_ms", "mean_itl_ms", "total_token_throughput") if k in res}
    keep |= {"server_command": "deepserve " + " ".join(serve), "bench_command": "deepserve " + " ".join(bench),
             "server_startup_s": startup}
    save(rows, args, tag, res["output_throughput"], "tok/s", None, keep)


# ----------------------------------------------------------------------------- table
def fmt(r: dict) -> str:
    v, unit = r["value"], r["unit"]
    shown = f"{v / 1e9:.1f} GB/s" if unit == "B/s" else f"{v:.4g} {unit}"
    ratio = f"{r['ratio']:.1%}" if r.get("ratio") is not None else ""
    return f"| {r['name']} | {shown} | {ratio} | {r['device']} |"


def derived(a: dict, b: dict) -> str:
    """The command line of a ratio of two figures: both figures' commands."""
    return f"{a.get('command', '?')} / {b.get('command', '?')}"


CUT_NAME = re.compile(r"^(?:r1_)?(?P<w>bf16|fp8)_3d(?P<m>\d+)m_decode_b(?P<b>\d+)$")


def extrapolated_ratios(found: list) -> list:
    """fp8 / bf16 at batch b on an fp8 cut too big for bf16 experts on the GPU.

    A decode step's time is a + m * c in the number m of MoE layers (each adds the same
    attention and the same expert bytes at a batch), so the bf16 step at the fp8 cut's m is
    read off the line through the two bf16 cuts measured on the same device, and the fp8
    figure is divided by it. Entries name both bf16 cuts and keep their rates.
    """
    cuts: dict = {}
    for r in found:
        m = CUT_NAME.match(r["name"])
        if m:
            cuts.setdefault((m["w"], r["device"], m["b"]), {})[int(m["m"])] = r
    out = []
    for (weights, device, batch), fp8_cuts in cuts.items():
        bf16 = cuts.get(("bf16", device, batch), {})
        if weights != "fp8" or len(bf16) < 2:
            continue
        (m1, r1), (m2, r2) = sorted(bf16.items())[-2:]
        per_layer = (1 / r2["value"] - 1 / r1["value"]) / (m2 - m1)
        for m, fp8 in fp8_cuts.items():
            if m in bf16:
                continue
            bf16_rate = 1 / (1 / r2["value"] + (m - m2) * per_layer)
            out.append({"device": device, "date": fp8["date"],
                        "name": f"fp8_over_bf16_3d{m}m_decode_b{batch}_extrapolated",
                        "command": f"{fp8.get('command', '?')} / line through {r1.get('command', '?')} "
                                   f"and {r2.get('command', '?')}",
                        "value": fp8["value"] / bf16_rate, "unit": "x", "roofline_value": None, "ratio": None,
                        "fp8_tok_s": fp8["value"], "bf16_tok_s_extrapolated": bf16_rate,
                        "bf16_cuts": {str(m1): r1["value"], str(m2): r2["value"]},
                        "bf16_ms_per_moe_layer": per_layer * 1e3 * int(batch),
                        "target": TARGETS["fp8_over_bf16_b1"] if batch == "1" else None})
    return out


def case_table(args, rows: list) -> None:
    """Every r1_*.json in --out-dir, and the fp8 / bf16 decode ratio on each cut with both."""
    found = [json.loads(p.read_text()) for p in sorted(Path(args.out_dir).glob(f"{PREFIX}*.json"))]
    by_name = {r["name"]: r for r in found}
    for r in list(found):
        if "_bf16_" not in f"_{r['name']}" or "_decode_b" not in r["name"]:
            continue
        fp8 = by_name.get(r["name"].replace("bf16_", "fp8_", 1))
        if fp8 is not None:
            batch = r["name"].rsplit("_b", 1)[1]
            name = r["name"].replace("bf16_", "fp8_over_bf16_", 1)
            entry = {**{k: fp8[k] for k in ("device", "date")}, "name": name, "command": derived(fp8, r),
                     "value": fp8["value"] / r["value"], "unit": "x", "roofline_value": None, "ratio": None,
                     "fp8_tok_s": fp8["value"], "bf16_tok_s": r["value"],
                     "target": TARGETS["fp8_over_bf16_b1"] if batch == "1" else None}
            (Path(args.out_dir) / f"{PREFIX}{name}.json").write_text(json.dumps(entry, indent=2))
            found.append(entry)
    for r in list(found):
        fp8 = by_name.get(r["name"].replace("_kv_auto_tokens", "_kv_fp8_tokens"))
        if r["name"].endswith("_kv_auto_tokens") and fp8 is not None:
            name = r["name"].replace("_kv_auto_tokens", "_kv_fp8_over_auto_tokens")
            entry = {**{k: fp8[k] for k in ("device", "date")}, "name": name, "command": derived(fp8, r),
                     "value": fp8["value"] / r["value"], "unit": "x", "roofline_value": None, "ratio": None,
                     "target": TARGETS["kv_tokens"]}
            (Path(args.out_dir) / f"{PREFIX}{name}.json").write_text(json.dumps(entry, indent=2))
            found.append(entry)
    for entry in extrapolated_ratios(found):
        (Path(args.out_dir) / f"{PREFIX}{entry['name']}.json").write_text(json.dumps(entry, indent=2))
        found.append(entry)
    print("\n| figure | value | of roofline | device |\n|---|---|---|---|")
    for r in found:
        print(fmt(r))


# ----------------------------------------------------------------------------- main
CASES = {"experts": case_experts, "kvcache": case_kvcache, "kvattn": case_kvattn, "serve": case_serve,
         "table": case_table}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    ap.add_argument("--weights", default="fp8", choices=["fp8", "bf16"], help="routed experts and linears")
    ap.add_argument("--cut", default="big", choices=["big", "compare"],
                    help="MoE layers: the most fp8 fits (big) or what bf16 fits too (compare)")
    ap.add_argument("--moe-layers", type=int, default=0, help="MoE layers after the 3 dense ones (overrides --cut)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"])
    ap.add_argument("--batches", default="1,64,256", help="decode batch sizes (experts)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens decoded at batch 1 (half at larger)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per decode figure (median)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: R1's 163840, so the KV pool is sized by memory alone")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (serve)")
    ap.add_argument("--serve-start-s", type=float, default=420)
    ap.add_argument("--kvattn-heads", default="16,128", help="query heads of the kvattn case (R1: 128, 16 under TP8)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (with --device cpu: a logic check)")
    ap.add_argument("--out-dir", default=str(be.RESULTS))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: use --device cpu --tiny for a logic check")
    if args.moe_layers < 0:
        ap.error(f"--moe-layers must be >= 0, got {args.moe_layers}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    rows: list = []
    CASES[args.case](args, rows)
    if rows:
        print("\n| figure | value | of roofline | device |\n|---|---|---|---|")
        for r in rows:
            print(fmt(r))
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())

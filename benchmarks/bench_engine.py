"""Engine benchmarks with random weights of real shapes, each against a roofline measured in
the same run (issue 4):

  llama8b   r1-distill-llama-8b, bf16, batch 1, 128 prompt / 256 new tokens: decode tokens/s
            vs the bandwidth roofline (all weights read once per token / copy bandwidth);
            also decode throughput at batch 64.
  v2lite    deepseek-v2-lite, bf16: batch-1 decode vs its active-weight roofline; decode
            throughput at batch 64 and 256; prefill tokens/s and MFU at 8k tokens.

Each decode figure is the median of --repeats timed runs (default 5), every run in the JSON.

Usage (GPU):  python benchmarks/bench_engine.py --case llama8b v2lite
Writes one JSON per figure to benchmarks/results/engine_<name>.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from deepserve import LLM, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
# engine options every case adds (--async-scheduling), and the suffix of their result names
EXTRA: dict = {}
# timed runs of each decode figure (--repeats); the figure is their median
REPEATS = 5


def synchronize() -> None:
    """Wait for the GPU's queued work (nothing to wait for in a CPU logic check)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read + written."""
    n = 1 << 30  # 2 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    secs = start.elapsed_time(end) / 1e3 / 10
    del src, dst
    return 2 * n * 2 / secs


def matmul_peak() -> float:
    """FLOP/s of an 8192^3 bf16 matmul."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3 / 10)


def weight_bytes(model, active: bool, batch: int = 1) -> int:
    """Bytes of weights one decode step of `batch` tokens must read: all of them, or for MoE
    the experts the batch is expected to touch. With E experts and k per token, a batch of b
    tokens routed uniformly touches E * (1 - (1 - k/E)^b) distinct experts per layer. An
    embedding table is read one row a token (the whole table only where the LM head shares
    it); `active=False` (the bytes the model holds) counts every table whole."""
    cfg = model.config
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    tables = {id(m.weight) for m in model.modules()
              if type(m).__name__.endswith("Embedding") and isinstance(getattr(m, "weight", None), torch.Tensor)}
    total = 0
    for name, p in model.named_parameters():
        b = p.numel() * p.element_size()
        if active and id(p) in tables and p is not head:
            b = min(b, batch * p.shape[-1] * p.element_size())
        if active and ".experts." in name and p.dim() == 3:
            e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
            b = b * (1 - (1 - k / e) ** batch)
        total += b
    return int(total)


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (length,), generator=g).tolist()} for _ in range(n)]


def decode_rate(llm: LLM, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, list[float]]:
    """Decode tokens/s (all sequences together): (full run - prefill-only run) time, measured
    REPEATS times after a warm-up: (the median, every run). One run of identical code moved by
    3% between runs on an H100, so the figure is the median."""
    vocab = llm.engine.config.model.hf_config.vocab_size
    prompts = random_prompts(batch, prompt_len, vocab)
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.engine.block_manager.enable_prefix_caching = False
    llm.generate(prompts, greedy)  # warm-up
    rates = []
    for _ in range(REPEATS):
        synchronize()
        t0 = time.perf_counter()
        llm.generate(prompts, one)
        synchronize()
        t1 = time.perf_counter()
        llm.generate(prompts, greedy)
        synchronize()
        t2 = time.perf_counter()
        rates.append(batch * (new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
    return statistics.median(rates), rates


def prefill_rate(llm: LLM, tokens: int) -> float:
    vocab = llm.engine.config.model.hf_config.vocab_size
    prompts = random_prompts(1, tokens, vocab, seed=1)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.engine.block_manager.enable_prefix_caching = False
    llm.generate(prompts, one)
    synchronize()
    t0 = time.perf_counter()
    llm.generate(prompts, one)
    synchronize()
    return tokens / (time.perf_counter() - t0)


def record(rows: list, name: str, value: float, unit: str, roof: float, extra: dict | None = None,
           prefix: str = "engine_", results: Path = RESULTS) -> None:
    """One figure as benchmarks/results/<prefix><name>.json (ratio = value / roof) and a table row."""
    name += "_async" if EXTRA.get("async_scheduling") else ""
    entry = {"name": name, "device": device_name(), "date": datetime.date.today().isoformat(),
             "command": "python " + " ".join(sys.argv), "value": value, "unit": unit,
             "roofline_value": roof, "ratio": value / roof if roof else None, **(extra or {})}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{prefix}{name}.json").write_text(json.dumps(entry, indent=2))
    rows.append(entry)
    # as it comes too: a run cut short by its time limit still shows what it measured
    print(f"{name}: {value:.4g} {unit} ({entry['ratio']:.2%} of {roof:.4g})" if roof else f"{name}: {value:.4g} {unit}",
          flush=True)


def case_llama8b(rows, bw, peak):
    llm = LLM("r1-distill-llama-8b", **{**dict(load_format="dummy", dtype="bfloat16", max_model_len=2048,
                                               max_num_seqs=256, gpu_memory_utilization=0.85), **EXTRA})
    timings = llm.engine.runner.timings
    wb = weight_bytes(llm.engine.runner.model, active=False)
    rate, runs = decode_rate(llm, 1, 128, 256)
    record(rows, "llama8b_decode_b1", rate, "tok/s", bw / wb, {"weight_bytes": wb, "startup": timings, "runs": runs})
    rate64, runs = decode_rate(llm, 64, 128, 256)
    record(rows, "llama8b_decode_b64", rate64, "tok/s", 64 * bw / wb, {"weight_bytes": wb, "runs": runs})
    release(llm)


def case_v2lite(rows, bw, peak):
    llm = LLM("deepseek-v2-lite", **{**dict(load_format="dummy", dtype="bfloat16", max_model_len=9000,
                                            max_num_seqs=256, max_num_batched_tokens=8192,
                                            gpu_memory_utilization=0.85), **EXTRA})
    model = llm.engine.runner.model
    active = weight_bytes(model, active=True)
    rate, runs = decode_rate(llm, 1, 128, 256)
    record(rows, "v2lite_decode_b1", rate, "tok/s", bw / active,
           {"active_weight_bytes": active, "startup": llm.engine.runner.timings, "runs": runs})
    for b in (64, 256):
        r, runs = decode_rate(llm, b, 128, 128)
        step = weight_bytes(model, active=True, batch=b)
        record(rows, f"v2lite_decode_b{b}", r, "tok/s", b * bw / step, {"step_weight_bytes": step, "runs": runs})
    tokens = 8192
    p = prefill_rate(llm, tokens)
    active_params = active / 2
    # MFU: 2 FLOPs per active parameter per token (attention's quadratic part left out)
    record(rows, "v2lite_prefill_8k", p * 2 * active_params, "FLOP/s", peak, {"tokens_per_s": p})
    release(llm)


def release(llm: LLM) -> None:
    """Free an engine's GPU memory before the next case builds one."""
    import gc
    llm.engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def main():
    global REPEATS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", default=["llama8b", "v2lite"], choices=["llama8b", "v2lite"])
    ap.add_argument("--async-scheduling", action="store_true",
                    help="engines with async scheduling; results named *_async")
    ap.add_argument("--repeats", type=int, default=REPEATS,
                    help=f"timed runs of each decode figure, reported as their median (default {REPEATS})")
    ap.add_argument("--engine-args", type=json.loads, default={},
                    help="JSON of engine options every case adds, e.g. "
                         "'{\"cuda_graph_sizes\": [1, 64], \"cudagraph_mode\": \"FULL_DECODE_ONLY\"}'")
    args = ap.parse_args()
    REPEATS = max(1, args.repeats)
    # synchronous unless asked: the engine's own default (async on a GPU) would change what the
    # unsuffixed result names have always measured
    EXTRA["async_scheduling"] = bool(args.async_scheduling)
    EXTRA.update(args.engine_args)
    bw, peak = copy_bandwidth(), matmul_peak()
    print(f"roofline: copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows: list = []
    for case in args.case:
        try:
            {"llama8b": case_llama8b, "v2lite": case_v2lite}[case](rows, bw, peak)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next case
            print(f"case {case} failed: {type(exc).__name__}: {exc}", flush=True)
    print("\n| name | value | unit | roofline | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['value']:.4g} | {r['unit']} | {r['roofline_value']:.4g} | {r['ratio']:.2%} |")


if __name__ == "__main__":
    main()

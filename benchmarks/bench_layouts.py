"""Multi-GPU layouts on the deepseek-v2-lite shapes (issue 8; needs 2 GPUs):

1. Equality: the deepseek-v2-lite preset cut to 4 layers, dummy weights (drawn per checkpoint
   tensor, so layout-independent), gives the same greedy tokens under TP=1, TP=2 and EP=2
   (TP=2 attention + experts sharded over the 2 ranks). bf16 reductions in a different order
   may flip near-tied tokens late in a sequence: the first differing step is printed.
2. Speed: the full deepseek-v2-lite preset (dummy weights), decode tokens/s at batch 64 and
   256 for each layout, and the all-reduce time per decode step: NCCL all-reduce of a
   [batch, hidden] bf16 tensor timed alone, times the all-reduces one step makes.

Usage: python benchmarks/bench_layouts.py [--skip-equality] [--skip-speed]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import copy_bandwidth, decode_rate, release  # noqa: E402

from deepserve import LLM, SamplingParams  # noqa: E402
from deepserve.config import load_hf_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = {"tp1": {}, "tp2": {"tensor_parallel_size": 2},
           "ep2": {"tensor_parallel_size": 2, "enable_expert_parallel": True}}


def equality(rows: list) -> None:
    """Dummy weights are drawn per checkpoint tensor, so every layout serves the same model."""
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, 100000, (n,), generator=g).tolist()} for n in (5, 33, 80)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for name, kw in LAYOUTS.items():
        print(f"equality: starting {name}", flush=True)
        llm = LLM("deepseek-v2-lite", load_format="dummy", dtype="bfloat16", max_model_len=512,
                  hf_overrides={"num_hidden_layers": 4}, gpu_memory_utilization=0.5, **kw)
        print(f"equality: {name} started {llm.engine.runner.timings}", flush=True)
        outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        release(llm)
    for name in ("tp2", "ep2"):
        same = sum(a == b for a, b in zip(outs["tp1"], outs[name]))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                      for a, b in zip(outs["tp1"], outs[name])]
        print(f"{name} vs tp1: {same}/{len(prompts)} sequences identical; first differing step {first_diff}")
        rows.append({"check": f"{name}_equals_tp1", "identical": same, "of": len(prompts),
                     "first_diff": first_diff})


def allreduce_seconds(batch: int, hidden: int) -> float:
    """One NCCL all-reduce of [batch, hidden] bf16 across both GPUs, timed in a child pair."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29000 + batch % 1000
    procs = [ctx.Process(target=_ar_worker, args=(r, port, batch, hidden, q)) for r in range(2)]
    for p in procs:
        p.start()
    secs = q.get(timeout=120)
    for p in procs:
        p.join()
    return secs


def _ar_worker(rank, port, batch, hidden, q):
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.randn(batch, hidden, dtype=torch.bfloat16, device="cuda")
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(50):
        dist.all_reduce(x)
    e.record()
    torch.cuda.synchronize()
    if rank == 0:
        q.put(s.elapsed_time(e) / 1e3 / 50)
    dist.destroy_process_group()


def speed(rows: list, bw: float) -> None:
    cfg = load_hf_config("deepseek-v2-lite")
    for name, kw in LAYOUTS.items():
        print(f"speed: starting {name}", flush=True)
        llm = LLM("deepseek-v2-lite", load_format="dummy", dtype="bfloat16", max_model_len=1024,
                  max_num_seqs=256, gpu_memory_utilization=0.8, **kw)
        for b in (64, 256):
            rate = decode_rate(llm, b, 128, 64)
            entry = {"name": f"layout_v2lite_{name}_decode_b{b}", "value": rate, "unit": "tok/s"}
            if kw:
                # per layer: attention output + MLP/MoE output all-reduced (EP: the MoE sum)
                per_step = 2 * cfg.num_hidden_layers + 1
                t = allreduce_seconds(b, cfg.hidden_size)
                entry.update(allreduce_per_step_ms=per_step * t * 1e3, allreduces_per_step=per_step,
                             step_ms=b / rate * 1e3)
            print(entry, flush=True)
            rows.append(entry)
        release(llm)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-equality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    rows: list = []
    bw = copy_bandwidth()
    if not args.skip_equality:
        equality(rows)
    if not args.skip_speed:
        speed(rows, bw)
    RESULTS.mkdir(exist_ok=True)
    out = {"device": f"2x {torch.cuda.get_device_name()}", "date": datetime.date.today().isoformat(),
           "command": "python " + " ".join(sys.argv), "copy_bandwidth_Bps": bw, "rows": rows}
    (RESULTS.parent / "layouts_v2lite.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

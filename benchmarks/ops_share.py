"""How much of a decode step runs as Triton kernels (issue 24): the share of op calls and the
share of GPU kernel time, under one --ops backend.

The engine is built with random ("dummy") weights of the preset's shapes (--hf-overrides cuts
a model, e.g. R1 to 3 dense + 2 MoE layers); --batch requests with a --prompt-len prompt are
prefilled, then --steps decode steps run under torch.profiler (CUDA graphs on unless
--enforce-eager; CUPTI reports the kernels a graph replay runs). Reported:

  calls  op calls since the engine started (its start-up step, prefill, CUDA-graph capture, eager
         steps: a graph replay calls no op; this script sets DEEPSERVE_OPS_COUNT=1 so the engine's
         op table counts every call) by (op, backend) and the share that ran as Triton kernels
         (what /metrics' deepserve:triton_op_call_share then says);
  time   GPU kernel time per step by kind and group as deepserve/ops/profile.py (what the
         engine's --ops-profile runs) attributes it (triton = deepserve's own Triton kernels,
         FlagGems' and any other live Triton kernel, found by name; blas = cuBLAS / cuDNN;
         torch; memcpy/memset) and the Triton share of kernel time; the top kernels.

A JSON with every number goes to benchmarks/results/ops_share_<model>_<ops>_b<batch>.json.

GPU:  python benchmarks/ops_share.py --model r1-distill-llama-8b --ops triton-all --batch 1 64
      python benchmarks/ops_share.py --model deepseek-r1 --quantization fp8 --ops triton-all --batch 1 64 \\
          --hf-overrides '{"num_hidden_layers": 5}'
CPU smoke check (no GPU time, op calls only): --device cpu --tiny
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

# kernel_table sits beside this file; the repo root makes deepserve importable uninstalled
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from kernel_table import print_kernels

from deepserve import LLM, SamplingParams
from deepserve.ops.profile import OpsProfiler, aggregate

RESULTS = Path(__file__).resolve().parent / "results"
TINY = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000}


def measure(args, batch: int) -> dict:
    kw = dict(load_format="dummy", device=args.device, ops=args.ops, seed=0, enforce_eager=args.enforce_eager,
              max_model_len=args.prompt_len + args.steps + 32, max_num_seqs=max(batch, 1),
              gpu_memory_utilization=args.gpu_memory_utilization)
    overrides = dict(TINY) if args.tiny else {}
    overrides.update(json.loads(args.hf_overrides or "{}"))
    if overrides:
        kw["hf_overrides"] = overrides
    if args.quantization:
        kw["quantization"] = args.quantization
    llm = LLM(args.model, **kw)
    engine = llm.engine
    vocab = engine.config.model.hf_config.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=args.steps + 16, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(None, {"prompt_token_ids": torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()},
                           params)
    # prefill (one or more steps), then a few warm decode steps
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()
    for _ in range(4):
        engine.step()
    table = engine.runner.ops
    cuda = engine.platform.device().type == "cuda"
    profiler = OpsProfiler(cuda)
    with profiler.profiling(lambda: args.steps):
        for _ in range(args.steps):
            engine.step()
    # op calls since start (prefill, the graphs' capture, eager steps): graph replays call no op
    calls = {f"{op}/{backend}": n for (op, backend), n in sorted(table.counts.items())}
    totals = table.call_totals()
    agg = aggregate(profiler.last_records, args.steps, profiler.report.triton_names, top=args.top)
    kernel_us = agg["kernel_us_per_step"]
    result = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": args.model, "hf_overrides": overrides, "ops": args.ops, "batch": batch, "steps": args.steps,
        "cuda_graphs": cuda and not args.enforce_eager,
        "op_calls": calls, "triton_op_call_share": totals["triton_op_calls"] / max(totals["op_calls"], 1),
        "kernels": agg,
        "triton_time_share": agg["kind_shares"]["triton"] if cuda and kernel_us else None,
    }
    engine.shutdown()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="r1-distill-llama-8b")
    ap.add_argument("--ops", default="triton-all", choices=["torch", "triton", "triton-all", "flaggems"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hf-overrides", default=None, help="JSON merged over config.json, e.g. a layer cut")
    ap.add_argument("--quantization", default=None, help="e.g. fp8 for R1's random weights in their served form")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer 256-wide model of the preset (smoke check)")
    args = ap.parse_args()
    os.environ["DEEPSERVE_OPS_COUNT"] = "1"     # the engines' op tables count every call since start
    RESULTS.mkdir(exist_ok=True)
    for batch in args.batch:
        r = measure(args, batch)
        share = r["triton_time_share"]
        print(f"\n{args.model} --ops {args.ops} batch {batch} on {r['device']}: {100 * r['triton_op_call_share']:.1f}% "
              f"of op calls as Triton kernels" + (f", {100 * share:.1f}% of GPU kernel time" if share is not None else ""))
        print("  op calls: " + ", ".join(f"{k} {v}" for k, v in r["op_calls"].items()))
        print_kernels("kernels" if share is not None else "CPU ops", r["kernels"])
        print("  by kind: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["kernels"]["kind_shares"].items()))
        name = f"ops_share_{args.model.replace('/', '_')}_{args.ops}_b{batch}{'_tiny' if args.tiny else ''}.json"
        (RESULTS / name).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()

"""Multi-GPU layouts on the deepseek-v2-lite shapes (issue 8; needs 2 GPUs):

1. Equality: the deepseek-v2-lite preset cut to 4 layers, dummy weights (drawn per checkpoint
   tensor, so layout-independent), gives the same greedy tokens under TP=1, TP=2, EP=2 (TP=2
   attention + experts sharded over the 2 ranks) and DP=2 x EP=2 (both token exchanges), in
   fp32 and bf16. Random weights give near-flat distributions, so reductions in a different
   order may flip near-tied tokens (more so in bf16): where sequences differ, the first
   differing step is printed with whether each side's token is in the other's top 5.
2. Speed: the full deepseek-v2-lite preset (dummy weights), decode tokens/s at batch 64 and
   256 for each layout, and the all-reduce time per decode step: NCCL all-reduce of a
   [batch, hidden] bf16 tensor timed alone, times the all-reduces one step makes.

Usage: python benchmarks/bench_layouts.py [--skip-equality] [--skip-speed]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import copy_bandwidth, decode_rate  # noqa: E402

from deepserve import LLM, SamplingParams  # noqa: E402
from deepserve.config import load_hf_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = {"tp1": {}, "tp2": {"tensor_parallel_size": 2},
           "ep2": {"tensor_parallel_size": 2, "enable_expert_parallel": True},
           # DeepSeek's own layout: attention data-parallel, experts sharded over the DP ranks
           "dp2ep2": {"data_parallel_size": 2, "enable_expert_parallel": True},
           "dp2ep2_a2a": {"data_parallel_size": 2, "enable_expert_parallel": True, "all2all_backend": "alltoall"}}


PROMPT_LENS = (5, 33, 80)
EQUALITY_DTYPES = ("float32", "bfloat16")


def equality_tokens(kw: dict, dtype: str) -> list[dict]:
    """Greedy tokens (and each step's top-5 logprobs) of the 4-layer cut under one layout."""
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, 100000, (n,), generator=g).tolist()} for n in PROMPT_LENS]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    llm = LLM("deepseek-v2-lite", load_format="dummy", dtype=dtype, max_model_len=512,
              hf_overrides={"num_hidden_layers": 4}, gpu_memory_utilization=0.5, **kw)
    return [{"tokens": o.outputs[0].token_ids,
             "top": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
            for o in llm.generate(prompts, sp)]


def compare(outs: dict, dtype: str, rows: list) -> None:
    """Identical greedy sequences, and where two differ, whether the step that first differs
    is a near-tie: each layout's token is in the other's top 5 (vLLM's check_logprobs_close)."""
    ref = outs.get("tp1")
    for name in [n for n in LAYOUTS if n != "tp1" and n in outs and ref is not None]:
        same, first_diff, close, gaps = 0, [], True, []
        for a, b in zip(ref, outs[name]):
            i = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
            first_diff.append(i)
            if i is None:
                same += 1
                continue
            ta, tb = str(a["tokens"][i]), str(b["tokens"][i])
            close = close and tb in a["top"][i] and ta in b["top"][i]
            if tb in a["top"][i]:
                gaps.append(round(a["top"][i][ta] - a["top"][i][tb], 5))
        print(f"{dtype} {name} vs tp1: {same}/{len(PROMPT_LENS)} identical; first differing step "
              f"{first_diff}; near-ties {close} (tp1 logprob gaps there {gaps})", flush=True)
        rows.append({"check": f"{name}_equals_tp1_{dtype}", "identical": same, "of": len(PROMPT_LENS),
                     "first_diff": first_diff, "differences_are_near_ties": close, "logprob_gaps": gaps})


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


def speed_rows(name: str, kw: dict) -> list[dict]:
    cfg = load_hf_config("deepseek-v2-lite")
    rows = []
    llm = LLM("deepseek-v2-lite", load_format="dummy", dtype="bfloat16", max_model_len=1024,
              max_num_seqs=256, gpu_memory_utilization=0.8, **kw)
    for b in (64, 256):
        rate, runs = decode_rate(llm, b, 128, 64)
        entry = {"name": f"layout_v2lite_{name}_decode_b{b}", "value": rate, "unit": "tok/s",
                 "step_ms": b / rate * 1e3, "runs": runs}
        if kw.get("tensor_parallel_size", 1) > 1:
            # per layer: attention output + MLP/MoE output all-reduced (EP: the MoE sum)
            n, rows_per = 2 * cfg.num_hidden_layers + 1, b
        elif kw.get("data_parallel_size", 1) > 1 and kw.get("all2all_backend") != "alltoall":
            # DP x EP: per MoE layer an all-gather of the tokens and an all-reduce of the
            # outputs over [batch, hidden] (counted as two all-reduces of the full batch)
            n, rows_per = 2 * (cfg.num_hidden_layers - cfg.first_k_dense_replace), b
        else:
            n = 0
        if n:
            t = allreduce_seconds(rows_per, cfg.hidden_size)
            entry.update(collective_ms_per_step=n * t * 1e3, collectives_per_step=n,
                         allreduce_ms=t * 1e3)
        print(entry, flush=True)
        rows.append(entry)
    return rows


def child(part: str, name: str, out: str) -> None:
    """One layout in its own process: it writes its result and exits without tearing the
    engine down, so one layout's leftovers (or a stuck teardown) cannot touch the next."""
    if part == "speed":
        result = speed_rows(name, LAYOUTS[name])
    else:  # equality-<dtype>
        result = equality_tokens(LAYOUTS[name], part.split("-", 1)[1])
    Path(out).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # workers die with this process (PR_SET_PDEATHSIG)


def run_child(part: str, name: str, timeout_s: float):
    print(f"{part}: {name}", flush=True)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        subprocess.run([sys.executable, __file__, "--child", part, name, out], timeout=timeout_s, check=True)
        return json.loads(Path(out).read_text())
    except (subprocess.SubprocessError, ValueError) as exc:
        print(f"{part}: {name} failed: {exc}", flush=True)
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-equality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--dtypes", nargs="+", default=list(EQUALITY_DTYPES), choices=EQUALITY_DTYPES,
                    help="dtypes of the equality check")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--timeout", type=float, default=240, help="seconds per layout and part")
    ap.add_argument("--out", default="layouts_v2lite.json", help="result file name in benchmarks/results/")
    ap.add_argument("--child", nargs=3, metavar=("PART", "LAYOUT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    rows: list = []
    bw = copy_bandwidth()
    out = {"device": f"2x {torch.cuda.get_device_name()}", "date": datetime.date.today().isoformat(),
           "command": "python " + " ".join(sys.argv), "copy_bandwidth_Bps": bw, "rows": rows}

    def save():  # after every layout, so a run cut short keeps what it measured
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / args.out).write_text(json.dumps(out, indent=2))

    if not args.skip_equality:
        for dtype in args.dtypes:
            outs = {n: run_child(f"equality-{dtype}", n, args.timeout) for n in args.layouts}
            compare({n: o for n, o in outs.items() if o is not None}, dtype, rows)
            save()
    if not args.skip_speed:
        for n in args.layouts:
            rows += run_child("speed", n, args.timeout) or []
            save()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
